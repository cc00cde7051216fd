// The replaced operators below pair malloc with free; GCC cannot see that and warns.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "toy_layer/toy_model.hpp"
#include "unshard/policy/compose.hpp"
#include "unshard/policy/full_unshard.hpp"
#include "unshard/policy/offload.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/policy/prefetch.hpp"
#include "unshard/policy/selective_unshard.hpp"
#include "unshard/runtime/reference_forward.hpp"
#include "unshard/runtime/session.hpp"

// A process-wide count of heap allocations: shows that nothing bypasses the tracking allocator
// (or allocates at all) during a forward.
namespace {
std::atomic<std::size_t> g_heap_allocations{0};
}
void* operator new(std::size_t n) {
  g_heap_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void* operator new(std::size_t n, std::align_val_t a) {
  g_heap_allocations.fetch_add(1, std::memory_order_relaxed);
  const std::size_t al = static_cast<std::size_t>(a);
  if (void* p = std::aligned_alloc(al, (n + al - 1) / al * al)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n, std::align_val_t a) { return operator new(n, a); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

using namespace unshard;
using namespace unshard::toy;

namespace {

std::vector<float> toy_input(const toy_config& c) {
  std::vector<float> x(c.tokens * c.dim);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i)) * 0.8f;
  return x;
}

std::vector<float> run_reference(const toy_model& m, const toy_weights& w) {
  reference_runner<toy_model> ref(m, w);
  const auto x = toy_input(m.config());
  std::memcpy(ref.state().x, x.data(), x.size() * 4);
  ref.forward();
  return {ref.state().x, ref.state().x + x.size()};
}

struct run_result {
  std::vector<std::vector<float>> outputs;  // per rank
  memory_plan plan;
  std::vector<rank_measurement> measured;
};

run_result run_sharded(const toy_model& m, const toy_weights& w, session_options opt, int forwards = 2) {
  session<toy_model> s(m, w, opt);
  s.cap_device_memory(s.plan().peak_bytes());  // an overshoot of the plan throws, naming the category
  const auto x = toy_input(m.config());
  run_result r;
  r.outputs.assign(opt.world_size, {});
  for (int f = 0; f < forwards; ++f)
    s.forward([&](std::size_t, toy_state& st) { std::memcpy(st.x, x.data(), x.size() * 4); },
              [&](std::size_t rank, const toy_state& st) { r.outputs[rank].assign(st.x, st.x + x.size()); });
  r.plan = s.plan();
  for (std::size_t i = 0; i < opt.world_size; ++i) r.measured.push_back(s.measured(i));
  return r;
}

// A user-written residency policy, as examples/custom_policy shows: keep the first M layers.
template <std::size_t M>
struct keep_first_layers {
  static constexpr bool keeps_gathered(const unit_info& u) noexcept { return u.layer < M; }
};

}  // namespace

TEST_CASE("sharded forward equals the unsharded forward bit for bit, and measured peak <= planned (tight)") {
  toy_config c;
  c.layers = 5;
  c.dim = 144;  // weights above selective's 64 KiB resident threshold, norms and biases below it
  c.ffn = 120;
  c.tokens = 3;
  const toy_model m(c);
  const toy_weights w(m);
  const auto want = run_reference(m, w);
  const std::vector<policy_values> policies{
      values_of<full_unshard>(),
      values_of<selective_unshard<per_block>>(),
      values_of<selective_unshard<per_subunit>>(),
      values_of<compose<selective_unshard<per_block, 0>, prefetch<1>>>(),
      values_of<prefetch<2>>(),
      values_of<compose<selective_unshard<per_subunit>, prefetch<3>>>(),
      values_of<offload<>>(),
      values_of<compose<selective_unshard<per_subunit>, prefetch<2>, offload<pinned_host>>>(),
      values_of<compose<keep_first_layers<2>, prefetch<1>>>(),
  };
  for (const auto& p : policies)
    for (std::size_t n : {1, 2, 3, 4, 5, 8}) {
      CAPTURE(p.name);
      CAPTURE(n);
      session_options opt;
      opt.world_size = n;
      opt.policy = p;
      const auto r = run_sharded(m, w, opt);
      for (std::size_t rank = 0; rank < n; ++rank) {
        REQUIRE(r.outputs[rank].size() == want.size());
        CHECK(std::memcmp(r.outputs[rank].data(), want.data(), want.size() * 4) == 0);
        const std::size_t planned = r.plan.ranks[rank].peak();
        CHECK(r.measured[rank].peak_bytes <= planned);
        CHECK(r.measured[rank].peak_bytes * 100 >= planned * 95);  // tight
        for (auto cat : all_memory_categories) CHECK(r.measured[rank].at_peak[cat] == r.plan.ranks[rank].terms[cat]);
        if (p.offload) {
          CHECK(r.measured[rank].category_peaks[memory_category::shards] == 0);
          CHECK(r.measured[rank].host_peak_bytes == r.plan.ranks[rank].host_bytes);
          CHECK(r.measured[rank].host_peak_bytes > 0);
        }
      }
    }
}

TEST_CASE("prefetch<K> holds at most K+1 gathered units, checked through the allocator and the trace") {
  toy_config c;
  c.layers = 6;
  c.dim = 160;
  c.tokens = 2;
  const toy_model m(c);
  const toy_weights w(m);
  for (std::size_t k : {1, 2, 3}) {
    CAPTURE(k);
    session_options opt;
    opt.world_size = 3;
    opt.policy = parse_policy("prefetch:" + std::to_string(k)).values;
    opt.trace = true;
    opt.link.latency_s = 2e-4;
    session<toy_model> s(m, w, opt);
    std::size_t largest = 0;
    for (const auto& u : s.units()) largest = std::max(largest, u.gathered_bytes());
    s.forward([](std::size_t, toy_state&) {}, [](std::size_t, const toy_state&) {});
    CHECK(s.measured(0).category_peaks[memory_category::gathered] == (k + 1) * largest);
    // From the trace: units whose gather has begun and whose compute has not ended, at any time.
    for (std::size_t rank = 0; rank < 3; ++rank) {
      std::vector<trace_entry> g(s.units().size()), comp(s.units().size());
      for (const auto& e : s.trace()->entries()) {
        if (e.rank != rank) continue;
        if (e.kind == trace_kind::compute) comp[e.unit] = e;
        if (e.kind == trace_kind::gather) g[e.unit] = e;
      }
      for (std::size_t u = 0; u < s.units().size(); ++u) {
        REQUIRE(g[u].kind == trace_kind::gather);  // every unit of this model is gathered
        std::size_t live = 0;  // units gathered or being gathered, and not yet computed, u included
        for (std::size_t v = 0; v < s.units().size(); ++v)
          if (g[v].begin <= g[u].begin && comp[v].end > g[u].begin) ++live;
        CHECK(live <= k + 1);
      }
    }
  }
}

TEST_CASE("prefetch overlaps: with a slow link, the gather of unit i+1 starts before the compute of unit i ends") {
  toy_config c;
  c.layers = 5;
  c.dim = 160;
  c.ffn = 256;
  c.tokens = 768;  // compute per unit (>10 ms) well above thread wake-up latency on 2 busy cores
  const toy_model m(c);
  const toy_weights w(m);
  session_options opt;
  opt.world_size = 2;
  opt.policy = parse_policy("prefetch:1").values;
  opt.trace = true;
  opt.link.latency_s = 2e-3;
  session<toy_model> s(m, w, opt);
  s.forward([](std::size_t, toy_state&) {}, [](std::size_t, const toy_state&) {});
  const auto entries = s.trace()->entries();
  for (std::uint32_t rank = 0; rank < 2; ++rank)
    for (std::uint32_t u = 0; u + 1 < s.units().size(); ++u) {
      trace_entry gather_next{}, compute_this{};
      for (const auto& e : entries) {
        if (e.rank != rank) continue;
        if (e.kind == trace_kind::gather && e.unit == u + 1) gather_next = e;
        if (e.kind == trace_kind::compute && e.unit == u) compute_this = e;
      }
      CAPTURE(rank);
      CAPTURE(u);
      CHECK(gather_next.begin < compute_this.end);
    }
  // Without prefetch the same trace shows the opposite: gather i+1 only after compute i.
  opt.policy = parse_policy("selective").values;
  session<toy_model> s0(m, w, opt);
  s0.forward([](std::size_t, toy_state&) {}, [](std::size_t, const toy_state&) {});
  for (const auto& e : s0.trace()->entries())
    if (e.kind == trace_kind::gather && e.unit > 0)
      for (const auto& f : s0.trace()->entries())
        if (f.rank == e.rank && f.kind == trace_kind::compute && f.unit + 1 == e.unit) CHECK(e.begin >= f.end);
}

TEST_CASE("a forward allocates nothing on the heap: every byte comes from the tracking allocator") {
  toy_config c;
  c.dim = 160;
  const toy_model m(c);
  const toy_weights w(m);
  for (const char* pol : {"full", "selective:subunit", "offload+prefetch:2", "chunked:1KiB+prefetch:2+offload"}) {
    CAPTURE(pol);
    session_options opt;
    opt.world_size = 3;
    opt.policy = parse_policy(pol).values;
    session<toy_model> s(m, w, opt);
    const auto x = toy_input(c);
    auto prepare = [&](std::size_t, toy_state& st) { std::memcpy(st.x, x.data(), x.size() * 4); };
    auto finish = [](std::size_t, const toy_state&) {};
    s.forward(prepare, finish);  // the first forward of `full` gathers; later ones reuse
    const std::size_t before = g_heap_allocations.load();
    for (int i = 0; i < 3; ++i) s.forward(prepare, finish);
    CHECK(g_heap_allocations.load() - before == 0);
  }
}

TEST_CASE("each rank reads only its own shard's bytes") {
  toy_config c;
  c.layers = 4;
  c.dim = 160;
  const toy_model m(c);
  for (std::size_t n : {1, 2, 5}) {
    const toy_weights w(m);
    session_options opt;
    opt.world_size = n;
    opt.policy = values_of<selective_unshard<per_block, 0>>();  // everything sharded
    session<toy_model> s(m, w, opt);
    std::size_t param_bytes = 0;
    for (const auto& u : s.units())
      for (const auto& p : u.sharded_params) param_bytes += p.bytes();
    CHECK(w.bytes_read() == param_bytes);  // every byte once, across all ranks together
  }
}

TEST_CASE("bad input: world size 0, zero dimensions, a budget that cannot fit, a rank that throws") {
  toy_config c;
  const toy_model m(c);
  const toy_weights w(m);
  session_options opt;
  opt.world_size = 0;
  CHECK_THROWS_WITH_AS(session<toy_model>(m, w, opt), doctest::Contains("world size must be at least 1"), error);

  toy_config z = c;
  z.dim = 0;
  CHECK_THROWS_WITH_AS(toy_model{z}, doctest::Contains("must all be >= 1"), error);

  opt.world_size = 2;
  const auto plan = plan_memory(m, 2, opt.policy);
  opt.budget_bytes = plan.peak_bytes() - 1;
  CHECK_THROWS_WITH_AS(session<toy_model>(m, w, opt), doctest::Contains("the plan does not fit"), error);
  CHECK_THROWS_WITH_AS(session<toy_model>(m, w, opt), doctest::Contains("gathered="), error);

  opt.budget_bytes = 0;
  for (std::size_t n : {2, 4}) {
    opt.world_size = n;
    session<toy_model> s(m, w, opt);
    const int fail_layer = 2;
    CHECK_THROWS_WITH_AS(s.forward([&](std::size_t r, toy_state& st) { st.fail_at_layer = r == 1 ? &fail_layer : nullptr; },
                                   [](std::size_t, const toy_state&) {}),
                         doctest::Contains("rank 1 failed during the forward: toy block 2: injected failure"),
                         rank_failure);
    CHECK_THROWS_WITH_AS(s.forward([](std::size_t, toy_state&) {}, [](std::size_t, const toy_state&) {}),
                         doctest::Contains("cannot run again"), error);
  }
}

TEST_CASE("a missing or mis-shaped weight is an error naming the tensor") {
  toy_config c;
  const toy_model m(c);
  toy_config other = c;
  other.dim = c.dim + 1;
  const toy_model wrong(other);
  const toy_weights w(wrong);
  session_options opt;
  opt.world_size = 2;
  CHECK_THROWS_WITH_AS(session<toy_model>(m, w, opt), doctest::Contains("has shape"), rank_failure);
}
