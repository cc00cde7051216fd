#pragma once
// Device and link profiles for the time model, read at run time from a JSON file (data/profiles.json,
// installed beside unshard-plan) that users extend with their own file. Format:
//   {"devices": [{"name": "rtx4090", "sustained_flops": 100e12, "h2d_bytes_s": 25e9, "link": "pcie4-no-p2p"}, ...],
//    "links":   [{"name": "pcie4-no-p2p", "bus_bytes_s": 12e9, "latency_s": 40e-6}, ...]}
// Other keys ("note", "_comment") are ignored. A device names the link it is usually wired with.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "unshard/core/error.hpp"
#include "unshard/io/json_strict.hpp"

namespace unshard {

struct device_profile {
  std::string name;
  double sustained_flops = 0;  // dense bf16 FLOP/s that large GEMMs sustain
  double h2d_bytes_s = 0;      // pinned host-to-device copies (offload)
  std::string link;            // the link profile it is usually wired with
};

struct link_profile {
  std::string name;
  double bus_bytes_s = 0;  // all-gather bus bandwidth: bytes a rank receives per second
  double latency_s = 0;    // fixed cost of one collective call (charged per unit or per chunk)
};

class profile_set {
 public:
  // Adds or replaces (by name): a user's file overrides the shipped profiles it names.
  void add(device_profile d) { put(devices_, std::move(d)); }
  void add(link_profile l) { put(links_, std::move(l)); }
  void merge(const profile_set& other) {
    for (const auto& d : other.devices_) add(d);
    for (const auto& l : other.links_) add(l);
  }

  const device_profile& device(std::string_view name) const { return find(devices_, name, "device"); }
  const link_profile& link(std::string_view name) const { return find(links_, name, "link"); }
  const std::vector<device_profile>& devices() const noexcept { return devices_; }
  const std::vector<link_profile>& links() const noexcept { return links_; }

  std::string source;  // where they came from, for messages and the JSON output

 private:
  template <class T>
  static void put(std::vector<T>& v, T x) {
    for (auto& e : v)
      if (e.name == x.name) {
        e = std::move(x);
        return;
      }
    v.push_back(std::move(x));
  }
  template <class T>
  const T& find(const std::vector<T>& v, std::string_view name, const char* kind) const {
    for (const auto& e : v)
      if (e.name == name) return e;
    std::string known;
    for (const auto& e : v) known += (known.empty() ? "" : ", ") + e.name;
    throw_error("unknown ", kind, " profile '", name, "' (known: ", known, "; profiles from ", source, ")");
  }

  std::vector<device_profile> devices_;
  std::vector<link_profile> links_;
};

namespace detail {
inline const nlohmann::json& profile_field(const nlohmann::json& e, const char* key, const std::string& where) {
  const auto it = e.find(key);
  if (it == e.end()) throw_error(where, ": missing \"", key, "\"");
  return *it;
}
inline double positive_number(const nlohmann::json& e, const char* key, const std::string& where, bool allow_zero = false) {
  const nlohmann::json& v = profile_field(e, key, where);
  if (!v.is_number()) throw_error(where, ": \"", key, "\" is ", short_dump(v), ", not a number");
  const double x = v.get<double>();
  if (!std::isfinite(x) || x < 0 || (!allow_zero && x == 0))
    throw_error(where, ": \"", key, "\" is ", short_dump(v), allow_zero ? ", must be >= 0" : ", must be > 0");
  return x;
}
inline std::string profile_name(const nlohmann::json& e, const std::string& where) {
  const nlohmann::json& v = profile_field(e, "name", where);
  if (!v.is_string() || v.get_ref<const std::string&>().empty()) throw_error(where, ": \"name\" must be a non-empty string");
  return v.get<std::string>();
}
}  // namespace detail

// Parses a profiles document; `source` names it in every error. Each device's link must exist
// in this document or in `known` (the profiles it extends).
inline profile_set parse_profiles(std::string_view text, const std::string& source, const profile_set* known = nullptr) {
  const nlohmann::json j = detail::parse_json_strict(text, "profiles file '" + source + "'");
  if (!j.is_object()) throw_error("profiles file '", source, "': not a JSON object");
  profile_set out;
  out.source = source;
  for (const char* key : {"devices", "links"}) {
    const auto it = j.find(key);
    if (it == j.end()) continue;
    if (!it->is_array()) throw_error("profiles file '", source, "': \"", key, "\" is not an array");
    for (std::size_t i = 0; i < it->size(); ++i) {
      const nlohmann::json& e = (*it)[i];
      std::string where = "profiles file '" + source + "': " + key + "[" + std::to_string(i) + "]";
      if (!e.is_object()) throw_error(where, " is not an object");
      const std::string name = detail::profile_name(e, where);
      where += " ('" + name + "')";
      if (std::string_view(key) == "devices") {
        const nlohmann::json& l = detail::profile_field(e, "link", where);
        if (!l.is_string()) throw_error(where, ": \"link\" must name a link profile");
        out.add(device_profile{name, detail::positive_number(e, "sustained_flops", where),
                               detail::positive_number(e, "h2d_bytes_s", where), l.get<std::string>()});
      } else {
        out.add(link_profile{name, detail::positive_number(e, "bus_bytes_s", where),
                             detail::positive_number(e, "latency_s", where, true)});
      }
    }
  }
  if (!j.contains("devices") && !j.contains("links"))
    throw_error("profiles file '", source, "': has neither \"devices\" nor \"links\"");
  for (const auto& d : out.devices()) {
    bool found = false;
    for (const auto& l : out.links()) found = found || l.name == d.link;
    if (!found && known)
      for (const auto& l : known->links()) found = found || l.name == d.link;
    if (!found) throw_error("profiles file '", source, "': device '", d.name, "' names link '", d.link, "', which no profile defines");
  }
  return out;
}

inline profile_set load_profiles(const std::string& path, const profile_set* known = nullptr) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_error("cannot open profiles file '", path, "'");
  std::ostringstream buf;
  buf << in.rdbuf();
  return parse_profiles(buf.str(), path, known);
}

// The fallback when no profiles file is found beside the tool: the same values as the shipped
// data/profiles.json (a test keeps the two equal). Estimates, documented in docs/planner.md.
inline profile_set builtin_profiles() {
  profile_set p;
  p.source = "built-in defaults";
  p.add(device_profile{"rtx4090", 100e12, 25e9, "pcie4-no-p2p"});
  p.add(device_profile{"h100", 600e12, 25e9, "nvlink4"});
  p.add(device_profile{"h800", 600e12, 25e9, "nvlink-h800"});
  p.add(link_profile{"pcie4-no-p2p", 12e9, 40e-6});
  p.add(link_profile{"nvlink4", 360e9, 15e-6});
  p.add(link_profile{"nvlink-h800", 160e9, 15e-6});
  return p;
}

// Where a tool looks for the shipped profiles, relative to its own executable: beside it (copied
// there by the build), in an install tree's share/unshard, or in the source tree's data/ when the
// build directory sits inside it (<src>/build/bin/unshard-plan).
inline std::vector<std::filesystem::path> profile_search_paths(const std::filesystem::path& exe_dir) {
  return {exe_dir / "profiles.json", exe_dir / ".." / "share" / "unshard" / "profiles.json",
          exe_dir / ".." / "data" / "profiles.json", exe_dir / ".." / ".." / "data" / "profiles.json"};
}

// The first profiles file found beside the executable, else the built-in defaults; then each of
// `user_files` on top (adding profiles, or replacing those with the same name).
inline profile_set find_profiles(const std::filesystem::path& exe_dir, const std::vector<std::string>& user_files = {}) {
  profile_set p = builtin_profiles();
  for (const auto& path : profile_search_paths(exe_dir)) {
    const std::filesystem::path candidate = path.lexically_normal();
    std::error_code ec;
    if (std::filesystem::is_regular_file(candidate, ec)) {
      p = load_profiles(candidate.string());
      break;
    }
  }
  for (const auto& f : user_files) {
    const profile_set extra = load_profiles(f, &p);
    p.merge(extra);
    p.source += " + " + f;
  }
  return p;
}

}  // namespace unshard
