#pragma once
// Parameter inventory of the Live Avatar stack, counted from the architectures (docs/planner.md names
// the source file of every formula). Counts are functions of config structs, so any Wan config.json
// (1.3B, 14B) and the Wan2.2-S2V-14B DiT are counted by the same code; nothing is a typed-in total.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "unshard/models/wan/config.hpp"

namespace unshard::liveavatar {

using count = std::int64_t;

inline count linear(count in, count out, bool bias = true) { return in * out + (bias ? out : 0); }
inline count conv(count in, count out, count kernel_volume, bool bias = true) { return in * out * kernel_volume + (bias ? out : 0); }

// WanSelfAttention / WanCrossAttention (wan/modules/model.py): q,k,v,o Linear(dim,dim) + two RMSNorm(dim) when qk_norm.
inline count wan_attention(count dim, bool qk_norm) { return 4 * linear(dim, dim) + (qk_norm ? 2 * dim : 0); }

// The parts of one WanAttentionBlock, so that sub-unit policies can size their largest piece.
struct wan_block_parts {
  count self_attn = 0, cross_attn = 0, ffn = 0, norms_and_modulation = 0;
  count total() const { return self_attn + cross_attn + ffn + norms_and_modulation; }
};

inline wan_block_parts wan_block(const wan::config& c) {
  wan_block_parts p;
  p.self_attn = wan_attention(c.dim, c.qk_norm);
  p.cross_attn = wan_attention(c.dim, c.qk_norm);  // t2v cross attention: same shape as self attention
  p.ffn = linear(c.dim, c.ffn_dim) + linear(c.ffn_dim, c.dim);
  // norm3 is an affine LayerNorm when cross_attn_norm (weight+bias); modulation is Parameter(1,6,dim).
  p.norms_and_modulation = (c.cross_attn_norm ? 2 * c.dim : 0) + 6 * c.dim;
  return p;
}

// Everything of WanModel outside `blocks`: patch/text/time embeddings, time projection, head.
inline count wan_outside_blocks(const wan::config& c) {
  const count patch_volume = c.patch_size[0] * c.patch_size[1] * c.patch_size[2];
  const count patch_embedding = conv(c.in_dim, c.dim, patch_volume);
  const count text_embedding = linear(c.text_dim, c.dim) + linear(c.dim, c.dim);
  const count time_embedding = linear(c.freq_dim, c.dim) + linear(c.dim, c.dim);
  const count time_projection = linear(c.dim, 6 * c.dim);
  const count head = linear(c.dim, c.out_dim * patch_volume) + 2 * c.dim;  // Linear + modulation(1,2,dim)
  return patch_embedding + text_embedding + time_embedding + time_projection + head;
}

inline count wan_total(const wan::config& c) { return c.num_layers * wan_block(c).total() + wan_outside_blocks(c); }

// Elements in one row (the dimensions after the first) of the widest weight: a chunked unshard
// never cuts a row, so this sets its smallest chunk. Rows: in-features of every Linear, in x kernel
// volume of every Conv (patch embedding); modulations are small and stay resident.
inline count wan_widest_row(const wan::config& c) {
  const count patch_volume = c.patch_size[0] * c.patch_size[1] * c.patch_size[2];
  return std::max({c.dim, c.ffn_dim, c.text_dim, c.freq_dim, c.in_dim * patch_volume});
}

// The additions of WanModel_S2V / CausalWanModel_S2V (wan/modules/s2v/model_s2v.py,
// liveavatar/models/wan/causal_model_s2v.py) and wan_s2v_14B_modified.py's values.
struct s2v_config {
  wan::config base;
  count cond_dim = 16;
  count audio_dim = 1024;          // wav2vec2-large hidden size
  count audio_layers = 25;         // CausalAudioEncoder num_layers: wav2vec2-large's 24 layers + its input
  count num_audio_token = 4;
  std::vector<count> audio_inject_layers{0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39};
  bool enable_adain = true;
  bool adain_output_layers = false;  // need_adain_ont = adain_mode != "attn_norm"; Live Avatar: "attn_norm"
  bool enable_framepack = true;
  count lora_rank = 128;
  bool lora_merged = true;           // Live Avatar merges the LoRA (merge_and_unload) before inference
  count lora_targets_per_block = 6;  // q,k,v,o (self attention; cross attention's too, by name) and ffn.0, ffn.2
};

inline s2v_config liveavatar_14b() {
  s2v_config s;
  s.base.model_type = "s2v";
  s.base.dim = 5120;
  s.base.ffn_dim = 13824;
  s.base.num_heads = 40;
  s.base.num_layers = 40;
  return s;
}

struct s2v_parts {
  count blocks = 0;            // all WanAttentionBlocks (FSDP units)
  count block = 0;             // one block
  count wan_outside = 0;       // embeddings + head
  count audio_injector = 0;    // twelve cross attentions + AdaLayerNorm projections
  count injector_each = 0;
  count audio_encoder = 0;     // CausalAudioEncoder (MotionEncoder_tc)
  count frame_packer = 0;
  count cond_encoder = 0;
  count cond_mask = 0;
  count lora = 0;              // separate LoRA factors (0 when merged)
  count root() const { return wan_outside + audio_injector + audio_encoder + frame_packer + cond_encoder + cond_mask; }
  count total() const { return blocks + root() + lora; }
};

// LoRA rank r on a Linear(in,out): A (r x in) + B (out x r). peft matches "q","k","v","o" in both
// self_attn and cross_attn of every block, and ffn.0, ffn.2.
inline count lora_per_block(const wan::config& c, count r) {
  const count attn = 8 * (r * c.dim + c.dim * r);
  return attn + (r * c.dim + c.ffn_dim * r) + (r * c.ffn_dim + c.dim * r);
}

inline s2v_parts s2v_inventory(const s2v_config& s) {
  const wan::config& c = s.base;
  s2v_parts p;
  p.block = wan_block(c).total();
  p.blocks = c.num_layers * p.block;
  p.wan_outside = wan_outside_blocks(c);
  // AudioInjector_WAN: AudioCrossAttention(dim, heads, qk_norm=True) + AdaLayerNorm(output 2*dim,
  // embedding dim) = Linear(dim, 2*dim) (its LayerNorm has no affine); pre-norms have no affine.
  p.injector_each = wan_attention(c.dim, true) + (s.enable_adain ? linear(c.dim, 2 * c.dim) : 0) +
                     (s.adain_output_layers ? linear(c.dim, c.dim) : 0);
  p.audio_injector = static_cast<count>(s.audio_inject_layers.size()) * p.injector_each;
  // MotionEncoder_tc(in=audio_dim, hidden=dim, heads=num_audio_token, need_global=enable_adain), kernel 3.
  const count h = c.dim;
  p.audio_encoder = conv(s.audio_dim, h / 4 * s.num_audio_token, 3) + conv(h / 4, h / 2, 3) + conv(h / 2, h, 3) +
                    h /*padding_tokens*/ + s.audio_layers /*layer weights*/ +
                    (s.enable_adain ? conv(s.audio_dim, h / 4, 3) + linear(h, h) : 0);
  // FramePackMotioner: Conv3d(16, dim) at kernels 1x2x2, 2x4x4, 4x8x8.
  p.frame_packer = s.enable_framepack ? conv(16, c.dim, 4) + conv(16, c.dim, 32) + conv(16, c.dim, 256) : 0;
  const count patch_volume = c.patch_size[0] * c.patch_size[1] * c.patch_size[2];
  p.cond_encoder = s.cond_dim > 0 ? conv(s.cond_dim, c.dim, patch_volume) : 0;
  p.cond_mask = 3 * c.dim;  // nn.Embedding(3, dim)
  p.lora = s.lora_merged ? 0 : c.num_layers * lora_per_block(c, s.lora_rank);
  return p;
}

// The widest row of the S2V additions too: the causal audio encoder's Conv1d(k=3) rows
// (in x 3), the frame packer's Conv3d rows (16 x kernel volume), the injectors' Linear(dim, .).
inline count s2v_widest_row(const s2v_config& s) {
  const wan::config& c = s.base;
  const count h = c.dim;
  return std::max({wan_widest_row(c), s.audio_dim * 3, h / 4 * 3, h / 2 * 3, static_cast<count>(s.enable_framepack ? 16 * 256 : 0),
                   s.cond_dim * c.patch_size[0] * c.patch_size[1] * c.patch_size[2]});
}

// umT5-XXL encoder (wan/modules/t5.py, umt5_xxl(encoder_only=True)): no biases, gated GELU FFN,
// one relative-position table per layer (shared_pos=False).
struct t5_config {
  count vocab = 256384, dim = 4096, dim_attn = 4096, dim_ffn = 10240, heads = 64, layers = 24, buckets = 32;
};
inline count t5_encoder_params(const t5_config& t) {
  const count layer = t.dim /*norm1*/ + 4 * t.dim * t.dim_attn + t.dim /*norm2*/ + 3 * t.dim * t.dim_ffn +
                      t.buckets * t.heads;
  return t.vocab * t.dim + t.layers * layer + t.dim /*final norm*/;
}

// Wan2.1 VAE (wan/modules/vae2_1.py, WanVAE_ with dim 96, z_dim 16, dim_mult [1,2,4,4], 2 res blocks,
// no attention scales: attention only in the middle blocks).
struct vae_config {
  count dim = 96, z_dim = 16, res_blocks = 2;
  std::vector<count> mult{1, 2, 4, 4};
  std::vector<bool> temporal_down{true, true, false};
};
inline count vae_residual(count in, count out) {
  return in + conv(in, out, 27) + out + conv(out, out, 27) + (in != out ? conv(in, out, 1) : 0);
}
inline count vae_attention(count d) { return d + conv(d, 3 * d, 1) + conv(d, d, 1); }
inline count vae_middle(count d) { return 2 * vae_residual(d, d) + vae_attention(d); }
inline count vae_params(const vae_config& v) {
  std::vector<count> dims{v.dim};
  for (count m : v.mult) dims.push_back(v.dim * m);
  const std::size_t stages = v.mult.size();
  count enc = conv(3, dims[0], 27);
  for (std::size_t i = 0; i < stages; ++i) {
    count in = dims[i];
    for (count r = 0; r < v.res_blocks; ++r) enc += vae_residual(in, dims[i + 1]), in = dims[i + 1];
    if (i + 1 != stages)  // Resample: Conv2d(d,d,3) [+ time_conv Conv3d(d,d,(3,1,1)) when temporal]
      enc += conv(dims[i + 1], dims[i + 1], 9) + (v.temporal_down[i] ? conv(dims[i + 1], dims[i + 1], 3) : 0);
  }
  const count top = dims.back();
  enc += vae_middle(top) + top + conv(top, 2 * v.z_dim, 27);
  // Decoder dims: [top] + reversed dims[1:]; stages after the first take in_dim/2 (upsample halves channels).
  std::vector<count> dd{top};
  for (std::size_t i = stages; i >= 1; --i) dd.push_back(dims[i]);
  count dec = conv(v.z_dim, dd[0], 27) + vae_middle(dd[0]);
  for (std::size_t i = 0; i < stages; ++i) {
    count in = (i >= 1) ? dd[i] / 2 : dd[i];
    for (count r = 0; r < v.res_blocks + 1; ++r) dec += vae_residual(in, dd[i + 1]), in = dd[i + 1];
    if (i + 1 != stages) {  // upsample: Conv2d(d, d/2, 3) [+ time_conv Conv3d(d, 2d, (3,1,1))]
      const bool temporal = v.temporal_down[stages - 2 - i];
      dec += conv(dd[i + 1], dd[i + 1] / 2, 9) + (temporal ? conv(dd[i + 1], 2 * dd[i + 1], 3) : 0);
    }
  }
  dec += dd.back() + conv(dd.back(), 3, 27);
  return enc + dec + conv(2 * v.z_dim, 2 * v.z_dim, 1) + conv(v.z_dim, v.z_dim, 1);
}

// wav2vec2-large-xlsr-53 (transformers Wav2Vec2ForCTC): 7 conv feature layers with bias and
// LayerNorm, feature projection, grouped positional conv (weight norm), 24 pre-norm layers, CTC head.
struct wav2vec2_config {
  count conv_dim = 512, hidden = 1024, ffn = 4096, layers = 24, pos_kernel = 128, pos_groups = 16, vocab = 33;
  std::vector<count> kernels{10, 3, 3, 3, 3, 2, 2};
};
inline count wav2vec2_params(const wav2vec2_config& w) {
  count n = 0, in = 1;
  for (count k : w.kernels) n += conv(in, w.conv_dim, k) + 2 * w.conv_dim, in = w.conv_dim;
  n += 2 * w.conv_dim + linear(w.conv_dim, w.hidden);                          // feature projection
  n += w.hidden * (w.hidden / w.pos_groups) * w.pos_kernel + w.hidden + w.pos_kernel;  // weight_v, bias, weight_g
  n += w.hidden /*masked_spec_embed*/ + 2 * w.hidden /*encoder norm*/;
  n += w.layers * (4 * linear(w.hidden, w.hidden) + 4 * w.hidden + linear(w.hidden, w.ffn) + linear(w.ffn, w.hidden));
  return n + linear(w.hidden, w.vocab);
}

}  // namespace unshard::liveavatar
