#pragma once
// Residual updates of the Wan block, in f32: the product is rounded before the add, as the
// official `x = x + y * gate` does on f32 tensors.
#include <cstddef>

#include "unshard/core/config.hpp"

namespace unshard {

// x += y * gate (self-attention and FFN, gated by modulation rows m2 and m5).
UNSHARD_HD void gated_residual_row(float* x, const float* y, const float* gate, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) x[i] = x[i] + y[i] * gate[i];
}

// x + f32(a·y) with one f32 rounding per operation (the sampler's Euler update x + dt·v), written
// through double so that no compiler contraction into a fused multiply-add changes a bit: the
// double product of two floats is exact, and their double sum rounded to float is the correctly
// rounded float sum.
UNSHARD_HD float add_scaled(float x, float y, float a) {
  const auto update = static_cast<float>(static_cast<double>(a) * static_cast<double>(y));
  return static_cast<float>(static_cast<double>(x) + static_cast<double>(update));
}
// x += y (cross-attention has no gate).
UNSHARD_HD void residual_row(float* x, const float* y, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) x[i] = x[i] + y[i];
}

}  // namespace unshard
