#pragma once
#include <algorithm>
#include <cstddef>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "unshard/core/tracking_allocator.hpp"
#include "unshard/plan/unit_layout.hpp"
#include "unshard/schedule/schedule.hpp"

namespace unshard {

// One rank's planned device peak, as named terms (the tracking allocator's categories), plus
// what it keeps in host memory when shards are offloaded.
struct rank_plan {
  std::size_t rank = 0;
  category_bytes terms{};
  std::size_t host_bytes = 0;

  std::size_t peak() const noexcept { return terms.total(); }
};

struct memory_plan {
  std::size_t world_size = 0;
  std::size_t budget_bytes = 0;  // 0: no budget given
  std::string policy;
  std::string schedule = "replicated";
  std::vector<rank_plan> ranks;
  std::size_t effective_chunk_bytes = 0;  // chunked unshard: the largest chunk (>= one whole row)

  std::size_t peak_bytes() const noexcept {
    std::size_t p = 0;
    for (const auto& r : ranks) p = std::max(p, r.peak());
    return p;
  }
  bool fits() const noexcept { return budget_bytes == 0 || peak_bytes() <= budget_bytes; }

  std::string describe() const {
    std::ostringstream os;
    os << "policy " << policy << ", schedule " << schedule << ", world size " << world_size << ", peak " << peak_bytes() << " bytes";
    if (budget_bytes) os << " against a budget of " << budget_bytes << " bytes";
    if (effective_chunk_bytes) os << ", effective chunk " << effective_chunk_bytes << " bytes";
    if (!ranks.empty()) os << " (rank 0: " << ranks.front().terms.to_string() << ")";
    return os.str();
  }
};

// The model buffers one rank holds under a schedule: each lane's own, the rank's shared ones once
// (if it has a lane at all), and each per-step buffer on the lane that runs that step.
template <class F>
void for_each_rank_buffer(const std::vector<buffer_spec>& buffers, const schedule& sched, std::size_t rank,
                          std::size_t world_size, F&& f) {
  const auto lanes = sched.lanes(rank, world_size);
  for (const buffer_spec& b : buffers) {
    switch (b.scope) {
      case buffer_scope::per_lane:
        for (std::size_t l = 0; l < lanes.size(); ++l) f(b, l);
        break;
      case buffer_scope::per_rank:
        if (!lanes.empty()) f(b, std::size_t{0});
        break;
      case buffer_scope::per_step:
        for (std::size_t l = 0; l < lanes.size(); ++l)
          for (std::size_t s : lanes[l])
            if (s == b.step) f(b, l);
        break;
    }
  }
}

// Under `kv:offload` the paged buffers a rank holds (buffer_spec::pages: the KV caches) live whole
// in host memory and their pages stream through rings of K+1 device slots, one slot per layer in
// flight. A forward touches one layer's page of each buffer at a time, and one step's per-step
// buffers only, so a rank needs: a ring per shared (per_rank) paged buffer, which its lanes read
// from the same slot; a ring per lane for each per_lane one; and per lane a ring for the j-th paged
// buffer of a step, which the lane's steps take turns in (a replicated lane holds every step's
// caches but runs one step per forward). `members` index the rank's buffers in for_each_rank_buffer
// order; a slot holds the largest page among them.
struct page_ring {
  buffer_scope scope = buffer_scope::per_rank;
  std::size_t lane = 0, position = 0;  // per_lane / per_step: the lane; per_step: j
  std::size_t page_bytes = 0;          // one slot
  memory_category category = memory_category::kv_cache;
  std::vector<std::size_t> members;
};

inline std::vector<page_ring> page_rings(const std::vector<buffer_spec>& buffers, const schedule& sched, std::size_t rank,
                                         std::size_t world_size) {
  std::vector<page_ring> rings;
  std::vector<std::pair<std::size_t, std::size_t>> seen;  // (lane, step) of each per-step paged buffer so far
  std::size_t index = 0;
  for_each_rank_buffer(buffers, sched, rank, world_size, [&](const buffer_spec& b, std::size_t lane) {
    const std::size_t i = index++;
    if (b.pages == 0) return;
    if (b.bytes % b.pages != 0)
      throw_error("buffer '", b.name, "': ", b.bytes, " bytes do not split into ", b.pages, " equal pages");
    std::size_t position = 0;
    if (b.scope == buffer_scope::per_step) {
      position = static_cast<std::size_t>(std::count(seen.begin(), seen.end(), std::pair{lane, b.step}));
      seen.emplace_back(lane, b.step);
    }
    const bool shared = b.scope == buffer_scope::per_rank;
    auto it = std::find_if(rings.begin(), rings.end(), [&](const page_ring& r) {
      return b.scope == buffer_scope::per_step && r.scope == b.scope && r.lane == lane && r.position == position &&
             r.category == b.category;
    });
    if (it == rings.end()) {
      rings.push_back({b.scope, shared ? 0 : lane, position, 0, b.category, {}});
      it = rings.end() - 1;
    }
    it->page_bytes = std::max(it->page_bytes, b.page_bytes());
    it->members.push_back(i);
  });
  return rings;
}

// Which KV placements the runtime cannot run with the rest of a policy (refused here, naming the
// terms; the planners call it too). Nothing today: kv:offload runs with every weight policy,
// chunked:SIZE included, where the tick's lanes take turns at chunk boundaries and the first lane to
// reach a paged layer brings its pages in for all, the last to leave it writes them back
// (runtime/paged_buffers.hpp). The ledger's kv term is the same with or without chunked: the page
// rings depend on the schedule's lanes, not on how the weights are gathered. Kept as the one place
// a future refusal goes.
inline void require_kv_placement_supported(const policy_values& /*policy*/) {}

// The steps a model keeps state for: one more than its highest per-step buffer (1 without any).
inline std::size_t steps_of(const std::vector<buffer_spec>& buffers) noexcept {
  std::size_t n = 1;
  for (const buffer_spec& b : buffers)
    if (b.scope == buffer_scope::per_step) n = std::max(n, b.step + 1);
  return n;
}

// The ledger: each rank's peak before anything is allocated. The runtime allocates everything a
// forward needs up front, from the same unit layouts, so the measured peak equals this plan
// (tests assert measured <= planned and that the plan is tight). Under the `steps` schedule ranks
// differ: a rank holds the activations of each lane it runs and the caches of its own steps.
template <model M>
memory_plan plan_memory(const M& m, std::size_t world_size, const policy_values& policy, std::size_t budget_bytes,
                        const schedule& sched) {
  const auto units = build_units(m, world_size, policy);
  const ring_shape ring = ring_for(units, policy);
  const std::vector<buffer_spec> buffers = m.buffers();
  sched.validate(world_size);
  require_kv_placement_supported(policy);
  if (steps_of(buffers) != sched.steps && steps_of(buffers) > 1)
    throw_error("schedule ", sched.describe(world_size), ": the model keeps state for ", steps_of(buffers),
                " denoising steps");
  memory_plan plan;
  plan.world_size = world_size;
  plan.budget_bytes = budget_bytes;
  plan.policy = policy.name;
  plan.schedule = name_of(sched.kind);
  rank_plan weights;
  for (const auto& u : units) {
    const std::size_t shard = u.sharded.shard_bytes() ? align_up(u.sharded.shard_bytes()) : 0;
    (policy.offload ? weights.host_bytes : weights.terms[memory_category::shards]) += shard;
    if (u.resident.used_bytes()) weights.terms[memory_category::resident] += align_up(u.resident.used_bytes());
    if (u.kept && u.gathered_bytes()) weights.terms[memory_category::gathered] += u.gathered_bytes();
  }
  weights.terms[memory_category::gathered] += ring.buffers * (ring.buffer_bytes ? align_up(ring.buffer_bytes) : 0);
  if (policy.chunked()) plan.effective_chunk_bytes = ring.buffer_bytes;
  for (std::size_t i = 0; i < world_size; ++i) {
    rank_plan r = weights;
    r.rank = i;
    for_each_rank_buffer(buffers, sched, i, world_size, [&](const buffer_spec& b, std::size_t) {
      // kv:offload: a paged buffer is held whole in host memory (its device slots are below).
      if (policy.kv_offload && b.pages) r.host_bytes += align_up(b.bytes);
      else r.terms[b.category] += align_up(b.bytes == 0 ? 1 : b.bytes);
    });
    if (policy.kv_offload)
      for (const page_ring& ring : page_rings(buffers, sched, i, world_size))
        r.terms[ring.category] += (policy.kv_prefetch + 1) * align_up(ring.page_bytes);
    plan.ranks.push_back(r);
  }
  return plan;
}

// One lane per rank holding every step's state: today's forward on every rank.
template <model M>
memory_plan plan_memory(const M& m, std::size_t world_size, const policy_values& policy, std::size_t budget_bytes = 0) {
  return plan_memory(m, world_size, policy, budget_bytes, schedule{schedule_kind::replicated, steps_of(m.buffers())});
}

}  // namespace unshard
