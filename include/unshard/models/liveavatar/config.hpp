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
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "unshard/core/error.hpp"

namespace unshard {

struct s2v_config {
  // The Wan backbone.
  std::int64_t dim = 2048;
  std::int64_t ffn_dim = 8192;
  std::int64_t freq_dim = 256;
  std::int64_t text_dim = 4096;
  std::int64_t text_len = 512;
  std::int64_t in_dim = 16;
  std::int64_t out_dim = 16;
  std::int64_t num_heads = 16;
  std::int64_t num_layers = 32;
  std::array<std::int64_t, 3> patch_size{1, 2, 2};
  std::array<std::int64_t, 2> window_size{-1, -1};
  double eps = 1e-6;
  bool qk_norm = true;
  bool cross_attn_norm = true;
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

  std::int64_t head_dim() const noexcept { return dim / num_heads; }
  // Injector j serves block audio_inject_layers[j] (sorted); -1 when block i has none.
  std::int64_t injector_of(std::int64_t block) const noexcept {
    for (std::size_t j = 0; j < audio_inject_layers.size(); ++j)
      if (audio_inject_layers[j] == block) return static_cast<std::int64_t>(j);
    return -1;
  }

  void validate(const std::string& source) const;
  // `j` is a vectors config (with a `model` object) or a flat model config.
  static s2v_config from_json(const nlohmann::json& j, const std::string& source = "<json>");
  static s2v_config load(const std::filesystem::path& path);
};

// Live Avatar's 14B: wan_s2v_14B_modified.py on top of the constructor defaults.
inline s2v_config liveavatar_14b_config() {
  s2v_config c;
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

namespace detail {

struct s2v_json_reader {
  const nlohmann::json& j;
  const std::string& source;

  [[noreturn]] void fail(const char* key, const char* want, const nlohmann::json& got) const {
    throw_error("liveavatar config '", source, "': key '", key, "' must be ", want, ", got ", got.dump());
  }
  void positive(const char* key, std::int64_t& v) const {
    const auto it = j.find(key);
    if (it == j.end()) return;
    if (!it->is_number_integer() || it->get<std::int64_t>() <= 0) fail(key, "a positive integer", *it);
    v = it->get<std::int64_t>();
  }
  void integer(const char* key, std::int64_t& v) const {
    const auto it = j.find(key);
    if (it == j.end()) return;
    if (!it->is_number_integer()) fail(key, "an integer", *it);
    v = it->get<std::int64_t>();
  }
  void boolean(const char* key, bool& v) const {
    const auto it = j.find(key);
    if (it == j.end()) return;
    if (!it->is_boolean()) fail(key, "true or false", *it);
    v = it->get<bool>();
  }
  void string(const char* key, std::string& v) const {
    const auto it = j.find(key);
    if (it == j.end()) return;
    if (!it->is_string()) fail(key, "a string", *it);
    v = it->get<std::string>();
  }
  void number(const char* key, double& v) const {
    const auto it = j.find(key);
    if (it == j.end()) return;
    if (!it->is_number()) fail(key, "a number", *it);
    v = it->get<double>();
  }
  void integers(const char* key, std::vector<std::int64_t>& v, std::size_t exact = 0) const {
    const auto it = j.find(key);
    if (it == j.end()) return;
    if (!it->is_array() || (exact && it->size() != exact)) fail(key, "an array of integers", *it);
    v.clear();
    for (const auto& e : *it) {
      if (!e.is_number_integer()) fail(key, "an array of integers", *it);
      v.push_back(e.get<std::int64_t>());
    }
  }
  template <std::size_t N>
  void integers(const char* key, std::array<std::int64_t, N>& a) const {
    std::vector<std::int64_t> v(a.begin(), a.end());
    integers(key, v, N);
    for (std::size_t i = 0; i < N; ++i) a[i] = v[i];
  }
};

}  // namespace detail

inline void s2v_config::validate(const std::string& source) const {
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

inline s2v_config s2v_config::from_json(const nlohmann::json& root, const std::string& source) {
  if (!root.is_object()) throw_error("liveavatar config '", source, "': expected a JSON object, got ", root.type_name());
  const auto model = root.find("model");
  if (model != root.end() && !model->is_object())
    throw_error("liveavatar config '", source, "': key 'model' must be an object, got ", model->dump());
  const nlohmann::json& j = model != root.end() ? *model : root;
  const detail::s2v_json_reader r{j, source};
  s2v_config c;
  r.positive("dim", c.dim);
  r.positive("ffn_dim", c.ffn_dim);
  r.positive("freq_dim", c.freq_dim);
  r.positive("text_dim", c.text_dim);
  r.positive("text_len", c.text_len);
  r.positive("in_dim", c.in_dim);
  r.positive("out_dim", c.out_dim);
  r.positive("num_heads", c.num_heads);
  r.positive("num_layers", c.num_layers);
  r.integers("patch_size", c.patch_size);
  r.integers("window_size", c.window_size);
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

inline s2v_config s2v_config::load(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw_error("liveavatar config '", path.string(), "': cannot open the file");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw_error("liveavatar config '", path.string(), "': invalid JSON: ", e.what());
  }
  return from_json(j, path.string());
}

}  // namespace unshard
