#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <ostream>
#include <span>
#include <string>

#include "unshard/core/error.hpp"

namespace unshard {

// A tensor shape of rank <= 6, stored inline so views never allocate.
class shape {
 public:
  static constexpr std::size_t max_rank = 6;

  constexpr shape() = default;
  shape(std::initializer_list<std::int64_t> dims) : shape(std::span<const std::int64_t>(dims.begin(), dims.size())) {}
  explicit shape(std::span<const std::int64_t> dims) {
    if (dims.size() > max_rank) throw_error("shape of rank ", dims.size(), " exceeds the maximum rank ", max_rank);
    rank_ = dims.size();
    for (std::size_t i = 0; i < rank_; ++i) dims_[i] = dims[i];
  }

  constexpr std::size_t rank() const noexcept { return rank_; }
  constexpr std::int64_t operator[](std::size_t i) const noexcept { return dims_[i]; }
  constexpr std::span<const std::int64_t> dims() const noexcept { return {dims_.data(), rank_}; }

  // The same shape with `rows` in dimension 0 (a run of a weight's rows). Rank >= 1.
  constexpr shape with_rows(std::int64_t rows) const noexcept {
    shape s = *this;
    s.dims_[0] = rows;
    return s;
  }

  // Number of elements (1 for rank 0). Unchecked: call validate() on untrusted shapes first.
  constexpr std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (std::size_t i = 0; i < rank_; ++i) n *= dims_[i];
    return n;
  }

  // Throws, naming `what`, if a dimension is zero or negative or if numel * elem_bytes overflows.
  void validate(const std::string& what, std::size_t elem_bytes = 1) const {
    std::uint64_t n = elem_bytes;
    for (std::size_t i = 0; i < rank_; ++i) {
      if (dims_[i] <= 0) throw_error(what, ": dimension ", i, " is ", dims_[i], " in shape ", to_string(), " (must be >= 1)");
      const auto d = static_cast<std::uint64_t>(dims_[i]);
      if (n > std::numeric_limits<std::uint64_t>::max() / 2 / d)
        throw_error(what, ": shape ", to_string(), " overflows the byte count");
      n *= d;
    }
  }

  std::string to_string() const {
    std::string s = "[";
    for (std::size_t i = 0; i < rank_; ++i) {
      if (i) s += ',';
      s += std::to_string(dims_[i]);
    }
    return s + "]";
  }

  friend constexpr bool operator==(const shape& a, const shape& b) noexcept {
    if (a.rank_ != b.rank_) return false;
    for (std::size_t i = 0; i < a.rank_; ++i)
      if (a.dims_[i] != b.dims_[i]) return false;
    return true;
  }
  friend std::ostream& operator<<(std::ostream& os, const shape& s) { return os << s.to_string(); }

 private:
  std::array<std::int64_t, max_rank> dims_{};
  std::size_t rank_ = 0;
};

}  // namespace unshard
