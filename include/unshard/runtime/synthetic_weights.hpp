#pragma once
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>

#include "unshard/layer/model.hpp"
#include "unshard/runtime/weight_source.hpp"

namespace unshard {

// Deterministic pseudo-random f32 weights for any model, generated on read: demos, benchmarks and
// tests run with no file and no download. Values are uniform in [-scale, scale]; norm weights
// ("norm" in the name, ending ".weight") are centred on 1 so normalisations keep their scale.
class synthetic_weights {
 public:
  template <model M>
  explicit synthetic_weights(const M& m, std::uint64_t seed = 1, float scale = 0.1f) : seed_(seed), scale_(scale) {
    for (std::size_t l = 0; l < m.layer_count(); ++l)
      for (std::size_t s = 0; s < m.layer(l).subunit_count(); ++s)
        for (const param_spec& p : m.layer(l).parameters(s)) dims_.emplace(p.name, p.dims);
  }

  stored_tensor describe(std::string_view name) const {
    const auto it = dims_.find(std::string(name));
    if (it == dims_.end()) throw_error(origin(), ": no tensor '", name, "'");
    return {dtype::f32, it->second};
  }

  void read(std::string_view name, std::uint64_t offset, std::span<std::byte> dst) const {
    const std::uint64_t h = std::hash<std::string_view>{}(name) ^ seed_;
    const bool norm_weight = name.find("norm") != std::string_view::npos && name.ends_with(".weight");
    for (std::size_t i = 0; i < dst.size() / 4; ++i) {
      float v = unit_uniform(h + (offset / 4 + i) * 0x9e3779b97f4a7c15ull) * scale_;
      if (norm_weight) v += 1.f;
      std::memcpy(dst.data() + 4 * i, &v, 4);
    }
    bytes_read_ += dst.size();
  }

  std::string origin() const { return "synthetic weights (seed " + std::to_string(seed_) + ")"; }
  std::uint64_t bytes_read() const noexcept { return bytes_read_; }

 private:
  // splitmix64 finaliser -> uniform in [-1, 1)
  static float unit_uniform(std::uint64_t z) noexcept {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return static_cast<float>(z >> 40) / static_cast<float>(1 << 23) - 1.f;
  }

  std::uint64_t seed_;
  float scale_;
  std::unordered_map<std::string, shape> dims_;
  mutable std::atomic<std::uint64_t> bytes_read_{0};
};

}  // namespace unshard
