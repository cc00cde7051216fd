#pragma once
// unshard-avatar --backend cuda (tools/avatar_cuda.cu, compiled by nvcc when UNSHARD_ENABLE_CUDA=ON):
// Live Avatar's denoising loop on s2v_cuda_model (the host model's forward over cuda_ops), sharded
// across GPUs by the CUDA backend under any policy and schedule.
#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "unshard/io/checkpoint.hpp"
#include "unshard/models/liveavatar/config.hpp"
#include "unshard/models/liveavatar/denoiser.hpp"
#include "unshard/models/liveavatar/geometry.hpp"
#include "unshard/models/liveavatar/loop_inputs.hpp"
#include "unshard/runtime/session.hpp"

namespace unshard::tools {

struct avatar_cuda_job {
  s2v::config config;
  s2v::workload workload;
  s2v::options model_options;
  const checkpoint* weights = nullptr;  // null: synthetic weights of synthetic_seed (the demo)
  const checkpoint* lora = nullptr;     // merged into each rank's slice while it loads
  std::optional<double> lora_alpha;
  std::uint64_t synthetic_seed = 0;
  session_options options;
  s2v::loop_spec loop;
  const s2v::sink_inputs* sink = nullptr;
  const std::vector<s2v::block>* blocks = nullptr;
  bool all_steps = false;
  bool bf16_compute = false;  // --compute bf16: tensor-core GEMMs and fused attention (else the f32 path)
  bool fp8_activations = false;  // --fp8-activations tensor: e4m3 x e4m3 GEMMs over per-tensor quantized inputs
};

// The loop on options.world_size local GPUs in this process (rank r on device r), or, under a
// launcher (RANK set), as this process's rank of the job on GPU LOCAL_RANK, NCCL bootstrapped over
// MASTER_ADDR:MASTER_PORT. Prints every rank's peak line and rank 0's timing; on_result receives
// rank 0's blocks in order. Returns whether this process holds rank 0.
bool run_denoise_cuda(const avatar_cuda_job& job, const std::function<void(s2v::block_result&&)>& on_result);

}  // namespace unshard::tools
