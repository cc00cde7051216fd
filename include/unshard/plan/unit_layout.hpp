#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "unshard/core/world_size.hpp"
#include "unshard/core/flat_layout.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/policy/policy_values.hpp"
#include "unshard/quant/fp8_scaling.hpp"

namespace unshard {

// Where one declared parameter of a sub-unit lives once its unit is ready.
struct param_slot {
  bool resident = false;   // in the unit's resident buffer, else in its gathered buffer
  std::size_t index = 0;   // position in that buffer's flat layout
};

// Under chunked unshard, a piece of a unit's flat buffer gathered at once: whole rows of one
// weight, or several whole weights of one sub-unit that fit together. Chunks follow the flat
// order, which is the order the sub-units consume their parameters.
struct weight_chunk {
  std::size_t begin = 0, end = 0;               // byte range in the unit's flat layout
  std::size_t first_param = 0, last_param = 0;  // indices into sharded_params, inclusive
  std::int64_t row_begin = 0, row_end = 0;      // rows of first_param when it is split
  bool split = false;                           // first_param is cut by rows (it alone is in the chunk)

  std::size_t bytes() const noexcept { return end - begin; }
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
  std::vector<std::size_t> sharded_subunit;  // sub-unit (index within the unit) of each sharded parameter
  std::vector<weight_chunk> chunks;          // chunked unshard only
  // fp8 weights (policy_values::fp8): the f32 scales of each quantized parameter are a resident
  // parameter of their own, "<weight>.scale" ([1] or [rows]), placed after the declared resident
  // parameters. Index of that scale in resident_params per sharded / resident parameter, or
  // no_scale for a parameter that is not quantized. Empty without fp8.
  static constexpr std::size_t no_scale = static_cast<std::size_t>(-1);
  std::vector<std::size_t> sharded_scale, resident_scale;

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

namespace detail {
inline std::size_t row_bytes_of(const param_spec& p) { return p.bytes() / static_cast<std::size_t>(p.dims[0]); }

// Rows of a weight per chunk when `fit` rows fit under the limit: at least one, and a multiple of
// chunk_row_multiple once there are that many, so that every chunk's row count and output offset
// keep the 16-byte alignment cuBLASLt asks of fp8 and of its fast bf16 kernels (a 64 MiB chunk of
// a 13824-row FFN weight would otherwise hold 13107 rows, and every chunk would take the slow path).
inline constexpr std::size_t chunk_row_multiple = 16;
inline std::size_t rows_per_chunk(std::size_t fit) {
  if (fit < chunk_row_multiple) return std::max<std::size_t>(1, fit);
  return fit - fit % chunk_row_multiple;
}

// Cuts a unit's sharded parameters into chunks of at most `limit` bytes: a weight larger than
// the limit into runs of whole rows (rows_per_chunk), smaller consecutive weights of one sub-unit
// grouped while their span (padding included) stays within the limit. A one-row weight over the
// limit (a modulation table) is a chunk of its own.
inline void cut_into_chunks(unit_layout& u, std::size_t limit) {
  const auto& params = u.sharded_params;
  for (std::size_t i = 0; i < params.size();) {
    const flat_entry& e = u.sharded.entry(i);
    const std::int64_t rows = params[i].dims[0];
    if (e.bytes > limit && rows > 1) {
      const std::size_t rb = row_bytes_of(params[i]);
      const auto per = static_cast<std::int64_t>(rows_per_chunk(limit / rb));
      for (std::int64_t r0 = 0; r0 < rows; r0 += per) {
        const std::int64_t r1 = std::min(rows, r0 + per);
        u.chunks.push_back({e.offset + static_cast<std::size_t>(r0) * rb, e.offset + static_cast<std::size_t>(r1) * rb,
                            i, i, r0, r1, true});
      }
      ++i;
      continue;
    }
    std::size_t j = i;
    while (j + 1 < params.size() && u.sharded_subunit[j + 1] == u.sharded_subunit[i]) {
      const flat_entry& next = u.sharded.entry(j + 1);
      if (next.bytes > limit || next.offset + next.bytes - e.offset > limit) break;
      ++j;
    }
    const flat_entry& last = u.sharded.entry(j);
    u.chunks.push_back({e.offset, last.offset + last.bytes, i, j, 0, rows, false});
    i = j + 1;
  }
}

// Under an fp8 policy, which declared parameters are stored as f8e4m3 codes plus scales: the GEMM
// weights a layer consumes by rows, of rank 2 (nn.Linear's [out, in], as the official fp8_linear.py
// converts nn.Linear only). 1-D parameters, whole-only tables and convolution weights keep their
// storage dtype (quant/fp8.hpp says why).
inline bool quantized_under(const param_spec& p, const policy_values& policy) {
  return policy.fp8 && p.by_rows && p.dims.rank() == 2 && p.dims[0] > 0 && p.dims[1] > 0 &&
         (p.type == dtype::f32 || p.type == dtype::bf16 || p.type == dtype::f16);
}

inline bool stays_resident(const param_spec& p, const policy_values& policy) {
  return p.bytes() < policy.resident_below_bytes || (policy.chunked() && (p.dims.rank() < 2 || !p.by_rows));
}
}  // namespace detail

// The name of the resident f32 parameter holding a quantized weight's scales, and its spec.
inline std::string fp8_scale_name(std::string_view weight) { return std::string(weight) + ".scale"; }
inline param_spec fp8_scale_spec(const param_spec& weight, quant::fp8_scaling scaling) {
  const auto n = static_cast<std::int64_t>(quant::scale_count(scaling, static_cast<std::size_t>(weight.dims[0])));
  return {fp8_scale_name(weight.name), shape{n}, dtype::f32, false};
}

// A declared parameter as the policy stores it: under fp8, a quantized weight's type is f8e4m3.
inline param_spec stored_spec(const param_spec& p, const policy_values& policy) {
  param_spec q = p;
  if (detail::quantized_under(p, policy)) q.type = dtype::f8e4m3;
  return q;
}

// Cuts a model into units under a policy's granularity and places each parameter.
template <model M>
std::vector<unit_layout> build_units(const M& m, std::size_t world_size, const policy_values& policy) {
  require_world_size(world_size, "build_units");
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
      if constexpr (requires { layer.fsdp_root(); }) u.info.root = layer.fsdp_root();
      else u.info.root = l == 0 || l + 1 == layers;
      u.info.first_subunit = s0;
      u.info.subunit_count = s1 - s0;
      std::vector<param_spec> scales;  // fp8: one per quantized weight, appended to the resident ones
      std::vector<std::pair<bool, std::size_t>> scaled;  // (resident, index) of the weight each scale is for
      for (std::size_t s = s0; s < s1; ++s) {
        std::vector<param_slot> slots;
        for (const param_spec& declared : layer.parameters(s)) {
          declared.dims.validate("parameter '" + declared.name + "' of layer '" + layer.name() + "'",
                                 size_of(declared.type));
          const param_spec p = stored_spec(declared, policy);
          const bool resident = detail::stays_resident(p, policy);
          auto& list = resident ? u.resident_params : u.sharded_params;
          slots.push_back({resident, list.size()});
          if (p.type == dtype::f8e4m3 && declared.type != dtype::f8e4m3) {
            scales.push_back(fp8_scale_spec(p, policy.fp8_scaling));
            scaled.emplace_back(resident, list.size());
          }
          list.push_back(p);
          if (!resident) u.sharded_subunit.push_back(s - s0);
        }
        u.slots.push_back(std::move(slots));
      }
      if (!scales.empty()) {
        u.sharded_scale.assign(u.sharded_params.size(), unit_layout::no_scale);
        u.resident_scale.assign(u.resident_params.size(), unit_layout::no_scale);
        for (std::size_t i = 0; i < scales.size(); ++i) {
          (scaled[i].first ? u.resident_scale : u.sharded_scale)[scaled[i].second] = u.resident_params.size();
          u.resident_params.push_back(std::move(scales[i]));
        }
      }
      u.sharded = flat_layout(u.sharded_params, world_size);
      u.resident = flat_layout(u.resident_params, 1);
      if (policy.chunked()) detail::cut_into_chunks(u, policy.chunk_bytes);
      units.push_back(std::move(u));
    }
  }
  for (std::size_t i = 0; i < units.size(); ++i) {
    units[i].info.index = i;
    units[i].info.unit_count = units.size();
    units[i].info.gathered_bytes = units[i].gathered_bytes();
    units[i].kept = policy.keeps(units[i].info);
    if (units[i].kept && policy.chunked())
      throw_error("policy ", policy.name, ": chunked unshard streams every unit; unit '", units[i].name,
                  "' is marked to stay gathered");
  }
  detail::check_unique_names(units);
  return units;
}

// The rotating gathered buffers: how many, and how large (the largest unit that is not kept, or
// under chunked unshard the largest chunk).
struct ring_shape {
  std::size_t buffers = 0;
  std::size_t buffer_bytes = 0;
};

// Under chunked unshard: the largest chunk any unit streams (at least one whole row of its widest
// weight, whatever the requested size). The plan reports it as the effective chunk.
inline std::size_t effective_chunk_bytes(const std::vector<unit_layout>& units) {
  std::size_t b = 0;
  for (const auto& u : units)
    for (const auto& c : u.chunks) b = std::max(b, c.bytes());
  return b;
}

inline ring_shape ring_for(const std::vector<unit_layout>& units, const policy_values& policy) {
  ring_shape r;
  if (policy.chunked()) {
    std::size_t chunks = 0;
    for (const auto& u : units) chunks += u.chunks.size();
    r.buffers = std::min(chunks, policy.ring_buffers());
    r.buffer_bytes = effective_chunk_bytes(units);
    return r;
  }
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
