#pragma once
#include <cuda_runtime_api.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

#include "unshard/backend/cuda/check.cuh"
#include "unshard/backend/cuda/device.cuh"
#include "unshard/core/device_arena.hpp"
#include "unshard/core/error.hpp"
#include "unshard/core/memory_category.hpp"

namespace unshard::cuda {

// A rank's device memory: one cudaMalloc region per rank, taken once before the first forward and
// handed to the rank's tracking allocator as an arena_backing. The allocator's first-fit arena is
// the memory pool: every byte the runtime uses is counted by category there, and a forward never
// calls cudaMalloc (which synchronises the device and cannot be captured in a CUDA graph).
// A cudaMallocAsync pool would add nothing: the arena already gives reuse without a system call.
inline arena_backing device_region(int device, std::size_t bytes) {
  const std::size_t n = align_up(bytes);
  if (n == 0) return {};
  device_guard on(device);
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw out_of_memory(::unshard::detail::concat("device ", device, ": cannot reserve ", n,
                                       " bytes of device memory for the rank's arena (", cudaGetErrorName(e), ": ",
                                       cudaGetErrorString(e), ")"));
  }
  // cudaFree finds the device from the pointer (unified addressing): the release needs no context.
  return {static_cast<std::byte*>(p), [](std::byte* q) { cudaFree(q); }};
}

// A rank's pinned host memory (offloaded shards): page-locked, so host-to-device copies run on
// the copy engines at full PCIe speed and asynchronously; portable, so any device's stream (every
// local rank's) may copy from it.
inline arena_backing pinned_host_region(int device, std::size_t bytes) {
  const std::size_t n = align_up(bytes);
  if (n == 0) return {};
  device_guard on(device);
  void* p = nullptr;
  const cudaError_t e = cudaHostAlloc(&p, n, cudaHostAllocPortable);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw out_of_memory(::unshard::detail::concat("device ", device, ": cannot pin ", n, " bytes of host memory (",
                                       cudaGetErrorName(e), ": ", cudaGetErrorString(e),
                                       "); check `ulimit -l` and the free host memory"));
  }
  return {static_cast<std::byte*>(p), [](std::byte* q) { cudaFreeHost(q); }};
}

// Owning buffers over the two regions, for code outside the runtime (tests, benchmarks, tools).
class region_buffer {
 public:
  region_buffer() = default;
  region_buffer(arena_backing b, std::size_t bytes) : backing_(b), bytes_(bytes) {}
  region_buffer(region_buffer&& o) noexcept { swap(o); }
  region_buffer& operator=(region_buffer&& o) noexcept {
    region_buffer tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  ~region_buffer() {
    if (backing_.base && backing_.release) backing_.release(backing_.base);
  }
  std::byte* data() const noexcept { return backing_.base; }
  std::size_t size() const noexcept { return bytes_; }
  template <class T>
  T* as() const noexcept {
    return reinterpret_cast<T*>(backing_.base);
  }

 private:
  void swap(region_buffer& o) noexcept {
    std::swap(backing_, o.backing_);
    std::swap(bytes_, o.bytes_);
  }
  arena_backing backing_{};
  std::size_t bytes_ = 0;
};

inline region_buffer device_buffer(int device, std::size_t bytes) { return {device_region(device, bytes), bytes}; }
inline region_buffer pinned_buffer(int device, std::size_t bytes) { return {pinned_host_region(device, bytes), bytes}; }

// Copies `bytes` of host memory (pageable: a checkpoint's shard, a std::vector) to `dst` in
// device memory of `device`, and returns once they are there, for every stream of the device.
//
// Why not cudaMemcpy: from pageable memory it returns as soon as the bytes are in the driver's
// staging buffer, before the DMA to the device has finished, and it is ordered only with the
// legacy default stream, which the backend's streams (cudaStreamNonBlocking) do not wait for. A
// kernel enqueued on them right after could read the destination before the copy lands. Here
// the bytes go through pinned staging buffers (two, so the host fills one while the copy engine
// empties the other) with cudaMemcpyAsync on a stream of our own, which is synchronised before
// returning: complete on the device, visible to any stream enqueued afterwards.
inline void upload_to_device(int device, std::byte* dst, const std::byte* src, std::size_t bytes,
                             std::size_t staging_bytes = std::size_t{32} << 20) {
  if (bytes == 0) return;
  device_guard on(device);
  const std::size_t piece = std::min(bytes, std::max<std::size_t>(staging_bytes, 4096));
  struct resources {
    cudaStream_t stream = nullptr;
    cudaEvent_t done[2] = {nullptr, nullptr};
    void* staging[2] = {nullptr, nullptr};
    ~resources() {
      if (stream) cudaStreamSynchronize(stream);  // on an error path too: no DMA from freed memory
      for (void* p : staging)
        if (p) cudaFreeHost(p);
      for (cudaEvent_t e : done)
        if (e) cudaEventDestroy(e);
      if (stream) cudaStreamDestroy(stream);
    }
  } r;
  UNSHARD_CUDA_CHECK(cudaStreamCreateWithFlags(&r.stream, cudaStreamNonBlocking));
  const int buffers = bytes > piece ? 2 : 1;
  for (int i = 0; i < buffers; ++i) {
    UNSHARD_CUDA_CHECK(cudaHostAlloc(&r.staging[i], piece, cudaHostAllocDefault));
    UNSHARD_CUDA_CHECK(cudaEventCreateWithFlags(&r.done[i], cudaEventDisableTiming));
  }
  std::size_t i = 0;
  for (std::size_t off = 0; off < bytes; off += piece, i ^= static_cast<std::size_t>(buffers - 1)) {
    const std::size_t n = std::min(piece, bytes - off);
    // The staging buffer is free again once its previous copy has run (the first use: at once).
    UNSHARD_CUDA_CHECK(cudaEventSynchronize(r.done[i]));
    std::memcpy(r.staging[i], src + off, n);
    UNSHARD_CUDA_CHECK(cudaMemcpyAsync(dst + off, r.staging[i], n, cudaMemcpyHostToDevice, r.stream));
    UNSHARD_CUDA_CHECK(cudaEventRecord(r.done[i], r.stream));
  }
  UNSHARD_CUDA_CHECK(cudaStreamSynchronize(r.stream));
}

// Page-locks an existing host range, typically part of an mmapped checkpoint, so the shards can be
// copied to the device straight from the page cache with no pinned staging copy. The range is
// widened to whole pages (registration works on pages; an mmapped file's mapping covers them).
// Read-only by default: a checkpoint is mapped PROT_READ, and registering it writable would fail.
class host_registration {
 public:
  host_registration() = default;
  host_registration(const std::byte* data, std::size_t bytes, bool read_only = true) {
    if (bytes == 0) return;
    const auto page = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
    const auto first = reinterpret_cast<std::uintptr_t>(data) / page * page;
    const auto last = (reinterpret_cast<std::uintptr_t>(data) + bytes + page - 1) / page * page;
    unsigned flags = cudaHostRegisterPortable;
    if (read_only) flags |= cudaHostRegisterReadOnly;
    base_ = reinterpret_cast<void*>(first);
    const cudaError_t e = cudaHostRegister(base_, last - first, flags);
    if (e != cudaSuccess) {
      cudaGetLastError();
      base_ = nullptr;
      throw_error("cannot page-lock the host range of ", bytes, " bytes at ", static_cast<const void*>(data), " (",
                  cudaGetErrorName(e), ": ", cudaGetErrorString(e), ")",
                  read_only ? "; read-only registration needs a device with cudaDevAttrHostRegisterReadOnlySupported"
                            : "");
    }
  }
  host_registration(host_registration&& o) noexcept : base_(std::exchange(o.base_, nullptr)) {}
  host_registration& operator=(host_registration&& o) noexcept {
    if (this != &o) {
      reset();
      base_ = std::exchange(o.base_, nullptr);
    }
    return *this;
  }
  ~host_registration() { reset(); }
  bool registered() const noexcept { return base_ != nullptr; }

 private:
  void reset() noexcept {
    if (base_) cudaHostUnregister(base_);
    base_ = nullptr;
  }
  void* base_ = nullptr;
};

}  // namespace unshard::cuda
