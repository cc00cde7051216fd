#pragma once
// Forward of every S2V sub-unit on the stream state, written once over an op set (ops/op_set.hpp):
// host_ops runs it in f32 on the host, a device backend's ops on its memory. A sub-unit reads the
// call in the state: the sink runs the embeddings of the reference frame, the frame packer, the
// cond mask and every block (writing the cond cache); a streamed call runs the audio encoder, the
// embeddings of its block, every block (writing its noisy-cache slots), the audio injectors and
// the head. A sub-unit a call does not use returns at once. No allocation, and no read or write of
// a buffer's contents except through the ops.
//
// Every x·Wᵀ + b, convolutions as GEMMs included, is ops.linear over a param_source, so weight
// streaming (whole views or row chunks) goes through one place.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "unshard/layer/param_source.hpp"
#include "unshard/models/liveavatar/kernels.hpp"
#include "unshard/models/liveavatar/params.hpp"
#include "unshard/models/liveavatar/state.hpp"
#include "unshard/ops/op_set.hpp"

namespace unshard::s2v::detail {

template <op_set O>
void rms_rows(O& ops, const s2v::geometry& g, typename O::value_type* x, std::size_t rows, const tensor_view& weight) {
  ops.rms_norm(x, rows, g.dim, g.eps, weight);
}

template <op_set O>
void rope_rows(O& ops, const s2v::geometry& g, typename O::value_type* x, std::size_t rows, const float* cos,
                   const float* sin) {
  ops.rope(x, rows, g.heads, g.head_dim, cos, sin);
}

inline void require_call(const s2v::state& s, const char* where) {
  if (s.call.kind == s2v::call_kind::none)
    throw_error("liveavatar ", where, ": no call was set up (prepare must call begin_sink or begin_step)");
}

// Chunk `chunk` of the block modulation [2F, 6D] as each token reads it: frame t / fs in a streamed
// call, the t = 0 row F for every token of the sink.
inline modulation_rows block_modulation(const s2v::geometry& g, const s2v::state& s, std::size_t chunk) {
  const std::size_t D = g.dim;
  if (s.call.kind == s2v::call_kind::sink) return {s.modulation + g.frames * 6 * D + chunk * D, 6 * D, 0};
  return {s.modulation + chunk * D, 6 * D, g.frame_tokens};
}

// Rope position of cond token i (reference frame, then the motion buckets post / 2x / 4x).
struct position {
  std::int64_t t, h, w;
};
inline position cond_position(const s2v::geometry& g, std::size_t i, std::int64_t roll) {
  const std::size_t fs = g.frame_tokens;
  const auto gh1 = static_cast<std::int64_t>(g.gh) - 1, gw1 = static_cast<std::int64_t>(g.gw) - 1;
  if (i < 2 * fs) {
    const std::size_t j = i % fs;
    const std::int64_t t = i < fs ? s2v::ref_frame_position + roll : -1;
    return {t, static_cast<std::int64_t>(j / g.gw), static_cast<std::int64_t>(j % g.gw)};
  }
  i -= 2 * fs;
  if (i < g.h2 * g.w2) return {-3, linspace_trunc(i / g.w2, gh1, g.h2), linspace_trunc(i % g.w2, gw1, g.w2)};
  i -= g.h2 * g.w2;
  constexpr std::int64_t frames_4x[4] = {-19, -14, -9, -4};
  const std::size_t per = g.h4 * g.w4, f = i / per, j = i % per;
  return {frames_4x[f], linspace_trunc(j / g.w4, gh1, g.h4), linspace_trunc(j % g.w4, gw1, g.w4)};
}

// --- embeddings ------------------------------------------------------------------------------------

// Reference frame (sink) or noisy latents (streamed) through patch_embedding, and the call's rope
// tables, which depend on the call's positions alone.
template <op_set O, param_source P>
void patch_forward(O& ops, const s2v::geometry& g, P& p, s2v::state& s) {
  const auto lay = patch_layout(g);
  check_params(lay.table, p, g.storage, [] { return std::string(); });
  require_call(s, "patch_embedding");
  const std::size_t c = g.rope_pairs;
  const bool sink = s.call.kind == s2v::call_kind::sink;
  const patch_grid grid{1, 2, 2, sink ? 1 : g.frames, g.gh, g.gw};
  const std::size_t n = sink ? g.frame_tokens : g.block_tokens;
  ops.patchify(sink ? s.input_ref : s.input_x, g.in_dim, grid.gf, g.height, g.width, grid, n, s.patches);
  ops.linear(s.patches, n, g.patch_in, p, lay.conv.weight, lay.conv.bias, s.x);

  // Rope factors depend on the call's positions alone: host math, placed by the ops.
  const std::int64_t roll = s.call.roll;
  const auto cond_factors = [&](float* cos, float* sin) {
    for (std::size_t i = 0; i < g.cond_tokens; ++i) {
      const position q = cond_position(g, i, roll);
      rope_factors_row(q.t, q.h, q.w, c, cos + i * c, sin + i * c);
    }
  };
  ops.host_tables(s.rope_cond_cos, s.rope_cond_sin, g.cond_tokens * c, as_host_fill(cond_factors));
  if (sink) {
    ops.copy(s.rope_cos, s.rope_cond_cos, g.cond_tokens * c);
    ops.copy(s.rope_sin, s.rope_cond_sin, g.cond_tokens * c);
    return;
  }
  const auto n0 = static_cast<std::int64_t>(s.call.current_start / g.frame_tokens);
  const auto block_factors = [&](float* cos, float* sin) {
    for (std::size_t t = 0; t < g.block_tokens; ++t) {
      const std::size_t f = t / g.frame_tokens, j = t % g.frame_tokens;
      rope_factors_row(n0 + static_cast<std::int64_t>(f), static_cast<std::int64_t>(j / g.gw),
                           static_cast<std::int64_t>(j % g.gw), c, cos + t * c, sin + t * c);
    }
  };
  ops.host_tables(s.rope_cos, s.rope_sin, g.block_tokens * c, as_host_fill(block_factors));
}

// zero_timestep: rows 0..F-1 at the frames' t, rows F..2F-1 at t = 0; e [2F, D], e0 [2F, 6D].
template <op_set O, param_source P>
void time_forward(O& ops, const s2v::geometry& g, P& p, s2v::state& s) {
  const auto lay = wan::detail::time_layout(g);
  check_params(lay.table, p, g.storage, [] { return std::string(); });
  require_call(s, "time");
  const std::size_t rows = 2 * g.frames, D = g.dim;
  ops.sinusoid_rows(s.input_t, g.frames, rows, g.freq_dim, s.time_sinusoid);
  ops.linear(s.time_sinusoid, rows, g.freq_dim, p, lay.embed0.weight, lay.embed0.bias, s.time_hidden);
  ops.silu(s.time_hidden, s.time_hidden, rows * D);
  ops.linear(s.time_hidden, rows, D, p, lay.embed2.weight, lay.embed2.bias, s.e);
  ops.silu(s.e, s.time_hidden, rows * D);
  ops.linear(s.time_hidden, rows, D, p, lay.projection.weight, lay.projection.bias, s.e0);
}

template <op_set O, param_source P>
void text_forward(O& ops, const s2v::geometry& g, P& p, s2v::state& s) {
  const auto lay = wan::detail::text_layout(g);
  check_params(lay.table, p, g.storage, [] { return std::string(); });
  ops.linear(s.input_context, g.text_len, g.text_dim, p, lay.embed0.weight, lay.embed0.bias, s.text_hidden,
             linear_act::gelu_tanh);
  ops.linear(s.text_hidden, g.text_len, g.dim, p, lay.embed2.weight, lay.embed2.bias, s.ctx);
}

// --- frame packer (sink only) -----------------------------------------------------------------------

// Bucket b of the 19-frame zero-padded motion buffer (frames [18,19) post, [16,18) 2x, [0,16) 4x),
// patchified at its kernel into the cond tokens after the reference frame.
template <op_set O, param_source P>
void pack_forward(O& ops, const s2v::geometry& g, std::size_t bucket, P& p, s2v::state& s) {
  const auto lay = pack_layout(g, bucket);
  check_params(lay.table, p, g.storage, [] { return std::string("frame_packer."); });
  require_call(s, "frame_packer");
  if (s.call.kind != s2v::call_kind::sink) return;
  constexpr std::size_t first_frame[3] = {18, 16, 0}, kernel_t[3] = {1, 2, 4}, kernel_hw[3] = {2, 4, 8};
  const std::size_t nf = s2v::pack_frames[bucket], C = s2v::pack_channels, HW = g.height * g.width;
  const std::size_t Tm = g.motion_latent_frames;
  // Buffer frame k holds motion frame Tm - 19 + k (the last min(19, Tm) frames), else zeros.
  for (std::size_t ch = 0; ch < C; ++ch)
    for (std::size_t a = 0; a < nf; ++a) {
      const std::size_t k = first_frame[bucket] + a;
      float* dst = s.pack_in + (ch * nf + a) * HW;
      if (k + Tm >= s2v::pack_total_frames)
        ops.copy(dst, s.input_motion + (ch * Tm + (k + Tm - s2v::pack_total_frames)) * HW, HW);
      else
        ops.fill(dst, HW, 0.0f);
    }
  const std::size_t kt = kernel_t[bucket], kh = kernel_hw[bucket];
  const patch_grid grid{kt, kh, kh, nf / kt, g.height / kh, g.width / kh};
  const std::size_t n = grid.gf * grid.gh * grid.gw, vec = C * kt * kh * kh;
  const std::size_t first_token = g.frame_tokens + (bucket == 0 ? 0 : bucket == 1 ? g.frame_tokens : g.frame_tokens + g.h2 * g.w2);
  ops.patchify(s.pack_in, C, nf, g.height, g.width, grid, n, s.patches);
  ops.linear(s.patches, n, vec, p, lay.conv.weight, lay.conv.bias, s.x + first_token * g.dim);
}

// --- cond encoder and cond mask ----------------------------------------------------------------------

// Sink: X = [ref + mask[1]; motion + mask[2]]. Streamed: X = (patch(x) + cond_encoder(cond)) + mask[0].
template <op_set O, param_source P>
void cond_forward(O& ops, const s2v::geometry& g, P& p, s2v::state& s) {
  const auto lay = cond_layout(g);
  check_params(lay.table, p, g.storage, [] { return std::string(); });
  require_call(s, "cond_encoder");
  const std::size_t D = g.dim, fs = g.frame_tokens;
  const tensor_view mask = p.whole(lay.mask);
  if (s.call.kind == s2v::call_kind::sink) {
    ops.add_rows(s.x, nullptr, fs, D, mask, 1);
    ops.add_rows(s.x + fs * D, nullptr, g.cond_tokens - fs, D, mask, 2);
    return;
  }
  const patch_grid grid{1, 2, 2, g.frames, g.gh, g.gw};
  ops.patchify(s.input_cond, g.cond_dim, g.frames, g.height, g.width, grid, g.block_tokens, s.patches);
  ops.linear(s.patches, g.block_tokens, g.cond_dim * 4, p, lay.conv.weight, lay.conv.bias, s.proj);
  ops.add_rows(s.x, s.proj, g.block_tokens, D, mask, 0);
}

// --- audio encoder (streamed calls only) ---------------------------------------------------------

// out[streams * T_out, O] = CausalConv1d of each stream j (x + j * T_in * C) through its input
// vectors, all streams in one GEMM so that the weight is read once (a streamed weight must be).
template <op_set O, param_source P>
void causal_conv(O& ops, const typename O::value_type* x, std::size_t streams, std::size_t t_in,
                     std::size_t channels, std::size_t stride, P& p, std::size_t w, std::size_t b,
                     typename O::value_type* cols, typename O::value_type* out) {
  ops.causal_conv_inputs(x, streams, t_in, channels, stride, cols);
  ops.linear(cols, streams * conv_out_len(t_in, stride), 3 * channels, p, w, b, out);
}

template <op_set O, param_source P>
void audio_forward(O& ops, const s2v::geometry& g, std::size_t sub, P& p, s2v::state& s) {
  const auto lay = audio_layout(g, sub);
  check_params(lay.table, p, g.storage, [] { return std::string("casual_audio_encoder."); });
  require_call(s, "audio encoder");
  if (s.call.kind != s2v::call_kind::stream) return;
  const std::size_t D = g.dim, q = D / 4, h = D / 2, n = g.audio_tokens, T = g.audio_t, T2 = g.audio_t2,
                    T3 = g.audio_t3, Ca = g.audio_dim, A = g.audio_frames;
  switch (sub) {
    case 0: {
      // feat[t, c] = Σ_l a[l, c, col(t)] SiLU(w_l) / Σ SiLU(w); the first column repeated over the
      // motion video frames, then the call's columns.
      ops.mix_layers(s.input_audio, s2v::audio_layers, Ca, A, p.whole(lay.layer_weights), T, g.motion_video_frames,
                     s.audio_feat);
      // Local conv1 -> [T, n*q] (streams interleaved per step; z2 is free scratch until conv2),
      // scattered to stream-major z1; the global conv1 lands in z1's last stream directly.
      causal_conv(ops, s.audio_feat, 1, T, Ca, 1, p, lay.local.weight, lay.local.bias, s.audio_cols, s.audio_z2);
      for (std::size_t j = 0; j < n; ++j) ops.copy_rows(s.audio_z1 + j * T * q, q, s.audio_z2 + j * q, n * q, T, q);
      causal_conv(ops, s.audio_feat, 1, T, Ca, 1, p, lay.global.weight, lay.global.bias, s.audio_cols,
                      s.audio_z1 + n * T * q);
      ops.layer_norm_silu(s.audio_z1, (n + 1) * T, q, 1e-6);
      return;
    }
    case 1:
      causal_conv(ops, s.audio_z1, n + 1, T, q, 2, p, lay.conv.weight, lay.conv.bias, s.audio_cols, s.audio_z2);
      ops.layer_norm_silu(s.audio_z2, (n + 1) * T2, h, 1e-6);
      return;
    case 2: {
      causal_conv(ops, s.audio_z2, n + 1, T2, h, 2, p, lay.conv.weight, lay.conv.bias, s.audio_cols, s.audio_z3);
      ops.layer_norm_silu(s.audio_z3, (n + 1) * T3, D, 1e-6);
      // Local streams interleave per step into audio_local; the global one (stream n) stays in z3.
      for (std::size_t j = 0; j < n; ++j)
        ops.copy_rows(s.audio_local + j * D, (n + 1) * D, s.audio_z3 + j * T3 * D, D, T3, D);
      ops.broadcast_row(s.audio_local + n * D, (n + 1) * D, T3, p.whole(lay.padding_tokens), D);
      return;
    }
    default:
      ops.linear(s.audio_z3 + n * T3 * D, T3, D, p, lay.conv.weight, lay.conv.bias, s.audio_global);
      return;
  }
}

// --- block --------------------------------------------------------------------------------------

template <op_set O>
void modulated_norm(O& ops, const s2v::geometry& g, const s2v::state& s, std::size_t chunk_shift,
                        std::size_t chunk_scale, typename O::value_type* y) {
  ops.layer_norm_modulate(s.x, y, s.call.tokens, g.dim, g.eps, block_modulation(g, s, chunk_shift),
                          block_modulation(g, s, chunk_scale));
}

template <op_set O>
void gated_residual(O& ops, const s2v::geometry& g, s2v::state& s, std::size_t chunk_gate) {
  ops.gated_residual(s.x, s.proj, block_modulation(g, s, chunk_gate), s.call.tokens, g.dim);
}

template <op_set O, param_source P>
void self_attn_forward(O& ops, const s2v::geometry& g, std::size_t block, P& p, s2v::state& s) {
  const auto lay = self_attn_layout(g);
  check_params(lay.table, p, g.storage, [&] { return "blocks." + std::to_string(block) + "."; });
  require_call(s, "self_attn");
  const std::size_t S = s.call.tokens, D = g.dim, F2 = 2 * g.frames;
  ops.add_param_rows(s.modulation, p.whole(lay.modulation), s.e0, F2, 6 * D, 6 * D, 6 * D);

  modulated_norm(ops, g, s, 0, 1, s.norm);
  const auto& a = lay.attn;
  ops.linear(s.norm, S, D, p, a.q.weight, a.q.bias, s.q);
  ops.linear(s.norm, S, D, p, a.k.weight, a.k.bias, s.k);
  ops.linear(s.norm, S, D, p, a.v.weight, a.v.bias, s.v);
  rms_rows(ops, g, s.q, S, p.whole(a.norm_q));
  rms_rows(ops, g, s.k, S, p.whole(a.norm_k));

  if (s.call.kind == s2v::call_kind::sink) {
    // The cond cache keeps k un-roped: every streamed call ropes it at its own roll-out.
    ops.write_cache(s.kv_page(s.cond_k, s.cond_k_pages, block, g.cond_slots * D), s.k, S * D);
    ops.write_cache(s.kv_page(s.cond_v, s.cond_v_pages, block, g.cond_slots * D), s.v, S * D);
    ops.store_count(s.cond_end_slot, std::max(ops.load_count(s.cond_end_slot), S));
    rope_rows(ops, g, s.q, S, s.rope_cos, s.rope_sin);
    rope_rows(ops, g, s.k, S, s.rope_cos, s.rope_sin);
    ops.attention(s.q, S, {s.k, s.v, S}, {}, g.heads, g.head_dim, s.scores, s.attn);
  } else {
    rope_rows(ops, g, s.q, S, s.rope_cos, s.rope_sin);
    rope_rows(ops, g, s.k, S, s.rope_cos, s.rope_sin);
    // Noisy keys are cached roped; the write wraps at the cache size, RoPE positions do not.
    const std::size_t step = s.call.step;
    const kv_cache_ref nk = s.kv_page(s.noisy_k[step], s.noisy_k_pages[step], block, g.noisy_slots * D);
    const kv_cache_ref nv = s.kv_page(s.noisy_v[step], s.noisy_v_pages[step], block, g.noisy_slots * D);
    ops.write_cache(nk.at(s.call.write_slot * D), s.k, S * D);
    ops.write_cache(nv.at(s.call.write_slot * D), s.v, S * D);
    const std::size_t nc = ops.load_count(s.cond_end_slot);
    const kv_cache_ref ck = s.kv_page(s.cond_k, s.cond_k_pages, block, g.cond_slots * D);
    const kv_cache_ref cv = s.kv_page(s.cond_v, s.cond_v_pages, block, g.cond_slots * D);
    ops.read_cache(s.cond_k_rope, ck, nc * D);
    rope_rows(ops, g, s.cond_k_rope, nc, s.rope_cond_cos, s.rope_cond_sin);
    ops.attention(s.q, S, {nk, nv, s.call.active_slots}, {s.cond_k_rope, cv, nc}, g.heads, g.head_dim, s.scores,
                  s.attn);
  }
  ops.linear(s.attn, S, D, p, a.o.weight, a.o.bias, s.proj);
  gated_residual(ops, g, s, 2);
}

template <op_set O, param_source P>
void cross_attn_forward(O& ops, const s2v::geometry& g, std::size_t block, P& p, s2v::state& s) {
  const auto lay = cross_attn_layout(g);
  check_params(lay.table, p, g.storage, [&] { return "blocks." + std::to_string(block) + "."; });
  require_call(s, "cross_attn");
  const std::size_t S = s.call.tokens, D = g.dim, Lt = g.text_len;
  const float* in = s.x;
  if (g.cross_attn_norm) {
    ops.layer_norm(s.x, s.norm, S, D, g.eps, p.whole(lay.norm3_weight), p.whole(lay.norm3_bias));
    in = s.norm;
  }
  const auto& a = lay.attn;
  ops.linear(in, S, D, p, a.q.weight, a.q.bias, s.q);
  ops.linear(s.ctx, Lt, D, p, a.k.weight, a.k.bias, s.k);
  ops.linear(s.ctx, Lt, D, p, a.v.weight, a.v.bias, s.v);
  rms_rows(ops, g, s.q, S, p.whole(a.norm_q));
  rms_rows(ops, g, s.k, Lt, p.whole(a.norm_k));
  ops.grouped_attention(s.q, S, {s.k, s.v, Lt}, g.heads, g.head_dim, 1, s.scores, s.attn);
  ops.linear(s.attn, S, D, p, a.o.weight, a.o.bias, s.proj);
  ops.residual(s.x, s.proj, S * D);
}

template <op_set O>
void record_block(O& ops, const s2v::geometry& g, std::size_t block, s2v::state& s) {
  if (g.record_block_outputs) ops.copy(s.block_outputs + block * g.max_tokens() * g.dim, s.x, s.call.tokens * g.dim);
}

template <op_set O, param_source P>
void ffn_forward(O& ops, const s2v::geometry& g, std::size_t block, P& p, s2v::state& s) {
  const auto lay = ffn_layout(g);
  check_params(lay.table, p, g.storage, [&] { return "blocks." + std::to_string(block) + "."; });
  require_call(s, "ffn");
  const std::size_t S = s.call.tokens, D = g.dim;
  modulated_norm(ops, g, s, 3, 4, s.norm);
  ops.linear(s.norm, S, D, p, lay.fc0.weight, lay.fc0.bias, s.ffn_hidden, linear_act::gelu_tanh);
  ops.linear(s.ffn_hidden, S, g.ffn_dim, p, lay.fc2.weight, lay.fc2.bias, s.proj);
  gated_residual(ops, g, s, 5);
  record_block(ops, g, block, s);
}

// --- audio injector j, after block audio_inject_layers[j] (streamed calls only) ---------------------

// AdaLN per frame f: [shift; scale] = Lin(SiLU(glob[Tm + f])), norm = LN_1e-5(X_f)(1 + scale) + shift.
template <op_set O, param_source P>
void adain_forward(O& ops, const s2v::geometry& g, std::size_t j, P& p, s2v::state& s) {
  const auto lay = adain_layout(g);
  check_params(lay.table, p, g.storage,
                   [&] { return "audio_injector.injector_adain_layers." + std::to_string(j) + "."; });
  require_call(s, "audio injector");
  if (s.call.kind != s2v::call_kind::stream) return;
  const std::size_t D = g.dim, F = g.frames, fs = g.frame_tokens;
  const float* glob = s.audio_global + g.motion_latent_frames * D;
  ops.silu(glob, s.time_hidden, F * D);
  ops.linear(s.time_hidden, F, D, p, lay.linear.weight, lay.linear.bias, s.adain);
  const modulation_rows shift{s.adain, 2 * D, fs};
  ops.layer_norm_modulate(s.x, s.norm, g.block_tokens, D, 1e-5, shift, shift.offset(D));
}

// Per-frame cross-attention of the frame's tokens to its own n_tok + 1 audio tokens; x += o(·).
template <op_set O, param_source P>
void injector_attn_forward(O& ops, const s2v::geometry& g, std::size_t j, std::size_t block, P& p, s2v::state& s) {
  const auto lay = injector_attn_layout(g);
  check_params(lay.table, p, g.storage, [&] { return "audio_injector.injector." + std::to_string(j) + "."; });
  require_call(s, "audio injector");
  if (s.call.kind != s2v::call_kind::stream) return;
  const std::size_t D = g.dim, fs = g.frame_tokens, L = g.block_tokens, na = g.audio_tokens + 1;
  const auto& a = lay.attn;
  ops.linear(s.norm, L, D, p, a.q.weight, a.q.bias, s.q);
  rms_rows(ops, g, s.q, L, p.whole(a.norm_q));
  // K and V of every frame's audio tokens in one GEMM each (the frames' rows are contiguous), so
  // each weight is read once, as a streamed weight must be; frame f then attends to its own rows.
  const float* audio = s.audio_local + g.motion_latent_frames * na * D;
  ops.linear(audio, g.frames * na, D, p, a.k.weight, a.k.bias, s.k);
  ops.linear(audio, g.frames * na, D, p, a.v.weight, a.v.bias, s.v);
  rms_rows(ops, g, s.k, g.frames * na, p.whole(a.norm_k));
  ops.grouped_attention(s.q, g.frames * fs, {s.k, s.v, g.frames * na}, g.heads, g.head_dim, g.frames, s.scores, s.attn);
  ops.linear(s.attn, L, D, p, a.o.weight, a.o.bias, s.proj);
  ops.residual(s.x, s.proj, L * D);
  record_block(ops, g, block, s);
}

// --- head (streamed calls only) ------------------------------------------------------------------

// Per frame f: LN(x)(1 + m1 + e[f]) + (m0 + e[f]) through head.head, then unpatchify.
template <op_set O, param_source P>
void head_forward(O& ops, const s2v::geometry& g, P& p, s2v::state& s) {
  const auto lay = head_layout(g);
  check_params(lay.table, p, g.storage, [] { return std::string("head."); });
  require_call(s, "head");
  if (s.call.kind != s2v::call_kind::stream) return;
  const std::size_t D = g.dim, L = g.block_tokens;
  ops.add_param_rows(s.modulation, p.whole(lay.modulation), s.e, g.frames, 2 * D, D, D);
  const modulation_rows shift{s.modulation, 2 * D, g.frame_tokens};
  ops.layer_norm_modulate(s.x, s.norm, L, D, g.eps, shift, shift.offset(D));
  ops.linear(s.norm, L, D, p, lay.head.weight, lay.head.bias, s.head_out);
  ops.unpatchify(s.head_out, g.out_dim, patch_grid{1, 2, 2, g.frames, g.gh, g.gw}, L, s.output);
}

}  // namespace unshard::s2v::detail
