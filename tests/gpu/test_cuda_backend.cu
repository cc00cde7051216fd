// The CUDA backend on the GPUs of this machine (one is enough): device memory under the tracking
// allocator, event ordering between streams, pinned and registered host memory, NCCL all-gather
// and gather_range in place, point-to-point transfer, and abort. Without a device this executable exits 77 ("Skipped").
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "gpu_main.hpp"
#include "unshard/backend/cuda/cuda_backend.cuh"
#include "unshard/core/tracking_allocator.hpp"

namespace {

using unshard::cuda_backend;
using unshard::cuda_event;
using unshard::cuda_stream;
using unshard::cuda_world;
using unshard::memory_category;

// Spins for about `cycles` clock cycles, then writes `value` into every element of out: a kernel
// that is still running when the host has long enqueued what follows it on other streams.
__global__ void busy_then_fill(std::uint32_t* out, std::size_t n, std::uint32_t value, long long cycles) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
  }
  __syncthreads();
  for (std::size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x)
    out[i] = value;
}

std::vector<std::byte> pattern(std::size_t bytes, unsigned seed) {
  std::vector<std::byte> v(bytes);
  for (std::size_t i = 0; i < bytes; ++i) v[i] = std::byte(static_cast<unsigned char>((i * 131 + seed * 17) >> 1));
  return v;
}

std::vector<std::byte> to_host(const std::byte* device, std::size_t bytes) {
  std::vector<std::byte> v(bytes);
  UNSHARD_CUDA_CHECK(cudaMemcpy(v.data(), device, bytes, cudaMemcpyDeviceToHost));
  return v;
}

// Set-up writes (cudaMemset, cudaMemcpy from pageable memory) go to the legacy default stream,
// which the backend's non-blocking streams do not wait for: finish them before enqueueing there.
void settle() { UNSHARD_CUDA_CHECK(cudaDeviceSynchronize()); }

cudaMemoryType memory_type(const void* p) {
  cudaPointerAttributes a{};
  UNSHARD_CUDA_CHECK(cudaPointerGetAttributes(&a, p));
  return a.type;
}

// Runs body(rank) on one thread per local rank, as the session does; rethrows the first failure.
template <class F>
void on_every_rank(cuda_world& w, F body) {
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(w.size());
  for (std::size_t r = 0; r < w.size(); ++r)
    threads.emplace_back([&, r] {
      try {
        body(r);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace

TEST_CASE("device memory: the rank's tracking allocator sits on a device region and counts its peak") {
  cuda_world w(1);
  constexpr std::size_t capacity = 1 << 20;
  unshard::tracking_allocator device("device", capacity, "rank 0 ", cuda_backend::device_backing(w, 0, capacity));
  {
    auto shards = device.allocate(1000, memory_category::shards);
    auto gathered = device.allocate(300000, memory_category::gathered);
    CHECK(memory_type(shards.data()) == cudaMemoryTypeDevice);
    CHECK(memory_type(gathered.data()) == cudaMemoryTypeDevice);
    UNSHARD_CUDA_CHECK(cudaMemset(gathered.data(), 0x5a, gathered.size()));
    const auto back = to_host(gathered.data(), gathered.size());
    CHECK(back.front() == std::byte{0x5a});
    CHECK(back.back() == std::byte{0x5a});
    {
      auto act = device.allocate(50000, memory_category::activations);
      CHECK(device.current_total() == unshard::align_up(1000) + unshard::align_up(300000) + unshard::align_up(50000));
    }
    auto more = device.allocate(10000, memory_category::activations);  // reuses the freed block: no peak rise
    CHECK(device.peak_total() == unshard::align_up(1000) + unshard::align_up(300000) + unshard::align_up(50000));
    CHECK(device.peak(memory_category::gathered) == unshard::align_up(300000));
    device.set_cap(device.current_total() + 4096);
    CHECK_THROWS_AS(device.allocate(8192, memory_category::workspace), unshard::out_of_memory);
  }
  CHECK(device.current_total() == 0);
}

TEST_CASE("events: a copy on the communication stream waits for a kernel on the compute stream") {
  cuda_world w(1);
  auto compute = cuda_backend::compute_stream(w, 0, nullptr);
  auto comm = cuda_backend::comm_stream(w, 0, nullptr);
  constexpr std::size_t n = 1 << 20;
  auto a = unshard::cuda::device_buffer(w.device_of(0), n * sizeof(std::uint32_t));
  auto b = unshard::cuda::device_buffer(w.device_of(0), n * sizeof(std::uint32_t));
  UNSHARD_CUDA_CHECK(cudaMemset(a.data(), 0, a.size()));
  UNSHARD_CUDA_CHECK(cudaMemset(b.data(), 0, b.size()));
  settle();

  cuda_event written;
  const long long cycles = 200ll * 1000 * 1000;  // ~0.1 s at 2 GHz: far longer than the enqueue below
  busy_then_fill<<<64, 256, 0, compute->native()>>>(a.as<std::uint32_t>(), n, 0xC0FFEEu, cycles);
  UNSHARD_CUDA_CHECK(cudaGetLastError());
  compute->record(written);
  comm->wait(written);
  comm->copy(b.data(), a.data(), a.size());  // device to device, on the copy lane
  cuda_event copied;
  comm->record(copied);
  CHECK_FALSE(copied.query());  // nothing synchronised the host: the kernel is still spinning
  comm->synchronize();
  CHECK(copied.query());
  std::vector<std::uint32_t> got(n);
  UNSHARD_CUDA_CHECK(cudaMemcpy(got.data(), b.data(), b.size(), cudaMemcpyDeviceToHost));
  std::size_t wrong = 0;
  for (auto v : got) wrong += v != 0xC0FFEEu;
  CHECK(wrong == 0);

  // The backend's events carry no timing (cudaEventDisableTiming), the cheap kind.
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, written.native(), copied.native()) == cudaErrorInvalidResourceHandle);
  cudaGetLastError();
}

TEST_CASE("offload: shards in pinned host memory reach the device through the copy lane, in order") {
  cuda_world w(1);
  auto compute = cuda_backend::compute_stream(w, 0, nullptr);
  auto comm = cuda_backend::comm_stream(w, 0, nullptr);
  constexpr std::size_t bytes = 3 << 20;
  unshard::tracking_allocator host("host", 2 * bytes, "rank 0 ", cuda_backend::host_backing(w, 0, 2 * bytes));
  unshard::tracking_allocator device("device", 2 * bytes, "rank 0 ", cuda_backend::device_backing(w, 0, 2 * bytes));
  auto shard = host.allocate(bytes, memory_category::shards);
  auto slot = device.allocate(bytes, memory_category::gathered);
  CHECK(memory_type(shard.data()) == cudaMemoryTypeHost);
  CHECK(host.peak(memory_category::shards) == unshard::align_up(bytes));

  const auto first = pattern(bytes, 1), second = pattern(bytes, 2);
  std::memcpy(shard.data(), first.data(), bytes);
  cuda_event landed, consumed;
  comm->copy(slot.data(), shard.data(), bytes, 7);
  comm->record(landed);
  compute->wait(landed);
  auto readback = unshard::cuda::pinned_buffer(w.device_of(0), bytes);
  UNSHARD_CUDA_CHECK(cudaMemcpyAsync(readback.data(), slot.data(), bytes, cudaMemcpyDeviceToHost, compute->native()));
  compute->record(consumed);
  // The slot is refilled only after the compute stream has read it: the runtime's ring-slot rule.
  compute->synchronize();
  CHECK(std::memcmp(readback.data(), first.data(), bytes) == 0);
  std::memcpy(shard.data(), second.data(), bytes);
  comm->wait(consumed);
  comm->copy(slot.data(), shard.data(), bytes, 8);
  comm->synchronize();
  CHECK(to_host(slot.data(), bytes) == second);
}

TEST_CASE("an mmapped checkpoint range, page-locked in place, is copied to the device") {
  namespace fs = std::filesystem;
  const fs::path file = fs::temp_directory_path() / ("unshard_gpu_ckpt_" + std::to_string(::getpid()));
  constexpr std::size_t bytes = 1 << 20, offset = 12345, length = 500000;
  const auto data = pattern(bytes, 9);
  std::ofstream(file, std::ios::binary).write(reinterpret_cast<const char*>(data.data()), bytes);
  const int fd = ::open(file.c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  cuda_world w(1);
  int read_only_ok = 0;
  UNSHARD_CUDA_CHECK(cudaDeviceGetAttribute(&read_only_ok, cudaDevAttrHostRegisterReadOnlySupported, w.device_of(0)));
  const int prot = read_only_ok ? PROT_READ : PROT_READ | PROT_WRITE;
  void* map = ::mmap(nullptr, bytes, prot, MAP_PRIVATE, fd, 0);
  REQUIRE(map != MAP_FAILED);
  {
    const auto* base = static_cast<const std::byte*>(map);
    unshard::cuda::host_registration pinned(base + offset, length, read_only_ok != 0);
    CHECK(pinned.registered());
    auto dst = unshard::cuda::device_buffer(w.device_of(0), length);
    auto comm = cuda_backend::comm_stream(w, 0, nullptr);
    comm->copy(dst.data(), base + offset, length);
    comm->synchronize();
    const auto got = to_host(dst.data(), length);
    CHECK(std::equal(got.begin(), got.end(), data.begin() + offset));
  }
  ::munmap(map, bytes);
  ::close(fd);
  fs::remove(file);
}

TEST_CASE("NCCL: in-place all_gather, and gather_range after a local_copy, on every local GPU") {
  cuda_world w(static_cast<std::size_t>(unshard::cuda::device_count()));
  const std::size_t world = w.size();
  constexpr std::size_t shard = 1000;  // not a multiple of anything: byte-exact placement
  const auto flat = pattern(shard * world, 3);
  on_every_rank(w, [&](std::size_t rank) {
    auto comm = cuda_backend::comm_stream(w, rank, nullptr);
    auto buf = unshard::cuda::device_buffer(w.device_of(rank), shard * world);
    // all_gather, in place: this rank's shard already sits at its offset of the flat buffer.
    UNSHARD_CUDA_CHECK(cudaMemset(buf.data(), 0xEE, buf.size()));
    UNSHARD_CUDA_CHECK(cudaMemcpy(buf.data() + rank * shard, flat.data() + rank * shard, shard, cudaMemcpyHostToDevice));
    settle();
    comm->all_gather(buf.data() + rank * shard, buf.data(), shard, 0);
    comm->synchronize();
    if (to_host(buf.data(), buf.size()) != flat) throw unshard::error("rank " + std::to_string(rank) + ": all_gather");

    // gather_range: ranges inside one owner, across owners, and the whole buffer.
    auto own = unshard::cuda::device_buffer(w.device_of(rank), shard);
    UNSHARD_CUDA_CHECK(cudaMemcpy(own.data(), flat.data() + rank * shard, shard, cudaMemcpyHostToDevice));
    const std::size_t n = shard * world;
    const std::pair<std::size_t, std::size_t> ranges[] = {{0, n}, {shard / 3, shard / 2}, {shard - 7, n - shard + 7},
                                                          {n - 1, n}, {5, n - 5}};
    for (auto [begin, end] : ranges) {
      if (end <= begin) continue;
      UNSHARD_CUDA_CHECK(cudaMemset(buf.data(), 0xEE, buf.size()));
      settle();
      // The own part goes in place from the rank's device shard, on the stream (local_copy), as
      // the chunked policy does it.
      const std::size_t lo = std::max(begin, rank * shard), hi = std::min(end, (rank + 1) * shard);
      if (lo < hi) comm->local_copy(buf.data() + (lo - begin), own.data() + (lo - rank * shard), hi - lo, 1);
      comm->gather_range(buf.data(), begin, end, shard, 1);
      comm->synchronize();
      const auto got = to_host(buf.data(), end - begin);
      if (!std::equal(got.begin(), got.end(), flat.begin() + static_cast<std::ptrdiff_t>(begin)))
        throw unshard::error("rank " + std::to_string(rank) + ": gather_range [" + std::to_string(begin) + ", " +
                             std::to_string(end) + ")");
    }
  });
}

TEST_CASE("transfer: every (from, to) pair of local GPUs (ncclSend/ncclRecv), from == to a device copy") {
  cuda_world w(static_cast<std::size_t>(unshard::cuda::device_count()));
  const std::size_t world = w.size();
  for (std::size_t bytes : {std::size_t{1}, std::size_t{1} << 20}) {
    on_every_rank(w, [&](std::size_t rank) {
      auto comm = cuda_backend::comm_stream(w, rank, nullptr);
      const auto mine = pattern(bytes, static_cast<unsigned>(rank) + 11);
      auto src = unshard::cuda::device_buffer(w.device_of(rank), bytes);
      auto dst = unshard::cuda::device_buffer(w.device_of(rank), bytes);
      UNSHARD_CUDA_CHECK(cudaMemcpy(src.data(), mine.data(), bytes, cudaMemcpyHostToDevice));
      for (std::size_t from = 0; from < world; ++from)
        for (std::size_t to = 0; to < world; ++to) {
          UNSHARD_CUDA_CHECK(cudaMemset(dst.data(), 0xEE, bytes));
          settle();
          comm->transfer(from, to, src.data(), dst.data(), bytes, 0);
          comm->synchronize();
          const auto got = to_host(dst.data(), bytes);
          const auto want = rank == to ? pattern(bytes, static_cast<unsigned>(from) + 11)
                                       : std::vector<std::byte>(bytes, std::byte{0xEE});
          if (got != want || to_host(src.data(), bytes) != mine)
            throw unshard::error("rank " + std::to_string(rank) + ": transfer " + std::to_string(from) + " -> " +
                                 std::to_string(to) + " of " + std::to_string(bytes) + " bytes");
        }
    });
  }
}

TEST_CASE("tracing stamps each gather when the GPU runs it") {
  cuda_world w(1);
  unshard::trace_recorder trace;
  auto comm = cuda_backend::comm_stream(w, 0, &trace);
  auto buf = unshard::cuda::device_buffer(w.device_of(0), 4096);
  auto host = unshard::cuda::pinned_buffer(w.device_of(0), 4096);
  comm->copy(buf.data(), host.data(), 4096, 3);
  comm->all_gather(buf.data(), buf.data(), 4096, 4);
  comm->synchronize();
  const auto entries = trace.entries();
  REQUIRE(entries.size() == 2);
  std::size_t copies = 0, gathers = 0;
  for (const auto& e : entries) {
    CHECK(e.begin <= e.end);
    if (e.kind == unshard::trace_kind::host_to_device) copies += e.unit == 3 && e.bytes == 4096;
    if (e.kind == unshard::trace_kind::gather) gathers += e.unit == 4 && e.bytes == 4096;
  }
  CHECK(copies == 1);
  CHECK(gathers == 1);
}

TEST_CASE("abort: every later operation fails with rank_failure naming the failed rank") {
  cuda_world w(1);
  auto comm = cuda_backend::comm_stream(w, 0, nullptr);
  auto buf = unshard::cuda::device_buffer(w.device_of(0), 256);
  w.abort(0, "injected failure");
  CHECK(w.aborted());
  try {
    comm->all_gather(buf.data(), buf.data(), 256, 0);
    FAIL("all_gather after abort did not throw");
  } catch (const unshard::rank_failure& e) {
    CHECK(e.failed_rank() == 0);
    CHECK(std::string(e.what()) == "rank 0 failed: injected failure");
  }
  CHECK_THROWS_AS(comm->synchronize(), unshard::rank_failure);
  w.abort(0, "a second failure");  // the first one stays the reported one
  CHECK_THROWS_WITH(comm->synchronize(), "rank 0 failed: injected failure");
}
