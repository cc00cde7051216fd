#pragma once
// The op set (ops/op_set.hpp) on the host, in f32: each op is the loop of row kernels the forward
// used to run inline (kernels/thread/, kernels/host/), in the same order, so results are bit for bit
// those of before the op set existed. GEMMs and the attention take the `gemm` path (portable loops,
// or BLAS where built with it).
#include <algorithm>
#include <cstddef>
#include <type_traits>

#include "unshard/kernels/host/attention.hpp"
#include "unshard/kernels/host/gemm.hpp"
#include "unshard/kernels/host/linear_params.hpp"
#include "unshard/kernels/host/typed_storage.hpp"
#include "unshard/kernels/thread/activation.hpp"
#include "unshard/kernels/thread/embedding.hpp"
#include "unshard/kernels/thread/norm.hpp"
#include "unshard/kernels/thread/patch.hpp"
#include "unshard/kernels/thread/residual.hpp"
#include "unshard/kernels/thread/rope.hpp"
#include "unshard/ops/op_set.hpp"

namespace unshard {

struct host_ops {
  using value_type = float;

  gemm_path gemm = gemm_path::portable;
  // f32 scratch for a bf16 KV cache's rows, widened before the f32 attention reads them:
  // kv_widen_floats(keys) for the most keys one attention sees (null when the caches are f32).
  float* kv_widen = nullptr;

  static constexpr std::size_t kv_widen_floats(std::size_t n_keys, std::size_t width) noexcept {
    return 2 * n_keys * width;
  }

  // Scratch floats the attention ops need for `n_keys` keys (the `scores` argument).
  constexpr std::size_t attention_scratch(std::size_t n_keys) const noexcept {
    return attention_scratch_floats(gemm, n_keys);
  }

  template <param_source P>
  void linear(const float* x, std::size_t rows, std::size_t in, P& p, std::size_t w, std::size_t b, float* y,
              linear_act act = linear_act::none) const {
    linear_params(x, rows, in, p, w, b, y, gemm);
    if (act == linear_act::gelu_tanh) gelu_tanh(y, rows * out_features(p, w));
  }

  void layer_norm_modulate(const float* x, float* y, std::size_t rows, std::size_t d, double eps,
                           modulation_rows shift, modulation_rows scale) const {
    for (std::size_t t = 0; t < rows; ++t)
      layer_norm_modulate_row(x + t * d, d, eps, shift.row_of(t), scale.row_of(t), y + t * d);
  }

  void layer_norm(const float* x, float* y, std::size_t rows, std::size_t d, double eps, const tensor_view& weight,
                  const tensor_view& bias) const {
    visit_storage(weight, [&](const auto* w) {
      using storage_type = std::remove_cv_t<std::remove_pointer_t<decltype(w)>>;
      const storage_type* b = typed_data<storage_type>(bias);
      for (std::size_t t = 0; t < rows; ++t) layer_norm_row(x + t * d, d, eps, w, b, y + t * d);
    });
  }

  void layer_norm_silu(float* x, std::size_t rows, std::size_t d, double eps) const {
    for (std::size_t r = 0; r < rows; ++r) {
      layer_norm_row(x + r * d, d, eps, x + r * d);
      for (std::size_t i = 0; i < d; ++i) x[r * d + i] = unshard::silu(x[r * d + i]);
    }
  }

  void rms_norm(float* x, std::size_t rows, std::size_t d, double eps, const tensor_view& weight) const {
    visit_storage(weight, [&](const auto* w) {
      for (std::size_t r = 0; r < rows; ++r) rms_norm_row(x + r * d, d, eps, w, x + r * d);
    });
  }

  // cos/sin: [rows, head_dim / 2], one row per token, shared by its heads.
  void rope(float* x, std::size_t rows, std::size_t heads, std::size_t head_dim, const float* cos,
            const float* sin) const {
    const std::size_t c = head_dim / 2, ld = heads * head_dim;
    for (std::size_t t = 0; t < rows; ++t)
      for (std::size_t h = 0; h < heads; ++h) rope_rotate_row(x + t * ld + h * head_dim, cos + t * c, sin + t * c, c);
  }

  void attention(const float* q, std::size_t n_queries, kv_segment first, kv_segment second, std::size_t heads,
                 std::size_t head_dim, float* scores, float* out) const {
    if (second.rows == 0) second = {first.k, first.v, 0};  // never offset a null segment
    // bf16 cache rows are widened (exactly) into f32 scratch: [k1 | v1 | k2 | v2], each as needed.
    float* widen = kv_widen;
    const std::size_t w = heads * head_dim;
    const auto as_f32 = [&](kv_rows r, std::size_t rows) -> const float* {
      if (r.type == dtype::f32) return r.f32();
      if (r.type != dtype::bf16) throw_error("host attention: ", name_of(r.type), " keys or values are not supported");
      if (widen == nullptr) throw_error("host attention: a bf16 KV cache needs the kv_widen scratch (none given)");
      float* dst = widen;
      for (std::size_t i = 0; i < rows * w; ++i) dst[i] = r.as_bf16()[i].to_float();
      widen += rows * w;
      return dst;
    };
    const float* k1 = as_f32(first.k, first.rows);
    const float* v1 = as_f32(first.v, first.rows);
    const float* k2 = as_f32(second.k, second.rows);
    const float* v2 = as_f32(second.v, second.rows);
    attention_two_segments(gemm, q, n_queries, k1, v1, first.rows, k2, v2, second.rows, heads, head_dim, scores, out);
  }

  // Group g's n_queries / groups query rows see group g's keys.rows / groups key rows only.
  void grouped_attention(const float* q, std::size_t n_queries, kv_segment keys, std::size_t heads,
                         std::size_t head_dim, std::size_t groups, float* scores, float* out) const {
    if (keys.k.type != dtype::f32 || keys.v.type != dtype::f32)
      throw_error("host grouped_attention: keys and values must be f32 activations");
    const std::size_t ld = heads * head_dim, nq = n_queries / groups, nk = keys.rows / groups;
    for (std::size_t g = 0; g < groups; ++g)
      multi_head_attention(q + g * nq * ld, nq, keys.k.f32() + g * nk * ld, keys.v.f32() + g * nk * ld, nk, heads,
                           head_dim, scores, out + g * nq * ld);
  }

  void gelu_tanh(float* x, std::size_t n) const {
    for (std::size_t i = 0; i < n; ++i) x[i] = unshard::gelu_tanh(x[i]);
  }
  void silu(const float* x, float* y, std::size_t n) const {
    for (std::size_t i = 0; i < n; ++i) y[i] = unshard::silu(x[i]);
  }

  void gated_residual(float* x, const float* y, modulation_rows gate, std::size_t rows, std::size_t d) const {
    for (std::size_t t = 0; t < rows; ++t) gated_residual_row(x + t * d, y + t * d, gate.row_of(t), d);
  }
  void residual(float* x, const float* y, std::size_t n) const {
    for (std::size_t t = 0; t < n; ++t) x[t] = x[t] + y[t];
  }

  void scaled_add(float* x, const float* y, float a, std::size_t n) const {
    for (std::size_t i = 0; i < n; ++i) x[i] = add_scaled(x[i], y[i], a);
  }

  // out[r, i] = param[i] + in[r * in_ld + i % in_cols], i < n: a parameter row plus per-row terms.
  void add_param_rows(float* out, const tensor_view& param, const float* in, std::size_t rows, std::size_t n,
                      std::size_t in_ld, std::size_t in_cols) const {
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t i = 0; i < n; ++i) out[r * n + i] = param.load(i) + in[r * in_ld + i % in_cols];
  }
  // x[t] = (x[t] + y[t]) + table[row] (y may be null: x[t] + table[row]), rows of d.
  void add_rows(float* x, const float* y, std::size_t rows, std::size_t d, const tensor_view& table,
                std::size_t row) const {
    for (std::size_t t = 0; t < rows; ++t)
      for (std::size_t i = 0; i < d; ++i) {
        const float xi = y ? x[t * d + i] + y[t * d + i] : x[t * d + i];
        x[t * d + i] = xi + table.load(row * d + i);
      }
  }
  // rows rows, ld apart, each = param[0, d).
  void broadcast_row(float* dst, std::size_t ld, std::size_t rows, const tensor_view& param, std::size_t d) const {
    for (std::size_t t = 0; t < rows; ++t)
      for (std::size_t i = 0; i < d; ++i) dst[t * ld + i] = param.load(i);
  }

  // The patch vectors of tokens [0, tokens) of src [channels, frames, height, width].
  void patchify(const float* src, std::size_t channels, std::size_t frames, std::size_t height, std::size_t width,
                const patch_grid& grid, std::size_t tokens, float* dst) const {
    const std::size_t vec = channels * grid.pt * grid.ph * grid.pw;
    for (std::size_t t = 0; t < tokens; ++t) patchify_token(src, channels, frames, height, width, grid, t, dst + t * vec);
  }
  void unpatchify(const float* src, std::size_t channels, const patch_grid& grid, std::size_t tokens, float* dst) const {
    const std::size_t vec = channels * grid.pt * grid.ph * grid.pw;
    for (std::size_t t = 0; t < tokens; ++t) unpatchify_token(src + t * vec, channels, grid, t, dst);
  }
  // The input vectors of a causal Conv1d (kernel 3) over each of `streams` inputs [t_in, channels].
  void causal_conv_inputs(const float* x, std::size_t streams, std::size_t t_in, std::size_t channels,
                          std::size_t stride, float* cols) const {
    const std::size_t t_out = causal_conv_out_len(t_in, stride);
    for (std::size_t j = 0; j < streams; ++j)
      for (std::size_t t = 0; t < t_out; ++t)
        causal_conv_input_row(x + j * t_in * channels, channels, t, stride, cols + (j * t_out + t) * 3 * channels);
  }

  // out[r, dim]: sinusoid of t[r] for r < rows_with_t, of t = 0 for the rows after.
  void sinusoid_rows(const float* t, std::size_t rows_with_t, std::size_t rows, std::size_t dim, float* out) const {
    for (std::size_t r = 0; r < rows; ++r) {
      const double tr = r < rows_with_t ? static_cast<double>(t[r]) : 0.0;
      for (std::size_t i = 0; i < dim; ++i) out[r * dim + i] = time_sinusoid(tr, i, dim);
    }
  }

  // out[t, c] = Σ_l a[l, c, col(t)] SiLU(w_l) / Σ_l SiLU(w_l), a [layers, channels, columns];
  // col(t) = 0 for the first `repeat_first` rows, then t - repeat_first. Sum in double.
  void mix_layers(const float* a, std::size_t layers, std::size_t channels, std::size_t columns,
                  const tensor_view& weights, std::size_t rows, std::size_t repeat_first, float* out) const {
    if (layers > max_mixed_layers)
      throw_error("mix_layers: ", layers, " layers, at most ", max_mixed_layers, " supported");
    double w[max_mixed_layers];
    float sum = 0.0f;
    for (std::size_t l = 0; l < layers; ++l) {
      const float s = unshard::silu(weights.load(l));
      w[l] = s;
      sum += s;
    }
    for (std::size_t t = 0; t < rows; ++t) {
      const std::size_t col = t < repeat_first ? 0 : t - repeat_first;
      for (std::size_t c = 0; c < channels; ++c) {
        double acc = 0.0;
        for (std::size_t l = 0; l < layers; ++l) acc += static_cast<double>(a[(l * channels + c) * columns + col]) * w[l] / sum;
        out[t * channels + c] = static_cast<float>(acc);
      }
    }
  }
  static constexpr std::size_t max_mixed_layers = 64;

  void copy(float* dst, const float* src, std::size_t n) const { std::copy_n(src, n, dst); }
  void copy_rows(float* dst, std::size_t dst_ld, const float* src, std::size_t src_ld, std::size_t rows,
                 std::size_t cols) const {
    for (std::size_t r = 0; r < rows; ++r) std::copy_n(src + r * src_ld, cols, dst + r * dst_ld);
  }
  void fill(float* dst, std::size_t n, float value) const { std::fill(dst, dst + n, value); }
  // dst[0, n) = src as f32, src a host tensor of any storage dtype (n = its element count).
  void upload(float* dst, const tensor_view& src) const {
    const auto n = static_cast<std::size_t>(src.numel());
    for (std::size_t i = 0; i < n; ++i) dst[i] = src.load(i);
  }
  // A bf16 cache keeps each value rounded to nearest even, once, when it is written.
  void write_cache(kv_cache_ref cache, const float* src, std::size_t n) const {
    if (cache.type == dtype::f32) return static_cast<void>(std::copy_n(src, n, static_cast<float*>(cache.data)));
    require_bf16_cache(cache);
    bf16* dst = static_cast<bf16*>(cache.data);
    for (std::size_t i = 0; i < n; ++i) dst[i] = bf16::from_float(src[i]);
  }
  void read_cache(float* dst, kv_cache_ref cache, std::size_t n) const {
    if (cache.type == dtype::f32) return static_cast<void>(std::copy_n(static_cast<const float*>(cache.data), n, dst));
    require_bf16_cache(cache);
    const bf16* src = static_cast<const bf16*>(cache.data);
    for (std::size_t i = 0; i < n; ++i) dst[i] = src[i].to_float();
  }
  void host_tables(float* a, float* b, std::size_t, host_fill fill) const { fill(a, b); }
  std::size_t load_count(const float* slot) const { return static_cast<std::size_t>(*slot); }
  void store_count(float* slot, std::size_t n) const { *slot = static_cast<float>(n); }

 private:
  static void require_bf16_cache(const kv_cache_ref& c) {
    if (c.type != dtype::bf16) throw_error("host ops: a ", name_of(c.type), " KV cache is not supported (f32 or bf16)");
  }

  template <param_source P>
  static std::size_t out_features(P& p, std::size_t w) {
    const shape& d = p.dims(w);
    return d.rank() == 0 ? 0 : static_cast<std::size_t>(d[0]);
  }
};

static_assert(op_set<host_ops>, "host_ops must implement every op of the op set");

}  // namespace unshard
