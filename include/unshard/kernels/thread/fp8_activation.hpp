#pragma once
// Per-tensor fp8 activation quantization (the official Live Avatar path, liveavatar/utils/
// fp8_linear.py: activations to e4m3 with one scale per tensor, then an fp8 GEMM): the row math
// that the host reference (kernels/host/gemm.hpp, linear_rows_fp8_activations) and the device
// (kernels/cuda/fp8.cuh) share, so both produce the same codes and the same scale, bit for bit.
//
//  * amax: the largest |x| of the whole GEMM input, taken as the maximum of the f32 bit patterns
//    with the sign cleared (exact, order-free; a NaN anywhere wins, an Inf beats every finite value);
//  * scale = amax / 448 (quant::scale_for_amax's rule: 1 for amax == 0, never below FLT_MIN), so the
//    largest magnitude maps onto e4m3's largest value. The official code multiplies by
//    min(448 / amax, 448) instead (quant/fp8.hpp, official_scale_for_amax); we keep the weights' rule;
//  * code = RNE(clamp(x / scale, -448, 448)) with IEEE division (nvcc's default -prec-div=true; the
//    build never asks for fast math), the clamp as torch.clamp in the official code: x / scale can
//    exceed 448 by an ulp when amax / 448 rounded down. A NaN input stays NaN (the NaN code), and
//    a non-finite amax makes every code NaN or 0: the GEMM's output then shows it.
#include <cstdint>

#include "unshard/core/dtype.hpp"

namespace unshard {

// |x| as ordered bits: max over these is max |x| (NaN above +Inf above every finite value).
UNSHARD_HD std::uint32_t fp8_abs_bits(float x) { return float_bits(x) & 0x7fffffffu; }

// The per-tensor activation scale for the maximum of fp8_abs_bits over the tensor.
UNSHARD_HD float fp8_activation_scale(std::uint32_t amax_bits) {
  const float amax = bits_float(amax_bits);
  if (!(amax > 0.0f)) return 1.0f;  // all zeros (or NaN: the codes carry the NaN)
  const float s = amax / e4m3_max;
  const float min_normal = bits_float(0x00800000u);  // FLT_MIN
  return s < min_normal ? min_normal : s;
}

// The e4m3 code of x under `scale`.
UNSHARD_HD std::uint8_t fp8_activation_code(float x, float scale) {
  float q = x / scale;
  q = q > e4m3_max ? e4m3_max : (q < -e4m3_max ? -e4m3_max : q);  // NaN passes through
  return float_to_e4m3_bits(q);
}

}  // namespace unshard
