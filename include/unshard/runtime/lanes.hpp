#pragma once
// A rank's lanes: one model state per forward it may run in a tick (one under the replicated
// schedule, one per owned denoising step under `steps`, none on a rank that owns no step), the
// lanes a tick selects, and the lockstep of one tick on one rank (run_tick_on).
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/core/tracking_allocator.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/plan/ledger.hpp"
#include "unshard/runtime/paged_buffers.hpp"
#include "unshard/schedule/schedule.hpp"

namespace unshard {

// A point-to-point move between two ranks, run collectively between ticks (a latent from the rank
// of step s to the rank of step s + 1): every rank lists the same messages in the same order, with
// `src` set where it is `from` and `dst` where it is `to`.
struct transfer_message {
  std::size_t from = 0, to = 0, bytes = 0;
  const std::byte* src = nullptr;
  std::byte* dst = nullptr;
};

template <model M>
class rank_lanes {
 public:
  using state_type = typename M::state;

  // The model's buffers for each lane the schedule gives this rank, from the rank's device memory
  // (the ledger counts the same, plan/ledger.hpp for_each_rank_buffer): a lane's own, the rank's
  // shared ones, its steps' caches. `placement` (kv:offload) holds the paged ones elsewhere: the
  // state gets their host copy and the page table the runtime keeps (runtime/paged_buffers.hpp).
  rank_lanes(const M& m, const schedule& sched, std::size_t rank, std::size_t world_size, tracking_allocator& device,
             const buffer_placement* placement = nullptr)
      : rank_(rank), steps_(sched.lanes(rank, world_size)) {
    std::vector<buffer_set> sets(steps_.size());
    std::size_t index = 0;
    for_each_rank_buffer(m.buffers(), sched, rank, world_size, [&](const buffer_spec& b, std::size_t lane) {
      const std::size_t i = index++;
      std::span<std::byte> bytes;
      const page_table* pages = nullptr;
      if (placement && placement->placed(i)) {
        bytes = placement->bytes[i];
        pages = placement->tables[i];
      } else {
        buffers_.push_back(device.allocate(b.bytes, b.category));
        bytes = buffers_.back().span();
      }
      if (b.scope == buffer_scope::per_rank)
        for (buffer_set& set : sets) set.add(b.name, bytes, pages);
      else sets[lane].add(b.name, bytes, pages);
    });
    states_.reserve(sets.size());
    for (const buffer_set& set : sets) states_.push_back(m.make_state(set));
    active_.reserve(states_.size());
  }
  rank_lanes(const rank_lanes&) = delete;
  rank_lanes& operator=(const rank_lanes&) = delete;

  state_type& operator[](std::size_t l) {
    if (l >= states_.size())
      throw_error("rank ", rank_, " has ", states_.size(), " lane(s) (forwards per tick), no lane ", l,
                  states_.empty() ? ": it owns no denoising step and only serves gathers" : "");
    return states_[l];
  }
  std::span<state_type> all() noexcept { return states_; }
  std::size_t size() const noexcept { return states_.size(); }
  // The steps lane l holds state for.
  const std::vector<std::size_t>& steps(std::size_t l) const { return steps_.at(l); }

  // Selects the lanes of a tick: bit l of `active` for lane l.
  void select(std::uint64_t active) {
    active_.clear();
    for (std::size_t l = 0; l < states_.size(); ++l)
      if ((active >> l) & 1u) active_.push_back(l);
    if (states_.size() < 64 && (active >> states_.size()) != 0)
      throw_error("rank ", rank_, ": a tick selects lane(s) beyond its ", states_.size());
  }
  // This tick's lanes, in lane order.
  const std::vector<std::size_t>& active() const noexcept { return active_; }
  state_type& active_state(std::size_t turn) { return states_[active_[turn]]; }

 private:
  std::size_t rank_;
  std::vector<std::vector<std::size_t>> steps_;
  std::vector<allocation> buffers_;
  std::vector<state_type> states_;
  std::vector<std::size_t> active_;
};

// One tick on one rank: prepare(rank, lane, state&) sets a lane's inputs and returns whether it
// computes in this tick; the runtime runs the tick (every unit gathered once for all of them);
// finish(rank, lane, state&) runs after it on each lane that computed; then the rank takes part in
// the transfers messages(rank, lanes) lists (the same list on every rank).
template <class Runtime, class Prepare, class Finish, class Messages>
void run_tick_on(std::size_t rank, Runtime& rt, Prepare& prepare, Finish& finish, Messages& messages) {
  std::uint64_t active = 0;
  for (std::size_t l = 0; l < rt.lane_count(); ++l)
    if (prepare(rank, l, rt.lane(l))) active |= std::uint64_t{1} << l;
  rt.run_tick(active);
  for (std::size_t l = 0; l < rt.lane_count(); ++l)
    if ((active >> l) & 1u) finish(rank, l, rt.lane(l));
  const auto& list = messages(rank, rt.lanes());
  rt.exchange(std::span<const transfer_message>(list.data(), list.size()));
}

}  // namespace unshard
