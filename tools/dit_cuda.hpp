#pragma once
// unshard-dit's CUDA path (tools/dit_cuda.cu, compiled by nvcc when UNSHARD_ENABLE_CUDA=ON): the
// Wan DiT as wan::cuda_model, sharded across GPUs by session<wan::cuda_model, cuda_backend>.
#include <string>
#include <vector>

#include "unshard/io/checkpoint.hpp"
#include "unshard/models/wan/config.hpp"
#include "unshard/models/wan/geometry.hpp"
#include "unshard/runtime/session.hpp"
#include "unshard/runtime/synthetic_weights.hpp"

namespace unshard::tools {

struct dit_cuda_outputs {
  std::vector<float> output;               // [C_out, F', H', W']
  std::vector<std::vector<float>> blocks;  // each [S, D]; empty unless record_block_outputs (--block-outputs)
  double seconds = 0;
  bool writer = true;                      // this process holds rank 0's outputs
  std::size_t world_size = 1;
};

// True when this process runs under a launcher (RANK or SLURM_PROCID set): it is then one rank of
// the job, on GPU LOCAL_RANK, and NCCL is bootstrapped over MASTER_ADDR:MASTER_PORT.
bool launched_as_one_rank();

// One forward with the weights of a checkpoint or synthetic ones (--demo): on `opt.world_size` local
// GPUs (ranks 0..N-1 on devices 0..N-1) in this process, or, under a launcher, as this process's
// rank of the job; prints the rank peak lines; rank 0 writes the trace if trace_path is not empty.
// x, t and ctx are host tensors. bf16_compute: wan::cuda_options' bf16 precision (attention on our
// flash kernel in bf16: this tool does not compile the cuDNN frontend).
dit_cuda_outputs run_dit_cuda(const wan::config& cfg, const wan::workload& work, const wan::options& model_options,
                              const checkpoint& weights, const session_options& opt, const tensor_view& x,
                              const tensor_view& t, const tensor_view& ctx, const std::string& trace_path,
                              bool bf16_compute = false);
dit_cuda_outputs run_dit_cuda(const wan::config& cfg, const wan::workload& work, const wan::options& model_options,
                              std::uint64_t synthetic_seed, const session_options& opt, const tensor_view& x,
                              const tensor_view& t, const tensor_view& ctx, const std::string& trace_path,
                              bool bf16_compute = false);

}  // namespace unshard::tools
