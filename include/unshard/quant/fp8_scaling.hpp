#pragma once
// How an fp8 weight is scaled: the policy-level vocabulary of quant/fp8.hpp, alone so that
// policy/ (policy_values, the fp8_weights part) can name it without the codec.
#include <cstddef>
#include <string_view>

namespace unshard::quant {

enum class fp8_scaling { per_tensor, per_channel };

// The policy spelling: "tensor" (fp8:tensor) and "channel" (fp8, the default).
constexpr std::string_view name_of(fp8_scaling s) noexcept {
  switch (s) {
    case fp8_scaling::per_tensor: return "tensor";
    case fp8_scaling::per_channel: return "channel";
  }
  return "?";
}

// How many scales a weight with `rows` output rows has.
constexpr std::size_t scale_count(fp8_scaling s, std::size_t rows) noexcept {
  return s == fp8_scaling::per_tensor ? 1 : rows;
}

}  // namespace unshard::quant
