#pragma once
#include <cstddef>

#include "unshard/policy/granularity.hpp"
#include "unshard/policy/unit_info.hpp"

namespace unshard {

// Gather only the unit about to run and release its buffer right after. Parameters smaller than
// ResidentBelow bytes (norm weights, biases, modulation tables) are kept whole on every rank:
// gathering them costs a collective's latency for almost no memory. It decides no residency of
// whole units, so a user's residency policy (keep the first M layers) composes with it.
template <class Granularity = per_block, std::size_t ResidentBelow = 64 * 1024>
struct selective_unshard {
  static_assert(is_granularity<Granularity>,
                "selective_unshard<G>: G must be a granularity tag (per_block or per_subunit)");
  using granularity = Granularity;
  static constexpr std::size_t resident_below_bytes = ResidentBelow;
  static constexpr const char* policy_name = "selective";
};

}  // namespace unshard
