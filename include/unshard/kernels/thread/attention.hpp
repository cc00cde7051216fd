#pragma once
// Exact softmax attention for one query row of one head.
//
// Computes out = softmax(q·Kᵀ · scale) V over n_keys keys with f32 accumulation: scores are
// max-subtracted before exp (no overflow for any input), and the normalisation is one division at
// the end. Keys and values are rows of width >= d with leading dimension `ld`, so a caller loops
// heads by offsetting q, k, v and out by h*d into [S, heads*d] activations -- the layout Wan's
// attention uses. `scores` is caller-provided scratch of n_keys floats (no allocation here).
#include <cmath>
#include <cstddef>

#include "unshard/core/config.hpp"

namespace unshard {
namespace detail {

// q·k with four independent partial sums (fixed order: deterministic, and it vectorises).
UNSHARD_HD float dot_f32(const float* a, const float* b, std::size_t n) {
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  std::size_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (std::size_t l = 0; l < 4; ++l) acc[l] += a[i + l] * b[i + l];
  for (std::size_t l = 0; i < n; ++i, ++l) acc[l] += a[i] * b[i];
  return (acc[0] + acc[2]) + (acc[1] + acc[3]);
}

}  // namespace detail

UNSHARD_HD void attention_row(const float* q, const float* k, const float* v, std::size_t n_keys, std::size_t ld,
                              std::size_t d, float scale, float* scores, float* out) {
  float max_score = -INFINITY;
  for (std::size_t j = 0; j < n_keys; ++j) {
    scores[j] = detail::dot_f32(q, k + j * ld, d) * scale;
    max_score = scores[j] > max_score ? scores[j] : max_score;
  }
  float denom = 0.0f;
  for (std::size_t j = 0; j < n_keys; ++j) {
    scores[j] = ::expf(scores[j] - max_score);
    denom += scores[j];
  }
  for (std::size_t c = 0; c < d; ++c) out[c] = 0.0f;
  for (std::size_t j = 0; j < n_keys; ++j) {
    const float p = scores[j];
    const float* vj = v + j * ld;
    for (std::size_t c = 0; c < d; ++c) out[c] += p * vj[c];
  }
  const float inv = 1.0f / denom;
  for (std::size_t c = 0; c < d; ++c) out[c] *= inv;
}

}  // namespace unshard
