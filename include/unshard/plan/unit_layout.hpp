#pragma once
#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

#include "unshard/core/flat_layout.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/policy/policy_values.hpp"

namespace unshard {

// Where one declared parameter of a sub-unit lives once its unit is ready.
struct param_slot {
  bool resident = false;   // in the unit's resident buffer, else in its gathered buffer
  std::size_t index = 0;   // position in that buffer's flat layout
};

// One unit of unsharding under a policy: the parameters gathered together, split into those
// sharded across ranks (flat, N equal shards) and the small ones kept whole on every rank.
// The ledger and the runtime both build these with build_units(), so what is planned is exactly
// what is allocated.
struct unit_layout {
  unit_info info;
  std::string name;                          // "blocks.3" or "blocks.3.ffn"
  std::vector<param_spec> sharded_params;    // in flat order
  std::vector<param_spec> resident_params;
  flat_layout sharded;                       // world_size-way
  flat_layout resident;                      // one piece, unsharded
  std::vector<std::vector<param_slot>> slots;  // per sub-unit of the unit, per declared parameter
  bool kept = false;                         // gathered once and kept (full, or a residency policy)

  std::size_t gathered_bytes() const noexcept { return sharded.padded_bytes(); }
};

namespace detail {
inline void check_unique_names(const std::vector<unit_layout>& units) {
  std::vector<const std::string*> names;
  for (const auto& u : units) {
    for (const auto& p : u.sharded_params) names.push_back(&p.name);
    for (const auto& p : u.resident_params) names.push_back(&p.name);
  }
  std::sort(names.begin(), names.end(), [](auto* a, auto* b) { return *a < *b; });
  for (std::size_t i = 1; i < names.size(); ++i)
    if (*names[i] == *names[i - 1]) throw_error("model declares parameter '", *names[i], "' twice");
}
}  // namespace detail

// Cuts a model into units under a policy's granularity and places each parameter.
template <model M>
std::vector<unit_layout> build_units(const M& m, std::size_t world_size, const policy_values& policy) {
  if (world_size == 0) throw_error("world size must be at least 1 (got 0)");
  std::vector<unit_layout> units;
  const std::size_t layers = m.layer_count();
  for (std::size_t l = 0; l < layers; ++l) {
    const auto& layer = m.layer(l);
    const std::size_t subs = layer.subunit_count();
    if (subs == 0) throw_error("layer '", layer.name(), "' declares no sub-unit (a layer has at least one)");
    const bool per_sub = policy.granularity == unshard_granularity::subunit;
    for (std::size_t s0 = 0; s0 < subs; s0 += per_sub ? 1 : subs) {
      const std::size_t s1 = per_sub ? s0 + 1 : subs;
      unit_layout u;
      u.name = per_sub && subs > 1 ? layer.name() + "." + layer.subunit_name(s0) : layer.name();
      u.info.layer = l;
      u.info.layer_count = layers;
      u.info.first_subunit = s0;
      u.info.subunit_count = s1 - s0;
      for (std::size_t s = s0; s < s1; ++s) {
        std::vector<param_slot> slots;
        for (const param_spec& p : layer.parameters(s)) {
          p.dims.validate("parameter '" + p.name + "' of layer '" + layer.name() + "'", size_of(p.type));
          const bool resident = p.bytes() < policy.resident_below_bytes;
          auto& list = resident ? u.resident_params : u.sharded_params;
          slots.push_back({resident, list.size()});
          list.push_back(p);
        }
        u.slots.push_back(std::move(slots));
      }
      u.sharded = flat_layout(u.sharded_params, world_size);
      u.resident = flat_layout(u.resident_params, 1);
      units.push_back(std::move(u));
    }
  }
  for (std::size_t i = 0; i < units.size(); ++i) {
    units[i].info.index = i;
    units[i].info.unit_count = units.size();
    units[i].info.gathered_bytes = units[i].gathered_bytes();
    units[i].kept = policy.keeps(units[i].info);
  }
  detail::check_unique_names(units);
  return units;
}

// The rotating gathered buffers: how many, and how large (the largest unit that is not kept).
struct ring_shape {
  std::size_t buffers = 0;
  std::size_t buffer_bytes = 0;
};

inline ring_shape ring_for(const std::vector<unit_layout>& units, const policy_values& policy) {
  ring_shape r;
  std::size_t streamed = 0;
  for (const auto& u : units)
    if (!u.kept && u.gathered_bytes() > 0) {
      ++streamed;
      r.buffer_bytes = std::max(r.buffer_bytes, u.gathered_bytes());
    }
  r.buffers = std::min(streamed, policy.ring_buffers());
  return r;
}

}  // namespace unshard
