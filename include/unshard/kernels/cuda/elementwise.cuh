#pragma once
// Elementwise kernels of the Wan block on the device: bias + GELU-tanh (when the GEMM epilogue
// does not apply it), SiLU, the gated residual add, the modulation sum, storage conversion, and
// the patch / sinusoid kernels of the embeddings and the head. Each element goes through the same
// UNSHARD_HD function the host path uses (kernels/thread/*.hpp).
//
// The Wan path's kernels are grid-stride loops over flat indices, vectorised by nothing but
// coalescing. The ops layer's (at the end: gated_residual_rows, residual_rows, gelu_tanh_inplace,
// silu_inplace, write_rows) load 16-byte vectors and keep index math in 32 bits or free of
// division. All are memory bound; bench_kernels reports their bandwidth against the card's.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

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

// dst[r*ldd + c] = act(src[r*lds + c] + bias[c]) for r < rows, c < cols (bias may be null; act is
// GELU-tanh or identity): a GEMM's output columns, in place (src == dst) or from an f32 staging
// into the output type, rounded once. Columns from blockIdx.x/threadIdx.x, rows from blockIdx.y
// (strided by gridDim.y): no division per element.
template <class TS, class TD, class TB>
__global__ void bias_activation_kernel(const TS* src, std::size_t lds, TD* dst, std::size_t ldd, unsigned rows,
                                       unsigned cols, const TB* bias, bool gelu) {
  const unsigned c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const float b = bias ? to_f32(bias[c]) : 0.0f;
  for (unsigned r = blockIdx.y; r < rows; r += gridDim.y) {
    const float v = to_f32(src[static_cast<std::size_t>(r) * lds + c]) + b;
    dst[static_cast<std::size_t>(r) * ldd + c] = from_f32<TD>(gelu ? gelu_tanh(v) : v);
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

// dst[r*ldd + c] = act(src[r*lds + c] + bias[c]) for the columns c < cols of rows r < rows (act =
// GELU-tanh if gelu, else identity; bias [cols] or nullptr); src may be dst (in place).
template <storage_type TS, storage_type TD, storage_type TB>
void bias_activation_into(const TS* src, std::size_t lds, TD* dst, std::size_t ldd, std::size_t rows, std::size_t cols,
                          const TB* bias, bool gelu, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  if (rows > 0xffffffffu || cols > 0xffffffffu)
    throw_error("bias_activation: ", rows, " x ", cols, " exceeds the kernel's 32-bit indices");
  const dim3 grid(blocks_for(cols, elementwise_threads, 0xffffffffu),
                  static_cast<unsigned>(rows < 65535 ? rows : 65535));
  UNSHARD_LAUNCH(grid, elementwise_threads, stream, detail::bias_activation_kernel)(
      src, lds, dst, ldd, static_cast<unsigned>(rows), static_cast<unsigned>(cols), bias, gelu);
  check_launch("bias_activation");
}

// y[r*ld + c] = act(y[r*ld + c] + bias[c]) for the columns c < cols of rows r < rows, in place.
template <storage_type T, storage_type TB>
void bias_activation(T* y, std::size_t rows, std::size_t cols, std::size_t ld, const TB* bias, bool gelu,
                     cudaStream_t stream) {
  bias_activation_into(static_cast<const T*>(y), ld, y, ld, rows, cols, bias, gelu, stream);
}

// y[rows, cols] = GELU_tanh(y + bias), bias [cols] or nullptr (in place on a GEMM output).
template <storage_type T, storage_type TB>
void bias_gelu(T* y, std::size_t rows, std::size_t cols, const TB* bias, cudaStream_t stream) {
  bias_activation(y, rows, cols, cols, bias, true, stream);
}

template <storage_type TX, storage_type TY>
void silu(const TX* x, std::size_t n, TY* y, cudaStream_t stream) {
  if (n == 0) return;
  UNSHARD_LAUNCH(elementwise_blocks(n), elementwise_threads, stream, detail::silu_kernel)(x, n, y);
  check_launch("silu");
}

// x[rows, cols] += y * gate, gate [cols] (f32 modulation row) or nullptr for a plain residual.
template <storage_type TX, storage_type TY>
void gated_residual(TX* x, const TY* y, const float* gate, std::size_t rows, std::size_t cols, cudaStream_t stream) {
  const std::size_t n = rows * cols;
  if (n == 0) return;
  UNSHARD_LAUNCH(elementwise_blocks(n), elementwise_threads, stream, detail::residual_kernel)(x, y, gate, n, cols);
  check_launch("gated_residual");
}

// out[i] = a[i] + b[i % b_period] for i < n (f32 out).
template <storage_type TA>
void add_broadcast(const TA* a, const float* b, std::size_t n, std::size_t b_period, float* out, cudaStream_t stream) {
  if (n == 0) return;
  UNSHARD_LAUNCH(elementwise_blocks(n), elementwise_threads, stream,
                 detail::add_broadcast_kernel)(a, b, n, b_period, out);
  check_launch("add_broadcast");
}

// dst[i] = src[i] converted (bf16 -> f32 is exact; f32 -> bf16 rounds to nearest even).
template <storage_type TS, storage_type TD>
void convert(const TS* src, std::size_t n, TD* dst, cudaStream_t stream) {
  if (n == 0) return;
  UNSHARD_LAUNCH(elementwise_blocks(n), elementwise_threads, stream, detail::convert_kernel)(src, n, dst);
  check_launch("convert");
}

inline void patchify(const float* x, std::size_t c, std::size_t frames, std::size_t height, std::size_t width,
                     const patch_grid& g, float* patches, cudaStream_t stream) {
  const std::size_t tokens = g.gf * g.gh * g.gw;
  if (tokens == 0) return;
  UNSHARD_LAUNCH(blocks_for(tokens, 128), 128, stream,
                 detail::patchify_kernel<>)(x, c, frames, height, width, g, c * g.pt * g.ph * g.pw, patches);
  check_launch("patchify");
}

inline void unpatchify(const float* vecs, std::size_t c, const patch_grid& g, float* out, cudaStream_t stream) {
  const std::size_t tokens = g.gf * g.gh * g.gw;
  if (tokens == 0) return;
  UNSHARD_LAUNCH(blocks_for(tokens, 128), 128, stream,
                 detail::unpatchify_kernel<>)(vecs, c, g, c * g.pt * g.ph * g.pw, out);
  check_launch("unpatchify");
}

// out[dim] = the sinusoid of the timestep *t (t in device memory).
inline void time_sinusoid(const float* t, std::size_t dim, float* out, cudaStream_t stream) {
  if (dim == 0) return;
  UNSHARD_LAUNCH(elementwise_blocks(dim), elementwise_threads, stream, detail::time_sinusoid_kernel<>)(t, dim, out);
  check_launch("time_sinusoid");
}

// --- Vectorised kernels for bf16 (and f32) activations: the ops layer's -----------------------
//
// Flat kernels (residual_rows, gelu_tanh_inplace, silu_inplace) walk 16-byte vectors
// (vec_elems<T> elements) grid-stride, with a scalar tail and a scalar path for unaligned
// pointers; per element they run the host's UNSHARD_HD function in f32 and round once to T.
// gated_residual_rows is one block per row (the gate row is the row's modulation row, found by
// one 32-bit division per row).

namespace detail {

enum class unary_op : std::uint8_t { gelu_tanh, silu };

template <unary_op Op>
__device__ inline float apply_unary(float v) {
  if constexpr (Op == unary_op::gelu_tanh) {
    return unshard::gelu_tanh(v);
  } else {
    return unshard::silu(v);
  }
}

template <class T, unary_op Op>
__global__ void unary_inplace_kernel(T* x, std::size_t n, bool vec) {
  constexpr unsigned N = vec_elems<T>;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  const std::size_t first = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  std::size_t done = 0;
  if (vec) {
    const std::size_t nvec = n / N;
    for (std::size_t v = first; v < nvec; v += stride) {
      float f[N];
      load_vec(x + v * N, f);
#pragma unroll
      for (unsigned e = 0; e < N; ++e) f[e] = apply_unary<Op>(f[e]);
      store_vec(x + v * N, f);
    }
    done = nvec * N;
  }
  for (std::size_t i = done + first; i < n; i += stride) x[i] = from_f32<T>(apply_unary<Op>(to_f32(x[i])));
}

// x[i] += y[i] (f32 sum, rounded once to TX).
template <class TX, class TY>
__global__ void residual_flat_kernel(TX* x, const TY* y, std::size_t n, bool vec) {
  constexpr unsigned N = vec_elems<TX>;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  const std::size_t first = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  std::size_t done = 0;
  if constexpr (std::is_same_v<TX, TY>) {
    if (vec) {
      const std::size_t nvec = n / N;
      for (std::size_t v = first; v < nvec; v += stride) {
        float a[N], b[N];
        load_vec(x + v * N, a);
        load_vec(y + v * N, b);
#pragma unroll
        for (unsigned e = 0; e < N; ++e) a[e] = a[e] + b[e];
        store_vec(x + v * N, a);
      }
      done = nvec * N;
    }
  }
  for (std::size_t i = done + first; i < n; i += stride) x[i] = from_f32<TX>(to_f32(x[i]) + to_f32(y[i]));
}

// x[r, :] += y[r, :] * gate[m(r), :], one block per row. The product is rounded to f32 before the
// add (__fmul_rn: no contraction into an FMA), as the host's gated_residual_row.
template <class TX, class TY>
__global__ void gated_residual_rows_kernel(TX* x, const TY* y, const float* gate, unsigned rows, unsigned d,
                                           unsigned mod_stride, unsigned tokens_per_mod_row, bool vec) {
  constexpr unsigned N = vec_elems<TX>;
  for (unsigned r = blockIdx.x; r < rows; r += gridDim.x) {
    TX* xr = x + static_cast<std::size_t>(r) * d;
    const TY* yr = y + static_cast<std::size_t>(r) * d;
    const float* g = gate + static_cast<std::size_t>(tokens_per_mod_row ? r / tokens_per_mod_row : 0u) * mod_stride;
    unsigned done = 0;
    if constexpr (std::is_same_v<TX, TY>) {
      if (vec) {
        const unsigned nvec = d / N;
        for (unsigned v = threadIdx.x; v < nvec; v += blockDim.x) {
          float a[N], b[N];
          load_vec(xr + v * N, a);
          load_vec(yr + v * N, b);
#pragma unroll
          for (unsigned e = 0; e < N; e += 4) {
            const float4 gv = *reinterpret_cast<const float4*>(g + v * N + e);
            a[e] = a[e] + __fmul_rn(b[e], gv.x);
            a[e + 1] = a[e + 1] + __fmul_rn(b[e + 1], gv.y);
            a[e + 2] = a[e + 2] + __fmul_rn(b[e + 2], gv.z);
            a[e + 3] = a[e + 3] + __fmul_rn(b[e + 3], gv.w);
          }
          store_vec(xr + v * N, a);
        }
        done = nvec * N;
      }
    }
    for (unsigned i = done + threadIdx.x; i < d; i += blockDim.x)
      xr[i] = from_f32<TX>(to_f32(xr[i]) + __fmul_rn(to_f32(yr[i]), g[i]));
  }
}

inline unsigned flat_blocks(std::size_t n_items) { return blocks_for(n_items, elementwise_threads, 65535u * 16u); }

}  // namespace detail

// x[r, :] += y[r, :] * gate[m, :] for r < rows, m = tokens_per_mod_row ? r / tokens_per_mod_row : 0,
// gate row m at gate + m * mod_stride (f32 modulation). x and y [rows, d].
template <storage_type TX, storage_type TY>
void gated_residual_rows(TX* x, const TY* y, const float* gate, std::size_t mod_stride, std::size_t tokens_per_mod_row,
                         std::size_t rows, std::size_t d, cudaStream_t stream) {
  if (rows == 0 || d == 0) return;
  if (rows > 0x7fffffffu || d > 0x7fffffffu || mod_stride > 0x7fffffffu || tokens_per_mod_row > 0xffffffffu)
    throw_error("gated_residual_rows: sizes exceed the kernel's 32-bit indices");
  const bool vec = std::is_same_v<TX, TY> && d % vec_elems<TX> == 0 && aligned16(x) && aligned16(y) && aligned16(gate) &&
                   mod_stride % 4 == 0;
  const unsigned grid = static_cast<unsigned>(rows < (1u << 20) ? rows : (1u << 20));
  UNSHARD_LAUNCH(grid, elementwise_threads, stream,
                 detail::gated_residual_rows_kernel)(x, y, gate, static_cast<unsigned>(rows), static_cast<unsigned>(d),
                                                     static_cast<unsigned>(mod_stride),
                                                     static_cast<unsigned>(tokens_per_mod_row), vec);
  check_launch("gated_residual_rows");
}

// x[i] += y[i] for i < n (x [rows, d] flattened: n = rows * d).
template <storage_type TX, storage_type TY>
void residual_rows(TX* x, const TY* y, std::size_t n, cudaStream_t stream) {
  if (n == 0) return;
  const bool vec = std::is_same_v<TX, TY> && aligned16(x) && aligned16(y);
  UNSHARD_LAUNCH(detail::flat_blocks((n + vec_elems<TX> - 1) / vec_elems<TX>), elementwise_threads, stream,
                 detail::residual_flat_kernel)(x, y, n, vec);
  check_launch("residual_rows");
}

// x[i] = GELU_tanh(x[i]) for i < n, in place.
template <storage_type T>
void gelu_tanh_inplace(T* x, std::size_t n, cudaStream_t stream) {
  if (n == 0) return;
  UNSHARD_LAUNCH(detail::flat_blocks((n + vec_elems<T> - 1) / vec_elems<T>), elementwise_threads, stream,
                 detail::unary_inplace_kernel<T, detail::unary_op::gelu_tanh>)(x, n, aligned16(x));
  check_launch("gelu_tanh_inplace");
}

// x[i] = SiLU(x[i]) for i < n, in place.
template <storage_type T>
void silu_inplace(T* x, std::size_t n, cudaStream_t stream) {
  if (n == 0) return;
  UNSHARD_LAUNCH(detail::flat_blocks((n + vec_elems<T> - 1) / vec_elems<T>), elementwise_threads, stream,
                 detail::unary_inplace_kernel<T, detail::unary_op::silu>)(x, n, aligned16(x));
  check_launch("silu_inplace");
}

// dst[r * dst_ld + c] = src[r * src_ld + c] for r < rows, c < cols (a KV-cache write, a row slice
// copy): one strided device-to-device copy on the stream. Same type on both sides; use convert
// for a change of type.
template <storage_type T>
void write_rows(T* dst, std::size_t dst_ld, const T* src, std::size_t src_ld, std::size_t rows, std::size_t cols,
                cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  if (cols > dst_ld || cols > src_ld)
    throw_error("write_rows: ", cols, " columns exceed the leading dimension (dst ", dst_ld, ", src ", src_ld, ")");
  UNSHARD_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_ld * sizeof(T), src, src_ld * sizeof(T), cols * sizeof(T), rows,
                                       cudaMemcpyDeviceToDevice, stream));
}

// Contiguous rows: dst[0 : rows*cols) = src[0 : rows*cols).
template <storage_type T>
void copy_rows(T* dst, const T* src, std::size_t rows, std::size_t cols, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  UNSHARD_CUDA_CHECK(cudaMemcpyAsync(dst, src, rows * cols * sizeof(T), cudaMemcpyDeviceToDevice, stream));
}

}  // namespace unshard::cuda
