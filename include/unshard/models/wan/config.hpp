#pragma once
// The configuration of a Wan2.1 DiT (WanModel), read from Wan's own config.json.
//
// Keys Wan's config.json may omit take WanModel.__init__'s defaults (text_dim 4096,
// patch_size [1,2,2], qk_norm, cross_attn_norm, window_size [-1,-1], eps 1e-6, and dim 2048,
// ffn_dim 8192, freq_dim 256, text_len 512, in/out_dim 16, 16 heads, 32 layers). Unknown keys (`_class_name`,
// `_diffusers_version`, ...) are ignored; a present key of the wrong type or value is an error
// naming the key and the file.
#include <array>
#include <cstdint>
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "unshard/core/error.hpp"
#include "unshard/io/json_config.hpp"

namespace unshard::wan {

// The Wan backbone's hyper-parameters, with WanModel.__init__'s defaults: shared by Wan's own
// model and the models built on the same backbone (Live Avatar's S2V).
struct backbone_config {
  std::int64_t dim = 2048;
  std::int64_t ffn_dim = 8192;
  std::int64_t freq_dim = 256;
  std::int64_t text_dim = 4096;
  std::int64_t text_len = 512;
  std::int64_t in_dim = 16;
  std::int64_t out_dim = 16;
  std::int64_t num_heads = 16;
  std::int64_t num_layers = 32;
  std::array<std::int64_t, 3> patch_size{1, 2, 2};  // (pt, ph, pw)
  std::array<std::int64_t, 2> window_size{-1, -1};
  double eps = 1e-6;
  bool qk_norm = true;
  bool cross_attn_norm = true;

  std::int64_t head_dim() const noexcept { return dim / num_heads; }

  // Reads the sizes (dim to num_layers, patch_size, window_size) that `r`'s object holds.
  void read_sizes(const json_config_reader& r) {
    r.positive("dim", dim);
    r.positive("ffn_dim", ffn_dim);
    r.positive("freq_dim", freq_dim);
    r.positive("text_dim", text_dim);
    r.positive("text_len", text_len);
    r.positive("in_dim", in_dim);
    r.positive("out_dim", out_dim);
    r.positive("num_heads", num_heads);
    r.positive("num_layers", num_layers);
    r.integers("patch_size", patch_size);
    r.integers("window_size", window_size);
  }
};

struct config : wan::backbone_config {
  std::string model_type = "t2v";

  // Throws unless the configuration describes a model this implementation computes exactly;
  // `source` (a file name) goes into the message.
  void validate(const std::string& source) const;

  static wan::config from_json(const nlohmann::json& j, const std::string& source = "<json>");
  static wan::config load(const std::filesystem::path& path);
};

inline void wan::config::validate(const std::string& source) const {
  const auto fail = [&](auto&&... what) { throw_error("wan config '", source, "': ", what...); };
  if (model_type != "t2v")
    fail("key 'model_type' is '", model_type, "': only Wan's t2v model is supported (i2v/flf2v/vace add image inputs)");
  if (dim % num_heads != 0) fail("key 'num_heads' (", num_heads, ") does not divide key 'dim' (", dim, ")");
  if (head_dim() % 2 != 0)
    fail("head_dim = dim / num_heads = ", dim, " / ", num_heads, " = ", head_dim(), " is odd (rope needs pairs)");
  if (freq_dim % 2 != 0) fail("key 'freq_dim' (", freq_dim, ") must be even (cos and sin halves)");
  for (const std::int64_t p : patch_size)
    if (p <= 0) fail("key 'patch_size' must hold positive integers, got [", patch_size[0], ",", patch_size[1], ",", patch_size[2], "]");
  if (window_size[0] != -1 || window_size[1] != -1)
    fail("key 'window_size' is [", window_size[0], ",", window_size[1],
         "]: window_size local attention is not supported (only [-1,-1], global attention)");
  if (!(eps > 0.0)) fail("key 'eps' must be a positive number, got ", eps);
}

inline wan::config wan::config::from_json(const nlohmann::json& j, const std::string& source) {
  require_json_object(j, "wan config", source);
  const json_config_reader r{.j = j, .kind = "wan config", .source = source, .sized_array_errors = true};
  wan::config c;
  r.string("model_type", c.model_type);
  c.read_sizes(r);
  r.boolean("qk_norm", c.qk_norm);
  r.boolean("cross_attn_norm", c.cross_attn_norm);
  r.number("eps", c.eps);
  c.validate(source);
  return c;
}

inline wan::config wan::config::load(const std::filesystem::path& path) {
  return from_json(load_json_config(path, "wan config"), path.string());
}

}  // namespace unshard::wan
