#pragma once
// Sinusoidal timestep embedding of Wan (sinusoidal_embedding_1d in wan/modules/model.py).
#include <cmath>
#include <cstddef>

#include "unshard/core/config.hpp"

namespace unshard {

// Element i of the `dim`-wide embedding of timestep t: with half = dim/2 and
// w_j = 10000^(-j/half), elements [0, half) are cos(t w_j) and [half, dim) sin(t w_j) -- the
// cos half first (the reverse of the usual transformer order). The argument is formed in double,
// as the official code does, because t w_j reaches 1000 radians and f32 would lose the phase.
UNSHARD_HD float time_sinusoid(double t, std::size_t i, std::size_t dim) {
  const std::size_t half = dim / 2;
  const std::size_t j = i < half ? i : i - half;
  const double arg = t * ::pow(10000.0, -(static_cast<double>(j) / static_cast<double>(half)));
  return static_cast<float>(i < half ? ::cos(arg) : ::sin(arg));
}

}  // namespace unshard
