#pragma once
// Forward of the head: out = head.head(LN(x)(1 + hm1) + hm0) with hm = head.modulation + e
// (e, not e0), then unpatchify into the output latent. No allocation.
#include <cstddef>
#include <type_traits>

#include "unshard/kernels/host/gemm.hpp"
#include "unshard/kernels/host/linear_params.hpp"
#include "unshard/layer/param_source.hpp"
#include "unshard/kernels/thread/patch.hpp"
#include "unshard/models/wan/norms.hpp"
#include "unshard/models/wan/params.hpp"
#include "unshard/models/wan/state.hpp"

namespace unshard::detail {

template <param_source P>
void wan_head_forward(const wan_geometry& g, P& p, wan_state& s) {
  const auto lay = wan_head_layout(g);
  check_wan_params(lay.table, p, g.storage, wan_layer_kind::head, 0, "head");
  const std::size_t S = g.tokens, D = g.dim;
  const tensor_view mod = p.whole(lay.modulation);
  for (std::size_t i = 0; i < 2 * D; ++i) s.modulation[i] = mod.load(i) + s.e[i % D];
  const float *shift = s.modulation, *scale = s.modulation + D;

  wan_modulated_norm(g, s.x, shift, scale, s.norm);
  linear_params(s.norm, S, D, p, lay.head.weight, lay.head.bias, s.head_out, g.gemm);
  for (std::size_t t = 0; t < S; ++t) unpatchify_token(s.head_out + t * g.patch_out, g.out_dim, g.grid, t, s.output);
}

}  // namespace unshard::detail
