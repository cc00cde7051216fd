// The planner's inventory and ledger for the Live Avatar stack: hand-computed small cases, the known
// Wan parameter totals, the 5 x 24 GiB FSDP case of the Live Avatar article, the two schedules and
// what fits on the machine shapes of docs/planner.md.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "unshard/plan/liveavatar/ledger.hpp"
#include "unshard/plan/liveavatar/search.hpp"

using namespace unshard;
using namespace unshard::liveavatar;

namespace {
constexpr double gib = 1024.0 * 1024.0 * 1024.0;

wan::config tiny() {  // dim 8, ffn 16, 2 heads, 2 layers: small enough to count by hand
  return wan::config::from_json({{"dim", 8}, {"ffn_dim", 16}, {"freq_dim", 4}, {"text_dim", 6}, {"in_dim", 4},
                                {"out_dim", 4}, {"num_heads", 2}, {"num_layers", 2}});
}

std::string message_of(auto&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}
}  // namespace

TEST_CASE("a tiny Wan DiT counted by hand") {
  const wan::config c = tiny();
  const wan_block_parts b = wan_block(c);
  CHECK(b.self_attn == 4 * (8 * 8 + 8) + 2 * 8);  // q,k,v,o + RMSNorm q,k
  CHECK(b.ffn == (8 * 16 + 16) + (16 * 8 + 8));
  CHECK(b.norms_and_modulation == 2 * 8 + 6 * 8);
  CHECK(b.total() == 952);
  // patch 4*8*4+8, text 6*8+8 + 8*8+8, time 4*8+8 + 8*8+8, projection 8*48+48, head 8*16+16 + 2*8
  CHECK(wan_outside_blocks(c) == 136 + 128 + 112 + 432 + 160);
  CHECK(wan_total(c) == 2 * 952 + 968);
}

TEST_CASE("the tiny ledger, term by term, per policy") {
  const stack st = wan_stack(tiny(), "tiny");
  plan_request rq;
  rq.world_size = 2;
  rq.work.width = 32;
  rq.work.height = 32;
  rq.work.frames_per_block = 1;  // 2x2 tokens
  rq.sched = {schedule_kind::replicated, 1};  // one forward at a time
  const std::size_t t5_shard = static_cast<std::size_t>((st.text_encoder + 1) / 2) * 2;
  const stack_plan sel = plan_stack(st, parse_policy("prefetch:1"), rq);
  CHECK(sel.terms.at("shards") == 2872 / 2 * 2 + t5_shard);
  CHECK(sel.terms.at("gathered") == 2 * 968 * 2);  // two buffers of the largest unit (embeddings+head)
  CHECK(sel.terms.at("activations") == 2 * 256);    // 4 tokens x 8 x f32 = 128, rounded to 256, twice
  CHECK(sel.terms.at("workspace") == 256);
  CHECK(sel.terms.at("kv_cache") == 0);
  CHECK(sel.terms.at("resident") == static_cast<std::size_t>(st.vae) * 2);
  CHECK(plan_stack(st, parse_policy("fsdp"), rq).terms.at("gathered") == 968 * 2 + 2 * 952 * 2);
  CHECK(plan_stack(st, parse_policy("full"), rq).terms.at("gathered") == 2872 * 2);
  CHECK(plan_stack(st, parse_policy("selective"), rq).terms.at("gathered") == 968 * 2);
  const stack_plan off = plan_stack(st, parse_policy("offload+prefetch:2"), rq);
  CHECK(off.terms.at("shards") == 0);
  CHECK(off.terms.at("gathered") == 3 * 968 * 2);
  // chunked: a chunk is at least one row of the widest weight (16 bf16 = 32 bytes)
  const stack_plan ch = plan_stack(st, parse_policy("chunked:10B+prefetch:1"), rq);
  CHECK(ch.effective_chunk == 32);
  CHECK(ch.terms.at("gathered") == 2 * 32);
  // steps: 4 steps over 2 ranks, two forwards per tick on each, with their own activations.
  rq.sched = {schedule_kind::steps, 4};
  const stack_plan two = plan_stack(st, parse_policy("prefetch:1"), rq);
  CHECK(two.forwards_per_tick == 2);
  CHECK(two.terms.at("activations") == 2 * 2 * 256);
  CHECK(two.terms.at("workspace") == 2 * 256);
  CHECK(two.terms.at("kv_cache") == 0);  // a Wan t2v stack has no cache
  CHECK(two.terms.at("gathered") == sel.terms.at("gathered"));
}

TEST_CASE("Wan t2v 1.3B and 14B count to their known sizes") {
  wan::config small = wan::config::from_json(
      {{"dim", 1536}, {"ffn_dim", 8960}, {"num_heads", 12}, {"num_layers", 30}});
  CHECK(wan_total(small) > 1.3e9);
  CHECK(wan_total(small) < 1.45e9);  // Wan2.1-T2V-1.3B: about 1.42e9 parameters
  wan::config big = wan::config::from_json({{"dim", 5120}, {"ffn_dim", 13824}, {"num_heads", 40}, {"num_layers", 40}});
  CHECK(wan_total(big) > 14.0e9);
  CHECK(wan_total(big) < 14.5e9);  // Wan2.1-T2V-14B
}

TEST_CASE("Wan2.2-S2V-14B, the LoRA both ways, and the other models") {
  liveavatar::s2v_config s = liveavatar_14b();
  const s2v_parts p = s2v_inventory(s);
  CHECK(p.injector_each == 4 * (5120LL * 5120 + 5120) + 2 * 5120 + (5120LL * 10240 + 10240));
  CHECK(p.audio_injector == 12 * p.injector_each);  // ~1.89e9: the article's "about 1.9B"
  CHECK(p.total() > 16.0e9);
  CHECK(p.total() < 16.5e9);  // Wan2.2-S2V-14B: ~16.3e9 with its audio and frame-pack modules
  CHECK(p.lora == 0);
  s.lora_merged = false;  // rank 128 on q,k,v,o (self and cross) and ffn.0/ffn.2 of 40 blocks
  CHECK(s2v_inventory(s).lora == 40 * (8 * 128 * (5120 + 5120) + 128 * (5120 + 13824) * 2));
  CHECK(t5_encoder_params({}) > 5.6e9);
  CHECK(t5_encoder_params({}) < 5.8e9);  // umT5-XXL encoder
  CHECK(vae_params({}) > 1.2e8);
  CHECK(vae_params({}) < 1.3e8);  // Wan2.1 VAE ~127M
  CHECK(wav2vec2_params({}) > 3.1e8);
  CHECK(wav2vec2_params({}) < 3.2e8);  // wav2vec2-large ~315M
}

TEST_CASE("fsdp on 5 x 24 GiB, each rank one step (Live Avatar's TPP with --dit_fsdp): the documented 25.65 GiB within 5%") {
  const stack st = liveavatar_stack(liveavatar_14b());
  plan_request rq;
  rq.world_size = 5;
  rq.sched = {schedule_kind::steps, 4};
  const stack_plan p = plan_stack(st, parse_policy("fsdp"), rq);
  // +4.17 GiB at unshard: the root unit (embeddings, head, audio injectors, audio encoder, frame packer)
  CHECK(p.details.at("gathered.root") / gib == doctest::Approx(4.17).epsilon(0.002));
  // One step's KV cache: 12,672 noisy + 2,640 cond tokens x 40 layers x (K, V) x 5120 x bf16 = 11.68 GiB.
  CHECK(p.details.at("kv_cache.noisy") == 40ull * 12672 * 5120 * 2 * 2);
  CHECK(p.details.at("kv_cache.cond") == 40ull * 2640 * 5120 * 2 * 2);
  CHECK(p.terms.at("kv_cache") / gib == doctest::Approx(11.68).epsilon(0.001));
  // "after load": shards of the DiT and T5, the VAE, the KV cache: 20.10 against 21.48 documented
  const double loaded = (p.details.at("shards.dit") + p.details.at("shards.text_encoder") + p.details.at("resident.vae") +
                         p.terms.at("kv_cache")) / gib;
  CHECK(loaded == doctest::Approx(20.10).epsilon(0.001));
  // The derived peak adds what the article's sum leaves out: two block units and the activations.
  CHECK(p.peak() / gib == doctest::Approx(25.87).epsilon(0.001));
  CHECK(p.peak() / gib == doctest::Approx(25.65).epsilon(0.05));
  CHECK(p.peak() > 24ull * (1ull << 30) - static_cast<std::size_t>(1.85 * gib));  // does not fit a 4090
  CHECK(why_not(p, 24ull * (1ull << 30) - static_cast<std::size_t>(1.85 * gib)).starts_with(
      "peak 25.87 GiB exceeds the 22.15 GiB usable by 3.72 GiB; rank 0 holds kv_cache.noisy 9.67, shards.dit 6.07"));
  // The fifth rank owns no step: no cache, no activations; it still holds its shards and gathers.
  const rank_ledger idle = p.rank(4);
  CHECK(idle.forwards == 0);
  CHECK(idle.terms.at("kv_cache") == 0);
  CHECK(idle.terms.at("activations") == 0);
  CHECK(idle.terms.at("shards") == p.terms.at("shards"));
  CHECK(idle.terms.at("gathered") == p.terms.at("gathered"));
  // Every step on every rank (replicated): four noisy caches and the cond cache, 40.69 GiB alone.
  rq.sched.kind = schedule_kind::replicated;
  const stack_plan rep = plan_stack(st, parse_policy("fsdp"), rq);
  CHECK(rep.terms.at("kv_cache") == 4 * p.details.at("kv_cache.noisy") + p.details.at("kv_cache.cond"));
  CHECK(rep.terms.at("kv_cache") / gib == doctest::Approx(40.69).epsilon(0.001));
  CHECK(rep.rank(4).peak() == rep.peak());  // replicated ranks are alike
}

TEST_CASE("impossible input is refused, naming the culprit") {
  const stack st = liveavatar_stack(liveavatar_14b());
  plan_request rq;
  rq.world_size = 0;
  CHECK(message_of([&] { plan_stack(st, parse_policy("fsdp"), rq); }) == "plan: world size must be at least 1 (got 0)");
  rq.world_size = 5;
  rq.sched.steps = 0;
  CHECK(message_of([&] { plan_stack(st, parse_policy("fsdp"), rq); }) ==
        "schedule steps: the number of denoising steps must be at least 1 (got 0)");
  rq.sched.steps = 4;
  rq.work.width = 10;
  rq.work.height = 10;
  CHECK(message_of([&] { plan_stack(st, parse_policy("fsdp"), rq); }) ==
        "resolution 10x10 renders at 0x0 (Live Avatar's get_size_less_than_area), below the 64x64 pixels the frame packer needs");
  rq.work.width = 721;  // Live Avatar renders any size; a Wan t2v run takes it as given
  rq.work.height = 400;
  CHECK(plan_stack(st, parse_policy("fsdp"), rq).work.width == 704);
  CHECK(message_of([&] { plan_stack(wan_stack(tiny(), "tiny"), parse_policy("fsdp"), rq); }) ==
        "resolution 721x400 is not divisible by 16 (VAE stride 8 x patch 2); try 720x400");
  CHECK(message_of([] { parse_policy("warp"); }).find("unknown term 'warp'") != std::string::npos);
  CHECK(message_of([] { builtin_profiles().device("rtx9090"); }).starts_with(
      "unknown device profile 'rtx9090' (known: rtx4090, h100, h800"));
}

TEST_CASE("the time model overlaps gathers with compute when prefetching") {
  // 1e12 FLOP/s, 1e9 B/s, no latency: each unit computes 1 s and gathers 2 s, 2 s, 0.5 s.
  const time_rates r{1e12, 1e9, 0, 1e9, 0};
  const std::vector<step_cost> units{{"a", 1e12, 2e9, 0, 1, false}, {"b", 1e12, 2e9, 0, 1, false},
                                     {"c", 1e12, 0.5e9, 0, 1, false}};
  CHECK(forward_seconds(units, r, 0) == doctest::Approx(3 + 4.5));
  CHECK(forward_seconds(units, r, 1) == doctest::Approx(2 + 2 + 1 + 1));  // first gather exposed, then b's
  const stack st = liveavatar_stack(liveavatar_14b());
  plan_request rq;
  rq.world_size = 5;
  CHECK(plan_stack(st, parse_policy("prefetch:1"), rq).time_s < plan_stack(st, parse_policy("selective"), rq).time_s);
}

TEST_CASE("--resolution is Live Avatar's --size: get_size_less_than_area, as the official Python computes it") {
  // Expected values from the official function, get_size_less_than_area(H, W, target_area=W*H).
  struct row { std::int64_t w, h, rw, rh; };
  for (const row r : {row{720, 400, 704, 384}, row{704, 384, 704, 384}, row{721, 400, 704, 384}, row{1280, 720, 1280, 704},
                      row{832, 480, 832, 448}, row{480, 832, 448, 832}, row{960, 540, 960, 512}, row{512, 512, 512, 512},
                      row{100, 100, 64, 64}, row{64, 64, 64, 64}, row{10000, 10, 1472, 64}, row{10, 10, 0, 0}}) {
    CAPTURE(r.w);
    CAPTURE(r.h);
    CHECK(s2v::render_size(r.w, r.h) == s2v::pixel_size{r.rw, r.rh});
  }
}

TEST_CASE("a streamed forward runs the block's noisy tokens only; the cond tokens are cached once") {
  const stack st = liveavatar_stack(liveavatar_14b());
  plan_request rq;
  rq.world_size = 5;
  const stack_plan p = plan_stack(st, parse_policy("chunked:64MiB+prefetch:1"), rq);
  CHECK(p.work.width == 704);  // 720x400 renders at 704x384: latent 48x88, 1,056 tokens per latent frame
  CHECK(p.work.height == 384);
  CHECK(frame_tokens(p.work) == 1056);
  CHECK(p.streamed_tokens == 3168);
  CHECK(p.cond_tokens == 2640);
  CHECK(p.noisy_cache_slots == 12672);  // one clip: 4 blocks
  CHECK(p.cond_cache_slots == 2640);
  // The planner's own formulas agree with the model's geometry.
  CHECK(streamed_tokens(p.work) == 3168);
  CHECK(cond_tokens(p.work) == 2640);
  // What the planner used to run through every forward: noisy + cond tokens, at 720x400 unrendered.
  const workload unrendered;
  CHECK(streamed_tokens(unrendered) + cond_tokens(unrendered) == 6153);
  // Activations and workspace follow the 3,168 tokens: the f32 residual twice, the FFN's two hidden tensors.
  CHECK(p.details.at("activations.residual") == 3168ull * 5120 * 4 * 2);
  CHECK(p.details.at("workspace.block") == 2ull * 3168 * 13824 * 2);
  // The seed's step rank: 6.07 GiB of shards + 11.68 GiB of cache + chunks, activations and
  // workspace + the VAE 0.23 GiB = 18.4 GiB (the seed: about 18.6), plus 2.12 GiB with umT5 on the GPUs.
  CHECK(p.details.at("shards.dit") / gib == doctest::Approx(6.07).epsilon(0.001));
  CHECK(p.details.at("shards.text_encoder") / gib == doctest::Approx(2.12).epsilon(0.002));
  CHECK(p.terms.at("kv_cache") / gib == doctest::Approx(11.68).epsilon(0.001));
  const double without_t5 = static_cast<double>(p.peak() - p.details.at("shards.text_encoder")) / gib;
  CHECK(without_t5 == doctest::Approx(18.6).epsilon(0.015));
  rq.t5 = t5_placement::host;  // umT5 whole in host memory: no device term
  const stack_plan host = plan_stack(st, parse_policy("chunked:64MiB+prefetch:1"), rq);
  CHECK(host.details.count("shards.text_encoder") == 0);
  CHECK(host.peak() == p.peak() - p.details.at("shards.text_encoder"));
  CHECK(host.host_bytes == p.host_bytes + static_cast<std::size_t>(st.text_encoder) * 2);
}

TEST_CASE("per-rank KV caches: one step's under steps, every step's under replicated") {
  const stack st = liveavatar_stack(liveavatar_14b());
  const std::size_t noisy = 40ull * 12672 * 5120 * 2 * 2, cond = 40ull * 2640 * 5120 * 2 * 2;
  const auto plan = [&](schedule_kind kind, std::size_t world) {
    plan_request rq;
    rq.world_size = world;
    rq.sched = {kind, 4};
    return plan_stack(st, parse_policy("chunked:64MiB+prefetch:1"), rq);
  };
  const stack_plan steps4 = plan(schedule_kind::steps, 4), rep4 = plan(schedule_kind::replicated, 4);
  for (std::size_t r = 0; r < 4; ++r) {
    CAPTURE(r);
    CHECK(steps4.rank(r).cached_steps == std::vector<std::size_t>{r});
    CHECK(steps4.rank(r).terms.at("kv_cache") == noisy + cond);
    CHECK(rep4.rank(r).cached_steps == std::vector<std::size_t>{0, 1, 2, 3});
    CHECK(rep4.rank(r).terms.at("kv_cache") == 4 * noisy + cond);
    CHECK(rep4.rank(r).forwards == 1);
  }
  // W = 2: rank 0 owns steps 0 and 2, rank 1 steps 1 and 3; two forwards a tick, two activation sets.
  const stack_plan steps2 = plan(schedule_kind::steps, 2);
  CHECK(steps2.rank(0).cached_steps == std::vector<std::size_t>{0, 2});
  CHECK(steps2.rank(1).cached_steps == std::vector<std::size_t>{1, 3});
  CHECK(steps2.terms.at("kv_cache") == 2 * noisy + cond);
  CHECK(steps2.terms.at("activations") == 2 * steps4.terms.at("activations"));
  CHECK(steps2.terms.at("workspace") == 2 * steps4.terms.at("workspace"));
  // W = 5 > S = 4: rank 4 owns no step and holds no cache at all.
  const stack_plan steps5 = plan(schedule_kind::steps, 5);
  CHECK(steps5.rank(4).cached_steps.empty());
  CHECK(steps5.rank(4).terms.at("kv_cache") == 0);
  CHECK(steps5.rank(4).details.at("kv_cache.cond") == 0);
  CHECK(steps5.rank(4).peak() < steps5.peak());
  CHECK(steps5.peak() == steps5.rank(0).peak());
}

TEST_CASE("block time: one tick under steps, S forwards under replicated; time_s stays one forward") {
  const stack st = liveavatar_stack(liveavatar_14b());
  const auto plan = [&](schedule_kind kind, std::size_t world, const char* device = "rtx4090") {
    plan_request rq;
    rq.world_size = world;
    rq.sched = {kind, 4};
    rq.device = builtin_profiles().device(device);
    rq.link = builtin_profiles().link(rq.device.link);
    return plan_stack(st, parse_policy("chunked:64MiB+prefetch:1"), rq);
  };
  const time_rates r4090 = time_rates::of(builtin_profiles().device("rtx4090"), builtin_profiles().link("pcie4-no-p2p"));
  // W >= S: one forward per tick, so a block takes one forward under steps and four under replicated.
  const stack_plan s5 = plan(schedule_kind::steps, 5), r5 = plan(schedule_kind::replicated, 5);
  CHECK(s5.time_s == doctest::Approx(r5.time_s));
  CHECK(s5.block_s == doctest::Approx(s5.time_s));
  CHECK(r5.block_s == doctest::Approx(4 * r5.time_s));
  CHECK(r5.block_s / s5.block_s == doctest::Approx(4));
  CHECK(s5.frames_per_s == doctest::Approx(4.0 * 3 / s5.block_s));
  // W = 2: a tick computes two forwards under one pass of gathers: more than one forward, less than two.
  const stack_plan s2 = plan(schedule_kind::steps, 2), r2 = plan(schedule_kind::replicated, 2);
  CHECK(s2.forwards_per_tick == 2);
  CHECK(s2.block_s == doctest::Approx(forward_seconds(s2.tick_steps(), r4090, s2.prefetch)));
  CHECK(s2.block_s > s2.time_s);
  CHECK(s2.block_s <= 2 * s2.time_s);
  CHECK(r2.block_s / s2.block_s >= 2);
  // Compute-bound (H100 over NVLink): the tick is two forwards' compute, and the schedules tie.
  const stack_plan h2 = plan(schedule_kind::steps, 2, "h100"), hr2 = plan(schedule_kind::replicated, 2, "h100");
  CHECK(h2.block_s == doctest::Approx(2 * h2.time_s).epsilon(0.01));
  CHECK(hr2.block_s / h2.block_s == doctest::Approx(2).epsilon(0.01));
}

TEST_CASE("auto searches both schedules and ranks the plans that fit by block time") {
  const stack st = liveavatar_stack(liveavatar_14b());
  plan_request rq;
  rq.world_size = 5;
  const std::size_t budget = 24ull * (1ull << 30) - static_cast<std::size_t>(1.85 * gib);
  const auto all = plan_auto(st, rq, budget, schedules_to_search(std::nullopt));
  REQUIRE(!all.fits.empty());
  bool replicated = false;
  for (std::size_t i = 0; i < all.fits.size(); ++i) {
    CHECK(all.fits[i].peak() <= budget);
    if (i) CHECK(all.fits[i - 1].block_s <= all.fits[i].block_s);
    replicated |= all.fits[i].sched.kind == schedule_kind::replicated;
  }
  CHECK(all.fits.front().sched.kind == schedule_kind::steps);
  CHECK(!replicated);  // four noisy caches per rank (38.7 GiB) fit no 24 GiB card
  const auto only = plan_auto(st, rq, budget, schedules_to_search(schedule_kind::steps));
  CHECK(only.fits.size() == all.fits.size());
}

TEST_CASE("bf16 weights and the caches on the device: what fits on 5x24, 4x24, 4x40, 2x24 and 1x24 GiB at 720x400, and why not") {
  const stack st = liveavatar_stack(liveavatar_14b());
  const auto search = [&](std::size_t world, std::size_t memory_gib, t5_placement t5 = t5_placement::device) {
    plan_request rq;
    rq.world_size = world;
    rq.t5 = t5;
    const std::size_t budget = memory_gib * (1ull << 30) - static_cast<std::size_t>(1.85 * gib);
    return std::pair{plan_auto(st, rq, budget, schedules_to_search(std::nullopt), auto_options{false, false, 0}), budget};
  };
  const auto fastest = [](const auto_result& a) { return a.fits.front(); };
  {  // 5 x 24: steps, without offload; replicated's four caches do not fit
    const auto [a, budget] = search(5, 24);
    REQUIRE(!a.fits.empty());
    CHECK(fastest(a).sched.kind == schedule_kind::steps);
    CHECK(!fastest(a).policy.ends_with("+offload"));
  }
  {  // 4 x 24: with umT5 sharded over the GPUs only offload fits; with umT5 on the host, no offload needed
    const auto [a, budget] = search(4, 24);
    REQUIRE(!a.fits.empty());
    for (const auto& p : a.fits) CHECK(p.policy.ends_with("+offload"));
    const auto [h, budget_h] = search(4, 24, t5_placement::host);
    REQUIRE(!h.fits.empty());
    CHECK(!fastest(h).policy.ends_with("+offload"));
    CHECK(fastest(h).block_s < fastest(a).block_s);
  }
  {  // 4 x 40: steps fits easily; replicated does not: its KV cache alone (40.69 GiB) is over 38.15
    const auto [a, budget] = search(4, 40);
    REQUIRE(!a.fits.empty());
    for (const auto& p : a.fits) CHECK(p.sched.kind == schedule_kind::steps);
  }
  {  // 2 x 24: two steps per rank, 21.35 GiB of cache and two activation sets: 0.02 GiB over at best
    const auto [a, budget] = search(2, 24);
    CHECK(a.fits.empty());
    REQUIRE(a.closest);
    CHECK(a.closest->terms.at("kv_cache") / gib == doctest::Approx(21.35).epsilon(0.001));
    CHECK(a.closest->peak() - budget < static_cast<std::size_t>(0.05 * gib));
    CHECK(why_not(*a.closest, budget).find("kv_cache.noisy 19.34") != std::string::npos);
  }
  {  // 1 x 24: the four noisy caches and the cond cache alone are 40.69 GiB
    const auto [a, budget] = search(1, 24);
    CHECK(a.fits.empty());
    REQUIRE(a.closest);
    CHECK(a.closest->terms.at("kv_cache") > budget);
    CHECK(why_not(*a.closest, budget).find("the KV cache alone is 40.69 GiB (4 noisy caches of 9.67 GiB") !=
          std::string::npos);
  }
}

namespace {
// One DiT forward's FLOPs on the 14B stack at 704x384 (3,168 streamed tokens): 2 per parameter per
// token, plus QK^T and PV over the whole noisy cache and the cond cache in each of the 40 blocks.
constexpr double forward_flops = 2.0 * 16295755609.0 * 3168 + 40.0 * 4 * 3168 * (12672 + 2640) * 5120;
constexpr double flops_4090 = 100e12;
const std::size_t budget_24 = 24ull * (1ull << 30) - static_cast<std::size_t>(1.85 * gib);

auto_result search_default(std::size_t world, std::size_t host_budget = 0) {
  plan_request rq;
  rq.world_size = world;
  return plan_auto(liveavatar_stack(liveavatar_14b()), rq, budget_24, schedules_to_search(std::nullopt),
                   auto_options{true, true, host_budget});
}
}  // namespace

TEST_CASE("compute_s: the compute-bound time of the forwards a block times, whole and per rank") {
  const stack st = liveavatar_stack(liveavatar_14b());
  CHECK(st.total_dit() == 16295755609);
  const auto plan = [&](const char* policy, schedule_kind kind, std::size_t world) {
    plan_request rq;
    rq.world_size = world;
    rq.sched = {kind, 4};
    return plan_stack(st, parse_policy(policy), rq);
  };
  const stack_plan s1 = plan("chunked:64MiB+prefetch:1", schedule_kind::steps, 1);
  CHECK(s1.forward_compute_s == doctest::Approx(forward_flops / flops_4090));  // 1.430 s
  CHECK(s1.compute_s == doctest::Approx(4 * forward_flops / flops_4090));      // four forwards a tick
  CHECK(s1.rank_compute_s(0) == doctest::Approx(s1.compute_s));
  const stack_plan s2 = plan("chunked:64MiB+prefetch:1", schedule_kind::steps, 2);
  CHECK(s2.compute_s == doctest::Approx(2 * forward_flops / flops_4090));
  CHECK(s2.compute_s == doctest::Approx(compute_seconds(s2.tick_steps(), time_rates::of(plan_request{}.device, plan_request{}.link))));
  CHECK(s2.rank_compute_s(1) == doctest::Approx(s2.compute_s));
  CHECK(s2.compute_ratio() == doctest::Approx(s2.block_s / s2.compute_s));
  // W = 5 > S = 4: rank 4 computes nothing; the block is one forward's compute.
  const stack_plan s5 = plan("fsdp", schedule_kind::steps, 5);
  CHECK(s5.compute_s == doctest::Approx(forward_flops / flops_4090));
  CHECK(s5.rank_compute_s(4) == 0);
  CHECK(s5.rank_compute_s(3) == doctest::Approx(s5.compute_s));
  // replicated: every rank runs the four forwards of a block.
  const stack_plan r2 = plan("chunked:64MiB+prefetch:1", schedule_kind::replicated, 2);
  CHECK(r2.compute_s == doctest::Approx(4 * forward_flops / flops_4090));
  CHECK(r2.rank_compute_s(1) == doctest::Approx(r2.compute_s));
  // fsdp on 5 x 4090: transfer-bound, 2.217 s against 1.430 s; the all-gathers dominate.
  CHECK(s5.compute_ratio() == doctest::Approx(2.217 / 1.430).epsilon(0.002));
  CHECK(s5.transfers.all_gather_s > s5.compute_s);
  CHECK(time_note(s5).starts_with("transfer-bound (the copy stream carries 2.174 s a block against 1.430 s of compute; "
                                  "the most, 2.174 s, all-gathers)"));
  // Without prefetch the gathers do not overlap compute: not transfer-bound, yet 2.5x compute-bound.
  const stack_plan np = plan("chunked:64MiB", schedule_kind::steps, 5);
  CHECK(np.compute_ratio() > compute_bound_goal);
  CHECK(time_note(np).starts_with("compute and transfers take turns, without prefetch"));
  // Compute-bound plans have no note.
  CHECK(time_note(plan("full", schedule_kind::steps, 5)).empty());
}

TEST_CASE("kv:offload in the time model: each block's pages in before its first step, its rows back after its last") {
  const stack st = liveavatar_stack(liveavatar_14b());
  plan_request rq;
  rq.world_size = 2;  // two forwards a tick on each rank
  const double noisy_page = 12672.0 * 5120 * 2 * 2, cond_page = 2640.0 * 5120 * 2 * 2, rows = 3168.0 * 5120 * 2 * 2;
  const stack_plan p = plan_stack(st, parse_policy("selective:subunit+prefetch:1+kv:offload"), rq);
  std::size_t firsts = 0, lasts = 0;
  for (const step_cost& s : p.steps) {
    firsts += s.kv_in_bytes > 0;
    lasts += s.kv_out_bytes > 0;
    if (s.kv_in_bytes > 0) CHECK(s.kv_in_bytes == noisy_page + cond_page);  // one forward's
    if (s.kv_out_bytes > 0) CHECK(s.kv_out_bytes == rows);
    CHECK(s.h2d_bytes == 0);  // the pages are not weight copies
  }
  CHECK(firsts == 40);
  CHECK(lasts == 40);
  // A block of several sub-unit pieces: pages on its first, rows back on its last.
  const auto at = [&](const std::string& name) {
    for (const step_cost& s : p.steps)
      if (s.name == name) return s;
    FAIL("no step ", name);
    return step_cost{};
  };
  CHECK(at("blocks.0#0").kv_in_bytes > 0);
  CHECK(at("blocks.0#0").kv_out_bytes == 0);
  CHECK(at("blocks.0#1").kv_in_bytes == 0);
  CHECK(at("blocks.0#1").kv_out_bytes > 0);
  CHECK(at("audio_injector.0").kv_in_bytes == 0);
  // The tick: both forwards' noisy pages and rows, the cond page once.
  for (const step_cost& s : p.tick_steps()) {
    if (s.kv_in_bytes > 0) CHECK(s.kv_in_bytes == 2 * noisy_page + cond_page);
    if (s.kv_out_bytes > 0) CHECK(s.kv_out_bytes == 2 * rows);
  }
  const time_rates r = time_rates::of(rq.device, rq.link);
  CHECK(p.transfers.kv_in_s == doctest::Approx(40 * (2 * noisy_page + cond_page) / 25e9));
  CHECK(p.transfers.kv_out_s == doctest::Approx(40 * 2 * rows / 25e9));
  CHECK(p.block_s == doctest::Approx(p.tick_timeline(r).total_s));
  // kv:offload:2 issues the pages two blocks ahead: on the one in-order stream they go ahead of
  // weight gathers issued later. Here (whole blocks, two gathered ahead) that hides page copies
  // kv:offload cannot; with 64 MiB chunks of fp8 weights the deeper copies delay the chunks instead.
  const auto block_s = [&](const std::string& policy) { return plan_stack(st, parse_policy(policy), rq).block_s; };
  CHECK(block_s("selective:block+prefetch:2+kv:offload:2") < block_s("selective:block+prefetch:2+kv:offload"));
  CHECK(block_s("chunked:64MiB+prefetch:2+fp8+kv:offload:2") > block_s("chunked:64MiB+prefetch:2+fp8+kv:offload"));
  // Without kv:offload the steps carry no page copies and the KV depth is not in the time.
  const stack_plan d = plan_stack(st, parse_policy("selective:subunit+prefetch:1"), rq);
  CHECK(d.transfers.kv_in_s == 0);
  CHECK(d.block_s == doctest::Approx(forward_seconds(d.tick_steps(), r, d.prefetch)));
}

TEST_CASE("chunked with kv:offload: the pages on a block's first chunk, the write-back after its last") {
  const stack st = liveavatar_stack(liveavatar_14b());
  plan_request rq;
  rq.world_size = 2;
  const parsed_policy chunked = parse_policy("chunked:64MiB+prefetch:1+kv:offload");
  // The ledger's placement, whether or not the runtime accepts the combination.
  stack_plan p = plan_stack(st, parse_policy("chunked:64MiB+prefetch:1"), rq);
  const liveavatar::detail::cache_sizes caches = liveavatar::detail::caches_of(st, p.work);
  std::vector<std::size_t> owner;
  p.steps = liveavatar::detail::forward_steps(st, chunked, rq, caches, p.effective_chunk, &owner);
  liveavatar::detail::add_kv_copies(st, p, caches, owner);
  REQUIRE(owner.size() == p.steps.size());
  std::size_t blocks = 0;
  for (std::size_t i = 0; i < p.steps.size(); ++i) {
    const bool first = i == 0 || owner[i - 1] != owner[i], last = i + 1 == p.steps.size() || owner[i + 1] != owner[i];
    const bool block = st.units[owner[i]].block;
    CAPTURE(p.steps[i].name);
    CHECK((p.steps[i].kv_in_bytes > 0) == (block && first));
    CHECK((p.steps[i].kv_out_bytes > 0) == (block && last));
    blocks += block && first;
  }
  CHECK(blocks == 40);
  // A block is 11 chunks of 64 MiB (351.4e6 bf16 parameters): pages on #0, rows back on #10.
  const auto first = std::find_if(p.steps.begin(), p.steps.end(), [](const step_cost& s) { return s.name == "blocks.0#0"; });
  REQUIRE(first + 10 < p.steps.end());
  CHECK(first->kv_in_bytes > 0);
  CHECK(first[10].name == "blocks.0#10");
  CHECK(first[10].kv_out_bytes > 0);
  CHECK(first[11].name != "blocks.0#11");
  // The search offers chunked with kv:offload exactly when the runtime accepts it.
  bool accepted = true;
  try {
    require_kv_placement_supported(chunked.values);
  } catch (const error&) {
    accepted = false;
  }
  const std::vector<std::string> offered = kv_candidates("chunked:64MiB+prefetch:1", true);
  CHECK(offered.size() == (accepted ? 3u : 1u));
  CHECK(kv_candidates("selective:block+prefetch:1", true).size() == 3);
  CHECK(kv_candidates("selective:block+prefetch:1", false).size() == 1);
  if (accepted) {
    const stack_plan c = plan_stack(st, chunked, rq), w = plan_stack(st, parse_policy("prefetch:1+kv:offload"), rq);
    CHECK(c.steps.size() == p.steps.size());
    for (std::size_t i = 0; i < c.steps.size(); ++i) {
      CHECK(c.steps[i].kv_in_bytes == p.steps[i].kv_in_bytes);
      CHECK(c.steps[i].kv_out_bytes == p.steps[i].kv_out_bytes);
    }
    CHECK(c.terms.at("kv_cache") == w.terms.at("kv_cache"));  // the page rings do not depend on the weights
    CHECK(c.host_peak() == w.host_peak());
    CHECK(c.transfers.kv_in_s == doctest::Approx(w.transfers.kv_in_s));
  } else {
    CHECK_THROWS_AS(plan_stack(st, chunked, rq), error);
  }
}

TEST_CASE("auto's defaults (fp8 weights and the KV caches' placement searched): 1x24 and 2x24 GiB fit, near compute-bound") {
  const stack st = liveavatar_stack(liveavatar_14b());
  {  // 1 x 24: four steps on one rank; every plan that fits streams both the weights and the caches from host memory
    const auto a = search_default(1);
    REQUIRE(!a.fits.empty());
    for (const auto& p : a.fits) {
      CAPTURE(p.policy);
      CHECK(p.kv_offload);
      CHECK(parse_policy(p.policy).values.offload);
      CHECK(p.peak() <= budget_24);
    }
    const stack_plan& best = a.fits.front();
    CHECK(best.sched.kind == schedule_kind::steps);
    CHECK(best.compute_s == doctest::Approx(4 * forward_flops / flops_4090));
    CHECK(best.compute_ratio() <= compute_bound_goal);
    // Its host memory: the same plan's with the caches on the device, plus the four noisy caches and the cond cache.
    plan_request rq;
    rq.world_size = 1;
    std::string device_kv = best.policy.substr(0, best.policy.find("+kv:offload"));
    const stack_plan d = plan_stack(st, parse_policy(device_kv), rq);
    CHECK(best.host_peak() == d.host_peak() + 4 * best.noisy_cache_bytes + best.cond_cache_bytes);
    CHECK(best.host_peak() / gib == doctest::Approx(67.12).epsilon(0.001));
    // A cap below what the caches and weights need leaves nothing; one above it keeps the best plan.
    CHECK(search_default(1, 64ull << 30).fits.empty());
    const auto capped = search_default(1, 72ull << 30);
    REQUIRE(!capped.fits.empty());
    CHECK(capped.fits.front().policy == best.policy);
    for (const auto& p : capped.fits) CHECK(p.host_peak() <= 72ull << 30);
  }
  {  // 2 x 24: each rank two steps; the caches in host memory, the weights on the device
    const auto a = search_default(2);
    REQUIRE(!a.fits.empty());
    for (const auto& p : a.fits) CHECK(p.kv_offload);
    const stack_plan& best = a.fits.front();
    CHECK(!parse_policy(best.policy).values.offload);
    CHECK(best.compute_s == doctest::Approx(2 * forward_flops / flops_4090));
    CHECK(best.compute_ratio() <= compute_bound_goal);
    CHECK(best.rank(1).host_bytes == best.rank(0).host_bytes);
    CHECK(search_default(2, 16ull << 30).fits.empty());  // two noisy caches and the cond cache: 21.35 GiB
  }
  {  // 5 x 24: fp8 halves the gathers; the fastest keeps the caches on the device and gathers nothing from host
    const auto a = search_default(5);
    REQUIRE(!a.fits.empty());
    const stack_plan& best = a.fits.front();
    CHECK(parse_policy(best.policy).values.fp8);
    CHECK(!best.kv_offload);
    CHECK(best.compute_ratio() <= compute_bound_goal);
  }
  // --no-fp8: bf16 weights only; 2 x 24 still fits, offloading the weights as well.
  plan_request rq;
  rq.world_size = 2;
  const auto bf16 = plan_auto(st, rq, budget_24, schedules_to_search(std::nullopt), auto_options{false, true, 0});
  REQUIRE(!bf16.fits.empty());
  for (const auto& p : bf16.fits) CHECK(!parse_policy(p.policy).values.fp8);
  CHECK(bf16.fits.front().compute_ratio() <= compute_bound_goal);
}

TEST_CASE("an S2V model config plans through the same stack: the 14B's config equals the preset, a small one counts its own modules") {
  // The 14B's model config (what a Live Avatar config.json holds) against the preset.
  const stack preset = liveavatar_stack(liveavatar_14b());
  const stack from_config = liveavatar_stack(::unshard::s2v::liveavatar_14b_config(), "s2v_14b.json");
  CHECK(from_config.model == "s2v_14b.json");
  REQUIRE(from_config.units.size() == preset.units.size());
  CHECK(from_config.total_dit() == preset.total_dit());
  CHECK(from_config.root_params() == preset.root_params());
  CHECK(from_config.largest_subunit == preset.largest_subunit);
  CHECK(from_config.widest_row == preset.widest_row);
  for (const auto kind : {schedule_kind::steps, schedule_kind::replicated})
    for (const char* policy : {"fsdp", "prefetch:1", "chunked:64MiB+prefetch:2+offload+fp8+kv:offload"}) {
      CAPTURE(policy);
      plan_request rq;
      rq.world_size = 2;
      rq.sched = {kind, 4};
      const stack_plan a = plan_stack(preset, parse_policy(policy), rq), b = plan_stack(from_config, parse_policy(policy), rq);
      CHECK(a.peak() == b.peak());
      CHECK(a.terms == b.terms);
      CHECK(a.host_bytes == b.host_bytes);
      CHECK(a.time_s == b.time_s);
    }
  // A 3-block model with two injectors: its units are its own layers, the KV cache its own width.
  ::unshard::s2v::config small = ::unshard::s2v::liveavatar_14b_config();
  small.dim = 256;
  small.ffn_dim = 512;
  small.num_heads = 2;
  small.num_layers = 3;
  small.audio_dim = 64;
  small.audio_inject_layers = {0, 2};
  const stack st = liveavatar_stack(small, "small.json");
  CHECK(std::count_if(st.units.begin(), st.units.end(), [](const dit_unit& u) { return u.block; }) == 3);
  CHECK(st.total_dit() < preset.total_dit() / 1000);
  plan_request rq;
  rq.world_size = 1;
  rq.sched = {schedule_kind::steps, 4};
  const stack_plan p = plan_stack(st, parse_policy("prefetch:1"), rq);
  CHECK(p.details.at("kv_cache.noisy") == 3ull * 12672 * 256 * 2 * 2 * 4);  // 4 steps on one rank, bf16 K and V
  small.audio_inject_layers = {0, 5};  // no block 5: the config is refused, naming it
  CHECK(message_of([&] { liveavatar_stack(small, "bad.json"); }).find("bad.json") != std::string::npos);
}
