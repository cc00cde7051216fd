#pragma once
#include <cstddef>
#include <string>

#include "unshard/policy/unit_info.hpp"

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

  std::size_t ring_buffers() const noexcept { return prefetch_depth + 1; }
  bool chunked() const noexcept { return granularity == unshard_granularity::chunk; }
  bool keeps(const unit_info& u) const { return full || (keeps_gathered && keeps_gathered(u)); }
};

}  // namespace unshard
