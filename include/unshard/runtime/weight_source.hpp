#pragma once
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <concepts>
#include <cstddef>
#include <map>
#include <mutex>
#include <optional>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "unshard/core/dtype.hpp"
#include "unshard/core/flat_layout.hpp"
#include "unshard/core/shape.hpp"
#include "unshard/layer/param_spec.hpp"
#include "unshard/quant/fp8.hpp"

namespace unshard {

// Weight bytes loaded so far in this process, by every rank together: a tool shows progress from it
// while a large checkpoint loads (the count only grows; relaxed atomics cost nothing next to a read).
struct load_progress {
  static std::atomic<std::uint64_t>& counter() noexcept {
    static std::atomic<std::uint64_t> bytes{0};
    return bytes;
  }
  static void add(std::uint64_t bytes) noexcept { counter().fetch_add(bytes, std::memory_order_relaxed); }
  static std::uint64_t bytes() noexcept { return counter().load(std::memory_order_relaxed); }
};

// How a stored tensor looks: what the loader checks a declared parameter against.
struct stored_tensor {
  dtype type = dtype::f32;
  shape dims;
};

// Where weights come from: a checkpoint, or a generator in tests. `read` copies a byte range of
// one stored tensor, so a rank reads only the bytes of its own shard.
template <class S>
concept weight_source = requires(const S& s, std::string_view name, std::uint64_t offset, std::span<std::byte> dst) {
  { s.describe(name) } -> std::convertible_to<stored_tensor>;  // throws, naming the tensor, if absent
  s.read(name, offset, dst);
  { s.origin() } -> std::convertible_to<std::string>;          // a file path or a description, for errors
};

// An fp8 checkpoint's scales of its f8e4m3 weight `name` with `rows` output rows: the tensor
// "<name>.scale" or "<name>_scale" (so "x.weight_scale"), F32/BF16/F16, of 1 element (per tensor)
// or `rows` (per output row), each positive and finite; an error naming the tensor otherwise.
struct fp8_stored_scales {
  std::string tensor;         // which of the two names holds them
  std::vector<float> values;  // 1 or `rows`
};

template <weight_source S>
fp8_stored_scales read_fp8_scales(const S& src, const std::string& name, std::size_t rows) {
  std::optional<std::string> found;
  stored_tensor st;
  for (const std::string& candidate : {name + ".scale", name + "_scale"}) {
    try {
      st = src.describe(candidate);
    } catch (const error&) {
      continue;
    }
    found = candidate;
    break;
  }
  if (!found)
    throw_error(src.origin(), ": tensor '", name, "' is f8e4m3 but has no scale tensor ('", name, ".scale' or '", name,
                "_scale'); f8e4m3 codes mean nothing without their scales");
  const auto count = static_cast<std::size_t>(st.dims.numel());
  if (st.type == dtype::f8e4m3 || (count != 1 && count != rows))
    throw_error(src.origin(), ": scale tensor '", *found, "' of f8e4m3 weight '", name, "' is ", name_of(st.type), " ",
                st.dims.to_string(), "; it must be F32, BF16 or F16 with 1 element (per tensor) or ", rows,
                " (one per output row)");
  std::vector<std::byte> raw(count * size_of(st.type));
  src.read(*found, 0, raw);
  fp8_stored_scales out{*found, std::vector<float>(count)};
  for (std::size_t i = 0; i < count; ++i) {
    out.values[i] = load_as_float(raw.data(), st.type, i);
    if (!(out.values[i] > 0.0f) || !std::isfinite(out.values[i]))
      throw_error(src.origin(), ": scale ", i, " of f8e4m3 weight '", name, "' ('", *found, "') is ", out.values[i],
                  "; a scale must be positive and finite");
  }
  return out;
}

namespace detail {
// Elements [first, first+count) of an f8e4m3 weight [rows, cols] of an fp8 checkpoint, dequantized
// with its stored scales (read_fp8_scales) and stored as p's dtype into dst; codes checked for the
// NaN code. In bounded pieces (load time only).
template <weight_source S>
void load_dequantized(const S& src, const param_spec& p, std::size_t first, std::size_t count, std::byte* dst) {
  if (p.dims.rank() != 2)
    throw_error(src.origin(), ": tensor '", p.name, "' is stored as f8e4m3 with shape ", p.dims.to_string(),
                "; only 2-D [out, in] weights are read from f8e4m3 codes");
  const auto cols = static_cast<std::size_t>(p.dims[1]);
  const std::vector<float> scales = read_fp8_scales(src, p.name, static_cast<std::size_t>(p.dims[0])).values;
  const std::array<float, 256>& value = quant::e4m3_values();
  constexpr std::size_t piece = 16384;
  std::vector<f8e4m3> codes(piece);
  for (std::size_t done = 0; done < count; done += piece) {
    const std::size_t n = std::min(piece, count - done);
    src.read(p.name, first + done, std::as_writable_bytes(std::span(codes.data(), n)));
    quant::check_codes(p.name, codes.data(), first + done, n, cols);
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t e = first + done + i;
      store_from_float(dst, p.type, done + i, value[codes[i].bits] * scales[scales.size() == 1 ? 0 : e / cols]);
    }
  }
}

// A checkpoint's weights must be finite: a NaN or Inf would turn every output it reaches into NaN,
// a wrong answer without an error. Named by tensor, element (row and column of a 2-D weight) and
// the byte offset of the stored element; `stored` is the checkpoint's dtype (after a conversion to
// a narrower one, a finite value beyond its range is named as such).
template <weight_source S>
void require_finite(const S& src, const param_spec& p, dtype stored, std::size_t first, std::size_t count,
                    const std::byte* dst) {
  const std::size_t i = first_non_finite(dst, p.type, count);
  if (i == count) return;
  const std::size_t e = first + i;
  const float v = load_as_float(dst, p.type, i);
  std::string where = "element " + std::to_string(e);
  if (p.dims.rank() == 2) {
    const auto cols = static_cast<std::size_t>(p.dims[1]);
    where += " (row " + std::to_string(e / cols) + ", column " + std::to_string(e % cols) + ")";
  }
  const std::string what = std::isnan(v) ? "NaN" : (v > 0 ? "+Inf" : "-Inf");
  if (stored != p.type && stored != dtype::f8e4m3) {
    const float original = [&] {
      std::array<std::byte, 4> b{};
      src.read(p.name, e * size_of(stored), {b.data(), size_of(stored)});
      return load_as_float(b.data(), stored, 0);
    }();
    if (std::isfinite(original))
      throw_error(src.origin(), ": tensor '", p.name, "' ", where, " = ", original, " is beyond the range of ",
                  name_of(p.type), " (stored as ", name_of(stored), "; it becomes ", what, ")");
  }
  throw_error(src.origin(), ": tensor '", p.name, "' has ", what, " at ", where, ", byte offset ", e * size_of(stored),
              " of the tensor's data (a checkpoint's weights must be finite)");
}

// Elements [first, first+count) of parameter p, converted to p's storage dtype, into dst; every
// one checked finite (require_finite).
template <weight_source S>
void load_elements(const S& src, const param_spec& p, std::size_t first, std::size_t count, std::byte* dst) {
  const stored_tensor st = src.describe(p.name);
  if (!(st.dims == p.dims))
    throw_error(src.origin(), ": tensor '", p.name, "' has shape ", st.dims.to_string(), ", the model expects ",
                p.dims.to_string());
  if (st.type == p.type) {
    src.read(p.name, first * size_of(p.type), {dst, count * size_of(p.type)});
    require_finite(src, p, st.type, first, count, dst);
    return;
  }
  // An fp8 checkpoint's weight under a policy without fp8: dequantized with its stored scales
  // (code x scale, in f32, as the fp8 GEMM would), then stored as the model's dtype.
  if (st.type == dtype::f8e4m3) return load_dequantized(src, p, first, count, dst);
  // Quantizing needs a whole row (per-channel scales) or tensor (per-tensor): it does not fit an
  // element-wise conversion of a shard's range. The fp8 policy quantizes through fp8_weight_source
  // (below), which hands the loader codes as codes.
  if (p.type == dtype::f8e4m3)
    throw_error(src.origin(), ": tensor '", p.name, "' is stored as ", name_of(st.type),
                ", the model expects f8e4m3: converting to f8e4m3 element by element is not supported by the loader "
                "yet (quantizing needs whole rows; the fp8 policy term quantizes 2-D GEMM weights at load)");
  // Convert through f32 in bounded pieces (load time only; never on the forward path).
  constexpr std::size_t piece = 16384;
  std::vector<std::byte> tmp(piece * size_of(st.type));
  for (std::size_t done = 0; done < count; done += piece) {
    const std::size_t n = std::min(piece, count - done);
    src.read(p.name, (first + done) * size_of(st.type), {tmp.data(), n * size_of(st.type)});
    for (std::size_t i = 0; i < n; ++i) store_from_float(dst, p.type, done + i, load_as_float(tmp.data(), st.type, i));
  }
  require_finite(src, p, st.type, first, count, dst);
}
}  // namespace detail

// Fills one rank's shard of a flat layout: only the parameter bytes inside [begin, end) of the
// flat buffer are read; padding stays zero.
template <weight_source S>
void load_shard(const S& src, const flat_layout& layout, std::span<const param_spec> params, std::size_t rank,
                std::byte* shard) {
  const auto [begin, end] = layout.shard_range(rank);
  std::fill(shard, shard + (end - begin), std::byte{0});
  for (std::size_t i = 0; i < layout.size(); ++i) {
    const flat_entry& e = layout.entry(i);
    const std::size_t lo = std::max(begin, e.offset), hi = std::min(end, e.offset + e.bytes);
    if (lo >= hi) continue;
    const std::size_t es = size_of(params[i].type);
    detail::load_elements(src, params[i], (lo - e.offset) / es, (hi - lo) / es, shard + (lo - begin));
    load_progress::add(hi - lo);
  }
}

// The fp8 policy's view of a weight source: the weights registered with add() (the quantized GEMM
// weights of the unit layouts, plan/unit_layout.hpp) are described as f8e4m3 and read as codes, and
// each one's scales as the f32 tensor "<weight>.scale" ([1] per tensor, [rows] per channel); every
// other tensor passes through. The loader (load_shard) then reads codes and scales like any tensor.
//
//  * From an f32, bf16 or f16 source (a LoRA-merged one included: the merge is what the source
//    reads, so it happens before quantizing), the scales come from the whole weight, whatever range
//    a shard asks for: amax per row (or of the tensor) / 448 (quant::scale_for_amax). A rank's shard
//    may start mid-row, and scales are resident on every rank, so each rank reads every row of every
//    quantized weight once for them (load time only), then quantizes only its own range. A NaN/Inf
//    element, or one beyond e4m3's range after scaling, is an error naming the tensor and element.
//  * From an fp8 checkpoint (an F8_E4M3 weight), codes are read as stored and checked for the NaN
//    code (quant::check_codes); its scale tensor is "<weight>.scale" or "<weight>_scale" (so
//    "x.weight_scale"), of 1 element or one per row, F32/BF16/F16, each positive and finite. A
//    per-tensor scale serves a per-channel policy exactly (every row gets it); per-channel scales
//    under fp8:tensor are refused, naming the tensor (requantizing would round twice).
// Scales are computed once per weight and kept (a few bytes per output row).
template <weight_source Base>
class fp8_weight_source {
 public:
  fp8_weight_source(const Base& base, quant::fp8_scaling scaling) : base_(base), scaling_(scaling) {}

  // Registers a weight to quantize: its declared [rows, cols] and its scale parameter's name.
  void add(const std::string& name, const shape& dims, const std::string& scale_name) {
    if (dims.rank() != 2 || dims[0] <= 0 || dims[1] <= 0)
      throw_error("fp8: tensor '", name, "' has shape ", dims.to_string(), "; only 2-D [out, in] weights are quantized");
    weights_.insert_or_assign(name, entry{static_cast<std::size_t>(dims[0]), static_cast<std::size_t>(dims[1])});
    scale_names_.insert_or_assign(scale_name, name);
  }
  bool quantizes(std::string_view name) const { return weights_.find(name) != weights_.end(); }
  quant::fp8_scaling scaling() const noexcept { return scaling_; }

  stored_tensor describe(std::string_view name) const {
    if (const auto s = scale_names_.find(name); s != scale_names_.end()) {
      const entry& w = weights_.at(s->second);
      return {dtype::f32, shape{static_cast<std::int64_t>(quant::scale_count(scaling_, w.rows))}};
    }
    const stored_tensor st = base_.describe(name);
    if (!quantizes(name)) return st;
    if (st.type == dtype::f8e4m3 || st.type == dtype::f32 || st.type == dtype::bf16 || st.type == dtype::f16)
      return {dtype::f8e4m3, st.dims};
    return st;
  }

  void read(std::string_view name, std::uint64_t offset, std::span<std::byte> dst) const {
    if (const auto s = scale_names_.find(name); s != scale_names_.end()) {
      const std::vector<float>& sc = scales_of(s->second, weights_.at(s->second));
      const std::size_t bytes = sc.size() * sizeof(float);
      if (offset > bytes || dst.size() > bytes - offset)
        throw_error(origin(), ": read of fp8 scales '", name, "' at byte offset ", offset, " (", dst.size(),
                    " bytes) runs past their ", bytes, " bytes");
      std::memcpy(dst.data(), reinterpret_cast<const std::byte*>(sc.data()) + offset, dst.size());
      return;
    }
    const auto it = weights_.find(name);
    if (it == weights_.end()) return base_.read(name, offset, dst);
    const entry& w = it->second;
    const std::string n(name);
    if (offset > w.rows * w.cols || dst.size() > w.rows * w.cols - offset)
      throw_error(origin(), ": read of fp8 codes of '", name, "' at element ", offset, " (", dst.size(),
                  " elements) runs past its ", w.rows * w.cols, " elements");
    const stored_tensor st = base_.describe(name);
    auto* codes = reinterpret_cast<f8e4m3*>(dst.data());
    if (st.type == dtype::f8e4m3) {
      base_.read(name, offset, dst);
      quant::check_codes(n, codes, offset, dst.size(), w.cols);
      return;
    }
    const std::vector<float>& sc = scales_of(n, w);
    visit_source_type(n, st.type, [&](auto tag) {
      using T = decltype(tag);
      constexpr std::size_t piece = 16384;
      std::vector<T> values(std::min(piece, dst.size()));
      for (std::size_t done = 0; done < dst.size(); done += piece) {
        const std::size_t k = std::min(piece, dst.size() - done);
        base_.read(name, (offset + done) * sizeof(T), std::as_writable_bytes(std::span(values.data(), k)));
        quant::quantize_range(n, values.data(), offset + done, k, w.rows, w.cols, scaling_, sc, codes + done);
      }
    });
  }

  std::string origin() const { return base_.origin(); }

  // The scales of a registered weight (computed, or read from an fp8 checkpoint, at first use).
  const std::vector<float>& scales(std::string_view name) const {
    const auto it = weights_.find(name);
    if (it == weights_.end()) throw_error("fp8: '", name, "' is not a weight this source quantizes");
    return scales_of(std::string(name), it->second);
  }

 private:
  struct entry {
    std::size_t rows = 0, cols = 0;
  };

  template <class F>
  static void visit_source_type(const std::string& name, dtype t, F&& f) {
    switch (t) {
      case dtype::f32: return f(float{});
      case dtype::bf16: return f(bf16{});
      case dtype::f16: return f(f16{});
      case dtype::f8e4m3: break;
    }
    throw_error("fp8: tensor '", name, "' is ", name_of(t), "; weights are quantized from f32, bf16 or f16");
  }

  const std::vector<float>& scales_of(const std::string& name, const entry& w) const {
    {
      std::lock_guard lock(mutex_);
      if (const auto it = scales_.find(name); it != scales_.end()) return it->second;
    }
    std::vector<float> sc = compute(name, w);
    std::lock_guard lock(mutex_);
    return scales_.try_emplace(name, std::move(sc)).first->second;  // std::map: references stay valid
  }

  std::vector<float> compute(const std::string& name, const entry& w) const {
    const stored_tensor st = base_.describe(name);
    if (!(st.dims == shape{static_cast<std::int64_t>(w.rows), static_cast<std::int64_t>(w.cols)}))
      throw_error(origin(), ": tensor '", name, "' has shape ", st.dims.to_string(), ", the model expects [", w.rows,
                  ",", w.cols, "]");
    if (st.type == dtype::f8e4m3) return stored_scales(name, w);
    std::vector<float> amax(w.rows);
    visit_source_type(name, st.type, [&](auto tag) {
      using T = decltype(tag);
      const std::size_t rows_per = std::max<std::size_t>(1, (std::size_t{1} << 18) / w.cols);
      std::vector<T> values(std::min(rows_per, w.rows) * w.cols);
      for (std::size_t r0 = 0; r0 < w.rows; r0 += rows_per) {
        const std::size_t r1 = std::min(w.rows, r0 + rows_per);
        base_.read(name, r0 * w.cols * sizeof(T), std::as_writable_bytes(std::span(values.data(), (r1 - r0) * w.cols)));
        quant::row_amax(name, values.data(), r0, r1, w.cols, amax.data() + r0);
      }
    });
    if (scaling_ == quant::fp8_scaling::per_tensor) {
      float m = 0.0f;
      for (const float a : amax) m = std::max(m, a);
      return {quant::scale_for_amax(m)};
    }
    std::vector<float> sc(w.rows);
    for (std::size_t r = 0; r < w.rows; ++r) sc[r] = quant::scale_for_amax(amax[r]);
    return sc;
  }

  // An fp8 checkpoint's scales for `name` (read_fp8_scales), as this policy keeps them.
  std::vector<float> stored_scales(const std::string& name, const entry& w) const {
    fp8_stored_scales stored = read_fp8_scales(base_, name, w.rows);
    std::vector<float>& sc = stored.values;
    if (sc.size() != 1 && scaling_ == quant::fp8_scaling::per_tensor)
      throw_error(origin(), ": f8e4m3 weight '", name, "' has one scale per output row ('", stored.tensor,
                  "'); the policy's fp8:tensor keeps one scale per tensor: use fp8 (per channel) for this checkpoint");
    if (sc.size() == 1 && scaling_ == quant::fp8_scaling::per_channel) sc.assign(w.rows, sc[0]);  // exact
    return sc;
  }

  const Base& base_;
  quant::fp8_scaling scaling_;
  std::map<std::string, entry, std::less<>> weights_;
  std::map<std::string, std::string, std::less<>> scale_names_;  // scale parameter -> its weight
  mutable std::mutex mutex_;
  mutable std::map<std::string, std::vector<float>, std::less<>> scales_;
};

template <class S>
inline constexpr bool is_fp8_weight_source = false;
template <class Base>
inline constexpr bool is_fp8_weight_source<fp8_weight_source<Base>> = true;

}  // namespace unshard
