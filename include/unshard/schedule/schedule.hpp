#pragma once
// What each rank computes on, given that every rank runs the same units in lockstep.
//
//   replicated   every rank runs the same forward on the same inputs; one lane per rank that
//                holds every step's state (FSDP inference with batch 1)
//   steps        the S denoising steps are spread over the W ranks: rank r owns steps r, r+W, ...
//                and runs one lane per owned step. At tick t a rank runs step s on block t - s for
//                every step s it owns, so one gathered unit serves up to ceil(S/W) forwards
//
//        tick:    0     1     2     3     4     5        (S = 4, W = 2, 3 blocks)
//   rank 0 s0:   b0    b1    b2    .     .     .
//   rank 1 s1:    .    b0    b1    b2    .     .
//   rank 0 s2:    .     .    b0    b1    b2    .
//   rank 1 s3:    .     .     .    b0    b1    b2
//
// Between ticks the latent of block b moves from the rank of step s to the rank of step s + 1.
// Step s of block b reads only step s's cache (written by earlier blocks), the read-only cond
// cache and the latent step s - 1 returned, so the ticks compute exactly the sequential loop.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "unshard/core/world_size.hpp"
#include "unshard/core/error.hpp"

namespace unshard {

enum class schedule_kind : std::uint8_t { replicated, steps };

inline const char* name_of(schedule_kind k) noexcept { return k == schedule_kind::steps ? "steps" : "replicated"; }

inline schedule_kind parse_schedule(std::string_view s) {
  if (s == "steps") return schedule_kind::steps;
  if (s == "replicated") return schedule_kind::replicated;
  throw_error("unknown schedule '", s, "' (expected steps or replicated)");
}

// A lane can own at most this many steps' forwards in one tick (a bit mask selects the active ones).
inline constexpr std::size_t max_lanes_per_rank = 64;

struct schedule {
  schedule_kind kind = schedule_kind::replicated;
  std::size_t steps = 1;  // S: denoising steps (per-step state: buffer_scope::per_step)

  // Refuses what cannot run: no step, no rank, more lanes on one rank than a tick can select.
  void validate(std::size_t world_size) const {
    if (steps == 0) throw_error("schedule ", name_of(kind), ": the number of denoising steps must be at least 1 (got 0)");
    require_world_size(world_size, std::string("schedule ") + std::string(name_of(kind)));
    if (kind == schedule_kind::steps && (steps + world_size - 1) / world_size > max_lanes_per_rank)
      throw_error("schedule steps: ", steps, " steps over ", world_size, " ranks puts more than ", max_lanes_per_rank,
                  " steps on one rank");
  }

  // The rank that runs step s, and the lane of that rank that does.
  std::size_t owner(std::size_t step, std::size_t world_size) const noexcept {
    return kind == schedule_kind::steps ? step % world_size : 0;
  }
  std::size_t lane_of(std::size_t step, std::size_t world_size) const noexcept {
    return kind == schedule_kind::steps ? step / world_size : 0;
  }

  // lanes[l] = the steps lane l of `rank` holds state for.
  std::vector<std::vector<std::size_t>> lanes(std::size_t rank, std::size_t world_size) const {
    std::vector<std::vector<std::size_t>> out;
    if (kind == schedule_kind::replicated) {
      out.emplace_back();
      for (std::size_t s = 0; s < steps; ++s) out.back().push_back(s);
      return out;
    }
    for (std::size_t s = rank; s < steps; s += world_size) out.push_back({s});
    return out;
  }
  std::size_t lane_count(std::size_t rank, std::size_t world_size) const noexcept {
    if (kind == schedule_kind::replicated) return 1;
    return rank < steps ? (steps - rank + world_size - 1) / world_size : 0;
  }

  // Ticks to denoise `blocks` blocks: fill and drain included under `steps`; one forward per tick
  // under `replicated`.
  std::size_t ticks(std::size_t blocks) const noexcept {
    if (blocks == 0) return 0;
    return kind == schedule_kind::steps ? blocks + steps - 1 : blocks * steps;
  }

  std::string describe(std::size_t world_size) const {
    return detail::concat(name_of(kind), " (", steps, " steps over ", world_size, " ranks)");
  }
};

}  // namespace unshard
