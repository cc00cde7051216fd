#pragma once
// Pointwise activations of the Wan DiT, in f32 as torch computes them on f32 tensors.
#include <cmath>

#include "unshard/core/config.hpp"

namespace unshard {

// GELU, tanh approximation (nn.GELU(approximate='tanh'), used by Wan's FFN and text embedding):
// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³))).
UNSHARD_HD float gelu_tanh(float x) {
  constexpr float sqrt_2_over_pi = 0.7978845608028654f;
  constexpr float kappa = 0.044715f;
  return 0.5f * x * (1.0f + ::tanhf(sqrt_2_over_pi * (x + kappa * x * x * x)));
}

// SiLU: x * sigmoid(x) (time embedding and time projection).
UNSHARD_HD float silu(float x) { return x / (1.0f + ::expf(-x)); }

}  // namespace unshard
