// Chunked unshard: weights stream in chunks of whole rows, the GEMMs consume them as they land,
// and the gathered peak is (depth + 1) chunks whatever the model.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "unshard/core/size_literals.hpp"
#include "unshard/io/checkpoint.hpp"
#include "toy_layer/toy_model.hpp"
#include "unshard/models/wan/model.hpp"
#include "unshard/policy/chunked_unshard.hpp"
#include "unshard/policy/compose.hpp"
#include "unshard/policy/offload.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/policy/prefetch.hpp"
#include "unshard/policy/selective_unshard.hpp"
#include "unshard/runtime/checkpoint_weights.hpp"
#include "unshard/runtime/lane_turns.hpp"
#include "unshard/runtime/reference_forward.hpp"
#include "unshard/runtime/session.hpp"

#include "support/sharded_options.hpp"
#include "support/wan_case.hpp"

using namespace unshard;
using namespace unshard::testing;
using namespace unshard::toy;
using namespace unshard::literals;

namespace {

toy_config small_toy() {
  toy_config c;
  c.layers = 3;
  c.dim = 48;   // mix.weight rows of 192 bytes
  c.ffn = 80;   // ffn.2.weight rows of 320+ bytes: rows differ across weights
  c.tokens = 6;
  return c;
}

std::vector<float> toy_input(const toy_config& c) {
  std::vector<float> x(c.tokens * c.dim);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i)) * 0.8f;
  return x;
}

std::vector<float> toy_reference(const toy_model& m, const toy_weights& w) {
  reference_runner<toy_model> ref(m, w);
  const auto x = toy_input(m.config());
  std::memcpy(ref.state().x, x.data(), x.size() * 4);
  ref.forward();
  return {ref.state().x, ref.state().x + x.size()};
}

std::size_t largest_row_bytes(const std::vector<unit_layout>& units) {
  std::size_t r = 0;
  for (const auto& u : units)
    for (const auto& p : u.sharded_params) r = std::max(r, p.bytes() / static_cast<std::size_t>(p.dims[0]));
  return r;
}

}  // namespace

TEST_CASE("chunks cover every streamed byte once, in flat order, of whole rows, within the size or one row") {
  const toy_model m(small_toy());
  for (std::size_t size : {std::size_t{1}, std::size_t{300}, std::size_t{1000}, std::size_t{4096}, std::size_t{1} << 20}) {
    CAPTURE(size);
    policy_values v = parse_policy("chunked:" + std::to_string(size)).values;
    const auto units = build_units(m, 3, v);
    const std::size_t row = largest_row_bytes(units);
    std::size_t aligned_splits = 0;
    for (const auto& u : units) {
      REQUIRE(!u.chunks.empty());
      std::size_t param = 0;
      std::int64_t next_row = 0;
      for (const auto& c : u.chunks) {
        CHECK(c.bytes() <= std::max(size, row));
        CHECK(c.first_param == param);
        const param_spec& p = u.sharded_params[c.first_param];
        const std::size_t rb = p.bytes() / static_cast<std::size_t>(p.dims[0]);
        if (c.split) {
          CHECK(c.row_begin == next_row);
          CHECK(c.bytes() == static_cast<std::size_t>(c.row_end - c.row_begin) * rb);
          CHECK(c.begin == u.sharded.entry(c.first_param).offset + static_cast<std::size_t>(c.row_begin) * rb);
          // As many rows as fit, rounded down to a multiple of 16 once 16 fit (cuBLASLt's alignment);
          // only a weight's last chunk may hold fewer.
          const auto fit = static_cast<std::int64_t>(size / rb);
          const std::int64_t per = fit < 16 ? std::max<std::int64_t>(1, fit) : fit - fit % 16;
          CHECK(c.row_end - c.row_begin == std::min(per, p.dims[0] - c.row_begin));
          if (fit >= 16) {
            CHECK(c.row_begin % 16 == 0);
            ++aligned_splits;
          }
          next_row = c.row_end;
          if (next_row == p.dims[0]) {
            ++param;
            next_row = 0;
          }
        } else {
          CHECK(c.begin == u.sharded.entry(c.first_param).offset);
          CHECK(c.end == u.sharded.entry(c.last_param).offset + u.sharded.entry(c.last_param).bytes);
          param = c.last_param + 1;
        }
      }
      CHECK(param == u.sharded_params.size());
      // Only weights (rank >= 2) stream; biases and norm scales stay resident.
      for (const auto& p : u.sharded_params) CHECK(p.dims.rank() >= 2);
    }
    if (size == 1) CHECK(effective_chunk_bytes(units) == row);  // one row: the smallest chunk there is
    if (size == 4096) CHECK(aligned_splits > 0);  // 21 rows of mix.weight fit: chunks of 16 rows
  }
}

TEST_CASE("chunked toy forward: bit-identical to unsharded, gathered peak (K+1) chunks, world sizes 1-5") {
  const toy_model m(small_toy());
  const toy_weights w(m);
  const auto want = toy_reference(m, w);
  const auto x = toy_input(m.config());
  for (const char* size : {"1B", "1000B", "1MiB"})
    for (const char* rest : {"", "+prefetch:2", "+offload+prefetch:1"})
      for (std::size_t n = 1; n <= 5; ++n) {
        const std::string pol = std::string("chunked:") + size + rest;
        CAPTURE(pol);
        CAPTURE(n);
        const session_options opt = sharded_options(pol, n);
        session<toy_model> s(m, w, opt);
        s.cap_device_memory(s.plan().peak_bytes());  // any overshoot of the plan throws, naming the category
        std::vector<std::vector<float>> got(n);
        for (int f = 0; f < 2; ++f)
          s.forward([&](std::size_t, toy_state& st) { std::memcpy(st.x, x.data(), x.size() * 4); },
                    [&](std::size_t r, const toy_state& st) { got[r].assign(st.x, st.x + x.size()); });
        const std::size_t chunk = s.plan().effective_chunk_bytes;
        CHECK(chunk >= largest_row_bytes(s.units()));
        CHECK(chunk <= std::max(parse_size(size), largest_row_bytes(s.units())));
        const std::size_t depth = opt.policy.prefetch_depth;
        for (std::size_t r = 0; r < n; ++r) {
          CHECK(std::memcmp(got[r].data(), want.data(), want.size() * 4) == 0);
          const rank_measurement meas = s.measured(r);
          CHECK(meas.peak_bytes <= s.plan().ranks[r].peak());
          CHECK(meas.category_peaks[memory_category::gathered] <= (depth + 1) * align_up(chunk));
          CHECK(meas.category_peaks[memory_category::gathered] == s.plan().ranks[r].terms[memory_category::gathered]);
          if (opt.policy.offload) CHECK(meas.category_peaks[memory_category::shards] == 0);
        }
      }
}

TEST_CASE("the gathered term does not grow with the model: the same chunk for a 4x wider FFN") {
  toy_config small = small_toy(), wide = small_toy();
  wide.ffn = 4 * small.ffn;
  const policy_values v = parse_policy("chunked:2KiB+prefetch:1").values;
  const auto a = plan_memory(toy_model(small), 2, v), b = plan_memory(toy_model(wide), 2, v);
  CHECK(a.ranks[0].terms[memory_category::gathered] == b.ranks[0].terms[memory_category::gathered]);
  CHECK(a.ranks[0].terms[memory_category::gathered] == 2 * align_up(a.effective_chunk_bytes));
  const auto whole = plan_memory(toy_model(wide), 2, values_of<compose<selective_unshard<per_block, 0>, prefetch<1>>>());
  CHECK(whole.ranks[0].terms[memory_category::gathered] > 4 * b.ranks[0].terms[memory_category::gathered]);
}

TEST_CASE("policy types: compose<chunked<64_MiB>, prefetch<2>, offload<pinned_host>> lowers to the string's values") {
  const policy_values t = values_of<compose<chunked<64_MiB>, prefetch<2>, offload<pinned_host>>>();
  const policy_values s = parse_policy("chunked:64MiB+prefetch:2+offload").values;
  CHECK(t.chunked());
  CHECK(t.chunk_bytes == 64u << 20);
  CHECK(t.chunk_bytes == s.chunk_bytes);
  CHECK(t.prefetch_depth == s.prefetch_depth);
  CHECK(t.offload == s.offload);
  CHECK(t.name == s.name);
  CHECK(compose<chunked<1_KiB>, prefetch<3>>::live_gathered_buffers == 4);
}

TEST_CASE("chunked Wan DiT matches the references and the unsharded forward, portable bit for bit, BLAS within 1e-6") {
  const wan_case c = load_wan_case("wan_tiny_a");
  const checkpoint& file = c.file;
  const wan::config& cfg = c.config;
  const wan::workload& work = c.work;
  const checkpoint_weights w(file);
  const auto ref_out = read_f32(file, "ref.output");
  for (gemm_path path : {gemm_path::portable, gemm_path::blas}) {
    const wan::model m(cfg, work, {dtype::f32, path, true});
    reference_runner<wan::model> ref(m, w);
    set_case_inputs(m, ref.state(), file);
    ref.forward();
    const auto want = m.output(ref.state()).as<float>();
    std::vector<float> want_v(want.begin(), want.end());
    for (const char* pol : {"chunked:1B", "chunked:4KiB+prefetch:1", "chunked:3000B+prefetch:2+offload"})
      for (std::size_t n = 1; n <= 5; ++n) {
        CAPTURE(pol);
        CAPTURE(n);
        CAPTURE(static_cast<int>(path));
        const session_options opt = sharded_options(pol, n);
        session<wan::model> s(m, w, opt);
        s.cap_device_memory(s.plan().peak_bytes());
        std::vector<float> got;
        forward_case(s, m, file, [&](std::size_t r, const wan::state& st) {
          if (r == 0) {
            const auto o = m.output(st).as<float>();
            got.assign(o.begin(), o.end());
          }
        });
        REQUIRE(got.size() == want_v.size());
        double worst = 0, scale = 1, ref_worst = 0;
        for (std::size_t i = 0; i < got.size(); ++i) {
          worst = std::max(worst, static_cast<double>(std::fabs(got[i] - want_v[i])));
          scale = std::max(scale, static_cast<double>(std::fabs(want_v[i])));
          ref_worst = std::max(ref_worst, static_cast<double>(std::fabs(got[i] - ref_out[i])));
        }
        if (path == gemm_path::portable) CHECK(std::memcmp(got.data(), want_v.data(), got.size() * 4) == 0);
        else CHECK(worst <= 1e-6 * scale);
        CHECK(ref_worst <= 1e-5 * scale);
        for (std::size_t r = 0; r < n; ++r) {
          CHECK(s.measured(r).peak_bytes <= s.plan().ranks[r].peak());
          CHECK(s.measured(r).category_peaks[memory_category::gathered] <=
                (opt.policy.prefetch_depth + 1) * align_up(s.plan().effective_chunk_bytes));
        }
      }
  }
}

namespace {
// A layer that reads its weights in the wrong order: the stream must refuse, naming the weight.
struct swapped_block {
  toy_block inner;
  std::string name() const { return inner.name(); }
  std::size_t subunit_count() const { return 1; }
  std::string subunit_name(std::size_t) const { return "ffn"; }
  std::vector<param_spec> parameters(std::size_t) const { return inner.parameters(1); }
  void forward(std::size_t, const param_views&, toy_state&) const {}
  template <param_source P>
  void forward(std::size_t, P& p, toy_state&) const {
    p.rows(2, [](const tensor_view&, std::int64_t, std::int64_t) {});  // ffn.2, passing over ffn.0 ...
    p.rows(0, [](const tensor_view&, std::int64_t, std::int64_t) {});  // ... then back to ffn.0
  }
};
// A layer with only the whole-view forward.
struct whole_only_block {
  toy_block inner;
  std::string name() const { return inner.name(); }
  std::size_t subunit_count() const { return 1; }
  std::string subunit_name(std::size_t) const { return "ffn"; }
  std::vector<param_spec> parameters(std::size_t) const { return inner.parameters(1); }
  void forward(std::size_t, const param_views&, toy_state&) const {}
};
template <class Block>
struct one_block_model {
  using state = toy_state;
  toy_config c = small_toy();
  Block b{toy_block(c, 0)};
  std::size_t layer_count() const { return 1; }
  const Block& layer(std::size_t) const { return b; }
  std::vector<buffer_spec> buffers() const { return toy_model(c).buffers(); }
  toy_state make_state(const buffer_set& s) const { return toy_model(c).make_state(s); }
};
}  // namespace

TEST_CASE("errors: bad chunk terms, a layer reading out of order, a layer that cannot stream") {
  CHECK_THROWS_WITH(parse_policy("chunked:0"), doctest::Contains("at least 1 byte"));
  CHECK_THROWS_WITH(parse_policy("chunked:4KiB+selective"), doctest::Contains("'chunked' and 'selective'"));
  CHECK_THROWS_WITH(parse_policy("chunked:4XB"), doctest::Contains("unknown unit 'XB'"));
  CHECK_THROWS_WITH(parse_policy("chunked:4KiB+chunked:8KiB"), doctest::Contains("repeats"));

  const one_block_model<swapped_block> swapped;
  const toy_weights ws(toy_model(swapped.c));
  const session_options opt = sharded_options("chunked:1KiB+prefetch:1", 2);
  session<one_block_model<swapped_block>> s(swapped, ws, opt);
  CHECK_THROWS_WITH(s.forward([](std::size_t, toy_state&) {}, [](std::size_t, const toy_state&) {}),
                    doctest::Contains("read parameter 'blocks.0.ffn.0.weight' out of order"));

  const one_block_model<whole_only_block> whole_only;
  CHECK_THROWS_WITH((session<one_block_model<whole_only_block>>(whole_only, ws, opt)),
                    doctest::Contains("cannot consume weight chunks"));
}

// The turns that interleave a tick's lanes at chunk boundaries (runtime/lane_turns.hpp). yield says
// whether another lane had the turn: a lane waiting for the others (kv:offload, at a paged layer whose
// slot they still hold) must not spin when none is left.
TEST_CASE("lane_turns: one lane at a time in round robin; yield says whether another lane ran; a failure cancels") {
  lane_turns turns(3);
  std::vector<std::size_t> order;
  std::vector<int> passed(3, -1);
  turns.run(3, [&](std::size_t i) {
    order.push_back(i);
    const bool first = turns.yield(i);
    order.push_back(i);
    if (i == 0) {
      passed[0] = first;             // lanes 1 and 2 ran to their yield
      passed[1] = turns.yield(i);    // lanes 1 and 2 ran to their end
      passed[2] = turns.yield(i);    // nobody left to hand the turn to
    }
  });
  CHECK(order == std::vector<std::size_t>{0, 1, 2, 0, 1, 2});
  CHECK(passed == std::vector<int>{1, 1, 0});
  bool alone = true;
  turns.run(1, [&](std::size_t i) { alone = turns.yield(i); });
  CHECK(!alone);
  // Lane 1 fails while lanes 0 and 2 wait for a turn: they are cancelled, run rethrows lane 1's error.
  std::vector<int> reached(3, 0);
  CHECK_THROWS_WITH(turns.run(3,
                              [&](std::size_t i) {
                                for (int k = 0; k < 4; ++k) {
                                  ++reached[i];
                                  if (i == 1 && k == 2) throw error("lane 1 failed");
                                  turns.yield(i);
                                }
                              }),
                    "lane 1 failed");
  CHECK(reached == std::vector<int>{3, 3, 2});
}
