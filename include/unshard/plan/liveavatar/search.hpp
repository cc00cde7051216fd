#pragma once
// --policy auto over the Live Avatar stack: every candidate policy under each schedule searched, the
// plans that fit ranked by the steady-state time of a denoised block; and, for a plan that does not
// fit, why not, in terms of the ledger.
#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <iterator>
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

// The KV placements searched: the caches on the device and, with `placement`, also in host memory
// with one or two blocks' pages prefetched, wherever the runtime runs kv:offload with the weight
// policy: plan/ledger.hpp's require_kv_placement_supported decides (it refused chunked:SIZE until
// the runtime streamed pages under chunked unshard), so the search follows what the runtime can run.
inline std::vector<std::string> kv_candidates(const std::string& policy, bool placement) {
  std::vector<std::string> out{policy};
  if (!placement) return out;
  for (const char* kv : {"+kv:offload", "+kv:offload:2"}) {
    const std::string candidate = policy + kv;
    try {
      require_kv_placement_supported(parse_policy(candidate).values);
    } catch (const error&) {
      continue;
    }
    out.push_back(candidate);
  }
  return out;
}

// What `--policy auto` searches besides every weight policy (auto_candidates) under each schedule.
struct auto_options {
  bool fp8 = true;               // each candidate also with fp8 weights
  bool kv_placement = true;      // each also with the KV caches in host memory (kv_candidates)
  std::size_t host_budget = 0;   // pinned host memory per rank; 0: not capped (a plan reports what it needs)
};

// Plans every candidate policy under each schedule (rq's step count); keeps those within budget (and
// within opt.host_budget, if any). A schedule that cannot run this world size and step count is
// refused if it is the only one asked for, and skipped otherwise.
inline auto_result plan_auto(const stack& st, const plan_request& rq, std::size_t budget,
                             const std::vector<schedule_kind>& schedules, const auto_options& opt) {
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
    for (const auto& weights : auto_candidates(opt.fp8))
      for (const auto& candidate : kv_candidates(weights, opt.kv_placement)) {
        stack_plan p = plan_stack(st, parse_policy(candidate), r);
        if (!out.closest || p.peak() < out.closest->peak()) out.closest = p;
        if (fits(p, budget, opt.host_budget)) out.fits.push_back(std::move(p));
      }
  }
  std::stable_sort(out.fits.begin(), out.fits.end(), [](const stack_plan& a, const stack_plan& b) {
    return a.block_s < b.block_s || (a.block_s == b.block_s && a.peak() < b.peak());
  });
  return out;
}

// The earlier form: fp8 only `with_fp8`, and the KV caches placed in host memory only when a host
// budget (> 0) caps it.
inline auto_result plan_auto(const stack& st, const plan_request& rq, std::size_t budget,
                             const std::vector<schedule_kind>& schedules, bool with_fp8 = false,
                             std::size_t host_budget = 0) {
  return plan_auto(st, rq, budget, schedules, auto_options{with_fp8, host_budget > 0, host_budget});
}

namespace detail {
inline std::string gib_text(std::size_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0));
  return buf;
}
}  // namespace detail

// The goal a plan's block time is held to: within 1.3x of the compute-bound time of the same work.
inline constexpr double compute_bound_goal = 1.3;

// Why a block takes longer than compute_bound_goal x its compute-bound time, naming what dominates;
// "" when it does not.
inline std::string time_note(const stack_plan& p) {
  if (p.compute_ratio() <= compute_bound_goal) return "";
  const stream_load& t = p.transfers;
  const std::pair<double, const char*> terms[] = {{t.all_gather_s, "all-gathers"}, {t.shard_copy_s, "offloaded shards in"},
                                                  {t.kv_in_s, "KV pages in"}, {t.kv_out_s, "KV rows back"}};
  const auto largest = *std::max_element(std::begin(terms), std::end(terms),
                                         [](const auto& x, const auto& y) { return x.first < y.first; });
  char buf[512];
  const char* what = p.prefetch == 0 && t.all_gather_s + t.shard_copy_s > 0
                         ? "compute and transfers take turns, without prefetch"
                         : t.transfers_s() >= p.compute_s ? "transfer-bound" : "compute waits for transfers that come in bursts";
  std::snprintf(buf, sizeof buf, "%s (the copy stream carries %.3f s a block against %.3f s of compute; the most, %.3f s, %s)",
                what, t.transfers_s(), p.compute_s, largest.first, largest.second);
  return buf;
}

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
