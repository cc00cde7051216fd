#pragma once
// Elementwise kernels of the Wan block on the device: bias + GELU-tanh (when the GEMM epilogue
// does not apply it), SiLU, the gated residual add, the modulation sum, storage conversion, and
// the patch / sinusoid kernels of the embeddings and the head. Each element goes through the same
// UNSHARD_HD function the host path uses (kernels/thread/*.hpp).
//
// All kernels are grid-stride loops over flat indices, vectorised by nothing but coalescing:
// they are memory bound, and bench_kernels reports their bandwidth against the card's.
#include <cuda_runtime.h>

#include <cstddef>

#include "unshard/kernels/cuda/common.cuh"
#include "unshard/kernels/thread/activation.hpp"
#include "unshard/kernels/thread/embedding.hpp"
#include "unshard/kernels/thread/patch.hpp"
#include "unshard/kernels/thread/residual.hpp"

namespace unshard::cuda {

inline constexpr unsigned elementwise_threads = 256;

namespace detail {

#define UNSHARD_GRID_STRIDE(i, n) \
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)

// y[r*ld + c] = act(y[r*ld + c] + bias[c]) for r < rows, c < cols (bias may be null; act is
// GELU-tanh or identity): a GEMM's output columns, in place.
template <class T, class TB>
__global__ void bias_activation_kernel(T* y, std::size_t total, std::size_t cols, std::size_t ld, const TB* bias,
                                       bool gelu) {
  UNSHARD_GRID_STRIDE(i, total) {
    const std::size_t r = i / cols, c = i % cols;
    T& out = y[r * ld + c];
    const float v = to_f32(out) + (bias ? to_f32(bias[c]) : 0.0f);
    out = from_f32<T>(gelu ? gelu_tanh(v) : v);
  }
}

template <class TX, class TY>
__global__ void silu_kernel(const TX* x, std::size_t n, TY* y) {
  UNSHARD_GRID_STRIDE(i, n) y[i] = from_f32<TY>(unshard::silu(to_f32(x[i])));
}

// x[r, c] += y[r, c] * gate[c] (gate null: x += y), through gated_residual_row / residual_row on
// one element, so the rounding is the host's: the product rounds before the add.
template <class TX, class TY>
__global__ void residual_kernel(TX* x, const TY* y, const float* gate, std::size_t total, std::size_t cols) {
  UNSHARD_GRID_STRIDE(i, total) {
    float xv = to_f32(x[i]);
    const float yv = to_f32(y[i]);
    if (gate) {
      gated_residual_row(&xv, &yv, gate + i % cols, 1);
    } else {
      residual_row(&xv, &yv, 1);
    }
    x[i] = from_f32<TX>(xv);
  }
}

// out[i] = a[i] + b[i % b_period]: the modulation (a block's parameter + e0, or head + e).
template <class TA>
__global__ void add_broadcast_kernel(const TA* a, const float* b, std::size_t n, std::size_t b_period, float* out) {
  UNSHARD_GRID_STRIDE(i, n) out[i] = to_f32(a[i]) + b[i % b_period];
}

template <class TS, class TD>
__global__ void convert_kernel(const TS* src, std::size_t n, TD* dst) {
  UNSHARD_GRID_STRIDE(i, n) dst[i] = from_f32<TD>(to_f32(src[i]));
}

// One thread per token: the patch vector of token s (patchify_token on the host's arguments).
// A template: a header may define it in every TU (nvcc ignores `inline` on a __global__).
template <int = 0>
__global__ void patchify_kernel(const float* x, std::size_t c, std::size_t frames, std::size_t height,
                                       std::size_t width, patch_grid g, std::size_t patch_len, float* patches) {
  const std::size_t tokens = g.gf * g.gh * g.gw;
  UNSHARD_GRID_STRIDE(s, tokens) patchify_token(x, c, frames, height, width, g, s, patches + s * patch_len);
}

// A template: a header may define it in every TU (nvcc ignores `inline` on a __global__).
template <int = 0>
__global__ void unpatchify_kernel(const float* vecs, std::size_t c, patch_grid g, std::size_t patch_len,
                                         float* out) {
  const std::size_t tokens = g.gf * g.gh * g.gw;
  UNSHARD_GRID_STRIDE(s, tokens) unpatchify_token(vecs + s * patch_len, c, g, s, out);
}

// The timestep is read on the device (no host round trip: the forward stays capturable).
// A template: a header may define it in every TU (nvcc ignores `inline` on a __global__).
template <int = 0>
__global__ void time_sinusoid_kernel(const float* t, std::size_t dim, float* out) {
  UNSHARD_GRID_STRIDE(i, dim) out[i] = unshard::time_sinusoid(static_cast<double>(*t), i, dim);
}

#undef UNSHARD_GRID_STRIDE

}  // namespace detail

inline unsigned elementwise_blocks(std::size_t n) { return blocks_for(n, elementwise_threads); }

// y[r*ld + c] = act(y[r*ld + c] + bias[c]) for the columns c < cols of rows r < rows, in place
// (act = GELU-tanh if gelu, else identity; bias [cols] or nullptr).
template <storage_type T, storage_type TB>
void bias_activation(T* y, std::size_t rows, std::size_t cols, std::size_t ld, const TB* bias, bool gelu,
                     cudaStream_t stream) {
  const std::size_t n = rows * cols;
  if (n == 0) return;
  detail::bias_activation_kernel<<<elementwise_blocks(n), elementwise_threads, 0, stream>>>(y, n, cols, ld, bias, gelu);
  check_launch("bias_activation");
}

// y[rows, cols] = GELU_tanh(y + bias), bias [cols] or nullptr (in place on a GEMM output).
template <storage_type T, storage_type TB>
void bias_gelu(T* y, std::size_t rows, std::size_t cols, const TB* bias, cudaStream_t stream) {
  bias_activation(y, rows, cols, cols, bias, true, stream);
}

template <storage_type TX, storage_type TY>
void silu(const TX* x, std::size_t n, TY* y, cudaStream_t stream) {
  if (n == 0) return;
  detail::silu_kernel<<<elementwise_blocks(n), elementwise_threads, 0, stream>>>(x, n, y);
  check_launch("silu");
}

// x[rows, cols] += y * gate, gate [cols] (f32 modulation row) or nullptr for a plain residual.
template <storage_type TX, storage_type TY>
void gated_residual(TX* x, const TY* y, const float* gate, std::size_t rows, std::size_t cols, cudaStream_t stream) {
  const std::size_t n = rows * cols;
  if (n == 0) return;
  detail::residual_kernel<<<elementwise_blocks(n), elementwise_threads, 0, stream>>>(x, y, gate, n, cols);
  check_launch("gated_residual");
}

// out[i] = a[i] + b[i % b_period] for i < n (f32 out).
template <storage_type TA>
void add_broadcast(const TA* a, const float* b, std::size_t n, std::size_t b_period, float* out, cudaStream_t stream) {
  if (n == 0) return;
  detail::add_broadcast_kernel<<<elementwise_blocks(n), elementwise_threads, 0, stream>>>(a, b, n, b_period, out);
  check_launch("add_broadcast");
}

// dst[i] = src[i] converted (bf16 -> f32 is exact; f32 -> bf16 rounds to nearest even).
template <storage_type TS, storage_type TD>
void convert(const TS* src, std::size_t n, TD* dst, cudaStream_t stream) {
  if (n == 0) return;
  detail::convert_kernel<<<elementwise_blocks(n), elementwise_threads, 0, stream>>>(src, n, dst);
  check_launch("convert");
}

inline void patchify(const float* x, std::size_t c, std::size_t frames, std::size_t height, std::size_t width,
                     const patch_grid& g, float* patches, cudaStream_t stream) {
  const std::size_t tokens = g.gf * g.gh * g.gw;
  if (tokens == 0) return;
  detail::patchify_kernel<><<<blocks_for(tokens, 128), 128, 0, stream>>>(x, c, frames, height, width, g,
                                                                       c * g.pt * g.ph * g.pw, patches);
  check_launch("patchify");
}

inline void unpatchify(const float* vecs, std::size_t c, const patch_grid& g, float* out, cudaStream_t stream) {
  const std::size_t tokens = g.gf * g.gh * g.gw;
  if (tokens == 0) return;
  detail::unpatchify_kernel<><<<blocks_for(tokens, 128), 128, 0, stream>>>(vecs, c, g, c * g.pt * g.ph * g.pw, out);
  check_launch("unpatchify");
}

// out[dim] = the sinusoid of the timestep *t (t in device memory).
inline void time_sinusoid(const float* t, std::size_t dim, float* out, cudaStream_t stream) {
  if (dim == 0) return;
  detail::time_sinusoid_kernel<><<<elementwise_blocks(dim), elementwise_threads, 0, stream>>>(t, dim, out);
  check_launch("time_sinusoid");
}

}  // namespace unshard::cuda
