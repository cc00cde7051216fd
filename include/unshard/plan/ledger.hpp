#pragma once
#include <algorithm>
#include <cstddef>
#include <sstream>
#include <string>
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
    for_each_rank_buffer(buffers, sched, i, world_size,
                         [&](const buffer_spec& b, std::size_t) { r.terms[b.category] += align_up(b.bytes == 0 ? 1 : b.bytes); });
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
