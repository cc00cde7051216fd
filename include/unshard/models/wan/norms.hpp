#pragma once
// Norms applied to every row of a token matrix [rows, D]: the host loops of the Wan sub-units.
#include <cstddef>

#include "unshard/core/tensor_view.hpp"
#include "unshard/kernels/host/typed_storage.hpp"
#include "unshard/kernels/thread/norm.hpp"
#include "unshard/models/wan/geometry.hpp"

namespace unshard::detail {

// RMSNorm over the full width D of each of `rows` rows, in place (before the head split).
inline void wan_rms_norm_rows(float* x, std::size_t rows, const wan_geometry& g, const tensor_view& weight) {
  visit_storage(weight, [&](const auto* w) {
    for (std::size_t r = 0; r < rows; ++r) rms_norm_row(x + r * g.dim, g.dim, g.eps, w, x + r * g.dim);
  });
}

// y = LN(x)(1 + scale) + shift for every token.
inline void wan_modulated_norm(const wan_geometry& g, const float* x, const float* shift, const float* scale, float* y) {
  for (std::size_t t = 0; t < g.tokens; ++t) layer_norm_modulate_row(x + t * g.dim, g.dim, g.eps, shift, scale, y + t * g.dim);
}

}  // namespace unshard::detail
