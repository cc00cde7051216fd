#pragma once
#include "unshard/policy/placement.hpp"

namespace unshard {

// Keep the shards in host memory (pinned on CUDA) and stream each into the device just before
// its gather: device memory then holds no shard bytes at all.
template <class Where = pinned_host>
struct offload {
  static_assert(is_placement<Where> && Where::offloaded,
                "offload<Where>: Where must be a host placement tag such as pinned_host");
  using placement = Where;
  static constexpr const char* policy_name = "offload";
};

}  // namespace unshard
