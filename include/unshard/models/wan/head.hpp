#pragma once
// Forward of the head: out = head.head(LN(x)(1 + hm1) + hm0) with hm = head.modulation + e
// (e, not e0), then unpatchify into the output latent. Written once over an op set
// (ops/op_set.hpp). No allocation.
#include <cstddef>

#include "unshard/layer/param_source.hpp"
#include "unshard/models/wan/norms.hpp"
#include "unshard/models/wan/params.hpp"
#include "unshard/models/wan/state.hpp"
#include "unshard/ops/op_set.hpp"

namespace unshard::detail {

template <op_set O, param_source P>
void wan_head_forward(O& ops, const wan_geometry& g, P& p, wan_state& s) {
  const auto lay = wan_head_layout(g);
  check_wan_params(lay.table, p, g.storage, wan_layer_kind::head, 0, "head");
  const std::size_t S = g.tokens, D = g.dim;
  ops.add_param_rows(s.modulation, p.whole(lay.modulation), s.e, 1, 2 * D, 0, D);  // [2, D] + e per chunk

  ops.layer_norm_modulate(s.x, s.norm, S, D, g.eps, wan_modulation(g, s.modulation, 0),
                          wan_modulation(g, s.modulation, 1));
  ops.linear(s.norm, S, D, p, lay.head.weight, lay.head.bias, s.head_out);
  ops.unpatchify(s.head_out, g.out_dim, g.grid, S, s.output);
}

}  // namespace unshard::detail
