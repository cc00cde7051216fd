#pragma once
// wan_cuda_model: the Wan2.1 t2v DiT on CUDA, for `unshard-dit --backend cuda`.
//
// It is the host wan_model's twin: the same layers (embeddings, blocks.i, head), the same
// sub-units, the same parameter names, shapes and order (each wan_cuda_layer delegates all of that
// to the host wan_layer), so the same unit layout, policies and ledger apply unchanged. Only the
// forward differs -- kernels and cuBLASLt on the state's stream (models/wan/cuda/forward.cuh) --
// and the state lives in device memory, so inputs and outputs cross with explicit copies:
//   wan_cuda_model m(config, workload, {dtype::bf16});
//   state = m.make_state(buffers of m.buffers(), in device memory); state.attach_stream(stream);
//   m.set_inputs(state, x, t, context);                 (host tensors; copied to the device)
//   for each layer i, sub-unit j: m.layer(i).forward(j, views (device memory), state);
//   m.copy_output(state) / m.copy_block_output(state, i) (host vectors; synchronises the stream)
#include <cuda_runtime.h>

#include <cstddef>
#include <span>
#include <string>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/layer/param_source.hpp"
#include "unshard/models/wan/cuda/forward.cuh"
#include "unshard/models/wan/cuda/state.cuh"
#include "unshard/models/wan/model.hpp"

namespace unshard {

class wan_cuda_layer {
 public:
  wan_cuda_layer(const wan_layer& host, const wan_geometry& geometry, const wan_cuda_options& options)
      : host_(host), geometry_(geometry), options_(options) {}

  std::string name() const { return host_.name(); }
  std::size_t subunit_count() const noexcept { return host_.subunit_count(); }
  std::string subunit_name(std::size_t sub) const { return host_.subunit_name(sub); }
  std::vector<param_spec> parameters(std::size_t sub) const { return host_.parameters(sub); }
  wan_layer_kind kind() const noexcept { return host_.kind(); }
  std::size_t block_index() const noexcept { return host_.block_index(); }

  // Enqueues sub-unit `sub` on state.stream; params are device views of parameters(sub).
  void forward(std::size_t sub, const param_views& params, wan_cuda_state& state) const {
    whole_params whole(params);
    forward(sub, whole, state);
  }

  template <param_source P>
  void forward(std::size_t sub, P& params, wan_cuda_state& state) const {
    const wan_geometry& g = geometry_;
    if (sub >= subunit_count()) host_.subunit_name(sub);  // throws the host's out-of-range error
    const wan_cuda_options& o = options_;
    switch (host_.kind()) {
      case wan_layer_kind::embeddings:
        if (sub == 0) return detail::wan_cuda_patch_embedding_forward(g, o, params, state);
        if (sub == 1) return detail::wan_cuda_time_forward(g, o, params, state);
        return detail::wan_cuda_text_embedding_forward(g, o, params, state);
      case wan_layer_kind::block:
        if (sub == 0) return detail::wan_cuda_self_attn_forward(g, o, host_.block_index(), params, state);
        if (sub == 1) return detail::wan_cuda_cross_attn_forward(g, o, host_.block_index(), params, state);
        return detail::wan_cuda_ffn_forward(g, o, host_.block_index(), params, state);
      case wan_layer_kind::head: return detail::wan_cuda_head_forward(g, o, params, state);
    }
  }

 private:
  wan_layer host_;
  wan_geometry geometry_;
  wan_cuda_options options_;
};

static_assert(layer<wan_cuda_layer, wan_cuda_state>, "wan_cuda_layer must model unshard::layer over wan_cuda_state");

class wan_cuda_model {
 public:
  using state = wan_cuda_state;

  wan_cuda_model(const wan_config& config, const wan_workload& workload, const wan_options& options = {},
                 const wan_cuda_options& cuda_options = {})
      : host_(config, workload, options), options_(cuda_options) {
    for (std::size_t i = 0; i < host_.layer_count(); ++i) layers_.emplace_back(host_.layer(i), geometry(), options_);
  }

  const wan_config& config() const noexcept { return host_.config(); }
  const wan_geometry& geometry() const noexcept { return host_.geometry(); }
  const wan_cuda_options& cuda_options() const noexcept { return options_; }
  // The host model with the same layers (for planning, or a reference forward on the host).
  const wan_model& host_model() const noexcept { return host_; }

  std::size_t layer_count() const noexcept { return layers_.size(); }
  const wan_cuda_layer& layer(std::size_t i) const {
    if (i >= layers_.size()) throw_error("wan_cuda_model: layer ", i, " out of range (", layers_.size(), " layers)");
    return layers_[i];
  }

  std::vector<buffer_spec> buffers() const { return detail::wan_cuda_buffer_specs(geometry(), options_); }
  state make_state(const buffer_set& buffers) const { return detail::make_wan_cuda_state(geometry(), options_, buffers); }

  // Copies the inputs (host tensors of any storage dtype; shapes as wan_model::set_inputs checks
  // them) into the state's device buffers on its stream, and waits for the copies.
  void set_inputs(state& s, const tensor_view& x, const tensor_view& t, const tensor_view& context) const {
    const wan_geometry& g = geometry();
    const auto [C, F, H, W] = g.latent;
    std::vector<float> hx(C * F * H * W), ht(1), hc(g.text_len * g.text_dim);
    wan_state staging;  // the host model validates, converts and zero-pads into host memory
    staging.input_x = hx.data();
    staging.input_t = ht.data();
    staging.input_context = hc.data();
    host_.set_inputs(staging, x, t, context);
    upload(s, s.input_x, hx);
    upload(s, s.input_t, ht);
    upload(s, s.input_context, hc);
    UNSHARD_CUDA_CHECK(cudaStreamSynchronize(s.stream));
  }

  void set_inputs(state& s, std::span<const float> x, float t, std::span<const float> context) const {
    const wan_geometry& g = geometry();
    const auto [C, F, H, W] = g.latent;
    const auto i64 = [](std::size_t v) { return static_cast<std::int64_t>(v); };
    if (x.size() != C * F * H * W || context.size() != g.context_len * g.text_dim)
      throw_error("wan_cuda_model::set_inputs: got ", x.size(), " values of x and ", context.size(),
                  " of context, expected C*F*H*W = ", C * F * H * W, " and L*text_dim = ", g.context_len * g.text_dim);
    set_inputs(s, tensor_view(const_cast<float*>(x.data()), dtype::f32, shape{i64(C), i64(F), i64(H), i64(W)}),
               tensor_view(&t, dtype::f32, shape{1}),
               tensor_view(const_cast<float*>(context.data()), dtype::f32, shape{i64(g.context_len), i64(g.text_dim)}));
  }

  // [C_out, gf*pt, gh*ph, gw*pw], the shape of copy_output's values.
  shape output_shape() const {
    const auto d = geometry().output_shape();
    return shape{d[0], d[1], d[2], d[3]};
  }

  // The output latent, copied to the host after the state's stream has finished the forward.
  std::vector<float> copy_output(const state& s) const {
    return download(s, s.output, geometry().patch_out * geometry().tokens);
  }
  // Block i's output [S, D]; needs record_block_outputs.
  std::vector<float> copy_block_output(const state& s, std::size_t i) const {
    const wan_geometry& g = geometry();
    if (!g.record_block_outputs)
      throw_error("wan_cuda_model: block outputs were not recorded (construct with record_block_outputs = true)");
    if (i >= g.num_layers) throw_error("wan_cuda_model: block ", i, " out of range (", g.num_layers, " blocks)");
    return download(s, s.block_outputs + i * g.tokens * g.dim, g.tokens * g.dim);
  }
  // Any f32 state buffer (tests read intermediates: s.q, s.attn, ...), n floats from `device`.
  std::vector<float> copy_buffer(const state& s, const float* device, std::size_t n) const {
    return download(s, device, n);
  }

 private:
  static void upload(const state& s, float* dst, const std::vector<float>& src) {
    UNSHARD_CUDA_CHECK(cudaMemcpyAsync(dst, src.data(), src.size() * sizeof(float), cudaMemcpyHostToDevice, s.stream));
  }
  static std::vector<float> download(const state& s, const float* src, std::size_t n) {
    std::vector<float> out(n);
    UNSHARD_CUDA_CHECK(cudaMemcpyAsync(out.data(), src, n * sizeof(float), cudaMemcpyDeviceToHost, s.stream));
    UNSHARD_CUDA_CHECK(cudaStreamSynchronize(s.stream));
    return out;
  }

  wan_model host_;
  wan_cuda_options options_;
  std::vector<wan_cuda_layer> layers_;
};

static_assert(model<wan_cuda_model>, "wan_cuda_model must model unshard::model");

}  // namespace unshard
