#pragma once
// --policy auto over the Live Avatar stack: every candidate policy under each schedule searched, the
// plans that fit ranked by the steady-state time of a denoised block; and, for a plan that does not
// fit, why not, in terms of the ledger.
#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "unshard/plan/liveavatar/ledger.hpp"

namespace unshard::liveavatar {

struct auto_result {
  std::vector<stack_plan> fits;       // fastest block first; equal times: smaller peak first
  std::optional<stack_plan> closest;  // the smallest peak of all candidates, fitting or not
};

// Both schedules unless one is asked for.
inline std::vector<schedule_kind> schedules_to_search(std::optional<schedule_kind> only) {
  if (only) return {*only};
  return {schedule_kind::steps, schedule_kind::replicated};
}

// Whether a plan fits a device budget and, when one is given (host_budget > 0), a pinned host memory
// budget per rank (offloaded shards, and the caches under kv:offload).
inline bool fits(const stack_plan& p, std::size_t budget, std::size_t host_budget = 0) {
  return p.peak() <= budget && (host_budget == 0 || p.host_peak() <= host_budget);
}

// The KV placements searched: the caches on the device, or, with a host budget to hold them, also in
// host memory with one or two blocks' pages prefetched (not with chunked, which kv:offload does not
// support yet).
inline std::vector<std::string> kv_candidates(const std::string& policy, std::size_t host_budget) {
  std::vector<std::string> out{policy};
  if (host_budget && !policy.starts_with("chunked:"))
    for (const char* kv : {"+kv:offload", "+kv:offload:2"}) out.push_back(policy + kv);
  return out;
}

// Plans every candidate policy under each schedule (rq's step count); keeps those within budget. A
// schedule that cannot run this world size and step count is refused if it is the only one asked
// for, and skipped otherwise. `with_fp8`: the candidates with fp8 weights too (auto_candidates).
// `host_budget` > 0: pinned host memory per rank is capped there, and the KV caches may be placed in
// it (kv_candidates).
inline auto_result plan_auto(const stack& st, const plan_request& rq, std::size_t budget,
                             const std::vector<schedule_kind>& schedules, bool with_fp8 = false,
                             std::size_t host_budget = 0) {
  auto_result out;
  for (const schedule_kind kind : schedules) {
    plan_request r = rq;
    r.sched.kind = kind;
    if (schedules.size() > 1) {
      try {
        r.sched.validate(r.world_size);
      } catch (const error&) {
        continue;
      }
    }
    for (const auto& weights : auto_candidates(with_fp8))
      for (const auto& candidate : kv_candidates(weights, host_budget)) {
        stack_plan p = plan_stack(st, parse_policy(candidate), r);
        if (!out.closest || p.peak() < out.closest->peak()) out.closest = p;
        if (fits(p, budget, host_budget)) out.fits.push_back(std::move(p));
      }
  }
  std::stable_sort(out.fits.begin(), out.fits.end(), [](const stack_plan& a, const stack_plan& b) {
    return a.block_s < b.block_s || (a.block_s == b.block_s && a.peak() < b.peak());
  });
  return out;
}

namespace detail {
inline std::string gib_text(std::size_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0));
  return buf;
}
}  // namespace detail

// Why a plan does not fit: the excess, a term that alone is over the budget (then no policy can
// help with it), and the busiest rank's terms, largest first.
inline std::string why_not(const stack_plan& p, std::size_t budget, std::size_t host_budget = 0) {
  using detail::gib_text;
  if (fits(p, budget, host_budget)) return "";
  if (p.peak() <= budget)
    return "pinned host memory " + gib_text(p.host_peak()) + " GiB exceeds the " + gib_text(host_budget) +
           " GiB of --host-memory by " + gib_text(p.host_peak() - host_budget) + " GiB";
  std::string s = "peak " + gib_text(p.peak()) + " GiB exceeds the " + gib_text(budget) + " GiB usable by " +
                  gib_text(p.peak() - budget) + " GiB";
  const auto kv = p.terms.find("kv_cache");
  if (kv != p.terms.end() && kv->second > budget) {
    const std::size_t caches = p.sched.kind == schedule_kind::replicated ? p.sched.steps : p.forwards_per_tick;
    s += "; the KV cache alone is " + gib_text(kv->second) + " GiB (" + std::to_string(caches) + " noisy cache" +
         (caches == 1 ? "" : "s") + " of " + gib_text(p.noisy_cache_bytes) + " GiB and the cond cache)";
  }
  std::vector<std::pair<std::size_t, std::string>> largest;
  for (const auto& [name, bytes] : p.details)
    if (bytes > 0) largest.emplace_back(bytes, name);
  std::sort(largest.rbegin(), largest.rend());
  s += "; rank 0 holds";
  for (std::size_t i = 0; i < largest.size() && i < 5; ++i)
    s += (i ? ", " : " ") + largest[i].second + " " + gib_text(largest[i].first);
  return s + " GiB";
}

}  // namespace unshard::liveavatar
