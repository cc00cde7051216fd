// Live Avatar's streaming S2V DiT sharded under every policy at world sizes 1-5, driven through the
// streaming API (sink, a, b of the recorded stream): bit for bit equal to the unsharded forward
// with the portable GEMM, within tolerance of the official references, the KV cache planned and
// measured as its own category; the cache invariants; a stream that wraps the cache; bf16 weights.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "unshard/io/checkpoint.hpp"
#include "unshard/models/liveavatar/calls.hpp"
#include "unshard/models/liveavatar/count.hpp"
#include "unshard/models/liveavatar/inventory.hpp"
#include "unshard/models/liveavatar/stream.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/runtime/checkpoint_weights.hpp"
#include "unshard/runtime/reference_forward.hpp"
#include "unshard/runtime/synthetic_weights.hpp"

#include "support/sharded_options.hpp"
#include "support/liveavatar_case.hpp"

using namespace unshard;
using namespace unshard::testing;

namespace {

// What a call produces, under the names unshard-avatar writes.
using results = std::map<std::string, std::vector<float>>;

void collect(const s2v::model& m, const s2v::call_spec& c, const s2v::state& s, results& out) {
  const s2v::geometry& g = m.geometry();
  const auto keep = [&](const std::string& n, const tensor_view& v) {
    const auto f = v.as<const float>();
    out[c.name + "." + n].assign(f.begin(), f.end());
  };
  for (std::size_t i = 0; i < g.num_layers; ++i) keep("block." + std::to_string(i) + ".out", m.block_output(s, i));
  if (c.sink) {
    for (std::size_t i = 0; i < g.num_layers; ++i) {
      keep("kv." + std::to_string(i) + ".cond_k", m.cond_cache(s, i, false, g.cond_tokens));
      keep("kv." + std::to_string(i) + ".cond_v", m.cond_cache(s, i, true, g.cond_tokens));
    }
    return;
  }
  keep("output", m.output(s));
  for (std::size_t i = 0; i < g.num_layers; ++i) {
    keep("kv." + std::to_string(i) + ".k", m.noisy_cache(s, s.call.step, i, false, s.call.write_slot, g.block_tokens));
    keep("kv." + std::to_string(i) + ".v", m.noisy_cache(s, s.call.step, i, true, s.call.write_slot, g.block_tokens));
  }
}

template <weight_source S>
results run_reference(const s2v::model& m, const S& w, const stream_case& c) {
  reference_runner<s2v::model> ref(m, w);
  results out;
  for (const auto& call : c.spec.calls) {
    if (call.sink) m.begin_sink(ref.state(), s2v::sink_of(call, c.file));
    else m.begin_step(ref.state(), s2v::step_of(m, call, c.file));
    ref.forward();
    collect(m, call, ref.state(), out);
  }
  return out;
}

// Runs the recorded stream sharded; rank `reader` hands back its results.
template <weight_source S>
results run_sharded(const s2v::model& m, const S& w, const stream_case& c, session_options opt, std::size_t reader) {
  s2v::stream<> st(m, w, opt);
  st.runtime().cap_device_memory(st.runtime().plan().peak_bytes());
  results out;
  for (const auto& call : c.spec.calls) {
    const auto finish = [&](std::size_t rank, const s2v::state& s) {
      if (rank == reader) collect(m, call, s, out);
    };
    if (call.sink) st.sink(s2v::sink_of(call, c.file), finish);
    else st.step(s2v::step_of(m, call, c.file), finish);
  }
  const auto& plan = st.runtime().plan();
  for (std::size_t r = 0; r < opt.world_size; ++r) {
    CAPTURE(r);
    const rank_measurement got = st.runtime().measured(r);
    CHECK(got.peak_bytes <= plan.ranks[r].peak());
    // The caches are allocated once, whole: their measured peak is exactly the planned term.
    CHECK(got.category_peaks[memory_category::kv_cache] == plan.ranks[r].terms[memory_category::kv_cache]);
  }
  return out;
}

bool bit_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("sharded S2V stream: every policy, world sizes 1-5, bit-identical to unsharded and within the references") {
  const stream_case c = load_case("liveavatar_tiny_a");
  const s2v::model m(c.config, c.work, {dtype::f32, gemm_path::portable, true});
  const checkpoint_weights w(c.file);
  const results want = run_reference(m, w, c);
  std::size_t compared = 0;
  for (const auto& [name, v] : want)
    if (c.file.find("ref." + name)) {
      CAPTURE(name);
      CHECK(excess(v, read_f32(c.file, "ref." + name)) <= 1.0);
      ++compared;
    }
  CHECK(compared >= 3 * c.config.num_layers + 2);  // every block output of the three calls and both outputs
  for (const char* pol : {"full", "fsdp", "selective", "selective:subunit", "prefetch:1", "prefetch:2", "offload",
                          "offload+prefetch:2", "chunked:1B", "chunked:4KiB+prefetch:1", "chunked:3000B+offload+prefetch:2"})
    for (std::size_t n = 1; n <= 5; ++n) {
      CAPTURE(pol);
      CAPTURE(n);
      const session_options opt = sharded_options(pol, n);
      const results got = run_sharded(m, w, c, opt, n - 1);
      REQUIRE(got.size() == want.size());
      for (const auto& [name, v] : want) {
        CAPTURE(name);
        CHECK(bit_equal(got.at(name), v));
      }
    }
}

TEST_CASE("S2V KV cache: the ledger plans it as its own term, from the same definitions the planner counts") {
  const stream_case c = load_case("liveavatar_tiny_a");
  const s2v::model m(c.config, c.work, {dtype::f32, gemm_path::portable, true});
  const s2v::geometry& g = m.geometry();
  const memory_plan plan = plan_memory(m, 3, parse_policy("prefetch:1").values);
  const s2v::counts counts = s2v::counts_of(c.config, c.work);
  // cond: layers x cond slots x D x (K, V) f32; noisy the same per step.
  CHECK(counts.cond_cache_bytes == g.num_layers * g.cond_slots * g.dim * 2 * 4);
  CHECK(counts.noisy_cache_bytes == g.num_layers * g.noisy_slots * g.dim * 2 * 4);
  CHECK(plan.ranks[0].terms[memory_category::kv_cache] >= counts.kv_cache_bytes);
  CHECK(plan.ranks[0].terms[memory_category::kv_cache] - counts.kv_cache_bytes < 4 * allocation_alignment);
  CHECK(g.cond_slots == static_cast<std::size_t>(c.spec.kv_cache_sizes.at(1)));
  CHECK(g.noisy_slots == static_cast<std::size_t>(c.spec.kv_cache_sizes.at(0)));

  // The 14B at 720x400: the counts agree with the planner's inventory, derived independently.
  const s2v::config big = s2v::liveavatar_14b_config();
  const s2v::counts b = s2v::counts_of(big, s2v::pipeline_workload(big, 720, 400), 2);
  liveavatar::s2v_config inv_config = liveavatar::liveavatar_14b();
  inv_config.lora_merged = true;
  const liveavatar::s2v_parts inv = liveavatar::s2v_inventory(inv_config);
  CHECK(b.blocks == inv.blocks);
  CHECK(b.injectors == inv.audio_injector);
  CHECK(b.total == inv.total());
  const double gib = 1024.0 * 1024 * 1024;
  const double one_set = static_cast<double>(b.cond_cache_bytes + b.noisy_cache_bytes) / gib;
  MESSAGE("14B: ", b.total, " parameters (blocks ", b.blocks, ", audio injectors ", b.injectors, "); KV at 720x400 in bf16: cond ",
          b.cond_cache_bytes / gib, " GiB + ", b.noisy_cache_bytes / gib, " GiB per denoising step = ", one_set,
          " GiB for one set; all 4 steps ", b.kv_cache_bytes / gib, " GiB");
  CHECK(one_set > 11.5);
  CHECK(one_set < 13.5);
  CHECK_THROWS_AS(s2v::pipeline_workload(big, 720, 404), error);
}

TEST_CASE("S2V KV cache invariants: the sink owns the cond cache; a call writes only its own slots") {
  const stream_case c = load_case("liveavatar_tiny_a");
  const s2v::model m(c.config, c.work, {dtype::f32, gemm_path::portable, true});
  const s2v::geometry& g = m.geometry();
  const checkpoint_weights w(c.file);
  const session_options opt = sharded_options("prefetch:1", 2);
  s2v::stream<> st(m, w, opt);
  const std::size_t cond = g.num_layers * g.cond_slots * g.dim, noisy = g.num_layers * g.noisy_slots * g.dim;
  std::vector<float> cond_after_sink, cond_now, noisy_before, noisy_now;
  const auto snapshot = [&](std::size_t rank, const s2v::state& s) {
    if (rank != 1) return;
    cond_now.assign(s.cond_k, s.cond_k + cond);
    cond_now.insert(cond_now.end(), s.cond_v, s.cond_v + cond);
    noisy_now.assign(s.noisy_k[0], s.noisy_k[0] + noisy);
    noisy_now.insert(noisy_now.end(), s.noisy_v[0], s.noisy_v[0] + noisy);
  };
  CHECK_THROWS_WITH_AS(st.step(s2v::step_of(m, c.spec.calls.at(1), c.file)), doctest::Contains("step before sink"), error);
  st.sink(s2v::sink_of(c.spec.calls.at(0), c.file), snapshot);
  cond_after_sink = cond_now;
  CHECK(std::all_of(noisy_now.begin(), noisy_now.end(), [](float v) { return v == 0.0f; }));  // the sink writes no noisy slot
  for (std::size_t k = 1; k < c.spec.calls.size(); ++k) {
    const s2v::call_spec& call = c.spec.calls[k];
    CAPTURE(call.name);
    noisy_before = noisy_now;
    st.step(s2v::step_of(m, call, c.file), snapshot);
    CHECK(bit_equal(cond_now, cond_after_sink));  // streamed calls never change the cond cache
    const std::size_t first = static_cast<std::size_t>(call.current_start) % g.noisy_slots;
    std::size_t changed_outside = 0, written = 0;
    for (std::size_t half = 0; half < 2; ++half)  // K then V
      for (std::size_t i = 0; i < g.num_layers; ++i)
        for (std::size_t slot = 0; slot < g.noisy_slots; ++slot) {
          const std::size_t at = half * noisy + (i * g.noisy_slots + slot) * g.dim;
          const bool mine = slot >= first && slot < first + g.block_tokens;
          const bool same = std::memcmp(&noisy_now[at], &noisy_before[at], g.dim * sizeof(float)) == 0;
          if (!mine && !same) ++changed_outside;
          if (mine && !same) ++written;
        }
    CHECK(changed_outside == 0);
    CHECK(written == 2 * g.num_layers * g.block_tokens);
  }
  // Slots no call reached stay zero.
  const std::size_t used_end = static_cast<std::size_t>(c.spec.calls.back().current_start) + g.block_tokens;
  for (std::size_t i = 0; i < g.num_layers; ++i)
    for (std::size_t slot = used_end; slot < g.noisy_slots; ++slot)
      for (std::size_t e = 0; e < g.dim; ++e) REQUIRE(noisy_now[(i * g.noisy_slots + slot) * g.dim + e] == 0.0f);
  // A step for a cache the workload does not have is refused before any rank runs it.
  s2v::step_inputs bad = s2v::step_of(m, c.spec.calls.at(1), c.file);
  bad.step = g.steps;
  CHECK_THROWS_WITH_AS(st.step(bad), doctest::Contains("denoising step"), error);
  st.step(s2v::step_of(m, c.spec.calls.at(1), c.file));  // and the session still runs
}

TEST_CASE("S2V stream longer than the cache: wraps, sharded equal to unsharded") {
  stream_case c = load_case("liveavatar_tiny_a");
  const s2v::model probe(c.config, c.work);
  c.work.noisy_cache_tokens = static_cast<std::int64_t>(2 * probe.geometry().block_tokens);
  c.work.denoising_steps = 2;
  const s2v::model m(c.config, c.work, {dtype::f32, gemm_path::portable, true});
  // sink, then blocks 0..4 at steps 0 and 1: from block 2 on every write wraps.
  const s2v::call_spec sink = c.spec.calls.at(0), a = c.spec.calls.at(1), b = c.spec.calls.at(2);
  c.spec.calls = {sink};
  for (std::int64_t block = 0; block < 5; ++block)
    for (std::size_t step = 0; step < 2; ++step) {
      s2v::call_spec call = block % 2 ? b : a;
      call.name = "blk" + std::to_string(block) + "s" + std::to_string(step);
      call.current_start = block * static_cast<std::int64_t>(m.geometry().block_tokens);
      call.step = step;
      call.relative_dist = 4 + (block * 5 + static_cast<std::int64_t>(step)) % 27;
      c.spec.calls.push_back(call);
    }
  const checkpoint_weights w(c.file);
  const results want = run_reference(m, w, c);
  const session_options opt = sharded_options("offload+prefetch:2", 3);
  const results got = run_sharded(m, w, c, opt, 1);
  REQUIRE(got.size() == want.size());
  for (const auto& [name, v] : want) {
    CAPTURE(name);
    CHECK(bit_equal(got.at(name), v));
  }
  // The wrapped calls really differ from an unbounded cache (they no longer see block 0).
  s2v::workload wide = c.work;
  wide.noisy_cache_tokens = static_cast<std::int64_t>(6 * m.geometry().block_tokens);
  const s2v::model mw(c.config, wide, {dtype::f32, gemm_path::portable, true});
  const results unbounded = run_reference(mw, w, c);
  CHECK(bit_equal(unbounded.at("blk1s0.output"), want.at("blk1s0.output")));  // before the wrap: the same
  CHECK(!bit_equal(unbounded.at("blk2s0.output"), want.at("blk2s0.output")));
}

TEST_CASE("S2V bf16 weights: equal an f32-compute run on the same bf16-rounded weights; sharded == unsharded") {
  const stream_case c = load_case("liveavatar_tiny_a");
  const s2v::model m16(c.config, c.work, {dtype::bf16, gemm_path::portable, true});
  const checkpoint_weights w(c.file);
  const results want16 = run_reference(m16, w, c);
  const std::string rounded = write_bf16_rounded(c.file, "unshard_liveavatar_bf16_rounded.safetensors");
  const checkpoint rounded_file = checkpoint::open(rounded);
  const s2v::model m32(c.config, c.work, {dtype::f32, gemm_path::portable, true});
  const results want32 = run_reference(m32, checkpoint_weights(rounded_file), c);
  double worst_ref = 0;
  for (const auto& [name, v] : want16) {
    CAPTURE(name);
    CHECK(excess(v, want32.at(name)) <= 1.0);
    if (c.file.find("ref." + name)) worst_ref = std::max(worst_ref, excess(v, read_f32(c.file, "ref." + name)) * 1e-5);
  }
  const session_options opt = sharded_options("prefetch:1", 3);
  const results got = run_sharded(m16, w, c, opt, 0);
  for (const auto& [name, v] : want16) {
    CAPTURE(name);
    CHECK(bit_equal(got.at(name), v));
  }
  MESSAGE("bf16 weights: worst max|got - f32 reference| / max(1, max|ref|) = ", worst_ref, " (reported, not asserted)");
  std::filesystem::remove(rounded);
}

TEST_CASE("S2V checkpoint that does not match the model is refused, naming the tensor") {
  const stream_case c = load_case("liveavatar_tiny_a");
  s2v::config other = c.config;
  other.audio_inject_layers.push_back(other.num_layers - 1 == other.audio_inject_layers.back() ? 1 : other.num_layers - 1);
  std::sort(other.audio_inject_layers.begin(), other.audio_inject_layers.end());
  other.audio_inject_layers.erase(std::unique(other.audio_inject_layers.begin(), other.audio_inject_layers.end()),
                                  other.audio_inject_layers.end());
  const s2v::model m(other, c.work, {dtype::f32, gemm_path::portable, true});
  const checkpoint_weights w(c.file);
  session_options opt;
  opt.world_size = 2;
  try {
    s2v::stream<> st(m, w, opt);
    FAIL("a checkpoint without the extra injector was accepted");
  } catch (const rank_failure& e) {
    CHECK(std::string(e.what()).find("missing tensor 'audio_injector.") != std::string::npos);
  }
}

TEST_CASE("S2V other sizes: odd grid, short motion clip, other heads and audio tokens; sharded == unsharded") {
  const s2v::config cfg = s2v::config::from_json(
      nlohmann::json{{"dim", 48}, {"ffn_dim", 80}, {"freq_dim", 16}, {"text_dim", 24}, {"text_len", 6}, {"num_heads", 3},
                     {"num_layers", 3}, {"cond_dim", 8}, {"audio_dim", 20}, {"num_audio_token", 2},
                     {"audio_inject_layers", {1}}, {"enable_adain", true}, {"zero_timestep", true},
                     {"enable_motioner", false}, {"enable_framepack", true}},
      "odd config");  // framepack_drop_mode takes the default 'drop': with all three buckets it is the same math
  s2v::workload work;
  work.latent_hw = {10, 18};  // grid 5x9; buckets 2x4 and 1x2 (floors)
  work.frames_per_block = 2;
  work.context_len = 4;
  work.motion_frames = {9, 3};  // 3 motion latent frames: the packer's buffer is mostly zeros
  work.audio_frames = 8;
  work.noisy_cache_tokens = 0;
  work.denoising_steps = 1;
  const s2v::model m(cfg, work, {dtype::f32, gemm_path::portable, true});
  const s2v::geometry& g = m.geometry();
  CHECK(g.cond_tokens == 2 * 45 + 2 * 4 + 4 * 1 * 2);
  const synthetic_weights w(m, 5);
  const auto wave = [](std::size_t n, float f) {
    std::vector<float> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = std::sin(f * static_cast<float>(i));
    return v;
  };
  const std::size_t HW = g.height * g.width;
  auto ref = wave(g.in_dim * HW, 0.03f), motion = wave(16 * 3 * HW, 0.02f), ctx = wave(4 * 24, 0.3f),
       x = wave(g.in_dim * 2 * HW, 0.05f), cond = wave(8 * 2 * HW, 0.07f), audio = wave(25 * 20 * 8, 0.11f),
       t = std::vector<float>{900.f, 300.f};
  const auto v = [](std::vector<float>& d, shape s) { return tensor_view(d.data(), dtype::f32, s); };
  const s2v::sink_inputs sink{v(ref, {16, 1, 10, 18}), v(motion, {16, 3, 10, 18}), v(ctx, {4, 24})};
  const auto step = [&](std::size_t block) {
    return s2v::step_inputs{v(x, {16, 2, 10, 18}), v(t, {2}), v(cond, {8, 2, 10, 18}), v(audio, {25, 20, 8}), v(ctx, {4, 24}),
                           block, 0, 9};
  };
  // Unsharded: 5 blocks through a 4-block cache (the last one wraps).
  std::vector<std::vector<float>> want;
  reference_runner<s2v::model> r(m, w);
  m.begin_sink(r.state(), sink);
  r.forward();
  for (std::size_t b = 0; b < 5; ++b) {
    m.begin_step(r.state(), step(b));
    r.forward();
    const auto o = m.output(r.state()).as<const float>();
    want.emplace_back(o.begin(), o.end());
    for (float e : want.back()) REQUIRE(std::isfinite(e));
  }
  const session_options opt = sharded_options("selective:subunit+prefetch:2", 3);
  s2v::stream<> st(m, w, opt);
  st.runtime().cap_device_memory(st.runtime().plan().peak_bytes());
  st.sink(sink);
  for (std::size_t b = 0; b < 5; ++b) {
    std::vector<float> got;
    st.step(step(b), [&](std::size_t rank, const s2v::state& s) {
      if (rank == 2) got.assign(m.output(s).as<const float>().begin(), m.output(s).as<const float>().end());
    });
    CAPTURE(b);
    CHECK(bit_equal(got, want[b]));
  }
  for (std::size_t rr = 0; rr < 3; ++rr) CHECK(st.runtime().measured(rr).peak_bytes <= st.runtime().plan().ranks[rr].peak());
}
