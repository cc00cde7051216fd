// The CUDA backend on the GPUs of this machine (one is enough): device memory under the tracking
// allocator, event ordering between streams, pinned and registered host memory, NCCL all-gather
// and gather_range in place, point-to-point transfer, and abort (never waiting for a call in
// flight); copy_to_device complete for the non-blocking streams, compute spans timed on the device,
// and the measured context + NCCL + cuBLASLt memory against the planned per-rank reserve. Each test
// says which path it took (NCCL world size). Without a device this executable exits 77 ("Skipped").
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "gpu_main.hpp"
#include "unshard/backend/cuda/cuda_backend.cuh"
#include "unshard/backend/cuda/reserve.hpp"
#include "unshard/core/tracking_allocator.hpp"
#include "unshard/kernels/cuda/gemm.cuh"

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
  // NCCL refuses two ranks of one communicator on one GPU ("Duplicate GPU detected"), so on one GPU
  // this is the single-rank path only; the multi-rank paths need two GPUs (test_multigpu_nccl too).
  MESSAGE("NCCL world size ", world,
          world == 1 ? ": single-rank all_gather/broadcast only (multi-rank paths: test_multigpu_nccl)" : "");
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
  MESSAGE("transfer on ", world, " GPU(s): ",
          world == 1 ? "from == to only (a device copy; ncclSend/ncclRecv need two GPUs)" : "ncclSend/ncclRecv pairs and local copies");
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

TEST_CASE("a compute span is timed on the device: it ends when the kernel has run, not when it was enqueued") {
  cuda_world w(1);
  unshard::trace_recorder trace;
  auto compute = cuda_backend::compute_stream(w, 0, &trace);
  auto out = unshard::cuda::device_buffer(w.device_of(0), 1024 * sizeof(std::uint32_t));
  REQUIRE(compute->tracing());
  const long long cycles = 200ll * 1000 * 1000;  // ~0.1 s at 2 GHz
  auto* span = compute->begin_span();
  busy_then_fill<<<1, 256, 0, compute->native()>>>(out.as<std::uint32_t>(), 1024, 1u, cycles);
  UNSHARD_CUDA_CHECK(cudaGetLastError());
  compute->end_span(span, unshard::trace_kind::compute, 5);
  const auto enqueued = unshard::trace_clock::now();  // the host is done long before the kernel
  compute->synchronize();
  const auto entries = trace.entries();
  REQUIRE(entries.size() == 1);
  const auto& e = entries.front();
  CHECK(e.kind == unshard::trace_kind::compute);
  CHECK(e.unit == 5);
  const double span_ms = std::chrono::duration<double, std::milli>(e.end - e.begin).count();
  const double after_enqueue_ms = std::chrono::duration<double, std::milli>(e.end - enqueued).count();
  MESSAGE("compute span ", span_ms, " ms, ending ", after_enqueue_ms, " ms after the host enqueued it");
  // Host times around the enqueue (the defect) give a span of microseconds ending before `enqueued`.
  CHECK(span_ms > 20.0);
  CHECK(after_enqueue_ms > 20.0);
  // Tracing off: no span, nothing enqueued.
  auto quiet = cuda_backend::compute_stream(w, 0, nullptr);
  CHECK(quiet->begin_span() == nullptr);
  quiet->end_span(nullptr, unshard::trace_kind::compute, 0);
}

TEST_CASE("abort does not wait for a call blocked in its enqueue") {
  // The defect: call() held a lock across the NCCL call and abort() took it exclusively, so a call
  // blocked in its enqueue (a launch into a stream full of kernels waiting on a dead peer) made the
  // abort that would release those kernels wait forever. Here the "enqueue" blocks until the abort
  // has returned (or 10 s): abort must return at once, and the call's communicator stays valid
  // until the call leaves it.
  cuda_world w(1);
  std::atomic<bool> inside{false}, abort_returned{false};
  bool comm_valid = false;
  std::thread caller([&] {
    try {
      w.call(0, "a blocked enqueue", [&](ncclComm_t c) {
        inside = true;
        const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        while (!abort_returned && std::chrono::steady_clock::now() < give_up)
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
        // The communicator is not freed under the call: this call still counts as its user, and
        // only the last user out frees it.
        comm_valid = c != nullptr && w.users_of(0) == 1;
        return ncclSuccess;
      });
    } catch (const unshard::rank_failure&) {
    }
  });
  while (!inside) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const auto t0 = std::chrono::steady_clock::now();
  w.abort(0, "a peer died");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  abort_returned = true;
  caller.join();
  MESSAGE("abort returned after ", seconds, " s with a call in flight");
  CHECK(seconds < 1.0);
  CHECK(comm_valid);
  CHECK(w.users_of(0) == 0);  // the call left; the last user freed the communicator
  CHECK_THROWS_WITH_AS(w.poll(0, "after the abort"), "rank 0 failed: a peer died", unshard::rank_failure);
}

TEST_CASE("the per-rank reserve covers the CUDA context, NCCL's lazy buffers and cuBLASLt's kernels") {
  // What a rank uses on its device besides what the ledger counts: the CUDA context (with the
  // modules loaded lazily on first launch), the NCCL communicator and the buffers NCCL connects at
  // its first collectives, cuBLASLt's handle and kernels. Measured as the device's used memory
  // (total - free, so anything else on the card counts against the reserve too) after the context
  // alone, then after everything else minus the test's own buffers.
  const int devices = unshard::cuda::device_count();
  std::vector<std::size_t> context_used(static_cast<std::size_t>(devices)), before(context_used.size());
  const auto used = [](int d) {
    unshard::cuda::device_guard on(d);
    std::size_t free = 0, total = 0;
    UNSHARD_CUDA_CHECK(cudaMemGetInfo(&free, &total));
    return total - free;
  };
  for (int d = 0; d < devices; ++d) {
    unshard::cuda::device_guard on(d);
    UNSHARD_CUDA_CHECK(cudaFree(nullptr));  // the context
    context_used[static_cast<std::size_t>(d)] = used(d);
  }
  constexpr std::size_t shard = 4 << 20;
  std::vector<unshard::cuda::region_buffer> buffers;
  for (int d = 0; d < devices; ++d) buffers.push_back(unshard::cuda::device_buffer(d, shard * devices + (64 << 20)));
  for (int d = 0; d < devices; ++d) before[static_cast<std::size_t>(d)] = used(d);
  {
    cuda_world w(static_cast<std::size_t>(devices));
    on_every_rank(w, [&](std::size_t rank) {
      auto comm = cuda_backend::comm_stream(w, rank, nullptr);
      auto compute = cuda_backend::compute_stream(w, rank, nullptr);
      std::byte* buf = buffers[rank].data();
      comm->all_gather(buf + rank * shard, buf, shard, 0);
      comm->gather_range(buf, shard / 2, shard * w.size() - 3, shard, 0);
      for (std::size_t from = 0; from < w.size(); ++from)
        for (std::size_t to = 0; to < w.size(); ++to) comm->transfer(from, to, buf, buf + shard, 4096, 0);
      comm->synchronize();
      // cuBLASLt: a bf16 and an f32 linear with the GELU epilogue (loads its kernels).
      std::byte* ws = buf + shard * w.size();
      unshard::cuda::blaslt blas;
      blas.set_workspace(ws, 32 << 20);
      auto* x = reinterpret_cast<unshard::bf16*>(ws + (32 << 20));
      auto* y = reinterpret_cast<float*>(ws + (48 << 20));
      blas.linear(x, 64, 256, x, static_cast<const float*>(nullptr), 256, y, unshard::cuda::activation::gelu_tanh,
                  compute->native());
      blas.linear(y, 64, 256, y, static_cast<const float*>(nullptr), 256, y + 256 * 256,
                  unshard::cuda::activation::gelu_tanh, compute->native());
      compute->synchronize();
    });
    for (int d = 0; d < devices; ++d) {
      const std::size_t i = static_cast<std::size_t>(d);
      const std::size_t now = used(d), lazy = now > before[i] ? now - before[i] : 0;
      const std::size_t per_rank = context_used[i] + lazy;
      MESSAGE("device ", d, ": context ", context_used[i] >> 20, " MiB, NCCL + cuBLASLt after first use ", lazy >> 20,
              " MiB, total ", per_rank >> 20, " MiB against the planned reserve of ",
              unshard::cuda::planned_reserve_bytes >> 20, " MiB (world size ", devices, ")");
      CHECK(per_rank <= unshard::cuda::planned_reserve_bytes);
    }
  }
}

TEST_CASE("copy_to_device: the bytes are on the device for the rank's non-blocking streams when it returns") {
  // The defect: a pageable cudaMemcpy returns once the bytes are in the driver's staging buffer,
  // before the DMA lands, and is ordered with the legacy default stream only. A reader enqueued at
  // once on a non-blocking stream (the rank's compute or communication stream) could then see the
  // old contents of the tail. Large pageable copies, read back at once through a non-blocking
  // stream, several times.
  cuda_world w(1);
  auto compute = cuda_backend::compute_stream(w, 0, nullptr);
  constexpr std::size_t bytes = (256u << 20) + 12345;  // not a multiple of the staging size
  std::vector<std::byte> host = pattern(bytes, 21);
  auto dst = unshard::cuda::device_buffer(w.device_of(0), bytes);
  auto seen = unshard::cuda::device_buffer(w.device_of(0), bytes);
  auto back = unshard::cuda::pinned_buffer(w.device_of(0), bytes);
  for (unsigned round = 0; round < 3; ++round) {
    for (std::size_t i = 0; i < bytes; i += 4096) host[i] = std::byte(static_cast<unsigned char>(round * 7 + i));
    host[bytes - 1] = std::byte(static_cast<unsigned char>(round + 1));
    UNSHARD_CUDA_CHECK(cudaMemset(dst.data(), 0xEE, bytes));
    settle();
    cuda_backend::copy_to_device(w, 0, dst.data(), host.data(), bytes);
    // At once, on the rank's non-blocking compute stream: a device copy, then back to the host.
    UNSHARD_CUDA_CHECK(cudaMemcpyAsync(seen.data(), dst.data(), bytes, cudaMemcpyDeviceToDevice, compute->native()));
    UNSHARD_CUDA_CHECK(cudaMemcpyAsync(back.data(), seen.data(), bytes, cudaMemcpyDeviceToHost, compute->native()));
    compute->synchronize();
    std::size_t first_wrong = bytes;
    for (std::size_t i = 0; i < bytes && first_wrong == bytes; ++i)
      if (back.data()[i] != host[i]) first_wrong = i;
    CHECK_MESSAGE(first_wrong == bytes, "round ", round, ": the compute stream saw stale bytes from offset ",
                  first_wrong, " of ", bytes);
  }
  MESSAGE("copy_to_device: ", bytes, " pageable bytes through pinned staging, read at once by a non-blocking stream");
}
