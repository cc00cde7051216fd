#pragma once
// Row normalisations on the device: LayerNorm fused with the adaLN modulation, LayerNorm with an
// affine weight and bias (Wan's norm3), and RMSNorm over the full row fused with Wan's 3-D rope.
// The second half of the file holds the ops layer's vectorised versions for bf16 activations
// (layer_norm_modulate_rows, rms_norm_rows, rms_norm_rope_rows, rope_rows): see there.
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
  UNSHARD_LAUNCH(row_blocks(rows), row_threads, stream,
                 detail::layer_norm_modulate_kernel)(x, rows, n, eps, shift, scale, y);
  check_launch("layer_norm_modulate");
}

// y[r] = LN(x[r]) * weight + bias; y may equal x.
template <storage_type TX, storage_type TW, storage_type TY>
void layer_norm_affine(const TX* x, std::size_t rows, std::size_t n, double eps, const TW* weight, const TW* bias,
                       TY* y, cudaStream_t stream) {
  if (rows == 0 || n == 0) return;
  UNSHARD_LAUNCH(row_blocks(rows), row_threads, stream,
                 detail::layer_norm_affine_kernel)(x, rows, n, eps, weight, bias, y);
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
  UNSHARD_LAUNCH(row_blocks(rows), row_threads, stream,
                 detail::rms_norm_rope_kernel)(x, rows, n, head_dim, eps, weight, cos, sin);
  check_launch("rms_norm_rope");
}

// The rope tables of a (gf, gh, gw) token grid, as rope_table_row computes them on the host.
inline void rope_table(std::size_t gf, std::size_t gh, std::size_t gw, std::size_t pairs, float* cos, float* sin,
                       cudaStream_t stream) {
  const std::size_t tokens = gf * gh * gw;
  if (tokens == 0 || pairs == 0) return;
  UNSHARD_LAUNCH(blocks_for(tokens, 128), 128, stream, detail::rope_table_kernel<>)(tokens, gh, gw, pairs, cos, sin);
  check_launch("rope_table");
}

// --- Row kernels for bf16 activations (and f32): the ops layer's -------------------------------
//
// One block per row (blockIdx.x, rows strided by gridDim.x), all index math in 32 bits within a
// row (the row's base is one 64-bit multiply per row; no 64-bit div/mod per element). When the
// row width is a multiple of vec_elems<T> (8 bf16, 4 f32) and every pointer is 16-byte aligned,
// a thread loads whole 16-byte vectors and keeps its part of the row in registers (one read of
// the row from memory, up to row_vec_max vectors per thread: rows up to 32768 bf16 or 16384 f32);
// otherwise, or for wider rows, a scalar kernel rereads the row (from L1/L2).
//
// Statistics accumulate in stat_t<T>: f32 for bf16 activations (torch's bf16 LayerNorm/RMSNorm),
// double for f32 storage (the host's, so the f32 path keeps the 1e-5 rule); modulation, weights
// and rope run in f32 (double for f32 storage, as the host's rope does), and each output rounds
// once to T.
//
// Modulation rows: token r reads row m = (tokens_per_mod_row ? r / tokens_per_mod_row : 0) of the
// f32 modulation tables, at shift + m * mod_stride and scale + m * mod_stride (one 32-bit division
// per row): Wan's one row for every token, or Live Avatar's per-frame rows.

inline constexpr unsigned row_vec_max = 8;        // vectors a thread keeps in registers
inline constexpr unsigned row_vec_threads = 512;  // threads per row at most (vectorised kernels)

namespace detail {

template <class T>
struct row_geometry {
  unsigned threads = row_threads;
  unsigned vpt = 0;  // vectors per thread; 0: scalar kernel
};

// Threads and vectors per thread for a row of d elements (vectorised when `vec_ok`): at most
// row_vec_threads threads, each holding vpt = ceil(nvec / row_vec_threads) vectors (so the
// threads share the row evenly: 5120 bf16 = 640 vectors -> 320 threads x 2), rounded up to the
// compiled 1, 2, 4 or 8 (the extra slots are skipped by the bounds check).
template <class T>
row_geometry<T> row_geometry_for(std::size_t d, bool vec_ok) {
  row_geometry<T> g;
  if (!vec_ok || d % vec_elems<T> != 0) return g;
  const std::size_t nvec = d / vec_elems<T>;
  const std::size_t vpt = (nvec + row_vec_threads - 1) / row_vec_threads;
  if (vpt > row_vec_max) return g;
  const std::size_t threads = ((nvec + vpt - 1) / vpt + warp_size - 1) / warp_size * warp_size;
  g.threads = static_cast<unsigned>(threads);
  g.vpt = vpt <= 1 ? 1 : vpt <= 2 ? 2 : vpt <= 4 ? 4 : 8;
  return g;
}

inline void check_row_sizes(const char* what, std::size_t rows, std::size_t d) {
  if (rows > 0x7fffffffu || d > 0x7fffffffu / 2)
    throw_error(what, ": ", rows, " rows of ", d, " exceed the kernels' 32-bit row/element indices");
}

inline unsigned row_grid(std::size_t rows) { return static_cast<unsigned>(rows < (1u << 20) ? rows : (1u << 20)); }

// 1 / sqrt(v) in the statistics' type, correctly rounded sqrt and division in both.
template <class A>
__device__ inline A inv_sqrt_of(A v) {
  if constexpr (std::is_same_v<A, float>) {
    return 1.0f / sqrtf(v);
  } else {
    return 1.0 / ::sqrt(v);
  }
}

__device__ inline unsigned mod_row(unsigned r, unsigned tokens_per_mod_row) {
  return tokens_per_mod_row ? r / tokens_per_mod_row : 0u;
}

// y = LN(x)(1 + scale) + shift, registers-resident row.
template <class T, unsigned VPT>
__global__ void __launch_bounds__(row_vec_threads)
    ln_modulate_vec_kernel(const T* x, T* y, unsigned rows, unsigned d, double eps, const float* shift,
                           const float* scale, unsigned mod_stride, unsigned tokens_per_mod_row) {
  constexpr unsigned N = vec_elems<T>;
  using A = stat_t<T>;
  __shared__ A scratch[32];
  const unsigned nvec = d / N;
  for (unsigned r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + static_cast<std::size_t>(r) * d;
    float v[VPT][N];
    A sum = 0;
#pragma unroll
    for (unsigned j = 0; j < VPT; ++j) {
      const unsigned vi = threadIdx.x + j * blockDim.x;
      if (vi < nvec) {
        load_vec(xr + vi * N, v[j]);
#pragma unroll
        for (unsigned e = 0; e < N; ++e) sum += v[j][e];
      }
    }
    const A mean = block_sum(sum, scratch) / static_cast<A>(d);
    A sq = 0;
#pragma unroll
    for (unsigned j = 0; j < VPT; ++j)
      if (threadIdx.x + j * blockDim.x < nvec) {
#pragma unroll
        for (unsigned e = 0; e < N; ++e) {
          const A c = static_cast<A>(v[j][e]) - mean;
          sq += c * c;
        }
      }
    const A rstd = inv_sqrt_of(block_sum(sq, scratch) / static_cast<A>(d) + static_cast<A>(eps));
    const unsigned m = mod_row(r, tokens_per_mod_row);
    const float* sh = shift + static_cast<std::size_t>(m) * mod_stride;
    const float* sc = scale + static_cast<std::size_t>(m) * mod_stride;
    T* yr = y + static_cast<std::size_t>(r) * d;
#pragma unroll
    for (unsigned j = 0; j < VPT; ++j) {
      const unsigned vi = threadIdx.x + j * blockDim.x;
      if (vi < nvec) {
        float o[N], shv[N], scv[N];
#pragma unroll
        for (unsigned e = 0; e < N; e += 4) {
          const float4 a = *reinterpret_cast<const float4*>(sh + vi * N + e);
          const float4 b = *reinterpret_cast<const float4*>(sc + vi * N + e);
          shv[e] = a.x, shv[e + 1] = a.y, shv[e + 2] = a.z, shv[e + 3] = a.w;
          scv[e] = b.x, scv[e + 1] = b.y, scv[e + 2] = b.z, scv[e + 3] = b.w;
        }
#pragma unroll
        for (unsigned e = 0; e < N; ++e)
          o[e] = modulated(static_cast<float>((static_cast<A>(v[j][e]) - mean) * rstd), shv[e], scv[e]);
        store_vec(yr + vi * N, o);
      }
    }
  }
}

template <class T>
__global__ void __launch_bounds__(row_threads)
    ln_modulate_scalar_kernel(const T* x, T* y, unsigned rows, unsigned d, double eps, const float* shift,
                              const float* scale, unsigned mod_stride, unsigned tokens_per_mod_row) {
  using A = stat_t<T>;
  __shared__ A scratch[32];
  for (unsigned r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + static_cast<std::size_t>(r) * d;
    A sum = 0;
    for (unsigned i = threadIdx.x; i < d; i += blockDim.x) sum += to_f32(xr[i]);
    const A mean = block_sum(sum, scratch) / static_cast<A>(d);
    A sq = 0;
    for (unsigned i = threadIdx.x; i < d; i += blockDim.x) {
      const A c = static_cast<A>(to_f32(xr[i])) - mean;
      sq += c * c;
    }
    const A rstd = inv_sqrt_of(block_sum(sq, scratch) / static_cast<A>(d) + static_cast<A>(eps));
    const unsigned m = mod_row(r, tokens_per_mod_row);
    const float* sh = shift + static_cast<std::size_t>(m) * mod_stride;
    const float* sc = scale + static_cast<std::size_t>(m) * mod_stride;
    T* yr = y + static_cast<std::size_t>(r) * d;
    // y may alias x: every thread reads and writes only its own elements, after the statistics.
    for (unsigned i = threadIdx.x; i < d; i += blockDim.x)
      yr[i] = from_f32<T>(modulated(static_cast<float>((static_cast<A>(to_f32(xr[i])) - mean) * rstd), sh[i], sc[i]));
  }
}

// In place: optional RMSNorm over the whole row (NORM), then optional rope (ROPE) of every head's
// pairs (x[2i], x[2i+1]) by the row's cos/sin [rows, pairs]. Registers-resident row.
template <class T, class W, bool NORM, bool ROPE, unsigned VPT>
__global__ void __launch_bounds__(row_vec_threads)
    rms_rope_vec_kernel(T* x, unsigned rows, unsigned d, unsigned head_dim, double eps, const W* weight,
                        const float* cos, const float* sin, unsigned pairs) {
  constexpr unsigned N = vec_elems<T>;
  using A = stat_t<T>;
  __shared__ A scratch[32];
  const unsigned nvec = d / N;
  for (unsigned r = blockIdx.x; r < rows; r += gridDim.x) {
    T* xr = x + static_cast<std::size_t>(r) * d;
    float v[VPT][N];
    A sq = 0;
#pragma unroll
    for (unsigned j = 0; j < VPT; ++j) {
      const unsigned vi = threadIdx.x + j * blockDim.x;
      if (vi < nvec) {
        load_vec(xr + vi * N, v[j]);
        if constexpr (NORM) {
#pragma unroll
          for (unsigned e = 0; e < N; ++e) sq += static_cast<A>(v[j][e]) * static_cast<A>(v[j][e]);
        }
      }
    }
    A rstd = 1;
    if constexpr (NORM)
      rstd = inv_sqrt_of(block_sum(sq, scratch) / static_cast<A>(d) + static_cast<A>(eps));
    const float* cr = ROPE ? cos + static_cast<std::size_t>(r) * pairs : nullptr;
    const float* sr = ROPE ? sin + static_cast<std::size_t>(r) * pairs : nullptr;
#pragma unroll
    for (unsigned j = 0; j < VPT; ++j) {
      const unsigned vi = threadIdx.x + j * blockDim.x;
      if (vi < nvec) {
        float* o = v[j];
        if constexpr (NORM) {
          float w[N];
          if constexpr (std::is_same_v<W, T>) {
            load_vec(weight + vi * N, w);
          } else {
#pragma unroll
            for (unsigned e = 0; e < N; ++e) w[e] = to_f32(weight[vi * N + e]);
          }
#pragma unroll
          for (unsigned e = 0; e < N; ++e) o[e] = static_cast<float>(static_cast<A>(o[e]) * rstd) * w[e];
        }
        if constexpr (ROPE) {
          const unsigned p0 = (vi * N) % head_dim / 2;  // first pair of the vector within its head
#pragma unroll
          for (unsigned e = 0; e < N / 2; ++e) {
            const A a = o[2 * e], b = o[2 * e + 1], c = cr[p0 + e], s = sr[p0 + e];
            o[2 * e] = static_cast<float>(a * c - b * s);
            o[2 * e + 1] = static_cast<float>(a * s + b * c);
          }
        }
        store_vec(xr + vi * N, o);
      }
    }
  }
}

template <class T, class W, bool NORM, bool ROPE>
__global__ void __launch_bounds__(row_threads)
    rms_rope_scalar_kernel(T* x, unsigned rows, unsigned d, unsigned head_dim, double eps, const W* weight,
                           const float* cos, const float* sin, unsigned pairs) {
  using A = stat_t<T>;
  __shared__ A scratch[32];
  for (unsigned r = blockIdx.x; r < rows; r += gridDim.x) {
    T* xr = x + static_cast<std::size_t>(r) * d;
    A rstd = 1;
    if constexpr (NORM) {
      A sq = 0;
      for (unsigned i = threadIdx.x; i < d; i += blockDim.x) {
        const A v = to_f32(xr[i]);
        sq += v * v;
      }
      rstd = inv_sqrt_of(block_sum(sq, scratch) / static_cast<A>(d) + static_cast<A>(eps));
    }
    for (unsigned p = threadIdx.x; p < d / 2; p += blockDim.x) {
      float ab[2] = {to_f32(xr[2 * p]), to_f32(xr[2 * p + 1])};
      if constexpr (NORM) {
        ab[0] = static_cast<float>(static_cast<A>(ab[0]) * rstd) * to_f32(weight[2 * p]);
        ab[1] = static_cast<float>(static_cast<A>(ab[1]) * rstd) * to_f32(weight[2 * p + 1]);
      }
      if constexpr (ROPE) {
        const unsigned i = p % (head_dim / 2);
        const A a = ab[0], b = ab[1];
        const A c = cos[static_cast<std::size_t>(r) * pairs + i], s = sin[static_cast<std::size_t>(r) * pairs + i];
        ab[0] = static_cast<float>(a * c - b * s);
        ab[1] = static_cast<float>(a * s + b * c);
      }
      xr[2 * p] = from_f32<T>(ab[0]);
      xr[2 * p + 1] = from_f32<T>(ab[1]);
    }
  }
}

template <class T, class W, bool NORM, bool ROPE>
void launch_rms_rope(const char* what, T* x, std::size_t rows, std::size_t d, std::size_t head_dim, double eps,
                     const W* weight, const float* cos, const float* sin, std::size_t pairs, cudaStream_t stream) {
  check_row_sizes(what, rows, d);
  bool vec_ok = aligned16(x) && (!ROPE || head_dim % vec_elems<T> == 0);
  if constexpr (NORM) vec_ok = vec_ok && (!std::is_same_v<W, T> || aligned16(weight));
  const row_geometry<T> g = row_geometry_for<T>(d, vec_ok);
  const unsigned R = static_cast<unsigned>(rows), D = static_cast<unsigned>(d), H = static_cast<unsigned>(head_dim),
                 P = static_cast<unsigned>(pairs);
  const unsigned grid = row_grid(rows);
  switch (g.vpt) {
    case 1: UNSHARD_LAUNCH(grid, g.threads, stream, rms_rope_vec_kernel<T, W, NORM, ROPE, 1>)(x, R, D, H, eps, weight, cos, sin, P); break;
    case 2: UNSHARD_LAUNCH(grid, g.threads, stream, rms_rope_vec_kernel<T, W, NORM, ROPE, 2>)(x, R, D, H, eps, weight, cos, sin, P); break;
    case 4: UNSHARD_LAUNCH(grid, g.threads, stream, rms_rope_vec_kernel<T, W, NORM, ROPE, 4>)(x, R, D, H, eps, weight, cos, sin, P); break;
    case 8: UNSHARD_LAUNCH(grid, g.threads, stream, rms_rope_vec_kernel<T, W, NORM, ROPE, 8>)(x, R, D, H, eps, weight, cos, sin, P); break;
    default: UNSHARD_LAUNCH(grid, row_threads, stream, rms_rope_scalar_kernel<T, W, NORM, ROPE>)(x, R, D, H, eps, weight, cos, sin, P);
  }
  check_launch(what);
}

inline void check_rope_sizes(const char* what, std::size_t d, std::size_t head_dim, std::size_t pairs) {
  if (head_dim == 0 || head_dim % 2 != 0 || d % head_dim != 0)
    throw_error(what, ": head_dim ", head_dim, " must be even and divide the row width ", d);
  if (pairs != head_dim / 2) throw_error(what, ": pairs ", pairs, " must be head_dim / 2 = ", head_dim / 2);
}

}  // namespace detail

// y[r] = LN(x[r]) (1 + scale[m]) + shift[m] for r < rows (LayerNorm without affine, eps inside the
// square root), m = tokens_per_mod_row ? r / tokens_per_mod_row : 0; shift/scale row m at
// shift + m * mod_stride (f32). Statistics in stat_t<T>, modulation in f32, y rounded once to T.
// y may equal x.
template <storage_type T>
void layer_norm_modulate_rows(const T* x, T* y, std::size_t rows, std::size_t d, double eps, const float* shift,
                              const float* scale, std::size_t mod_stride, std::size_t tokens_per_mod_row,
                              cudaStream_t stream) {
  if (rows == 0 || d == 0) return;
  detail::check_row_sizes("layer_norm_modulate_rows", rows, d);
  if (mod_stride > 0x7fffffffu || tokens_per_mod_row > 0xffffffffu)
    throw_error("layer_norm_modulate_rows: mod_stride ", mod_stride, " or tokens_per_mod_row ", tokens_per_mod_row,
                " exceed 32 bits");
  const bool vec_ok = aligned16(x) && aligned16(y) && aligned16(shift) && aligned16(scale) && mod_stride % 4 == 0;
  const detail::row_geometry<T> g = detail::row_geometry_for<T>(d, vec_ok);
  const unsigned R = static_cast<unsigned>(rows), D = static_cast<unsigned>(d), S = static_cast<unsigned>(mod_stride),
                 M = static_cast<unsigned>(tokens_per_mod_row);
  const unsigned grid = detail::row_grid(rows);
  switch (g.vpt) {
    case 1: UNSHARD_LAUNCH(grid, g.threads, stream, detail::ln_modulate_vec_kernel<T, 1>)(x, y, R, D, eps, shift, scale, S, M); break;
    case 2: UNSHARD_LAUNCH(grid, g.threads, stream, detail::ln_modulate_vec_kernel<T, 2>)(x, y, R, D, eps, shift, scale, S, M); break;
    case 4: UNSHARD_LAUNCH(grid, g.threads, stream, detail::ln_modulate_vec_kernel<T, 4>)(x, y, R, D, eps, shift, scale, S, M); break;
    case 8: UNSHARD_LAUNCH(grid, g.threads, stream, detail::ln_modulate_vec_kernel<T, 8>)(x, y, R, D, eps, shift, scale, S, M); break;
    default: UNSHARD_LAUNCH(grid, row_threads, stream, detail::ln_modulate_scalar_kernel<T>)(x, y, R, D, eps, shift, scale, S, M);
  }
  check_launch("layer_norm_modulate_rows");
}

// In place on x [rows, d]: x = x / sqrt(mean(x²) + eps) * weight (weight [d], any storage type).
template <storage_type T, storage_type W>
void rms_norm_rows(T* x, std::size_t rows, std::size_t d, double eps, const W* weight, cudaStream_t stream) {
  if (rows == 0 || d == 0) return;
  if (!weight) throw_error("rms_norm_rows: no weight");
  detail::launch_rms_rope<T, W, true, false>("rms_norm_rows", x, rows, d, d, eps, weight, nullptr, nullptr, 0, stream);
}

// In place on x [rows, heads * head_dim]: RMSNorm over the whole row (weight [heads * head_dim]),
// then every head's pairs (x[2i], x[2i+1]), i < pairs = head_dim / 2, rotated by the row's
// cos/sin [rows, pairs] (f32): (a + ib)(cos + i sin).
template <storage_type T, storage_type W>
void rms_norm_rope_rows(T* x, std::size_t rows, std::size_t heads, std::size_t head_dim, double eps, const W* weight,
                        const float* cos, const float* sin, std::size_t pairs, cudaStream_t stream) {
  const std::size_t d = heads * head_dim;
  if (rows == 0 || d == 0) return;
  detail::check_rope_sizes("rms_norm_rope_rows", d, head_dim, pairs);
  if (!weight || !cos || !sin) throw_error("rms_norm_rope_rows: weight, cos and sin are required");
  detail::launch_rms_rope<T, W, true, true>("rms_norm_rope_rows", x, rows, d, head_dim, eps, weight, cos, sin, pairs,
                                            stream);
}

// In place on x [rows, heads * head_dim]: rope alone (rms_norm_rope_rows without the norm).
template <storage_type T>
void rope_rows(T* x, std::size_t rows, std::size_t heads, std::size_t head_dim, const float* cos, const float* sin,
               std::size_t pairs, cudaStream_t stream) {
  const std::size_t d = heads * head_dim;
  if (rows == 0 || d == 0) return;
  detail::check_rope_sizes("rope_rows", d, head_dim, pairs);
  if (!cos || !sin) throw_error("rope_rows: cos and sin are required");
  detail::launch_rms_rope<T, float, false, true>("rope_rows", x, rows, d, head_dim, 0.0, static_cast<const float*>(nullptr),
                                                 cos, sin, pairs, stream);
}

}  // namespace unshard::cuda
