// Live Avatar's denoising loop (sink, then every block through S Euler steps, one KV cache per
// step): the sampler to the float32 bit, the loop against the official references of
// liveavatar_denoise_a, and the `steps` schedule bit for bit equal to the sequential loop on one
// rank (portable GEMM) for W = 1..5, S = 4 and 2, under every policy; two clips that wrap every
// step cache; the per-rank ledger (own step caches + one cond cache, none on a rank without a step).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "unshard/io/checkpoint.hpp"
#include "unshard/io/json_config.hpp"
#include "unshard/models/liveavatar/denoiser.hpp"
#include "unshard/models/liveavatar/loop_inputs.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/runtime/checkpoint_weights.hpp"
#include "unshard/runtime/session.hpp"

#include "support/liveavatar_case.hpp"
#include "support/reference_checks.hpp"
#include "support/sharded_options.hpp"

using namespace unshard;
using namespace unshard::testing;

namespace {

using outputs = std::map<std::string, std::vector<float>>;

// The public loop the schedule tests run on.
const denoise_case& the_case() {
  static const denoise_case c("liveavatar_denoise_a");
  return c;
}

// A cache view's values as f32 (an f32 or a bf16 cache).
std::vector<float> floats_of(const tensor_view& t) {
  std::vector<float> v(static_cast<std::size_t>(t.numel()));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = t.load(i);
  return v;
}

// The caches after the loop, under the refs' names (ref.kv.step{i}.layer0.k, ref.kv.cond.layer0.v, ...),
// each step's from the lane that runs it, the cond cache from rank 0's.
template <class Session>
void collect_caches(const s2v::model& m, const Session& s, outputs& out) {
  const s2v::geometry& g = m.geometry();
  const std::size_t W = s.world_size();
  for (const bool values : {false, true}) {
    const char* kv = values ? ".v" : ".k";
    for (std::size_t i = 0; i < g.steps; ++i) {
      const s2v::state& st = s.runtime(s.schedule().owner(i, W)).lane(s.schedule().lane_of(i, W));
      out["kv.step" + std::to_string(i) + ".layer0" + kv] = floats_of(m.noisy_cache(st, i, 0, values, 0, g.noisy_slots));
    }
    out["kv.cond.layer0" + std::string(kv)] = floats_of(m.cond_cache(s.runtime(0).lane(0), 0, values, g.cond_tokens));
  }
}

std::string block_name(const s2v::block_result& r) {
  return "clip" + std::to_string(r.clip) + ".block" + std::to_string(r.block);
}

// The loop on `opt`'s world under `kind`: every result rank 0 receives, under the refs' names.
outputs run_loop(const s2v::loop_spec& loop, std::vector<s2v::block> blocks, const session_options& base,
                 schedule_kind kind, gemm_path gemm, bool all_steps, std::vector<rank_measurement>* measured = nullptr,
                 memory_plan* plan = nullptr, const denoise_case& c = the_case(), dtype kv_cache = dtype::f32) {
  s2v::workload work = s2v::loop_workload(loop, c.file);
  s2v::options mo;
  mo.gemm = gemm;
  mo.kv_cache = kv_cache;
  const s2v::model m(c.config, work, mo);
  const checkpoint_weights w(c.file);
  session_options opt = base;
  opt.schedule = kind;
  session<s2v::model> s(m, w, opt);
  s.cap_device_memory(s.plan().peak_bytes());
  s2v::denoiser den(m, s, {loop.sampler, loop.blocks_per_clip, all_steps});
  den.sink(s2v::loop_sink(c.file));
  outputs out;
  den.denoise(blocks, [&](s2v::block_result&& r) {
    const std::string n = block_name(r);
    out[n + ".latent"] = r.latent;
    for (std::size_t i = 0; i < r.noise_pred.size(); ++i) {
      out[n + ".step" + std::to_string(i) + ".noise_pred"] = r.noise_pred[i];
      out[n + ".step" + std::to_string(i) + ".latent"] = r.step_latent[i];
    }
  });
  if (measured)
    for (std::size_t r = 0; r < s.world_size(); ++r) {
      measured->push_back(s.measured(r));
      // Every rank took part in every tick; it computed the sink (if it owns a step) and one
      // forward per owned step and block: fill and drain ticks compute nothing.
      const std::size_t owned = s.schedule().lane_count(r, s.world_size());
      const std::size_t steps_run = kind == schedule_kind::steps ? owned : loop.sampler.steps;
      CHECK(s.runtime(r).forwards() == (owned ? 1 + blocks.size() * steps_run : 0));
      CHECK(den.ticks_run() == 1 + s.schedule().ticks(blocks.size()));
    }
  if (plan) *plan = s.plan();
  collect_caches(m, s, out);
  return out;
}

std::vector<s2v::block> file_blocks(const s2v::loop_spec& loop, const denoise_case& c = the_case()) {
  return s2v::loop_blocks(loop, c.file, 7);
}

}  // namespace

TEST_CASE("sampler: timesteps, sigmas and Euler constants equal the official float32 values bit for bit") {
  const denoise_case& c = the_case();
  const s2v::flow_match_euler f(c.loop.sampler);
  const std::vector<float> t = read_f32(c.file, "input.scheduler.timesteps"), sg = read_f32(c.file, "input.scheduler.sigmas");
  REQUIRE(t.size() == 4);
  REQUIRE(sg.size() == 5);
  for (std::size_t i = 0; i < 4; ++i) CHECK(std::memcmp(&t[i], &f.timesteps()[i], 4) == 0);
  for (std::size_t i = 0; i < 5; ++i) CHECK(std::memcmp(&sg[i], &f.sigmas()[i], 4) == 0);
  // dt_i bit patterns from the README's table.
  const std::uint32_t dt_bits[] = {0xbe11b91c, 0xbe82d65e, 0xbf17dd65, 0xbc124925};
  for (std::size_t i = 0; i < 4; ++i) {
    const float d = f.dt(i);
    std::uint32_t b = 0;
    std::memcpy(&b, &d, 4);
    CHECK(b == dt_bits[i]);
  }
  // Other step counts: the first sigma is 1, the last before 0 is the shifted sigma_min grid end.
  const s2v::flow_match_euler two({1000, 3.0, 2});
  CHECK(two.sigmas().size() == 3);
  CHECK(two.sigmas()[0] == 1.0f);
  CHECK(two.sigmas()[1] == f.sigmas()[3]);
  CHECK_THROWS_WITH_AS(s2v::flow_match_euler({1000, 3.0, 0}), doctest::Contains("at least 1"), error);
}

TEST_CASE("sampler: the Euler update is f32(x + f32(dt * v)), recomputed from the stored latents") {
  const denoise_case& c = the_case();
  const s2v::flow_match_euler f(c.loop.sampler);
  for (std::size_t b = 0; b < 2; ++b)
    for (std::size_t i = 0; i < 4; ++i) {
      const std::string p = "ref.clip0.block" + std::to_string(b) + ".step";
      std::vector<float> x = i == 0 ? read_f32(c.file, "input.clip0.block" + std::to_string(b) + ".noise")
                                    : read_f32(c.file, p + std::to_string(i - 1) + ".latent");
      f.step(i, x, read_f32(c.file, p + std::to_string(i) + ".noise_pred"));
      const std::vector<float> want = read_f32(c.file, p + std::to_string(i) + ".latent");
      CHECK(std::memcmp(x.data(), want.data(), x.size() * 4) == 0);
    }
}

TEST_CASE("relative_dist draws depend on (seed, clip, block, step) only, within randint(4, 30)") {
  const s2v::relative_dist_draws d(2026), e(2027);
  std::vector<int> seen(31, 0);
  std::size_t differ = 0;
  for (std::size_t r = 0; r < 3; ++r)
    for (std::size_t b = 0; b < 8; ++b)
      for (std::size_t s = 0; s < 4; ++s) {
        const auto v = d(r, b, s);
        REQUIRE(v >= 4);
        REQUIRE(v <= 30);
        CHECK(v == d(r, b, s));
        ++seen[static_cast<std::size_t>(v)];
        differ += v != e(r, b, s);
      }
  std::size_t values = 0;
  for (int n : seen) values += n > 0;
  CHECK(values >= 20);  // 96 draws spread over the 27 values
  CHECK(differ > 48);   // another seed, other draws
}

TEST_CASE("the loop matches the official references of every denoising-loop file (sequential, one rank)") {
  const std::vector<std::string> files = liveavatar_files(/*denoise_loops=*/true);
  REQUIRE(!files.empty());
  for (const std::string& file : files) {
    CAPTURE(file);
    const denoise_case c(file);
    const outputs got = run_loop(c.loop, file_blocks(c.loop, c), sharded_options("full", 1), schedule_kind::replicated,
                                 gemm_path::blas, true, nullptr, nullptr, c);
    std::size_t compared = 0;
    for (const auto& name : c.file.names()) {
      if (!name.starts_with("ref.")) continue;
      const auto it = got.find(name.substr(4));
      REQUIRE_MESSAGE(it != got.end(), "no output for " << name);
      const double e = excess(it->second, read_f32(c.file, name));
      INFO(name << " uses " << e << " of the tolerance");
      CHECK(e <= 1.0);
      ++compared;
    }
    // Every block: 4 steps x (noise_pred, latent) + its final latent; the step and cond caches.
    CHECK(compared == c.loop.blocks() * (2 * c.loop.sampler.steps + 1) + 2 * (c.loop.sampler.steps + 1));
  }
}

TEST_CASE("steps schedule: bit for bit the sequential loop, W = 1..5, S = 4, every policy, peaks within plan") {
  const denoise_case& c = the_case();
  const auto blocks = file_blocks(c.loop);
  const outputs want = run_loop(c.loop, blocks, sharded_options("full", 1), schedule_kind::replicated,
                                gemm_path::portable, true);
  for (const char* policy : {"full", "selective", "prefetch:1", "selective:subunit+prefetch:2", "offload+prefetch:1",
                             "chunked:4KiB+prefetch:1", "chunked:3000B+offload+prefetch:2", "fsdp"})
    for (std::size_t world = 1; world <= 5; ++world) {
      CAPTURE(policy);
      CAPTURE(world);
      std::vector<rank_measurement> measured;
      memory_plan plan;
      const outputs got = run_loop(c.loop, blocks, sharded_options(policy, world), schedule_kind::steps,
                                   gemm_path::portable, true, &measured, &plan);
      REQUIRE(got.size() == want.size());
      for (const auto& [name, v] : want) {
        CAPTURE(name);
        REQUIRE(got.count(name));
        CHECK(std::memcmp(got.at(name).data(), v.data(), v.size() * 4) == 0);
      }
      for (std::size_t r = 0; r < world; ++r) CHECK(measured[r].peak_bytes <= plan.ranks[r].peak());
    }
}

TEST_CASE("steps schedule with S = 2 and a replicated run at W = 3 equal the sequential loop") {
  const denoise_case& c = the_case();
  s2v::loop_spec two = c.loop;
  two.sampler.steps = 2;
  auto blocks = file_blocks(two);
  const outputs want = run_loop(two, blocks, sharded_options("full", 1), schedule_kind::replicated, gemm_path::portable, true);
  for (std::size_t world = 1; world <= 5; ++world)
    for (const char* policy : {"prefetch:1", "chunked:4KiB+offload+prefetch:1"}) {
      CAPTURE(policy);
      CAPTURE(world);
      const outputs got = run_loop(two, blocks, sharded_options(policy, world), schedule_kind::steps, gemm_path::portable, true);
      for (const auto& [name, v] : want) CHECK(std::memcmp(got.at(name).data(), v.data(), v.size() * 4) == 0);
    }
  const outputs rep = run_loop(two, blocks, sharded_options("prefetch:1", 3), schedule_kind::replicated, gemm_path::portable, true);
  for (const auto& [name, v] : want) CHECK(std::memcmp(rep.at(name).data(), v.data(), v.size() * 4) == 0);
}

TEST_CASE("two clips wrap every step cache: steps equals the sequential loop bit for bit") {
  const denoise_case& c = the_case();
  s2v::loop_spec loop = c.loop;
  loop.clips = 2;
  // Clip 1 reuses clip 0's inputs with its own draws: its writes land at current_start mod size.
  std::vector<s2v::block> blocks = file_blocks(c.loop);
  const s2v::relative_dist_draws draws(99);
  for (std::size_t b = 0; b < loop.blocks_per_clip; ++b) {
    s2v::block blk = blocks[b];
    blk.clip = 1;
    for (std::size_t s = 0; s < blk.relative_dist.size(); ++s) blk.relative_dist[s] = draws(1, b, s);
    blocks.push_back(blk);
  }
  const outputs want = run_loop(loop, blocks, sharded_options("full", 1), schedule_kind::replicated, gemm_path::portable, false);
  REQUIRE(want.size() == 4 + 2 * 5);  // 4 final latents; the 4 step caches and the cond cache, k and v
  // The wrapped clip computes something else than clip 0 (its cache holds clip 0's keys).
  CHECK(std::memcmp(want.at("clip1.block1.latent").data(), want.at("clip0.block1.latent").data(),
                    want.at("clip0.block1.latent").size() * 4) != 0);
  for (std::size_t world : {1, 2, 4, 5})
    for (const char* policy : {"prefetch:1", "chunked:4KiB+prefetch:1"}) {
      CAPTURE(world);
      CAPTURE(policy);
      const outputs got = run_loop(loop, blocks, sharded_options(policy, world), schedule_kind::steps, gemm_path::portable, false);
      for (const auto& [name, v] : want) CHECK(std::memcmp(got.at(name).data(), v.data(), v.size() * 4) == 0);
    }
}

TEST_CASE("ledger under steps: a rank holds its own steps' caches and one cond cache, none without a step") {
  const denoise_case& c = the_case();
  const s2v::model m(c.config, s2v::loop_workload(c.loop, c.file));
  const s2v::geometry& g = m.geometry();
  const std::size_t step_cache = 2 * align_up(g.num_layers * g.noisy_slots * g.dim * 4);
  const std::size_t cond_cache = 2 * align_up(g.num_layers * g.cond_slots * g.dim * 4) + align_up(4);
  const policy_values p = parse_policy("prefetch:1").values;
  for (std::size_t world = 1; world <= 6; ++world) {
    CAPTURE(world);
    const memory_plan steps = plan_memory(m, world, p, 0, schedule{schedule_kind::steps, 4});
    const memory_plan rep = plan_memory(m, world, p, 0, schedule{schedule_kind::replicated, 4});
    for (std::size_t r = 0; r < world; ++r) {
      const std::size_t owned = r < 4 ? (4 - r + world - 1) / world : 0;
      CHECK(steps.ranks[r].terms[memory_category::kv_cache] == owned * step_cache + (owned ? cond_cache : 0));
      CHECK(rep.ranks[r].terms[memory_category::kv_cache] == 4 * step_cache + cond_cache);
      // Activations and workspace: one set per lane (forward of a tick).
      CHECK(steps.ranks[r].terms[memory_category::activations] == owned * rep.ranks[r].terms[memory_category::activations]);
      CHECK(steps.ranks[r].terms[memory_category::shards] == rep.ranks[r].terms[memory_category::shards]);
    }
  }
  CHECK_THROWS_WITH_AS(plan_memory(m, 2, p, 0, schedule{schedule_kind::steps, 0}), doctest::Contains("at least 1"), error);
  CHECK_THROWS_WITH_AS(plan_memory(m, 2, p, 0, schedule{schedule_kind::steps, 3}), doctest::Contains("4 denoising steps"),
                       error);
}

// The official caches are bf16 (torch.zeros(..., dtype=bfloat16)); ours may be too: half the
// kv_cache term, each key and value rounded to nearest even once, when it is written.
TEST_CASE("a bf16 KV cache: half the kv_cache term, the caches rounded once, latents within the bf16 bound") {
  const denoise_case& c = the_case();
  const auto blocks = file_blocks(c.loop);
  memory_plan p32, p16;
  const outputs f32 = run_loop(c.loop, blocks, sharded_options("full", 1), schedule_kind::replicated, gemm_path::portable,
                               true, nullptr, &p32);
  const outputs b16 = run_loop(c.loop, blocks, sharded_options("prefetch:1", 2), schedule_kind::steps,
                               gemm_path::portable, true, nullptr, &p16, c, dtype::bf16);
  // The ledger: every cache at half its bytes (the cond length slot stays one f32), plus the host
  // attention's f32 widening scratch as workspace.
  const std::size_t kv32 = p32.ranks[0].terms[memory_category::kv_cache];
  const memory_plan p16w1 = [&] {
    s2v::options mo;
    mo.kv_cache = dtype::bf16;
    const s2v::model m(c.config, s2v::loop_workload(c.loop, c.file), mo);
    return plan_memory(m, 1, parse_policy("full").values, 0, schedule{schedule_kind::replicated, 4});
  }();
  const std::size_t kv16 = p16w1.ranks[0].terms[memory_category::kv_cache];
  CHECK(kv16 < kv32 / 2 + 4096);
  CHECK(kv16 > kv32 / 2 - 4096);
  // The sink writes the cond cache from the same f32 keys and values in both runs: the bf16 cache
  // holds exactly their rounding.
  for (const char* kv : {".k", ".v"}) {
    const std::vector<float>& a = f32.at(std::string("kv.cond.layer0") + kv);
    const std::vector<float>& b = b16.at(std::string("kv.cond.layer0") + kv);
    REQUIRE(a.size() == b.size());
    std::size_t differ = 0;
    for (std::size_t i = 0; i < a.size(); ++i) differ += bf16::from_float(a[i]).to_float() != b[i];
    CHECK(differ == 0);
  }
  // The latents: bf16 keys and values (relative error <= 2^-9 each) move an attention output by
  // at most about that much of its magnitude, and the softmax averages the roundings down; the
  // final latents stay within 1e-3 of max|latent|, half a bf16 rounding of the largest latent
  // (measured on these vectors: 7.1e-5 of 3.64, i.e. 2e-5). A cache read as the wrong type, or at
  // the wrong offset, is off by O(1).
  for (const auto& [name, want] : f32) {
    if (!name.ends_with(".latent") || name.find(".step") != std::string::npos) continue;
    const std::vector<float>& got = b16.at(name);
    double worst = 0, scale = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
      worst = std::max(worst, std::abs(static_cast<double>(got[i]) - want[i]));
      scale = std::max(scale, std::abs(static_cast<double>(want[i])));
    }
    INFO(name << ": max |bf16 cache - f32 cache| = " << worst << " of max |latent| " << scale);
    CHECK(worst <= 1e-3 * scale);
    CHECK(worst > 0);  // the caches were bf16: the run differs
  }
}

TEST_CASE("the denoiser refuses a block before the sink, wrong draws, and a sampler that disagrees with the caches") {
  const denoise_case& c = the_case();
  const s2v::model m(c.config, s2v::loop_workload(c.loop, c.file));
  const checkpoint_weights w(c.file);
  session_options opt = sharded_options("prefetch:1", 2);
  opt.schedule = schedule_kind::steps;
  session<s2v::model> s(m, w, opt);
  auto blocks = file_blocks(c.loop);
  s2v::denoiser den(m, s, {c.loop.sampler, c.loop.blocks_per_clip, false});
  CHECK_THROWS_WITH_AS(den.denoise_block(blocks[0]), doctest::Contains("before sink"), error);
  den.sink(s2v::loop_sink(c.file));
  blocks[0].relative_dist.pop_back();
  CHECK_THROWS_WITH_AS(den.denoise_block(blocks[0]), doctest::Contains("relative_dist draws"), error);
  blocks[1].block = 7;
  CHECK_THROWS_WITH_AS(den.denoise_block(blocks[1]), doctest::Contains("past the clip"), error);
  s2v::flow_match_config three = c.loop.sampler;
  three.steps = 3;
  CHECK_THROWS_WITH_AS(s2v::denoiser(m, s, {three, 2, false}), doctest::Contains("noisy caches"), error);
}

TEST_CASE("a rank that fails in the middle of a tick makes every rank fail with an error naming it") {
  const denoise_case& c = the_case();
  const s2v::model m(c.config, s2v::loop_workload(c.loop, c.file));
  const checkpoint_weights w(c.file);
  for (const char* where : {"prepare", "transfer"}) {
    CAPTURE(where);
    session_options opt = sharded_options("chunked:4KiB+prefetch:1", 3);
    opt.schedule = schedule_kind::steps;
    session<s2v::model> s(m, w, opt);
    std::vector<std::vector<transfer_message>> lists(3);
    const std::string what = where;
    const auto run_tick = [&] {
      s.tick(
          [&](std::size_t r, std::size_t, s2v::state&) {
            if (what == "prepare" && r == 2) throw error("injected failure on rank 2");
            return false;
          },
          [](std::size_t, std::size_t, s2v::state&) {},
          [&](std::size_t r, std::span<s2v::state> lanes) -> const std::vector<transfer_message>& {
            // Rank 1 sends to rank 0; rank 2 fails while ranks 0 and 1 wait in the transfer.
            if (what == "transfer" && r == 2) throw error("injected failure on rank 2");
            lists[r] = {{1, 0, 64, r == 1 ? reinterpret_cast<const std::byte*>(lanes[0].input_x) : nullptr,
                         r == 0 ? reinterpret_cast<std::byte*>(lanes[0].input_x) : nullptr}};
            return lists[r];
          });
    };
    CHECK_THROWS_WITH_AS(run_tick(), doctest::Contains("rank 2"), rank_failure);
    CHECK_THROWS_WITH_AS(run_tick(), doctest::Contains("cannot run again"), error);
  }
}
