// NCCL across two or more local GPUs: the per-process bootstrap (each thread plays one process, the
// unique id broadcast through a caller-supplied exchange) and failure handling: a rank's abort ends
// a peer's pending collective with rank_failure instead of a hang, and an abort never waits for a
// peer's call blocked in its enqueue (two communicators). Needs >= 2 devices (NCCL refuses two
// ranks of a communicator on one GPU): exits 77 ("Skipped") otherwise.
#include <doctest/doctest.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <chrono>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "gpu_main.hpp"
#include "unshard/backend/cuda/cuda_backend.cuh"

namespace {

static const bool needs_two_devices = unshard::test::require_devices(2);

using unshard::cuda_backend;
using unshard::cuda_world;

// The unique-id exchange in memory: rank 0 publishes its blob, the others block until it is there.
// (A real job passes the TCP exchange of backend/net or file_unique_id_exchange.)
class memory_exchange {
 public:
  unshard::cuda::unique_id_exchange for_rank(std::size_t rank) {
    return [this, rank](std::span<std::byte> blob) {
      if (rank == 0) published_.set_value(std::vector<std::byte>(blob.begin(), blob.end()));
      else {
        const auto& v = future_.get();
        std::copy(v.begin(), v.end(), blob.begin());
      }
    };
  }

 private:
  std::promise<std::vector<std::byte>> published_;
  std::shared_future<std::vector<std::byte>> future_ = published_.get_future().share();
};

std::vector<std::byte> pattern(std::size_t bytes, unsigned seed) {
  std::vector<std::byte> v(bytes);
  for (std::size_t i = 0; i < bytes; ++i) v[i] = std::byte(static_cast<unsigned char>(i * 29 + seed * 101));
  return v;
}

std::vector<std::byte> to_host(const std::byte* device, std::size_t bytes) {
  std::vector<std::byte> v(bytes);
  UNSHARD_CUDA_CHECK(cudaMemcpy(v.data(), device, bytes, cudaMemcpyDeviceToHost));
  return v;
}

template <class F>
std::vector<std::string> run_ranks(std::size_t n, F body) {
  std::vector<std::thread> threads;
  std::vector<std::string> errors(n);
  for (std::size_t r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      try {
        body(r);
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  return errors;
}

}  // namespace

TEST_CASE("per-process bootstrap: each rank joins with (rank, world, device) and the root's unique id") {
  const std::size_t world = static_cast<std::size_t>(unshard::cuda::device_count());
  constexpr std::size_t shard = 3 << 20;
  const auto flat = pattern(shard * world, 5);
  memory_exchange exchange;
  const auto errors = run_ranks(world, [&](std::size_t rank) {
    cuda_world w(rank, world, static_cast<int>(rank), exchange.for_rank(rank));
    if (w.size() != world || !w.is_local(rank) || w.local_ranks().size() != 1) throw unshard::error("world shape");
    auto comm = cuda_backend::comm_stream(w, rank, nullptr);
    auto buf = unshard::cuda::device_buffer(w.device_of(rank), shard * world);
    UNSHARD_CUDA_CHECK(cudaMemset(buf.data(), 0, buf.size()));
    UNSHARD_CUDA_CHECK(cudaMemcpy(buf.data() + rank * shard, flat.data() + rank * shard, shard, cudaMemcpyHostToDevice));
    UNSHARD_CUDA_CHECK(cudaDeviceSynchronize());  // the legacy stream's set-up, before the non-blocking stream
    comm->all_gather(buf.data() + rank * shard, buf.data(), shard, 0);
    comm->synchronize();
    if (to_host(buf.data(), buf.size()) != flat) throw unshard::error("all_gather result differs");
    // A rank of another process is named as such.
    try {
      w.device_of((rank + 1) % world);
      throw unshard::error("device_of(remote rank) did not throw");
    } catch (const unshard::error& e) {
      if (std::string(e.what()).find("is not driven by this process") == std::string::npos) throw;
    }
  });
  for (std::size_t r = 0; r < world; ++r) {
    const std::string where = "rank " + std::to_string(r) + ": " + errors[r];
    CHECK_MESSAGE(errors[r].empty(), where);
  }
}

TEST_CASE("one process, all local GPUs: a rank's abort ends its peers' pending all_gather, naming it") {
  cuda_world w(static_cast<std::size_t>(unshard::cuda::device_count()));
  const std::size_t last = w.size() - 1;
  constexpr std::size_t shard = 1 << 20;
  std::atomic<std::size_t> ready{0};  // ranks about to enter the gather
  const auto errors = run_ranks(w.size(), [&](std::size_t rank) {
    if (rank == last) {  // never joins the collective: it fails instead, while the others wait in it
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
      while (ready.load() < last && std::chrono::steady_clock::now() < give_up)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      std::this_thread::sleep_for(std::chrono::milliseconds(200));  // they are now waiting in it
      w.abort(rank, "injected failure on the last rank");
      return;
    }
    auto comm = cuda_backend::comm_stream(w, rank, nullptr);
    auto buf = unshard::cuda::device_buffer(w.device_of(rank), shard * w.size());
    ++ready;
    try {
      comm->all_gather(buf.data() + rank * shard, buf.data(), shard, 0);  // may itself wait for the peer
      comm->synchronize();
    } catch (const unshard::rank_failure& e) {
      if (e.failed_rank() != static_cast<int>(last)) throw unshard::error("wrong rank named: " + std::string(e.what()));
      throw unshard::error(std::string("rank_failure: ") + e.what());
    }
  });
  const std::string expected =
      "rank_failure: rank " + std::to_string(last) + " failed: injected failure on the last rank";
  for (std::size_t r = 0; r < last; ++r) CHECK(errors[r] == expected);
}

TEST_CASE("one process per rank: a peer that aborts without joining ends the wait within the timeout") {
  const std::size_t world = static_cast<std::size_t>(unshard::cuda::device_count());
  unshard::cuda_world_options opt;
  opt.timeout = std::chrono::seconds(5);
  memory_exchange exchange;
  std::vector<double> seconds(world, 0.0);
  const auto errors = run_ranks(world, [&](std::size_t rank) {
    cuda_world w(rank, world, static_cast<int>(rank), exchange.for_rank(rank), opt);
    if (rank == 1) {  // this "process" dies: its communicator is aborted, it never gathers
      w.abort(1, "killed");
      return;
    }
    auto comm = cuda_backend::comm_stream(w, rank, nullptr);
    auto buf = unshard::cuda::device_buffer(w.device_of(rank), 4096 * world);
    const auto t0 = std::chrono::steady_clock::now();
    try {
      // With lazy connection set-up the enqueue itself may be what waits for the dead peer.
      comm->all_gather(buf.data() + rank * 4096, buf.data(), 4096, 0);
      comm->synchronize();
    } catch (const unshard::rank_failure&) {
      seconds[rank] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      throw;
    }
  });
  CHECK(errors[1].empty());
  for (std::size_t r = 0; r < world; ++r) {
    if (r == 1) continue;
    // NCCL may report the peer's loss (remote error) or not (intra-node transports): either an
    // NCCL error or the timeout ends the wait, on the rank that observed it.
    CHECK_MESSAGE(errors[r].find("rank " + std::to_string(r) + " failed: ") == 0, errors[r]);
    CHECK(seconds[r] > 0.0);
    CHECK(seconds[r] < 5.0 + 10.0);
  }
}

TEST_CASE("two communicators: a rank's abort does not wait for a peer's call blocked in its enqueue") {
  // The defect: abort() took, exclusively, a lock that every call held across its NCCL call. Rank 0
  // blocked in an enqueue (a launch into a stream full of collectives waiting for rank 1) then kept
  // rank 1's abort from ever releasing those collectives: a hang. Here rank 0's call blocks until
  // rank 1's abort has returned (or 10 s).
  cuda_world w(2);
  std::atomic<bool> inside{false}, abort_returned{false};
  std::thread rank0([&] {
    try {
      w.call(0, "a blocked enqueue", [&](ncclComm_t) {
        inside = true;
        const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        while (!abort_returned && std::chrono::steady_clock::now() < give_up)
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
        return ncclSuccess;
      });
    } catch (const unshard::rank_failure&) {
    }
  });
  while (!inside) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  double seconds = 0;
  std::thread rank1([&] {
    const auto t0 = std::chrono::steady_clock::now();
    w.abort(1, "rank 1 died");
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    abort_returned = true;
  });
  rank1.join();
  rank0.join();
  MESSAGE("rank 1's abort returned after ", seconds, " s while rank 0's call was in flight");
  CHECK(seconds < 1.0);
  CHECK(w.users_of(0) == 0);
  CHECK(w.users_of(1) == 0);
  CHECK_THROWS_WITH_AS(w.poll(0, "after"), "rank 1 failed: rank 1 died", unshard::rank_failure);
}

TEST_CASE("two communicators: all-gathers enqueued without the peer end with rank_failure once the peer aborts") {
  // The real shape of the hang: rank 0 enqueues collectives that rank 1 never joins until the
  // launch queue is full and an enqueue blocks; rank 1 then aborts. Rank 0 must get rank_failure
  // (revoke releases its kernels, so its blocked enqueue returns), not hang. A watchdog ends the
  // process if it does hang, so the test fails instead of running forever.
  cuda_world w(2);
  std::atomic<std::size_t> enqueued{0};
  std::string rank0_error;
  auto rank0 = std::async(std::launch::async, [&] {
    try {
      auto comm = cuda_backend::comm_stream(w, 0, nullptr);
      auto buf = unshard::cuda::device_buffer(w.device_of(0), 2 * 4096);
      for (std::size_t i = 0; i < 100000; ++i, ++enqueued) comm->all_gather(buf.data(), buf.data(), 4096, 0);
      comm->synchronize();
    } catch (const unshard::rank_failure& e) {
      rank0_error = e.what();
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // rank 0 is deep in its enqueues by now
  const std::size_t before_abort = enqueued.load();
  w.abort(1, "rank 1 died");
  if (rank0.wait_for(std::chrono::seconds(60)) != std::future_status::ready) {
    std::fprintf(stderr, "FAIL: rank 0 still blocked 60 s after rank 1's abort (%zu collectives enqueued)\n",
                 enqueued.load());
    std::_Exit(1);
  }
  rank0.get();
  MESSAGE("rank 0 had enqueued ", before_abort, " all-gathers when rank 1 aborted, ", enqueued.load(),
          " in all; it ended with: ", rank0_error);
  CHECK(rank0_error == "rank 1 failed: rank 1 died");
}
