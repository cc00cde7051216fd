#pragma once
// Reading a model's config.json: optional keys laid over defaults, strictly typed.
//
// Model configs (Wan's, Live Avatar's) share one rule: a key the file omits keeps the default the
// caller already put in the field, a key that is present must have the right type, and every
// error names the kind of config, the file and the key, e.g.
//   wan config 'c.json': key 'num_layers' must be a positive integer, got 0
// Unknown keys are the caller's business (the models ignore them).
#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "unshard/core/error.hpp"

namespace unshard {

// Opens and parses `path`; `kind` ("wan config") starts each error message.
inline nlohmann::json load_json_config(const std::filesystem::path& path, std::string_view kind) {
  std::ifstream in(path);
  if (!in) throw_error(kind, " '", path.string(), "': cannot open the file");
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw_error(kind, " '", path.string(), "': invalid JSON: ", e.what());
  }
}

// A config is a JSON object; anything else is refused before any key is looked at.
inline void require_json_object(const nlohmann::json& j, std::string_view kind, const std::string& source) {
  if (!j.is_object()) throw_error(kind, " '", source, "': expected a JSON object, got ", j.type_name());
}

// Reads the keys of one JSON object into fields holding their defaults. Each reader leaves the
// field alone when the key is absent and throws, naming kind, source and key, when it has the
// wrong type.
struct json_config_reader {
  const nlohmann::json& j;
  std::string_view kind;      // "wan config", "liveavatar config"
  const std::string& source;  // the file name (or "<json>")
  // Whether a fixed-size array's error says its size ("an array of 3 integers") or not.
  bool sized_array_errors = false;

  [[noreturn]] void fail(const char* key, std::string_view want, const nlohmann::json& got) const {
    throw_error(kind, " '", source, "': key '", key, "' must be ", want, ", got ", got.dump());
  }

  void positive(const char* key, std::int64_t& v) const {
    if (const nlohmann::json* x = find(key)) {
      if (!x->is_number_integer() || x->get<std::int64_t>() <= 0) fail(key, "a positive integer", *x);
      v = x->get<std::int64_t>();
    }
  }
  void integer(const char* key, std::int64_t& v) const {
    if (const nlohmann::json* x = find(key)) {
      if (!x->is_number_integer()) fail(key, "an integer", *x);
      v = x->get<std::int64_t>();
    }
  }
  void boolean(const char* key, bool& v) const {
    if (const nlohmann::json* x = find(key)) {
      if (!x->is_boolean()) fail(key, "true or false", *x);
      v = x->get<bool>();
    }
  }
  void string(const char* key, std::string& v) const {
    if (const nlohmann::json* x = find(key)) {
      if (!x->is_string()) fail(key, "a string", *x);
      v = x->get<std::string>();
    }
  }
  void number(const char* key, double& v) const {
    if (const nlohmann::json* x = find(key)) {
      if (!x->is_number()) fail(key, "a number", *x);
      v = x->get<double>();
    }
  }
  // Any number of integers.
  void integers(const char* key, std::vector<std::int64_t>& v) const {
    if (const nlohmann::json* x = find(key)) v = read_integers(key, *x, 0, "an array of integers");
  }
  // Exactly N integers.
  template <std::size_t N>
  void integers(const char* key, std::array<std::int64_t, N>& a) const {
    const nlohmann::json* x = find(key);
    if (!x) return;
    const std::string want =
        sized_array_errors ? "an array of " + std::to_string(N) + " integers" : std::string("an array of integers");
    const std::vector<std::int64_t> v = read_integers(key, *x, N, want);
    for (std::size_t i = 0; i < N; ++i) a[i] = v[i];
  }

 private:
  const nlohmann::json* find(const char* key) const {
    const auto it = j.find(key);
    return it == j.end() ? nullptr : &*it;
  }
  // `exact` = 0 takes any length.
  std::vector<std::int64_t> read_integers(const char* key, const nlohmann::json& x, std::size_t exact,
                                          std::string_view want) const {
    if (!x.is_array() || (exact != 0 && x.size() != exact)) fail(key, want, x);
    std::vector<std::int64_t> out;
    out.reserve(x.size());
    for (const auto& e : x) {
      if (!e.is_number_integer()) fail(key, want, x);
      out.push_back(e.get<std::int64_t>());
    }
    return out;
  }
};

}  // namespace unshard
