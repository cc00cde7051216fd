#pragma once
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <type_traits>
#include <utility>

#include "unshard/core/dtype.hpp"
#include "unshard/core/shape.hpp"

namespace unshard {

// A non-owning, contiguous, row-major view: bytes + dtype + shape. Parameter views point into
// gathered flat buffers (zero copy); activation views into tracked arenas.
class tensor_view {
 public:
  tensor_view() = default;
  tensor_view(void* data, dtype t, const shape& s) : data_(static_cast<std::byte*>(data)), dtype_(t), shape_(s) {}

  std::byte* data() const noexcept { return data_; }
  dtype type() const noexcept { return dtype_; }
  const shape& dims() const noexcept { return shape_; }
  std::int64_t numel() const noexcept { return shape_.numel(); }
  std::size_t bytes() const noexcept { return static_cast<std::size_t>(numel()) * size_of(dtype_); }
  bool empty() const noexcept { return data_ == nullptr; }

  // An f8e4m3 weight's f32 scales travel with its codes (quant/fp8.hpp: value = code * scale): one
  // for every row (per tensor) or one per row (per output channel). Other views carry none.
  // with_scales returns a copy that carries them; the scales must outlive the view.
  tensor_view with_scales(const float* scales, std::size_t count) const {
    tensor_view v = *this;
    v.scales_ = scales;
    v.scale_count_ = count;
    return v;
  }
  const float* scales() const noexcept { return scales_; }
  std::size_t scale_count() const noexcept { return scale_count_; }
  bool has_scales() const noexcept { return scales_ != nullptr && scale_count_ != 0; }
  // The scales of rows [r0, r1) of this view: the same single scale, or those rows' own.
  std::pair<const float*, std::size_t> scales_of_rows(std::int64_t r0, std::int64_t r1) const noexcept {
    if (scale_count_ <= 1 || r0 < 0 || r1 < r0) return {scales_, scale_count_};
    return {scales_ + r0, static_cast<std::size_t>(r1 - r0)};
  }

  // Typed access; throws if the dtype differs (a bf16 weight read as float is a bug, not a cast).
  template <class T>
  std::span<T> as() const {
    if (dtype_of<std::remove_const_t<T>>::value != dtype_)
      throw_error("tensor_view: requested ", name_of(dtype_of<std::remove_const_t<T>>::value), " view of a ",
                  name_of(dtype_), " tensor ", shape_.to_string());
    return {reinterpret_cast<T*>(data_), static_cast<std::size_t>(numel())};
  }

  // Element i as f32. An f8e4m3 view holds codes: load() is the code's value, without the scale
  // that lives beside the codes (unshard/quant/fp8.hpp dequantizes with it).
  float load(std::size_t i) const { return load_as_float(data_, dtype_, i); }
  // Stores v rounded to the view's dtype. For f8e4m3, v is stored as a code as is (no scaling), and
  // NaN, Inf or |v| > 464 (beyond 448 after rounding) throw instead of storing a NaN code.
  void store(std::size_t i, float v) const {
    if (dtype_ == dtype::f8e4m3) {
      const e4m3_conversion c = float_to_e4m3(v);
      if (c.status != e4m3_status::ok)
        throw_error("tensor_view: element ", i, " of an f8e4m3 tensor ", shape_.to_string(), " cannot hold ", v,
                    c.status == e4m3_status::overflow ? " (beyond the largest e4m3 value 448 after rounding)"
                                                      : " (not finite: an error, not a NaN code)");
      data_[i] = static_cast<std::byte>(c.bits);
      return;
    }
    store_from_float(data_, dtype_, i, v);
  }

 private:
  std::byte* data_ = nullptr;
  dtype dtype_ = dtype::f32;
  shape shape_{};
  const float* scales_ = nullptr;
  std::size_t scale_count_ = 0;
};

}  // namespace unshard
