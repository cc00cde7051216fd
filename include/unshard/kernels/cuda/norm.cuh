#pragma once
// Row normalisations on the device: LayerNorm fused with the adaLN modulation, LayerNorm with an
// affine weight and bias (Wan's norm3), and RMSNorm over the full row fused with Wan's 3-D rope.
//
// One block per row: the row's statistics are block-wide sums in double (the host reasons hold:
// a 5120-wide f32 sum drifts by ~1e-6), two passes as the host does (mean, then centred squares);
// every element then goes through the same UNSHARD_HD pieces as kernels/thread/norm.hpp and
// rope.hpp. Only the summation order of the statistics differs from the host (by ~1e-16
// relative). A row is read three times; at Wan's widths (<= 20 KiB) the rereads hit L1.
#include <cuda_runtime.h>

#include <cstddef>

#include "unshard/kernels/cuda/common.cuh"
#include "unshard/kernels/thread/norm.hpp"
#include "unshard/kernels/thread/rope.hpp"

namespace unshard::cuda {

inline constexpr unsigned row_threads = 256;  // a multiple of 32 (block_sum needs whole warps)

namespace detail {

template <class TX>
__device__ inline layer_norm_stats block_layer_norm_stats(const TX* x, std::size_t n, double eps, double* scratch) {
  double sum = 0.0;
  for (std::size_t i = threadIdx.x; i < n; i += blockDim.x) sum += to_f32(x[i]);
  const double mean = row_mean(block_sum(sum, scratch), n);
  double sq = 0.0;
  for (std::size_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double c = to_f32(x[i]) - mean;
    sq += c * c;
  }
  return layer_norm_stats_of(mean, block_sum(sq, scratch), n, eps);
}

// y = LN(x)(1 + scale) + shift, scale/shift one f32 row shared by every row (the modulation).
template <class TX, class TY>
__global__ void __launch_bounds__(row_threads)
    layer_norm_modulate_kernel(const TX* x, std::size_t rows, std::size_t n, double eps, const float* shift,
                               const float* scale, TY* y) {
  __shared__ double scratch[row_threads / warp_size];
  for (std::size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const TX* xr = x + r * n;
    const layer_norm_stats s = block_layer_norm_stats(xr, n, eps, scratch);
    TY* yr = y + r * n;
    for (std::size_t i = threadIdx.x; i < n; i += blockDim.x)
      yr[i] = from_f32<TY>(modulated(normalized(to_f32(xr[i]), s), shift[i], scale[i]));
  }
}

// y = LN(x) * weight + bias.
template <class TX, class TW, class TY>
__global__ void __launch_bounds__(row_threads)
    layer_norm_affine_kernel(const TX* x, std::size_t rows, std::size_t n, double eps, const TW* weight,
                             const TW* bias, TY* y) {
  __shared__ double scratch[row_threads / warp_size];
  for (std::size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const TX* xr = x + r * n;
    const layer_norm_stats s = block_layer_norm_stats(xr, n, eps, scratch);
    TY* yr = y + r * n;
    for (std::size_t i = threadIdx.x; i < n; i += blockDim.x)
      yr[i] = from_f32<TY>(affine(normalized(to_f32(xr[i]), s), to_f32(weight[i]), to_f32(bias[i])));
  }
}

// In place on x [rows, heads * head_dim]: optional RMSNorm over the full row (weight != nullptr),
// then optional rope (cos != nullptr) of every head by the row's angles cos/sin [rows, pairs].
// A thread handles whole (even, odd) pairs, so the rotation reads both normalised values.
template <class T, class TW>
__global__ void __launch_bounds__(row_threads)
    rms_norm_rope_kernel(T* x, std::size_t rows, std::size_t n, std::size_t head_dim, double eps, const TW* weight,
                         const float* cos, const float* sin) {
  __shared__ double scratch[row_threads / warp_size];
  const std::size_t pairs = head_dim / 2;
  for (std::size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    T* xr = x + r * n;
    double rstd = 0.0;
    if (weight) {
      double sq = 0.0;
      for (std::size_t i = threadIdx.x; i < n; i += blockDim.x) {
        const double v = to_f32(xr[i]);
        sq += v * v;
      }
      rstd = rms_rstd(block_sum(sq, scratch), n, eps);
    }
    for (std::size_t p = threadIdx.x; p < n / 2; p += blockDim.x) {
      float ab[2] = {to_f32(xr[2 * p]), to_f32(xr[2 * p + 1])};
      if (weight) {
        ab[0] = rms_normalized(ab[0], rstd, to_f32(weight[2 * p]));
        ab[1] = rms_normalized(ab[1], rstd, to_f32(weight[2 * p + 1]));
      }
      if (cos) {
        const std::size_t i = (2 * p % head_dim) / 2;  // pair index within the head
        rope_rotate_row(ab, cos + r * pairs + i, sin + r * pairs + i, 1);
      }
      xr[2 * p] = from_f32<T>(ab[0]);
      xr[2 * p + 1] = from_f32<T>(ab[1]);
    }
  }
}

// cos/sin [tokens, pairs] of the grid (gf, gh, gw), token t = (f*gh + h)*gw + w.
// A template: a header may define it in every TU (nvcc ignores `inline` on a __global__).
template <int = 0>
__global__ void rope_table_kernel(std::size_t tokens, std::size_t gh, std::size_t gw, std::size_t pairs,
                                         float* cos, float* sin) {
  for (std::size_t t = blockIdx.x * blockDim.x + threadIdx.x; t < tokens; t += gridDim.x * blockDim.x) {
    const std::size_t w = t % gw, h = (t / gw) % gh, f = t / (gw * gh);
    rope_table_row(f, h, w, pairs, cos + t * pairs, sin + t * pairs);
  }
}

}  // namespace detail

inline unsigned row_blocks(std::size_t rows) { return blocks_for(rows, 1, 1u << 20); }

// y[r] = LN(x[r]) (1 + scale) + shift for r < rows; y may equal x.
template <storage_type TX, storage_type TY>
void layer_norm_modulate(const TX* x, std::size_t rows, std::size_t n, double eps, const float* shift,
                         const float* scale, TY* y, cudaStream_t stream) {
  if (rows == 0 || n == 0) return;
  detail::layer_norm_modulate_kernel<<<row_blocks(rows), row_threads, 0, stream>>>(x, rows, n, eps, shift, scale, y);
  check_launch("layer_norm_modulate");
}

// y[r] = LN(x[r]) * weight + bias; y may equal x.
template <storage_type TX, storage_type TW, storage_type TY>
void layer_norm_affine(const TX* x, std::size_t rows, std::size_t n, double eps, const TW* weight, const TW* bias,
                       TY* y, cudaStream_t stream) {
  if (rows == 0 || n == 0) return;
  detail::layer_norm_affine_kernel<<<row_blocks(rows), row_threads, 0, stream>>>(x, rows, n, eps, weight, bias, y);
  check_launch("layer_norm_affine");
}

// In place on q or k [rows, n = heads*head_dim]: RMSNorm over the row with `weight` (nullptr: no
// norm, Wan without qk_norm), then rope with the per-row tables cos/sin [rows, head_dim/2]
// (nullptr: no rope, cross-attention).
template <storage_type T, storage_type TW>
void rms_norm_rope(T* x, std::size_t rows, std::size_t n, std::size_t head_dim, double eps, const TW* weight,
                   const float* cos, const float* sin, cudaStream_t stream) {
  if (rows == 0 || n == 0 || (!weight && !cos)) return;
  if (head_dim == 0 || head_dim % 2 != 0 || n % head_dim != 0)
    throw_error("rms_norm_rope: head_dim ", head_dim, " must be even and divide the row width ", n);
  detail::rms_norm_rope_kernel<<<row_blocks(rows), row_threads, 0, stream>>>(x, rows, n, head_dim, eps, weight, cos,
                                                                             sin);
  check_launch("rms_norm_rope");
}

// The rope tables of a (gf, gh, gw) token grid, as rope_table_row computes them on the host.
inline void rope_table(std::size_t gf, std::size_t gh, std::size_t gw, std::size_t pairs, float* cos, float* sin,
                       cudaStream_t stream) {
  const std::size_t tokens = gf * gh * gw;
  if (tokens == 0 || pairs == 0) return;
  detail::rope_table_kernel<><<<blocks_for(tokens, 128), 128, 0, stream>>>(tokens, gh, gw, pairs, cos, sin);
  check_launch("rope_table");
}

}  // namespace unshard::cuda
