#pragma once
// Forward of the embeddings layer's sub-units: patch embedding (+ the rope tables of the grid),
// time embedding and projection, text embedding. Written once over an op set (ops/op_set.hpp):
// every read or write of a buffer's contents is an op. No allocation.
#include <cstddef>

#include "unshard/kernels/thread/rope.hpp"
#include "unshard/layer/param_source.hpp"
#include "unshard/models/wan/params.hpp"
#include "unshard/models/wan/state.hpp"
#include "unshard/ops/op_set.hpp"

namespace unshard::wan::detail {

// x[S, D] = Conv3d(input.x) as a GEMM over patch vectors; also fills rope.cos/sin, which depend
// on the grid alone (positions f, h, w of each token): host math, placed by the ops.
template <op_set O, param_source P>
void patch_embedding_forward(O& ops, const wan::geometry& g, P& p, wan::state& s) {
  const auto lay = patch_embedding_layout(g);
  check_params(lay.table, p, g.storage, wan::layer_kind::embeddings, 0, "patch_embedding");
  const auto [C, F, H, W] = g.latent;
  ops.patchify(s.input_x, C, F, H, W, g.grid, g.tokens, s.patches);
  ops.linear(s.patches, g.tokens, g.patch_in, p, lay.conv.weight, lay.conv.bias, s.x);

  const std::size_t c = g.rope_pairs;
  const auto tables = [&](float* cos, float* sin) {
    for (std::size_t t = 0; t < g.tokens; ++t) {
      const std::size_t w = t % g.grid.gw, h = (t / g.grid.gw) % g.grid.gh, f = t / (g.grid.gw * g.grid.gh);
      rope_table_row(f, h, w, c, cos + t * c, sin + t * c);
    }
  };
  ops.host_tables(s.rope_cos, s.rope_sin, g.tokens * c, as_host_fill(tables));
}

// e = time_embedding(sinusoid(t)) [D]; e0 = time_projection(e) [6, D]. The sinusoid lifts t to
// float64 first, as the official code does.
template <op_set O, param_source P>
void time_forward(O& ops, const wan::geometry& g, P& p, wan::state& s) {
  const auto lay = time_layout(g);
  check_params(lay.table, p, g.storage, wan::layer_kind::embeddings, 0, "time");
  ops.sinusoid_rows(s.input_t, 1, 1, g.freq_dim, s.time_sinusoid);
  ops.linear(s.time_sinusoid, 1, g.freq_dim, p, lay.embed0.weight, lay.embed0.bias, s.time_hidden);
  ops.silu(s.time_hidden, s.time_hidden, g.dim);
  ops.linear(s.time_hidden, 1, g.dim, p, lay.embed2.weight, lay.embed2.bias, s.e);
  // time_projection = Sequential(SiLU, Linear): silu(e) reuses time_hidden, e itself stays for the head.
  ops.silu(s.e, s.time_hidden, g.dim);
  ops.linear(s.time_hidden, 1, g.dim, p, lay.projection.weight, lay.projection.bias, s.e0);
}

// ctx[text_len, D] = Lin2(GELU_tanh(Lin0(context padded with zero rows))). The padded rows are
// embedded too (they become Lin2(GELU(b0))) and attended to: t2v applies no text mask.
template <op_set O, param_source P>
void text_embedding_forward(O& ops, const wan::geometry& g, P& p, wan::state& s) {
  const auto lay = text_layout(g);
  check_params(lay.table, p, g.storage, wan::layer_kind::embeddings, 0, "text_embedding");
  ops.linear(s.input_context, g.text_len, g.text_dim, p, lay.embed0.weight, lay.embed0.bias, s.text_hidden,
             linear_act::gelu_tanh);
  ops.linear(s.text_hidden, g.text_len, g.dim, p, lay.embed2.weight, lay.embed2.bias, s.ctx);
}

}  // namespace unshard::wan::detail
