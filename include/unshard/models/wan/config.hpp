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
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "unshard/core/error.hpp"

namespace unshard {

struct wan_config {
  std::string model_type = "t2v";
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

  // Throws unless the configuration describes a model this implementation computes exactly;
  // `source` (a file name) goes into the message.
  void validate(const std::string& source) const;

  static wan_config from_json(const nlohmann::json& j, const std::string& source = "<json>");
  static wan_config load(const std::filesystem::path& path);
};

namespace detail {

inline std::int64_t wan_positive_int(const nlohmann::json& j, const char* key, std::int64_t fallback,
                                     const std::string& source) {
  const auto it = j.find(key);
  if (it == j.end()) return fallback;
  if (!it->is_number_integer() || it->get<std::int64_t>() <= 0)
    throw_error("wan config '", source, "': key '", key, "' must be a positive integer, got ", it->dump());
  return it->get<std::int64_t>();
}

inline bool wan_bool(const nlohmann::json& j, const char* key, bool fallback, const std::string& source) {
  const auto it = j.find(key);
  if (it == j.end()) return fallback;
  if (!it->is_boolean()) throw_error("wan config '", source, "': key '", key, "' must be true or false, got ", it->dump());
  return it->get<bool>();
}

template <std::size_t N>
std::array<std::int64_t, N> wan_int_array(const nlohmann::json& j, const char* key, std::array<std::int64_t, N> fallback,
                                          const std::string& source) {
  const auto it = j.find(key);
  if (it == j.end()) return fallback;
  if (!it->is_array() || it->size() != N)
    throw_error("wan config '", source, "': key '", key, "' must be an array of ", N, " integers, got ", it->dump());
  std::array<std::int64_t, N> out{};
  for (std::size_t i = 0; i < N; ++i) {
    if (!(*it)[i].is_number_integer())
      throw_error("wan config '", source, "': key '", key, "' must be an array of ", N, " integers, got ", it->dump());
    out[i] = (*it)[i].get<std::int64_t>();
  }
  return out;
}

}  // namespace detail

inline void wan_config::validate(const std::string& source) const {
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

inline wan_config wan_config::from_json(const nlohmann::json& j, const std::string& source) {
  if (!j.is_object()) throw_error("wan config '", source, "': expected a JSON object, got ", j.type_name());
  wan_config c;
  if (const auto it = j.find("model_type"); it != j.end()) {
    if (!it->is_string()) throw_error("wan config '", source, "': key 'model_type' must be a string, got ", it->dump());
    c.model_type = it->get<std::string>();
  }
  c.dim = detail::wan_positive_int(j, "dim", c.dim, source);
  c.ffn_dim = detail::wan_positive_int(j, "ffn_dim", c.ffn_dim, source);
  c.freq_dim = detail::wan_positive_int(j, "freq_dim", c.freq_dim, source);
  c.text_dim = detail::wan_positive_int(j, "text_dim", c.text_dim, source);
  c.text_len = detail::wan_positive_int(j, "text_len", c.text_len, source);
  c.in_dim = detail::wan_positive_int(j, "in_dim", c.in_dim, source);
  c.out_dim = detail::wan_positive_int(j, "out_dim", c.out_dim, source);
  c.num_heads = detail::wan_positive_int(j, "num_heads", c.num_heads, source);
  c.num_layers = detail::wan_positive_int(j, "num_layers", c.num_layers, source);
  c.patch_size = detail::wan_int_array(j, "patch_size", c.patch_size, source);
  c.window_size = detail::wan_int_array(j, "window_size", c.window_size, source);
  c.qk_norm = detail::wan_bool(j, "qk_norm", c.qk_norm, source);
  c.cross_attn_norm = detail::wan_bool(j, "cross_attn_norm", c.cross_attn_norm, source);
  if (const auto it = j.find("eps"); it != j.end()) {
    if (!it->is_number()) throw_error("wan config '", source, "': key 'eps' must be a number, got ", it->dump());
    c.eps = it->get<double>();
  }
  c.validate(source);
  return c;
}

inline wan_config wan_config::load(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw_error("wan config '", path.string(), "': cannot open the file");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw_error("wan config '", path.string(), "': invalid JSON: ", e.what());
  }
  return from_json(j, path.string());
}

}  // namespace unshard
