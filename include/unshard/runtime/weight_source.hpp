#pragma once
#include <algorithm>
#include <atomic>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "unshard/core/dtype.hpp"
#include "unshard/core/flat_layout.hpp"
#include "unshard/core/shape.hpp"
#include "unshard/layer/param_spec.hpp"

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

namespace detail {
// Elements [first, first+count) of parameter p, converted to p's storage dtype, into dst.
template <weight_source S>
void load_elements(const S& src, const param_spec& p, std::size_t first, std::size_t count, std::byte* dst) {
  const stored_tensor st = src.describe(p.name);
  if (!(st.dims == p.dims))
    throw_error(src.origin(), ": tensor '", p.name, "' has shape ", st.dims.to_string(), ", the model expects ",
                p.dims.to_string());
  if (st.type == p.type) {
    src.read(p.name, first * size_of(p.type), {dst, count * size_of(p.type)});
    return;
  }
  // f8e4m3 codes mean nothing without their scales, and quantizing needs a whole row (per-channel
  // scales) or tensor (per-tensor): neither fits an element-wise conversion of a shard's range.
  if (st.type == dtype::f8e4m3 || p.type == dtype::f8e4m3)
    throw_error(src.origin(), ": tensor '", p.name, "' is stored as ", name_of(st.type), ", the model expects ",
                name_of(p.type), ": converting to or from f8e4m3 weights is not supported by the loader yet");
  // Convert through f32 in bounded pieces (load time only; never on the forward path).
  constexpr std::size_t piece = 16384;
  std::vector<std::byte> tmp(piece * size_of(st.type));
  for (std::size_t done = 0; done < count; done += piece) {
    const std::size_t n = std::min(piece, count - done);
    src.read(p.name, (first + done) * size_of(st.type), {tmp.data(), n * size_of(st.type)});
    for (std::size_t i = 0; i < n; ++i) store_from_float(dst, p.type, done + i, load_as_float(tmp.data(), st.type, i));
  }
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

}  // namespace unshard
