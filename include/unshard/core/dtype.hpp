#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "unshard/core/config.hpp"
#include "unshard/core/error.hpp"

namespace unshard {

enum class dtype : std::uint8_t { f32, bf16, f16 };

constexpr std::size_t size_of(dtype t) noexcept { return t == dtype::f32 ? 4 : 2; }

constexpr std::string_view name_of(dtype t) noexcept {
  switch (t) {
    case dtype::f32: return "f32";
    case dtype::bf16: return "bf16";
    case dtype::f16: return "f16";
  }
  return "?";
}

// Names as safetensors writes them ("F32", "BF16", "F16").
constexpr std::string_view safetensors_name(dtype t) noexcept {
  switch (t) {
    case dtype::f32: return "F32";
    case dtype::bf16: return "BF16";
    case dtype::f16: return "F16";
  }
  return "?";
}

// Accepts our names and safetensors' ("f32"/"F32", "bf16"/"BF16", "f16"/"F16").
inline dtype parse_dtype(std::string_view s) {
  if (s == "f32" || s == "F32" || s == "float32") return dtype::f32;
  if (s == "bf16" || s == "BF16" || s == "bfloat16") return dtype::bf16;
  if (s == "f16" || s == "F16" || s == "float16") return dtype::f16;
  throw_error("unknown dtype '", s, "' (expected f32, bf16 or f16)");
}

// --- bit-exact conversions (round to nearest, ties to even; NaN stays NaN) -----------------

UNSHARD_HD std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
UNSHARD_HD float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

UNSHARD_HD std::uint16_t float_to_bf16_bits(float f) {
  std::uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // RNE: add half-ulp minus one, plus the lsb of the kept part
  return static_cast<std::uint16_t>(u >> 16);
}
UNSHARD_HD float bf16_bits_to_float(std::uint16_t b) { return bits_float(static_cast<std::uint32_t>(b) << 16); }

UNSHARD_HD std::uint16_t float_to_f16_bits(float f) {
  const std::uint32_t u = float_bits(f);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
  if (au >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (au < 0x38800000u) {
    // Result is subnormal (or zero) in f16: value = m * 2^-24 with m rounded to an integer.
    if (au < 0x33000000u) return static_cast<std::uint16_t>(sign);  // < 2^-25: rounds to 0
    const std::uint32_t exp = au >> 23;                              // 102..112
    const std::uint32_t mant = (au & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126u - exp;  // value = mant * 2^(exp-150) = (mant >> (126-exp)) * 2^-24
    std::uint32_t m = mant >> shift;
    const std::uint32_t rem = mant & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (m & 1u))) ++m;
    return static_cast<std::uint16_t>(sign | m);
  }
  // Normal: rebias exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
  std::uint32_t v = au - 0x38000000u;  // exponent - 112 in place
  v += 0xfffu + ((v >> 13) & 1u);
  return static_cast<std::uint16_t>(sign | (v >> 13));
}

UNSHARD_HD float f16_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return bits_float(sign);
    // Subnormal: normalise.
    std::uint32_t e = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    return bits_float(sign | (e << 23) | ((mant & 0x3ffu) << 13));
  }
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Storage types: 16-bit wrappers so overloads and views can tell them apart from integers.
struct bf16 {
  std::uint16_t bits;
  UNSHARD_HD static bf16 from_float(float f) { return bf16{float_to_bf16_bits(f)}; }
  UNSHARD_HD float to_float() const { return bf16_bits_to_float(bits); }
};
struct f16 {
  std::uint16_t bits;
  UNSHARD_HD static f16 from_float(float f) { return f16{float_to_f16_bits(f)}; }
  UNSHARD_HD float to_float() const { return f16_bits_to_float(bits); }
};

template <class T>
struct dtype_of;
template <>
struct dtype_of<float> {
  static constexpr dtype value = dtype::f32;
};
template <>
struct dtype_of<bf16> {
  static constexpr dtype value = dtype::bf16;
};
template <>
struct dtype_of<f16> {
  static constexpr dtype value = dtype::f16;
};

// Load element i of a buffer of dtype t as float (f32 compute over any storage).
UNSHARD_HD float load_as_float(const void* p, dtype t, std::size_t i) {
  if (t == dtype::f32) return static_cast<const float*>(p)[i];
  const std::uint16_t b = static_cast<const std::uint16_t*>(p)[i];
  return t == dtype::bf16 ? bf16_bits_to_float(b) : f16_bits_to_float(b);
}
UNSHARD_HD void store_from_float(void* p, dtype t, std::size_t i, float v) {
  if (t == dtype::f32) {
    static_cast<float*>(p)[i] = v;
    return;
  }
  static_cast<std::uint16_t*>(p)[i] = t == dtype::bf16 ? float_to_bf16_bits(v) : float_to_f16_bits(v);
}

}  // namespace unshard
