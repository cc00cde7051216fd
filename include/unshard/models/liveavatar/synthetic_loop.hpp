#pragma once
// Deterministic inputs for a denoising loop without any file: smooth waves for the reference and
// motion latents, the context, and each block's noise, cond states and audio, with draws from the
// seeded generator. For demos and benchmarks (random weights come from runtime/synthetic_weights).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "unshard/models/liveavatar/denoiser.hpp"
#include "unshard/models/liveavatar/loop_inputs.hpp"

namespace unshard::s2v {

class synthetic_loop_inputs {
 public:
  synthetic_loop_inputs(const s2v::geometry& g, const s2v::loop_spec& loop, std::size_t context_len, std::uint64_t seed = 0) {
    const std::size_t HW = g.height * g.width;
    storage_.reserve(3 + 3 * loop.blocks());  // views point into it: no reallocation
    sink_.ref_latents = keep(wave(g.in_dim * HW, 0.011f, 1.f), {n(g.in_dim), 1, n(g.height), n(g.width)});
    sink_.motion_latents = keep(wave(s2v::pack_channels * g.motion_latent_frames * HW, 0.007f, 1.f),
                                {n(s2v::pack_channels), n(g.motion_latent_frames), n(g.height), n(g.width)});
    sink_.context = keep(wave(context_len * g.text_dim, 0.05f, 0.5f), {n(context_len), n(g.text_dim)});
    const s2v::relative_dist_draws draws(seed);
    for (std::size_t k = 0; k < loop.blocks(); ++k) {
      s2v::block b;
      b.clip = k / loop.blocks_per_clip;
      b.block = k % loop.blocks_per_clip;
      const float f = 0.001f * static_cast<float>(k);  // every block its own inputs
      b.noise = keep(wave(g.in_dim * g.frames * HW, 0.017f + f, 1.f), {n(g.in_dim), n(g.frames), n(g.height), n(g.width)});
      b.cond_states = keep(wave(g.cond_dim * g.frames * HW, 0.013f + f, 0.3f), {n(g.cond_dim), n(g.frames), n(g.height), n(g.width)});
      b.audio = keep(wave(s2v::audio_layers * g.audio_dim * g.audio_frames, 0.021f + f, 1.f),
                     {n(s2v::audio_layers), n(g.audio_dim), n(g.audio_frames)});
      for (std::size_t i = 0; i < loop.sampler.steps; ++i) b.relative_dist.push_back(draws(b.clip, b.block, i));
      blocks_.push_back(std::move(b));
    }
  }
  synthetic_loop_inputs(const synthetic_loop_inputs&) = delete;
  synthetic_loop_inputs& operator=(const synthetic_loop_inputs&) = delete;

  const s2v::sink_inputs& sink() const noexcept { return sink_; }
  const std::vector<s2v::block>& blocks() const noexcept { return blocks_; }

 private:
  static std::int64_t n(std::size_t v) { return static_cast<std::int64_t>(v); }
  static std::vector<float> wave(std::size_t count, float freq, float amp) {
    std::vector<float> v(count);
    for (std::size_t i = 0; i < count; ++i) v[i] = amp * std::sin(freq * static_cast<float>(i));
    return v;
  }
  tensor_view keep(std::vector<float> v, shape d) {
    storage_.push_back(std::move(v));
    return tensor_view(storage_.back().data(), dtype::f32, d);
  }

  std::vector<std::vector<float>> storage_;
  s2v::sink_inputs sink_;
  std::vector<s2v::block> blocks_;
};

}  // namespace unshard::s2v
