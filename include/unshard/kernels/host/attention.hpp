#pragma once
// Host multi-head attention over [rows, heads*head_dim] activations: loops the thread kernel
// attention_row over query rows and heads (heads are contiguous column blocks, head-major).
#include <cmath>
#include <algorithm>
#include <cstddef>

#include "unshard/kernels/host/gemm.hpp"
#include "unshard/kernels/thread/attention.hpp"

namespace unshard {

// out[s, h*d:(h+1)*d] = softmax(q_s,h · K_hᵀ / sqrt(d)) V_h for every query row s < n_queries and
// head h, over all n_keys key rows (no mask: Wan's t2v self- and cross-attention attend to every
// key). `scores` is scratch of n_keys floats.
inline void multi_head_attention(const float* q, std::size_t n_queries, const float* k, const float* v,
                                 std::size_t n_keys, std::size_t heads, std::size_t head_dim, float* scores,
                                 float* out) {
  const std::size_t ld = heads * head_dim;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  for (std::size_t s = 0; s < n_queries; ++s)
    for (std::size_t h = 0; h < heads; ++h) {
      const std::size_t col = h * head_dim;
      attention_row(q + s * ld + col, k + col, v + col, n_keys, ld, head_dim, scale, scores, out + s * ld + col);
    }
}

// Query rows attention computes per BLAS pass: the scores of that many rows are kept at once.
inline constexpr std::size_t attention_block_rows = 64;

// Whether multi_head_attention_two_segments can run on BLAS GEMMs here.
constexpr bool attention_uses_blas(gemm_path path) noexcept {
#if defined(UNSHARD_HAVE_CBLAS)
  return path == gemm_path::blas;
#else
  (void)path;
  return false;
#endif
}

// Scratch floats multi_head_attention_two_segments needs for `n_keys` keys.
constexpr std::size_t attention_scratch_floats(gemm_path path, std::size_t n_keys) noexcept {
  return (attention_uses_blas(path) ? attention_block_rows : 1) * n_keys;
}

namespace detail {

// softmax over n floats in place: max-subtracted expf, normalised by one reciprocal of the sum.
inline void softmax_in_place(float* x, std::size_t n) {
  float max_score = -INFINITY;
  for (std::size_t j = 0; j < n; ++j) max_score = x[j] > max_score ? x[j] : max_score;
  float denom = 0.0f;
  for (std::size_t j = 0; j < n; ++j) {
    x[j] = ::expf(x[j] - max_score);
    denom += x[j];
  }
  const float inv = 1.0f / denom;
  for (std::size_t j = 0; j < n; ++j) x[j] *= inv;
}

}  // namespace detail

}  // namespace unshard
