// unshard-avatar: Live Avatar's streaming S2V DiT (CausalWanModel_S2V), sharded across ranks under a
// policy, replaying the calls a config's streaming.calls lists (sink, then one call per block and
// denoising step), with its KV caches owned by the runtime and counted by the ledger.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/cli.hpp"
#include "unshard/io/checkpoint.hpp"
#include "unshard/io/safetensors_writer.hpp"
#include "unshard/models/liveavatar/calls.hpp"
#include "unshard/models/liveavatar/count.hpp"
#include "unshard/models/liveavatar/stream.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/runtime/checkpoint_weights.hpp"
#include "unshard/runtime/lora_weights.hpp"
#include "unshard/runtime/synthetic_weights.hpp"

namespace {
using namespace unshard;

constexpr const char* usage =
    "unshard-avatar --config CONFIG.json --weights FILE.safetensors|INDEX.json [--lora LORA.safetensors "
    "[--lora-alpha A]] --inputs FILE.safetensors --out OUT.safetensors [--world-size N] [--policy POLICY] "
    "[--dtype f32|bf16] [--gemm portable|blas] [--budget SIZE] [--strict]\n"
    "       unshard-avatar --demo [--world-size N] [--policy POLICY] [--dtype f32|bf16]";

struct run_settings {
  std::size_t world_size = 1;
  parsed_policy policy;
  s2v_options model_options;
  std::size_t budget = 0;
};

run_settings settings_from(const cli::options& o) {
  run_settings s;
  cli::read_sharding_options(o, s);
  s.model_options.record_block_outputs = true;
  if (o.has("--lora-alpha") && !o.has("--lora")) throw cli::usage_error("--lora-alpha needs --lora");
  return s;
}

session_options session_options_of(const run_settings& rs) {
  session_options opt;
  opt.world_size = rs.world_size;
  opt.policy = rs.policy.values;
  opt.budget_bytes = rs.budget;
  return opt;
}

shape tokens_shape(std::size_t rows, std::size_t dim) {
  return shape{1, static_cast<std::int64_t>(rows), static_cast<std::int64_t>(dim)};
}

// Runs every call of the recorded stream; rank 0's results go into `out`.
template <weight_source S>
void run_stream(const s2v_model& m, const S& weights, const run_settings& rs, const s2v_stream_spec& spec,
                const checkpoint& inputs, safetensors_writer& out) {
  const s2v_geometry& g = m.geometry();
  s2v_stream<> stream(m, weights, session_options_of(rs));
  for (const s2v_call_spec& c : spec.calls) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto collect = [&](std::size_t rank, const s2v_state& s) {
      if (rank != 0) return;
      for (std::size_t i = 0; i < g.num_layers; ++i) {
        const tensor_view b = m.block_output(s, i);
        out.add(c.name + ".block." + std::to_string(i) + ".out", tokens_shape(s.call.tokens, g.dim), b.as<const float>());
      }
      if (c.sink) return;
      const tensor_view o = m.output(s);
      out.add(c.name + ".output", o.dims(), o.as<const float>());
      const shape kv{1, static_cast<std::int64_t>(g.block_tokens), static_cast<std::int64_t>(g.heads),
                     static_cast<std::int64_t>(g.head_dim)};
      for (std::size_t i = 0; i < g.num_layers; ++i)
        for (const bool values : {false, true}) {
          const tensor_view slots = m.noisy_cache(s, s.call.step, i, values, s.call.write_slot, g.block_tokens);
          out.add(c.name + ".kv." + std::to_string(i) + (values ? ".v" : ".k"), kv, slots.as<const float>());
        }
    };
    if (c.sink) stream.sink(s2v_sink_of(c, inputs), collect);
    else stream.step(s2v_step_of(m, c, inputs), collect);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "unshard-avatar: call '%s' (%s) %.3f s\n", c.name.c_str(), c.sink ? "sink" : "streamed", secs);
  }
  cli::print_rank_peaks(stream.runtime());
}

int run_files(const cli::options& o) {
  const std::string config_path = o.require("--config"), weights_path = o.require("--weights"),
                    inputs_path = o.require("--inputs"), out_path = o.require("--out");
  const run_settings rs = settings_from(o);
  std::optional<double> lora_alpha;
  if (o.has("--lora-alpha")) {
    const std::string a = o.get("--lora-alpha");
    char* end = nullptr;
    const double v = std::strtod(a.c_str(), &end);
    if (a.empty() || *end != '\0' || !std::isfinite(v)) throw cli::usage_error("--lora-alpha needs a number, got '" + a + "'");
    lora_alpha = v;
  }
  const s2v_config cfg = s2v_config::load(config_path);
  nlohmann::json config_json;
  {
    std::ifstream in(config_path);
    config_json = nlohmann::json::parse(in);  // load() above already refused invalid JSON
  }
  const checkpoint inputs = checkpoint::open(inputs_path);
  const s2v_stream_spec spec = parse_s2v_stream(config_json, config_path, inputs);
  std::set<std::string> names;
  for (const auto& c : spec.calls)
    if (!names.insert(c.name).second) throw error(config_path + ": two calls are named '" + c.name + "'");
  const s2v_model m(cfg, s2v_workload_of(spec, inputs), rs.model_options);
  s2v_check_calls(m, spec, inputs);  // every call's inputs, before any rank starts

  const checkpoint ck = checkpoint::open(weights_path);
  for (const auto& n : unknown_tensors(m, ck, {"input.", "ref."})) {
    if (o.has("--strict")) throw error(weights_path + ": unknown tensor '" + n + "' (--strict)");
    std::fprintf(stderr, "unshard-avatar: warning: %s: unknown tensor '%s' ignored\n", weights_path.c_str(), n.c_str());
  }
  const checkpoint_weights base(ck);
  safetensors_writer out;
  const auto t0 = std::chrono::steady_clock::now();
  if (o.has("--lora")) {
    // LoRA merged per shard while each rank loads (runtime/lora_weights.hpp).
    const checkpoint lora = checkpoint::open(o.get("--lora"));
    const lora_weights<checkpoint_weights> merged(base, lora, lora_alpha);
    run_stream(m, merged, rs, spec, inputs, out);
  } else {
    run_stream(m, base, rs, spec, inputs, out);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  out.set_metadata("producer", "unshard-avatar");
  out.write(out_path);
  std::fprintf(stderr, "unshard-avatar: %s, world size %zu, %zu calls in %.3f s, wrote %s\n",
               rs.policy.values.name.c_str(), rs.world_size, spec.calls.size(), secs, out_path.c_str());
  return 0;
}

// A small random-weight model streamed for several blocks: no file, no download, no GPU. The noisy
// cache holds two blocks, so the stream wraps it; the last output is compared with a world-size-1
// run of the same stream.
int run_demo(const cli::options& o) {
  run_settings rs = settings_from(o);
  if (!o.has("--world-size")) rs.world_size = 2;
  const s2v_config cfg = s2v_config::from_json(
      nlohmann::json{{"dim", 128}, {"ffn_dim", 256}, {"freq_dim", 64}, {"text_dim", 64}, {"text_len", 16},
                     {"num_heads", 4}, {"num_layers", 4}, {"cond_dim", 16}, {"audio_dim", 32},
                     {"audio_inject_layers", {0, 2}}, {"enable_adain", true}, {"zero_timestep", true},
                     {"enable_motioner", false}, {"enable_framepack", true}, {"framepack_drop_mode", "padd"}},
      "demo config");
  s2v_workload work;
  work.latent_hw = {16, 16};
  work.context_len = 8;
  work.noisy_cache_tokens = 2 * 3 * 64;  // two blocks: block 2 on wraps the ring
  work.denoising_steps = 2;
  const s2v_model m(cfg, work, rs.model_options);
  const s2v_geometry& g = m.geometry();
  const synthetic_weights weights(m, 11);
  const auto wave = [](std::size_t n, float f, float a) {
    std::vector<float> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = a * std::sin(f * static_cast<float>(i));
    return v;
  };
  const std::size_t HW = g.height * g.width;
  std::vector<float> ref = wave(g.in_dim * HW, 0.011f, 1.f), motion = wave(16 * g.motion_latent_frames * HW, 0.007f, 1.f),
                     ctx = wave(8 * g.text_dim, 0.05f, 0.5f), cond = wave(g.cond_dim * g.frames * HW, 0.013f, 0.3f),
                     audio = wave(s2v_audio_layers * g.audio_dim * g.audio_frames, 0.021f, 1.f);
  const auto view = [](std::vector<float>& v, shape d) { return tensor_view(v.data(), dtype::f32, d); };
  const auto i64 = [](std::size_t v) { return static_cast<std::int64_t>(v); };
  const s2v_sink_inputs sink{view(ref, {i64(g.in_dim), 1, i64(g.height), i64(g.width)}),
                             view(motion, {16, i64(g.motion_latent_frames), i64(g.height), i64(g.width)}),
                             view(ctx, {8, i64(g.text_dim)})};
  const std::size_t blocks = 4;
  const double sigmas[2] = {1000.0, 500.0};

  std::printf("unshard-avatar demo: S2V dim %zu, %zu blocks + %zu audio injectors, %zu tokens per block, %zu cond tokens,"
              " world size %zu, policy %s\n", g.dim, g.num_layers, g.injectors, g.block_tokens, g.cond_tokens,
              rs.world_size, rs.policy.values.name.c_str());
  const s2v_counts counts = count_s2v(cfg, work);
  std::printf("parameters %lld (blocks %lld, outside blocks %lld, of which audio injectors %lld); KV cache %zu bytes "
              "(cond %zu + %zu steps x %zu)\n", static_cast<long long>(counts.total), static_cast<long long>(counts.blocks),
              static_cast<long long>(counts.outside_blocks), static_cast<long long>(counts.injectors), counts.kv_cache_bytes,
              counts.cond_cache_bytes, g.steps, counts.noisy_cache_bytes);

  const auto run = [&](std::size_t world, const policy_values& policy, bool verbose) {
    session_options opt;
    opt.world_size = world;
    opt.policy = policy;
    s2v_stream<> stream(m, weights, opt);
    stream.sink(sink);
    s2v_relative_dist_generator relative_dist(2026);
    std::vector<float> x = wave(g.in_dim * g.frames * HW, 0.017f, 1.f), last;
    for (std::size_t b = 0; b < blocks; ++b) {
      const auto t0 = std::chrono::steady_clock::now();
      for (std::size_t i = 0; i < g.steps; ++i) {
        std::vector<float> t(g.frames, static_cast<float>(sigmas[i]));
        s2v_step_inputs in{view(x, {i64(g.in_dim), i64(g.frames), i64(g.height), i64(g.width)}),
                           view(t, {i64(g.frames)}),
                           view(cond, {i64(g.cond_dim), i64(g.frames), i64(g.height), i64(g.width)}),
                           view(audio, {i64(s2v_audio_layers), i64(g.audio_dim), i64(g.audio_frames)}),
                           sink.context, b, i, relative_dist()};
        stream.step(in, [&](std::size_t rank, const s2v_state& s) {
          if (rank != 0) return;
          const auto out = m.output(s).as<const float>();
          last.assign(out.begin(), out.end());
        });
        for (std::size_t k = 0; k < x.size(); ++k) x[k] -= 0.25f * last[k];  // a toy Euler update
      }
      if (verbose)
        std::printf("block %zu: %zu steps in %.3f s\n", b, g.steps,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    if (verbose) cli::print_rank_peaks(stream.runtime());
    return last;
  };
  const std::vector<float> sharded = run(rs.world_size, rs.policy.values, true);
  const std::vector<float> single = run(1, parse_policy("full").values, false);
  double max_diff = 0;
  for (std::size_t i = 0; i < sharded.size(); ++i)
    max_diff = std::max(max_diff, static_cast<double>(std::fabs(sharded[i] - single[i])));
  std::printf("last block's output: max |sharded - world size 1 full| = %g\n", max_diff);
  return max_diff <= 1e-5 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  return unshard::cli::run_tool("unshard-avatar", usage, [&] {
    const unshard::cli::options o(argc, argv,
                                  {"--config", "--weights", "--lora", "--lora-alpha", "--inputs", "--out", "--world-size",
                                   "--policy", "--dtype", "--gemm", "--budget"},
                                  {"--strict", "--demo"});
    return o.has("--demo") ? run_demo(o) : run_files(o);
  });
}
