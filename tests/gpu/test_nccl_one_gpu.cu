// NCCL at world size 2 on a machine with one GPU: two ranks of one communicator on the same device
// (one process, one thread per rank, as session<_, cuda_backend> drives them). NCCL has refused
// that ("Duplicate GPU detected", ncclInvalidUsage) in the versions we know; if the NCCL here
// accepts it, the in-place all-gather, the chunked gather_range and point-to-point transfer run at
// world size 2 and are checked byte for byte; if it refuses, the test says so (the world-size >= 2
// paths then run only in test_multigpu_nccl, on two GPUs), and checks that the refusal is a clean
// error naming NCCL's reason within the time limit, not a hang or a crash.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <exception>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "gpu_main.hpp"
#include "unshard/backend/cuda/cuda_backend.cuh"

namespace {

std::vector<std::byte> pattern(std::size_t bytes, unsigned seed) {
  std::vector<std::byte> v(bytes);
  for (std::size_t i = 0; i < bytes; ++i) v[i] = std::byte(static_cast<unsigned char>(i * 37 + seed * 11));
  return v;
}

}  // namespace

TEST_CASE("NCCL at world size 2 on one GPU: runs the collectives, or NCCL refuses it cleanly") {
  unshard::cuda_world_options opt;
  opt.timeout = std::chrono::seconds(30);
  std::unique_ptr<unshard::cuda_world> w;
  const auto t0 = std::chrono::steady_clock::now();
  try {
    w = std::make_unique<unshard::cuda_world>(std::vector<int>{0, 0}, opt);
  } catch (const std::exception& e) {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    MESSAGE("path: NCCL refuses two ranks on one GPU (after ", s, " s): ", std::string(e.what()),
            "; world size >= 2 is covered by test_multigpu_nccl on two GPUs");
    CHECK(std::string(e.what()).find("NCCL") != std::string::npos);
    CHECK(s < 30.0);
    return;
  }
  MESSAGE("path: NCCL accepts two ranks on one GPU: all_gather, gather_range and transfer at world size 2");
  // Both ranks share the device: nothing in a rank's thread may synchronise the whole device
  // (cudaDeviceSynchronize, cudaFree, the legacy stream), or it would wait for the other rank's
  // collective, which waits for this rank. So memory is set up before and freed after the threads,
  // and each thread uses its own stream only.
  constexpr std::size_t shard = (1 << 20) + 17, world = 2;
  const auto flat = pattern(shard * world, 4);
  std::vector<unshard::cuda::region_buffer> bufs, owns, backs;
  for (std::size_t rank = 0; rank < world; ++rank) {
    bufs.push_back(unshard::cuda::device_buffer(0, shard * world));
    owns.push_back(unshard::cuda::device_buffer(0, shard));
    backs.push_back(unshard::cuda::pinned_buffer(0, shard * world));
    unshard::cuda::upload_to_device(0, owns[rank].data(), flat.data() + rank * shard, shard);
  }
  UNSHARD_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<std::string> errors(world);
  std::vector<std::thread> threads;
  for (std::size_t rank = 0; rank < world; ++rank)
    threads.emplace_back([&, rank] {
      try {
        auto comm = unshard::cuda_backend::comm_stream(*w, rank, nullptr);
        std::byte* buf = bufs[rank].data();
        const std::byte* own = owns[rank].data();
        const cudaStream_t s = comm->native();
        const auto read = [&](std::size_t bytes) {  // on this rank's stream only
          UNSHARD_CUDA_CHECK(cudaMemcpyAsync(backs[rank].data(), buf, bytes, cudaMemcpyDeviceToHost, s));
          comm->synchronize();
          return std::vector<std::byte>(backs[rank].data(), backs[rank].data() + bytes);
        };
        UNSHARD_CUDA_CHECK(cudaMemsetAsync(buf, 0xEE, shard * world, s));
        comm->local_copy(buf + rank * shard, own, shard, 0);
        comm->all_gather(buf + rank * shard, buf, shard, 0);
        if (read(shard * world) != flat) throw unshard::error("all_gather differs");
        // gather_range across the owners' boundary, own part placed first (the chunked policy).
        const std::size_t begin = shard / 2, end = shard + shard / 3;
        UNSHARD_CUDA_CHECK(cudaMemsetAsync(buf, 0xEE, shard * world, s));
        const std::size_t lo = std::max(begin, rank * shard), hi = std::min(end, (rank + 1) * shard);
        if (lo < hi) comm->local_copy(buf + (lo - begin), own + (lo - rank * shard), hi - lo, 1);
        comm->gather_range(buf, begin, end, shard, 1);
        const auto got = read(end - begin);
        if (!std::equal(got.begin(), got.end(), flat.begin() + static_cast<std::ptrdiff_t>(begin)))
          throw unshard::error("gather_range differs");
        // transfer 0 -> 1 (ncclSend/ncclRecv).
        UNSHARD_CUDA_CHECK(cudaMemsetAsync(buf, 0xEE, shard * world, s));
        comm->transfer(0, 1, own, buf, shard, 2);
        const auto moved = read(shard);
        if (rank == 1 && moved != std::vector<std::byte>(flat.begin(), flat.begin() + shard))
          throw unshard::error("transfer 0 -> 1 differs");
      } catch (const std::exception& e) {
        errors[rank] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  for (std::size_t r = 0; r < world; ++r) CHECK_MESSAGE(errors[r].empty(), "rank ", r, ": ", errors[r]);
}
