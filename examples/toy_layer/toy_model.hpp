// The toy model: a layer and a model written against unshard's `layer` and `model` concepts
// (include/unshard/layer/). examples/toy_layer/README.md walks through it; the library's tests and
// benchmarks run on it. It lives outside include/ because it is user code: copy it and change it.
#pragma once
#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "unshard/core/dtype.hpp"
#include "unshard/kernels/host/gemm.hpp"
#include "unshard/kernels/host/linear_params.hpp"
#include "unshard/layer/layer.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/runtime/synthetic_weights.hpp"

namespace unshard::toy {

// A small pre-norm residual MLP stack: the model the core is tested and benchmarked on. Each
// block has two sub-units, "mix" (LayerNorm + D x D linear + tanh, residual) and "ffn"
// (D -> F -> D with GELU, residual); FFN widths differ per block so units differ in size and
// rarely divide evenly by the world size.
struct toy_config {
  std::size_t layers = 4;
  std::size_t dim = 64;
  std::size_t ffn = 192;
  std::size_t tokens = 8;
  dtype storage = dtype::f32;

  std::size_t ffn_of(std::size_t block) const { return ffn + 8 * block; }
};

// The activation state: views into the buffers that toy_model::buffers() declares and the
// runtime allocates from the tracking allocator. Layers read and write it; it owns nothing.
struct toy_state {
  float* x = nullptr;       // [tokens, dim], the residual stream (input and output)
  float* h = nullptr;       // [tokens, max ffn], scratch
  float* n = nullptr;       // [tokens, dim], scratch
  std::size_t tokens = 0, dim = 0;
  const int* fail_at_layer = nullptr;  // tests: a layer that throws, to check failure handling
};

// One layer. What the `layer` concept asks: a name, sub-units (each a unit a policy may gather on
// its own), each sub-unit's parameters in a fixed order, and a forward per sub-unit over views of
// those parameters. The second forward, a template over a param_source, lets the layer run under
// `chunked` too: it reads its weights through linear_params, which consumes them chunk by chunk.
class toy_block {
 public:
  toy_block(const toy_config& c, std::size_t index) : c_(c), index_(index) {}

  std::string name() const { return "blocks." + std::to_string(index_); }
  std::size_t subunit_count() const { return 2; }
  std::string subunit_name(std::size_t s) const { return s == 0 ? "mix" : "ffn"; }
  std::vector<param_spec> parameters(std::size_t s) const {
    const auto D = static_cast<std::int64_t>(c_.dim), F = static_cast<std::int64_t>(c_.ffn_of(index_));
    const std::string p = name() + ".";
    if (s == 0)
      return {{p + "norm.weight", {D}, c_.storage}, {p + "norm.bias", {D}, c_.storage},
              {p + "mix.weight", {D, D}, c_.storage}, {p + "mix.bias", {D}, c_.storage}};
    return {{p + "ffn.0.weight", {F, D}, c_.storage}, {p + "ffn.0.bias", {F}, c_.storage},
            {p + "ffn.2.weight", {D, F}, c_.storage}, {p + "ffn.2.bias", {D}, c_.storage}};
  }

  void forward(std::size_t s, const param_views& views, toy_state& st) const {
    whole_params p(views);
    forward(s, p, st);
  }

  template <param_source P>
  void forward(std::size_t s, P& p, toy_state& st) const {
    if (st.fail_at_layer && *st.fail_at_layer == static_cast<int>(index_))
      throw_error("toy block ", index_, ": injected failure");
    const std::size_t T = st.tokens, D = st.dim;
    if (s == 0) {
      for (std::size_t t = 0; t < T; ++t) normalize_row(st.x + t * D, p.whole(0), p.whole(1), st.n + t * D, D);
      linear_params(st.n, T, D, p, 2, 3, st.h);
      for (std::size_t i = 0; i < T * D; ++i) st.x[i] += std::tanh(st.h[i]);
      return;
    }
    const std::size_t F = c_.ffn_of(index_);
    linear_params(st.x, T, D, p, 0, 1, st.h);
    for (std::size_t i = 0; i < T * F; ++i) st.h[i] = st.h[i] / (1.f + std::exp(-1.702f * st.h[i]));
    linear_params(st.h, T, F, p, 2, 3, st.n);
    for (std::size_t i = 0; i < T * D; ++i) st.x[i] += st.n[i];
  }

 private:
  static void normalize_row(const float* x, const tensor_view& g, const tensor_view& b, float* y, std::size_t D) {
    float mean = 0.f, var = 0.f;
    for (std::size_t i = 0; i < D; ++i) mean += x[i];
    mean /= static_cast<float>(D);
    for (std::size_t i = 0; i < D; ++i) var += (x[i] - mean) * (x[i] - mean);
    const float inv = 1.f / std::sqrt(var / static_cast<float>(D) + 1e-6f);
    for (std::size_t i = 0; i < D; ++i) y[i] = (x[i] - mean) * inv * g.load(i) + b.load(i);
  }

  toy_config c_;
  std::size_t index_;
};

// The model. What the `model` concept asks: its state type, its layers in forward order, the
// non-weight buffers a forward needs (each under a memory category, so the ledger can plan it),
// and a state made from the allocated buffers.
class toy_model {
 public:
  using state = toy_state;

  explicit toy_model(toy_config c) : c_(c) {
    if (c.layers == 0 || c.dim == 0 || c.ffn == 0 || c.tokens == 0)
      throw_error("toy_model: layers, dim, ffn and tokens must all be >= 1");
    for (std::size_t i = 0; i < c.layers; ++i) blocks_.emplace_back(c, i);
  }

  const toy_config& config() const noexcept { return c_; }
  std::size_t layer_count() const { return blocks_.size(); }
  const toy_block& layer(std::size_t i) const { return blocks_.at(i); }

  std::vector<buffer_spec> buffers() const {
    const std::size_t T = c_.tokens, D = c_.dim, F = c_.ffn_of(c_.layers - 1);
    return {{"x", T * D * 4, memory_category::activations},
            {"h", T * F * 4, memory_category::workspace},
            {"n", T * D * 4, memory_category::workspace}};
  }
  toy_state make_state(const buffer_set& b) const {
    return {b.as<float>("x"), b.as<float>("h"), b.as<float>("n"), c_.tokens, c_.dim, nullptr};
  }

 private:
  toy_config c_;
  std::vector<toy_block> blocks_;
};

static_assert(model<toy_model>);

// The toy model's weights: deterministic, generated on read.
using toy_weights = synthetic_weights;

}  // namespace unshard::toy
