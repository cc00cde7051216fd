#pragma once
// Row math of the S2V model that the Wan kernels do not cover: fp16-rounded rope factors at signed
// positions and numpy's truncated linspace (frame-pack positions). UNSHARD_HD, so a CUDA port shares
// them. (The causal conv's input vector and attention over two key segments are generic: they live
// in kernels/thread/.)
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "unshard/core/config.hpp"
#include "unshard/kernels/thread/rope.hpp"

namespace unshard::s2v {

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
UNSHARD_HD void rope_factors_row(std::int64_t pt, std::int64_t ph, std::int64_t pw, std::size_t pairs, float* cos_out,
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

}  // namespace unshard::s2v
