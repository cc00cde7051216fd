#pragma once
// Forward of a WanAttentionBlock's sub-units on the residual stream x [S, D]:
//   self_attn  m = modulation + e0;  x += o(attn(rope(RMS(q(h))), rope(RMS(k(h))), v(h))) * m2,
//              h = LN(x)(1 + m1) + m0
//   cross_attn x += o(attn(RMS(q(norm3(x))), RMS(k(ctx)), v(ctx)))         (no gate, no rope)
//   ffn        x += ffn.2(GELU(ffn.0(LN(x)(1 + m4) + m3))) * m5
// The self_attn sub-unit owns blocks.i.modulation, so it leaves m in the state for the ffn
// sub-unit, which may be gathered separately. No allocation.
#include <algorithm>
#include <cstddef>
#include <type_traits>

#include "unshard/kernels/host/attention.hpp"
#include "unshard/kernels/host/gemm.hpp"
#include "unshard/kernels/host/linear_params.hpp"
#include "unshard/layer/param_source.hpp"
#include "unshard/kernels/host/typed_storage.hpp"
#include "unshard/kernels/thread/activation.hpp"
#include "unshard/kernels/thread/norm.hpp"
#include "unshard/kernels/thread/residual.hpp"
#include "unshard/kernels/thread/rope.hpp"
#include "unshard/models/wan/norms.hpp"
#include "unshard/models/wan/params.hpp"
#include "unshard/models/wan/state.hpp"

namespace unshard::detail {

// Rotates every head of every token of q or k [S, D] by the token's rope angles.
inline void wan_apply_rope(const wan_geometry& g, const wan_state& s, float* x) {
  const std::size_t c = g.rope_pairs;
  for (std::size_t t = 0; t < g.tokens; ++t)
    for (std::size_t h = 0; h < g.heads; ++h)
      rope_rotate_row(x + t * g.dim + h * g.head_dim, s.rope_cos + t * c, s.rope_sin + t * c, c);
}

template <param_source P>
void wan_self_attn_forward(const wan_geometry& g, std::size_t block, P& p, wan_state& s) {
  const auto lay = wan_self_attn_layout(g);
  check_wan_params(lay.table, p, g.storage, wan_layer_kind::block, block, "self_attn");
  const std::size_t S = g.tokens, D = g.dim;
  const tensor_view mod = p.whole(lay.modulation);
  for (std::size_t i = 0; i < 6 * D; ++i) s.modulation[i] = mod.load(i) + s.e0[i];
  const float *shift = s.modulation, *scale = s.modulation + D, *gate = s.modulation + 2 * D;

  wan_modulated_norm(g, s.x, shift, scale, s.norm);
  linear_params(s.norm, S, D, p, lay.q.weight, lay.q.bias, s.q, g.gemm);
  linear_params(s.norm, S, D, p, lay.k.weight, lay.k.bias, s.k, g.gemm);
  linear_params(s.norm, S, D, p, lay.v.weight, lay.v.bias, s.v, g.gemm);
  if (g.qk_norm) {
    wan_rms_norm_rows(s.q, S, g, p.whole(lay.norm_q));
    wan_rms_norm_rows(s.k, S, g, p.whole(lay.norm_k));
  }
  wan_apply_rope(g, s, s.q);
  wan_apply_rope(g, s, s.k);
  multi_head_attention(s.q, S, s.k, s.v, S, g.heads, g.head_dim, s.scores, s.attn);
  linear_params(s.attn, S, D, p, lay.o.weight, lay.o.bias, s.proj, g.gemm);
  for (std::size_t t = 0; t < S; ++t) gated_residual_row(s.x + t * D, s.proj + t * D, gate, D);
}

template <param_source P>
void wan_cross_attn_forward(const wan_geometry& g, std::size_t block, P& p, wan_state& s) {
  const auto lay = wan_cross_attn_layout(g);
  check_wan_params(lay.table, p, g.storage, wan_layer_kind::block, block, "cross_attn");
  const std::size_t S = g.tokens, D = g.dim, L = g.text_len;

  const float* in = s.x;  // norm3 is Identity without cross_attn_norm
  if (g.cross_attn_norm) {
    visit_storage(p.whole(lay.norm3_weight), [&](const auto* w) {
      using storage_type = std::remove_cv_t<std::remove_pointer_t<decltype(w)>>;
      const storage_type* b = typed_data<storage_type>(p.whole(lay.norm3_bias));
      for (std::size_t t = 0; t < S; ++t) layer_norm_row(s.x + t * D, D, g.eps, w, b, s.norm + t * D);
    });
    in = s.norm;
  }
  linear_params(in, S, D, p, lay.q.weight, lay.q.bias, s.q, g.gemm);
  // K/V of the text context: recomputed per block from that block's weights (ctx is shared).
  linear_params(s.ctx, L, D, p, lay.k.weight, lay.k.bias, s.k, g.gemm);
  linear_params(s.ctx, L, D, p, lay.v.weight, lay.v.bias, s.v, g.gemm);
  if (g.qk_norm) {
    wan_rms_norm_rows(s.q, S, g, p.whole(lay.norm_q));
    wan_rms_norm_rows(s.k, L, g, p.whole(lay.norm_k));
  }
  multi_head_attention(s.q, S, s.k, s.v, L, g.heads, g.head_dim, s.scores, s.attn);
  linear_params(s.attn, S, D, p, lay.o.weight, lay.o.bias, s.proj, g.gemm);
  for (std::size_t t = 0; t < S; ++t) residual_row(s.x + t * D, s.proj + t * D, D);
}

template <param_source P>
void wan_ffn_forward(const wan_geometry& g, std::size_t block, P& p, wan_state& s) {
  const auto lay = wan_ffn_layout(g);
  check_wan_params(lay.table, p, g.storage, wan_layer_kind::block, block, "ffn");
  const std::size_t S = g.tokens, D = g.dim;
  const float *shift = s.modulation + 3 * D, *scale = s.modulation + 4 * D, *gate = s.modulation + 5 * D;

  wan_modulated_norm(g, s.x, shift, scale, s.norm);
  linear_params(s.norm, S, D, p, lay.fc0.weight, lay.fc0.bias, s.ffn_hidden, g.gemm);
  for (std::size_t i = 0; i < S * g.ffn_dim; ++i) s.ffn_hidden[i] = gelu_tanh(s.ffn_hidden[i]);
  linear_params(s.ffn_hidden, S, g.ffn_dim, p, lay.fc2.weight, lay.fc2.bias, s.proj, g.gemm);
  for (std::size_t t = 0; t < S; ++t) gated_residual_row(s.x + t * D, s.proj + t * D, gate, D);
  if (g.record_block_outputs) std::copy(s.x, s.x + S * D, s.block_outputs + block * S * D);
}

}  // namespace unshard::detail
