#pragma once
// Time model of one forward: a list of steps (a unit, or a chunk of one), each with the FLOPs it
// computes and the bytes that must arrive before it can. The model replays the runtime's schedule
// (rank_runtime::forward): one communication stream runs gathers in order, each paying the link's
// per-collective latency plus bytes / bus bandwidth (and host-to-device copies under offload); a
// gather is issued when compute reaches the step K gathers before it (prefetch:K), so at most K+1
// gathered buffers are live; compute runs a step once its gather has landed. The result is a
// timeline (what the planner writes as a Chrome trace) and its end, the forward time.
#include <algorithm>
#include <cstddef>
#include <map>
#include <ostream>
#include <string>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/plan/profiles.hpp"

namespace unshard {

// The rates one forward runs at: a device profile with the link it is wired with.
struct time_rates {
  double flops = 0;          // sustained FLOP/s of compute
  double link_bytes_s = 0;   // all-gather bus bandwidth
  double link_latency_s = 0; // per collective call
  double h2d_bytes_s = 0;    // offload copies (0: none happen)
  double h2d_latency_s = 0;

  static time_rates of(const device_profile& d, const link_profile& l) {
    return {d.sustained_flops, l.bus_bytes_s, l.latency_s, d.h2d_bytes_s, 0};
  }
};

// One step of a forward.
struct step_cost {
  std::string name;             // unit (or "unit#chunk") label for the timeline
  double flops = 0;
  double gather_bytes = 0;      // bytes this rank receives; 0 when nothing is gathered for the step
  double h2d_bytes = 0;         // own shard copied from host first (offload)
  std::size_t buffer_bytes = 0; // gathered bytes held from the gather's start to the step's end
  bool kept = false;            // the buffer stays live to the end of the forward (fsdp's root, full)
  bool gathers() const noexcept { return gather_bytes > 0 || h2d_bytes > 0 || buffer_bytes > 0; }
};

enum class timeline_lane { compute, comm };

struct timeline_span {
  std::string name;
  timeline_lane lane;
  double begin = 0, end = 0;  // seconds from the start of the forward
  double bytes = 0;
};

// One rank's predicted forward.
struct timeline {
  std::vector<timeline_span> spans;
  std::vector<std::pair<double, std::size_t>> gathered_live;  // (time, live gathered bytes) after each change
  std::vector<std::pair<double, std::string>> frees;          // when a gathered buffer is released
  double total_s = 0;
  std::size_t peak_gathered = 0;
};

// A gathering step is one collective call: it pays the latency even when it receives nothing
// (world size 1 still calls the all-gather).
inline double transfer_seconds(const step_cost& s, const time_rates& r) {
  double t = 0;
  if (s.h2d_bytes > 0) t += r.h2d_latency_s + s.h2d_bytes / r.h2d_bytes_s;
  if (s.gather_bytes > 0 || s.buffer_bytes > 0) t += r.link_latency_s + s.gather_bytes / r.link_bytes_s;
  return t;
}

// Replays the schedule. prefetch = K: gather j is issued when compute reaches the step that owns
// gather j-K (at the start for j <= K); K = 0 gathers each step after the previous one computed.
inline timeline simulate_forward(const std::vector<step_cost>& steps, const time_rates& r, std::size_t prefetch) {
  if (r.flops <= 0) throw_error("time model: the device's FLOP rate must be positive");
  timeline tl;
  std::vector<std::size_t> gather_steps;  // step index of each gather, in order
  for (std::size_t i = 0; i < steps.size(); ++i)
    if (steps[i].gathers()) gather_steps.push_back(i);
  std::vector<double> compute_start(steps.size(), 0), compute_end(steps.size(), 0), gather_end(steps.size(), 0);
  std::vector<double> gather_begin(steps.size(), 0);
  // Compute runs in order; gathers are issued lazily as compute advances, so process both in one
  // sweep: before computing step i, issue every gather whose turn has come.
  double comm_free = 0, compute_free = 0;
  std::size_t issued = 0, done_gathers = 0;  // gathers issued; gathers owned by steps before i
  for (std::size_t i = 0; i < steps.size(); ++i) {
    while (done_gathers < gather_steps.size() && gather_steps[done_gathers] < i) ++done_gathers;
    while (issued < gather_steps.size() && issued <= done_gathers + prefetch) {
      const std::size_t g = gather_steps[issued++];
      const double start = std::max(comm_free, compute_free);  // issued by the compute loop, now
      gather_begin[g] = start;
      gather_end[g] = start + transfer_seconds(steps[g], r);
      comm_free = gather_end[g];
      tl.spans.push_back({"gather " + steps[g].name, timeline_lane::comm, start, gather_end[g],
                          steps[g].gather_bytes + steps[g].h2d_bytes});
    }
    const double ready = steps[i].gathers() ? gather_end[i] : 0;
    compute_start[i] = std::max(compute_free, ready);
    compute_end[i] = compute_start[i] + steps[i].flops / r.flops;
    compute_free = compute_end[i];
    tl.spans.push_back({"compute " + steps[i].name, timeline_lane::compute, compute_start[i], compute_end[i], steps[i].flops});
  }
  tl.total_s = compute_free;
  // Live gathered bytes: a buffer is taken when its gather starts and released when its step's
  // compute ends (kept buffers: at the end of the forward).
  std::vector<std::pair<double, long long>> deltas;
  for (std::size_t g : gather_steps) {
    const auto b = static_cast<long long>(steps[g].buffer_bytes);
    deltas.emplace_back(gather_begin[g], b);
    const double release = steps[g].kept ? tl.total_s : compute_end[g];
    deltas.emplace_back(release, -b);
    if (!steps[g].kept) tl.frees.emplace_back(release, steps[g].name);
  }
  // Releases first at equal times: a slot freed by compute i is what gather i+K+1 reuses.
  std::stable_sort(deltas.begin(), deltas.end(), [](const auto& a, const auto& b) {
    return a.first < b.first || (a.first == b.first && a.second < b.second);
  });
  long long live = 0;
  tl.gathered_live.emplace_back(0.0, 0);
  for (const auto& [t, d] : deltas) {
    live += d;
    tl.gathered_live.emplace_back(t, static_cast<std::size_t>(live));
    tl.peak_gathered = std::max(tl.peak_gathered, static_cast<std::size_t>(live));
  }
  return tl;
}

inline double forward_seconds(const std::vector<step_cost>& steps, const time_rates& r, std::size_t prefetch) {
  return simulate_forward(steps, r, prefetch).total_s;
}

// The timeline as Chrome trace JSON (Perfetto, chrome://tracing), laid out as the runtime's own
// trace (core/trace.hpp): one process per rank, compute on thread 0, communication on thread 1;
// plus a "memory" counter per rank (that rank's constant terms and the live gathered bytes, stacked)
// and an instant event at every free. Ranks run in lockstep (every gather is a collective), so they
// repeat the timeline; their constant terms may differ (under the steps schedule, the KV caches).
inline void write_chrome_trace(std::ostream& os, const timeline& tl,
                               const std::vector<std::map<std::string, std::size_t>>& constant_terms_per_rank,
                               const std::string& title) {
  const std::size_t world_size = constant_terms_per_rank.size();
  os << "{\"displayTimeUnit\":\"ms\",\"otherData\":{\"source\":\"unshard-plan (predicted)\",\"title\":\""
     << title << "\"},\"traceEvents\":[";
  bool first = true;
  const auto sep = [&] {
    os << (first ? "\n" : ",\n");
    first = false;
  };
  const auto us = [](double s) { return s * 1e6; };
  for (std::size_t r = 0; r < world_size; ++r) {
    sep();
    os << "{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":" << r << ",\"args\":{\"name\":\"rank " << r << "\"}}";
    for (int tid = 0; tid < 2; ++tid) {
      sep();
      os << "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":" << r << ",\"tid\":" << tid << ",\"args\":{\"name\":\""
         << (tid == 0 ? "compute" : "communication") << "\"}}";
    }
    for (const auto& s : tl.spans) {
      sep();
      os << "{\"name\":\"" << s.name << "\",\"ph\":\"X\",\"pid\":" << r << ",\"tid\":"
         << (s.lane == timeline_lane::compute ? 0 : 1) << ",\"ts\":" << us(s.begin) << ",\"dur\":" << us(s.end - s.begin)
         << ",\"args\":{\"" << (s.lane == timeline_lane::compute ? "flops" : "bytes") << "\":" << s.bytes << "}}";
    }
    for (const auto& [t, name] : tl.frees) {
      sep();
      os << "{\"name\":\"free " << name << "\",\"ph\":\"i\",\"s\":\"t\",\"pid\":" << r << ",\"tid\":0,\"ts\":" << us(t) << "}";
    }
    for (const auto& [t, live] : tl.gathered_live) {
      sep();
      os << "{\"name\":\"memory\",\"ph\":\"C\",\"pid\":" << r << ",\"ts\":" << us(t) << ",\"args\":{";
      for (const auto& [k, v] : constant_terms_per_rank[r]) os << '"' << k << "\":" << v << ',';
      os << "\"gathered\":" << live << "}}";
    }
  }
  os << "\n]}\n";
}

// Every rank with the same constant terms.
inline void write_chrome_trace(std::ostream& os, const timeline& tl, std::size_t world_size,
                               const std::map<std::string, std::size_t>& constant_terms, const std::string& title) {
  write_chrome_trace(os, tl, std::vector<std::map<std::string, std::size_t>>(world_size, constant_terms), title);
}

}  // namespace unshard
