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

#include "common/avatar_loop.hpp"
#include "common/cli.hpp"
#if defined(UNSHARD_AVATAR_CUDA)
#include "avatar_cuda.hpp"
#endif
#include "common/progress.hpp"
#include "unshard/io/checkpoint.hpp"
#include "unshard/io/safetensors_writer.hpp"
#include "unshard/models/liveavatar/calls.hpp"
#include "unshard/models/liveavatar/count.hpp"
#include "unshard/models/liveavatar/denoiser.hpp"
#include "unshard/models/liveavatar/loop_inputs.hpp"
#include "unshard/models/liveavatar/stream.hpp"
#include "unshard/models/liveavatar/synthetic_loop.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/runtime/process_session.hpp"
#include "unshard/runtime/checkpoint_weights.hpp"
#include "unshard/runtime/lora_weights.hpp"
#include "unshard/runtime/synthetic_weights.hpp"

namespace {
using namespace unshard;
using tools::add_result;
using tools::loop_timing;
using tools::print_timing;
using tools::run_loop_on;

constexpr const char* usage =
    "unshard-avatar --config CONFIG.json --weights FILE.safetensors|INDEX.json [--lora LORA.safetensors "
    "[--lora-alpha A]] --inputs FILE.safetensors --out OUT.safetensors [--world-size N] [--policy POLICY] "
    "[--dtype f32|bf16] [--gemm portable|blas] [--budget SIZE] [--strict] [--backend host|process]\n"
    "       unshard-avatar --demo [--world-size N] [--policy POLICY] [--dtype f32|bf16]\n"
    "       unshard-avatar --denoise --config C --weights W --inputs I --out O [--world-size N] [--schedule steps|replicated]\n"
    "                      [--policy P] [--all-steps] [--seed N] [--backend host|process|cuda [--compute f32|bf16]\n"
    "                      [--fp8-activations none|tensor]] [--size WxH --clips N\n"
    "                      --blocks-per-clip N --steps N --shift X] (and --lora, --dtype, --gemm, --budget, --strict)\n"
    "       unshard-avatar --demo --denoise [--world-size N] [--schedule steps|replicated] [--policy P]\n"
    "  --denoise runs Live Avatar's denoising loop (sink, then every block through S Euler steps) and writes\n"
    "  clip{r}.block{b}.latent (with --all-steps also clip{r}.block{b}.step{i}.noise_pred and .latent).\n"
    "  The loop's geometry comes from the config's streaming/scheduler sections; for a plain Wan2.2-S2V\n"
    "  config the options give it (defaults 720x400, 1 clip of 4 blocks, 4 steps, shift 3).\n"
    "  --policy takes the terms of docs/conventions.md, fp8|fp8:tensor (2-D GEMM weights stored as f8e4m3 plus f32\n"
    "  scales per output channel or per tensor, quantized at load) and kv:device|kv:offload[:K] included: kv:offload keeps the KV\n"
    "  caches in (pinned) host memory and streams each block's pages in K blocks ahead (chunked:SIZE included).\n"
    "  --backend process: one rank per process under unshard-launch --nproc N -- unshard-avatar ... (both modes)\n"
    "  --backend cuda: the ranks are the local GPUs 0..N-1 (or, under a launcher, one GPU per process:\n"
    "  LOCAL_RANK); needs a build with -DUNSHARD_ENABLE_CUDA=ON. --compute f32 (default: the path checked\n"
    "  against the references) or bf16 (tensor-core GEMMs, cuDNN fused attention). fp8 policies run there too:\n"
    "  weight-only by default (codes dequantized per chunk, then the f32/bf16 GEMM); --fp8-activations tensor\n"
    "  quantizes each GEMM's input to e4m3 with one scale per tensor and multiplies on fp8 tensor cores (sm_89+;\n"
    "  as the official --fp8; cuda backend with an fp8 policy only).";

struct run_settings {
  std::size_t world_size = 1;
  parsed_policy policy;
  s2v::options model_options;
  std::size_t budget = 0;
  bool world_size_given = false;
  bool process = false;  // the forward mode's --backend process (--denoise reads its own, denoise_settings)
};

run_settings settings_from(const cli::options& o) {
  run_settings s;
  cli::read_sharding_options(o, s);
  s.world_size_given = o.has("--world-size");
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

// Runs every call of the recorded stream; rank 0's results go into `out` (in a process job, only
// the process of rank 0 sees them). `report`: this process prints each call's time.
template <class Stream>
void run_calls(Stream& stream, const s2v::model& m, const s2v::stream_spec& spec, const checkpoint& inputs,
               safetensors_writer& out, bool report) {
  const s2v::geometry& g = m.geometry();
  for (const s2v::call_spec& c : spec.calls) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto collect = [&](std::size_t rank, const s2v::state& s) {
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
    if (c.sink) stream.sink(s2v::sink_of(c, inputs), collect);
    else stream.step(s2v::step_of(m, c, inputs), collect);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (report)
      std::fprintf(stderr, "unshard-avatar: call '%s' (%s) %.3f s\n", c.name.c_str(), c.sink ? "sink" : "streamed", secs);
  }
}

struct stream_run {
  bool writer = true;          // this process holds rank 0's outputs
  std::size_t world_size = 1;  // the job's
};

// The recorded stream on every rank of this process (host threads), or, under --backend process,
// on this process's rank of the launched job (every rank prints its own peak line).
template <weight_source S>
stream_run run_stream(const s2v::model& m, const S& weights, const run_settings& rs, const s2v::stream_spec& spec,
                      const checkpoint& inputs, safetensors_writer& out) {
  if (rs.process) {
    const auto job = process_job::from_environment();
    session_options opt = session_options_of(rs);
    opt.world_size = rs.world_size_given ? rs.world_size : 0;  // 0: the job's WORLD_SIZE
    using process_stream = s2v::stream<process_session<s2v::model>>;
    process_stream stream =
        cli::while_loading("unshard-avatar", m, [&] { return process_stream(m, weights, job->world(), opt); });
    const bool rank0 = stream.runtime().rank() == 0;
    run_calls(stream, m, spec, inputs, out, rank0);
    std::printf("%s\n", stream.runtime().peak_line().c_str());
    std::fflush(stdout);
    return {rank0, stream.runtime().world_size()};
  }
  s2v::stream<> stream = cli::while_loading("unshard-avatar", m, [&] { return s2v::stream<>(m, weights, session_options_of(rs)); });
  run_calls(stream, m, spec, inputs, out, true);
  cli::print_rank_peaks(stream.runtime());
  return {true, rs.world_size};
}

// --lora-alpha, read before anything loads (a bad value is a usage error).
std::optional<double> lora_alpha_of(const cli::options& o) {
  if (!o.has("--lora-alpha")) return std::nullopt;
  const std::string a = o.get("--lora-alpha");
  char* end = nullptr;
  const double v = std::strtod(a.c_str(), &end);
  if (a.empty() || *end != '\0' || !std::isfinite(v)) throw cli::usage_error("--lora-alpha needs a number, got '" + a + "'");
  return v;
}

nlohmann::json read_config_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);  // s2v::config::load has already refused invalid JSON
}

// The model's weights from --weights (an unknown tensor is a warning, an error under --strict), with
// --lora merged per shard while each rank loads (runtime/lora_weights.hpp); f(weights) runs the job.
void warn_unknown_tensors(const cli::options& o, const s2v::model& m, const checkpoint& ck) {
  const std::string weights_path = o.require("--weights");
  for (const auto& n : unknown_tensors(m, ck, {"input.", "ref."})) {
    if (o.has("--strict")) throw error(weights_path + ": unknown tensor '" + n + "' (--strict)");
    std::fprintf(stderr, "unshard-avatar: warning: %s: unknown tensor '%s' ignored\n", weights_path.c_str(), n.c_str());
  }
}

template <class F>
void with_weights(const cli::options& o, const s2v::model& m, std::optional<double> lora_alpha, F&& f) {
  const checkpoint ck = checkpoint::open(o.require("--weights"));
  warn_unknown_tensors(o, m, ck);
  if (!o.has("--lora")) return tools::with_s2v_weights(ck, nullptr, lora_alpha, f);
  const checkpoint lora = checkpoint::open(o.get("--lora"));
  tools::with_s2v_weights(ck, &lora, lora_alpha, f);
}

// ---- --denoise: the denoising loop ----------------------------------------------------------

struct denoise_settings {
  schedule_kind schedule = schedule_kind::steps;
  bool all_steps = false;
  bool process = false;  // --backend process: this process is one rank of a launched job
  bool cuda = false;     // --backend cuda: the ranks are GPUs
  bool bf16_compute = false;  // --compute bf16 (cuda only)
  bool fp8_activations = false;  // --fp8-activations tensor (cuda with an fp8 policy only)
  std::uint64_t seed = 0;
  s2v::loop_spec cli_loop;                   // Live Avatar's defaults, or the options'
  std::vector<std::string> loop_overrides;  // the loop options given explicitly
};

double parse_number(const cli::options& o, const std::string& key, double fallback) {
  if (!o.has(key)) return fallback;
  const std::string v = o.get(key);
  char* end = nullptr;
  const double d = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || !std::isfinite(d)) throw cli::usage_error(key + " needs a number, got '" + v + "'");
  return d;
}

denoise_settings denoise_settings_from(const cli::options& o) {
  denoise_settings d;
  try {
    d.schedule = parse_schedule(o.get("--schedule", "steps"));
  } catch (const error& e) {
    throw cli::usage_error(std::string("--schedule: ") + e.what());
  }
  d.all_steps = o.has("--all-steps");
  const std::string backend = o.get("--backend", "host");
  if (backend != "host" && backend != "process" && backend != "cuda")
    throw cli::usage_error("--backend must be host, process or cuda, got '" + backend + "'");
  d.process = backend == "process";
  d.cuda = backend == "cuda";
  const std::string fp8_act = o.get("--fp8-activations", "none");
  if (fp8_act != "none" && fp8_act != "tensor")
    throw cli::usage_error("--fp8-activations must be none or tensor, got '" + fp8_act + "'");
  d.fp8_activations = fp8_act == "tensor";
  if (d.fp8_activations && !d.cuda)
    throw cli::usage_error("--fp8-activations tensor applies to --backend cuda only (the host backends run fp8 weights "
                           "weight-only: an fp8 GEMM on activation codes is a tensor-core speed-up, not a host one)");
  if (d.fp8_activations && !(o.has("--policy") && parse_policy(o.get("--policy")).values.fp8))  // parsed before
    throw cli::usage_error("--fp8-activations tensor needs fp8 weights (a policy with fp8 or fp8:tensor)");
  const std::string compute = o.get("--compute", "f32");
  if (compute != "f32" && compute != "bf16") throw cli::usage_error("--compute must be f32 or bf16, got '" + compute + "'");
  if (o.has("--compute") && !d.cuda) throw cli::usage_error("--compute applies to --backend cuda only");
  d.bf16_compute = compute == "bf16";
#if !defined(UNSHARD_AVATAR_CUDA)
  if (d.cuda) throw cli::usage_error("--backend cuda: this unshard-avatar was built without CUDA (configure with -DUNSHARD_ENABLE_CUDA=ON)");
#endif
  d.seed = o.get_count("--seed", 0);
  std::int64_t w = 720, h = 400;
  if (o.has("--size")) {
    const std::string v = o.get("--size");
    const auto x = v.find_first_of("x*");
    char* e1 = nullptr;
    char* e2 = nullptr;
    if (x != std::string::npos) {
      w = std::strtoll(v.substr(0, x).c_str(), &e1, 10);
      h = std::strtoll(v.substr(x + 1).c_str(), &e2, 10);
    }
    if (x == std::string::npos || *e1 || *e2 || w <= 0 || h <= 0) throw cli::usage_error("--size must be WxH (e.g. 720x400), got '" + v + "'");
  }
  try {
    d.cli_loop = s2v::default_loop(w, h);
  } catch (const error& e) {
    throw cli::usage_error(e.what());
  }
  d.cli_loop.clips = o.get_count("--clips", d.cli_loop.clips);
  d.cli_loop.blocks_per_clip = o.get_count("--blocks-per-clip", d.cli_loop.blocks_per_clip);
  d.cli_loop.sampler.steps = o.get_count("--steps", d.cli_loop.sampler.steps);
  d.cli_loop.sampler.shift = parse_number(o, "--shift", d.cli_loop.sampler.shift);
  if (d.cli_loop.clips == 0) throw cli::usage_error("--clips must be at least 1 (got 0)");
  if (d.cli_loop.blocks_per_clip == 0) throw cli::usage_error("--blocks-per-clip must be at least 1 (got 0)");
  if (d.cli_loop.sampler.steps == 0) throw cli::usage_error("--steps must be at least 1 (got 0)");
  if (!(d.cli_loop.sampler.shift > 0)) throw cli::usage_error("--shift must be positive");
  for (const char* k : {"--size", "--clips", "--blocks-per-clip", "--steps", "--shift"})
    if (o.has(k)) d.loop_overrides.push_back(k);
  return d;
}

// The config's loop (streaming/scheduler sections), with the loop options given explicitly on top;
// a plain Wan2.2-S2V config takes the options' (or Live Avatar's defaults).
// The loop options given explicitly, over `s`.
void apply_loop_options(s2v::loop_spec& s, const denoise_settings& d) {
  for (const std::string& k : d.loop_overrides) {
    if (k == "--size") s.latent_hw = d.cli_loop.latent_hw;
    if (k == "--clips") s.clips = d.cli_loop.clips;
    if (k == "--blocks-per-clip") s.blocks_per_clip = d.cli_loop.blocks_per_clip;
    if (k == "--steps") s.sampler.steps = d.cli_loop.sampler.steps;
    if (k == "--shift") s.sampler.shift = d.cli_loop.sampler.shift;
  }
}

s2v::loop_spec loop_of(const nlohmann::json& config, const std::string& path, const denoise_settings& d) {
  s2v::loop_spec s = s2v::parse_loop(config, path, d.cli_loop);
  apply_loop_options(s, d);
  return s;
}

session_options loop_session_options(const run_settings& rs, const denoise_settings& d, const s2v::loop_spec& loop) {
  session_options opt = session_options_of(rs);
  opt.schedule = d.schedule;
  opt.steps = loop.sampler.steps;
  return opt;
}

#if defined(UNSHARD_AVATAR_CUDA)
// --backend cuda: the checkpoint (and LoRA) go to the CUDA translation unit, which loads each
// rank's slice onto its GPU.
bool denoise_cuda(const cli::options& o, const s2v::model& m, const run_settings& rs, const denoise_settings& d,
                  const s2v::loop_spec& loop, const checkpoint& inputs, std::optional<double> lora_alpha,
                  safetensors_writer& out) {
  const checkpoint ck = checkpoint::open(o.require("--weights"));
  warn_unknown_tensors(o, m, ck);
  std::optional<checkpoint> lora;
  if (o.has("--lora")) lora = checkpoint::open(o.get("--lora"));
  const s2v::sink_inputs sink = s2v::loop_sink(inputs);
  const std::vector<s2v::block> blocks = s2v::loop_blocks(loop, inputs, d.seed);
  tools::avatar_cuda_job job{m.config(), m.workload(), rs.model_options, &ck, lora ? &*lora : nullptr, lora_alpha, 0,
                             loop_session_options(rs, d, loop), loop, &sink, &blocks, d.all_steps, d.bf16_compute,
                             d.fp8_activations};
  return tools::run_denoise_cuda(job, [&](s2v::block_result&& r) { add_result(out, r, blocks.front().noise.dims()); });
}
#endif

template <weight_source S>
bool denoise_with(const s2v::model& m, const S& weights, const run_settings& rs, const denoise_settings& d,
                  const s2v::loop_spec& loop, const checkpoint& inputs, safetensors_writer& out) {
  session_options opt = loop_session_options(rs, d, loop);
  const s2v::sink_inputs sink = s2v::loop_sink(inputs);
  const std::vector<s2v::block> blocks = s2v::loop_blocks(loop, inputs, d.seed);
  const auto write = [&](s2v::block_result&& r) { add_result(out, r, blocks.front().noise.dims()); };
  if (d.process) {
    const auto job = process_job::from_environment();
    opt.world_size = rs.world_size_given ? rs.world_size : 0;  // 0: the job's WORLD_SIZE
    process_session<s2v::model> s =
        cli::while_loading("unshard-avatar", m, [&] { return process_session<s2v::model>(m, weights, job->world(), opt); });
    const loop_timing t = run_loop_on(s, m, loop, sink, blocks, d.all_steps, write);
    std::printf("%s\n", s.peak_line().c_str());
    if (s.rank() == 0) print_timing(t, s.plan(), loop.sampler.steps);
    std::fflush(stdout);
    return s.rank() == 0;
  }
  session<s2v::model> s = cli::while_loading("unshard-avatar", m, [&] { return session<s2v::model>(m, weights, opt); });
  const loop_timing t = run_loop_on(s, m, loop, sink, blocks, d.all_steps, write);
  cli::print_rank_peaks(s);
  print_timing(t, s.plan(), loop.sampler.steps);
  return true;
}

int run_denoise_files(const cli::options& o) {
  const std::string config_path = o.require("--config"), inputs_path = o.require("--inputs"), out_path = o.require("--out");
  o.require("--weights");
  run_settings rs = settings_from(o);
  rs.model_options.record_block_outputs = false;
  const denoise_settings d = denoise_settings_from(o);
  const std::optional<double> lora_alpha = lora_alpha_of(o);
  const s2v::config cfg = s2v::config::load(config_path);
  const s2v::loop_spec loop = loop_of(read_config_json(config_path), config_path, d);
  const checkpoint inputs = checkpoint::open(inputs_path);
  const s2v::model m(cfg, s2v::loop_workload(loop, inputs), rs.model_options);
  safetensors_writer out;
  bool writer = true;
#if defined(UNSHARD_AVATAR_CUDA)
  if (d.cuda) writer = denoise_cuda(o, m, rs, d, loop, inputs, lora_alpha, out);
#endif
  if (!d.cuda)
    with_weights(o, m, lora_alpha, [&](const auto& weights) { writer = denoise_with(m, weights, rs, d, loop, inputs, out); });
  if (!writer) return 0;
  out.set_metadata("producer", "unshard-avatar --denoise");
  out.write(out_path);
  std::fprintf(stderr, "unshard-avatar: wrote %s\n", out_path.c_str());
  return 0;
}

int run_files(const cli::options& o) {
  const std::string config_path = o.require("--config"), inputs_path = o.require("--inputs"), out_path = o.require("--out");
  o.require("--weights");
  run_settings rs = settings_from(o);
  const std::string backend = o.get("--backend", "host");
  if (backend == "cuda")
    throw cli::usage_error("--backend cuda runs the denoising loop (--denoise); the forward mode's recorded calls run on "
                           "the host backends (host or process)");
  if (backend != "host" && backend != "process")
    throw cli::usage_error("--backend must be host, process or cuda, got '" + backend + "'");
  rs.process = backend == "process";
  const std::optional<double> lora_alpha = lora_alpha_of(o);
  const s2v::config cfg = s2v::config::load(config_path);
  const checkpoint inputs = checkpoint::open(inputs_path);
  const s2v::stream_spec spec = s2v::parse_stream(read_config_json(config_path), config_path, inputs);
  std::set<std::string> names;
  for (const auto& c : spec.calls)
    if (!names.insert(c.name).second) throw error(config_path + ": two calls are named '" + c.name + "'");
  const s2v::model m(cfg, s2v::workload_of(spec, inputs), rs.model_options);
  s2v::check_calls(m, spec, inputs);  // every call's inputs, before any rank starts
  safetensors_writer out;
  const auto t0 = std::chrono::steady_clock::now();
  stream_run run;
  with_weights(o, m, lora_alpha, [&](const auto& weights) { run = run_stream(m, weights, rs, spec, inputs, out); });
  if (!run.writer) return 0;  // rank 0 of a process job writes the outputs
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  out.set_metadata("producer", "unshard-avatar");
  out.write(out_path);
  std::fprintf(stderr, "unshard-avatar: %s, world size %zu, %zu calls in %.3f s, wrote %s\n",
               rs.policy.values.name.c_str(), run.world_size, spec.calls.size(), secs, out_path.c_str());
  return 0;
}

// The demos' model: Live Avatar's structure (framepack, AdaIN audio injection, zero timestep) at a
// size that runs in seconds on a laptop core.
s2v::config demo_config() {
  return s2v::config::from_json(
      nlohmann::json{{"dim", 128}, {"ffn_dim", 256}, {"freq_dim", 64}, {"text_dim", 64}, {"text_len", 16},
                     {"num_heads", 4}, {"num_layers", 4}, {"cond_dim", 16}, {"audio_dim", 32},
                     {"audio_inject_layers", {0, 2}}, {"enable_adain", true}, {"zero_timestep", true},
                     {"enable_motioner", false}, {"enable_framepack", true}, {"framepack_drop_mode", "padd"}},
      "demo config");
}

// A small random-weight model streamed for several blocks: no file, no download, no GPU. The noisy
// cache holds two blocks, so the stream wraps it; the last output is compared with a world-size-1
// run of the same stream.
int run_demo(const cli::options& o) {
  run_settings rs = settings_from(o);
  if (!o.has("--world-size")) rs.world_size = 2;
  const s2v::config cfg = demo_config();
  s2v::workload work;
  work.latent_hw = {16, 16};
  work.context_len = 8;
  work.noisy_cache_tokens = 2 * 3 * 64;  // two blocks: block 2 on wraps the ring
  work.denoising_steps = 2;
  const s2v::model m(cfg, work, rs.model_options);
  const s2v::geometry& g = m.geometry();
  const synthetic_weights weights(m, 11);
  const auto wave = [](std::size_t n, float f, float a) {
    std::vector<float> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = a * std::sin(f * static_cast<float>(i));
    return v;
  };
  const std::size_t HW = g.height * g.width;
  std::vector<float> ref = wave(g.in_dim * HW, 0.011f, 1.f), motion = wave(16 * g.motion_latent_frames * HW, 0.007f, 1.f),
                     ctx = wave(8 * g.text_dim, 0.05f, 0.5f), cond = wave(g.cond_dim * g.frames * HW, 0.013f, 0.3f),
                     audio = wave(s2v::audio_layers * g.audio_dim * g.audio_frames, 0.021f, 1.f);
  const auto view = [](std::vector<float>& v, shape d) { return tensor_view(v.data(), dtype::f32, d); };
  const auto i64 = [](std::size_t v) { return static_cast<std::int64_t>(v); };
  const s2v::sink_inputs sink{view(ref, {i64(g.in_dim), 1, i64(g.height), i64(g.width)}),
                             view(motion, {16, i64(g.motion_latent_frames), i64(g.height), i64(g.width)}),
                             view(ctx, {8, i64(g.text_dim)})};
  const std::size_t blocks = 4;
  const double sigmas[2] = {1000.0, 500.0};

  std::printf("unshard-avatar demo: S2V dim %zu, %zu blocks + %zu audio injectors, %zu tokens per block, %zu cond tokens,"
              " world size %zu, policy %s\n", g.dim, g.num_layers, g.injectors, g.block_tokens, g.cond_tokens,
              rs.world_size, rs.policy.values.name.c_str());
  const s2v::counts counts = s2v::counts_of(cfg, work);
  std::printf("parameters %lld (blocks %lld, outside blocks %lld, of which audio injectors %lld); KV cache %zu bytes "
              "(cond %zu + %zu steps x %zu)\n", static_cast<long long>(counts.total), static_cast<long long>(counts.blocks),
              static_cast<long long>(counts.outside_blocks), static_cast<long long>(counts.injectors), counts.kv_cache_bytes,
              counts.cond_cache_bytes, g.steps, counts.noisy_cache_bytes);

  const auto run = [&](std::size_t world, const policy_values& policy, bool verbose) {
    session_options opt;
    opt.world_size = world;
    opt.policy = policy;
    s2v::stream<> stream(m, weights, opt);
    stream.sink(sink);
    s2v::relative_dist_generator relative_dist(2026);
    std::vector<float> x = wave(g.in_dim * g.frames * HW, 0.017f, 1.f), last;
    for (std::size_t b = 0; b < blocks; ++b) {
      const auto t0 = std::chrono::steady_clock::now();
      for (std::size_t i = 0; i < g.steps; ++i) {
        std::vector<float> t(g.frames, static_cast<float>(sigmas[i]));
        s2v::step_inputs in{view(x, {i64(g.in_dim), i64(g.frames), i64(g.height), i64(g.width)}),
                           view(t, {i64(g.frames)}),
                           view(cond, {i64(g.cond_dim), i64(g.frames), i64(g.height), i64(g.width)}),
                           view(audio, {i64(s2v::audio_layers), i64(g.audio_dim), i64(g.audio_frames)}),
                           sink.context, b, i, relative_dist()};
        stream.step(in, [&](std::size_t rank, const s2v::state& s) {
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
  // fp8 weights: the oracle is the same policy on one rank (the same codes and scales).
  const std::vector<float> single = run(1, rs.policy.values.fp8 ? rs.policy.values : parse_policy("full").values, false);
  double max_diff = 0;
  for (std::size_t i = 0; i < sharded.size(); ++i)
    max_diff = std::max(max_diff, static_cast<double>(std::fabs(sharded[i] - single[i])));
  std::printf("last block's output: max |sharded - world size 1 full| = %g\n", max_diff);
  return max_diff <= 1e-5 ? 0 : 1;
}

// --demo --denoise: the loop on a small random-weight model (2 clips of 2 blocks, 4 steps, the
// caches hold one clip so clip 1 wraps them), under the chosen schedule; its latents are compared
// with the sequential loop on one rank.
int run_demo_denoise(const cli::options& o) {
  run_settings rs = settings_from(o);
  rs.model_options.record_block_outputs = false;
  if (!o.has("--world-size")) rs.world_size = 2;
  const denoise_settings d = denoise_settings_from(o);
  const s2v::config cfg = demo_config();
  s2v::loop_spec loop;
  loop.clips = 2;
  loop.blocks_per_clip = 2;
  loop.latent_hw = {16, 16};
  apply_loop_options(loop, d);
  s2v::workload work;
  work.latent_hw = loop.latent_hw;
  work.context_len = 8;
  work.noisy_cache_tokens = static_cast<std::int64_t>(loop.blocks_per_clip) * 3 * (loop.latent_hw[0] / 2) * (loop.latent_hw[1] / 2);
  work.denoising_steps = static_cast<std::int64_t>(loop.sampler.steps);
  const s2v::model m(cfg, work, rs.model_options);
  const s2v::geometry& g = m.geometry();
  const synthetic_weights weights(m, 11);
  const s2v::synthetic_loop_inputs inputs(g, loop, 8, d.seed);
  const s2v::sink_inputs& sink = inputs.sink();
  const std::vector<s2v::block>& blocks = inputs.blocks();
  std::printf("unshard-avatar demo --denoise: S2V dim %zu, %zu blocks, %zu tokens per block; %zu clips x %zu blocks x %zu "
              "steps, schedule %s, world size %zu, policy %s\n", g.dim, g.num_layers, g.block_tokens, loop.clips,
              loop.blocks_per_clip, loop.sampler.steps, name_of(d.schedule), rs.world_size, rs.policy.values.name.c_str());
  const auto run = [&](std::size_t world, schedule_kind kind, const policy_values& policy, bool verbose) {
    session_options opt;
    opt.world_size = world;
    opt.policy = policy;
    opt.schedule = kind;
    session<s2v::model> s(m, weights, opt);
    std::vector<std::vector<float>> latents;
    const loop_timing t = run_loop_on(s, m, loop, sink, blocks, false, [&](s2v::block_result&& r) { latents.push_back(r.latent); });
    if (verbose) {
      cli::print_rank_peaks(s);
      print_timing(t, s.plan(), loop.sampler.steps);
    }
    return latents;
  };
  // --backend cuda: the sharded run on the GPUs, checked against the sequential loop on the host.
  const auto run_cuda = [&] {
    std::vector<std::vector<float>> latents;
#if defined(UNSHARD_AVATAR_CUDA)
    session_options opt;
    opt.world_size = rs.world_size;
    opt.policy = rs.policy.values;
    opt.schedule = d.schedule;
    const tools::avatar_cuda_job job{cfg, work, rs.model_options, nullptr, nullptr, std::nullopt, 11, opt, loop, &sink,
                                     &blocks, false, d.bf16_compute};
    tools::run_denoise_cuda(job, [&](s2v::block_result&& r) { latents.push_back(r.latent); });
#endif
    return latents;
  };
  const auto sharded = d.cuda ? run_cuda() : run(rs.world_size, d.schedule, rs.policy.values, true);
  const auto single =
      run(1, schedule_kind::replicated, rs.policy.values.fp8 ? rs.policy.values : parse_policy("full").values, false);
  if (sharded.size() != blocks.size() || single.size() != blocks.size()) throw error("demo: a block's latent is missing");
  double max_diff = 0;
  for (std::size_t k = 0; k < blocks.size(); ++k)
    for (std::size_t i = 0; i < sharded[k].size(); ++i)
      max_diff = std::max(max_diff, static_cast<double>(std::fabs(sharded[k][i] - single[k][i])));
  std::printf("final latents of %zu blocks: max |%s over %zu ranks - sequential on one rank| = %g\n", blocks.size(),
              name_of(d.schedule), rs.world_size, max_diff);
  return max_diff <= 1e-5 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  return unshard::cli::run_tool("unshard-avatar", usage, argc, argv, [&] {
    const unshard::cli::options o(argc, argv,
                                  {"--config", "--weights", "--lora", "--lora-alpha", "--inputs", "--out", "--world-size",
                                   "--policy", "--dtype", "--gemm", "--budget", "--schedule", "--seed", "--backend",
                                   "--size", "--clips", "--blocks-per-clip", "--steps", "--shift", "--compute",
                                   "--fp8-activations"},
                                  {"--strict", "--demo", "--denoise", "--all-steps"});
    if (!o.has("--denoise"))
      for (const char* k : {"--schedule", "--seed", "--size", "--clips", "--blocks-per-clip", "--steps", "--shift",
                            "--all-steps", "--compute", "--fp8-activations"})
        if (o.has(k)) throw cli::usage_error(std::string(k) + " applies to --denoise only");
    if (o.has("--demo") && o.get("--backend", "host") == "process")  // the demos check against a run in this process
      throw cli::usage_error("--backend process applies to runs from files (--config, --weights, --inputs), not --demo");
    if (o.has("--demo") && !o.has("--denoise") && o.get("--backend", "host") == "cuda")
      throw cli::usage_error("--backend cuda runs the denoising loop: use --demo --denoise");
    if (o.has("--demo") && o.has("--fp8-activations"))  // the demo checks against the sequential loop at 1e-5
      throw cli::usage_error("--fp8-activations applies to --denoise with --weights (not --demo)");
    if (o.has("--denoise")) return o.has("--demo") ? run_demo_denoise(o) : run_denoise_files(o);
    return o.has("--demo") ? run_demo(o) : run_files(o);
  });
}
