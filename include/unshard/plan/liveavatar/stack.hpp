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
};

// What the planner needs about the whole stack.
struct stack {
  std::string model;
  wan::config dit;
  std::vector<dit_unit> units;      // forward order
  count largest_subunit = 0;        // for selective:subunit
  count widest_row = 0;             // elements in the widest weight row (chunked's smallest chunk)
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
inline stack liveavatar_stack(const s2v_config& s) {
  const s2v_parts p = s2v_inventory(s);  // LoRA factors only (zero when merged)
  const wan::config& c = s.base;
  stack st;
  st.model = "liveavatar-14b";
  st.dit = c;
  st.s2v_model = model_config_of(s);
  const ::unshard::s2v::model m(*st.s2v_model, s2v::pipeline_workload(*st.s2v_model, 720, 400));
  const count lora_each = c.num_layers ? p.lora / c.num_layers : 0;
  count pre = 0;
  for (std::size_t l = 0; l < m.layer_count(); ++l) {
    const ::unshard::s2v::layer& layer = m.layer(l);
    count params = 0;
    for (std::size_t sub = 0; sub < layer.subunit_count(); ++sub) {
      count sub_params = 0;
      for (const param_spec& ps : layer.parameters(sub)) {
        sub_params += ps.dims.numel();
        if (ps.by_rows && ps.dims.rank() >= 2) st.widest_row = std::max(st.widest_row, ps.dims.numel() / ps.dims[0]);
      }
      st.largest_subunit = std::max(st.largest_subunit, sub_params);
      params += sub_params;
    }
    switch (layer.kind()) {
      case ::unshard::s2v::layer_kind::block:
        st.units.push_back({layer.name(), params + lora_each, false, true});
        break;
      case ::unshard::s2v::layer_kind::injector:
      case ::unshard::s2v::layer_kind::head:
        if (pre) st.units.push_back({"pre", std::exchange(pre, 0), true, false});
        st.units.push_back({layer.name(), params, true, false});
        break;
      default:  // embeddings, frame packer, cond encoder, audio encoder: before the first block
        pre += params;
        if (st.units.empty() && l + 1 < m.layer_count() && m.layer(l + 1).kind() == ::unshard::s2v::layer_kind::block)
          st.units.push_back({"pre", std::exchange(pre, 0), true, false});
    }
  }
  st.text_encoder = t5_encoder_params({});
  st.vae = vae_params({});
  st.audio_encoder_host = wav2vec2_params({});
  st.causal_kv = true;
  st.renders_by_area = true;
  return st;
}

// Any Wan t2v config.json: the DiT alone (no audio, no causal cache), with the same T5 and VAE.
inline stack wan_stack(const wan::config& c, const std::string& name) {
  stack st;
  st.model = name;
  st.dit = c;
  const count outside = wan_outside_blocks(c);
  st.units.push_back({"embeddings+head", outside, true, false});
  for (count i = 0; i < c.num_layers; ++i) st.units.push_back({"blocks." + std::to_string(i), wan_block(c).total(), false, true});
  const wan_block_parts b = wan_block(c);
  st.largest_subunit = std::max({b.self_attn, b.ffn, linear(c.dim, 6 * c.dim)});
  st.widest_row = wan_widest_row(c);
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
