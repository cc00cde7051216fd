#pragma once
// Forward of every S2V sub-unit on the stream state (README.liveavatar.md §3 gives the math in this
// order). A sub-unit reads the call in the state: the sink runs the embeddings of the reference
// frame, the frame packer, the cond mask and every block (writing the cond cache); a streamed call
// runs the audio encoder, the embeddings of its block, every block (writing its noisy-cache slots),
// the audio injectors and the head. A sub-unit a call does not use returns at once. No allocation.
//
// Every x·Wᵀ + b, convolutions as GEMMs included, goes through s2v_linear, so weight streaming can
// be routed through one place.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "unshard/kernels/host/attention.hpp"
#include "unshard/kernels/host/gemm.hpp"
#include "unshard/kernels/host/typed_storage.hpp"
#include "unshard/kernels/thread/activation.hpp"
#include "unshard/kernels/thread/embedding.hpp"
#include "unshard/kernels/thread/norm.hpp"
#include "unshard/kernels/thread/patch.hpp"
#include "unshard/kernels/thread/residual.hpp"
#include "unshard/kernels/thread/rope.hpp"
#include "unshard/kernels/host/linear_params.hpp"
#include "unshard/layer/param_source.hpp"
#include "unshard/models/liveavatar/kernels.hpp"
#include "unshard/models/liveavatar/params.hpp"
#include "unshard/models/liveavatar/state.hpp"

namespace unshard::detail {

// Self-attention of every query row and head over two key segments: n1 rows of k1/v1 then n2 rows of
// k2/v2, all rows of width heads*head_dim (Live Avatar's noisy cache + cond keys; n2 = 0 for one
// segment). Exact softmax in f32. On the blas path a head's scores come from GEMMs for
// attention_block_rows query rows at a time, softmax rows in place, then P·V as GEMMs: the same math
// as attention_row_two_segments in another summation order (about 1e-7 relative), and an order of
// magnitude faster than one query row at a time. `scores`: attention_scratch_floats(path, n1 + n2).
inline void s2v_attention_two_segments(gemm_path path, const float* q, std::size_t n_queries, const float* k1,
                                              const float* v1, std::size_t n1, const float* k2, const float* v2,
                                              std::size_t n2, std::size_t heads, std::size_t head_dim, float* scores,
                                              float* out) {
  const std::size_t ld = heads * head_dim, n = n1 + n2;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
#if defined(UNSHARD_HAVE_CBLAS)
  if (attention_uses_blas(path) && n > 0) {
    const auto i = [](std::size_t v) { return static_cast<int>(v); };
    for (std::size_t h = 0; h < heads; ++h) {
      const std::size_t col = h * head_dim;
      for (std::size_t r0 = 0; r0 < n_queries; r0 += attention_block_rows) {
        const std::size_t m = std::min(attention_block_rows, n_queries - r0);
        const float* qh = q + r0 * ld + col;
        float* oh = out + r0 * ld + col;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, i(m), i(n1), i(head_dim), scale, qh, i(ld), k1 + col, i(ld),
                    0.0f, scores, i(n));
        if (n2)
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, i(m), i(n2), i(head_dim), scale, qh, i(ld), k2 + col,
                      i(ld), 0.0f, scores + n1, i(n));
        for (std::size_t r = 0; r < m; ++r) softmax_in_place(scores + r * n, n);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, i(m), i(head_dim), i(n1), 1.0f, scores, i(n), v1 + col,
                    i(ld), 0.0f, oh, i(ld));
        if (n2)
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, i(m), i(head_dim), i(n2), 1.0f, scores + n1, i(n),
                      v2 + col, i(ld), 1.0f, oh, i(ld));
      }
    }
    return;
  }
#endif
  for (std::size_t t = 0; t < n_queries; ++t)
    for (std::size_t h = 0; h < heads; ++h) {
      const std::size_t col = h * head_dim;
      attention_row_two_segments(q + t * ld + col, k1 + col, v1 + col, n1, k2 + col, v2 + col, n2, ld, head_dim, scale,
                                 scores, out + t * ld + col);
    }
}


// y[rows, N] = x[rows, in] · Wᵀ + b: the one entry point of every linear map of the model, over
// whole views or streamed chunks of W (see linear_params).
template <param_source P>
void s2v_linear(const s2v_geometry& g, const float* x, std::size_t rows, std::size_t in, P& p, std::size_t w,
                std::size_t b, float* y) {
  linear_params(x, rows, in, p, w, b, y, g.gemm);
}

inline void s2v_rms_rows(const s2v_geometry& g, float* x, std::size_t rows, const tensor_view& weight) {
  visit_storage(weight, [&](const auto* w) {
    for (std::size_t r = 0; r < rows; ++r) rms_norm_row(x + r * g.dim, g.dim, g.eps, w, x + r * g.dim);
  });
}

inline void s2v_rope_rows(const s2v_geometry& g, float* x, std::size_t rows, const float* cos, const float* sin) {
  const std::size_t c = g.rope_pairs;
  for (std::size_t t = 0; t < rows; ++t)
    for (std::size_t h = 0; h < g.heads; ++h) rope_rotate_row(x + t * g.dim + h * g.head_dim, cos + t * c, sin + t * c, c);
}

inline void s2v_require_call(const s2v_state& s, const char* where) {
  if (s.call.kind == s2v_call_kind::none)
    throw_error("liveavatar ", where, ": no call was set up (prepare must call begin_sink or begin_step)");
}

// Row of e/e0/modulation a token uses: frame s / fs in a streamed call, the t = 0 row F in the sink.
inline std::size_t s2v_time_row(const s2v_geometry& g, const s2v_state& s, std::size_t token) {
  return s.call.kind == s2v_call_kind::sink ? g.frames : token / g.frame_tokens;
}

// Rope position of cond token i (reference frame, then the motion buckets post / 2x / 4x).
struct s2v_position {
  std::int64_t t, h, w;
};
inline s2v_position s2v_cond_position(const s2v_geometry& g, std::size_t i, std::int64_t roll) {
  const std::size_t fs = g.frame_tokens;
  const auto gh1 = static_cast<std::int64_t>(g.gh) - 1, gw1 = static_cast<std::int64_t>(g.gw) - 1;
  if (i < 2 * fs) {
    const std::size_t j = i % fs;
    const std::int64_t t = i < fs ? s2v_ref_frame_position + roll : -1;
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
template <param_source P>
void s2v_patch_forward(const s2v_geometry& g, P& p, s2v_state& s) {
  const auto lay = s2v_patch_layout(g);
  check_s2v_params(lay.table, p, g.storage, [] { return std::string(); });
  s2v_require_call(s, "patch_embedding");
  const std::size_t c = g.rope_pairs;
  const bool sink = s.call.kind == s2v_call_kind::sink;
  const patch_grid grid{1, 2, 2, sink ? 1 : g.frames, g.gh, g.gw};
  const std::size_t n = sink ? g.frame_tokens : g.block_tokens;
  for (std::size_t t = 0; t < n; ++t)
    patchify_token(sink ? s.input_ref : s.input_x, g.in_dim, grid.gf, g.height, g.width, grid, t, s.patches + t * g.patch_in);
  s2v_linear(g, s.patches, n, g.patch_in, p, lay.conv.weight, lay.conv.bias, s.x);

  for (std::size_t i = 0; i < g.cond_tokens; ++i) {
    const s2v_position q = s2v_cond_position(g, i, s.call.roll);
    s2v_rope_factors_row(q.t, q.h, q.w, c, s.rope_cond_cos + i * c, s.rope_cond_sin + i * c);
  }
  if (sink) {
    std::copy(s.rope_cond_cos, s.rope_cond_cos + g.cond_tokens * c, s.rope_cos);
    std::copy(s.rope_cond_sin, s.rope_cond_sin + g.cond_tokens * c, s.rope_sin);
    return;
  }
  const auto n0 = static_cast<std::int64_t>(s.call.current_start / g.frame_tokens);
  for (std::size_t t = 0; t < g.block_tokens; ++t) {
    const std::size_t f = t / g.frame_tokens, j = t % g.frame_tokens;
    s2v_rope_factors_row(n0 + static_cast<std::int64_t>(f), static_cast<std::int64_t>(j / g.gw),
                         static_cast<std::int64_t>(j % g.gw), c, s.rope_cos + t * c, s.rope_sin + t * c);
  }
}

// zero_timestep: rows 0..F-1 at the frames' t, rows F..2F-1 at t = 0; e [2F, D], e0 [2F, 6D].
template <param_source P>
void s2v_time_forward(const s2v_geometry& g, P& p, s2v_state& s) {
  const auto lay = wan_time_layout(g);
  check_s2v_params(lay.table, p, g.storage, [] { return std::string(); });
  s2v_require_call(s, "time");
  const std::size_t rows = 2 * g.frames, D = g.dim;
  for (std::size_t r = 0; r < rows; ++r) {
    const double t = r < g.frames ? static_cast<double>(s.input_t[r]) : 0.0;
    for (std::size_t i = 0; i < g.freq_dim; ++i) s.time_sinusoid[r * g.freq_dim + i] = time_sinusoid(t, i, g.freq_dim);
  }
  s2v_linear(g, s.time_sinusoid, rows, g.freq_dim, p, lay.embed0.weight, lay.embed0.bias, s.time_hidden);
  for (std::size_t i = 0; i < rows * D; ++i) s.time_hidden[i] = silu(s.time_hidden[i]);
  s2v_linear(g, s.time_hidden, rows, D, p, lay.embed2.weight, lay.embed2.bias, s.e);
  for (std::size_t i = 0; i < rows * D; ++i) s.time_hidden[i] = silu(s.e[i]);
  s2v_linear(g, s.time_hidden, rows, D, p, lay.projection.weight, lay.projection.bias, s.e0);
}

template <param_source P>
void s2v_text_forward(const s2v_geometry& g, P& p, s2v_state& s) {
  const auto lay = wan_text_layout(g);
  check_s2v_params(lay.table, p, g.storage, [] { return std::string(); });
  s2v_linear(g, s.input_context, g.text_len, g.text_dim, p, lay.embed0.weight, lay.embed0.bias, s.text_hidden);
  for (std::size_t i = 0; i < g.text_len * g.dim; ++i) s.text_hidden[i] = gelu_tanh(s.text_hidden[i]);
  s2v_linear(g, s.text_hidden, g.text_len, g.dim, p, lay.embed2.weight, lay.embed2.bias, s.ctx);
}

// --- frame packer (sink only) -----------------------------------------------------------------------

// Bucket b of the 19-frame zero-padded motion buffer (frames [18,19) post, [16,18) 2x, [0,16) 4x),
// patchified at its kernel into the cond tokens after the reference frame.
template <param_source P>
void s2v_pack_forward(const s2v_geometry& g, std::size_t bucket, P& p, s2v_state& s) {
  const auto lay = s2v_pack_layout(g, bucket);
  check_s2v_params(lay.table, p, g.storage, [] { return std::string("frame_packer."); });
  s2v_require_call(s, "frame_packer");
  if (s.call.kind != s2v_call_kind::sink) return;
  constexpr std::size_t first_frame[3] = {18, 16, 0}, kernel_t[3] = {1, 2, 4}, kernel_hw[3] = {2, 4, 8};
  const std::size_t nf = s2v_pack_frames[bucket], C = s2v_pack_channels, HW = g.height * g.width;
  const std::size_t Tm = g.motion_latent_frames;
  // Buffer frame k holds motion frame Tm - 19 + k (the last min(19, Tm) frames), else zeros.
  for (std::size_t ch = 0; ch < C; ++ch)
    for (std::size_t a = 0; a < nf; ++a) {
      const std::size_t k = first_frame[bucket] + a;
      float* dst = s.pack_in + (ch * nf + a) * HW;
      if (k + Tm >= s2v_pack_total_frames) {
        const float* src = s.input_motion + (ch * Tm + (k + Tm - s2v_pack_total_frames)) * HW;
        std::copy(src, src + HW, dst);
      } else {
        std::fill(dst, dst + HW, 0.0f);
      }
    }
  const std::size_t kt = kernel_t[bucket], kh = kernel_hw[bucket];
  const patch_grid grid{kt, kh, kh, nf / kt, g.height / kh, g.width / kh};
  const std::size_t n = grid.gf * grid.gh * grid.gw, vec = C * kt * kh * kh;
  const std::size_t first_token = g.frame_tokens + (bucket == 0 ? 0 : bucket == 1 ? g.frame_tokens : g.frame_tokens + g.h2 * g.w2);
  for (std::size_t t = 0; t < n; ++t) patchify_token(s.pack_in, C, nf, g.height, g.width, grid, t, s.patches + t * vec);
  s2v_linear(g, s.patches, n, vec, p, lay.conv.weight, lay.conv.bias, s.x + first_token * g.dim);
}

// --- cond encoder and cond mask ----------------------------------------------------------------------

// Sink: X = [ref + mask[1]; motion + mask[2]]. Streamed: X = (patch(x) + cond_encoder(cond)) + mask[0].
template <param_source P>
void s2v_cond_forward(const s2v_geometry& g, P& p, s2v_state& s) {
  const auto lay = s2v_cond_layout(g);
  check_s2v_params(lay.table, p, g.storage, [] { return std::string(); });
  s2v_require_call(s, "cond_encoder");
  const std::size_t D = g.dim;
  const tensor_view mask = p.whole(lay.mask);
  if (s.call.kind == s2v_call_kind::sink) {
    for (std::size_t t = 0; t < g.cond_tokens; ++t) {
      const std::size_t row = t < g.frame_tokens ? 1 : 2;
      for (std::size_t i = 0; i < D; ++i) s.x[t * D + i] += mask.load(row * D + i);
    }
    return;
  }
  const std::size_t vec = g.cond_dim * 4;
  const patch_grid grid{1, 2, 2, g.frames, g.gh, g.gw};
  for (std::size_t t = 0; t < g.block_tokens; ++t)
    patchify_token(s.input_cond, g.cond_dim, g.frames, g.height, g.width, grid, t, s.patches + t * vec);
  s2v_linear(g, s.patches, g.block_tokens, vec, p, lay.conv.weight, lay.conv.bias, s.proj);
  for (std::size_t t = 0; t < g.block_tokens; ++t)
    for (std::size_t i = 0; i < D; ++i) {
      const float sum = s.x[t * D + i] + s.proj[t * D + i];
      s.x[t * D + i] = sum + mask.load(i);
    }
}

// --- audio encoder (streamed calls only) ---------------------------------------------------------

inline void s2v_ln_silu_rows(float* x, std::size_t rows, std::size_t n, double eps) {
  for (std::size_t r = 0; r < rows; ++r) {
    layer_norm_row(x + r * n, n, eps, x + r * n);
    for (std::size_t i = 0; i < n; ++i) x[r * n + i] = silu(x[r * n + i]);
  }
}

// out[streams * T_out, O] = CausalConv1d of each stream j (x + j * T_in * C) through its input
// vectors, all streams in one GEMM so that the weight is read once (a streamed weight must be).
template <param_source P>
void s2v_causal_conv(const s2v_geometry& g, const float* x, std::size_t streams, std::size_t t_in,
                     std::size_t channels, std::size_t stride, P& p, std::size_t w, std::size_t b, float* cols,
                     float* out) {
  const std::size_t t_out = conv_out_len(t_in, stride);
  for (std::size_t j = 0; j < streams; ++j)
    for (std::size_t t = 0; t < t_out; ++t)
      causal_conv_input_row(x + j * t_in * channels, channels, t, stride, cols + (j * t_out + t) * 3 * channels);
  s2v_linear(g, cols, streams * t_out, 3 * channels, p, w, b, out);
}

template <param_source P>
void s2v_audio_forward(const s2v_geometry& g, std::size_t sub, P& p, s2v_state& s) {
  const auto lay = s2v_audio_layout(g, sub);
  check_s2v_params(lay.table, p, g.storage, [] { return std::string("casual_audio_encoder."); });
  s2v_require_call(s, "audio encoder");
  if (s.call.kind != s2v_call_kind::stream) return;
  const std::size_t D = g.dim, q = D / 4, h = D / 2, n = g.audio_tokens, T = g.audio_t, T2 = g.audio_t2,
                    T3 = g.audio_t3, Ca = g.audio_dim, A = g.audio_frames;
  switch (sub) {
    case 0: {
      // feat[t, c] = Σ_l a[l, c, col(t)] SiLU(w_l) / Σ SiLU(w); the first column repeated over the
      // motion video frames, then the call's columns.
      const tensor_view wl = p.whole(lay.layer_weights);
      double w[s2v_audio_layers];
      float sum = 0.0f;
      for (std::size_t l = 0; l < s2v_audio_layers; ++l) {
        const float a = silu(wl.load(l));
        w[l] = a;
        sum += a;
      }
      for (std::size_t t = 0; t < T; ++t) {
        const std::size_t col = t < g.motion_video_frames ? 0 : t - g.motion_video_frames;
        for (std::size_t c = 0; c < Ca; ++c) {
          double acc = 0.0;
          for (std::size_t l = 0; l < s2v_audio_layers; ++l)
            acc += static_cast<double>(s.input_audio[(l * Ca + c) * A + col]) * w[l] / sum;
          s.audio_feat[t * Ca + c] = static_cast<float>(acc);
        }
      }
      // Local conv1 -> [T, n*q] (streams interleaved per step; z2 is free scratch until conv2),
      // scattered to stream-major z1; the global conv1 lands in z1's last stream directly.
      s2v_causal_conv(g, s.audio_feat, 1, T, Ca, 1, p, lay.local.weight, lay.local.bias, s.audio_cols, s.audio_z2);
      for (std::size_t j = 0; j < n; ++j)
        for (std::size_t t = 0; t < T; ++t)
          std::copy_n(s.audio_z2 + t * n * q + j * q, q, s.audio_z1 + (j * T + t) * q);
      s2v_causal_conv(g, s.audio_feat, 1, T, Ca, 1, p, lay.global.weight, lay.global.bias, s.audio_cols,
                      s.audio_z1 + n * T * q);
      s2v_ln_silu_rows(s.audio_z1, (n + 1) * T, q, 1e-6);
      return;
    }
    case 1:
      s2v_causal_conv(g, s.audio_z1, n + 1, T, q, 2, p, lay.conv.weight, lay.conv.bias, s.audio_cols, s.audio_z2);
      s2v_ln_silu_rows(s.audio_z2, (n + 1) * T2, h, 1e-6);
      return;
    case 2: {
      s2v_causal_conv(g, s.audio_z2, n + 1, T2, h, 2, p, lay.conv.weight, lay.conv.bias, s.audio_cols, s.audio_z3);
      s2v_ln_silu_rows(s.audio_z3, (n + 1) * T3, D, 1e-6);
      // Local streams interleave per step into audio_local; the global one (stream n) stays in z3.
      for (std::size_t j = 0; j < n; ++j)
        for (std::size_t t = 0; t < T3; ++t)
          std::copy_n(s.audio_z3 + (j * T3 + t) * D, D, s.audio_local + (t * (n + 1) + j) * D);
      const tensor_view pad = p.whole(lay.padding_tokens);
      for (std::size_t t = 0; t < T3; ++t)
        for (std::size_t i = 0; i < D; ++i) s.audio_local[(t * (n + 1) + n) * D + i] = pad.load(i);
      return;
    }
    default:
      s2v_linear(g, s.audio_z3 + n * T3 * D, T3, D, p, lay.conv.weight, lay.conv.bias, s.audio_global);
      return;
  }
}

// --- block --------------------------------------------------------------------------------------

inline void s2v_modulated_norm(const s2v_geometry& g, const s2v_state& s, std::size_t chunk_shift,
                               std::size_t chunk_scale, float* y) {
  const std::size_t D = g.dim;
  for (std::size_t t = 0; t < s.call.tokens; ++t) {
    const float* m = s.modulation + s2v_time_row(g, s, t) * 6 * D;
    layer_norm_modulate_row(s.x + t * D, D, g.eps, m + chunk_shift * D, m + chunk_scale * D, y + t * D);
  }
}

inline void s2v_gated_residual(const s2v_geometry& g, s2v_state& s, std::size_t chunk_gate) {
  const std::size_t D = g.dim;
  for (std::size_t t = 0; t < s.call.tokens; ++t)
    gated_residual_row(s.x + t * D, s.proj + t * D, s.modulation + s2v_time_row(g, s, t) * 6 * D + chunk_gate * D, D);
}

template <param_source P>
void s2v_self_attn_forward(const s2v_geometry& g, std::size_t block, P& p, s2v_state& s) {
  const auto lay = s2v_self_attn_layout(g);
  check_s2v_params(lay.table, p, g.storage, [&] { return "blocks." + std::to_string(block) + "."; });
  s2v_require_call(s, "self_attn");
  const std::size_t S = s.call.tokens, D = g.dim, F2 = 2 * g.frames;
  const tensor_view mod = p.whole(lay.modulation);
  for (std::size_t r = 0; r < F2; ++r)
    for (std::size_t i = 0; i < 6 * D; ++i) s.modulation[r * 6 * D + i] = mod.load(i) + s.e0[r * 6 * D + i];

  s2v_modulated_norm(g, s, 0, 1, s.norm);
  const auto& a = lay.attn;
  s2v_linear(g, s.norm, S, D, p, a.q.weight, a.q.bias, s.q);
  s2v_linear(g, s.norm, S, D, p, a.k.weight, a.k.bias, s.k);
  s2v_linear(g, s.norm, S, D, p, a.v.weight, a.v.bias, s.v);
  s2v_rms_rows(g, s.q, S, p.whole(a.norm_q));
  s2v_rms_rows(g, s.k, S, p.whole(a.norm_k));

  if (s.call.kind == s2v_call_kind::sink) {
    // The cond cache keeps k un-roped: every streamed call ropes it at its own roll-out.
    float* ck = s.cond_k + block * g.cond_slots * D;
    float* cv = s.cond_v + block * g.cond_slots * D;
    std::copy_n(s.k, S * D, ck);
    std::copy_n(s.v, S * D, cv);
    s.set_cond_end(std::max(s.cond_end(), S));
    s2v_rope_rows(g, s.q, S, s.rope_cos, s.rope_sin);
    s2v_rope_rows(g, s.k, S, s.rope_cos, s.rope_sin);
    s2v_attention_two_segments(g.gemm, s.q, S, s.k, s.v, S, s.k, s.v, 0, g.heads, g.head_dim, s.scores, s.attn);
  } else {
    s2v_rope_rows(g, s.q, S, s.rope_cos, s.rope_sin);
    s2v_rope_rows(g, s.k, S, s.rope_cos, s.rope_sin);
    // Noisy keys are cached roped; the write wraps at the cache size, RoPE positions do not.
    float* nk = s.noisy_k[s.call.step] + block * g.noisy_slots * D;
    float* nv = s.noisy_v[s.call.step] + block * g.noisy_slots * D;
    std::copy_n(s.k, S * D, nk + s.call.write_slot * D);
    std::copy_n(s.v, S * D, nv + s.call.write_slot * D);
    const std::size_t nc = s.cond_end();
    const float* ck = s.cond_k + block * g.cond_slots * D;
    const float* cv = s.cond_v + block * g.cond_slots * D;
    std::copy_n(ck, nc * D, s.cond_k_rope);
    s2v_rope_rows(g, s.cond_k_rope, nc, s.rope_cond_cos, s.rope_cond_sin);
    s2v_attention_two_segments(g.gemm, s.q, S, nk, nv, s.call.active_slots, s.cond_k_rope, cv, nc, g.heads, g.head_dim,
                               s.scores, s.attn);
  }
  s2v_linear(g, s.attn, S, D, p, a.o.weight, a.o.bias, s.proj);
  s2v_gated_residual(g, s, 2);
}

template <param_source P>
void s2v_cross_attn_forward(const s2v_geometry& g, std::size_t block, P& p, s2v_state& s) {
  const auto lay = s2v_cross_attn_layout(g);
  check_s2v_params(lay.table, p, g.storage, [&] { return "blocks." + std::to_string(block) + "."; });
  s2v_require_call(s, "cross_attn");
  const std::size_t S = s.call.tokens, D = g.dim, Lt = g.text_len;
  const float* in = s.x;
  if (g.cross_attn_norm) {
    visit_storage(p.whole(lay.norm3_weight), [&](const auto* w) {
      using storage_type = std::remove_cv_t<std::remove_pointer_t<decltype(w)>>;
      const storage_type* b = typed_data<storage_type>(p.whole(lay.norm3_bias));
      for (std::size_t t = 0; t < S; ++t) layer_norm_row(s.x + t * D, D, g.eps, w, b, s.norm + t * D);
    });
    in = s.norm;
  }
  const auto& a = lay.attn;
  s2v_linear(g, in, S, D, p, a.q.weight, a.q.bias, s.q);
  s2v_linear(g, s.ctx, Lt, D, p, a.k.weight, a.k.bias, s.k);
  s2v_linear(g, s.ctx, Lt, D, p, a.v.weight, a.v.bias, s.v);
  s2v_rms_rows(g, s.q, S, p.whole(a.norm_q));
  s2v_rms_rows(g, s.k, Lt, p.whole(a.norm_k));
  multi_head_attention(s.q, S, s.k, s.v, Lt, g.heads, g.head_dim, s.scores, s.attn);
  s2v_linear(g, s.attn, S, D, p, a.o.weight, a.o.bias, s.proj);
  for (std::size_t t = 0; t < S; ++t) residual_row(s.x + t * D, s.proj + t * D, D);
}

inline void s2v_record_block(const s2v_geometry& g, std::size_t block, s2v_state& s) {
  if (g.record_block_outputs)
    std::copy_n(s.x, s.call.tokens * g.dim, s.block_outputs + block * g.max_tokens() * g.dim);
}

template <param_source P>
void s2v_ffn_forward(const s2v_geometry& g, std::size_t block, P& p, s2v_state& s) {
  const auto lay = s2v_ffn_layout(g);
  check_s2v_params(lay.table, p, g.storage, [&] { return "blocks." + std::to_string(block) + "."; });
  s2v_require_call(s, "ffn");
  const std::size_t S = s.call.tokens, D = g.dim;
  s2v_modulated_norm(g, s, 3, 4, s.norm);
  s2v_linear(g, s.norm, S, D, p, lay.fc0.weight, lay.fc0.bias, s.ffn_hidden);
  for (std::size_t i = 0; i < S * g.ffn_dim; ++i) s.ffn_hidden[i] = gelu_tanh(s.ffn_hidden[i]);
  s2v_linear(g, s.ffn_hidden, S, g.ffn_dim, p, lay.fc2.weight, lay.fc2.bias, s.proj);
  s2v_gated_residual(g, s, 5);
  s2v_record_block(g, block, s);
}

// --- audio injector j, after block audio_inject_layers[j] (streamed calls only) ---------------------

// AdaLN per frame f: [shift; scale] = Lin(SiLU(glob[Tm + f])), norm = LN_1e-5(X_f)(1 + scale) + shift.
template <param_source P>
void s2v_adain_forward(const s2v_geometry& g, std::size_t j, P& p, s2v_state& s) {
  const auto lay = s2v_adain_layout(g);
  check_s2v_params(lay.table, p, g.storage,
                   [&] { return "audio_injector.injector_adain_layers." + std::to_string(j) + "."; });
  s2v_require_call(s, "audio injector");
  if (s.call.kind != s2v_call_kind::stream) return;
  const std::size_t D = g.dim, F = g.frames, fs = g.frame_tokens;
  const float* glob = s.audio_global + g.motion_latent_frames * D;
  for (std::size_t i = 0; i < F * D; ++i) s.time_hidden[i] = silu(glob[i]);
  s2v_linear(g, s.time_hidden, F, D, p, lay.linear.weight, lay.linear.bias, s.adain);
  for (std::size_t t = 0; t < g.block_tokens; ++t) {
    const float* m = s.adain + (t / fs) * 2 * D;
    layer_norm_modulate_row(s.x + t * D, D, 1e-5, m, m + D, s.norm + t * D);
  }
}

// Per-frame cross-attention of the frame's tokens to its own n_tok + 1 audio tokens; x += o(·).
template <param_source P>
void s2v_injector_attn_forward(const s2v_geometry& g, std::size_t j, std::size_t block, P& p,
                                      s2v_state& s) {
  const auto lay = s2v_injector_attn_layout(g);
  check_s2v_params(lay.table, p, g.storage, [&] { return "audio_injector.injector." + std::to_string(j) + "."; });
  s2v_require_call(s, "audio injector");
  if (s.call.kind != s2v_call_kind::stream) return;
  const std::size_t D = g.dim, fs = g.frame_tokens, L = g.block_tokens, na = g.audio_tokens + 1;
  const auto& a = lay.attn;
  s2v_linear(g, s.norm, L, D, p, a.q.weight, a.q.bias, s.q);
  s2v_rms_rows(g, s.q, L, p.whole(a.norm_q));
  // K and V of every frame's audio tokens in one GEMM each (the frames' rows are contiguous), so
  // each weight is read once, as a streamed weight must be; frame f then attends to its own rows.
  const float* audio = s.audio_local + g.motion_latent_frames * na * D;
  s2v_linear(g, audio, g.frames * na, D, p, a.k.weight, a.k.bias, s.k);
  s2v_linear(g, audio, g.frames * na, D, p, a.v.weight, a.v.bias, s.v);
  s2v_rms_rows(g, s.k, g.frames * na, p.whole(a.norm_k));
  for (std::size_t f = 0; f < g.frames; ++f)
    multi_head_attention(s.q + f * fs * D, fs, s.k + f * na * D, s.v + f * na * D, na, g.heads, g.head_dim, s.scores,
                         s.attn + f * fs * D);
  s2v_linear(g, s.attn, L, D, p, a.o.weight, a.o.bias, s.proj);
  for (std::size_t t = 0; t < L; ++t) residual_row(s.x + t * D, s.proj + t * D, D);
  s2v_record_block(g, block, s);
}

// --- head (streamed calls only) ------------------------------------------------------------------

// Per frame f: LN(x)(1 + m1 + e[f]) + (m0 + e[f]) through head.head, then unpatchify.
template <param_source P>
void s2v_head_forward(const s2v_geometry& g, P& p, s2v_state& s) {
  const auto lay = s2v_head_layout(g);
  check_s2v_params(lay.table, p, g.storage, [] { return std::string("head."); });
  s2v_require_call(s, "head");
  if (s.call.kind != s2v_call_kind::stream) return;
  const std::size_t D = g.dim, L = g.block_tokens;
  const tensor_view mod = p.whole(lay.modulation);
  for (std::size_t f = 0; f < g.frames; ++f)
    for (std::size_t i = 0; i < 2 * D; ++i) s.modulation[f * 2 * D + i] = mod.load(i) + s.e[f * D + i % D];
  for (std::size_t t = 0; t < L; ++t) {
    const float* m = s.modulation + (t / g.frame_tokens) * 2 * D;
    layer_norm_modulate_row(s.x + t * D, D, g.eps, m, m + D, s.norm + t * D);
  }
  s2v_linear(g, s.norm, L, D, p, lay.head.weight, lay.head.bias, s.head_out);
  const patch_grid grid{1, 2, 2, g.frames, g.gh, g.gw};
  for (std::size_t t = 0; t < L; ++t) unpatchify_token(s.head_out + t * g.patch_out, g.out_dim, grid, t, s.output);
}

}  // namespace unshard::detail
