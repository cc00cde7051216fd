#pragma once
// The Live Avatar stack as the planner sees it: the DiT cut into units, the other models and where
// the pipeline keeps them, and the workload that sizes activations and the KV cache.
#include <algorithm>
#include <optional>
#include <utility>
#include <string>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/models/liveavatar/count.hpp"
#include "unshard/models/liveavatar/inventory.hpp"

namespace unshard::liveavatar {

// One streamed block of Live Avatar's causal pipeline (causal_s2v_pipeline.py, wan_s2v_14B_modified.py).
// width x height is what was asked for (Live Avatar's --size); the stack renders it (`rendered`).
struct workload {
  count width = 720, height = 400;  // pixels; infinite_inference_multi_gpu.sh --size 720*400
  count frames_per_block = 3;       // latent frames per streamed block (num_frames_per_block)
  count ref_frames = 1;             // reference image latent
  count kv_cache_tokens = 0;        // slots of one step's noisy cache; 0: one clip (4 blocks), as the model's
  count cond_cache_tokens = 0;      // slots of the cond cache; 0: exactly the cond tokens, as the model's
  count context_tokens = 512;       // text_len
};

// Latent tokens of one frame: VAE stride 8, patch 2 (resolution checked divisible by 16).
inline count frame_tokens(const workload& w) { return (w.height / 16) * (w.width / 16); }

// Tokens one streamed forward runs through the blocks: only the block's noisy frames (vectors
// README §3.6); reference and motion tokens went through the sink, into the cond cache.
inline count streamed_tokens(const workload& w) { return w.frames_per_block * frame_tokens(w); }

// Frame-pack motion tokens: the latest frame at 1x2x2, 2 frames at 2x4x4, 16 frames at 4x8x8;
// the strided convolutions floor (50x90 latent -> 12x22 and 6x11 tokens per packed frame).
inline count framepack_tokens(const workload& w) {
  const count lh = w.height / 8, lw = w.width / 8;
  return (lh / 2) * (lw / 2) + 1 * (lh / 4) * (lw / 4) + 4 * (lh / 8) * (lw / 8);
}

// The cond tokens the sink caches: the reference frame and the frame-packed motion (2,640 at 704x384).
inline count cond_tokens(const workload& w) { return w.ref_frames * frame_tokens(w) + framepack_tokens(w); }

inline void validate(const workload& w) {
  if (w.width <= 0 || w.height <= 0 || w.width % 16 || w.height % 16)
    throw_error("resolution ", w.width, "x", w.height,
                " is not divisible by 16 (VAE stride 8 x patch 2); try ", w.width / 16 * 16, "x", w.height / 16 * 16);
  if (w.frames_per_block <= 0) throw_error("frames per block must be at least 1 (got ", w.frames_per_block, ")");
}

struct dit_unit {
  std::string name;
  count params = 0;
  bool root = false;  // outside `blocks`: Live Avatar's FSDP root unit
  bool block = false;
  // Under an fp8 policy: the parameters stored as f8e4m3 (the 2-D GEMM weights, nn.Linear's), their
  // output rows (one scale each per channel) and their number (one scale each per tensor).
  count quantized = 0, quantized_rows = 0, quantized_tensors = 0;
};

// What the planner needs about the whole stack.
struct stack {
  std::string model;
  wan::config dit;
  std::vector<dit_unit> units;      // forward order
  count largest_subunit = 0;        // for selective:subunit
  count widest_row = 0;             // elements in the widest weight row (chunked's smallest chunk)
  // The same two under fp8, in bytes: 2-D GEMM weights at 1 byte per element, the rest bf16.
  count largest_subunit_fp8_bytes = 0;
  count widest_row_fp8_bytes = 0;
  count text_encoder = 0;           // umT5-XXL, FSDP-sharded like the DiT (t5_fsdp)
  count vae = 0;                    // on the GPU, unsharded (Wan2_1_VAE(device=self.device))
  count audio_encoder_host = 0;     // wav2vec2: AudioEncoder(device='cpu') stays in host memory
  bool causal_kv = false;
  bool renders_by_area = false;     // Live Avatar: --size is an area the pipeline fits the image into
  std::optional<::unshard::s2v::config> s2v_model;  // the S2V model's own config: its modules size the KV cache
  count total_dit() const {
    count t = 0;
    for (const auto& u : units) t += u.params;
    return t;
  }
  count root_params() const {
    count t = 0;
    for (const auto& u : units) t += u.root ? u.params : 0;
    return t;
  }
};

// A Linear(in, out) weight as fp8 counts it: quantized elements, rows, one tensor.
inline void add_quantized_linear(dit_unit& u, count in, count out) {
  u.quantized += in * out;
  u.quantized_rows += out;
  u.quantized_tensors += 1;
}

// The S2V model's configuration for the planner's Live Avatar description, so that parameters and
// cache sizes come from the module definitions the forward runs (models/liveavatar/), not from a
// second table. (The formulas of inventory.hpp stay as an independent cross-check in the tests.)
inline ::unshard::s2v::config model_config_of(const s2v_config& s) {
  ::unshard::s2v::config m = ::unshard::s2v::liveavatar_14b_config();
  static_cast<wan::backbone_config&>(m) = s.base;  // the Wan backbone's sizes and flags, all of them
  m.cond_dim = s.cond_dim;
  m.audio_dim = s.audio_dim;
  m.num_audio_token = s.num_audio_token;
  m.enable_adain = s.enable_adain;
  m.enable_framepack = s.enable_framepack;
  m.audio_inject_layers.assign(s.audio_inject_layers.begin(), s.audio_inject_layers.end());
  m.validate("the planner's Live Avatar configuration");
  return m;
}

// Wan2.2-S2V-14B as Live Avatar runs it. Units: the pre-block modules, each block with the audio
// injector that runs after it (for unshard's own policies), the head. FSDP puts injectors in the root.
// `model` is the S2V configuration whose layers give the units (model_config_of(s) for the preset);
// `s` supplies the backbone and the LoRA factors.
inline stack liveavatar_stack(const s2v_config& s, const ::unshard::s2v::config& model, const std::string& name) {
  const s2v_parts p = s2v_inventory(s);  // LoRA factors only (zero when merged)
  const wan::config& c = s.base;
  stack st;
  st.model = name;
  st.dit = c;
  st.s2v_model = model;
  st.s2v_model->validate(name);
  const ::unshard::s2v::model m(*st.s2v_model, s2v::pipeline_workload(*st.s2v_model, 720, 400));
  const count lora_each = c.num_layers ? p.lora / c.num_layers : 0;
  dit_unit pre{"pre", 0, true, false};
  const auto flush_pre = [&] {
    if (pre.params) st.units.push_back(std::exchange(pre, dit_unit{"pre", 0, true, false}));
  };
  for (std::size_t l = 0; l < m.layer_count(); ++l) {
    const ::unshard::s2v::layer& layer = m.layer(l);
    dit_unit u{layer.name(), 0, false, false};
    for (std::size_t sub = 0; sub < layer.subunit_count(); ++sub) {
      count sub_params = 0, sub_fp8_bytes = 0;
      for (const param_spec& ps : layer.parameters(sub)) {
        sub_params += ps.dims.numel();
        const bool quantized = ps.by_rows && ps.dims.rank() == 2;  // as plan/unit_layout.hpp's fp8 rule
        sub_fp8_bytes += ps.dims.numel() * (quantized ? 1 : 2);
        if (quantized) add_quantized_linear(u, ps.dims[1], ps.dims[0]);
        if (ps.by_rows && ps.dims.rank() >= 2) {
          st.widest_row = std::max(st.widest_row, ps.dims.numel() / ps.dims[0]);
          st.widest_row_fp8_bytes = std::max(st.widest_row_fp8_bytes, ps.dims.numel() / ps.dims[0] * (quantized ? 1 : 2));
        }
      }
      st.largest_subunit = std::max(st.largest_subunit, sub_params);
      st.largest_subunit_fp8_bytes = std::max(st.largest_subunit_fp8_bytes, sub_fp8_bytes);
      u.params += sub_params;
    }
    switch (layer.kind()) {
      case ::unshard::s2v::layer_kind::block:
        u.params += lora_each;  // separate LoRA factors (when not merged) stay bf16
        u.block = true;
        st.units.push_back(u);
        break;
      case ::unshard::s2v::layer_kind::injector:
      case ::unshard::s2v::layer_kind::head:
        flush_pre();
        u.root = true;
        st.units.push_back(u);
        break;
      default:  // embeddings, frame packer, cond encoder, audio encoder: before the first block
        pre.params += u.params;
        pre.quantized += u.quantized;
        pre.quantized_rows += u.quantized_rows;
        pre.quantized_tensors += u.quantized_tensors;
        if (st.units.empty() && l + 1 < m.layer_count() && m.layer(l + 1).kind() == ::unshard::s2v::layer_kind::block)
          flush_pre();
    }
  }
  st.text_encoder = t5_encoder_params({});
  st.vae = vae_params({});
  st.audio_encoder_host = wav2vec2_params({});
  st.causal_kv = true;
  st.renders_by_area = true;
  return st;
}

inline stack liveavatar_stack(const s2v_config& s) { return liveavatar_stack(s, model_config_of(s), "liveavatar-14b"); }

// The planner's description of an S2V model configuration (a Live Avatar vectors config's `model`
// section, or a flat one): the backbone and the additions s2v_inventory reads; the LoRA as Live
// Avatar runs it (merged). The units come from the configuration itself (liveavatar_stack above).
inline s2v_config planner_config_of(const ::unshard::s2v::config& m) {
  s2v_config s;
  static_cast<wan::backbone_config&>(s.base) = m;
  s.base.model_type = "s2v";
  s.cond_dim = m.cond_dim;
  s.audio_dim = m.audio_dim;
  s.num_audio_token = m.num_audio_token;
  s.audio_inject_layers.assign(m.audio_inject_layers.begin(), m.audio_inject_layers.end());
  s.enable_adain = m.enable_adain;
  s.adain_output_layers = m.adain_mode != "attn_norm";
  s.enable_framepack = m.enable_framepack;
  return s;
}

// Any S2V model configuration, planned as Live Avatar runs the 14B (the same T5, VAE and wav2vec2).
inline stack liveavatar_stack(const ::unshard::s2v::config& m, const std::string& name) {
  return liveavatar_stack(planner_config_of(m), m, name);
}

// Any Wan t2v config.json: the DiT alone (no audio, no causal cache), with the same T5 and VAE.
inline stack wan_stack(const wan::config& c, const std::string& name) {
  stack st;
  st.model = name;
  st.dit = c;
  const count outside = wan_outside_blocks(c);
  // fp8: the Linear weights (inventory.hpp's formulas, weights only); the patch Conv3d stays bf16.
  const count patch_volume = c.patch_size[0] * c.patch_size[1] * c.patch_size[2];
  dit_unit embeddings{"embeddings+head", outside, true, false};
  add_quantized_linear(embeddings, c.text_dim, c.dim);
  add_quantized_linear(embeddings, c.dim, c.dim);
  add_quantized_linear(embeddings, c.freq_dim, c.dim);
  add_quantized_linear(embeddings, c.dim, c.dim);
  add_quantized_linear(embeddings, c.dim, 6 * c.dim);
  add_quantized_linear(embeddings, c.dim, c.out_dim * patch_volume);
  st.units.push_back(embeddings);
  dit_unit block{"", wan_block(c).total(), false, true};
  for (int i = 0; i < 8; ++i) add_quantized_linear(block, c.dim, c.dim);  // self and cross attention q, k, v, o
  add_quantized_linear(block, c.dim, c.ffn_dim);
  add_quantized_linear(block, c.ffn_dim, c.dim);
  for (count i = 0; i < c.num_layers; ++i) {
    block.name = "blocks." + std::to_string(i);
    st.units.push_back(block);
  }
  const wan_block_parts b = wan_block(c);
  st.largest_subunit = std::max({b.self_attn, b.ffn, linear(c.dim, 6 * c.dim)});
  st.widest_row = wan_widest_row(c);
  // fp8 bytes: the quantized weights at 1 byte, their biases, norms and the modulation at 2.
  st.largest_subunit_fp8_bytes = std::max({b.self_attn * 2 - 4 * c.dim * c.dim, b.ffn * 2 - 2 * c.dim * c.ffn_dim,
                                           linear(c.dim, 6 * c.dim) * 2 - 6 * c.dim * c.dim});
  st.widest_row_fp8_bytes = std::max({c.dim, c.ffn_dim, c.text_dim, c.freq_dim, 2 * c.in_dim * patch_volume});
  st.text_encoder = t5_encoder_params({});
  st.vae = vae_params({});
  return st;
}

// The workload at the size the stack computes on. Live Avatar fits the requested size as an area
// (get_size_less_than_area: 720x400 renders at 704x384); a Wan t2v run takes it as given.
inline workload rendered(const stack& st, workload w) {
  if (w.width <= 0 || w.height <= 0) throw_error("resolution ", w.width, "x", w.height, " must be positive");
  if (st.renders_by_area) {
    const ::unshard::s2v::pixel_size r = ::unshard::s2v::render_size(w.width, w.height);
    // The frame packer's 4x bucket has an 8x8 latent kernel: 64x64 pixels is the smallest video.
    if (r.width < 64 || r.height < 64)
      throw_error("resolution ", w.width, "x", w.height, " renders at ", r.width, "x", r.height,
                  " (Live Avatar's get_size_less_than_area), below the 64x64 pixels the frame packer needs");
    w.width = r.width;
    w.height = r.height;
  }
  validate(w);
  return w;
}

}  // namespace unshard::liveavatar
