#pragma once
// What every CUDA kernel of unshard shares: a launch check that names the kernel, storage
// conversions (bf16 or f32 in memory, f32 in registers), launch geometry and a block-wide sum.
//
// Kernels never synchronise: each wrapper enqueues on the stream it is given and checks only the
// launch (cudaGetLastError), so a forward can be captured in a CUDA graph.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "unshard/backend/cuda/check.cuh"
#include "unshard/core/dtype.hpp"
#include "unshard/core/error.hpp"
#include "unshard/kernels/thread/storage.hpp"

#if defined(UNSHARD_SIMT_EMULATION)
#include "unshard/kernels/cuda/simt_emulator.cuh"
#endif

// Every kernel of unshard is launched as UNSHARD_LAUNCH(grid, block, stream, kernel)(args...),
// never with <<<>>> written out: nvcc gets exactly `kernel<<<grid, block, 0, stream>>>(args...)`,
// and a host compiler building for the SIMT emulator (simt_emulator.cuh) gets a call that runs
// every thread of the grid on the CPU. The kernel comes last so template arguments may hold commas.
#if defined(UNSHARD_SIMT_EMULATION)
#define UNSHARD_LAUNCH(grid, block, stream, ...) \
  ::unshard::simt::launch((grid), (block), (stream), [&](auto&&... unshard_args) { __VA_ARGS__(unshard_args...); })
#else
#define UNSHARD_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#endif

namespace unshard::cuda {

// After a kernel launch: a configuration error (too many threads, too much shared memory)
// surfaces here, naming the kernel, not at the next synchronisation. Other calls use
// UNSHARD_CUDA_CHECK (backend/cuda/check.cuh).
inline void check_launch(const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw_error("CUDA kernel launch `", kernel, "` failed: ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}

// f32 -> storage type T, rounding to nearest even for bf16 (the conversion of core/dtype.hpp).
template <class T>
UNSHARD_HD T from_f32(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return T::from_float(v);
  }
}

// The storage types a kernel may be instantiated for: everything to_f32 widens.
template <class T>
concept storage_type = std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, f16>;

inline constexpr unsigned warp_size = 32;

// Blocks for n independent items of `per_block` each, capped so the grid stays launchable; the
// kernels loop (grid-stride) over whatever the cap leaves.
inline unsigned blocks_for(std::size_t n, unsigned per_block, unsigned cap = 65535u * 8u) {
  const std::size_t b = (n + per_block - 1) / per_block;
  return static_cast<unsigned>(b == 0 ? 1 : (b > cap ? cap : b));
}

// 16-byte vectors of a storage type: 8 bf16/f16 or 4 f32 per load. The row kernels use them when
// a row's width is a multiple of vec_elems<T> and the pointers are 16-byte aligned.
template <class T>
inline constexpr unsigned vec_elems = 16 / sizeof(T);

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// The accumulation type of row statistics: double for f32 storage (the host's, so the f32 path
// stays within the references' 1e-5), f32 for bf16/f16 activations (as torch's bf16 LayerNorm).
template <class T>
using stat_t = std::conditional_t<std::is_same_v<T, float>, double, float>;

#if defined(__CUDACC__) || defined(UNSHARD_SIMT_EMULATION)
// Loads vec_elems<T> elements at p (16-byte aligned) widened to f32.
template <class T>
__device__ inline void load_vec(const T* p, float* f) {
  constexpr unsigned n = vec_elems<T>;
  alignas(16) T e[n];
  *reinterpret_cast<uint4*>(e) = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (unsigned i = 0; i < n; ++i) f[i] = to_f32(e[i]);
}

// Stores vec_elems<T> f32 values at p (16-byte aligned), rounded to T.
template <class T>
__device__ inline void store_vec(T* p, const float* f) {
  constexpr unsigned n = vec_elems<T>;
  alignas(16) T e[n];
#pragma unroll
  for (unsigned i = 0; i < n; ++i) e[i] = from_f32<T>(f[i]);
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(e);
}

// Sum of v over the block (every thread gets the result). `scratch` holds blockDim.x / 32
// values; the call ends with the scratch free for reuse.
template <class T>
__device__ inline T block_sum(T v, T* scratch) {
  for (int o = warp_size / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  const unsigned warp = threadIdx.x / warp_size, lane = threadIdx.x % warp_size;
  const unsigned warps = (blockDim.x + warp_size - 1) / warp_size;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = T(0);
  for (unsigned w = 0; w < warps; ++w) total += scratch[w];  // same order in every thread
  __syncthreads();
  return total;
}
#endif

}  // namespace unshard::cuda
