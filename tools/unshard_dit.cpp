// unshard-dit: the Wan DiT forward, sharded across ranks under a policy, from safetensors.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/cli.hpp"
#include "common/progress.hpp"
#include "unshard/io/checkpoint.hpp"
#include "unshard/io/safetensors_writer.hpp"
#include "unshard/models/wan/model.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/runtime/checkpoint_weights.hpp"
#include "unshard/runtime/reference_forward.hpp"
#include "unshard/runtime/process_session.hpp"
#include "unshard/runtime/session.hpp"
#include "unshard/runtime/synthetic_weights.hpp"
#if defined(UNSHARD_DIT_CUDA)
#include "dit_cuda.hpp"
#endif

namespace {
using namespace unshard;

constexpr const char* usage =
    "unshard-dit --config CONFIG.json --weights FILE.safetensors|INDEX.json --inputs FILE.safetensors "
    "--out OUT.safetensors [--world-size N] [--policy POLICY (full|selective[:subunit]|prefetch:K|offload|chunked:SIZE|fsdp, "
    "fp8|fp8:tensor, kv:device|kv:offload[:K], joined by +)] "
    "[--dtype f32|bf16] [--gemm portable|blas] [--budget SIZE] [--trace TRACE.json] [--strict] [--backend host|process|cuda "
    "[--compute f32|bf16]] [--block-outputs|--no-block-outputs]\n"
    "       unshard-dit --demo [--world-size N] [--policy P] [--backend host|process|cuda [--compute f32|bf16]]\n"
    "  --backend process: one rank per process, under unshard-launch --nproc N -- unshard-dit ... (or torchrun)\n"
    "  --compute (cuda only): f32 (default: the path checked against the references) or bf16 (every GEMM input and\n"
    "  q, k, v rounded to bf16: tensor-core GEMMs with f32 accumulation, bf16 attention)\n"
    "  --block-outputs: also keep every block's output and write it as block.I.out (num_layers x tokens x dim f32:\n"
    "  about 27 GB for Wan 14B at 832x480). By default only when the inputs file holds reference block outputs\n"
    "  (ref.block.0.out: a vectors file, whose refs the outputs then match); --no-block-outputs: never";

struct run_settings {
  std::size_t world_size = 1;
  bool world_size_given = false;
  parsed_policy policy;
  wan::options model_options;
  std::size_t budget = 0;
  std::string trace_path;
  bool cuda = false;  // --backend cuda: ranks are the local GPUs 0..N-1
  bool process = false;  // --backend process: this process is one rank of a launched job (unshard-launch, torchrun)
  bool bf16_compute = false;  // --compute bf16 (cuda only)
};

run_settings settings_from(const cli::options& o) {
  run_settings s;
  cli::read_sharding_options(o, s);
  s.world_size_given = o.has("--world-size");
  // Every block's output is num_layers x S x D f32 (Wan 14B at 832x480: 40 x 32760 x 5120 x 4 B,
  // about 27 GB) in the state: on request, or by default for a vectors file (block_outputs_for).
  if (o.has("--block-outputs") && o.has("--no-block-outputs"))
    throw cli::usage_error("--block-outputs and --no-block-outputs exclude each other");
  s.model_options.record_block_outputs = o.has("--block-outputs");
  s.trace_path = o.get("--trace");
  const std::string backend = o.get("--backend", "host");
  if (backend != "host" && backend != "cuda" && backend != "process")
    throw cli::usage_error("--backend must be host, process or cuda, got '" + backend + "'");
  s.cuda = backend == "cuda";
  s.process = backend == "process";
  const std::string compute = o.get("--compute", "f32");
  if (compute != "f32" && compute != "bf16") throw cli::usage_error("--compute must be f32 or bf16, got '" + compute + "'");
  if (o.has("--compute") && !s.cuda) throw cli::usage_error("--compute applies to --backend cuda only");
  s.bf16_compute = compute == "bf16";
#if !defined(UNSHARD_DIT_CUDA)
  if (s.cuda) throw cli::usage_error("--backend cuda: this unshard-dit was built without CUDA (configure with -DUNSHARD_ENABLE_CUDA=ON)");
#endif
  return s;
}

struct dit_outputs {
  std::vector<float> output;   // rank 0's (empty on the other ranks of a process job)
  std::vector<std::vector<float>> blocks;
  double seconds = 0;
  bool writer = true;          // this process holds rank 0's outputs
  std::size_t world_size = 1;
};

// What rank 0 keeps of a forward.
void collect(const wan::model& m, const wan::state& st, dit_outputs& out) {
  const tensor_view o = m.output(st);
  out.output.assign(o.as<float>().begin(), o.as<float>().end());
  out.blocks.clear();
  if (!m.geometry().record_block_outputs) return;
  for (std::size_t i = 0; i < m.geometry().num_layers; ++i) {
    const tensor_view b = m.block_output(st, i);
    out.blocks.emplace_back(b.as<float>().begin(), b.as<float>().end());
  }
}

session_options session_options_of(const run_settings& rs) {
  session_options opt;
  opt.world_size = rs.world_size;
  opt.policy = rs.policy.values;
  opt.budget_bytes = rs.budget;
  opt.trace = !rs.trace_path.empty();
  return opt;
}

template <class Session>
void write_trace(Session& s, const std::string& path);

template <weight_source S>
dit_outputs run_sharded(const wan::model& m, const S& weights, const run_settings& rs, const tensor_view& x,
                        const tensor_view& t, const tensor_view& ctx) {
  const session_options opt = session_options_of(rs);
  session<wan::model> s = cli::while_loading("unshard-dit", m, [&] { return session<wan::model>(m, weights, opt); });
  dit_outputs out;
  out.world_size = opt.world_size;
  const auto t0 = std::chrono::steady_clock::now();
  s.forward([&](std::size_t, wan::state& st) { m.set_inputs(st, x, t, ctx); },
            [&](std::size_t rank, const wan::state& st) {
              if (rank == 0) collect(m, st, out);
            });
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  cli::print_rank_peaks(s);
  if (opt.trace) write_trace(s, rs.trace_path);
  return out;
}

template <class Session>
void write_trace(Session& s, const std::string& path) {
  std::ofstream f(path);
  if (!f) throw error("cannot write the trace to '" + path + "'");
  s.trace()->write_chrome_json(f, [&](std::uint32_t u) { return s.units()[u].name; });
}

// --backend process: this process is rank RANK of WORLD_SIZE (launched by unshard-launch, torchrun
// or Slurm); the ranks meet at MASTER_ADDR:MASTER_PORT and gather over TCP. Each prints its own
// peak line; rank 0 keeps the outputs (and writes the trace, if asked).
template <weight_source S>
dit_outputs run_process(const wan::model& m, const S& weights, const run_settings& rs, const tensor_view& x,
                        const tensor_view& t, const tensor_view& ctx) {
  const auto job = process_job::from_environment();
  session_options opt = session_options_of(rs);
  opt.world_size = rs.world_size_given ? rs.world_size : 0;  // 0: the job's WORLD_SIZE
  process_session<wan::model> s =
      cli::while_loading("unshard-dit", m, [&] { return process_session<wan::model>(m, weights, job->world(), opt); });
  dit_outputs out;
  out.writer = s.rank() == 0;
  out.world_size = s.world_size();
  const auto t0 = std::chrono::steady_clock::now();
  s.forward([&](std::size_t, wan::state& st) { m.set_inputs(st, x, t, ctx); },
            [&](std::size_t rank, const wan::state& st) {
              if (rank == 0) collect(m, st, out);
            });
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s\n", s.peak_line().c_str());
  std::fflush(stdout);
  if (opt.trace && out.writer) write_trace(s, rs.trace_path);
  return out;
}

// --backend cuda: the same forward on the local GPUs (tools/dit_cuda.cu); W is the checkpoint or
// the demo's synthetic seed.
template <class W>
dit_outputs run_cuda(const wan::model& m, const wan::workload& work, const W& weights, const run_settings& rs,
                     const tensor_view& x, const tensor_view& t, const tensor_view& ctx) {
#if defined(UNSHARD_DIT_CUDA)
  tools::dit_cuda_outputs r = tools::run_dit_cuda(m.config(), work, rs.model_options, weights,
                                                  session_options_of(rs), x, t, ctx, rs.trace_path, rs.bf16_compute);
  return {std::move(r.output), std::move(r.blocks), r.seconds, r.writer, r.world_size};
#else
  (void)m, (void)work, (void)weights, (void)rs, (void)x, (void)t, (void)ctx;
  throw cli::usage_error("--backend cuda: this unshard-dit was built without CUDA");
#endif
}

shape dims_of(std::initializer_list<std::int64_t> d) { return shape(d); }

void write_outputs(const std::string& path, const wan::model& m, const dit_outputs& out) {
  safetensors_writer w;
  const tensor_view o(const_cast<float*>(out.output.data()), dtype::f32, m.output(wan::state{}).dims());
  w.add("output", o.dims(), out.output);
  const auto S = static_cast<std::int64_t>(m.geometry().tokens), D = static_cast<std::int64_t>(m.geometry().dim);
  for (std::size_t i = 0; i < out.blocks.size(); ++i) w.add("block." + std::to_string(i) + ".out", dims_of({S, D}), out.blocks[i]);
  w.set_metadata("producer", "unshard-dit");
  w.write(path);
}

int run_files(const cli::options& o) {
  const std::string config_path = o.require("--config"), weights_path = o.require("--weights"),
                    inputs_path = o.require("--inputs"), out_path = o.require("--out");
  run_settings rs = settings_from(o);
  const wan::config cfg = wan::config::load(config_path);
  const checkpoint inputs = checkpoint::open(inputs_path);
  // A vectors file carries the reference block outputs: the outputs then include the matching ones.
  if (!o.has("--block-outputs") && !o.has("--no-block-outputs"))
    rs.model_options.record_block_outputs = inputs.find("ref.block.0.out") != nullptr;
  const tensor_view x = finite_input(inputs, "input.x"), t = finite_input(inputs, "input.t"),
                    ctx = finite_input(inputs, "input.context");
  if (x.dims().rank() != 4) throw error(inputs_path + ": input.x has shape " + x.dims().to_string() + ", expected [C,F,H,W]");
  if (ctx.dims().rank() != 2) throw error(inputs_path + ": input.context has shape " + ctx.dims().to_string() + ", expected [L,text_dim]");
  const wan::workload work{{x.dims()[0], x.dims()[1], x.dims()[2], x.dims()[3]}, ctx.dims()[0]};
  const wan::model m(cfg, work, rs.model_options);
  const checkpoint ck = checkpoint::open(weights_path);
  for (const auto& n : unknown_tensors(m, ck, {"input.", "ref."})) {
    if (o.has("--strict")) throw error(weights_path + ": unknown tensor '" + n + "' (--strict)");
    std::fprintf(stderr, "unshard-dit: warning: %s: unknown tensor '%s' ignored\n", weights_path.c_str(), n.c_str());
  }
  const checkpoint_weights weights(ck);
  const dit_outputs out = rs.cuda      ? run_cuda(m, work, ck, rs, x, t, ctx)
                          : rs.process ? run_process(m, weights, rs, x, t, ctx)
                                       : run_sharded(m, weights, rs, x, t, ctx);
  if (!out.writer) return 0;
  write_outputs(out_path, m, out);
  std::fprintf(stderr, "unshard-dit: %s, world size %zu, forward %.3f s, wrote %s\n", rs.policy.values.name.c_str(),
               out.world_size, out.seconds, out_path.c_str());
  return 0;
}

// A small random-weight Wan model, sharded, against the unsharded forward: no file, no download.
int run_demo(const cli::options& o) {
  run_settings rs = settings_from(o);
  if (!o.has("--world-size") && !rs.process) rs.world_size = 4;
  const wan::config cfg = wan::config::from_json(
      nlohmann::json{{"dim", 256}, {"ffn_dim", 1024}, {"freq_dim", 64}, {"text_dim", 128}, {"text_len", 32},
                     {"in_dim", 16}, {"out_dim", 16}, {"num_heads", 4}, {"num_layers", 6}},
      "demo config");
  const wan::workload work{{16, 4, 16, 16}, 20};
  const wan::model m(cfg, work, rs.model_options);
  const synthetic_weights weights(m, 7);
  std::vector<float> xs(16 * 4 * 16 * 16), cs(20 * 128);
  for (std::size_t i = 0; i < xs.size(); ++i) xs[i] = std::sin(0.013f * static_cast<float>(i));
  for (std::size_t i = 0; i < cs.size(); ++i) cs[i] = std::cos(0.07f * static_cast<float>(i)) * 0.5f;
  float tv = 500.f;
  const tensor_view x(xs.data(), dtype::f32, dims_of({16, 4, 16, 16})), t(&tv, dtype::f32, dims_of({1})),
      ctx(cs.data(), dtype::f32, dims_of({20, 128}));

  std::printf("unshard-dit demo: Wan DiT dim %zu, %zu blocks, %zu tokens, world size %zu, policy %s\n",
              m.geometry().dim, m.geometry().num_layers, m.geometry().tokens, rs.world_size,
              rs.policy.values.name.c_str());
  std::printf("ledger per rank, by policy (bytes):\n");
  for (const char* p : {"full", "fsdp", "selective", "prefetch:1", "prefetch:2", "offload+prefetch:1",
                        "chunked:64KiB+prefetch:1"}) {
    const memory_plan plan = plan_memory(m, rs.world_size, parse_policy(p).values);
    std::printf("  %-36s peak=%10zu  %s  host=%zu\n", plan.policy.c_str(), plan.peak_bytes(),
                plan.ranks[0].terms.to_string().c_str(), plan.ranks[0].host_bytes);
  }
  const dit_outputs out = rs.cuda      ? run_cuda(m, work, std::uint64_t{7}, rs, x, t, ctx)
                          : rs.process ? run_process(m, weights, rs, x, t, ctx)
                                       : run_sharded(m, weights, rs, x, t, ctx);
  if (!out.writer) return 0;  // rank 0 of a process job checks the result
  reference_runner<wan::model> ref(m, weights);
  m.set_inputs(ref.state(), x, t, ctx);
  // fp8 weights: the unsharded oracle is the same policy on one rank (the reference runner reads
  // weights as declared), the same codes and scales.
  if (rs.policy.values.fp8) {
    session_options one;
    one.policy = rs.policy.values;
    session<wan::model> s(m, weights, one);
    s.forward([&](std::size_t, wan::state& st) { m.set_inputs(st, x, t, ctx); },
              [&](std::size_t, const wan::state& st) {
                const auto o = m.output(st).as<const float>();
                std::copy(o.begin(), o.end(), m.output(ref.state()).as<float>().begin());
              });
  } else {
    ref.forward();
  }
  const tensor_view want = m.output(ref.state());
  double max_diff = 0;
  for (std::size_t i = 0; i < out.output.size(); ++i)
    max_diff = std::max(max_diff, static_cast<double>(std::fabs(out.output[i] - want.as<float>()[i])));
  std::printf("sharded forward %.3f s; max |sharded - unsharded| = %g\n", out.seconds, max_diff);
  // The same GEMM on the same shapes is bit for bit; a BLAS on chunks of rows changes the shapes,
  // hence the summation order (docs/conventions.md: 1e-6 relative); GPU against host: the f32 rule.
  double ref_max = 0;
  for (const float v : want.as<float>()) ref_max = std::max(ref_max, static_cast<double>(std::fabs(v)));
  if (rs.cuda) return max_diff <= 1e-5 * std::max(1.0, ref_max) ? 0 : 1;
  if (rs.policy.values.chunked() && rs.model_options.gemm == gemm_path::blas)
    return max_diff <= 1e-6 * std::max(1.0, ref_max) ? 0 : 1;
  return max_diff == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  return unshard::cli::run_tool("unshard-dit", usage, argc, argv, [&] {
    const unshard::cli::options o(argc, argv,
                                  {"--config", "--weights", "--inputs", "--out", "--world-size", "--policy", "--dtype",
                                   "--gemm", "--budget", "--trace", "--backend", "--compute"},
                                  {"--strict", "--demo", "--block-outputs", "--no-block-outputs"});
    return o.has("--demo") ? run_demo(o) : run_files(o);
  });
}
