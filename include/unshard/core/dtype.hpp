#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "unshard/core/config.hpp"
#include "unshard/core/error.hpp"

namespace unshard {

// Storage dtypes. f8e4m3 (OCP FP8 E4M3 "FN") holds quantized weight codes: a value is
// code * scale, and the scales live beside the codes (unshard/quant/fp8.hpp), so an f8e4m3 tensor
// on its own holds codes, not the weight's values.
enum class dtype : std::uint8_t { f32, bf16, f16, f8e4m3 };

// Bytes per element. Every enumerator is listed (no default), so -Wswitch flags a new dtype here.
constexpr std::size_t size_of(dtype t) noexcept {
  switch (t) {
    case dtype::f32: return 4;
    case dtype::bf16: return 2;
    case dtype::f16: return 2;
    case dtype::f8e4m3: return 1;
  }
  return 0;  // not a dtype (a corrupted value): 0 bytes makes any use fail loudly, never a guess
}

constexpr std::string_view name_of(dtype t) noexcept {
  switch (t) {
    case dtype::f32: return "f32";
    case dtype::bf16: return "bf16";
    case dtype::f16: return "f16";
    case dtype::f8e4m3: return "f8e4m3";
  }
  return "?";
}

// Names as safetensors writes them ("F32", "BF16", "F16", "F8_E4M3").
constexpr std::string_view safetensors_name(dtype t) noexcept {
  switch (t) {
    case dtype::f32: return "F32";
    case dtype::bf16: return "BF16";
    case dtype::f16: return "F16";
    case dtype::f8e4m3: return "F8_E4M3";
  }
  return "?";
}

// Accepts our names, safetensors' and torch's ("f32"/"F32"/"float32", "bf16"/"BF16"/"bfloat16",
// "f16"/"F16"/"float16", "f8e4m3"/"F8_E4M3"/"float8_e4m3fn").
inline dtype parse_dtype(std::string_view s) {
  if (s == "f32" || s == "F32" || s == "float32") return dtype::f32;
  if (s == "bf16" || s == "BF16" || s == "bfloat16") return dtype::bf16;
  if (s == "f16" || s == "F16" || s == "float16") return dtype::f16;
  if (s == "f8e4m3" || s == "F8_E4M3" || s == "float8_e4m3fn") return dtype::f8e4m3;
  throw_error("unknown dtype '", s, "' (expected f32, bf16, f16 or f8e4m3)");
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

// --- OCP FP8 E4M3 ("FN": e4m3fn in torch, __NV_E4M3 in CUDA) --------------------------------
// 1 sign, 4 exponent (bias 7), 3 mantissa bits. No infinities: S.1111.111 is NaN (0x7f, 0xff),
// so the largest finite magnitude is S.1111.110 = 1.75 * 2^8 = 448. Normals are 2^(e-7) * (1 + m/8)
// for e in 1..15; subnormals (e = 0) are 2^-6 * m/8 = m * 2^-9, down to 2^-9.
inline constexpr float e4m3_max = 448.0f;

// How a conversion to e4m3 went. Callers that quantize weights must treat anything but `ok` as an
// error naming the tensor (the rule: never a silent clamp).
enum class e4m3_status : std::uint8_t {
  ok,          // finite, rounded to nearest even within [-448, 448]
  not_finite,  // the input was NaN or +-Inf (e4m3 has no infinity)
  overflow,    // finite, but |x| > 464 rounds beyond 448
};
struct e4m3_conversion {
  std::uint8_t bits;  // the code; the NaN code (sign | 0x7f) unless status is ok
  e4m3_status status;
};

// Round to nearest, ties to even, exactly as the OCP spec's non-saturating conversion (and
// CUDA's __nv_cvt_float_to_fp8(x, __NV_NOSAT, __NV_E4M3), and torch's .to(float8_e4m3fn)); the
// codes were checked equal to CUDA's on all 2^32 f32 inputs when this was written.
// The overflow threshold is 464 = 448 + half an ulp: 464 itself is a tie between 448 (mantissa
// 110, even) and the unrepresentable 480 (mantissa 111) and rounds to 448; anything above it
// would round to 480 or more, which e4m3 cannot hold. Magnitudes up to 2^-10 (half the smallest
// subnormal; 2^-10 itself is a tie with 0) round to a signed zero.
UNSHARD_HD e4m3_conversion float_to_e4m3(float f) {
  const std::uint32_t u = float_bits(f);
  const std::uint8_t sign = static_cast<std::uint8_t>((u >> 24) & 0x80u);
  const std::uint32_t au = u & 0x7fffffffu;
  const std::uint8_t nan = static_cast<std::uint8_t>(sign | 0x7fu);
  if (au >= 0x7f800000u) return {nan, e4m3_status::not_finite};  // +-Inf or NaN
  if (au > 0x43e80000u) return {nan, e4m3_status::overflow};     // |x| > 464 = 0x1.dp+8
  if (au < 0x3c800000u) {                                        // |x| < 2^-6: subnormal or zero
    if (au <= 0x3a800000u) return {sign, e4m3_status::ok};       // |x| <= 2^-10: zero (2^-10 ties to even 0)
    // |x| = mant * 2^(exp-150) with exp in 117..120; the code is m = |x| / 2^-9 rounded to an
    // integer, m = 8 being the smallest normal (code 0x08), so a carry needs no special case.
    const std::uint32_t exp = au >> 23;
    const std::uint32_t mant = (au & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 141u - exp;  // 21..24
    std::uint32_t m = mant >> shift;
    const std::uint32_t rem = mant & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (m & 1u))) ++m;
    return {static_cast<std::uint8_t>(sign | m), e4m3_status::ok};
  }
  // Normal: rebias the exponent (127 -> 7) and round away the 20 low mantissa bits to nearest even;
  // a carry out of the mantissa bumps the exponent, as it should. |x| <= 464 keeps the code <= 0x7e.
  std::uint32_t v = au - (120u << 23);
  v += 0x7ffffu + ((v >> 20) & 1u);
  return {static_cast<std::uint8_t>(sign | (v >> 20)), e4m3_status::ok};
}

// The code alone: NaN, Inf and overflow all give the NaN code (OCP's non-saturating mode), never
// a clamp to 448. Use float_to_e4m3 where the caller must report them.
UNSHARD_HD std::uint8_t float_to_e4m3_bits(float f) { return float_to_e4m3(f).bits; }

// Exact: every e4m3 value is an f32. Both NaN codes give a quiet NaN with the code's sign.
UNSHARD_HD float e4m3_bits_to_float(std::uint8_t b) {
  const std::uint32_t sign = static_cast<std::uint32_t>(b & 0x80u) << 24;
  const std::uint32_t exp = (b >> 3) & 0xfu;
  const std::uint32_t mant = b & 0x7u;
  if (exp == 0xfu && mant == 0x7u) return bits_float(sign | 0x7fc00000u);
  if (exp == 0) return bits_float(sign | float_bits(static_cast<float>(mant) * bits_float(0x3b000000u)));  // m * 2^-9
  return bits_float(sign | ((exp + 120u) << 23) | (mant << 20));
}

// Storage types: wrappers around the bits so overloads and views can tell them apart from integers.
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
// One e4m3 code. to_float() is the code's value, without the tensor's scale; from_float() gives the
// NaN code for NaN, Inf and |f| > 464 (use float_to_e4m3 to tell them apart). Deliberately not a
// kernel storage type (kernels/thread/storage.hpp has no to_f32 for it): a kernel that widened codes
// without their scales would compute with wrong weights.
struct f8e4m3 {
  std::uint8_t bits;
  UNSHARD_HD static f8e4m3 from_float(float f) { return f8e4m3{float_to_e4m3_bits(f)}; }
  UNSHARD_HD float to_float() const { return e4m3_bits_to_float(bits); }
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
template <>
struct dtype_of<f8e4m3> {
  static constexpr dtype value = dtype::f8e4m3;
};

// The index of the first NaN or infinite element among `count` of dtype t at p, or `count` when all
// are finite: the exponent bits all ones (f8e4m3's only non-finite code, the NaN, is checked where
// codes are read: quant::check_codes).
inline std::size_t first_non_finite(const std::byte* p, dtype t, std::size_t count) noexcept {
  const auto scan = [&](auto word, auto exponent) -> std::size_t {
    for (std::size_t i = 0; i < count; ++i) {
      decltype(word) w;
      std::memcpy(&w, p + i * sizeof(w), sizeof(w));
      if ((w & exponent) == exponent) return i;
    }
    return count;
  };
  switch (t) {
    case dtype::f32: return scan(std::uint32_t{}, std::uint32_t{0x7f800000u});
    case dtype::bf16: return scan(std::uint16_t{}, std::uint16_t{0x7f80u});
    case dtype::f16: return scan(std::uint16_t{}, std::uint16_t{0x7c00u});
    case dtype::f8e4m3: return count;
  }
  return count;
}

// Load element i of a buffer of dtype t as float (f32 compute over any storage). For f8e4m3 this is
// the code's value, without the tensor's scale.
UNSHARD_HD float load_as_float(const void* p, dtype t, std::size_t i) {
  switch (t) {
    case dtype::f32: return static_cast<const float*>(p)[i];
    case dtype::bf16: return bf16_bits_to_float(static_cast<const std::uint16_t*>(p)[i]);
    case dtype::f16: return f16_bits_to_float(static_cast<const std::uint16_t*>(p)[i]);
    case dtype::f8e4m3: return e4m3_bits_to_float(static_cast<const std::uint8_t*>(p)[i]);
  }
  return bits_float(0x7fc00000u);  // not a dtype: NaN, never a plausible value
}
// Store v as element i. For f8e4m3, v is stored as a code as is (no scale): NaN, Inf and |v| > 464
// store the NaN code (this function cannot throw: it also runs in CUDA kernels). Host code that
// must report them uses float_to_e4m3, as tensor_view::store does.
UNSHARD_HD void store_from_float(void* p, dtype t, std::size_t i, float v) {
  switch (t) {
    case dtype::f32: static_cast<float*>(p)[i] = v; return;
    case dtype::bf16: static_cast<std::uint16_t*>(p)[i] = float_to_bf16_bits(v); return;
    case dtype::f16: static_cast<std::uint16_t*>(p)[i] = float_to_f16_bits(v); return;
    case dtype::f8e4m3: static_cast<std::uint8_t*>(p)[i] = float_to_e4m3_bits(v); return;
  }
}

}  // namespace unshard
