#pragma once
// Forward of the embeddings layer's sub-units: patch embedding (+ the rope tables of the grid),
// time embedding and projection, text embedding. Host loops over the thread kernels; no allocation.
#include <cstddef>
#include <type_traits>

#include "unshard/kernels/host/gemm.hpp"
#include "unshard/kernels/host/linear_params.hpp"
#include "unshard/layer/param_source.hpp"
#include "unshard/kernels/thread/activation.hpp"
#include "unshard/kernels/thread/embedding.hpp"
#include "unshard/kernels/thread/patch.hpp"
#include "unshard/kernels/thread/rope.hpp"
#include "unshard/models/wan/params.hpp"
#include "unshard/models/wan/state.hpp"

namespace unshard::detail {

// x[S, D] = Conv3d(input.x) as a GEMM over patch vectors; also fills rope.cos/sin, which depend
// on the grid alone (positions f, h, w of each token).
template <param_source P>
void wan_patch_embedding_forward(const wan_geometry& g, P& p, wan_state& s) {
  const auto lay = wan_patch_embedding_layout(g);
  check_wan_params(lay.table, p, g.storage, wan_layer_kind::embeddings, 0, "patch_embedding");
  const auto [C, F, H, W] = g.latent;
  for (std::size_t t = 0; t < g.tokens; ++t) patchify_token(s.input_x, C, F, H, W, g.grid, t, s.patches + t * g.patch_in);
  linear_params(s.patches, g.tokens, g.patch_in, p, lay.conv.weight, lay.conv.bias, s.x, g.gemm);

  const std::size_t c = g.rope_pairs;
  for (std::size_t t = 0; t < g.tokens; ++t) {
    const std::size_t w = t % g.grid.gw, h = (t / g.grid.gw) % g.grid.gh, f = t / (g.grid.gw * g.grid.gh);
    rope_table_row(f, h, w, c, s.rope_cos + t * c, s.rope_sin + t * c);
  }
}

// e = time_embedding(sinusoid(t)) [D]; e0 = time_projection(e) [6, D].
template <param_source P>
void wan_time_forward(const wan_geometry& g, P& p, wan_state& s) {
  const auto lay = wan_time_layout(g);
  check_wan_params(lay.table, p, g.storage, wan_layer_kind::embeddings, 0, "time");
  const double t = s.input_t[0];  // the official code lifts t to float64 before the sinusoid
  for (std::size_t i = 0; i < g.freq_dim; ++i) s.time_sinusoid[i] = time_sinusoid(t, i, g.freq_dim);
  linear_params(s.time_sinusoid, 1, g.freq_dim, p, lay.embed0.weight, lay.embed0.bias, s.time_hidden, g.gemm);
  for (std::size_t i = 0; i < g.dim; ++i) s.time_hidden[i] = silu(s.time_hidden[i]);
  linear_params(s.time_hidden, 1, g.dim, p, lay.embed2.weight, lay.embed2.bias, s.e, g.gemm);
  // time_projection = Sequential(SiLU, Linear): silu(e) reuses time_hidden, e itself stays for the head.
  for (std::size_t i = 0; i < g.dim; ++i) s.time_hidden[i] = silu(s.e[i]);
  linear_params(s.time_hidden, 1, g.dim, p, lay.projection.weight, lay.projection.bias, s.e0, g.gemm);
}

// ctx[text_len, D] = Lin2(GELU_tanh(Lin0(context padded with zero rows))). The padded rows are
// embedded too (they become Lin2(GELU(b0))) and attended to: t2v applies no text mask.
template <param_source P>
void wan_text_embedding_forward(const wan_geometry& g, P& p, wan_state& s) {
  const auto lay = wan_text_layout(g);
  check_wan_params(lay.table, p, g.storage, wan_layer_kind::embeddings, 0, "text_embedding");
  linear_params(s.input_context, g.text_len, g.text_dim, p, lay.embed0.weight, lay.embed0.bias, s.text_hidden, g.gemm);
  for (std::size_t i = 0; i < g.text_len * g.dim; ++i) s.text_hidden[i] = gelu_tanh(s.text_hidden[i]);
  linear_params(s.text_hidden, g.text_len, g.dim, p, lay.embed2.weight, lay.embed2.bias, s.ctx, g.gemm);
}

}  // namespace unshard::detail
