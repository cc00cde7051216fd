// unshard-dit --backend cuda: the Wan DiT as wan::cuda_model under session<_, cuda_backend>.
// The only CUDA translation unit of unshard-dit (nvcc compiles it; unshard_dit.cpp stays C++).
#include "dit_cuda.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "common/cli.hpp"
#include "unshard/backend/cuda/bootstrap.hpp"
#include "unshard/backend/cuda/cuda_backend.cuh"
#include "unshard/backend/net/launch_env.hpp"
#include "unshard/backend/net/rendezvous.hpp"
#include "unshard/models/wan/cuda/model.cuh"
#include "unshard/runtime/checkpoint_weights.hpp"
#include "unshard/runtime/process_session.hpp"

namespace unshard::tools {
namespace {

template <class Session>
void write_trace(Session& s, const std::string& trace_path) {
  std::ofstream f(trace_path);
  if (!f) throw error("cannot write the trace to '" + trace_path + "'");
  s.trace()->write_chrome_json(f, [&](std::uint32_t u) { return s.units()[u].name; });
}

// Under a launcher: this process is one rank, on GPU LOCAL_RANK; the ncclUniqueId travels over the
// TCP rendezvous at MASTER_ADDR:MASTER_PORT.
template <weight_source S>
dit_cuda_outputs run_one_rank(const wan::cuda_model& m, const S& weights, session_options opt, const tensor_view& x,
                              const tensor_view& t, const tensor_view& ctx, const std::string& trace_path) {
  const net::launch_env env = net::read_launch_env();
  net::rendezvous rv(env);
  cuda_world world(env, cuda::exchange_over(rv));
  opt.world_size = 0;  // the job's
  process_session<wan::cuda_model, cuda_backend> s(m, weights, world, env.rank, opt);
  dit_cuda_outputs out;
  out.writer = s.rank() == 0;
  out.world_size = s.world_size();
  const auto t0 = std::chrono::steady_clock::now();
  s.forward([&](std::size_t, wan::cuda_state& st) { m.set_inputs(st, x, t, ctx); },
            [&](std::size_t rank, const wan::cuda_state& st) {
              if (rank != 0) return;
              out.output = m.copy_output(st);
              if (m.geometry().record_block_outputs)  // only with --block-outputs
                for (std::size_t i = 0; i < m.geometry().num_layers; ++i) out.blocks.push_back(m.copy_block_output(st, i));
            });
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s\n", s.peak_line().c_str());
  std::fflush(stdout);
  if (!trace_path.empty() && out.writer) write_trace(s, trace_path);
  return out;
}

template <weight_source S>
dit_cuda_outputs run(const wan::cuda_model& m, const S& weights, const session_options& opt, const tensor_view& x,
                     const tensor_view& t, const tensor_view& ctx, const std::string& trace_path) {
  if (launched_as_one_rank()) return run_one_rank(m, weights, opt, x, t, ctx, trace_path);
  session<wan::cuda_model, cuda_backend> s(m, weights, opt);
  dit_cuda_outputs out;
  const auto t0 = std::chrono::steady_clock::now();
  s.forward([&](std::size_t, wan::cuda_state& st) { m.set_inputs(st, x, t, ctx); },
            [&](std::size_t rank, const wan::cuda_state& st) {
              if (rank != 0) return;
              out.output = m.copy_output(st);  // waits for rank 0's compute stream
              if (m.geometry().record_block_outputs)  // only with --block-outputs
                for (std::size_t i = 0; i < m.geometry().num_layers; ++i) out.blocks.push_back(m.copy_block_output(st, i));
            });
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  cli::print_rank_peaks(s);
  out.world_size = opt.world_size;
  if (!trace_path.empty()) write_trace(s, trace_path);
  return out;
}

wan::cuda_options cuda_options_of(const session_options& opt, bool bf16_compute) {
  wan::cuda_options co;
  co.fp8_weights = opt.policy.fp8;  // fp8 policies: scratch the weights are dequantized into
  co.precision = bf16_compute ? cuda_precision::bf16 : cuda_precision::f32;
  return co;
}

}  // namespace

bool launched_as_one_rank() { return std::getenv("RANK") != nullptr || std::getenv("SLURM_PROCID") != nullptr; }

dit_cuda_outputs run_dit_cuda(const wan::config& cfg, const wan::workload& work, const wan::options& model_options,
                              const checkpoint& ck, const session_options& opt, const tensor_view& x,
                              const tensor_view& t, const tensor_view& ctx, const std::string& trace_path,
                              bool bf16_compute) {
  const wan::cuda_options co = cuda_options_of(opt, bf16_compute);
  const wan::cuda_model m(cfg, work, model_options, co);
  return run(m, checkpoint_weights(ck), opt, x, t, ctx, trace_path);
}

dit_cuda_outputs run_dit_cuda(const wan::config& cfg, const wan::workload& work, const wan::options& model_options,
                              std::uint64_t seed, const session_options& opt, const tensor_view& x,
                              const tensor_view& t, const tensor_view& ctx, const std::string& trace_path,
                              bool bf16_compute) {
  const wan::cuda_options co = cuda_options_of(opt, bf16_compute);
  const wan::cuda_model m(cfg, work, model_options, co);
  return run(m, synthetic_weights(m, seed), opt, x, t, ctx, trace_path);  // the host model's names: its values
}

}  // namespace unshard::tools
