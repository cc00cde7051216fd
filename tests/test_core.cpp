#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <set>
#include <vector>

#include "unshard/core/dtype.hpp"
#include "unshard/core/flat_layout.hpp"
#include "unshard/core/trace.hpp"
#include "unshard/core/trace_spans.hpp"
#include "unshard/core/tracking_allocator.hpp"

using namespace unshard;

namespace {
// Reference RNE to bf16 via double arithmetic on the exact value.
std::uint16_t bf16_reference(float f) {
  if (std::isnan(f)) return 0x7fc0;
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  const std::uint16_t down = static_cast<std::uint16_t>(u >> 16);
  const std::uint16_t up = static_cast<std::uint16_t>(down + 1);
  const double d = f, lo = bf16_bits_to_float(down), hi = bf16_bits_to_float(up);
  const double dl = std::fabs(d - lo), dh = std::fabs(hi - d);
  if (dl < dh) return down;
  if (dh < dl) return up;
  return (down & 1) ? up : down;
}
}  // namespace

TEST_CASE("bf16 rounds to nearest, ties to even") {
  CHECK(float_to_bf16_bits(1.0f) == 0x3f80);
  CHECK(bf16_bits_to_float(float_to_bf16_bits(1.0f + 1.0f / 256)) == 1.0f);               // tie -> even (down)
  CHECK(bf16_bits_to_float(float_to_bf16_bits(1.0f + 3.0f / 256)) == 1.0f + 4.0f / 256);  // tie -> even (up)
  CHECK(float_to_bf16_bits(std::numeric_limits<float>::infinity()) == 0x7f80);
  CHECK(std::isnan(bf16_bits_to_float(float_to_bf16_bits(std::nanf("")))));
  std::uint32_t state = 12345;
  for (int i = 0; i < 200000; ++i) {
    state = state * 1664525u + 1013904223u;
    float f;
    std::memcpy(&f, &state, 4);
    if (std::isnan(f) || std::isinf(f) || std::fabs(f) > 3e38f) continue;
    REQUIRE(float_to_bf16_bits(f) == bf16_reference(f));
  }
}

TEST_CASE("f16 conversion is exact both ways on every f16 value and rounds ties to even") {
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const float f = f16_bits_to_float(static_cast<std::uint16_t>(h));
    if (std::isnan(f)) continue;
    REQUIRE(float_to_f16_bits(f) == h);
  }
  CHECK(f16_bits_to_float(0x3c00) == 1.0f);
  CHECK(f16_bits_to_float(0x0001) == std::ldexp(1.0f, -24));                        // smallest subnormal
  CHECK(float_to_f16_bits(std::ldexp(1.0f, -25)) == 0x0000);                        // tie to even: 0
  CHECK(float_to_f16_bits(std::ldexp(3.0f, -25)) == 0x0002);                        // 1.5 ulp -> 2
  CHECK(float_to_f16_bits(65504.0f) == 0x7bff);
  CHECK(float_to_f16_bits(65520.0f) == 0x7c00);                                     // rounds to inf
  CHECK(float_to_f16_bits(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);                 // tie -> even
  CHECK(float_to_f16_bits(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);
}

TEST_CASE("shape validation names the culprit") {
  CHECK_THROWS_WITH_AS(shape({4, 0, 3}).validate("tensor 'w'"), doctest::Contains("tensor 'w': dimension 1 is 0"),
                       error);
  CHECK_THROWS_WITH_AS(shape({1 << 30, 1 << 30, 1 << 30}).validate("tensor 'big'", 4),
                       doctest::Contains("overflows"), error);
  CHECK_NOTHROW(shape({2, 3}).validate("ok", 4));
}

TEST_CASE("flat layout: equal contiguous shards covering every parameter, for any world size") {
  const std::vector<param_spec> params{{"a", {3, 5}, dtype::f32}, {"b", {7}, dtype::bf16}, {"c", {100, 3}, dtype::f32}};
  for (std::size_t n : {1, 2, 3, 4, 5, 7, 8, 16}) {
    CAPTURE(n);
    flat_layout l(params, n);
    CHECK(l.padded_bytes() == l.shard_bytes() * n);
    CHECK(l.padded_bytes() >= l.used_bytes());
    CHECK(l.shard_bytes() % allocation_alignment == 0);
    for (std::size_t i = 0; i < params.size(); ++i) {
      CHECK(l.entry(i).offset % allocation_alignment == 0);
      CHECK(l.entry(i).bytes == params[i].bytes());
      if (i) CHECK(l.entry(i).offset >= l.entry(i - 1).offset + l.entry(i - 1).bytes);
    }
    CHECK(l.shard_range(n - 1).second == l.padded_bytes());
  }
  CHECK_THROWS_WITH_AS(flat_layout(params, 0), doctest::Contains("world size must be at least 1"), error);
  const std::vector<param_spec> bad{{"blocks.0.w", {4, 0}, dtype::f32}};
  CHECK_THROWS_WITH_AS(flat_layout(bad, 2), doctest::Contains("parameter 'blocks.0.w'"), error);
}

TEST_CASE("tracking allocator counts by category, records the peak and refuses an overshoot") {
  tracking_allocator a("device", 4096, "rank 3 ");
  {
    auto x = a.allocate(100, memory_category::shards);
    CHECK(x.size() == 256);
    auto y = a.allocate(1000, memory_category::gathered);
    CHECK(a.current(memory_category::gathered) == 1024);
    CHECK(a.peak_total() == 1280);
    CHECK_THROWS_WITH_AS(a.allocate(4096, memory_category::activations),
                         doctest::Contains("rank 3 device: allocating 4096 bytes of activations would exceed"),
                         out_of_memory);
  }
  CHECK(a.current_total() == 0);
  CHECK(a.peak_total() == 1280);
  CHECK(a.at_peak()[memory_category::shards] == 256);
  // Freed blocks coalesce: the whole capacity is usable again in one piece.
  auto z = a.allocate(4096, memory_category::workspace);
  CHECK(z.data() != nullptr);
  a.set_cap(1024);
  CHECK_THROWS_AS(a.allocate(1, memory_category::workspace), out_of_memory);
}

namespace {
// A device stream as the trace sees it: host callbacks enqueued now, run later in order (what
// cudaLaunchHostFunc does on a GPU that is far behind the host).
struct deferred_callbacks {
  std::vector<std::pair<void (*)(void*), void*>> queued;
  void launch(void (*f)(void*), void* p) { queued.emplace_back(f, p); }
  void run_all() {
    for (auto& [f, p] : queued) f(p);
    queued.clear();
  }
};

// One traced operation as cuda_stream enqueues it: begin callback, the work, end callback.
void traced_op(trace_spans& spans, deferred_callbacks& stream, std::uint32_t unit, std::size_t bytes) {
  trace_spans::span* s = spans.open();
  if (!s) return;
  stream.launch(trace_spans::span::stamp_begin, s);
  s->set(trace_kind::gather, unit, bytes);
  stream.launch(trace_spans::span::write_end, s);
}
}  // namespace

TEST_CASE("trace spans: a span whose callbacks are pending is never overwritten; the overflow is counted") {
  // More operations in flight than slots: a ring that wraps would hand slot 0 to operation 1024
  // while operation 0's end callback has not run, so both callbacks would record unit 1024 and
  // unit 0 would vanish without a count.
  trace_recorder rec;
  trace_spans spans(&rec, 2);
  deferred_callbacks stream;
  const std::size_t ops = trace_spans::default_capacity + 6;
  for (std::size_t i = 0; i < ops; ++i) traced_op(spans, stream, static_cast<std::uint32_t>(i), 100 + i);
  CHECK(spans.pending() == trace_spans::default_capacity);
  CHECK(rec.dropped() == 6);
  stream.run_all();
  const auto entries = rec.entries();
  REQUIRE(entries.size() + rec.dropped() == ops);
  std::set<std::uint32_t> units;
  for (const trace_entry& e : entries) {
    CHECK(e.rank == 2);
    CHECK(e.bytes == 100 + e.unit);  // each entry is the operation it was opened for
    CHECK(e.begin <= e.end);
    units.insert(e.unit);
  }
  CHECK(units.size() == entries.size());  // no operation recorded twice
  CHECK(*units.rbegin() == trace_spans::default_capacity - 1);

  // Once the callbacks ran, every slot is free again and tracing resumes.
  CHECK(spans.pending() == 0);
  traced_op(spans, stream, 9999, 9999 + 100);
  stream.run_all();
  CHECK(rec.entries().back().unit == 9999);
  CHECK(rec.dropped() == 6);
}

TEST_CASE("trace spans: off without a recorder; a span whose begin could not be enqueued is given back") {
  trace_spans off(nullptr, 0);
  CHECK_FALSE(off.enabled());
  CHECK(off.open() == nullptr);

  trace_recorder rec;
  trace_spans spans(&rec, 0, 2);
  trace_spans::span* a = spans.open();
  REQUIRE(a != nullptr);
  trace_spans::cancel(a);  // cuda_stream: cudaLaunchHostFunc failed, no callback will touch it
  CHECK(spans.pending() == 0);
  CHECK(spans.open() != nullptr);
  CHECK(spans.open() != nullptr);
  CHECK(spans.open() == nullptr);  // both slots pending: dropped, counted
  CHECK(rec.dropped() == 1);
  rec.clear();
  CHECK(rec.dropped() == 0);
}
