#pragma once
// What a Live Avatar stream computes on (the workload), how (the options), and every size derived
// from them and the config: token counts of a block and of the cond prefix, the frame-pack
// buckets, the audio encoder's lengths and the KV-cache slots. Computed and validated once, so the
// layers, the buffers and the planner read the same numbers.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>

#include "unshard/core/dtype.hpp"
#include "unshard/core/error.hpp"
#include "unshard/kernels/host/gemm.hpp"
#include "unshard/kernels/thread/patch.hpp"
#include "unshard/models/liveavatar/config.hpp"
#include "unshard/models/wan/geometry.hpp"

namespace unshard::s2v {

// The official pipeline's stream: 3 latent frames per block, 4 blocks per clip, 4 denoising steps
// (one noisy KV cache each), motion from 73 video frames (19 latent frames).
struct workload {
  std::array<std::int64_t, 2> latent_hw{};       // H, W of the latents (video / 8)
  std::int64_t frames_per_block = 3;             // F
  std::int64_t context_len = 0;                  // rows of text context; zero-padded to text_len
  std::array<std::int64_t, 2> motion_frames{73, 19};  // motion video frames, motion latent frames
  std::int64_t audio_frames = 0;                 // audio columns per call; 0: 4 per latent frame
  std::int64_t noisy_cache_tokens = 0;           // slots of one noisy cache; 0: 4 blocks
  std::int64_t cond_cache_tokens = 0;            // slots of the cond cache; 0: exactly the cond tokens
  std::int64_t denoising_steps = 4;              // noisy caches (one per step)
};

// The Wan options (parameter dtype, GEMM path, whether each block's output after its audio
// injection is kept), and the KV caches' storage.
struct options : wan::options {
  // f32, or bf16 as the official caches (torch.zeros(..., dtype=bfloat16)): half the kv_cache
  // term, each key and value rounded once when written. The CUDA model's bf16 precision uses bf16.
  dtype kv_cache = dtype::f32;
};

// CausalAudioEncoder's layer weights: wav2vec2-large's 24 layers and its input.
inline constexpr std::size_t audio_layers = 25;
// FramePackMotioner: zip_frame_buckets [1, 2, 16], 16 latent channels, kernels 1x2x2 / 2x4x4 / 4x8x8.
inline constexpr std::size_t pack_channels = 16;
inline constexpr std::array<std::size_t, 3> pack_frames{1, 2, 16};
inline constexpr std::size_t pack_total_frames = 19;
// The official rope table covers 45000 frame positions; the reference frame sits at 30 + roll.
inline constexpr std::int64_t rope_frames = 45000;
inline constexpr std::int64_t ref_frame_position = 30;

struct geometry : wan::backbone_geometry {
  std::size_t cond_dim, audio_dim;
  std::size_t audio_tokens;  // num_audio_token
  std::size_t injectors;
  std::size_t height, width, frames;  // latent H, W; F
  std::size_t gh, gw;                 // token grid of a frame (H/2, W/2)
  std::size_t frame_tokens;           // fs = gh*gw
  std::size_t block_tokens;           // L = F*fs
  std::size_t h2, w2, h4, w4;         // frame-pack buckets: H/4, W/4, H/8, W/8 (floor)
  std::size_t cond_tokens;            // Lc = 2 fs + h2 w2 + 4 h4 w4
  std::size_t motion_video_frames, motion_latent_frames;
  std::size_t audio_frames, audio_t, audio_t2, audio_t3;  // input columns; lengths after prepend, conv2, conv3
  dtype kv_type = dtype::f32;                              // the KV caches' storage (options::kv_cache)
  std::size_t noisy_slots, cond_slots, steps;
  std::size_t patch_in, patch_out;   // in_dim*4, out_dim*4

  std::size_t max_tokens() const noexcept { return std::max(block_tokens, cond_tokens); }
  // Rows of the k/v scratch: self-attention keys, text rows, or one frame's audio tokens.
  // K/V scratch rows: the call's tokens, the text, or every frame's audio tokens at once.
  std::size_t kv_scratch_rows() const noexcept { return std::max({max_tokens(), text_len, frames * (audio_tokens + 1)}); }
  // Keys one attention row may see: the whole noisy cache plus the cond cache, or the others.
  std::size_t max_keys() const noexcept { return std::max(noisy_slots + cond_slots, kv_scratch_rows()); }
  std::array<std::int64_t, 4> output_shape() const noexcept {
    return {static_cast<std::int64_t>(out_dim), static_cast<std::int64_t>(frames), static_cast<std::int64_t>(2 * gh),
            static_cast<std::int64_t>(2 * gw)};
  }
};

namespace detail {
inline std::size_t conv_out_len(std::size_t n, std::size_t stride) { return causal_conv_out_len(n, stride); }
}  // namespace detail

inline s2v::geometry make_geometry(const s2v::config& c, const s2v::workload& w, const s2v::options& o) {
  c.validate("liveavatar model");
  const auto fail = [](auto&&... what) { throw_error("liveavatar workload: ", what...); };
  const auto [H, W] = w.latent_hw;
  // The 4x bucket's kernel is 8x8: a smaller latent has no token there (the official Conv3d fails).
  if (H < 8 || W < 8) fail("latent ", H, "x", W, " is smaller than the frame packer's 8x8 kernel");
  if (w.frames_per_block < 1) fail("frames_per_block is ", w.frames_per_block, " (must be >= 1)");
  if (w.context_len < 0 || w.context_len > c.text_len)
    fail("context length ", w.context_len, " is outside [0, text_len = ", c.text_len, "]");
  if (w.motion_frames[0] < 1 || w.motion_frames[1] < 1)
    fail("motion_frames [", w.motion_frames[0], ",", w.motion_frames[1], "] must be positive");
  if (w.audio_frames < 0) fail("audio_frames is ", w.audio_frames);
  if (w.denoising_steps < 1) fail("denoising_steps is ", w.denoising_steps, " (must be >= 1)");
  if (o.storage != dtype::f32 && o.storage != dtype::bf16)
    throw_error("liveavatar model: storage dtype ", name_of(o.storage), " is not supported (f32 or bf16)");
  if (o.kv_cache != dtype::f32 && o.kv_cache != dtype::bf16)
    throw_error("liveavatar model: KV cache dtype ", name_of(o.kv_cache), " is not supported (f32 or bf16)");

  const auto z = [](std::int64_t v) { return static_cast<std::size_t>(v); };
  s2v::geometry g{};
  wan::fill_backbone(g, c, o);
  g.kv_type = o.kv_cache;
  g.cond_dim = z(c.cond_dim);
  g.audio_dim = z(c.audio_dim);
  g.audio_tokens = z(c.num_audio_token);
  g.injectors = c.audio_inject_layers.size();
  g.height = z(H);
  g.width = z(W);
  g.frames = z(w.frames_per_block);
  g.gh = g.height / 2;
  g.gw = g.width / 2;
  g.frame_tokens = g.gh * g.gw;
  g.block_tokens = g.frames * g.frame_tokens;
  g.h2 = g.height / 4;
  g.w2 = g.width / 4;
  g.h4 = g.height / 8;
  g.w4 = g.width / 8;
  g.cond_tokens = 2 * g.frame_tokens + g.h2 * g.w2 + 4 * g.h4 * g.w4;
  g.motion_video_frames = z(w.motion_frames[0]);
  g.motion_latent_frames = z(w.motion_frames[1]);
  g.audio_frames = w.audio_frames ? z(w.audio_frames) : 4 * g.frames;
  g.audio_t = g.motion_video_frames + g.audio_frames;
  g.audio_t2 = detail::conv_out_len(g.audio_t, 2);
  g.audio_t3 = detail::conv_out_len(g.audio_t2, 2);
  if (g.audio_t3 < g.motion_latent_frames + g.frames)
    fail(g.audio_frames, " audio columns give ", g.audio_t3, " encoder frames, fewer than motion latent frames (",
         g.motion_latent_frames, ") + frames per block (", g.frames, ")");
  g.noisy_slots = w.noisy_cache_tokens ? z(w.noisy_cache_tokens) : 4 * g.block_tokens;
  // A call writes L consecutive slots at current_start mod size: the size must be whole blocks.
  if (w.noisy_cache_tokens < 0 || g.noisy_slots % g.block_tokens != 0)
    fail("noisy cache of ", w.noisy_cache_tokens, " tokens is not a positive multiple of the block's ", g.block_tokens,
         " tokens");
  g.cond_slots = w.cond_cache_tokens ? z(w.cond_cache_tokens) : g.cond_tokens;
  if (w.cond_cache_tokens < 0 || g.cond_slots < g.cond_tokens)
    fail("cond cache of ", w.cond_cache_tokens, " tokens is smaller than the ", g.cond_tokens, " cond tokens");
  g.steps = z(w.denoising_steps);
  g.patch_in = g.in_dim * 4;
  g.patch_out = g.out_dim * 4;
  return g;
}

}  // namespace unshard::s2v
