#pragma once
// Host linear layer: y[M, N] = x[M, K] · W[N, K]ᵀ + b[N], x and y f32, W f32, bf16, f16 or f8e4m3
// codes with their scales (the view carries them: tensor_view::with_scales), b f32, bf16 or f16.
//
// Two paths, picked at run time:
//  * portable -- a fixed-order GEMM. Every output element is summed in an order that depends on K
//    alone (see detail::gemm_k_block), never on M, N, the row range or how a caller splits the
//    work, so a sharded, chunked or threaded forward is bit-identical to an unsharded one.
//    bf16/f16 weights are widened on the fly, a block of rows at a time, into a stack buffer;
//    f8e4m3 codes are dequantized the same way, each to f32(value(code) * scale of its row) --
//    exactly quant::dequantize_rows' values, so an fp8 forward equals, bit for bit, the f32
//    forward over the dequantized weights, for any sharding or chunking.
//  * blas -- cblas_sgemm when built against a CBLAS (target unshard::blas defines
//    UNSHARD_HAVE_CBLAS) and W is f32; otherwise it quietly runs the portable path. A BLAS picks
//    its summation order by shape, so it is fast but only reproducible for one shape.
//
// The row-range form computes output columns [n0, n0 + rows) from those rows of W alone, so a
// "chunked" unshard can run each chunk of weight rows as soon as it arrives.
#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "unshard/core/dtype.hpp"
#include "unshard/core/error.hpp"
#include "unshard/core/tensor_view.hpp"
#include "unshard/kernels/thread/fp8_activation.hpp"
#include "unshard/kernels/thread/storage.hpp"

#if defined(UNSHARD_HAVE_CBLAS)
#include <cblas.h>
#endif

#if defined(UNSHARD_HAVE_CBLAS) && (defined(__GNUC__) || defined(__clang__))
// OpenBLAS's thread-count setter, weak: absent (null) with another CBLAS.
extern "C" void openblas_set_num_threads(int) __attribute__((weak));
#endif

namespace unshard {

// Host ranks are threads that each run their own GEMMs: a multi-threaded BLAS under each would
// oversubscribe the cores (docs/conventions.md measures with one BLAS thread per rank). Keeps a count
// the user set with OPENBLAS_NUM_THREADS.
inline void use_one_blas_thread_per_rank() noexcept {
#if defined(UNSHARD_HAVE_CBLAS) && (defined(__GNUC__) || defined(__clang__))
  if (openblas_set_num_threads && !std::getenv("OPENBLAS_NUM_THREADS")) openblas_set_num_threads(1);
#endif
}

enum class gemm_path : std::uint8_t { portable, blas };

constexpr std::string_view name_of(gemm_path p) noexcept { return p == gemm_path::blas ? "blas" : "portable"; }

inline gemm_path parse_gemm_path(std::string_view s) {
  if (s == "portable") return gemm_path::portable;
  if (s == "blas") return gemm_path::blas;
  throw_error("unknown gemm path '", s, "' (expected portable or blas)");
}

constexpr bool blas_available() noexcept {
#if defined(UNSHARD_HAVE_CBLAS)
  return true;
#else
  return false;
#endif
}

// The path a linear over weights of dtype `w` really takes when `requested` is asked for.
constexpr gemm_path effective_gemm_path(gemm_path requested, dtype w) noexcept {
  return requested == gemm_path::blas && blas_available() && w == dtype::f32 ? gemm_path::blas
                                                                              : gemm_path::portable;
}

// Rows [r0, r1) of a tensor whose first dimension indexes rows (a weight [N, ...] or a bias [N]).
inline tensor_view row_slice(const tensor_view& t, std::int64_t r0, std::int64_t r1) {
  const shape& d = t.dims();
  if (d.rank() == 0 || r0 < 0 || r1 < r0 || r1 > d[0])
    throw_error("row_slice: rows [", r0, ", ", r1, ") out of range for a tensor of shape ", d.to_string());
  const std::size_t row_elems = d[0] == 0 ? 0 : static_cast<std::size_t>(t.numel() / d[0]);
  std::int64_t dims[shape::max_rank];
  for (std::size_t i = 0; i < d.rank(); ++i) dims[i] = d[i];
  dims[0] = r1 - r0;
  const tensor_view rows(t.data() + static_cast<std::size_t>(r0) * row_elems * size_of(t.type()), t.type(),
                         shape(std::span<const std::int64_t>(dims, d.rank())));
  if (!t.has_scales()) return rows;
  const auto [scales, count] = t.scales_of_rows(r0, r1);  // an fp8 weight's rows keep their scales
  return rows.with_scales(scales, count);
}

namespace detail {

// The portable summation order, fixed for reproducibility: K is cut into blocks of gemm_k_block;
// within a block, lane l sums the products with k ≡ l (mod gemm_lanes) in increasing k, the lanes
// are combined by a fixed tree, and the block sums are added to the output (initialised with the
// bias) in block order. Changing a constant here changes results in the last bits.
inline constexpr std::size_t gemm_lanes = 8;
inline constexpr std::size_t gemm_k_block = 256;  // multiple of gemm_lanes
// Cache blocking only (no effect on results): x rows kept hot while all of W's rows stream by,
// and W rows widened once per block of x rows.
inline constexpr std::size_t gemm_m_block = 64;
inline constexpr std::size_t gemm_m_tile = 4;
inline constexpr std::size_t gemm_n_block = 16;

// Partial sums over kn <= gemm_k_block of one W row against Rows rows of x. Not inlined: inside
// the blocked loops GCC keeps acc on the stack (2-3x slower); alone it stays in registers, and a
// call per 2*Rows*kn flops costs nothing measurable.
template <std::size_t Rows>
[[gnu::noinline]] inline void gemm_tile(const float* x, std::size_t ldx, const float* w, std::size_t kn, float* out) {
  float acc[Rows][gemm_lanes] = {};
  std::size_t k = 0;
  for (; k + gemm_lanes <= kn; k += gemm_lanes)
    for (std::size_t r = 0; r < Rows; ++r)
      for (std::size_t l = 0; l < gemm_lanes; ++l) acc[r][l] += x[r * ldx + k + l] * w[k + l];
  if (k < kn) {
    // Ragged tail: zero-padded to a whole group, so acc is only ever indexed by constants and
    // stays in registers (a variable lane index would force it onto the stack: 4x slower).
    float wt[gemm_lanes] = {}, xt[Rows][gemm_lanes] = {};
    for (std::size_t l = 0; l < kn - k; ++l) {
      wt[l] = w[k + l];
      for (std::size_t r = 0; r < Rows; ++r) xt[r][l] = x[r * ldx + k + l];
    }
    for (std::size_t r = 0; r < Rows; ++r)
      for (std::size_t l = 0; l < gemm_lanes; ++l) acc[r][l] += xt[r][l] * wt[l];
  }
  for (std::size_t r = 0; r < Rows; ++r) {
    const float* a = acc[r];
    out[r] = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
  }
}

inline void gemm_tile_rows(std::size_t rows, const float* x, std::size_t ldx, const float* w, std::size_t kn,
                           float* out) {
  switch (rows) {
    case 4: gemm_tile<4>(x, ldx, w, kn, out); break;
    case 3: gemm_tile<3>(x, ldx, w, kn, out); break;
    case 2: gemm_tile<2>(x, ldx, w, kn, out); break;
    default: gemm_tile<1>(x, ldx, w, kn, out); break;
  }
}
static_assert(gemm_m_tile == 4, "gemm_tile_rows dispatches tiles of up to 4 rows");

// The value of every e4m3 code (as quant::e4m3_values(); NaN for the two NaN codes).
inline const float* e4m3_value_table() {
  static const auto table = [] {
    struct values {
      float v[256];
    } t{};
    for (unsigned c = 0; c < 256; ++c) t.v[c] = e4m3_bits_to_float(static_cast<std::uint8_t>(c));
    return t;
  }();
  return table.v;
}

inline void fill_bias(std::size_t m, std::size_t n_rows, const tensor_view& b, float* y, std::size_t ldy) {
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t n = 0; n < n_rows; ++n) y[i * ldy + n] = b.empty() ? 0.0f : b.load(n);
}

// `scales`: for f8e4m3 codes only, 1 (every row) or one per row of w.
template <class T>
void linear_portable(const float* x, std::size_t m, std::size_t k, const T* w, std::size_t n_rows,
                     const tensor_view& b, float* y, std::size_t ldy, const float* scales = nullptr,
                     std::size_t scale_count = 0) {
  fill_bias(m, n_rows, b, y, ldy);
  // Widened rows of W for one (k block, n block); 16 KiB of stack, unused when W is f32.
  [[maybe_unused]] float wide[std::is_same_v<T, float> ? 1 : gemm_n_block * gemm_k_block];
  for (std::size_t kb = 0; kb < k; kb += gemm_k_block) {
    const std::size_t kn = std::min(gemm_k_block, k - kb);
    for (std::size_t mb = 0; mb < m; mb += gemm_m_block) {
      const std::size_t m_end = std::min(m, mb + gemm_m_block);
      for (std::size_t nb = 0; nb < n_rows; nb += gemm_n_block) {
        const std::size_t n_end = std::min(n_rows, nb + gemm_n_block);
        const float* wb;  // row nb of this block, rows wld apart
        std::size_t wld;
        if constexpr (std::is_same_v<T, float>) {
          wb = w + nb * k + kb;
          wld = k;
        } else if constexpr (std::is_same_v<T, f8e4m3>) {
          const float* value = e4m3_value_table();
          for (std::size_t n = nb; n < n_end; ++n) {
            const float sc = scales[scale_count == 1 ? 0 : n];
            for (std::size_t i = 0; i < kn; ++i) wide[(n - nb) * gemm_k_block + i] = value[w[n * k + kb + i].bits] * sc;
          }
          wb = wide;
          wld = gemm_k_block;
        } else {
          for (std::size_t n = nb; n < n_end; ++n)
            for (std::size_t i = 0; i < kn; ++i) wide[(n - nb) * gemm_k_block + i] = to_f32(w[n * k + kb + i]);
          wb = wide;
          wld = gemm_k_block;
        }
        for (std::size_t mt = mb; mt < m_end; mt += gemm_m_tile) {
          const std::size_t rows = std::min(gemm_m_tile, m_end - mt);
          for (std::size_t n = nb; n < n_end; ++n) {
            float part[gemm_m_tile];
            gemm_tile_rows(rows, x + mt * k + kb, k, wb + (n - nb) * wld, kn, part);
            for (std::size_t r = 0; r < rows; ++r) y[(mt + r) * ldy + n] += part[r];
          }
        }
      }
    }
  }
}

#if defined(UNSHARD_HAVE_CBLAS)
inline void linear_blas(const float* x, std::size_t m, std::size_t k, const float* w, std::size_t n_rows,
                        const tensor_view& b, float* y, std::size_t ldy) {
  for (const std::size_t v : {m, k, n_rows, ldy})
    if (v > static_cast<std::size_t>(INT_MAX)) throw_error("linear: dimension ", v, " exceeds the BLAS index range");
  fill_bias(m, n_rows, b, y, ldy);  // beta = 1 adds the product onto the bias
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(n_rows),
              static_cast<int>(k), 1.0f, x, static_cast<int>(k), w, static_cast<int>(k), 1.0f, y,
              static_cast<int>(ldy));
}
#endif

}  // namespace detail

// Output columns [n0, n0 + R) of y[m, ldy] from w_rows = rows n0..n0+R-1 of W (shape [R, ...],
// K elements per row) and b_rows = the same entries of the bias (an empty view for none).
inline void linear_rows(const float* x, std::size_t m, std::size_t k, const tensor_view& w_rows,
                        const tensor_view& b_rows, std::size_t n0, float* y, std::size_t ldy,
                        gemm_path path = gemm_path::portable) {
  const shape& wd = w_rows.dims();
  const std::size_t n_rows = wd.rank() == 0 ? 0 : static_cast<std::size_t>(wd[0]);
  if (wd.rank() == 0 || static_cast<std::size_t>(w_rows.numel()) != n_rows * k)
    throw_error("linear: weight of shape ", wd.to_string(), " is not [N, K] with K = ", k);
  if (!b_rows.empty() && b_rows.type() == dtype::f8e4m3)
    throw_error("linear: bias of shape ", b_rows.dims().to_string(),
                " is f8e4m3: 1-D parameters are never quantized (keep them bf16 or f32)");
  if (!b_rows.empty() && static_cast<std::size_t>(b_rows.numel()) != n_rows)
    throw_error("linear: bias of shape ", b_rows.dims().to_string(), " does not match the ", n_rows, " weight rows");
  if (n0 + n_rows > ldy)
    throw_error("linear: output columns [", n0, ", ", n0 + n_rows, ") exceed the leading dimension ", ldy);
  if (m == 0 || n_rows == 0) return;
  float* out = y + n0;
  if (effective_gemm_path(path, w_rows.type()) == gemm_path::blas) {
#if defined(UNSHARD_HAVE_CBLAS)
    detail::linear_blas(x, m, k, reinterpret_cast<const float*>(w_rows.data()), n_rows, b_rows, out, ldy);
    return;
#endif
  }
  switch (w_rows.type()) {
    case dtype::f32:
      detail::linear_portable(x, m, k, reinterpret_cast<const float*>(w_rows.data()), n_rows, b_rows, out, ldy);
      break;
    case dtype::bf16:
      detail::linear_portable(x, m, k, reinterpret_cast<const bf16*>(w_rows.data()), n_rows, b_rows, out, ldy);
      break;
    case dtype::f16:
      detail::linear_portable(x, m, k, reinterpret_cast<const f16*>(w_rows.data()), n_rows, b_rows, out, ldy);
      break;
    case dtype::f8e4m3:
      // Codes mean nothing without their scales: the fp8 policy's views carry them (1, or one per row).
      if (!w_rows.has_scales())
        throw_error("linear: weight of shape ", wd.to_string(),
                    " is f8e4m3 without scales: f8e4m3 codes need their f32 scales (quant/fp8.hpp), which the fp8 "
                    "policy's parameter views carry");
      if (w_rows.scale_count() != 1 && w_rows.scale_count() != n_rows)
        throw_error("linear: f8e4m3 weight of shape ", wd.to_string(), " carries ", w_rows.scale_count(),
                    " scales; it needs 1 (per tensor) or ", n_rows, " (one per row)");
      detail::linear_portable(x, m, k, reinterpret_cast<const f8e4m3*>(w_rows.data()), n_rows, b_rows, out, ldy,
                              w_rows.scales(), w_rows.scale_count());
      break;
  }
}

// y[m, N] = x[m, k] · W[N, k]ᵀ + b (b may be an empty view). W may have any rank with N = dims[0]
// (Conv3d weights [D, C, pt, ph, pw] are a [D, C*pt*ph*pw] matrix).
inline void linear(const float* x, std::size_t m, std::size_t k, const tensor_view& w, const tensor_view& b, float* y,
                   gemm_path path = gemm_path::portable) {
  const std::size_t n = w.dims().rank() == 0 ? 0 : static_cast<std::size_t>(w.dims()[0]);
  linear_rows(x, m, k, w, b, 0, y, n, path);
}

// ---- fp8 activations (the official per-tensor path) -------------------------------------------
// The CUDA backend's `--fp8-activations tensor` (ops/cuda_ops.cuh) quantizes a GEMM's input to e4m3
// with one scale per tensor and multiplies codes by codes on fp8 tensor cores. These are the same
// computation on the host, for checking the device against (tests/gpu/test_s2v_ops.cu) and for
// tests/test_fp8_weights.cpp; the host backends run weight-only fp8 (linear_rows above) and refuse
// the option (docs/design.md, fp8 weights, says why). They allocate: a reference, not a forward.

// x[n] to e4m3 codes with one scale for the whole tensor (kernels/thread/fp8_activation.hpp):
// returns the scale; value(codes[i]) * scale approximates x[i].
inline float quantize_activations_per_tensor(const float* x, std::size_t n, f8e4m3* codes) {
  std::uint32_t amax = 0;
  for (std::size_t i = 0; i < n; ++i) amax = std::max(amax, fp8_abs_bits(x[i]));
  const float scale = fp8_activation_scale(amax);
  for (std::size_t i = 0; i < n; ++i) codes[i] = f8e4m3{fp8_activation_code(x[i], scale)};
  return scale;
}

// Output columns [n0, n0 + R) of y[m, ldy] with x[m, k] quantized per tensor (its scale s_x) and
// w_rows an f8e4m3 weight's rows with their scales s_w (1, or one per row):
//   y[i, n0 + j] = (Σ_k value(xc[i, k]) · value(wc[j, k])) · s_x · s_w[j] + b[j],
// the code products exact in f32 and summed in the portable order (detail::linear_portable), the
// scales applied to the sum in that order (as the device: cuBLASLt's B scale, then the column scale
// of our epilogue). x is quantized whole, as the device quantizes a GEMM's whole input once for all
// its row chunks.
inline void linear_rows_fp8_activations(const float* x, std::size_t m, std::size_t k, const tensor_view& w_rows,
                                        const tensor_view& b_rows, std::size_t n0, float* y, std::size_t ldy) {
  const shape& wd = w_rows.dims();
  const std::size_t n_rows = wd.rank() == 0 ? 0 : static_cast<std::size_t>(wd[0]);
  if (w_rows.type() != dtype::f8e4m3 || !w_rows.has_scales() || wd.rank() != 2 ||
      static_cast<std::size_t>(wd[1]) != k || (w_rows.scale_count() != 1 && w_rows.scale_count() != n_rows))
    throw_error("linear (fp8 activations): the weight of shape ", wd.to_string(), " must be f8e4m3 [N, ", k,
                "] with 1 or N scales (it is ", name_of(w_rows.type()), " with ", w_rows.scale_count(), " scales)");
  if (!b_rows.empty() && (b_rows.type() == dtype::f8e4m3 || static_cast<std::size_t>(b_rows.numel()) != n_rows))
    throw_error("linear (fp8 activations): bias of shape ", b_rows.dims().to_string(), " (", name_of(b_rows.type()),
                ") does not fit the ", n_rows, " weight rows");
  if (n0 + n_rows > ldy)
    throw_error("linear: output columns [", n0, ", ", n0 + n_rows, ") exceed the leading dimension ", ldy);
  if (m == 0 || n_rows == 0) return;
  std::vector<f8e4m3> xc(m * k);
  const float sx = quantize_activations_per_tensor(x, m * k, xc.data());
  std::vector<float> xv(m * k);
  const float* value = detail::e4m3_value_table();
  for (std::size_t i = 0; i < xv.size(); ++i) xv[i] = value[xc[i].bits];
  const float one = 1.0f;
  float* out = y + n0;
  detail::linear_portable(xv.data(), m, k, reinterpret_cast<const f8e4m3*>(w_rows.data()), n_rows, tensor_view{}, out,
                          ldy, &one, 1);
  const float* sw = w_rows.scales();
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n_rows; ++j) {
      float& v = out[i * ldy + j];
      v = v * sx * sw[w_rows.scale_count() == 1 ? 0 : j] + (b_rows.empty() ? 0.0f : b_rows.load(j));
    }
}

}  // namespace unshard
