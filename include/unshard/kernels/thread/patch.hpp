#pragma once
// Patchify / unpatchify of Wan: the Conv3d patch embedding's input vectors and the head's inverse.
//
// The latent [C, F, H, W] is cut into a grid of (gf, gh, gw) patches of (pt, ph, pw); token
// s = (f*gh + h)*gw + w. The grid floors (F/pt, ...) as a strided Conv3d does, so trailing frames,
// rows or columns that do not fill a patch are dropped, and the output covers gf*pt x gh*ph x gw*pw.
#include <cstddef>

#include "unshard/core/config.hpp"

namespace unshard {

struct patch_grid {
  std::size_t pt, ph, pw;  // patch size
  std::size_t gf, gh, gw;  // tokens along frames, rows, columns
};

// Patch vector of token s from x [c, frames, height, width], flattened as (c, a, b, e) with the
// channel slowest -- the order of Conv3d's weight [D, C, pt, ph, pw] reshaped to [D, C*pt*ph*pw].
UNSHARD_HD void patchify_token(const float* x, std::size_t c, std::size_t frames, std::size_t height,
                               std::size_t width, const patch_grid& g, std::size_t s, float* vec) {
  const std::size_t w = s % g.gw;
  const std::size_t h = (s / g.gw) % g.gh;
  const std::size_t f = s / (g.gw * g.gh);
  std::size_t i = 0;
  for (std::size_t ch = 0; ch < c; ++ch)
    for (std::size_t a = 0; a < g.pt; ++a)
      for (std::size_t b = 0; b < g.ph; ++b) {
        const float* src = x + ((ch * frames + f * g.pt + a) * height + h * g.ph + b) * width + w * g.pw;
        for (std::size_t e = 0; e < g.pw; ++e) vec[i++] = src[e];
      }
}

// Scatters token s's head output into out [c, gf*pt, gh*ph, gw*pw]. The head's vector is indexed
// ((a*ph + b)*pw + e)*c + ch -- channel fastest, the opposite of patchify (Wan's unpatchify einsum).
UNSHARD_HD void unpatchify_token(const float* vec, std::size_t c, const patch_grid& g, std::size_t s, float* out) {
  const std::size_t w = s % g.gw;
  const std::size_t h = (s / g.gw) % g.gh;
  const std::size_t f = s / (g.gw * g.gh);
  const std::size_t frames = g.gf * g.pt, height = g.gh * g.ph, width = g.gw * g.pw;
  for (std::size_t a = 0; a < g.pt; ++a)
    for (std::size_t b = 0; b < g.ph; ++b)
      for (std::size_t e = 0; e < g.pw; ++e) {
        const float* src = vec + ((a * g.ph + b) * g.pw + e) * c;
        for (std::size_t ch = 0; ch < c; ++ch)
          out[((ch * frames + f * g.pt + a) * height + h * g.ph + b) * width + w * g.pw + e] = src[ch];
      }
}

// Output length of a causal Conv1d (kernel 3, left padding 2) with `stride` over n inputs.
UNSHARD_HD std::size_t causal_conv_out_len(std::size_t n, std::size_t stride) { return (n - 1) / stride + 1; }

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

}  // namespace unshard
