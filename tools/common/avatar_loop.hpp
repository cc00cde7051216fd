#pragma once
// unshard-avatar's denoising loop, shared by its host build (unshard_avatar.cpp) and its CUDA
// translation unit (avatar_cuda.cu): the loop on any session and model, its timing line, what rank
// 0 writes, and the weights (a checkpoint with a LoRA merged per shard).
#include <chrono>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "unshard/io/checkpoint.hpp"
#include "unshard/io/safetensors_writer.hpp"
#include "unshard/models/liveavatar/denoiser.hpp"
#include "unshard/models/liveavatar/loop_inputs.hpp"
#include "unshard/plan/ledger.hpp"
#include "unshard/runtime/checkpoint_weights.hpp"
#include "unshard/runtime/lora_weights.hpp"

namespace unshard::tools {

// What rank 0 writes: one latent per block (and every step's with --all-steps), F32, the refs' shapes.
inline void add_result(safetensors_writer& out, const s2v::block_result& r, const shape& dims) {
  const std::string n = "clip" + std::to_string(r.clip) + ".block" + std::to_string(r.block);
  out.add(n + ".latent", dims, r.latent);
  for (std::size_t i = 0; i < r.noise_pred.size(); ++i) {
    out.add(n + ".step" + std::to_string(i) + ".noise_pred", dims, r.noise_pred[i]);
    out.add(n + ".step" + std::to_string(i) + ".latent", dims, r.step_latent[i]);
  }
}

struct loop_timing {
  double sink_s = 0, denoise_s = 0;
  std::size_t ticks = 0, blocks = 0, frames_per_block = 0;
};

// The loop on any session: sink, then every block; rank 0's results go to on_result.
template <class Session, class Model, class OnResult>
loop_timing run_loop_on(Session& s, const Model& m, const s2v::loop_spec& loop, const s2v::sink_inputs& sink,
                        const std::vector<s2v::block>& blocks, bool all_steps, OnResult&& on_result) {
  s2v::denoiser den(m, s, {loop.sampler, loop.blocks_per_clip, all_steps});
  loop_timing t;
  const auto t0 = std::chrono::steady_clock::now();
  den.sink(sink);
  const auto t1 = std::chrono::steady_clock::now();
  den.denoise(blocks, on_result);
  const auto t2 = std::chrono::steady_clock::now();
  t.sink_s = std::chrono::duration<double>(t1 - t0).count();
  t.denoise_s = std::chrono::duration<double>(t2 - t1).count();
  t.ticks = den.ticks_run() - 1;
  t.blocks = blocks.size();
  t.frames_per_block = m.geometry().frames;
  return t;
}

inline void print_timing(const loop_timing& t, const memory_plan& plan, std::size_t steps) {
  const double video_frames = 4.0 * static_cast<double>(t.blocks * t.frames_per_block);
  std::fprintf(stderr,
               "unshard-avatar: denoise: schedule %s, %zu steps, world size %zu: sink %.3f s, %zu blocks in %zu ticks, "
               "%.4f s per tick, %.4f s per block, %.2f video frames per second\n",
               plan.schedule.c_str(), steps, plan.world_size, t.sink_s, t.blocks, t.ticks,
               t.ticks ? t.denoise_s / static_cast<double>(t.ticks) : 0.0, t.denoise_s / static_cast<double>(t.blocks),
               t.denoise_s > 0 ? video_frames / t.denoise_s : 0.0);
  std::printf("time_per_tick_s=%.6f frames_per_s=%.4f ticks=%zu denoise_s=%.6f\n",
              t.ticks ? t.denoise_s / static_cast<double>(t.ticks) : 0.0, t.denoise_s > 0 ? video_frames / t.denoise_s : 0.0,
              t.ticks, t.denoise_s);
}

// f(weights): the checkpoint's tensors, with `lora` (when given) merged into each rank's slice
// while it loads (runtime/lora_weights.hpp).
template <class F>
void with_s2v_weights(const checkpoint& base_file, const checkpoint* lora, std::optional<double> lora_alpha, F&& f) {
  const checkpoint_weights base(base_file);
  if (!lora) return f(base);
  const lora_weights<checkpoint_weights> merged(base, *lora, lora_alpha);
  f(merged);
}

}  // namespace unshard::tools
