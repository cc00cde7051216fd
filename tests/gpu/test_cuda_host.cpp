// The CUDA backend's host-only parts, which run without a device: error messages of the checked
// calls, and the NCCL unique-id exchange over backend/net's TCP rendezvous and shared file
// between "ranks" (threads).
#include <doctest/doctest.h>

#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "unshard/backend/cuda/bootstrap.hpp"
#include "unshard/backend/cuda/check.cuh"

namespace {

std::string message_of(auto&& f) {
  try {
    f();
  } catch (const unshard::error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// A 128-byte blob (an ncclUniqueId's size) that differs from rank 0's on every other rank.
std::vector<std::vector<std::byte>> blobs_for(std::size_t ranks) {
  std::vector<std::vector<std::byte>> blobs(ranks, std::vector<std::byte>(128, std::byte{0xEE}));
  for (std::size_t i = 0; i < 128; ++i) blobs[0][i] = std::byte(static_cast<unsigned char>(i * 7 + 3));
  return blobs;
}

// Runs exchange(rank)(blob of rank) on one thread per rank; returns each rank's error text.
template <class MakeExchange>
std::vector<std::string> exchange_on_threads(std::vector<std::vector<std::byte>>& blobs, MakeExchange make) {
  std::vector<std::thread> threads;
  std::vector<std::string> errors(blobs.size());
  for (std::size_t r = blobs.size(); r-- > 0;)  // non-roots first: they must wait for rank 0
    threads.emplace_back([&, r] { errors[r] = message_of([&] { make(r)(std::span<std::byte>(blobs[r])); }); });
  for (auto& t : threads) t.join();
  return errors;
}

}  // namespace

TEST_CASE("a failed CUDA, NCCL or cuBLAS call names the call, the file, the line and the error") {
  const int line = __LINE__ + 1;
  const std::string cuda = message_of([] { UNSHARD_CUDA_CHECK(cudaErrorInvalidValue); });
  CHECK(contains(cuda, "CUDA call `cudaErrorInvalidValue` failed at "));
  CHECK(contains(cuda, std::string("test_cuda_host.cpp:") + std::to_string(line)));
  CHECK(contains(cuda, "cudaErrorInvalidValue"));

  const std::string nccl = message_of([] { UNSHARD_CUDA_CHECK(ncclInvalidArgument); });
  CHECK(contains(nccl, "NCCL call `ncclInvalidArgument`"));
  CHECK(contains(nccl, "ncclInvalidArgument ("));

  const std::string cublas = message_of([] { UNSHARD_CUDA_CHECK(CUBLAS_STATUS_NOT_SUPPORTED); });
  CHECK(contains(cublas, "cuBLAS call"));
  CHECK(contains(cublas, "CUBLAS_STATUS_NOT_SUPPORTED"));

  // Success, and NCCL's "in progress" of a non-blocking communicator, are not errors.
  CHECK(message_of([] { UNSHARD_CUDA_CHECK(cudaSuccess); }).empty());
  CHECK(message_of([] { UNSHARD_CUDA_CHECK(ncclInProgress); }).empty());
  CHECK(message_of([] { UNSHARD_CUDA_CHECK(CUBLAS_STATUS_SUCCESS); }).empty());
}

TEST_CASE("unique-id exchange over the TCP rendezvous: rank 0's id reaches every rank") {
  namespace net = unshard::net;
  constexpr std::size_t ranks = 4;
  net::socket listener = net::listen_on("127.0.0.1", 0);
  const std::uint16_t port = listener.local_endpoint().port;
  std::optional<net::socket> rank0_listener(std::move(listener));
  auto blobs = blobs_for(ranks);
  std::vector<std::unique_ptr<net::rendezvous>> rvs(ranks);
  const auto errors = exchange_on_threads(blobs, [&](std::size_t r) {
    return [&, r](std::span<std::byte> blob) {
      const net::launch_env env{r, ranks, r, ranks, "127.0.0.1", port, "test"};
      std::optional<net::socket> l;
      if (r == 0) l = std::move(rank0_listener);
      rvs[r] = std::make_unique<net::rendezvous>(env, net::rendezvous_options{std::chrono::seconds(30)}, std::move(l));
      unshard::cuda::exchange_over(*rvs[r])(blob);
    };
  });
  for (std::size_t r = 0; r < ranks; ++r) {
    CHECK(errors[r].empty());
    CHECK(blobs[r] == blobs[0]);
  }
}

TEST_CASE("unique-id exchange through a shared file: every rank gets rank 0's id; no root is an error") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("unshard_uid_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string path = (dir / "nccl_id").string();
  auto blobs = blobs_for(3);
  const auto errors = exchange_on_threads(
      blobs, [&](std::size_t r) { return unshard::cuda::exchange_through_file(path, r, "job-42"); });
  for (std::size_t r = 0; r < 3; ++r) {
    CHECK(errors[r].empty());
    CHECK(blobs[r] == blobs[0]);
  }
  // A later job with another tag does not read this job's file: it times out instead.
  std::vector<std::byte> lonely(128);
  const std::string stale = message_of(
      [&] { unshard::cuda::exchange_through_file(path, 2, "job-43", std::chrono::milliseconds(100))(lonely); });
  CHECK(contains(stale, "nccl_id"));
  fs::remove_all(dir);
}

TEST_CASE("device selection of a launched rank: LOCAL_RANK when it sees all GPUs, 0 when it sees one, else an error") {
  using unshard::cuda::device_for_local_rank;
  // Every process sees the node's 4 GPUs (torchrun's default): rank r on GPU r.
  for (std::size_t r = 0; r < 4; ++r) CHECK(device_for_local_rank(r, 4, 4) == static_cast<int>(r));
  CHECK(device_for_local_rank(2, 0, 4) == 2);  // the launcher did not say how many processes per node
  CHECK(device_for_local_rank(1, 2, 8) == 1);  // fewer processes than GPUs
  // The launcher gave each process one GPU (CUDA_VISIBLE_DEVICES per rank): always device 0,
  // the defect was to pick device LOCAL_RANK there, which does not exist for LOCAL_RANK > 0.
  for (std::size_t r = 0; r < 5; ++r) CHECK(device_for_local_rank(r, 5, 1) == 0);
  // LOCAL_RANK beyond the visible GPUs: an error naming both (a modulo would put two ranks on one
  // GPU, which NCCL refuses later with a less helpful message).
  const std::string beyond = message_of([] { device_for_local_rank(5, 0, 4); });
  CHECK(contains(beyond, "LOCAL_RANK=5 but this process sees only 4 CUDA devices"));
  CHECK(contains(beyond, "CUDA_VISIBLE_DEVICES"));
  const std::string crowded = message_of([] { device_for_local_rank(1, 8, 4); });
  CHECK(contains(crowded, "LOCAL_WORLD_SIZE=8 processes on this node, but each sees 4 CUDA devices"));
  CHECK(contains(message_of([] { device_for_local_rank(0, 1, 0); }), "sees no CUDA device"));
  // From the launch environment.
  unshard::net::launch_env env;
  env.rank = 6;
  env.world_size = 8;
  env.local_rank = 2;
  env.local_world_size = 4;
  CHECK(unshard::cuda::device_for(env, 4) == 2);
  CHECK(unshard::cuda::device_for(env, 1) == 0);
}
