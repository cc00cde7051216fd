#pragma once
// Forward of a WanAttentionBlock's sub-units on the residual stream x [S, D]:
//   self_attn  m = modulation + e0;  x += o(attn(rope(RMS(q(h))), rope(RMS(k(h))), v(h))) * m2,
//              h = LN(x)(1 + m1) + m0
//   cross_attn x += o(attn(RMS(q(norm3(x))), RMS(k(ctx)), v(ctx)))         (no gate, no rope)
//   ffn        x += ffn.2(GELU(ffn.0(LN(x)(1 + m4) + m3))) * m5
// The self_attn sub-unit owns blocks.i.modulation, so it leaves m in the state for the ffn
// sub-unit, which may be gathered separately. Written once over an op set (ops/op_set.hpp): every
// read or write of a buffer's contents is an op. No allocation.
//
// Attention is the op set's grouped_attention with one group: on the host, one row of scores at a
// time (multi_head_attention), whatever the GEMM path.
#include <cstddef>

#include "unshard/layer/param_source.hpp"
#include "unshard/models/wan/norms.hpp"
#include "unshard/models/wan/params.hpp"
#include "unshard/models/wan/state.hpp"
#include "unshard/ops/op_set.hpp"

namespace unshard::wan::detail {

template <op_set O, param_source P>
void self_attn_forward(O& ops, const wan::geometry& g, std::size_t block, P& p, wan::state& s) {
  const auto lay = self_attn_layout(g);
  check_params(lay.table, p, g.storage, wan::layer_kind::block, block, "self_attn");
  const std::size_t S = g.tokens, D = g.dim;
  ops.add_param_rows(s.modulation, p.whole(lay.modulation), s.e0, 1, 6 * D, 6 * D, 6 * D);

  ops.layer_norm_modulate(s.x, s.norm, S, D, g.eps, modulation(g, s.modulation, 0),
                          modulation(g, s.modulation, 1));
  ops.linear(s.norm, S, D, p, lay.q.weight, lay.q.bias, s.q);
  ops.linear(s.norm, S, D, p, lay.k.weight, lay.k.bias, s.k);
  ops.linear(s.norm, S, D, p, lay.v.weight, lay.v.bias, s.v);
  if (g.qk_norm) {
    ops.rms_norm(s.q, S, D, g.eps, p.whole(lay.norm_q));
    ops.rms_norm(s.k, S, D, g.eps, p.whole(lay.norm_k));
  }
  ops.rope(s.q, S, g.heads, g.head_dim, s.rope_cos, s.rope_sin);
  ops.rope(s.k, S, g.heads, g.head_dim, s.rope_cos, s.rope_sin);
  ops.grouped_attention(s.q, S, {s.k, s.v, S}, g.heads, g.head_dim, 1, s.scores, s.attn);
  ops.linear(s.attn, S, D, p, lay.o.weight, lay.o.bias, s.proj);
  ops.gated_residual(s.x, s.proj, modulation(g, s.modulation, 2), S, D);
}

template <op_set O, param_source P>
void cross_attn_forward(O& ops, const wan::geometry& g, std::size_t block, P& p, wan::state& s) {
  const auto lay = cross_attn_layout(g);
  check_params(lay.table, p, g.storage, wan::layer_kind::block, block, "cross_attn");
  const std::size_t S = g.tokens, D = g.dim, L = g.text_len;

  const float* in = s.x;  // norm3 is Identity without cross_attn_norm
  if (g.cross_attn_norm) {
    ops.layer_norm(s.x, s.norm, S, D, g.eps, p.whole(lay.norm3_weight), p.whole(lay.norm3_bias));
    in = s.norm;
  }
  ops.linear(in, S, D, p, lay.q.weight, lay.q.bias, s.q);
  // K/V of the text context: recomputed per block from that block's weights (ctx is shared).
  ops.linear(s.ctx, L, D, p, lay.k.weight, lay.k.bias, s.k);
  ops.linear(s.ctx, L, D, p, lay.v.weight, lay.v.bias, s.v);
  if (g.qk_norm) {
    ops.rms_norm(s.q, S, D, g.eps, p.whole(lay.norm_q));
    ops.rms_norm(s.k, L, D, g.eps, p.whole(lay.norm_k));
  }
  ops.grouped_attention(s.q, S, {s.k, s.v, L}, g.heads, g.head_dim, 1, s.scores, s.attn);
  ops.linear(s.attn, S, D, p, lay.o.weight, lay.o.bias, s.proj);
  ops.residual(s.x, s.proj, S * D);
}

template <op_set O, param_source P>
void ffn_forward(O& ops, const wan::geometry& g, std::size_t block, P& p, wan::state& s) {
  const auto lay = ffn_layout(g);
  check_params(lay.table, p, g.storage, wan::layer_kind::block, block, "ffn");
  const std::size_t S = g.tokens, D = g.dim;

  ops.layer_norm_modulate(s.x, s.norm, S, D, g.eps, modulation(g, s.modulation, 3),
                          modulation(g, s.modulation, 4));
  ops.linear(s.norm, S, D, p, lay.fc0.weight, lay.fc0.bias, s.ffn_hidden, linear_act::gelu_tanh);
  ops.linear(s.ffn_hidden, S, g.ffn_dim, p, lay.fc2.weight, lay.fc2.bias, s.proj);
  ops.gated_residual(s.x, s.proj, modulation(g, s.modulation, 5), S, D);
  if (g.record_block_outputs) ops.copy(s.block_outputs + block * S * D, s.x, S * D);
}

}  // namespace unshard::wan::detail
