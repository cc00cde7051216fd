#pragma once
// Row math of the S2V model that the Wan kernels do not cover: fp16-rounded rope factors at signed
// positions, numpy's truncated linspace (frame-pack positions), the causal conv's input vector,
// and attention over two key segments (a KV cache and the roped cond keys) without copying them
// together. UNSHARD_HD, so a CUDA port shares them.
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "unshard/core/config.hpp"
#include "unshard/kernels/thread/attention.hpp"
#include "unshard/kernels/thread/rope.hpp"

namespace unshard {

// x rounded to the nearest IEEE binary16 value (ties to even), returned exactly as f32. Straight
// from the double: the official rope_precompute stores float64 factors as complex32, and a detour
// through f32 could round twice. |x| <= 1 here (cos, sin), far below binary16's overflow.
UNSHARD_HD float round_to_f16(double x) {
  if (x == 0.0 || !(x == x)) return static_cast<float>(x);
  int e = 0;
  ::frexp(x, &e);                          // |x| = m 2^e, m in [0.5, 1): the leading bit is 2^(e-1)
  const int lead = e - 1 < -14 ? -14 : e - 1;  // below 2^-14 binary16 is subnormal: fixed 2^-24 steps
  const double ulp = ::ldexp(1.0, lead - 10);
  return static_cast<float>(::nearbyint(x / ulp) * ulp);  // x/ulp is exact; nearbyint rounds half to even
}

// Rope factors of one token at (pt, ph, pw), positions possibly negative (motion tokens): pair j of
// a section of n pairs turns by pos * 10000^(-j/n); cos and sin computed in double on |pos|, a
// negative position taking the conjugate, then each rounded to binary16.
UNSHARD_HD void s2v_rope_factors_row(std::int64_t pt, std::int64_t ph, std::int64_t pw, std::size_t pairs, float* cos_out,
                                     float* sin_out) {
  const rope_sections s = rope_split(pairs);
  for (std::size_t i = 0; i < pairs; ++i) {
    std::int64_t pos;
    std::size_t j, n;
    if (i < s.t) {
      pos = pt, j = i, n = s.t;
    } else if (i < s.t + s.h) {
      pos = ph, j = i - s.t, n = s.h;
    } else {
      pos = pw, j = i - s.t - s.h, n = s.w;
    }
    const double angle = rope_angle(static_cast<std::size_t>(pos < 0 ? -pos : pos), j, n);
    const double sn = ::sin(angle);
    cos_out[i] = round_to_f16(::cos(angle));
    sin_out[i] = round_to_f16(pos < 0 ? -sn : sn);
  }
}

// trunc(numpy.linspace(0, stop, n)[i]): [0] when n == 1, else i * (stop / (n - 1)) in double with
// the last value exactly stop.
UNSHARD_HD std::int64_t linspace_trunc(std::size_t i, std::int64_t stop, std::size_t n) {
  if (n <= 1) return 0;
  if (i + 1 == n) return stop;
  const double step = static_cast<double>(stop) / static_cast<double>(n - 1);
  return static_cast<std::int64_t>(static_cast<double>(i) * step);
}

// Input vector of output step t of a causal Conv1d (kernel 3, stride s) over x [T_in, C]
// (time-major): vec[c*3 + k] = x[max(0, t*s + k - 2), c] -- the left padding repeats column 0.
// Ordered as the Conv1d weight [O, C, 3] reshaped to [O, 3C].
UNSHARD_HD void causal_conv_input_row(const float* x, std::size_t channels, std::size_t t, std::size_t stride,
                                      float* vec) {
  for (std::size_t k = 0; k < 3; ++k) {
    const std::size_t padded = t * stride + k;
    const float* src = x + (padded < 2 ? 0 : padded - 2) * channels;
    for (std::size_t c = 0; c < channels; ++c) vec[c * 3 + k] = src[c];
  }
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
