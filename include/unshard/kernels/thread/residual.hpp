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

// x += y (cross-attention has no gate).
UNSHARD_HD void residual_row(float* x, const float* y, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) x[i] = x[i] + y[i];
}

}  // namespace unshard
