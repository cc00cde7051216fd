// unshard-avatar --backend cuda: the denoising loop as s2v::cuda_model under the CUDA backend. The
// only CUDA translation unit of unshard-avatar (nvcc compiles it; unshard_avatar.cpp stays C++).
#include "avatar_cuda.hpp"

#include <cstdio>
#include <cstdlib>

#include "common/avatar_loop.hpp"
#include "common/cli.hpp"
#include "unshard/backend/cuda/bootstrap.hpp"
#include "unshard/backend/cuda/cuda_backend.cuh"
#include "unshard/backend/net/launch_env.hpp"
#include "unshard/backend/net/rendezvous.hpp"
#include "unshard/models/liveavatar/cuda/model.cuh"
#include "unshard/ops/cudnn_attention.cuh"
#include "unshard/runtime/process_session.hpp"
#include "unshard/runtime/synthetic_weights.hpp"

namespace unshard::tools {
namespace {

bool under_launcher() { return std::getenv("RANK") != nullptr || std::getenv("SLURM_PROCID") != nullptr; }

template <weight_source S>
bool run_with(const s2v::cuda_model& m, const S& weights, const avatar_cuda_job& job,
              const std::function<void(s2v::block_result&&)>& on_result) {
  session_options opt = job.options;
  if (under_launcher()) {
    const net::launch_env env = net::read_launch_env();
    net::rendezvous rv(env);
    cuda_world world(env, cuda::exchange_over(rv));
    opt.world_size = 0;  // the job's
    process_session<s2v::cuda_model, cuda_backend> s(m, weights, world, env.rank, opt);
    const loop_timing t = run_loop_on(s, m, job.loop, *job.sink, *job.blocks, job.all_steps, on_result);
    std::printf("%s\n", s.peak_line().c_str());
    if (s.rank() == 0) print_timing(t, s.plan(), job.loop.sampler.steps);
    std::fflush(stdout);
    return s.rank() == 0;
  }
  session<s2v::cuda_model, cuda_backend> s(m, weights, opt);
  const loop_timing t = run_loop_on(s, m, job.loop, *job.sink, *job.blocks, job.all_steps, on_result);
  cli::print_rank_peaks(s);
  print_timing(t, s.plan(), job.loop.sampler.steps);
  return true;
}

}  // namespace

bool run_denoise_cuda(const avatar_cuda_job& job, const std::function<void(s2v::block_result&&)>& on_result) {
  if (!job.sink || !job.blocks) throw error("run_denoise_cuda: no sink inputs or blocks");
  s2v::cuda_options cuda_options;
  cuda_options.precision = job.bf16_compute ? cuda_precision::bf16 : cuda_precision::f32;
  cuda_options.attention_engine = make_cudnn_attention;
  // fp8 policies: scratch for the dequantized weights, and the activation path asked for.
  cuda_options.fp8_weights = job.options.policy.fp8;
  cuda_options.fp8_activations = job.fp8_activations ? cuda::fp8_activations::per_tensor : cuda::fp8_activations::none;
  const s2v::cuda_model m(job.config, job.workload, job.model_options, cuda_options);
  if (!job.weights) return run_with(m, synthetic_weights(m, job.synthetic_seed), job, on_result);
  bool rank0 = false;
  with_s2v_weights(*job.weights, job.lora, job.lora_alpha,
                   [&](const auto& weights) { rank0 = run_with(m, weights, job, on_result); });
  return rank0;
}

}  // namespace unshard::tools
