#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

namespace unshard {

using trace_clock = std::chrono::steady_clock;

// release: the compute side handed a gathered buffer (a unit's, or a chunk's) back to the ring;
// its bytes are the ones its gather brought in, so gathers minus releases is the live gathered
// memory at any instant (the memory curve of the Chrome trace).
enum class trace_kind : std::uint8_t { gather, host_to_device, compute, release };

constexpr const char* name_of(trace_kind k) noexcept {
  switch (k) {
    case trace_kind::gather: return "gather";
    case trace_kind::host_to_device: return "host_to_device";
    case trace_kind::compute: return "compute";
    case trace_kind::release: return "free";
  }
  return "?";
}

struct trace_entry {
  std::uint32_t rank;
  trace_kind kind;
  std::uint32_t unit;
  trace_clock::time_point begin, end;
  std::size_t bytes;
};

// What the runtime did and when, per rank: how prefetch overlap is verified (the gather of unit
// i+1 begins before the compute of unit i ends) and what the Chrome trace shows. Storage is
// reserved up front and add() is lock-free, so tracing never allocates on the hot path; entries
// past the capacity are counted as dropped, and so are spans a backend could not keep (lose()):
// a trace is either complete or says how many entries it lacks.
class trace_recorder {
 public:
  explicit trace_recorder(std::size_t capacity = 1 << 16) : entries_(capacity) {}

  void add(std::size_t rank, trace_kind k, std::uint32_t unit, trace_clock::time_point b, trace_clock::time_point e,
           std::size_t bytes) noexcept {
    const std::size_t i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= entries_.size()) return;
    entries_[i] = {static_cast<std::uint32_t>(rank), k, unit, b, e, bytes};
  }
  // A span the caller could not record (an asynchronous backend out of pending slots, see
  // core/trace_spans.hpp): counted, so dropped() stays the exact number of missing entries.
  void lose() noexcept { lost_.fetch_add(1, std::memory_order_relaxed); }
  void clear() noexcept {
    next_.store(0);
    lost_.store(0);
  }
  std::size_t dropped() const noexcept {
    const std::size_t n = next_.load();
    return (n > entries_.size() ? n - entries_.size() : 0) + lost_.load();
  }
  std::vector<trace_entry> entries() const {
    const std::size_t n = std::min(next_.load(), entries_.size());
    return {entries_.begin(), entries_.begin() + static_cast<std::ptrdiff_t>(n)};
  }

  // Chrome trace JSON (Perfetto, chrome://tracing): one process per rank, compute and
  // communication as two threads, frees as instants, and a counter of the live gathered bytes
  // per rank (each gather adds its bytes when it starts, each free takes them back). `unit_name(i)`
  // labels the units.
  template <class UnitName>
  void write_chrome_json(std::ostream& os, UnitName unit_name) const {
    auto all = entries();
    trace_clock::time_point t0 = all.empty() ? trace_clock::now() : all.front().begin;
    for (const auto& e : all) t0 = std::min(t0, e.begin);
    const auto us = [&](trace_clock::time_point t) { return std::chrono::duration<double, std::micro>(t - t0).count(); };
    os << "{\"traceEvents\":[";
    bool first = true;
    for (const auto& e : all) {
      os << (first ? "" : ",") << "\n{\"name\":\"" << name_of(e.kind) << ' ' << unit_name(e.unit) << "\",\"pid\":" << e.rank;
      if (e.kind == trace_kind::release)
        os << ",\"tid\":0,\"ph\":\"i\",\"s\":\"t\",\"ts\":" << us(e.begin);
      else
        os << ",\"tid\":" << (e.kind == trace_kind::compute ? 0 : 1) << ",\"ph\":\"X\",\"ts\":" << us(e.begin)
           << ",\"dur\":" << us(e.end) - us(e.begin);
      os << ",\"args\":{\"bytes\":" << e.bytes << "}}";
      first = false;
    }
    // The memory curve: per rank, gathers (+) and frees (-) in time order.
    std::stable_sort(all.begin(), all.end(), [](const trace_entry& a, const trace_entry& b) {
      return a.rank != b.rank ? a.rank < b.rank : a.begin < b.begin;
    });
    long long live = 0;
    std::uint32_t rank = all.empty() ? 0 : all.front().rank;
    for (const auto& e : all) {
      if (e.rank != rank) rank = e.rank, live = 0;
      if (e.kind == trace_kind::gather) live += static_cast<long long>(e.bytes);
      else if (e.kind == trace_kind::release) live -= static_cast<long long>(e.bytes);
      else continue;
      os << (first ? "" : ",") << "\n{\"name\":\"gathered bytes\",\"ph\":\"C\",\"pid\":" << e.rank
         << ",\"ts\":" << us(e.begin) << ",\"args\":{\"gathered\":" << live << "}}";
      first = false;
    }
    os << "\n]}\n";
  }

 private:
  std::vector<trace_entry> entries_;
  std::atomic<std::size_t> next_{0};
  std::atomic<std::size_t> lost_{0};
};

}  // namespace unshard
