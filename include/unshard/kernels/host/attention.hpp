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

// Whether attention_two_segments can run on BLAS GEMMs here.
constexpr bool attention_uses_blas(gemm_path path) noexcept {
#if defined(UNSHARD_HAVE_CBLAS)
  return path == gemm_path::blas;
#else
  (void)path;
  return false;
#endif
}

// Scratch floats attention_two_segments needs for `n_keys` keys.
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

// Self-attention of every query row and head over two key segments: n1 rows of k1/v1 then n2 rows of
// k2/v2, all rows of width heads*head_dim (Live Avatar's noisy cache + cond keys; n2 = 0 for one
// segment). Exact softmax in f32. On the blas path a head's scores come from GEMMs for
// attention_block_rows query rows at a time, softmax rows in place, then P·V as GEMMs: the same math
// as attention_row_two_segments in another summation order (about 1e-7 relative), and an order of
// magnitude faster than one query row at a time. `scores`: attention_scratch_floats(path, n1 + n2).
inline void attention_two_segments(gemm_path path, const float* q, std::size_t n_queries, const float* k1,
                                   const float* v1, std::size_t n1, const float* k2, const float* v2, std::size_t n2,
                                   std::size_t heads, std::size_t head_dim, float* scores, float* out) {
  const std::size_t ld = heads * head_dim;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
#if defined(UNSHARD_HAVE_CBLAS)
  if (const std::size_t n = n1 + n2; attention_uses_blas(path) && n > 0) {
    const auto i = [](std::size_t v) { return static_cast<int>(v); };
    for (std::size_t h = 0; h < heads; ++h) {
      const std::size_t col = h * head_dim;
      for (std::size_t r0 = 0; r0 < n_queries; r0 += attention_block_rows) {
        const std::size_t m = std::min(attention_block_rows, n_queries - r0);
        const float* qh = q + r0 * ld + col;
        float* oh = out + r0 * ld + col;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, i(m), i(n1), i(head_dim), scale, qh, i(ld), k1 + col, i(ld),
                    0.0f, scores, i(n));
        if (n2)
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, i(m), i(n2), i(head_dim), scale, qh, i(ld), k2 + col,
                      i(ld), 0.0f, scores + n1, i(n));
        for (std::size_t r = 0; r < m; ++r) detail::softmax_in_place(scores + r * n, n);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, i(m), i(head_dim), i(n1), 1.0f, scores, i(n), v1 + col,
                    i(ld), 0.0f, oh, i(ld));
        if (n2)
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, i(m), i(head_dim), i(n2), 1.0f, scores + n1, i(n),
                      v2 + col, i(ld), 1.0f, oh, i(ld));
      }
    }
    return;
  }
#else
  (void)path;
#endif
  for (std::size_t t = 0; t < n_queries; ++t)
    for (std::size_t h = 0; h < heads; ++h) {
      const std::size_t col = h * head_dim;
      attention_row_two_segments(q + t * ld + col, k1 + col, v1 + col, n1, k2 + col, v2 + col, n2, ld, head_dim, scale,
                                 scores, out + t * ld + col);
    }
}


}  // namespace unshard
