#pragma once
// 3-D rotary position embedding of Wan (rope_params / rope_apply in wan/modules/model.py).
//
// A head of width d holds c = d/2 complex pairs (x[2i], x[2i+1]) -- interleaved, not split
// halves. The pairs are cut into a time section of c - 2*floor(c/3) pairs, then height and width
// sections of floor(c/3) pairs each; a pair at local index j of a section of n pairs turns by
// pos * 10000^(-j/n), pos being the token's frame, row or column index in the patch grid.
// Angles and the rotation are computed in double and rounded to f32, as the official code does.
#include <cmath>
#include <cstddef>

#include "unshard/core/config.hpp"

namespace unshard {

struct rope_sections {
  std::size_t t;  // pairs turned by the frame index
  std::size_t h;  // by the row index
  std::size_t w;  // by the column index
};

UNSHARD_HD rope_sections rope_split(std::size_t pairs) {
  const std::size_t third = pairs / 3;
  return {pairs - 2 * third, third, third};
}

// rope_params(dim = 2n): 1 / theta^(2j / 2n), times the position, in double.
UNSHARD_HD double rope_angle(std::size_t pos, std::size_t j, std::size_t n) {
  const double inv_freq = 1.0 / ::pow(10000.0, static_cast<double>(2 * j) / static_cast<double>(2 * n));
  return static_cast<double>(pos) * inv_freq;
}

// cos/sin of every pair for the token at grid position (f, h, w); the same for every head.
UNSHARD_HD void rope_table_row(std::size_t f, std::size_t h, std::size_t w, std::size_t pairs, float* cos_out,
                               float* sin_out) {
  const rope_sections s = rope_split(pairs);
  for (std::size_t i = 0; i < pairs; ++i) {
    double angle;
    if (i < s.t) {
      angle = rope_angle(f, i, s.t);
    } else if (i < s.t + s.h) {
      angle = rope_angle(h, i - s.t, s.h);
    } else {
      angle = rope_angle(w, i - s.t - s.h, s.w);
    }
    cos_out[i] = static_cast<float>(::cos(angle));
    sin_out[i] = static_cast<float>(::sin(angle));
  }
}

// Rotates one head row of `pairs` interleaved pairs in place: (a + ib) * (cos + i sin).
UNSHARD_HD void rope_rotate_row(float* x, const float* cos, const float* sin, std::size_t pairs) {
  for (std::size_t i = 0; i < pairs; ++i) {
    const double a = x[2 * i];
    const double b = x[2 * i + 1];
    const double c = cos[i];
    const double s = sin[i];
    x[2 * i] = static_cast<float>(a * c - b * s);
    x[2 * i + 1] = static_cast<float>(a * s + b * c);
  }
}

}  // namespace unshard
