#pragma once
// The Wan sub-units on the device: the same steps, in the same order, as the host forwards
// (models/wan/embeddings.hpp, block.hpp, head.hpp), each step one kernel or one cuBLASLt matmul
// on the state's stream. Parameter layouts, slot indices and checks are the host's
// (models/wan/params.hpp); parameters arrive through a param_source, so chunked unshard streams
// weight rows into blaslt::linear_rows exactly as the host streams them into linear_rows.
//
// Fusions (vs the host's separate loops): LayerNorm + adaLN modulate; RMSNorm + rope of q and k;
// bias + GELU in the matmul epilogue (or one bias + GELU kernel); the gate with the residual add.
// Nothing here synchronises or allocates device memory.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "unshard/kernels/cuda/attention.cuh"
#include "unshard/kernels/cuda/elementwise.cuh"
#include "unshard/kernels/cuda/gemm.cuh"
#include "unshard/kernels/cuda/norm.cuh"
#include "unshard/layer/param_source.hpp"
#include "unshard/models/wan/cuda/state.cuh"
#include "unshard/models/wan/params.hpp"

namespace unshard::detail {

// Parameter i of a sub-unit as a typed device pointer (W: the storage type the geometry says).
template <class W, param_source P>
const W* wan_cuda_param(P& p, std::size_t i) {
  return reinterpret_cast<const W*>(p.whole(i).data());
}

// y [m, N] = act(x [m, k] · Wᵀ + b) for the linear (weight, bias) of a sub-unit, row chunk by row
// chunk as the param_source delivers W. bf16 weights are widened into the state's scratch first.
template <class W, param_source P>
void wan_cuda_linear(wan_cuda_state& s, const wan_cuda_options& o, const float* x, std::size_t m, std::size_t k, P& p,
                     const wan_linear_slots& slots, float* y, bool gelu = false) {
  const shape& wd = p.dims(slots.weight);
  const auto n = static_cast<std::size_t>(wd[0]);
  const W* bias = wan_cuda_param<W>(p, slots.bias);  // 1-D: resident, valid across rows()
  const bool fused_gelu = gelu && o.gelu_in_epilogue;
  const cuda::activation act = fused_gelu ? cuda::activation::gelu_tanh : cuda::activation::none;
  // Without the epilogue, GELU needs the bias added first: the matmul leaves it to bias_gelu.
  const bool bias_in_matmul = !gelu || fused_gelu;
  cuda::blaslt& blas = s.gemm();
  p.rows(slots.weight, [&](const tensor_view& w_rows, std::int64_t r0, std::int64_t r1) {
    const auto rows = static_cast<std::size_t>(r1 - r0);
    const W* w = reinterpret_cast<const W*>(w_rows.data());
    const W* b = bias_in_matmul ? bias + r0 : nullptr;
    if constexpr (std::is_same_v<W, float>) {
      blas.linear_rows(x, m, k, w, b, rows, static_cast<std::size_t>(r0), y, n, act, s.stream);
    } else {
      float* wf = s.weight_f32;
      float* bf = b ? s.weight_f32 + s.weight_f32_bias_offset : nullptr;
      cuda::convert(w, rows * k, wf, s.stream);
      if (b) cuda::convert(b, rows, bf, s.stream);
      blas.linear_rows(x, m, k, static_cast<const float*>(wf), static_cast<const float*>(bf), rows,
                       static_cast<std::size_t>(r0), y, n, act, s.stream);
    }
  });
  if (gelu && !fused_gelu) cuda::bias_gelu(y, m, n, bias, s.stream);
}

// Calls f.template operator()<W>() with W the storage type of the parameters.
template <class F>
void wan_cuda_dispatch(const wan_geometry& g, F&& f) {
  if (g.storage == dtype::bf16) return f.template operator()<bf16>();
  if (g.storage == dtype::f32) return f.template operator()<float>();
  throw_error("wan_cuda_model: storage dtype ", name_of(g.storage), " is not supported (f32 or bf16)");
}

// --- embeddings -------------------------------------------------------------------------------

template <param_source P>
void wan_cuda_patch_embedding_forward(const wan_geometry& g, const wan_cuda_options& o, P& p, wan_cuda_state& s) {
  const auto lay = wan_patch_embedding_layout(g);
  check_wan_params(lay.table, p, g.storage, wan_layer_kind::embeddings, 0, "patch_embedding");
  const auto [C, F, H, W] = g.latent;
  cuda::patchify(s.input_x, C, F, H, W, g.grid, s.patches, s.stream);
  wan_cuda_dispatch(g, [&]<class T>() { wan_cuda_linear<T>(s, o, s.patches, g.tokens, g.patch_in, p, lay.conv, s.x); });
  cuda::rope_table(g.grid.gf, g.grid.gh, g.grid.gw, g.rope_pairs, s.rope_cos, s.rope_sin, s.stream);
}

template <param_source P>
void wan_cuda_time_forward(const wan_geometry& g, const wan_cuda_options& o, P& p, wan_cuda_state& s) {
  const auto lay = wan_time_layout(g);
  check_wan_params(lay.table, p, g.storage, wan_layer_kind::embeddings, 0, "time");
  cuda::time_sinusoid(s.input_t, g.freq_dim, s.time_sinusoid, s.stream);
  wan_cuda_dispatch(g, [&]<class T>() {
    wan_cuda_linear<T>(s, o, s.time_sinusoid, 1, g.freq_dim, p, lay.embed0, s.time_hidden);
    cuda::silu(s.time_hidden, g.dim, s.time_hidden, s.stream);
    wan_cuda_linear<T>(s, o, s.time_hidden, 1, g.dim, p, lay.embed2, s.e);
    cuda::silu(s.e, g.dim, s.time_hidden, s.stream);  // time_projection = Sequential(SiLU, Linear)
    wan_cuda_linear<T>(s, o, s.time_hidden, 1, g.dim, p, lay.projection, s.e0);
  });
}

template <param_source P>
void wan_cuda_text_embedding_forward(const wan_geometry& g, const wan_cuda_options& o, P& p, wan_cuda_state& s) {
  const auto lay = wan_text_layout(g);
  check_wan_params(lay.table, p, g.storage, wan_layer_kind::embeddings, 0, "text_embedding");
  wan_cuda_dispatch(g, [&]<class T>() {
    wan_cuda_linear<T>(s, o, s.input_context, g.text_len, g.text_dim, p, lay.embed0, s.text_hidden, true);
    wan_cuda_linear<T>(s, o, s.text_hidden, g.text_len, g.dim, p, lay.embed2, s.ctx);
  });
}

// --- block ------------------------------------------------------------------------------------

template <param_source P>
void wan_cuda_self_attn_forward(const wan_geometry& g, const wan_cuda_options& o, std::size_t block, P& p,
                                wan_cuda_state& s) {
  const auto lay = wan_self_attn_layout(g);
  check_wan_params(lay.table, p, g.storage, wan_layer_kind::block, block, "self_attn");
  const std::size_t S = g.tokens, D = g.dim;
  const float *shift = s.modulation, *scale = s.modulation + D, *gate = s.modulation + 2 * D;
  wan_cuda_dispatch(g, [&]<class T>() {
    cuda::add_broadcast(wan_cuda_param<T>(p, lay.modulation), s.e0, 6 * D, 6 * D, s.modulation, s.stream);
    cuda::layer_norm_modulate(s.x, S, D, g.eps, shift, scale, s.norm, s.stream);
    wan_cuda_linear<T>(s, o, s.norm, S, D, p, lay.q, s.q);
    wan_cuda_linear<T>(s, o, s.norm, S, D, p, lay.k, s.k);
    wan_cuda_linear<T>(s, o, s.norm, S, D, p, lay.v, s.v);
    const T* norm_q = g.qk_norm ? wan_cuda_param<T>(p, lay.norm_q) : nullptr;
    const T* norm_k = g.qk_norm ? wan_cuda_param<T>(p, lay.norm_k) : nullptr;
    cuda::rms_norm_rope(s.q, S, D, g.head_dim, g.eps, norm_q, s.rope_cos, s.rope_sin, s.stream);
    cuda::rms_norm_rope(s.k, S, D, g.head_dim, g.eps, norm_k, s.rope_cos, s.rope_sin, s.stream);
    cuda::flash_attention(s.q, S, s.k, s.v, S, g.heads, g.head_dim, s.attn, s.stream);
    wan_cuda_linear<T>(s, o, s.attn, S, D, p, lay.o, s.proj);
  });
  cuda::gated_residual(s.x, s.proj, gate, S, D, s.stream);
}

template <param_source P>
void wan_cuda_cross_attn_forward(const wan_geometry& g, const wan_cuda_options& o, std::size_t block, P& p,
                                 wan_cuda_state& s) {
  const auto lay = wan_cross_attn_layout(g);
  check_wan_params(lay.table, p, g.storage, wan_layer_kind::block, block, "cross_attn");
  const std::size_t S = g.tokens, D = g.dim, L = g.text_len;
  wan_cuda_dispatch(g, [&]<class T>() {
    const float* in = s.x;  // norm3 is Identity without cross_attn_norm
    if (g.cross_attn_norm) {
      cuda::layer_norm_affine(s.x, S, D, g.eps, wan_cuda_param<T>(p, lay.norm3_weight),
                              wan_cuda_param<T>(p, lay.norm3_bias), s.norm, s.stream);
      in = s.norm;
    }
    wan_cuda_linear<T>(s, o, in, S, D, p, lay.q, s.q);
    wan_cuda_linear<T>(s, o, s.ctx, L, D, p, lay.k, s.k);  // per block: ctx is shared, k/v weights are not
    wan_cuda_linear<T>(s, o, s.ctx, L, D, p, lay.v, s.v);
    if (g.qk_norm) {
      const float* no_rope = nullptr;
      cuda::rms_norm_rope(s.q, S, D, g.head_dim, g.eps, wan_cuda_param<T>(p, lay.norm_q), no_rope, no_rope, s.stream);
      cuda::rms_norm_rope(s.k, L, D, g.head_dim, g.eps, wan_cuda_param<T>(p, lay.norm_k), no_rope, no_rope, s.stream);
    }
    cuda::flash_attention(s.q, S, s.k, s.v, L, g.heads, g.head_dim, s.attn, s.stream);
    wan_cuda_linear<T>(s, o, s.attn, S, D, p, lay.o, s.proj);
  });
  cuda::gated_residual(s.x, s.proj, static_cast<const float*>(nullptr), S, D, s.stream);
}

template <param_source P>
void wan_cuda_ffn_forward(const wan_geometry& g, const wan_cuda_options& o, std::size_t block, P& p, wan_cuda_state& s) {
  const auto lay = wan_ffn_layout(g);
  check_wan_params(lay.table, p, g.storage, wan_layer_kind::block, block, "ffn");
  const std::size_t S = g.tokens, D = g.dim;
  const float *shift = s.modulation + 3 * D, *scale = s.modulation + 4 * D, *gate = s.modulation + 5 * D;
  cuda::layer_norm_modulate(s.x, S, D, g.eps, shift, scale, s.norm, s.stream);
  wan_cuda_dispatch(g, [&]<class T>() {
    wan_cuda_linear<T>(s, o, s.norm, S, D, p, lay.fc0, s.ffn_hidden, true);
    wan_cuda_linear<T>(s, o, s.ffn_hidden, S, g.ffn_dim, p, lay.fc2, s.proj);
  });
  cuda::gated_residual(s.x, s.proj, gate, S, D, s.stream);
  if (g.record_block_outputs)
    UNSHARD_CUDA_CHECK(cudaMemcpyAsync(s.block_outputs + block * S * D, s.x, S * D * sizeof(float),
                                       cudaMemcpyDeviceToDevice, s.stream));
}

// --- head -------------------------------------------------------------------------------------

template <param_source P>
void wan_cuda_head_forward(const wan_geometry& g, const wan_cuda_options& o, P& p, wan_cuda_state& s) {
  const auto lay = wan_head_layout(g);
  check_wan_params(lay.table, p, g.storage, wan_layer_kind::head, 0, "head");
  const std::size_t S = g.tokens, D = g.dim;
  const float *shift = s.modulation, *scale = s.modulation + D;
  wan_cuda_dispatch(g, [&]<class T>() {
    cuda::add_broadcast(wan_cuda_param<T>(p, lay.modulation), s.e, 2 * D, D, s.modulation, s.stream);  // + e, not e0
    cuda::layer_norm_modulate(s.x, S, D, g.eps, shift, scale, s.norm, s.stream);
    wan_cuda_linear<T>(s, o, s.norm, S, D, p, lay.head, s.head_out);
  });
  cuda::unpatchify(s.head_out, g.out_dim, g.grid, s.output, s.stream);
}

}  // namespace unshard::detail
