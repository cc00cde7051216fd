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

#if defined(__CUDACC__)
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
