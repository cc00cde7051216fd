#pragma once
// The CUDA + NCCL backend: ranks are GPUs (one process for all local GPUs, or one process per GPU
// under a launcher), shards and gathered units live in each rank's device memory, gathers are NCCL
// collectives on a communication stream, offloaded shards live in pinned host memory.
// Headers of this folder are .cuh; see check.cuh for why.
#include <cstddef>
#include <memory>

#include "unshard/backend/backend.hpp"
#include "unshard/backend/cuda/bootstrap.hpp"
#include "unshard/backend/cuda/check.cuh"
#include "unshard/backend/cuda/cuda_stream.cuh"
#include "unshard/backend/cuda/device.cuh"
#include "unshard/backend/cuda/memory.cuh"
#include "unshard/backend/cuda/nccl_world.cuh"
#include "unshard/core/device_arena.hpp"
#include "unshard/core/trace.hpp"

namespace unshard {

struct cuda_backend {
  using world = cuda_world;
  using stream = cuda_stream;
  using event = cuda_event;
  static constexpr const char* name = "cuda";
  // Shards, gathered units and the model state live in cudaMalloc memory: only kernels read them.
  using memory = memory_spaces<cuda_device_memory>;

  static std::unique_ptr<stream> compute_stream(world& w, std::size_t rank, trace_recorder* t) {
    return std::make_unique<stream>(w, rank, stream_role::compute, t);
  }
  static std::unique_ptr<stream> comm_stream(world& w, std::size_t rank, trace_recorder* t) {
    return std::make_unique<stream>(w, rank, stream_role::communication, t);
  }
  // Host-to-device uploads outside the gather path (inputs, weights at load time).
  static std::unique_ptr<stream> copy_stream(world& w, std::size_t rank, trace_recorder* t) {
    return std::make_unique<stream>(w, rank, stream_role::copy, t);
  }

  // The rank's device memory, one region under its tracking allocator (memory.cuh). The calling
  // thread is the rank's: it is put on the rank's device here, the first backend call it makes.
  static arena_backing device_backing(world& w, std::size_t rank, std::size_t bytes) {
    w.make_current(rank);
    return cuda::device_region(w.device_of(rank), bytes);
  }
  // Another thread working for the rank (a lane's helper thread) uses the rank's device.
  static void bind_thread(world& w, std::size_t rank) { w.make_current(rank); }
  // The rank's offload memory: pinned, so shard copies to the device are asynchronous.
  static arena_backing host_backing(world& w, std::size_t rank, std::size_t bytes) {
    return cuda::pinned_host_region(w.device_of(rank), bytes);
  }

  // Load time only, never in a forward: copies host bytes (a shard read from the checkpoint) into
  // the rank's memory and waits. Device memory cannot be written by the host directly, so the
  // runtime loads a shard into a host staging buffer and copies it over with this (rank_runtime::load_into).
  // When it returns the bytes are on the device, for every stream (cuda::upload_to_device: a
  // pageable cudaMemcpy would return before its DMA lands, and kernels on the rank's non-blocking
  // streams could read the buffer first).
  static void copy_to_device(world& w, std::size_t rank, std::byte* dst, const std::byte* src, std::size_t bytes) {
    if (bytes == 0) return;
    cuda::upload_to_device(w.device_of(rank), dst, src, bytes);
  }
};
static_assert(backend<cuda_backend>);
static_assert(has_device_backing<cuda_backend> && has_host_backing<cuda_backend> && has_copy_to_device<cuda_backend> &&
              has_local_copy<cuda_backend> && has_local_world<cuda_backend> && has_device_spans<cuda_backend>);

}  // namespace unshard
