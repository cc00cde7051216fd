// KV-cache placement as a policy term (issue 15 item 2): under `kv:offload[:K]` the paged buffers
// (Live Avatar's caches, one page per block) live whole in host memory and each block's pages stream
// through K+1 device slots. The denoising loop gives latents and caches bit-identical to `kv:device`
// (portable GEMM) under several weight policies, both schedules and both cache types; the ledger's
// kv term is (K+1) x the pages of a tick's forwards and its host term the whole caches; measured
// peaks stay within the plan and below the kv:device plan; Wan (no paged buffers) runs unchanged.
// With chunked unshard (the lanes of a tick take turns at chunk boundaries on threads of their own)
// the same holds, with the same page traffic as without chunked.
#include <doctest/doctest.h>

#include <cstring>
#include <map>
#include <optional>
#include <tuple>
#include <string>
#include <vector>

#include "unshard/io/checkpoint.hpp"
#include "unshard/io/json_config.hpp"
#include "unshard/models/liveavatar/denoiser.hpp"
#include "unshard/models/liveavatar/loop_inputs.hpp"
#include "unshard/models/wan/model.hpp"
#include "unshard/plan/liveavatar/search.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/runtime/checkpoint_weights.hpp"
#include "unshard/runtime/session.hpp"

#include "support/allocation_count.hpp"
#include "support/liveavatar_case.hpp"
#include "support/reference_checks.hpp"
#include "support/sharded_options.hpp"
#include "support/wan_case.hpp"

using namespace unshard;
using namespace unshard::testing;

namespace {

using outputs = std::map<std::string, std::vector<float>>;

const denoise_case& the_case() {
  static const denoise_case c("liveavatar_denoise_a");
  return c;
}

s2v::model make_model(dtype kv_cache) {
  const denoise_case& c = the_case();
  s2v::options mo;
  mo.gemm = gemm_path::portable;
  mo.kv_cache = kv_cache;
  return s2v::model(c.config, s2v::loop_workload(c.loop, c.file), mo);
}

// A cache view's bytes (f32 or bf16 values, compared as stored).
std::vector<float> bytes_of(const tensor_view& t) {
  const std::size_t bytes = static_cast<std::size_t>(t.numel()) * size_of(t.type());
  std::vector<float> v((bytes + 3) / 4, 0.0f);
  std::memcpy(v.data(), t.data(), bytes);
  return v;
}

struct run_result {
  outputs out;
  memory_plan plan;
  std::vector<rank_measurement> measured;
  std::vector<std::size_t> bytes_in, bytes_out, forwards;
};

// The loop (sink, then every block of the file through its 4 steps) under `policy` at `world`
// ranks: the final latents, every step's latent, and every layer of every cache, from the lane that
// holds it, as stored (bytes).
// `resident_below`: if set, the policy's resident-parameter threshold (weights below it are not streamed).
run_result run_loop(const std::string& policy, std::size_t world, schedule_kind kind, dtype kv_cache = dtype::f32,
                    std::optional<std::size_t> resident_below = std::nullopt) {
  const denoise_case& c = the_case();
  const s2v::model m = make_model(kv_cache);
  const s2v::geometry& g = m.geometry();
  const checkpoint_weights w(c.file);
  session_options opt = sharded_options(policy, world);
  opt.schedule = kind;
  if (resident_below) opt.policy.resident_below_bytes = *resident_below;
  session<s2v::model> s(m, w, opt);
  s.cap_device_memory(s.plan().peak_bytes());
  s2v::denoiser den(m, s, {c.loop.sampler, c.loop.blocks_per_clip, true});
  den.sink(s2v::loop_sink(c.file));
  run_result r;
  den.denoise(s2v::loop_blocks(c.loop, c.file, 7), [&](s2v::block_result&& b) {
    const std::string n = "clip" + std::to_string(b.clip) + ".block" + std::to_string(b.block);
    r.out[n + ".latent"] = b.latent;
    for (std::size_t i = 0; i < b.step_latent.size(); ++i) r.out[n + ".step" + std::to_string(i) + ".latent"] = b.step_latent[i];
  });
  for (std::size_t layer = 0; layer < g.num_layers; ++layer)
    for (const bool values : {false, true}) {
      const std::string kv = std::string(".layer") + std::to_string(layer) + (values ? ".v" : ".k");
      for (std::size_t i = 0; i < g.steps; ++i) {
        const s2v::state& st = s.runtime(s.schedule().owner(i, world)).lane(s.schedule().lane_of(i, world));
        r.out["kv.step" + std::to_string(i) + kv] = bytes_of(m.noisy_cache(st, i, layer, values, 0, g.noisy_slots));
      }
      for (std::size_t rank = 0; rank < world; ++rank)
        if (s.runtime(rank).lane_count())
          r.out["kv.cond.rank" + std::to_string(rank) + kv] =
              bytes_of(m.cond_cache(s.runtime(rank).lane(0), layer, values, g.cond_slots));
    }
  r.plan = s.plan();
  for (std::size_t rank = 0; rank < world; ++rank) {
    r.measured.push_back(s.measured(rank));
    r.bytes_in.push_back(s.runtime(rank).kv_bytes_in());
    r.bytes_out.push_back(s.runtime(rank).kv_bytes_out());
    r.forwards.push_back(s.runtime(rank).forwards());
  }
  return r;
}

// The cond caches as rank 0 holds them (every rank's are equal; a run at another world size
// still has a rank 0 with a lane).
void check_equal(const outputs& got, const outputs& want) {
  for (const auto& [name, v] : want) {
    if (name.starts_with("kv.cond.rank") && !name.starts_with("kv.cond.rank0")) continue;
    CAPTURE(name);
    REQUIRE(got.count(name));
    REQUIRE(got.at(name).size() == v.size());
    CHECK(std::memcmp(got.at(name).data(), v.data(), v.size() * 4) == 0);
  }
  for (const auto& [name, v] : got)
    if (name.starts_with("kv.cond.rank")) {
      CAPTURE(name);
      const std::string rank0 = "kv.cond.rank0" + name.substr(name.find(".layer"));
      CHECK(std::memcmp(v.data(), want.at(rank0).data(), v.size() * 4) == 0);
    }
}

// Bytes of one page (one block's rows) of a noisy and of a cond cache.
struct pages {
  std::size_t noisy, cond, noisy_whole, cond_whole;
};
pages pages_of(const s2v::geometry& g) {
  const std::size_t row = g.dim * size_of(g.kv_type);
  return {g.noisy_slots * row, g.cond_slots * row, g.num_layers * g.noisy_slots * row, g.num_layers * g.cond_slots * row};
}

}  // namespace

TEST_CASE("kv:offload: the denoising loop is bit-identical to kv:device, every weight policy, both schedules") {
  const run_result want = run_loop("prefetch:1", 1, schedule_kind::replicated);
  for (const char* weights : {"prefetch:1", "offload+prefetch:1", "selective:subunit+prefetch:2"})
    for (const char* kv : {"kv:offload", "kv:offload:2"})
      for (const auto& [kind, world] : std::vector<std::pair<schedule_kind, std::size_t>>{
               {schedule_kind::steps, 1}, {schedule_kind::steps, 2}, {schedule_kind::steps, 3},
               {schedule_kind::replicated, 1}, {schedule_kind::replicated, 2}}) {
        const std::string policy = std::string(weights) + "+" + kv;
        CAPTURE(policy);
        CAPTURE(name_of(kind));
        CAPTURE(world);
        const run_result got = run_loop(policy, world, kind);
        check_equal(got.out, want.out);
        // The same weights and schedule with the caches on the device: the plan this one beats.
        const memory_plan device = plan_memory(make_model(dtype::f32), world, parse_policy(weights).values, 0,
                                               schedule{kind, 4});
        for (std::size_t r = 0; r < world; ++r) {
          CAPTURE(r);
          CHECK(got.measured[r].peak_bytes <= got.plan.ranks[r].peak());
          CHECK(got.measured[r].host_peak_bytes <= got.plan.ranks[r].host_bytes);
          CHECK(got.measured[r].category_peaks[memory_category::kv_cache] == got.plan.ranks[r].terms[memory_category::kv_cache]);
          if (got.forwards[r]) {
            CHECK(got.plan.ranks[r].peak() < device.ranks[r].peak());
            CHECK(got.measured[r].peak_bytes < device.ranks[r].peak());
            CHECK(got.bytes_in[r] > 0);
          } else {
            CHECK(got.bytes_in[r] + got.bytes_out[r] == 0);  // a rank without a step holds no cache
          }
        }
      }
}

TEST_CASE("kv:offload: the bytes written back are exactly the calls' new rows; the reads at most the pages") {
  const s2v::model m = make_model(dtype::f32);
  const s2v::geometry& g = m.geometry();
  const std::size_t row = g.dim * 4, blocks = the_case().loop.blocks();
  for (const std::size_t world : {1, 2, 3}) {
    CAPTURE(world);
    const run_result r = run_loop("prefetch:1+kv:offload", world, schedule_kind::steps);
    for (std::size_t rank = 0; rank < world; ++rank) {
      const std::size_t owned = schedule{schedule_kind::steps, 4}.lane_count(rank, world);
      if (!owned) continue;
      // The sink writes the cond tokens' keys and values of every block; each streamed call its
      // block's L rows of its step's caches, k and v.
      const std::size_t sink = 2 * g.num_layers * g.cond_tokens * row;
      const std::size_t per_call = 2 * g.num_layers * g.block_tokens * row;
      CHECK(r.bytes_out[rank] == sink + owned * blocks * per_call);
      // A streamed call reads the cond rows (once per tick, shared by the lanes) and the slots it
      // attends; never more than whole pages.
      CHECK(r.bytes_in[rank] <= owned * blocks * 2 * g.num_layers * (g.cond_slots + g.noisy_slots) * row);
      CHECK(r.bytes_in[rank] >= blocks * 2 * g.num_layers * g.cond_tokens * row);
      MESSAGE("steps W=" << world << " rank " << rank << ": " << r.forwards[rank] << " forwards, " << r.bytes_in[rank]
                         << " bytes in, " << r.bytes_out[rank] << " bytes out (" << per_call
                         << " written back per streamed forward, sink " << sink << ")");
    }
  }
}

TEST_CASE("kv:offload ledger: the kv term is (K+1) pages of a tick's forwards, the host term the whole caches") {
  for (const dtype kv_type : {dtype::f32, dtype::bf16}) {
    CAPTURE(name_of(kv_type));
    const s2v::model m = make_model(kv_type);
    const pages p = pages_of(m.geometry());
    const std::size_t cond_end = align_up(4);
    for (const std::size_t K : {1, 2, 3})
      for (std::size_t world = 1; world <= 5; ++world) {
        CAPTURE(K);
        CAPTURE(world);
        const policy_values pol = parse_policy("prefetch:1+kv:offload:" + std::to_string(K)).values;
        const policy_values dev = parse_policy("prefetch:1").values;
        const memory_plan steps = plan_memory(m, world, pol, 0, schedule{schedule_kind::steps, 4});
        const memory_plan rep = plan_memory(m, world, pol, 0, schedule{schedule_kind::replicated, 4});
        const memory_plan steps_dev = plan_memory(m, world, dev, 0, schedule{schedule_kind::steps, 4});
        const memory_plan rep_dev = plan_memory(m, world, dev, 0, schedule{schedule_kind::replicated, 4});
        for (std::size_t r = 0; r < world; ++r) {
          CAPTURE(r);
          const std::size_t owned = r < 4 ? (4 - r + world - 1) / world : 0;
          // Steps: a ring per cond cache (shared by the lanes) and a ring per lane for its step's k and v.
          const std::size_t steps_kv = owned ? (K + 1) * (2 * align_up(p.cond) + owned * 2 * align_up(p.noisy)) + cond_end : 0;
          const std::size_t steps_host = owned ? 2 * align_up(p.cond_whole) + owned * 2 * align_up(p.noisy_whole) : 0;
          CHECK(steps.ranks[r].terms[memory_category::kv_cache] == steps_kv);
          CHECK(steps.ranks[r].host_bytes == steps_host);
          // Replicated: one lane holds every step's caches and runs one step per forward, so its
          // steps take turns in one ring for k and one for v.
          CHECK(rep.ranks[r].terms[memory_category::kv_cache] == (K + 1) * (2 * align_up(p.cond) + 2 * align_up(p.noisy)) + cond_end);
          CHECK(rep.ranks[r].host_bytes == 2 * align_up(p.cond_whole) + 4 * 2 * align_up(p.noisy_whole));
          // Everything else is the kv:device plan's; the device caches moved to the host.
          for (const auto c : all_memory_categories) {
            if (c == memory_category::kv_cache) continue;
            CHECK(steps.ranks[r].terms[c] == steps_dev.ranks[r].terms[c]);
            CHECK(rep.ranks[r].terms[c] == rep_dev.ranks[r].terms[c]);
          }
          CHECK(steps_dev.ranks[r].terms[memory_category::kv_cache] == (owned ? steps_host + cond_end : 0));
          CHECK(rep_dev.ranks[r].terms[memory_category::kv_cache] == rep.ranks[r].host_bytes + cond_end);
          if (K == 1 && world <= 3)
            MESSAGE(name_of(kv_type) << " K=" << K << " steps W=" << world << " rank " << r << ": kv term "
                                     << steps.ranks[r].terms[memory_category::kv_cache] << " (kv:device "
                                     << steps_dev.ranks[r].terms[memory_category::kv_cache] << "), host "
                                     << steps.ranks[r].host_bytes);
        }
      }
  }
}

TEST_CASE("kv:offload with bf16 caches: bit-identical to bf16 caches on the device") {
  const run_result want = run_loop("prefetch:1", 1, schedule_kind::replicated, dtype::bf16);
  for (const auto& [policy, kind, world] : std::vector<std::tuple<const char*, schedule_kind, std::size_t>>{
           {"prefetch:1+kv:offload", schedule_kind::steps, 2},
           {"offload+prefetch:1+kv:offload:2", schedule_kind::steps, 3},
           {"selective:subunit+prefetch:2+kv:offload", schedule_kind::replicated, 1}}) {
    CAPTURE(policy);
    CAPTURE(world);
    const run_result got = run_loop(policy, world, kind, dtype::bf16);
    check_equal(got.out, want.out);
    for (std::size_t r = 0; r < world; ++r) {
      CHECK(got.measured[r].peak_bytes <= got.plan.ranks[r].peak());
      CHECK(got.measured[r].host_peak_bytes <= got.plan.ranks[r].host_bytes);
    }
  }
}

TEST_CASE("kv:offload: a tick allocates nothing; the caches' host copies are current after it") {
  const denoise_case& c = the_case();
  const s2v::model m = make_model(dtype::f32);
  const checkpoint_weights w(c.file);
  session_options opt = sharded_options("prefetch:1+kv:offload", 2);
  opt.schedule = schedule_kind::steps;
  session<s2v::model> s(m, w, opt);
  s.cap_device_memory(s.plan().peak_bytes());
  s2v::denoiser den(m, s, {c.loop.sampler, c.loop.blocks_per_clip, false});
  den.sink(s2v::loop_sink(c.file));
  // The sink wrote the cond caches through the device slots; the host copies hold them now.
  const s2v::geometry& g = m.geometry();
  const tensor_view ck = m.cond_cache(s.runtime(0).lane(0), g.num_layers - 1, false, g.cond_tokens);
  bool nonzero = false;
  for (std::size_t i = 0; i < static_cast<std::size_t>(ck.numel()) && !nonzero; ++i) nonzero = ck.load(i) != 0.0f;
  CHECK(nonzero);
  // Ticks in which every lane runs block 0 of its step (a forward with page copies in and out).
  const std::vector<s2v::block> blocks = s2v::loop_blocks(c.loop, c.file, 7);
  const s2v::block& b = blocks[0];
  const std::vector<float> t(g.frames, 500.0f);
  const tensor_view context = s2v::loop_sink(c.file).context;
  const std::vector<transfer_message> none;
  const auto tick = [&] {
    s.tick(
        [&](std::size_t, std::size_t, s2v::state& st) {
          s2v::step_inputs in;
          in.x = b.noise;
          in.t = tensor_view(const_cast<float*>(t.data()), dtype::f32, shape{static_cast<std::int64_t>(g.frames)});
          in.cond_states = b.cond_states;
          in.audio = b.audio;
          in.context = context;
          in.step = st.noisy_k[0] ? 0 : st.noisy_k[1] ? 1 : st.noisy_k[2] ? 2 : 3;
          m.begin_step(st, in);
          return true;
        },
        [](std::size_t, std::size_t, s2v::state&) {},
        [&](std::size_t, std::span<s2v::state>) -> const std::vector<transfer_message>& { return none; });
  };
  tick();
  const std::size_t in0 = s.runtime(0).kv_bytes_in(), out0 = s.runtime(0).kv_bytes_out();
  const std::size_t before = allocation_count.load();
  tick();
  CHECK(allocation_count.load() == before);
  CHECK(s.runtime(0).kv_bytes_in() > in0);
  CHECK(s.runtime(0).kv_bytes_out() > out0);
}

namespace {

const std::vector<std::pair<schedule_kind, std::size_t>>& schedules() {
  static const std::vector<std::pair<schedule_kind, std::size_t>> s{{schedule_kind::steps, 1},
                                                                    {schedule_kind::steps, 2},
                                                                    {schedule_kind::steps, 3},
                                                                    {schedule_kind::replicated, 1},
                                                                    {schedule_kind::replicated, 2}};
  return s;
}

// A chunked kv:offload run against its kv:device twin (same weight policy) and the same placement
// without chunked (`plain`): the same bits, the same page traffic per rank, a plan that is exactly
// what was allocated (kv and gathered terms measured = planned; every other term as kv:device's).
void check_chunked_run(const run_result& got, const run_result& want, const run_result& plain,
                       const policy_values& weights, std::size_t world, schedule_kind kind, dtype kv_type) {
  check_equal(got.out, want.out);
  const memory_plan device = plan_memory(make_model(kv_type), world, weights, 0, schedule{kind, 4});
  for (std::size_t r = 0; r < world; ++r) {
    CAPTURE(r);
    const rank_plan& p = got.plan.ranks[r];
    CHECK(got.measured[r].peak_bytes <= p.peak());
    CHECK(got.measured[r].peak_bytes == p.peak());  // tight: the plan is what was allocated
    CHECK(got.measured[r].host_peak_bytes <= p.host_bytes);
    CHECK(got.measured[r].category_peaks[memory_category::kv_cache] == p.terms[memory_category::kv_cache]);
    CHECK(got.measured[r].category_peaks[memory_category::gathered] == p.terms[memory_category::gathered]);
    // The kv term and the caches' host bytes are the unchunked placement's; the rest kv:device's.
    CHECK(p.terms[memory_category::kv_cache] == plain.plan.ranks[r].terms[memory_category::kv_cache]);
    CHECK(p.host_bytes - device.ranks[r].host_bytes == plain.plan.ranks[r].host_bytes);
    for (const auto c : all_memory_categories)
      if (c != memory_category::kv_cache) CHECK(p.terms[c] == device.ranks[r].terms[c]);
    CHECK(got.bytes_in[r] == plain.bytes_in[r]);
    CHECK(got.bytes_out[r] == plain.bytes_out[r]);
    CHECK(got.forwards[r] == plain.forwards[r]);
    if (got.forwards[r]) {
      CHECK(got.bytes_in[r] > 0);
      CHECK(p.peak() < device.ranks[r].peak());
    }
  }
}

void chunked_kv_offload_matrix(dtype kv_type) {
  // The caches' traffic does not depend on how weights are gathered: one unchunked run per placement.
  std::map<std::tuple<std::string, schedule_kind, std::size_t>, run_result> plain;
  // 1B: one row per chunk; 4KiB: a weight in runs of rows; 1MiB: whole weights grouped per sub-unit.
  for (const char* size : {"1B", "4KiB", "1MiB"})
    for (const std::size_t K : {1, 2}) {
      const std::string weights = std::string("chunked:") + size + "+prefetch:" + std::to_string(K);
      const run_result want = run_loop(weights, 1, schedule_kind::replicated, kv_type);
      for (const char* kv : {"kv:offload", "kv:offload:2"})
        for (const auto& [kind, world] : schedules()) {
          const std::string policy = weights + "+" + kv;
          CAPTURE(policy);
          CAPTURE(name_of(kind));
          CAPTURE(world);
          const auto key = std::tuple{std::string(kv), kind, world};
          if (!plain.count(key)) plain.emplace(key, run_loop(std::string("prefetch:1+") + kv, world, kind, kv_type));
          const run_result got = run_loop(policy, world, kind, kv_type);
          check_chunked_run(got, want, plain.at(key), parse_policy(weights).values, world, kind, kv_type);
        }
    }
}

}  // namespace

// Issue 15 item 2 with chunked unshard: the lanes of a tick run on threads of their own, taking turns
// at chunk boundaries; the first to reach a paged layer brings its pages in for all, the last to
// leave it writes them back.
TEST_CASE("kv:offload with chunked unshard: bit-identical to kv:device, the same page traffic, the plan allocated") {
  // Chunked and whole-unit gathers give the same bits (portable GEMM): the reference of the matrix.
  const run_result whole = run_loop("prefetch:1", 1, schedule_kind::replicated);
  check_equal(run_loop("chunked:4KiB+prefetch:1", 1, schedule_kind::replicated).out, whole.out);
  chunked_kv_offload_matrix(dtype::f32);
}

TEST_CASE("kv:offload with chunked unshard and bf16 caches: bit-identical to bf16 caches on the device") {
  chunked_kv_offload_matrix(dtype::bf16);
}

TEST_CASE("kv:offload with chunked unshard and shards offloaded: bit-identical, same traffic") {
  const std::string weights = "chunked:3000B+offload+prefetch:1";
  const run_result want = run_loop(weights, 1, schedule_kind::replicated);
  for (const auto& [kind, world] : schedules()) {
    CAPTURE(name_of(kind));
    CAPTURE(world);
    const run_result plain = run_loop("offload+prefetch:1+kv:offload:2", world, kind);
    const run_result got = run_loop(weights + "+kv:offload:2", world, kind);
    // The plain run offloads its shards too: compare the caches' part of the host term.
    run_result plain_caches = plain;
    const memory_plan plain_device =
        plan_memory(make_model(dtype::f32), world, parse_policy("offload+prefetch:1").values, 0, schedule{kind, 4});
    for (std::size_t r = 0; r < world; ++r) plain_caches.plan.ranks[r].host_bytes -= plain_device.ranks[r].host_bytes;
    check_chunked_run(got, want, plain_caches, parse_policy(weights).values, world, kind, dtype::f32);
  }
}

// Paged layers without a chunk (their weights kept resident): a lane crosses several layers without
// a turn, so the first lane to reach layer i can find its slot still held by layer i-K-1, which the
// lanes behind it have not left; it hands them the turn until they have.
TEST_CASE("kv:offload with chunked unshard: paged layers without chunks, lanes hand the turn on at a layer") {
  constexpr std::size_t resident_below = std::size_t{1} << 20;
  {
    policy_values v = parse_policy("chunked:4KiB+prefetch:1").values;
    v.resident_below_bytes = resident_below;
    const s2v::model m = make_model(dtype::f32);
    std::size_t paged = 0;
    for (const unit_layout& u : build_units(m, 2, v))
      if (m.page_of_layer(u.info.layer)) {
        ++paged;
        CHECK(u.chunks.empty());
      }
    REQUIRE(paged == m.geometry().num_layers);
  }
  for (const dtype kv_type : {dtype::f32, dtype::bf16})
    for (const char* weights : {"chunked:4KiB+prefetch:1", "chunked:1B+prefetch:2"}) {
      const run_result want = run_loop(weights, 1, schedule_kind::replicated, kv_type, resident_below);
      for (const char* kv : {"kv:offload", "kv:offload:2"})
        for (const auto& [kind, world] : schedules()) {
          const std::string policy = std::string(weights) + "+" + kv;
          CAPTURE(policy);
          CAPTURE(name_of(kind));
          CAPTURE(world);
          CAPTURE(name_of(kv_type));
          const run_result plain = run_loop(std::string("prefetch:1+") + kv, world, kind, kv_type);
          const run_result got = run_loop(policy, world, kind, kv_type, resident_below);
          check_equal(got.out, want.out);
          for (std::size_t r = 0; r < world; ++r) {
            CAPTURE(r);
            CHECK(got.measured[r].peak_bytes <= got.plan.ranks[r].peak());
            CHECK(got.measured[r].peak_bytes == got.plan.ranks[r].peak());
            CHECK(got.measured[r].category_peaks[memory_category::kv_cache] ==
                  got.plan.ranks[r].terms[memory_category::kv_cache]);
            CHECK(got.bytes_in[r] == plain.bytes_in[r]);
            CHECK(got.bytes_out[r] == plain.bytes_out[r]);
          }
        }
    }
}

namespace {
// The S2V model whose step-2 forward throws in one layer: a lane failing in the middle of a chunked
// kv:offload tick, while the other lanes wait for their turn or for a page.
struct failing_layer {
  const s2v::layer* inner;
  bool fails;
  std::string name() const { return inner->name(); }
  std::size_t subunit_count() const { return inner->subunit_count(); }
  std::string subunit_name(std::size_t sub) const { return inner->subunit_name(sub); }
  std::vector<param_spec> parameters(std::size_t sub) const { return inner->parameters(sub); }
  void check(const s2v::state& s) const {
    if (fails && s.call.kind == s2v::call_kind::stream && s.call.step == 2)
      throw_error("injected failure in ", name(), " of step 2");
  }
  void forward(std::size_t sub, const param_views& v, s2v::state& s) const {
    check(s);
    inner->forward(sub, v, s);
  }
  template <param_source P>
  void forward(std::size_t sub, P& p, s2v::state& s) const {
    check(s);
    inner->forward(sub, p, s);
  }
};
struct failing_model {
  using state = s2v::state;
  failing_model(const s2v::model& m, std::size_t failing_layer_index) : m(m) {
    for (std::size_t i = 0; i < m.layer_count(); ++i) layers.push_back({&m.layer(i), i == failing_layer_index});
  }
  const s2v::model& m;
  std::vector<failing_layer> layers;
  std::size_t layer_count() const { return layers.size(); }
  const failing_layer& layer(std::size_t i) const { return layers.at(i); }
  std::vector<buffer_spec> buffers() const { return m.buffers(); }
  state make_state(const buffer_set& b) const { return m.make_state(b); }
  std::optional<std::size_t> page_of_layer(std::size_t i) const { return m.page_of_layer(i); }
  page_access page_access_of(const state& s, const buffer_spec& b) const { return m.page_access_of(s, b); }
};
}  // namespace

TEST_CASE("kv:offload with chunked unshard: a lane that throws fails the tick, naming its error, without a hang") {
  const denoise_case& c = the_case();
  const s2v::model m = make_model(dtype::f32);
  const s2v::geometry& g = m.geometry();
  const checkpoint_weights w(c.file);
  const std::vector<s2v::block> blocks = s2v::loop_blocks(c.loop, c.file, 7);
  const std::vector<float> t(g.frames, 500.0f);
  const tensor_view context = s2v::loop_sink(c.file).context;
  const std::vector<transfer_message> none;
  // A block (paged), an injector (not paged) and the head, with and without chunks in the blocks.
  std::vector<std::size_t> failing;
  for (std::size_t i = 0; i < m.layer_count(); ++i)
    if ((m.page_of_layer(i) && *m.page_of_layer(i) == 2) || m.layer(i).kind() == s2v::layer_kind::injector ||
        i + 1 == m.layer_count())
      failing.push_back(i);
  REQUIRE(failing.size() >= 3);
  for (const std::size_t layer : failing)
    for (const std::optional<std::size_t> resident_below : {std::optional<std::size_t>{}, std::optional<std::size_t>{1u << 20}})
      for (const std::size_t world : {1, 2}) {
        CAPTURE(layer);
        CAPTURE(world);
        CAPTURE(resident_below.has_value());
        const failing_model fm(m, layer);
        session_options opt = sharded_options("chunked:4KiB+prefetch:1+kv:offload", world);
        opt.schedule = schedule_kind::steps;
        if (resident_below) opt.policy.resident_below_bytes = *resident_below;
        session<failing_model> s(fm, w, opt);
        const auto tick = [&] {
          s.tick(
              [&](std::size_t, std::size_t, s2v::state& st) {
                s2v::step_inputs in;
                in.x = blocks[0].noise;
                in.t = tensor_view(const_cast<float*>(t.data()), dtype::f32, shape{static_cast<std::int64_t>(g.frames)});
                in.cond_states = blocks[0].cond_states;
                in.audio = blocks[0].audio;
                in.context = context;
                in.step = st.noisy_k[0] ? 0 : st.noisy_k[1] ? 1 : st.noisy_k[2] ? 2 : 3;
                m.begin_step(st, in);
                return true;
              },
              [](std::size_t, std::size_t, s2v::state&) {},
              [&](std::size_t, std::span<s2v::state>) -> const std::vector<transfer_message>& { return none; });
        };
        const std::string message = "injected failure in " + m.layer(layer).name() + " of step 2";
        CHECK_THROWS_WITH(tick(), doctest::Contains(message.c_str()));
      }
}

// The policy check the planners call refuses nothing now: every weight policy takes kv:offload.
TEST_CASE("kv:offload: no policy is refused with it, chunked included") {
  for (const char* policy : {"chunked:4KiB+prefetch:1+kv:offload", "chunked:64MiB+offload+prefetch:2+kv:offload:2",
                             "prefetch:1+kv:offload", "full+kv:offload"})
    CHECK_NOTHROW(require_kv_placement_supported(parse_policy(policy).values));
}

TEST_CASE("kv:offload: Wan (no paged buffers) runs unchanged, with the same plan") {
  const wan_case c = load_wan_case("wan_tiny_a");
  const wan::model m(c.config, c.work, {dtype::f32, gemm_path::portable, false});
  const checkpoint_weights w(c.file);
  for (std::size_t world : {1, 2}) {
    std::vector<float> want, got;
    const auto run = [&](const char* policy, std::vector<float>& out) {
      session<wan::model> s(m, w, sharded_options(policy, world));
      s.cap_device_memory(s.plan().peak_bytes());
      forward_case(s, m, c.file, [&](std::size_t rank, const wan::state& st) {
        if (rank == 0) {
          const auto o = m.output(st).as<float>();
          out.assign(o.begin(), o.end());
        }
      });
      return s.plan();
    };
    const memory_plan pd = run("prefetch:1", want), po = run("prefetch:1+kv:offload:2", got);
    REQUIRE(want.size() == got.size());
    CHECK(std::memcmp(want.data(), got.data(), want.size() * 4) == 0);
    for (std::size_t r = 0; r < world; ++r) {
      CHECK(pd.ranks[r].peak() == po.ranks[r].peak());
      CHECK(pd.ranks[r].host_bytes == po.ranks[r].host_bytes);
    }
  }
}

// The planner (issue 15 item 3): the 14B stack's ledger under kv:offload matches the runtime's
// ledger of the same S2V model, and with a host budget `auto` finds plans for 1 x 24 and 2 x 24 GiB.
TEST_CASE("unshard-plan: kv:offload on the 14B stack, the runtime's kv term, and 1x24 / 2x24 GiB plans") {
  using namespace unshard::liveavatar;
  const stack st = liveavatar_stack(liveavatar_14b());
  constexpr std::size_t GiB = std::size_t{1} << 30;
  // The runtime's ledger of the model the planner sizes the caches from (bf16 caches, 704x384).
  plan_request rq;
  rq.world_size = 1;
  const stack_plan sp = plan_stack(st, parse_policy("offload+prefetch:1+kv:offload"), rq);
  const workload w = rendered(st, rq.work);
  s2v::workload sw = s2v::pipeline_workload(*st.s2v_model, w.width, w.height);
  sw.frames_per_block = w.frames_per_block;
  s2v::options mo;
  mo.kv_cache = dtype::bf16;
  const s2v::model m(*st.s2v_model, sw, mo);
  const memory_plan rp = plan_memory(m, 1, parse_policy("offload+prefetch:1+kv:offload").values, 0,
                                     schedule{schedule_kind::steps, 4});
  const rank_ledger r0 = sp.rank(0);
  CHECK(rp.ranks[0].terms[memory_category::kv_cache] == r0.terms.at("kv_cache") + align_up(4));
  const memory_plan rd = plan_memory(m, 1, parse_policy("offload+prefetch:1").values, 0, schedule{schedule_kind::steps, 4});
  CHECK(rd.ranks[0].terms[memory_category::kv_cache] == sp.noisy_cache_bytes * 4 + sp.cond_cache_bytes + align_up(4));
  MESSAGE("14B, 704x384, bf16 caches, steps W=1 (4 forwards a tick): kv term "
          << rp.ranks[0].terms[memory_category::kv_cache] << " bytes under kv:offload, "
          << rd.ranks[0].terms[memory_category::kv_cache] << " under kv:device");
  // The host term holds the caches on top of the offloaded weights; the time pays for the copies.
  const stack_plan sd = plan_stack(st, parse_policy("offload+prefetch:1"), rq);
  CHECK(r0.host_bytes == sd.rank(0).host_bytes + 4 * sp.noisy_cache_bytes + sp.cond_cache_bytes);
  CHECK(sp.block_s > sd.block_s);
  CHECK(sp.peak() < sd.peak());
  // kv:offload:2 holds one more page per cache; replicated holds one noisy ring for its four steps.
  CHECK(plan_stack(st, parse_policy("offload+prefetch:1+kv:offload:2"), rq).rank(0).terms.at("kv_cache") ==
        3 * r0.terms.at("kv_cache") / 2);
  // With chunked weights the caches' pages stream the same way: the same kv term.
  CHECK(plan_stack(st, parse_policy("chunked:64MiB+offload+prefetch:1+kv:offload"), rq).rank(0).terms.at("kv_cache") ==
        r0.terms.at("kv_cache"));
  // auto: no plan fits 1 x 24 GiB with the caches on the device; with a host budget one does.
  const std::size_t budget = 24 * GiB - static_cast<std::size_t>(1.85 * static_cast<double>(GiB));
  for (const std::size_t world : {1, 2}) {
    CAPTURE(world);
    rq.world_size = world;
    const auto device_only = plan_auto(st, rq, budget, schedules_to_search(std::nullopt), true);
    const auto with_host = plan_auto(st, rq, budget, schedules_to_search(std::nullopt), true, 128 * GiB);
    if (world == 1) CHECK(device_only.fits.empty());
    REQUIRE(!with_host.fits.empty());
    const stack_plan& best = with_host.fits.front();
    CHECK(best.peak() <= budget);
    CHECK(best.host_peak() <= 128 * GiB);
    bool kv = false;
    for (const auto& p : with_host.fits) kv = kv || p.kv_offload;
    CHECK(kv);
    MESSAGE(world << " x 24 GiB, host <= 128 GiB: " << with_host.fits.size() << " plans fit; fastest " << best.policy
                  << " (" << std::string(name_of(best.sched.kind)) << "): peak " << best.peak() << ", host " << best.host_peak()
                  << ", " << best.block_s << " s per block");
    // A host budget too small for the caches is named.
    const auto tiny = plan_auto(st, rq, budget, schedules_to_search(std::nullopt), true, 8 * GiB);
    for (const auto& p : tiny.fits) CHECK(p.host_peak() <= 8 * GiB);
  }
  const stack_plan big = plan_stack(st, parse_policy("offload+prefetch:1+kv:offload"), plan_request{});
  CHECK(why_not(big, 80 * GiB, GiB).find("--host-memory") != std::string::npos);
}
