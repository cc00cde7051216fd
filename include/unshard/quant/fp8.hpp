#pragma once
// FP8 weights: OCP E4M3 codes ("FN": bias 7, largest finite 448, no infinities) plus f32 scales,
// value = code * scale. The codec of issue 15's `fp8` policy: the loader quantizes each weight as
// it loads it, gathers and offloads move the 1-byte codes (half of bf16's bytes), and a GEMM
// dequantizes (host: per chunk of rows, dequantize_rows) or feeds codes and scales to an fp8 GEMM.
//
// What is quantized: 2-D [out, in] weights only, rows = output channels. 1-D parameters (biases,
// norm weights) are never quantized: they are a negligible share of the bytes,
// and a bias or a norm scale is added or multiplied into every output, so its error would not
// average out the way a GEMM's does. The caller keeps them bf16/f32; quantize() rejects a rank
// other than 2, naming the tensor, so a 1-D (or a Conv3d [D, C, t, h, w]) parameter cannot slip in.
//
// Scales: scale = amax / 448, so the largest magnitude maps onto e4m3's largest value, with
//  * per_tensor  -- one scale for the whole weight, as Live Avatar's official --fp8
//                   (liveavatar/utils/fp8_linear.py), or
//  * per_channel -- one scale per output row: our default, for lower error on rows with small
//                   ranges. e4m3 spans only 2^-9..448 (about 18 binades, the lowest 3 of them
//                   subnormal with a fixed step of 2^-9 * scale), so under one tensor-wide scale a row
//                   whose values are ~2^-15 of the tensor's amax or less is quantized in those coarse
//                   subnormal steps, and one below about 2^-19 of it becomes all zeros; with its own scale
//                   every row keeps e4m3's 4 significant bits at its own range (test_fp8 measures a
//                   row of range 2^-16: ~9% RMS error per tensor, ~1.5% per channel). It costs
//                   nothing in the GEMM: y[:, n] = scale[n] * (x . code[n]), the scale of output
//                   column n factors out of the sum, so it is an epilogue (a column scale), not a
//                   per-element multiply.
// amax == 0 (an all-zero row or tensor) gives scale 1. A scale is never below FLT_MIN: a subnormal
// scale would lose precision, make x / scale overflow spuriously, and be flushed to 0 by GPU
// code that runs with flush-to-zero.
//
// Note on the official code: its quant_fp8 multiplies by min(448 / amax, 448), so its scale is
// max(amax, 1) / 448 -- for a weight with amax < 1 (most of them) a fixed 1/448, using less of the
// e4m3 range than amax / 448 does. official_scale_for_amax() gives that scale for a policy that
// wants to mirror it; the official code also rounds weights * multiplier in bf16 first, which we
// do not reproduce (x / scale is computed in f32 from the exact input value).
//
// Errors, never a silent clamp: a NaN or Inf input, or a value that is beyond 448 after scaling and
// rounding (|x / scale| > 464), throws unshard::error naming the tensor, the flat element index,
// its row and column, the value and the scale.
#include <algorithm>
#include <array>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

#include "unshard/core/dtype.hpp"
#include "unshard/core/error.hpp"
#include "unshard/core/shape.hpp"
#include "unshard/core/tensor_view.hpp"
#include "unshard/quant/fp8_scaling.hpp"

namespace unshard::quant {

// fp8_scaling, name_of(fp8_scaling) and scale_count(): quant/fp8_scaling.hpp.

// The scale for a row or tensor whose largest magnitude is amax (finite, >= 0): amax / 448, 1 for
// amax == 0, never below FLT_MIN (see the header comment).
inline float scale_for_amax(float amax) noexcept {
  if (!(amax > 0.0f)) return 1.0f;
  return std::max(amax / e4m3_max, std::numeric_limits<float>::min());
}

// The per-tensor scale Live Avatar's official fp8_linear.py arrives at: max(amax, 1) / 448.
inline float official_scale_for_amax(float amax) noexcept { return std::max(amax, 1.0f) / e4m3_max; }

// The value of every e4m3 code (NaN for 0x7f and 0xff): the host dequantizer's lookup table.
inline const std::array<float, 256>& e4m3_values() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (unsigned c = 0; c < 256; ++c) t[c] = e4m3_bits_to_float(static_cast<std::uint8_t>(c));
    return t;
  }();
  return table;
}

// The element types a weight is quantized from.
template <class T>
concept fp8_source = std::same_as<T, float> || std::same_as<T, bf16> || std::same_as<T, f16>;

namespace detail {

inline float widen(float v) noexcept { return v; }
inline float widen(bf16 v) noexcept { return v.to_float(); }
inline float widen(f16 v) noexcept { return v.to_float(); }

[[noreturn]] inline void not_finite(std::string_view name, std::size_t index, std::size_t cols, float v) {
  throw_error("fp8: tensor '", name, "': element ", index, " (row ", index / cols, ", column ", index % cols, ") is ", v,
              "; a weight with NaN or Inf cannot be quantized to f8e4m3");
}

// Scale s for row r of a weight with `rows` rows: checked against the count and for being positive
// and finite (scales can come from a checkpoint).
inline float scale_of(std::string_view name, fp8_scaling scaling, std::span<const float> scales, std::size_t r) {
  const std::size_t i = scaling == fp8_scaling::per_tensor ? 0 : r;
  if (i >= scales.size())
    throw_error("fp8: tensor '", name, "': no ", name_of(scaling), " scale for row ", r, " (", scales.size(),
                " scales given)");
  const float s = scales[i];
  if (!(s > 0.0f) || !std::isfinite(s))
    throw_error("fp8: tensor '", name, "': scale ", i, " is ", s, "; a scale must be positive and finite");
  return s;
}

inline void check_scale_count(std::string_view name, fp8_scaling scaling, std::size_t rows, std::size_t given) {
  if (given != scale_count(scaling, rows))
    throw_error("fp8: tensor '", name, "' with ", rows, " rows has ", given, " scales; ", name_of(scaling),
                " scaling needs ", scale_count(scaling, rows));
}

}  // namespace detail

// Largest magnitude of each of rows [r0, r1) of a row-major [rows, cols] weight into amax[0 .. r1-r0);
// src points at row r0's first element. NaN or Inf throws, naming the tensor and the element's flat
// index in the whole weight. The loader can feed a weight through this in pieces of whole rows.
template <fp8_source T>
void row_amax(std::string_view name, const T* src, std::size_t r0, std::size_t r1, std::size_t cols, float* amax) {
  for (std::size_t r = r0; r < r1; ++r) {
    const T* row = src + (r - r0) * cols;
    float m = 0.0f;
    for (std::size_t c = 0; c < cols; ++c) {
      const float v = detail::widen(row[c]);
      if (!std::isfinite(v)) detail::not_finite(name, r * cols + c, cols, v);
      m = std::max(m, std::fabs(v));
    }
    amax[r - r0] = m;
  }
}

// The scales of a whole [rows, cols] weight: 1 (per tensor) or `rows` (per channel).
template <fp8_source T>
std::vector<float> compute_scales(std::string_view name, const T* src, std::size_t rows, std::size_t cols,
                                  fp8_scaling scaling) {
  std::vector<float> amax(rows);
  row_amax(name, src, 0, rows, cols, amax.data());
  if (scaling == fp8_scaling::per_tensor) {
    float m = 0.0f;
    for (const float a : amax) m = std::max(m, a);
    return {scale_for_amax(m)};
  }
  std::vector<float> scales(rows);
  for (std::size_t r = 0; r < rows; ++r) scales[r] = scale_for_amax(amax[r]);
  return scales;
}

// Quantizes elements [first, first + count) of a row-major [rows, cols] weight with the given scales
// (1, or one per row) into dst. src and dst point at element `first`: a shard's range of a weight,
// which may start and end mid-row. code = RNE(x / scale); NaN/Inf input or |x / scale| > 464 throws,
// naming the tensor and the element (its flat index in the whole weight).
template <fp8_source T>
void quantize_range(std::string_view name, const T* src, std::size_t first, std::size_t count, std::size_t rows,
                    std::size_t cols, fp8_scaling scaling, std::span<const float> scales, f8e4m3* dst) {
  detail::check_scale_count(name, scaling, rows, scales.size());
  if (first > rows * cols || count > rows * cols - first)
    throw_error("fp8: tensor '", name, "': elements [", first, ", ", first + count, ") are outside its ", rows, "x",
                cols, " elements");
  std::size_t i = 0;
  while (i < count) {
    const std::size_t index = first + i, r = index / cols;
    const std::size_t run = std::min(count - i, (r + 1) * cols - index);  // to the end of row r
    const float s = detail::scale_of(name, scaling, scales, r);
    for (std::size_t j = i; j < i + run; ++j) {
      const float v = detail::widen(src[j]);
      if (!std::isfinite(v)) detail::not_finite(name, first + j, cols, v);
      const float q = v / s;
      const e4m3_conversion c = float_to_e4m3(q);
      if (c.status != e4m3_status::ok)
        throw_error("fp8: tensor '", name, "': element ", first + j, " (row ", r, ", column ", (first + j) % cols,
                    ") is ", v, "; divided by its scale ", s, " it is ", q,
                    ", beyond f8e4m3's largest value 448 after rounding (it overflows above 464)");
      dst[j] = f8e4m3{c.bits};
    }
    i += run;
  }
}

// A quantized weight, owned: codes row-major [rows, cols], scales 1 or `rows`.
struct fp8_weight {
  std::vector<f8e4m3> codes;
  std::vector<float> scales;
  std::size_t rows = 0, cols = 0;
  fp8_scaling scaling = fp8_scaling::per_channel;

  float row_scale(std::size_t r) const noexcept { return scales[scaling == fp8_scaling::per_tensor ? 0 : r]; }
};

// Quantizes a whole 2-D [out, in] weight. Any other rank throws: 1-D parameters stay bf16/f32 by
// policy (see the header comment), and higher ranks are not GEMM weights this codec handles.
template <fp8_source T>
fp8_weight quantize(std::string_view name, const T* src, const shape& dims,
                    fp8_scaling scaling = fp8_scaling::per_channel) {
  if (dims.rank() != 2)
    throw_error("fp8: tensor '", name, "' has shape ", dims.to_string(), " (rank ", dims.rank(),
                "); only 2-D [out, in] weights are quantized to f8e4m3, 1-D parameters (biases, norms) stay bf16/f32");
  if (dims[0] < 0 || dims[1] < 0) throw_error("fp8: tensor '", name, "' has invalid shape ", dims.to_string());
  fp8_weight w;
  w.rows = static_cast<std::size_t>(dims[0]);
  w.cols = static_cast<std::size_t>(dims[1]);
  w.scaling = scaling;
  w.scales = compute_scales(name, src, w.rows, w.cols, scaling);
  w.codes.resize(w.rows * w.cols);
  quantize_range(name, src, 0, w.codes.size(), w.rows, w.cols, scaling, w.scales, w.codes.data());
  return w;
}

template <fp8_source T>
fp8_weight quantize(std::string_view name, std::span<const T> src, const shape& dims,
                    fp8_scaling scaling = fp8_scaling::per_channel) {
  if (dims.rank() == 2 && dims[0] >= 0 && dims[1] >= 0 && src.size() != static_cast<std::size_t>(dims.numel()))
    throw_error("fp8: tensor '", name, "' has shape ", dims.to_string(), " but ", src.size(), " values");
  return quantize(name, src.data(), dims, scaling);
}

// A view of f32, bf16 or f16 storage; an f8e4m3 view throws (it is quantized already).
inline fp8_weight quantize(std::string_view name, const tensor_view& w, fp8_scaling scaling = fp8_scaling::per_channel) {
  switch (w.type()) {
    case dtype::f32: return quantize(name, reinterpret_cast<const float*>(w.data()), w.dims(), scaling);
    case dtype::bf16: return quantize(name, reinterpret_cast<const bf16*>(w.data()), w.dims(), scaling);
    case dtype::f16: return quantize(name, reinterpret_cast<const f16*>(w.data()), w.dims(), scaling);
    case dtype::f8e4m3: break;
  }
  throw_error("fp8: tensor '", name, "' is f8e4m3 already; quantize takes f32, bf16 or f16 weights");
}

// Throws, naming the tensor and the element, if elements [first, first + count) of a [*, cols]
// weight hold a NaN code: for codes read straight from an fp8 checkpoint (ours never hold one).
// `codes` points at element `first`.
inline void check_codes(std::string_view name, const f8e4m3* codes, std::size_t first, std::size_t count,
                        std::size_t cols) {
  if (count != 0 && cols == 0) throw_error("fp8: tensor '", name, "': ", count, " codes in rows of 0 columns");
  for (std::size_t i = 0; i < count; ++i)
    if ((codes[i].bits & 0x7fu) == 0x7fu)
      throw_error("fp8: tensor '", name, "': element ", first + i, " (row ", (first + i) / cols, ", column ",
                  (first + i) % cols, ") is the f8e4m3 NaN code 0x", "0123456789abcdef"[codes[i].bits >> 4],
                  "0123456789abcdef"[codes[i].bits & 0xfu]);
}

// Rows [r0, r1) of a quantized [rows, cols] weight as f32 into out[(r1 - r0) * cols]: what the host
// GEMM runs on, one chunk of rows at a time. `codes` points at row r0's first code (a chunk buffer
// holds only its own rows); `scales` are the whole weight's (1, or one per row, indexed by r).
// No NaN check here (the hot path): codes are checked when they are made or loaded.
inline void dequantize_rows(const f8e4m3* codes, std::size_t r0, std::size_t r1, std::size_t cols, fp8_scaling scaling,
                            std::span<const float> scales, float* out) {
  if (r1 < r0) throw_error("fp8: dequantize_rows: rows [", r0, ", ", r1, ") are reversed");
  if (scaling == fp8_scaling::per_tensor ? scales.size() != 1 : scales.size() < r1)
    throw_error("fp8: dequantize_rows: rows [", r0, ", ", r1, ") need ", scaling == fp8_scaling::per_tensor ? 1 : r1,
                " ", name_of(scaling), " scales, got ", scales.size());
  const std::array<float, 256>& value = e4m3_values();
  for (std::size_t r = r0; r < r1; ++r) {
    const float s = scales[scaling == fp8_scaling::per_tensor ? 0 : r];
    const f8e4m3* in = codes + (r - r0) * cols;
    float* o = out + (r - r0) * cols;
    for (std::size_t c = 0; c < cols; ++c) o[c] = value[in[c].bits] * s;
  }
}

// The whole weight as f32.
inline std::vector<float> dequantize(const fp8_weight& w) {
  std::vector<float> out(w.rows * w.cols);
  dequantize_rows(w.codes.data(), 0, w.rows, w.cols, w.scaling, w.scales, out.data());
  return out;
}

}  // namespace unshard::quant
