#pragma once
#include <cstddef>
#include <string_view>

#include "unshard/core/error.hpp"

namespace unshard {

// The most ranks a job may have. Every entry point (the tools, the Python module, the layouts and
// the worlds) checks it first: a larger count is a typo or an overflow, and planning for it would
// allocate per-rank tables before any world could refuse it.
inline constexpr std::size_t max_world_size = 1024;

// Throws, naming `what` (the option or argument that gave it), unless 1 <= world_size <= max_world_size.
inline void require_world_size(std::size_t world_size, std::string_view what) {
  if (world_size == 0) throw_error(what, ": world size must be at least 1 (got 0)");
  if (world_size > max_world_size)
    throw_error(what, ": world size ", world_size, " is beyond the supported ", max_world_size);
}

}  // namespace unshard
