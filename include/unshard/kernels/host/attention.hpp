#pragma once
// Host multi-head attention over [rows, heads*head_dim] activations: loops the thread kernel
// attention_row over query rows and heads (heads are contiguous column blocks, head-major).
#include <cmath>
#include <cstddef>

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

}  // namespace unshard
