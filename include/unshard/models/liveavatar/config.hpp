#pragma once
// The configuration of Live Avatar's CausalWanModel_S2V (Wan2.2-S2V with the streaming forward).
//
// Read from either the `model` object of a vectors config.json or a flat Wan2.2-S2V / Live Avatar
// config.json (the keys sit at the top level). Keys a file omits take the constructor defaults of
// CausalWanModel_S2V.__init__ (README.liveavatar.md §1 lists them). Unknown keys are ignored; a
// present key of the wrong type, or a structural flag this implementation does not compute
// exactly (the official code asserts on most of them), is an error naming the key and the file.
#include <array>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "unshard/core/error.hpp"
#include "unshard/io/json_config.hpp"
#include "unshard/models/wan/config.hpp"

namespace unshard::s2v {

struct config : wan::backbone_config {
  // Which cross attention the blocks use (only t2v_cross_attn is computed).
  std::string cross_attn_type = "t2v_cross_attn";
  // The S2V additions.
  std::int64_t cond_dim = 0;
  std::int64_t audio_dim = 5120;
  std::int64_t num_audio_token = 4;
  bool enable_adain = false;
  std::string adain_mode = "attn_norm";
  std::vector<std::int64_t> audio_inject_layers{0, 4, 8, 12, 16, 20, 24, 27};
  bool zero_init = false;  // initialisation only: no effect on a forward from loaded weights
  bool zero_timestep = false;
  bool enable_motioner = true;
  bool add_last_motion = true;
  bool enable_framepack = false;
  std::string framepack_drop_mode = "drop";
  bool slide_motion_frames = false;
  std::int64_t local_attn_size = -1;

  // Injector j serves block audio_inject_layers[j] (sorted); -1 when block i has none.
  std::int64_t injector_of(std::int64_t block) const noexcept {
    for (std::size_t j = 0; j < audio_inject_layers.size(); ++j)
      if (audio_inject_layers[j] == block) return static_cast<std::int64_t>(j);
    return -1;
  }

  void validate(const std::string& source) const;
  // `j` is a vectors config (with a `model` object) or a flat model config.
  static s2v::config from_json(const nlohmann::json& j, const std::string& source = "<json>");
  static s2v::config load(const std::filesystem::path& path);
};

// Live Avatar's 14B: wan_s2v_14B_modified.py on top of the constructor defaults.
inline s2v::config liveavatar_14b_config() {
  s2v::config c;
  c.dim = 5120;
  c.ffn_dim = 13824;
  c.num_heads = 40;
  c.num_layers = 40;
  c.cond_dim = 16;
  c.audio_dim = 1024;
  c.enable_adain = true;
  c.audio_inject_layers = {0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39};
  c.zero_init = true;
  c.zero_timestep = true;
  c.enable_motioner = false;
  c.enable_framepack = true;
  c.framepack_drop_mode = "padd";
  return c;
}

inline void s2v::config::validate(const std::string& source) const {
  const auto fail = [&](auto&&... what) { throw_error("liveavatar config '", source, "': ", what...); };
  if (dim % num_heads != 0) fail("key 'num_heads' (", num_heads, ") does not divide key 'dim' (", dim, ")");
  if (head_dim() % 2 != 0) fail("head_dim = dim / num_heads = ", head_dim(), " is odd (rope needs pairs)");
  if (dim % 4 != 0) fail("key 'dim' (", dim, ") must be divisible by 4 (the audio encoder's dim/4 and dim/2 channels)");
  if (freq_dim % 2 != 0) fail("key 'freq_dim' (", freq_dim, ") must be even (cos and sin halves)");
  for (const std::int64_t p : patch_size)
    if (p <= 0) fail("key 'patch_size' must hold positive integers");
  if (patch_size[0] != 1 || patch_size[1] != 2 || patch_size[2] != 2)
    fail("key 'patch_size' must be [1,2,2]: the frame packer and the S2V rope assume it");
  if (window_size[0] != -1 || window_size[1] != -1) fail("key 'window_size' must be [-1,-1] (global attention)");
  if (!(eps > 0.0)) fail("key 'eps' must be a positive number");
  if (!qk_norm) fail("key 'qk_norm' must be true (the S2V attention always normalises q and k)");
  if (cross_attn_type != "t2v_cross_attn") fail("key 'cross_attn_type' is '", cross_attn_type, "': only t2v_cross_attn is supported");
  if (cond_dim <= 0) fail("key 'cond_dim' is ", cond_dim, ": the streamed forward needs the cond encoder (cond_dim > 0)");
  if (audio_dim <= 0) fail("key 'audio_dim' must be positive");
  if (num_audio_token <= 0) fail("key 'num_audio_token' must be positive");
  if (!enable_adain) fail("key 'enable_adain' is false: only the AdaLN audio injector (true, as Live Avatar) is supported");
  if (adain_mode != "attn_norm") fail("key 'adain_mode' is '", adain_mode, "': only 'attn_norm' is supported");
  if (!zero_timestep) fail("key 'zero_timestep' is false: the streamed forward asserts zero_timestep");
  if (enable_motioner) fail("key 'enable_motioner' is true: the official model asserts it is false");
  if (!enable_framepack) fail("key 'enable_framepack' is false: only the frame packer is supported for motion tokens");
  if (framepack_drop_mode != "padd" && framepack_drop_mode != "drop")
    fail("key 'framepack_drop_mode' is '", framepack_drop_mode, "' (expected padd or drop)");
  if (!add_last_motion) fail("key 'add_last_motion' is false: only add_last_motion (all three buckets) is supported");
  if (slide_motion_frames) fail("key 'slide_motion_frames' is true: only false (motion positions never roll) is supported");
  if (local_attn_size != -1) fail("key 'local_attn_size' is ", local_attn_size, ": only -1 (no window) is supported");
  for (std::size_t i = 0; i < audio_inject_layers.size(); ++i) {
    const std::int64_t l = audio_inject_layers[i];
    if (l < 0 || l >= num_layers) fail("key 'audio_inject_layers' holds ", l, ", outside [0, num_layers = ", num_layers, ")");
    if (i && l <= audio_inject_layers[i - 1]) fail("key 'audio_inject_layers' must be strictly increasing");
  }
}

inline s2v::config s2v::config::from_json(const nlohmann::json& root, const std::string& source) {
  require_json_object(root, "liveavatar config", source);
  const auto model = root.find("model");
  if (model != root.end() && !model->is_object())
    throw_error("liveavatar config '", source, "': key 'model' must be an object, got ", model->dump());
  const nlohmann::json& j = model != root.end() ? *model : root;
  const json_config_reader r{.j = j, .kind = "liveavatar config", .source = source};
  s2v::config c;
  c.read_sizes(r);
  r.number("eps", c.eps);
  r.boolean("qk_norm", c.qk_norm);
  r.boolean("cross_attn_norm", c.cross_attn_norm);
  r.string("cross_attn_type", c.cross_attn_type);
  r.integer("cond_dim", c.cond_dim);
  r.positive("audio_dim", c.audio_dim);
  r.positive("num_audio_token", c.num_audio_token);
  r.boolean("enable_adain", c.enable_adain);
  r.string("adain_mode", c.adain_mode);
  r.integers("audio_inject_layers", c.audio_inject_layers);
  r.boolean("zero_init", c.zero_init);
  r.boolean("zero_timestep", c.zero_timestep);
  r.boolean("enable_motioner", c.enable_motioner);
  r.boolean("add_last_motion", c.add_last_motion);
  r.boolean("enable_framepack", c.enable_framepack);
  r.string("framepack_drop_mode", c.framepack_drop_mode);
  r.boolean("slide_motion_frames", c.slide_motion_frames);
  r.integer("local_attn_size", c.local_attn_size);
  c.validate(source);
  return c;
}

inline s2v::config s2v::config::load(const std::filesystem::path& path) {
  return from_json(load_json_config(path, "liveavatar config"), path.string());
}

}  // namespace unshard::s2v
