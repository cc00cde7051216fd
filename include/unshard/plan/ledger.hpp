#pragma once
#include <cstddef>
#include <sstream>
#include <string>
#include <vector>

#include "unshard/core/tracking_allocator.hpp"
#include "unshard/plan/unit_layout.hpp"

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
    os << "policy " << policy << ", world size " << world_size << ", peak " << peak_bytes() << " bytes";
    if (budget_bytes) os << " against a budget of " << budget_bytes << " bytes";
    if (effective_chunk_bytes) os << ", effective chunk " << effective_chunk_bytes << " bytes";
    if (!ranks.empty()) os << " (rank 0: " << ranks.front().terms.to_string() << ")";
    return os.str();
  }
};

// The ledger: each rank's peak before anything is allocated. The runtime allocates everything a
// forward needs up front, from the same unit layouts, so the measured peak equals this plan
// (tests assert measured <= planned and that the plan is tight).
template <model M>
memory_plan plan_memory(const M& m, std::size_t world_size, const policy_values& policy, std::size_t budget_bytes = 0) {
  const auto units = build_units(m, world_size, policy);
  const ring_shape ring = ring_for(units, policy);
  memory_plan plan;
  plan.world_size = world_size;
  plan.budget_bytes = budget_bytes;
  plan.policy = policy.name;
  rank_plan r;
  for (const auto& u : units) {
    const std::size_t shard = u.sharded.shard_bytes() ? align_up(u.sharded.shard_bytes()) : 0;
    (policy.offload ? r.host_bytes : r.terms[memory_category::shards]) += shard;
    if (u.resident.used_bytes()) r.terms[memory_category::resident] += align_up(u.resident.used_bytes());
    if (u.kept && u.gathered_bytes()) r.terms[memory_category::gathered] += u.gathered_bytes();
  }
  r.terms[memory_category::gathered] += ring.buffers * (ring.buffer_bytes ? align_up(ring.buffer_bytes) : 0);
  if (policy.chunked()) plan.effective_chunk_bytes = ring.buffer_bytes;
  for (const buffer_spec& b : m.buffers()) r.terms[b.category] += align_up(b.bytes == 0 ? 1 : b.bytes);
  for (std::size_t i = 0; i < world_size; ++i) {
    r.rank = i;
    plan.ranks.push_back(r);
  }
  return plan;
}

}  // namespace unshard
