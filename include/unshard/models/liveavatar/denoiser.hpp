#pragma once
// Live Avatar's denoising loop over the sharded S2V model: the cond prefill ("sink") once, then
// every block through S Euler steps, step i on its own noisy KV cache, exactly as the sequential
// loop of the official single-GPU pipeline (causal_s2v_pipeline.py generate(); vectors README
// §7), under either schedule of the session it runs on (schedule/schedule.hpp):
//
//   session<s2v::model> s(model, weights, {.world_size = 4, .policy = ..., .schedule = schedule_kind::steps});
//   s2v::denoiser den(model, s, flow_match_config{1000, 3.0, 4});
//   den.sink({ref_latents, motion_latents, context});
//   den.denoise(blocks, [&](const s2v::block_result& r) { write r.latent });   // pipelined
//   s2v::block_result r = den.denoise_block(block);                            // one block
//
// Under `steps` the blocks are pipelined: at tick t the rank of step s runs block t - s, and the
// latent moves on to the rank of step s + 1 between ticks; the results arrive at rank 0 in block
// order. Under `replicated` every rank runs every step of every block, one forward per tick.
// With the process session (one rank per process) results are delivered on rank 0 only.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/models/liveavatar/model.hpp"
#include "unshard/models/liveavatar/sampler.hpp"
#include "unshard/runtime/rank_runtime.hpp"
#include "unshard/schedule/schedule.hpp"

namespace unshard::s2v {

// relative_dist = random.randint(4, 30), drawn from (seed, clip, block, step) alone, never from
// the order of the calls, so every schedule gives each call the same draw.
class relative_dist_draws {
 public:
  explicit relative_dist_draws(std::uint64_t seed) : seed_(seed) {}
  std::int64_t operator()(std::size_t clip, std::size_t block, std::size_t step) const noexcept {
    std::uint64_t h = mix(seed_ ^ 0x5851f42d4c957f2dull);
    for (const std::uint64_t v : {std::uint64_t{clip}, std::uint64_t{block}, std::uint64_t{step}}) h = mix(h ^ mix(v + 1));
    return 4 + static_cast<std::int64_t>(h % 27);  // 27 values: 4..30; bias 27/2^64
  }

 private:
  static std::uint64_t mix(std::uint64_t x) noexcept {  // splitmix64's finaliser
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
  }
  std::uint64_t seed_;
};

// One block of the stream: its noise, its conditioning, where it sits, one draw per step.
struct block {
  tensor_view noise;        // [C, F, H, W] the block's initial latent (a leading 1 allowed)
  tensor_view cond_states;  // [cond_dim, F, H, W]
  tensor_view audio;        // [25, C_a, audio_frames]
  std::size_t clip = 0;     // r: clip index
  std::size_t block = 0;    // b: block within the clip
  std::vector<std::int64_t> relative_dist;  // [S]: the reference roll-out draw of each step
};

struct block_result {
  std::size_t clip = 0, block = 0;
  std::vector<float> latent;                   // [C, F, H, W] after the last step
  std::vector<std::vector<float>> noise_pred;  // per step (all_steps): the model output
  std::vector<std::vector<float>> step_latent; // per step (all_steps): the latent after its Euler update
};

struct denoise_options {
  flow_match_config sampler{};
  std::size_t blocks_per_clip = 4;  // the noisy caches hold one clip; current_start = (r * bpc + b) * L
  bool all_steps = false;           // also deliver every step's model output and latent
};

// Model: s2v::model (host memory), or a device twin with the same calls (s2v::cuda_model): state,
// begin_sink/begin_step/check_*, ops(state) for the Euler update, make_landing for rank 0's results.
template <class Session, class Model = s2v::model>
class denoiser {
 public:
  using state = typename Model::state;

  denoiser(const Model& m, Session& session, const s2v::denoise_options& opt)
      : model_(m), session_(session), opt_(opt), sampler_(opt.sampler), sched_(session.schedule()),
        world_(session.world_size()) {
    const s2v::geometry& g = m.geometry();
    if (opt.sampler.steps != g.steps)
      throw_error("liveavatar denoiser: the sampler has ", opt.sampler.steps, " steps but the model keeps ", g.steps,
                  " noisy caches (one per step)");
    if (sched_.steps != g.steps)
      throw_error("liveavatar denoiser: the session's schedule has ", sched_.steps, " steps, the model ", g.steps);
    if (opt.blocks_per_clip == 0) throw_error("liveavatar denoiser: blocks_per_clip must be at least 1 (got 0)");
    if (g.in_dim != g.out_dim)
      throw_error("liveavatar denoiser: the Euler update needs out_dim == in_dim (", g.out_dim, " vs ", g.in_dim, ")");
    latent_floats_ = g.in_dim * g.frames * g.height * g.width;
    for (std::size_t s = 0; s < g.steps; ++s) t_.emplace_back(g.frames, sampler_.timestep(s));
    for (std::size_t s = 0; s < g.steps; ++s) {
      collect_noise_.push_back(m.make_landing(latent_floats_));
      collect_latent_.push_back(m.make_landing(latent_floats_));
    }
    messages_.resize(world_);
  }

  const s2v::denoise_options& options() const noexcept { return opt_; }
  // Whether the next denoise() also delivers every step's model output and latent (between calls).
  void set_all_steps(bool on) noexcept { opt_.all_steps = on; }

  const flow_match_euler& sampler() const noexcept { return sampler_; }
  const unshard::schedule& schedule() const noexcept { return sched_; }
  std::size_t ticks_run() const noexcept { return ticks_; }

  // The cond prefill: every rank that owns a step puts the reference and motion tokens into its
  // cond cache, which all of its steps then read. Live Avatar runs it before clip 0 only; calling
  // it again between denoise() calls (TPP's re-run at clip 1 with a new reference) is allowed.
  // `in.context` must outlive the denoiser: every step reads it.
  void sink(const s2v::sink_inputs& in) {
    model_.check_sink(in);
    context_ = in.context;
    session_.tick([&](std::size_t, std::size_t lane, state& s) {
                    if (lane != 0) return false;
                    model_.begin_sink(s, in);
                    return true;
                  },
                  [](std::size_t, std::size_t, state&) {}, [&](std::size_t r, std::span<state>) -> const auto& {
                    messages_[r].clear();
                    return messages_[r];
                  });
    ++ticks_;
    sunk_ = true;
  }

  // One block through all its steps (S ticks under steps: no other block shares the pipeline).
  s2v::block_result denoise_block(const s2v::block& b) {
    s2v::block_result out;
    denoise(std::span<const s2v::block>(&b, 1), [&](s2v::block_result&& r) { out = std::move(r); });
    return out;
  }

  // Every block through all its steps, pipelined under `steps`; on_result(s2v::block_result&&) is
  // called (on rank 0's side) as each block completes, in the order of `blocks`.
  template <class OnResult>
  void denoise(std::span<const s2v::block> blocks, OnResult&& on_result) {
    if (!sunk_) throw_error("liveavatar denoiser: denoise before sink (the cond KV cache is empty; run the prefill first)");
    check_blocks(blocks);
    const std::size_t S = model_.geometry().steps;
    std::vector<s2v::block_result> pending(blocks.size());
    for (std::size_t k = 0; k < blocks.size(); ++k) {
      pending[k].clip = blocks[k].clip;
      pending[k].block = blocks[k].block;
      if (opt_.all_steps) {
        pending[k].noise_pred.resize(S);
        pending[k].step_latent.resize(S);
      }
    }
    const std::size_t ticks = sched_.ticks(blocks.size());
    for (std::size_t tick = 0; tick < ticks; ++tick) {
      session_.tick([&](std::size_t r, std::size_t lane, state& s) { return prepare(r, lane, s, tick, blocks); },
                    [&](std::size_t r, std::size_t lane, state& s) { finish(r, lane, s); },
                    [&](std::size_t r, std::span<state> lanes) -> const std::vector<transfer_message>& {
                      return route(r, lanes, tick, blocks.size());
                    });
      ++ticks_;
      if (!collects()) continue;
      for (std::size_t s = S; s-- > 0;) {
        const std::ptrdiff_t k = block_at(s, tick, blocks.size());
        if (k < 0) continue;
        s2v::block_result& res = pending[static_cast<std::size_t>(k)];
        if (opt_.all_steps) {
          collect_noise_[s].read(res.noise_pred[s]);
          collect_latent_[s].read(res.step_latent[s]);
        }
        if (s + 1 == S) {
          collect_latent_[s].read(res.latent);
          on_result(std::move(res));
        }
      }
    }
  }

 private:
  // Whether this side of the session receives the results (rank 0; every threaded session).
  bool collects() const {
    if constexpr (requires { session_.rank(); }) return session_.rank() == 0;
    else return true;
  }

  // The block index step s runs at `tick`, or -1 (fill, drain, or another step's turn).
  std::ptrdiff_t block_at(std::size_t s, std::size_t tick, std::size_t n) const noexcept {
    const std::size_t S = model_.geometry().steps;
    if (sched_.kind == schedule_kind::replicated)
      return (tick % S == s && tick / S < n) ? static_cast<std::ptrdiff_t>(tick / S) : -1;
    return (tick >= s && tick - s < n) ? static_cast<std::ptrdiff_t>(tick - s) : -1;
  }
  std::size_t step_of(std::size_t rank, std::size_t lane, std::size_t tick) const noexcept {
    if (sched_.kind == schedule_kind::replicated) return tick % model_.geometry().steps;
    return rank + lane * world_;
  }

  bool prepare(std::size_t rank, std::size_t lane, state& st, std::size_t tick, std::span<const s2v::block> blocks) const {
    const std::size_t s = step_of(rank, lane, tick);
    const std::ptrdiff_t k = block_at(s, tick, blocks.size());
    if (k < 0) return false;
    const s2v::block& b = blocks[static_cast<std::size_t>(k)];
    const s2v::geometry& g = model_.geometry();
    s2v::step_inputs in;
    // Step 0 starts from the block's noise; a later step from the latent already in the lane (its
    // own Euler update under replicated, the previous step's rank's transfer under steps).
    in.x = s == 0 ? b.noise : tensor_view(st.input_x, dtype::f32, b.noise.dims());
    in.t = tensor_view(const_cast<float*>(t_[s].data()), dtype::f32, shape{static_cast<std::int64_t>(g.frames)});
    in.cond_states = b.cond_states;
    in.audio = b.audio;
    in.context = context_;
    in.block = b.clip * opt_.blocks_per_clip + b.block;
    in.step = s;
    in.relative_dist = b.relative_dist[s];
    model_.begin_step(st, in);
    return true;
  }

  // The Euler update in place: the lane's input latent becomes the step's output latent.
  void finish(std::size_t, std::size_t, state& st) const {
    decltype(auto) ops = model_.ops(st);
    ops.scaled_add(st.input_x, st.output, sampler_.dt(st.call.step), latent_floats_);
  }

  // The transfers after `tick`, the same list on every rank, endpoints filled where this rank is
  // one. Steps go in descending order: the latent of step s + 1 has left its lane before step s's
  // latent lands there.
  const std::vector<transfer_message>& route(std::size_t rank, std::span<state> lanes, std::size_t tick, std::size_t n) {
    std::vector<transfer_message>& out = messages_[rank];
    out.clear();
    const std::size_t S = model_.geometry().steps, bytes = latent_floats_ * sizeof(float);
    const auto lane_state = [&](std::size_t s) -> state* {
      return sched_.owner(s, world_) == rank ? &lanes[sched_.lane_of(s, world_)] : nullptr;
    };
    const auto add = [&](std::size_t s_from, const float* src, std::size_t to, float* dst) {
      out.push_back({sched_.owner(s_from, world_), to, bytes, reinterpret_cast<const std::byte*>(src),
                     reinterpret_cast<std::byte*>(to == rank ? dst : nullptr)});
      if (out.back().from != rank) out.back().src = nullptr;
    };
    for (std::size_t s = S; s-- > 0;) {
      if (block_at(s, tick, n) < 0) continue;
      state* from = lane_state(s);
      float* x = from ? from->input_x : nullptr;
      if (opt_.all_steps) {
        add(s, from ? from->output : nullptr, 0, collect_noise_[s].data());
        add(s, x, 0, collect_latent_[s].data());
      } else if (s + 1 == S) {
        add(s, x, 0, collect_latent_[s].data());
      }
      if (s + 1 < S && sched_.kind == schedule_kind::steps) {
        state* next = lane_state(s + 1);
        add(s, x, sched_.owner(s + 1, world_), next ? next->input_x : nullptr);
      }
    }
    return out;
  }

  void check_blocks(std::span<const s2v::block> blocks) const {
    const s2v::geometry& g = model_.geometry();
    for (std::size_t k = 0; k < blocks.size(); ++k) {
      const s2v::block& b = blocks[k];
      if (b.relative_dist.size() != g.steps)
        throw_error("liveavatar denoiser: block ", k, " (clip ", b.clip, " block ", b.block, ") has ",
                    b.relative_dist.size(), " relative_dist draws, expected one per step (", g.steps, ")");
      if (b.block >= opt_.blocks_per_clip)
        throw_error("liveavatar denoiser: block ", b.block, " of clip ", b.clip, " is past the clip's ",
                    opt_.blocks_per_clip, " blocks");
      s2v::step_inputs in;
      in.x = b.noise;
      in.t = tensor_view(const_cast<float*>(t_[0].data()), dtype::f32, shape{static_cast<std::int64_t>(g.frames)});
      in.cond_states = b.cond_states;
      in.audio = b.audio;
      in.context = context_;
      in.block = b.clip * opt_.blocks_per_clip + b.block;
      for (std::size_t s = 0; s < g.steps; ++s) {
        in.step = s;
        in.relative_dist = b.relative_dist[s];
        model_.check_step(in);
      }
      if (static_cast<std::size_t>(b.noise.numel()) != latent_floats_)
        throw_error("liveavatar denoiser: block ", k, " noise has ", b.noise.numel(), " values, expected ", latent_floats_);
    }
  }

  const Model& model_;
  Session& session_;
  s2v::denoise_options opt_;
  flow_match_euler sampler_;
  unshard::schedule sched_;
  std::size_t world_;
  std::size_t latent_floats_ = 0;
  std::vector<std::vector<float>> t_;  // per step: [F] copies of the step's float32 timestep
  std::vector<typename Model::landing> collect_noise_, collect_latent_;  // rank 0's landing areas, per step
  std::vector<std::vector<transfer_message>> messages_;             // per rank (each rank thread its own)
  tensor_view context_;
  std::size_t ticks_ = 0;
  bool sunk_ = false;
};

}  // namespace unshard::s2v
