#pragma once
#include "unshard/policy/granularity.hpp"
#include "unshard/policy/unit_info.hpp"

namespace unshard {

// Gather every unit once and keep it gathered: FSDP with reshard_after_forward=False, the
// baseline. Its peak holds the whole model unsharded; it combines with no other policy.
struct full_unshard {
  using granularity = per_block;
  static constexpr bool keeps_gathered(const unit_info&) noexcept { return true; }
  static constexpr bool exclusive = true;
  static constexpr const char* policy_name = "full";
};

}  // namespace unshard
