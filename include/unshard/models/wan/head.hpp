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

namespace unshard::wan::detail {

template <op_set O, param_source P>
void head_forward(O& ops, const wan::geometry& g, P& p, wan::state& s) {
  const auto lay = head_layout(g);
  check_params(lay.table, p, g.storage, wan::layer_kind::head, 0, "head");
  const std::size_t S = g.tokens, D = g.dim;
  ops.add_param_rows(s.modulation, p.whole(lay.modulation), s.e, 1, 2 * D, 0, D);  // [2, D] + e per chunk

  ops.layer_norm_modulate(s.x, s.norm, S, D, g.eps, modulation(g, s.modulation, 0),
                          modulation(g, s.modulation, 1));
  ops.linear(s.norm, S, D, p, lay.head.weight, lay.head.bias, s.head_out);
  ops.unpatchify(s.head_out, g.out_dim, g.grid, S, s.output);
}

}  // namespace unshard::wan::detail
