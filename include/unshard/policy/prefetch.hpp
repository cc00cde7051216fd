#pragma once
#include <cstddef>

namespace unshard {

// Gather the next K units on the communication stream while the current one computes.
// K+1 gathered buffers live at once, allocated before the forward and reused as a ring.
template <std::size_t K>
struct prefetch {
  static_assert(K >= 1, "prefetch<K>: K is the number of units in flight ahead of compute and must be >= 1");
  static constexpr std::size_t prefetch_depth = K;
  static constexpr const char* policy_name = "prefetch";
};

}  // namespace unshard
