#pragma once
// Time model of one forward: a list of steps (a unit, or a chunk of one), each with the FLOPs it
// computes and the bytes that must arrive before it can. The model replays the runtime's schedule
// (rank_runtime::forward): one in-order communication stream runs gathers in order, each paying the
// link's per-collective latency plus bytes / bus bandwidth (and host-to-device copies under
// offload); a gather is issued when compute reaches the step K gathers before it (prefetch:K), so
// at most K+1 gathered buffers are live; compute runs a step once its gather has landed. Under
// kv:offload (runtime/paged_buffers.hpp) the same stream also carries the KV pages: a paged layer's
// pages are copied in K_kv paged layers ahead of it (kv:offload:K_kv, independent of the weights'
// K), and the rows the layer wrote go back once its compute is done. The result is a timeline
// (what the planner writes as a Chrome trace) and its end, the forward time.
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
  // kv:offload: a paged layer's pages copied host -> device before the layer's first step (> 0
  // marks that step), and the rows the layer wrote copied back after its last step's compute.
  double kv_in_bytes = 0;
  double kv_out_bytes = 0;
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

// One copy between host and device memory (KV pages in, rows back): the same pinned copy rate.
inline double copy_seconds(double bytes, const time_rates& r) {
  if (bytes <= 0) return 0;
  if (r.h2d_bytes_s <= 0) throw_error("time model: KV pages are copied, but the device's host-to-device rate is not positive");
  return r.h2d_latency_s + bytes / r.h2d_bytes_s;
}

// The busy time of the communication stream over a list of steps, by kind.
struct stream_load {
  double all_gather_s = 0;    // link latency + received bytes / bus bandwidth
  double shard_copy_s = 0;    // offload: each rank's own shard, host -> device
  double kv_in_s = 0;         // kv:offload: pages in
  double kv_out_s = 0;        // kv:offload: written rows back
  double transfers_s() const noexcept { return all_gather_s + shard_copy_s + kv_in_s + kv_out_s; }
  stream_load& operator*=(double f) noexcept {
    all_gather_s *= f;
    shard_copy_s *= f;
    kv_in_s *= f;
    kv_out_s *= f;
    return *this;
  }
};

inline stream_load stream_load_of(const std::vector<step_cost>& steps, const time_rates& r) {
  stream_load l;
  for (const step_cost& s : steps) {
    if (s.h2d_bytes > 0) l.shard_copy_s += r.h2d_latency_s + s.h2d_bytes / r.h2d_bytes_s;
    if (s.gather_bytes > 0 || s.buffer_bytes > 0) l.all_gather_s += r.link_latency_s + s.gather_bytes / r.link_bytes_s;
    l.kv_in_s += copy_seconds(s.kv_in_bytes, r);
    l.kv_out_s += copy_seconds(s.kv_out_bytes, r);
  }
  return l;
}

// Compute-bound time of a list of steps: their FLOPs at the sustained rate, nothing waited for.
inline double compute_seconds(const std::vector<step_cost>& steps, const time_rates& r) {
  if (r.flops <= 0) throw_error("time model: the device's FLOP rate must be positive");
  double f = 0;
  for (const step_cost& s : steps) f += s.flops;
  return f / r.flops;
}

// Replays the schedule, in the order the runtime's host loop enqueues work for each step i:
//  1. weight gathers: prefetch = K, gather j is issued when compute reaches the step that owns gather
//     j-K (at the start for j <= K); K = 0 gathers each step after the previous one computed;
//  2. if step i starts paged layer k (kv_in_bytes > 0), the pages of paged layers up to k + kv_prefetch
//     not yet copied (a page's K_kv+1 device slots are free by then: the layer K_kv+1 before it is done);
//  3. compute, once the step's gather and, for a paged layer's first step, its pages have landed;
//  4. if step i ends a paged layer (kv_out_bytes > 0), the write-back, after the step's compute.
// Everything on the communication stream runs in the order it was issued, one thing at a time, and
// starts no earlier than the compute loop reached the point that issued it. The forward ends when
// compute has and the stream is idle (the runtime waits for the last write-back at the end of a tick).
// Without paged layers this is exactly the gathers-and-compute schedule, whatever kv_prefetch.
inline timeline simulate_forward(const std::vector<step_cost>& steps, const time_rates& r, std::size_t prefetch,
                                 std::size_t kv_prefetch = 1) {
  if (r.flops <= 0) throw_error("time model: the device's FLOP rate must be positive");
  timeline tl;
  std::vector<std::size_t> gather_steps, kv_steps;  // step index of each gather, of each paged layer's start
  for (std::size_t i = 0; i < steps.size(); ++i) {
    if (steps[i].gathers()) gather_steps.push_back(i);
    if (steps[i].kv_in_bytes > 0) kv_steps.push_back(i);
  }
  std::vector<double> compute_start(steps.size(), 0), compute_end(steps.size(), 0), gather_end(steps.size(), 0);
  std::vector<double> gather_begin(steps.size(), 0), kv_ready(steps.size(), 0);
  // Compute runs in order; transfers are issued lazily as compute advances, so process both in one
  // sweep: before computing step i, issue every transfer whose turn has come.
  double comm_free = 0, compute_free = 0;
  std::size_t issued = 0, done_gathers = 0;  // gathers issued; gathers owned by steps before i
  std::size_t kv_issued = 0, kv_layer = 0;   // pages issued; paged layers started before step i
  const auto on_stream = [&](double earliest, double seconds, const std::string& name, double bytes) {
    const double start = std::max(comm_free, earliest);
    comm_free = start + seconds;
    tl.spans.push_back({name, timeline_lane::comm, start, comm_free, bytes});
    return comm_free;
  };
  for (std::size_t i = 0; i < steps.size(); ++i) {
    while (done_gathers < gather_steps.size() && gather_steps[done_gathers] < i) ++done_gathers;
    while (issued < gather_steps.size() && issued <= done_gathers + prefetch) {
      const std::size_t g = gather_steps[issued++];
      gather_begin[g] = std::max(comm_free, compute_free);  // issued by the compute loop, now
      gather_end[g] = on_stream(compute_free, transfer_seconds(steps[g], r), "gather " + steps[g].name,
                                steps[g].gather_bytes + steps[g].h2d_bytes);
    }
    const bool pages = steps[i].kv_in_bytes > 0;
    if (pages) {
      while (kv_issued < kv_steps.size() && kv_issued <= kv_layer + kv_prefetch) {
        const std::size_t k = kv_steps[kv_issued++];
        kv_ready[k] = on_stream(compute_free, copy_seconds(steps[k].kv_in_bytes, r), "kv in " + steps[k].name,
                                steps[k].kv_in_bytes);
      }
      ++kv_layer;
    }
    double ready = steps[i].gathers() ? gather_end[i] : 0;
    if (pages) ready = std::max(ready, kv_ready[i]);
    compute_start[i] = std::max(compute_free, ready);
    compute_end[i] = compute_start[i] + steps[i].flops / r.flops;
    compute_free = compute_end[i];
    tl.spans.push_back({"compute " + steps[i].name, timeline_lane::compute, compute_start[i], compute_end[i], steps[i].flops});
    if (steps[i].kv_out_bytes > 0)
      on_stream(compute_free, copy_seconds(steps[i].kv_out_bytes, r), "kv out " + steps[i].name, steps[i].kv_out_bytes);
  }
  tl.total_s = std::max(compute_free, comm_free);
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

inline double forward_seconds(const std::vector<step_cost>& steps, const time_rates& r, std::size_t prefetch,
                              std::size_t kv_prefetch = 1) {
  return simulate_forward(steps, r, prefetch, kv_prefetch).total_s;
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
