#pragma once
// Row normalisations of the Wan DiT: LayerNorm (plain, affine, adaLN-modulated) and RMSNorm.
//
// Statistics are accumulated in double: a row is up to 5120 wide (Wan 14B) and an f32 running sum
// would drift by ~1e-6 relative, which is the whole error budget against the references. The
// normalised value is rounded to f32 before any weight or modulation is applied, as torch does
// (`norm(x.float()).type_as(x) * weight`). Every function allows y == x (in place).
#include <cmath>
#include <cstddef>

#include "unshard/core/config.hpp"
#include "unshard/kernels/thread/storage.hpp"

namespace unshard {

// Mean and 1/sqrt(biased variance + eps) of one row (two passes: exact, no Welford drift).
struct layer_norm_stats {
  double mean;
  double rstd;
};

// The per-element pieces of the row functions below; kernels that reduce a row across threads
// (kernels/cuda/norm.cuh) call them too, so both paths share the statistics and the rounding.
UNSHARD_HD double row_mean(double sum, std::size_t n) { return sum / static_cast<double>(n); }
UNSHARD_HD layer_norm_stats layer_norm_stats_of(double mean, double centered_sq, std::size_t n, double eps) {
  return {mean, 1.0 / ::sqrt(centered_sq / static_cast<double>(n) + eps)};  // biased variance
}
UNSHARD_HD float modulated(float normed, float shift, float scale) { return normed * (1.0f + scale) + shift; }
UNSHARD_HD float affine(float normed, float weight, float bias) { return normed * weight + bias; }
UNSHARD_HD double rms_rstd(double sum_sq, std::size_t n, double eps) {
  return 1.0 / ::sqrt(sum_sq / static_cast<double>(n) + eps);
}
UNSHARD_HD float rms_normalized(float x, double rstd, float weight) { return static_cast<float>(x * rstd) * weight; }

UNSHARD_HD layer_norm_stats row_layer_norm_stats(const float* x, std::size_t n, double eps) {
  double sum = 0.0;
  for (std::size_t i = 0; i < n; ++i) sum += x[i];
  const double mean = row_mean(sum, n);
  double sq = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    const double c = x[i] - mean;
    sq += c * c;
  }
  return layer_norm_stats_of(mean, sq, n, eps);
}

UNSHARD_HD float normalized(float x, const layer_norm_stats& s) {
  return static_cast<float>((static_cast<double>(x) - s.mean) * s.rstd);
}

// y = LN(x): no affine parameters (Wan's norm1, norm2 and head.norm).
UNSHARD_HD void layer_norm_row(const float* x, std::size_t n, double eps, float* y) {
  const layer_norm_stats s = row_layer_norm_stats(x, n, eps);
  for (std::size_t i = 0; i < n; ++i) y[i] = normalized(x[i], s);
}

// y = LN(x) * weight + bias (Wan's norm3, elementwise_affine=True).
template <class W, class B>
UNSHARD_HD void layer_norm_row(const float* x, std::size_t n, double eps, const W* weight, const B* bias, float* y) {
  const layer_norm_stats s = row_layer_norm_stats(x, n, eps);
  for (std::size_t i = 0; i < n; ++i) y[i] = affine(normalized(x[i], s), to_f32(weight[i]), to_f32(bias[i]));
}

// adaLN: y = LN(x) * (1 + scale) + shift, with shift/scale rows of the f32 modulation.
UNSHARD_HD void layer_norm_modulate_row(const float* x, std::size_t n, double eps, const float* shift,
                                        const float* scale, float* y) {
  const layer_norm_stats s = row_layer_norm_stats(x, n, eps);
  for (std::size_t i = 0; i < n; ++i) y[i] = modulated(normalized(x[i], s), shift[i], scale[i]);
}

// y = x / sqrt(mean(x²) + eps) * weight (WanRMSNorm; over the full row, all heads together).
template <class W>
UNSHARD_HD void rms_norm_row(const float* x, std::size_t n, double eps, const W* weight, float* y) {
  double sq = 0.0;
  for (std::size_t i = 0; i < n; ++i) sq += static_cast<double>(x[i]) * x[i];
  const double rstd = rms_rstd(sq, n, eps);
  for (std::size_t i = 0; i < n; ++i) y[i] = rms_normalized(x[i], rstd, to_f32(weight[i]));
}

}  // namespace unshard
