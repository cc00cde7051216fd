#pragma once
// wan::cuda_model: the Wan2.1 t2v DiT on CUDA, for `unshard-dit --backend cuda`.
//
// Not a second forward: each layer is the host wan::layer, run over cuda_ops (ops/cuda_ops.cuh)
// instead of host_ops, on buffers in device memory. Layers, sub-units, parameter names and order,
// the buffer table and its categories are the host model's, so the same unit layout, policies and
// ledger apply unchanged. Inputs and outputs cross with explicit copies:
//   wan::cuda_model m(config, workload, {dtype::bf16});
//   state = m.make_state(buffers of m.buffers(), in device memory); state.attach_stream(stream);
//   m.set_inputs(state, x, t, context);                 (host tensors; uploaded on the stream)
//   for each layer i, sub-unit j: m.layer(i).forward(j, views (device memory), state);
//   m.copy_output(state) / m.copy_block_output(state, i) (host vectors; synchronises the stream)
#include <cuda_runtime.h>

#include <cstddef>
#include <span>
#include <string>
#include <vector>

#include "unshard/backend/cuda/check.cuh"
#include "unshard/core/error.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/layer/param_source.hpp"
#include "unshard/models/wan/cuda/state.cuh"
#include "unshard/models/wan/model.hpp"
#include "unshard/ops/cuda_model.cuh"
#include "unshard/ops/cuda_ops.cuh"

namespace unshard::wan {

// The host layer over cuda_ops, plus the Wan layer's own queries.
class cuda_layer : public unshard::cuda_layer<wan::layer, wan::cuda_state> {
 public:
  using unshard::cuda_layer<wan::layer, wan::cuda_state>::cuda_layer;
  wan::layer_kind kind() const noexcept { return host().kind(); }
  std::size_t block_index() const noexcept { return host().block_index(); }
};

static_assert(unshard::layer<wan::cuda_layer, wan::cuda_state>, "wan::cuda_layer must model unshard::layer over wan::cuda_state");

class cuda_model {
 public:
  using state = wan::cuda_state;

  cuda_model(const wan::config& config, const wan::workload& workload, const wan::options& options = {},
                 const wan::cuda_options& cuda_options = {})
      : host_(config, workload, options), options_(cuda_options) {
    for (std::size_t i = 0; i < host_.layer_count(); ++i) layers_.emplace_back(host_.layer(i));
  }

  const wan::config& config() const noexcept { return host_.config(); }
  const wan::geometry& geometry() const noexcept { return host_.geometry(); }
  const wan::cuda_options& cuda_options() const noexcept { return options_; }
  // The host model with the same layers (for planning, or a reference forward on the host).
  const wan::model& host_model() const noexcept { return host_; }

  std::size_t layer_count() const noexcept { return layers_.size(); }
  const wan::cuda_layer& layer(std::size_t i) const {
    if (i >= layers_.size()) throw_error("wan::cuda_model: layer ", i, " out of range (", layers_.size(), " layers)");
    return layers_[i];
  }

  std::vector<buffer_spec> buffers() const { return detail::cuda_buffer_specs(geometry(), options_); }
  state make_state(const buffer_set& buffers) const { return detail::make_cuda_state(geometry(), options_, buffers); }

  // Uploads the inputs (host tensors of any storage dtype; shapes as wan::model::set_inputs checks
  // them) into the state's device buffers on its stream, through the ops' pinned staging (the
  // caller's tensors may go once this returns), and zero-pads the context on the device.
  void set_inputs(state& s, const tensor_view& x, const tensor_view& t, const tensor_view& context) const {
    host_.set_inputs(s.ops, s, x, t, context);
  }

  void set_inputs(state& s, std::span<const float> x, float t, std::span<const float> context) const {
    const wan::geometry& g = geometry();
    const auto [C, F, H, W] = g.latent;
    const auto i64 = [](std::size_t v) { return static_cast<std::int64_t>(v); };
    if (x.size() != C * F * H * W || context.size() != g.context_len * g.text_dim)
      throw_error("wan::cuda_model::set_inputs: got ", x.size(), " values of x and ", context.size(),
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
    const wan::geometry& g = geometry();
    if (!g.record_block_outputs)
      throw_error("wan::cuda_model: block outputs were not recorded (construct with record_block_outputs = true)");
    if (i >= g.num_layers) throw_error("wan::cuda_model: block ", i, " out of range (", g.num_layers, " blocks)");
    return download(s, s.block_outputs + i * g.tokens * g.dim, g.tokens * g.dim);
  }
  // Any f32 state buffer (tests read intermediates: s.q, s.attn, ...), n floats from `device`.
  std::vector<float> copy_buffer(const state& s, const float* device, std::size_t n) const {
    return download(s, device, n);
  }

 private:
  static std::vector<float> download(const state& s, const float* src, std::size_t n) { return s.ops.download(src, n); }

  wan::model host_;
  wan::cuda_options options_;
  std::vector<wan::cuda_layer> layers_;
};

static_assert(unshard::model<wan::cuda_model>, "wan::cuda_model must model unshard::model");

}  // namespace unshard::wan
