#pragma once
// wan::model: the Wan2.1 t2v DiT (WanModel) as a sequence of unshard layers over one wan::state.
//
// Use:
//   wan::model m(wan::config::load("config.json"), {{C, F, H, W}, L}, {dtype::bf16, gemm_path::blas});
//   allocate every m.buffers() entry, put them in a buffer_set, state = m.make_state(buffers);
//   m.set_inputs(state, x, t, context);
//   for each layer i, sub-unit j: m.layer(i).forward(j, views of m.layer(i).parameters(j), state);
//   m.output(state) -> [C_out, F', H', W'] (f32), m.block_output(state, i) -> [S, D].
// Layers: 0 = embeddings, 1..num_layers = blocks.0..blocks.{num_layers-1}, last = head.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/core/tensor_view.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/models/wan/config.hpp"
#include "unshard/models/wan/geometry.hpp"
#include "unshard/models/wan/layer.hpp"
#include "unshard/models/wan/state.hpp"
#include "unshard/ops/host_ops.hpp"
#include "unshard/ops/op_set.hpp"

namespace unshard::wan {

class model {
 public:
  using state = wan::state;

  model(const wan::config& config, const wan::workload& workload, const wan::options& options = {})
      : config_(config), geometry_(make_geometry(config, workload, options)) {
    layers_.emplace_back(wan::layer_kind::embeddings, 0, geometry_);
    for (std::size_t i = 0; i < geometry_.num_layers; ++i) layers_.emplace_back(wan::layer_kind::block, i, geometry_);
    layers_.emplace_back(wan::layer_kind::head, 0, geometry_);
  }

  const wan::config& config() const noexcept { return config_; }
  const wan::geometry& geometry() const noexcept { return geometry_; }

  std::size_t layer_count() const noexcept { return layers_.size(); }
  const wan::layer& layer(std::size_t i) const {
    if (i >= layers_.size()) throw_error("wan::model: layer ", i, " out of range (", layers_.size(), " layers)");
    return layers_[i];
  }

  std::vector<buffer_spec> buffers() const { return detail::buffer_specs(geometry_); }
  state make_state(const buffer_set& buffers) const { return detail::make_state(geometry_, buffers); }

  // Copies the inputs into the state: x [C, F, H, W], t [1] (or a scalar), context [L, text_dim]
  // (L = the workload's context length; rows up to text_len are zeroed). Any storage dtype; a
  // leading batch dimension of 1 is accepted.
  void set_inputs(state& s, const tensor_view& x, const tensor_view& t, const tensor_view& context) const {
    host_ops ops{geometry_.gemm};
    set_inputs(ops, s, x, t, context);
  }

  // The same through a backend's ops (host tensors in, the state's buffers wherever they live).
  template <op_set O>
  void set_inputs(O& ops, wan::state& s, const tensor_view& x, const tensor_view& t, const tensor_view& context) const {
    const wan::geometry& g = geometry_;
    const auto [C, F, H, W] = g.latent;
    check_input(x, {C, F, H, W}, "x");
    check_input(t, {1}, "t");
    check_input(context, {g.context_len, g.text_dim}, "context");
    ops.upload(s.input_x, x);
    ops.upload(s.input_t, t);
    ops.upload(s.input_context, context);
    const std::size_t n = g.context_len * g.text_dim;
    ops.fill(s.input_context + n, g.text_len * g.text_dim - n, 0.0f);
  }

  // The same from f32 spans: x holds C*F*H*W values, context L*text_dim, both row-major.
  void set_inputs(state& s, std::span<const float> x, float t, std::span<const float> context) const {
    const wan::geometry& g = geometry_;
    const auto [C, F, H, W] = g.latent;
    if (x.size() != C * F * H * W)
      throw_error("wan::model::set_inputs: input 'x' has ", x.size(), " values, expected C*F*H*W = ", C * F * H * W);
    if (context.size() != g.context_len * g.text_dim)
      throw_error("wan::model::set_inputs: input 'context' has ", context.size(), " values, expected L*text_dim = ",
                  g.context_len, "*", g.text_dim);
    // tensor_view is a mutable view type; these are only read.
    set_inputs(s, tensor_view(const_cast<float*>(x.data()), dtype::f32, dims_of({C, F, H, W})),
               tensor_view(&t, dtype::f32, shape{1}),
               tensor_view(const_cast<float*>(context.data()), dtype::f32, dims_of({g.context_len, g.text_dim})));
  }

  // The output latent [C_out, gf*pt, gh*ph, gw*pw] (f32), valid after the head ran.
  tensor_view output(const state& s) const {
    const auto d = geometry_.output_shape();
    return tensor_view(s.output, dtype::f32, shape{d[0], d[1], d[2], d[3]});
  }

  // Block i's output [S, D] (f32); needs record_block_outputs.
  tensor_view block_output(const state& s, std::size_t i) const {
    if (!geometry_.record_block_outputs)
      throw_error("wan::model: block outputs were not recorded (construct with record_block_outputs = true)");
    if (i >= geometry_.num_layers) throw_error("wan::model: block ", i, " out of range (", geometry_.num_layers, " blocks)");
    const std::size_t n = geometry_.tokens * geometry_.dim;
    return tensor_view(s.block_outputs + i * n, dtype::f32, tokens_shape());
  }

  // The residual stream [S, D] as it stands (a block's input before it runs).
  tensor_view tokens(const state& s) const { return tensor_view(s.x, dtype::f32, tokens_shape()); }

 private:
  shape tokens_shape() const {
    return shape{static_cast<std::int64_t>(geometry_.tokens), static_cast<std::int64_t>(geometry_.dim)};
  }

  static shape dims_of(std::initializer_list<std::size_t> dims) {
    std::int64_t d[shape::max_rank];
    std::size_t n = 0;
    for (const std::size_t v : dims) d[n++] = static_cast<std::int64_t>(v);
    return shape(std::span<const std::int64_t>(d, n));
  }

  // Shapes must agree once leading 1s are dropped (a batch of one; t as a scalar or [1]).
  static void check_input(const tensor_view& v, std::initializer_list<std::size_t> want, const char* what) {
    const shape w = dims_of(want);
    const auto strip = [](std::span<const std::int64_t> d) {
      while (!d.empty() && d.front() == 1) d = d.subspan(1);
      return d;
    };
    const auto got = strip(v.dims().dims()), expected = strip(w.dims());
    if (!std::equal(got.begin(), got.end(), expected.begin(), expected.end()))
      throw_error("wan::model::set_inputs: input '", what, "' has shape ", v.dims().to_string(), ", expected ",
                  w.to_string());
    if (v.empty() && w.numel() > 0) throw_error("wan::model::set_inputs: input '", what, "' has no data");
  }

  wan::config config_;
  wan::geometry geometry_;
  std::vector<wan::layer> layers_;
};

static_assert(unshard::model<wan::model>, "wan::model must model unshard::model");

}  // namespace unshard::wan
