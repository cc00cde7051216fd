#pragma once
// The op set: every operation a model's forward performs on its buffers, behind one object, so a
// forward is written once and a backend supplies the ops (ggml's backends, Kokkos' execution
// spaces). A forward never touches buffer contents itself: on the GPU those bytes live in device
// memory. It computes only indices, positions and loop bounds, and calls the ops.
//
//   O::value_type             the activations' element type (float on the host)
//   linear(x, rows, in, p, w, b, y, act)      y = act(x·Wᵀ + b), W read through a param_source
//                                             (whole, or row chunks as they stream in)
//   layer_norm_modulate(x, y, rows, D, eps, mod)    y = LN(x)(1 + scale) + shift, f32 modulation
//   layer_norm(x, y, rows, D, eps, w, b)      affine LayerNorm
//   layer_norm_silu(x, rows, D, eps)          SiLU(LN(x)) in place
//   rms_norm(x, rows, D, eps, w)              RMSNorm over the whole row, in place
//   rope(x, rows, heads, head_dim, cos, sin)  rotary embedding of every head, in place
//   attention(q, nq, s1, s2, heads, head_dim, scores, out)   softmax attention over one or two key
//                                             segments (a KV cache and cond keys) in one softmax
//   grouped_attention(q, nq, kv, heads, head_dim, groups, scores, out)   group g's queries see
//                                             only group g's keys (per-frame audio attention)
//   gelu_tanh / silu                          pointwise
//   gated_residual(x, y, gate, rows, D)       x += y * gate (gate rows from the modulation)
//   residual(x, y, n)                         x += y
//   scaled_add(x, y, a, n)                    x = x + a·y, one f32 rounding each (the Euler update)
//   add_param_rows / add_rows / broadcast_row  a parameter row added to or written into rows
//   patchify / unpatchify / causal_conv_inputs    convolutions as GEMMs: the GEMM's input vectors
//   sinusoid_rows                             the timestep embedding's sinusoid
//   mix_layers                                weighted sum of stacked layers (audio features)
//   copy / copy_rows / fill                   moves
//   write_cache / read_cache                  into / out of a KV cache (f32 or bf16 storage: kv_cache_ref)
//   upload(dst, view)                         a host tensor (any storage dtype) into a buffer as f32
//   host_tables(a, b, n, fill)                two tables computed by host math (rope cos and sin),
//                                             placed where the backend's buffers are
//   load_count / store_count                  a small integer kept in a buffer (the cond length)
//
// The host implementation is ops/host_ops.hpp; a backend adds one by implementing the same
// members over its memory (ops/cuda_ops.cuh) and satisfying `op_set` below.
#include <concepts>
#include <cstddef>
#include <cstdint>

#include "unshard/core/tensor_view.hpp"
#include "unshard/kernels/thread/patch.hpp"
#include "unshard/layer/param_source.hpp"

namespace unshard {

// The epilogue a linear map applies to its output.
enum class linear_act : std::uint8_t { none, gelu_tanh };

// Rows of an f32 modulation table that a row-wise op reads per token: token t uses row
// `t / tokens_per_row` (every token row 0 when tokens_per_row == 0), rows `stride` floats apart.
struct modulation_rows {
  const float* first = nullptr;
  std::size_t stride = 0;
  std::size_t tokens_per_row = 0;

  const float* row_of(std::size_t token) const noexcept {
    return tokens_per_row == 0 ? first : first + (token / tokens_per_row) * stride;
  }
  modulation_rows offset(std::size_t floats) const noexcept { return {first + floats, stride, tokens_per_row}; }
};

// Rows of keys or values for attention: f32 (activations, an f32 KV cache), or bf16 (a KV cache
// stored bf16, as the official caches are). A const float* converts to it implicitly.
struct kv_rows {
  const void* data = nullptr;
  dtype type = dtype::f32;
  kv_rows() = default;
  kv_rows(const float* p) noexcept : data(p) {}  // NOLINT: implicit, the common case
  kv_rows(const void* p, dtype t) noexcept : data(p), type(t) {}
  const float* f32() const noexcept { return static_cast<const float*>(data); }
  const bf16* as_bf16() const noexcept { return static_cast<const bf16*>(data); }
};

// A place in a KV cache: its storage and element type. The model chooses the type (its
// `kv_cache` option); the forward moves through the cache in elements, the ops convert.
struct kv_cache_ref {
  void* data = nullptr;
  dtype type = dtype::f32;
  kv_cache_ref at(std::size_t elements) const noexcept {
    return {static_cast<std::byte*>(data) + elements * size_of(type), type};
  }
  operator kv_rows() const noexcept { return {data, type}; }  // NOLINT: read as attention keys/values
};

// One segment of keys and values for attention: `rows` rows of width heads*head_dim each.
struct kv_segment {
  kv_rows k, v;
  std::size_t rows = 0;
};

// Two tables of n floats computed by host code (rope cos and sin at the call's positions): a plain
// function pointer plus its argument, so an op may run it into any host buffers (the
// destinations themselves, or staging that a device copy starts from).
struct host_fill {
  void (*fill)(const void* arg, float* a, float* b) = nullptr;
  const void* arg = nullptr;
  void operator()(float* a, float* b) const { fill(arg, a, b); }
};

// f(a, b) as a host_fill; f must outlive the op call.
template <class F>
host_fill as_host_fill(const F& f) {
  return {[](const void* arg, float* a, float* b) { (*static_cast<const F*>(arg))(a, b); }, &f};
}

template <class O>
concept op_set = requires { typename O::value_type; } &&
    requires(O& o, typename O::value_type* a, const typename O::value_type* ca, float* f, const float* cf,
             std::size_t n, double eps, const tensor_view& view, whole_params& p, modulation_rows mod,
             kv_segment seg, kv_cache_ref cache, const patch_grid& grid, host_fill fill) {
      o.linear(ca, n, n, p, n, n, a, linear_act::none);
      o.layer_norm_modulate(ca, a, n, n, eps, mod, mod);
      o.layer_norm(ca, a, n, n, eps, view, view);
      o.layer_norm_silu(a, n, n, eps);
      o.rms_norm(a, n, n, eps, view);
      o.rope(a, n, n, n, cf, cf);
      o.attention(ca, n, seg, seg, n, n, f, a);
      o.grouped_attention(ca, n, seg, n, n, n, f, a);
      o.gelu_tanh(a, n);
      o.silu(cf, f, n);
      o.gated_residual(a, ca, mod, n, n);
      o.residual(a, ca, n);
      o.scaled_add(f, cf, 1.0f, n);
      o.add_param_rows(f, view, cf, n, n, n, n);
      o.add_rows(a, ca, n, n, view, n);
      o.broadcast_row(a, n, n, view, n);
      o.patchify(cf, n, n, n, n, grid, n, a);
      o.unpatchify(ca, n, grid, n, f);
      o.causal_conv_inputs(ca, n, n, n, n, a);
      o.sinusoid_rows(cf, n, n, n, f);
      o.mix_layers(cf, n, n, n, view, n, n, a);
      o.copy(a, ca, n);
      o.copy_rows(a, n, ca, n, n, n);
      o.fill(f, n, 0.0f);
      o.upload(f, view);
      o.write_cache(cache, ca, n);
      o.read_cache(a, cache, n);
      o.host_tables(f, f, n, fill);
      { o.load_count(cf) } -> std::convertible_to<std::size_t>;
      o.store_count(f, n);
    };

}  // namespace unshard
