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
  for (std::size_t l = 0; i < n && l < 4; ++i, ++l) acc[l] += a[i] * b[i];  // the tail: fewer than 4
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

// softmax(q [K1; K2]ᵀ scale) [V1; V2] for one query row of one head: the keys are two segments
// (rows ld apart each), attended as one sequence in that order. `scores` holds n1 + n2 floats.
UNSHARD_HD void attention_row_two_segments(const float* q, const float* k1, const float* v1, std::size_t n1,
                                           const float* k2, const float* v2, std::size_t n2, std::size_t ld,
                                           std::size_t d, float scale, float* scores, float* out) {
  float max_score = -INFINITY;
  for (std::size_t j = 0; j < n1 + n2; ++j) {
    const float* kj = j < n1 ? k1 + j * ld : k2 + (j - n1) * ld;
    scores[j] = detail::dot_f32(q, kj, d) * scale;
    max_score = scores[j] > max_score ? scores[j] : max_score;
  }
  float denom = 0.0f;
  for (std::size_t j = 0; j < n1 + n2; ++j) {
    scores[j] = ::expf(scores[j] - max_score);
    denom += scores[j];
  }
  for (std::size_t c = 0; c < d; ++c) out[c] = 0.0f;
  for (std::size_t j = 0; j < n1 + n2; ++j) {
    const float p = scores[j];
    const float* vj = j < n1 ? v1 + j * ld : v2 + (j - n1) * ld;
    for (std::size_t c = 0; c < d; ++c) out[c] += p * vj[c];
  }
  const float inv = 1.0f / denom;
  for (std::size_t c = 0; c < d; ++c) out[c] *= inv;
}

}  // namespace unshard
