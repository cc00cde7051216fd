#pragma once
#include <cstddef>
#include <string>

#include "unshard/policy/unit_info.hpp"
#include "unshard/quant/fp8_scaling.hpp"

namespace unshard {

enum class unshard_granularity { block, subunit, chunk };

// A policy reduced to plain values: what the scheduler and the ledger read.
//
// Policies are composed and checked as types (compose<...>), then lowered to this struct once
// (values_of<P>()), as CUB's policy selectors return plain structs: the scheduler is then
// instantiated once per model and backend rather than once per policy combination, and the
// command-line tools can run any policy a user types without a table of instantiations.
struct policy_values {
  bool full = false;                       // every unit gathered once and kept
  unshard_granularity granularity = unshard_granularity::block;
  std::size_t prefetch_depth = 0;          // units (chunks, under `chunk`) in flight ahead of compute
  std::size_t chunk_bytes = 0;             // under `chunk`: the requested chunk size
  bool offload = false;                    // shards in host memory
  std::size_t resident_below_bytes = 64 * 1024;
  bool (*keeps_gathered)(const unit_info&) = nullptr;  // nullptr: no unit is kept
  std::string name = "selective:block";
  // How weights are stored (orthogonal to how they are gathered): as the model declares them, or,
  // with `fp8`, every 2-D GEMM weight as f8e4m3 codes plus f32 scales (per output channel, or one per
  // tensor with `fp8:tensor`), converted while each rank loads its shard (docs/design.md, fp8 weights).
  bool fp8 = false;
  quant::fp8_scaling fp8_scaling = quant::fp8_scaling::per_channel;
  // Where the KV caches live: on the device (`kv:device`, the default) or whole in pinned host memory,
  // each layer's page streamed through K+1 device slots, K layers ahead (`kv:offload[:K]`;
  // runtime/paged_buffers.hpp).
  bool kv_offload = false;
  std::size_t kv_prefetch = 1;

  std::size_t ring_buffers() const noexcept { return prefetch_depth + 1; }
  bool chunked() const noexcept { return granularity == unshard_granularity::chunk; }
  bool keeps(const unit_info& u) const { return full || (keeps_gathered && keeps_gathered(u)); }

  // The policy-string terms of the weight format and the KV placement, as `name` ends with them:
  // "+fp8", "+fp8:tensor", "+kv:offload", "+kv:offload:K"; empty for the defaults.
  std::string storage_terms() const {
    std::string s;
    if (fp8) s += fp8_scaling == quant::fp8_scaling::per_tensor ? "+fp8:tensor" : "+fp8";
    if (kv_offload) s += kv_prefetch == 1 ? "+kv:offload" : "+kv:offload:" + std::to_string(kv_prefetch);
    return s;
  }
};

}  // namespace unshard
