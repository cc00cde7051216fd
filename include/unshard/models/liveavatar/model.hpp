#pragma once
// s2v::model: Live Avatar's CausalWanModel_S2V as a sequence of unshard layers over one stream
// state, driven call by call:
//
//   s2v::model m(s2v::config::load("config.json"), workload, {dtype::bf16, gemm_path::blas});
//   (allocate m.buffers(); state = m.make_state(buffers) -- the runtime does this)
//   m.begin_sink(state, {ref_latents, motion_latents, context});   run every layer  (cond prefill)
//   m.begin_step(state, {x, t, cond_states, audio, context, block, step, relative_dist});
//   run every layer; m.output(state) -> [C_out, F, H, W]
//
// Layers: embeddings, frame_packer, cond_encoder, audio_encoder, then blocks.0.. with
// audio_injector.j right after block audio_inject_layers[j], then head.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <span>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/core/tensor_view.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/models/liveavatar/config.hpp"
#include "unshard/models/liveavatar/geometry.hpp"
#include "unshard/models/liveavatar/layer.hpp"
#include "unshard/models/liveavatar/state.hpp"
#include "unshard/ops/host_ops.hpp"
#include "unshard/ops/op_set.hpp"

namespace unshard::s2v {

// The prefill ("sink"): once per clip, before any streamed call.
struct sink_inputs {
  tensor_view ref_latents;     // [C, 1, H, W] (a leading 1 allowed)
  tensor_view motion_latents;  // [16, Tm, H, W]
  tensor_view context;         // [L_txt, text_dim]
};

// One block at one denoising step.
struct step_inputs {
  tensor_view x;            // [C, F, H, W] noisy latents
  tensor_view t;            // [F] (or [1, F]) per-frame timesteps
  tensor_view cond_states;  // [cond_dim, F, H, W]
  tensor_view audio;        // [25, C_a, audio_frames]
  tensor_view context;      // [L_txt, text_dim]
  std::size_t block = 0;    // block index in the stream: current_start = block * L (never wrapped)
  std::size_t step = 0;     // denoising step: which noisy cache
  std::int64_t relative_dist = 30;  // the official draws random.randint(4, 30) here; ours is an argument
};

class model {
 public:
  using state = s2v::state;

  model(const s2v::config& config, const s2v::workload& workload, const s2v::options& options = {})
      : config_(config), workload_(workload), geometry_(make_geometry(config, workload, options)) {
    const s2v::geometry& g = geometry_;
    layers_.emplace_back(s2v::layer_kind::embeddings, 0, 0, g);
    layers_.emplace_back(s2v::layer_kind::frame_packer, 0, 0, g);
    layers_.emplace_back(s2v::layer_kind::cond_encoder, 0, 0, g);
    layers_.emplace_back(s2v::layer_kind::audio_encoder, 0, 0, g);
    for (std::size_t i = 0; i < g.num_layers; ++i) {
      layers_.emplace_back(s2v::layer_kind::block, i, i, g);
      const std::int64_t j = config.injector_of(static_cast<std::int64_t>(i));
      if (j >= 0) layers_.emplace_back(s2v::layer_kind::injector, static_cast<std::size_t>(j), i, g);
    }
    layers_.emplace_back(s2v::layer_kind::head, 0, 0, g);
  }

  const s2v::config& config() const noexcept { return config_; }
  const s2v::workload& workload() const noexcept { return workload_; }
  const s2v::geometry& geometry() const noexcept { return geometry_; }

  std::size_t layer_count() const noexcept { return layers_.size(); }
  const s2v::layer& layer(std::size_t i) const {
    if (i >= layers_.size()) throw_error("liveavatar model: layer ", i, " out of range (", layers_.size(), " layers)");
    return layers_[i];
  }

  std::vector<buffer_spec> buffers() const { return detail::buffer_specs(geometry_); }
  state make_state(const buffer_set& buffers) const { return detail::make_state(geometry_, buffers); }

  // The caches are paged by block (paged_model, layer/model.hpp): block i reads and writes page i
  // of each, no other layer touches them.
  std::optional<std::size_t> page_of_layer(std::size_t i) const {
    if (layer(i).kind() != s2v::layer_kind::block) return std::nullopt;
    return layer(i).index();
  }
  page_access page_access_of(const state& s, const buffer_spec& b) const {
    return detail::cache_page_access(geometry_, s, b);
  }

  // The reference roll-out of a streamed call: max(0, current_start/fs - (30 - relative_dist)).
  std::int64_t cond_rope_rollout(std::size_t current_start, std::int64_t relative_dist) const noexcept {
    const auto n0 = static_cast<std::int64_t>(current_start / geometry_.frame_tokens);
    return std::max<std::int64_t>(0, n0 - (s2v::ref_frame_position - relative_dist));
  }

  // Sets up the sink: the reference frame and the motion latents, t = 0. The inputs are host
  // tensors of any storage dtype; `ops` places them in the state's memory (host_ops: in place).
  void begin_sink(state& s, const s2v::sink_inputs& in) const {
    host_ops ops{geometry_.gemm, s.kv_widen};
    begin_sink(ops, s, in);
  }
  template <op_set O>
  void begin_sink(O& ops, state& s, const s2v::sink_inputs& in) const {
    const s2v::geometry& g = geometry_;
    check_sink(in);
    copy_in(ops, in.ref_latents, s.input_ref);
    copy_in(ops, in.motion_latents, s.input_motion);
    set_context(ops, s, in.context);
    ops.fill(s.input_t, g.frames, 0.0f);
    s.call = {};
    s.call.kind = s2v::call_kind::sink;
    s.call.tokens = g.cond_tokens;
  }

  // Throws, naming the argument, unless `in` is a valid streamed call for this workload. Touches no
  // state, so a stream can refuse a call before any rank starts it.
  void check_step(const s2v::step_inputs& in) const {
    const s2v::geometry& g = geometry_;
    if (in.step >= g.steps)
      throw_error("liveavatar step: denoising step ", in.step, " out of range (the workload has ", g.steps, " noisy caches)");
    const std::size_t cs = in.block * g.block_tokens;
    const std::int64_t roll = cond_rope_rollout(cs, in.relative_dist);
    if (static_cast<std::int64_t>(in.block * g.frames + g.frames) > s2v::rope_frames ||
        s2v::ref_frame_position + roll >= s2v::rope_frames)
      throw_error("liveavatar step: block ", in.block, " is past the ", s2v::rope_frames, " rope frame positions");
    check_input(in.x, {g.in_dim, g.frames, g.height, g.width}, "x");
    check_input(in.t, {g.frames}, "t");
    check_input(in.cond_states, {g.cond_dim, g.frames, g.height, g.width}, "cond_states");
    check_input(in.audio, {s2v::audio_layers, g.audio_dim, g.audio_frames}, "audio");
    check_context(in.context);
  }
  void check_sink(const s2v::sink_inputs& in) const {
    const s2v::geometry& g = geometry_;
    check_input(in.ref_latents, {g.in_dim, 1, g.height, g.width}, "ref_latents");
    check_input(in.motion_latents, {s2v::pack_channels, g.motion_latent_frames, g.height, g.width}, "motion_latents");
    check_context(in.context);
  }

  // Sets up one streamed call: writes noisy-cache slots [cs mod size, +L) of cache `step` and
  // attends [0, cs + L), or the whole cache once cs reaches its size; cs = block * L.
  void begin_step(state& s, const s2v::step_inputs& in) const {
    host_ops ops{geometry_.gemm, s.kv_widen};
    begin_step(ops, s, in);
  }
  template <op_set O>
  void begin_step(O& ops, state& s, const s2v::step_inputs& in) const {
    const s2v::geometry& g = geometry_;
    check_step(in);
    if (!s.holds_step(in.step))
      throw_error("liveavatar step: this lane holds no KV cache for denoising step ", in.step,
                  " (under the steps schedule a rank holds only the caches of its own steps)");
    const std::size_t cs = in.block * g.block_tokens;
    copy_in(ops, in.x, s.input_x);
    copy_in(ops, in.t, s.input_t);
    copy_in(ops, in.cond_states, s.input_cond);
    copy_in(ops, in.audio, s.input_audio);
    set_context(ops, s, in.context);
    s.call = {};
    s.call.kind = s2v::call_kind::stream;
    s.call.tokens = g.block_tokens;
    s.call.current_start = cs;
    s.call.step = in.step;
    s.call.roll = cond_rope_rollout(cs, in.relative_dist);
    s.call.write_slot = cs % g.noisy_slots;
    s.call.active_slots = cs >= g.noisy_slots ? g.noisy_slots : cs + g.block_tokens;
  }

  // The ops that run on this model's state outside its layers (the denoiser's Euler update).
  host_ops ops(state& s) const { return host_ops{geometry_.gemm, s.kv_widen}; }

  // Memory that another rank's results land in (transfers write data(); read() copies it out).
  class landing {
   public:
    explicit landing(std::size_t floats) : v_(floats) {}
    float* data() noexcept { return v_.data(); }
    void read(std::vector<float>& out) const { out = v_; }

   private:
    std::vector<float> v_;
  };
  landing make_landing(std::size_t floats) const { return landing(floats); }

  // The streamed call's output latent [C_out, F, 2gh, 2gw] (f32), valid after the head ran.
  tensor_view output(const state& s) const {
    const auto d = geometry_.output_shape();
    return tensor_view(s.output, dtype::f32, shape{d[0], d[1], d[2], d[3]});
  }

  // Block i's output of the last call [tokens, D] (after its audio injection); needs record_block_outputs.
  tensor_view block_output(const state& s, std::size_t i) const {
    if (!geometry_.record_block_outputs)
      throw_error("liveavatar model: block outputs were not recorded (construct with record_block_outputs = true)");
    if (i >= geometry_.num_layers) throw_error("liveavatar model: block ", i, " out of range (", geometry_.num_layers, " blocks)");
    return tensor_view(s.block_outputs + i * geometry_.max_tokens() * geometry_.dim, dtype::f32,
                       shape{static_cast<std::int64_t>(s.call.tokens), static_cast<std::int64_t>(geometry_.dim)});
  }

  // The residual stream [tokens, D] as it stands.
  tensor_view tokens(const state& s) const {
    return tensor_view(s.x, dtype::f32, shape{static_cast<std::int64_t>(s.call.tokens), static_cast<std::int64_t>(geometry_.dim)});
  }

  // Slots [first, first + count) of block `layer`'s noisy K or V cache of `step`, as [count, N, d].
  tensor_view noisy_cache(const state& s, std::size_t step, std::size_t layer, bool values, std::size_t first,
                          std::size_t count) const {
    const s2v::geometry& g = geometry_;
    if (step >= g.steps || layer >= g.num_layers || first + count > g.noisy_slots)
      throw_error("liveavatar model: noisy cache step ", step, " layer ", layer, " slots [", first, ", ", first + count,
                  ") out of range (", g.steps, " steps, ", g.num_layers, " layers, ", g.noisy_slots, " slots)");
    if (!s.holds_step(step)) throw_error("liveavatar model: this state holds no noisy cache for step ", step);
    const kv_cache_ref c = s.kv((values ? s.noisy_v : s.noisy_k)[step], (layer * g.noisy_slots + first) * g.dim);
    return tensor_view(c.data, c.type, head_shape(count));
  }
  // The cond cache of block `layer`, slots [0, count), as [count, N, d] (k after RMS, not roped).
  tensor_view cond_cache(const state& s, std::size_t layer, bool values, std::size_t count) const {
    const s2v::geometry& g = geometry_;
    if (layer >= g.num_layers || count > g.cond_slots)
      throw_error("liveavatar model: cond cache layer ", layer, " slots [0, ", count, ") out of range");
    const kv_cache_ref c = s.kv(values ? s.cond_v : s.cond_k, layer * g.cond_slots * g.dim);
    return tensor_view(c.data, c.type, head_shape(count));
  }

 private:
  shape head_shape(std::size_t rows) const {
    return shape{static_cast<std::int64_t>(rows), static_cast<std::int64_t>(geometry_.heads),
                 static_cast<std::int64_t>(geometry_.head_dim)};
  }

  void check_context(const tensor_view& context) const {
    const s2v::geometry& g = geometry_;
    auto d = context.dims().dims();
    while (d.size() > 2 && d.front() == 1) d = d.subspan(1);
    if (d.size() != 2 || d[1] != static_cast<std::int64_t>(g.text_dim) || d[0] > static_cast<std::int64_t>(g.text_len))
      throw_error("liveavatar input 'context' has shape ", context.dims().to_string(), ", expected [L <= ", g.text_len,
                  ", ", g.text_dim, "]");
    if (context.empty() && context.numel() > 0) throw_error("liveavatar input 'context' has no data");
  }

  template <op_set O>
  void set_context(O& ops, state& s, const tensor_view& context) const {
    const s2v::geometry& g = geometry_;
    check_context(context);
    const std::size_t n = static_cast<std::size_t>(context.numel());
    ops.upload(s.input_context, context);
    ops.fill(s.input_context + n, g.text_len * g.text_dim - n, 0.0f);
  }

  static std::span<const std::int64_t> strip_ones(std::span<const std::int64_t> d) {
    while (d.size() > 1 && d.front() == 1) d = d.subspan(1);
    return d;
  }

  // Shapes must agree once leading 1s are dropped (a batch of one).
  static void check_input(const tensor_view& v, std::initializer_list<std::size_t> want, const char* what) {
    std::int64_t w[shape::max_rank];
    std::size_t n = 0;
    for (const std::size_t x : want) w[n++] = static_cast<std::int64_t>(x);
    const shape ws(std::span<const std::int64_t>(w, n));
    const auto got = strip_ones(v.dims().dims()), expected = strip_ones(ws.dims());
    if (!std::equal(got.begin(), got.end(), expected.begin(), expected.end()))
      throw_error("liveavatar input '", what, "' has shape ", v.dims().to_string(), ", expected ", ws.to_string());
    if (v.empty()) throw_error("liveavatar input '", what, "' has no data");
  }

  // A view of the destination itself (a latent already in place) copies nothing.
  template <op_set O>
  static void copy_in(O& ops, const tensor_view& v, float* dst) {
    if (v.type() == dtype::f32 && static_cast<const void*>(v.data()) == static_cast<const void*>(dst)) return;
    ops.upload(dst, v);
  }

  s2v::config config_;
  s2v::workload workload_;
  s2v::geometry geometry_;
  std::vector<s2v::layer> layers_;
};

static_assert(unshard::model<s2v::model>, "s2v::model must model unshard::model");
static_assert(unshard::paged_model<s2v::model>, "s2v::model pages its KV caches by block");

}  // namespace unshard::s2v
