// The planner's inventory and ledger for the Live Avatar stack: hand-computed small cases, the known
// Wan parameter totals, and the 5 x 24 GiB FSDP case of the Live Avatar article (docs/planner.md).
#include <doctest/doctest.h>

#include <string>

#include "unshard/plan/liveavatar/ledger.hpp"

using namespace unshard;
using namespace unshard::liveavatar;

namespace {
constexpr double gib = 1024.0 * 1024.0 * 1024.0;

wan_config tiny() {  // dim 8, ffn 16, 2 heads, 2 layers: small enough to count by hand
  return wan_config::from_json({{"dim", 8}, {"ffn_dim", 16}, {"freq_dim", 4}, {"text_dim", 6}, {"in_dim", 4},
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
  const wan_config c = tiny();
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
}

TEST_CASE("Wan t2v 1.3B and 14B count to their known sizes") {
  wan_config small = wan_config::from_json(
      {{"dim", 1536}, {"ffn_dim", 8960}, {"num_heads", 12}, {"num_layers", 30}});
  CHECK(wan_total(small) > 1.3e9);
  CHECK(wan_total(small) < 1.45e9);  // Wan2.1-T2V-1.3B: about 1.42e9 parameters
  wan_config big = wan_config::from_json({{"dim", 5120}, {"ffn_dim", 13824}, {"num_heads", 40}, {"num_layers", 40}});
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

TEST_CASE("fsdp on 5 x 24 GiB reproduces the documented 25.65 GiB within 5%") {
  const stack st = liveavatar_stack(liveavatar_14b());
  plan_request rq;
  rq.world_size = 5;
  rq.work.kv_cache_tokens = 13500;
  rq.work.cond_cache_tokens = 2800;
  const stack_plan p = plan_stack(st, parse_policy("fsdp"), rq);
  // +4.17 GiB at unshard: the root unit (embeddings, head, audio injectors, audio encoder, frame packer)
  CHECK(p.details.at("gathered.root") / gib == doctest::Approx(4.17).epsilon(0.002));
  // "after load": shards of the DiT and T5, the VAE, the causal KV cache: 20.86 against 21.48 documented
  const double loaded = (p.details.at("shards.dit") + p.details.at("shards.text_encoder") + p.details.at("resident.vae") +
                         p.details.at("kv_cache.causal")) / gib;
  CHECK(loaded == doctest::Approx(20.86).epsilon(0.001));
  // The derived peak adds what the article's sum leaves out: two block units and the activations.
  CHECK(p.peak() / gib == doctest::Approx(26.89).epsilon(0.001));
  CHECK(p.peak() / gib == doctest::Approx(25.65).epsilon(0.05));
  CHECK(p.peak() > 24ull * (1ull << 30) - static_cast<std::size_t>(1.85 * gib));  // does not fit a 4090
}

TEST_CASE("impossible input is refused, naming the culprit") {
  const stack st = liveavatar_stack(liveavatar_14b());
  plan_request rq;
  rq.world_size = 0;
  CHECK(message_of([&] { plan_stack(st, parse_policy("fsdp"), rq); }) == "world size must be at least 1 (got 0)");
  rq.world_size = 5;
  rq.work.width = 721;
  CHECK(message_of([&] { plan_stack(st, parse_policy("fsdp"), rq); }) ==
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
