#pragma once
// Device kernels of Live Avatar's S2V model (models/liveavatar/) beyond the plain Wan block's:
//  * attention with grouped and segmented keys, in one launch: the audio injector's per-frame
//    cross-attention (frame f's queries see only frame f's audio tokens) and the streamed
//    self-attention over the noisy KV cache followed by the roped cond keys (two key segments,
//    one softmax, no copy that joins them);
//  * the causal audio encoder's Conv1d and the frame packer's Conv3d as input vectors + one
//    cuBLASLt GEMM each (the host's s2v_causal_conv / s2v_pack_forward);
//  * the fp16-rounded rope factor tables at signed positions.
// Every row function is the UNSHARD_HD one the host path runs (models/liveavatar/kernels.hpp,
// kernels/thread/patch.hpp), so the device computes the tested host math.
//
// The attention wrappers use attention.cuh's segmented_flash_attention (grouped queries and keys,
// two key segments under one softmax): the same kernel as flash_attention.
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "unshard/kernels/cuda/attention.cuh"
#include "unshard/kernels/cuda/common.cuh"
#include "unshard/kernels/cuda/elementwise.cuh"
#include "unshard/kernels/cuda/gemm.cuh"
#include "unshard/kernels/thread/patch.hpp"
#include "unshard/models/liveavatar/geometry.hpp"
#include "unshard/models/liveavatar/kernels.hpp"

namespace unshard::cuda {


// The audio injector's cross-attention: for every frame f < frames, query rows
// f*frame_rows .. +frame_rows-1 of q attend to key/value rows f*keys_per_frame .. +keys_per_frame-1
// of k and v (the frame's own audio tokens) -- the host's multi_head_attention per frame
// (s2v_injector_attn_forward), all frames, heads and query tiles in one launch.
template <storage_type T>
void flash_attention_per_frame(const T* q, std::size_t frames, std::size_t frame_rows, const T* k, const T* v,
                               std::size_t keys_per_frame, std::size_t heads, std::size_t head_dim, T* out,
                               cudaStream_t stream) {
  segmented_attention<T> p;
  p.q = q;
  p.out = out;
  p.queries = frame_rows;
  p.groups = frames;
  p.q_group_rows = frame_rows;
  p.seg[0] = {k, v, keys_per_frame, keys_per_frame};
  p.heads = heads;
  p.d = head_dim;
  if (frames > 0 && frame_rows > 0 && keys_per_frame == 0)
    throw_error("flash_attention_per_frame: no audio tokens per frame (softmax over an empty set)");
  segmented_flash_attention(p, stream);
}

// Every query row and head of q [n_queries, heads*d] against the keys [K1; K2] (values [V1; V2]),
// n1 rows of k1/v1 then n2 rows of k2/v2, all [rows, heads*d]: attention_row_two_segments
// (models/liveavatar/kernels.hpp) for every row and head, in one launch. In the streamed
// self-attention, segment 1 is the block's noisy cache (its active slots), segment 2 the cond
// cache's keys roped at this call's positions and its values.
template <storage_type T>
void flash_attention_two_segments(const T* q, std::size_t n_queries, const T* k1, const T* v1, std::size_t n1,
                                  const T* k2, const T* v2, std::size_t n2, std::size_t heads, std::size_t head_dim,
                                  T* out, cudaStream_t stream) {
  segmented_attention<T> p;
  p.q = q;
  p.out = out;
  p.queries = n_queries;
  p.seg[0] = {k1, v1, n1, 0};
  p.seg[1] = {k2, v2, n2, 0};
  p.heads = heads;
  p.d = head_dim;
  segmented_flash_attention(p, stream);
}

// --- rope factors -------------------------------------------------------------------------------

namespace detail {

// One thread per token: s2v_rope_factors_row at the token's (t, h, w), read from pos [n, 3].
// A template: a header may define it in every TU (nvcc ignores `inline` on a __global__).
template <int = 0>
__global__ void s2v_rope_factors_kernel(const std::int64_t* pos, std::size_t n, std::size_t pairs, float* cos,
                                        float* sin) {
  for (std::size_t t = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    s2v_rope_factors_row(pos[3 * t], pos[3 * t + 1], pos[3 * t + 2], pairs, cos + t * pairs, sin + t * pairs);
}

// The streamed block's tokens: token t of frame f = t / (gh*gw) sits at (first_frame + f, row, column).
template <int = 0>
__global__ void s2v_block_rope_factors_kernel(std::int64_t first_frame, std::size_t tokens, std::size_t gh,
                                              std::size_t gw, std::size_t pairs, float* cos, float* sin) {
  for (std::size_t t = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; t < tokens;
       t += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const std::size_t f = t / (gh * gw), j = t % (gh * gw);
    s2v_rope_factors_row(first_frame + static_cast<std::int64_t>(f), static_cast<std::int64_t>(j / gw),
                         static_cast<std::int64_t>(j % gw), pairs, cos + t * pairs, sin + t * pairs);
  }
}

}  // namespace detail

// cos/sin [n, pairs] = the fp16-rounded rope factors of the n tokens at positions pos [n, 3]
// (device memory, (t, h, w) per token, possibly negative: the cond tokens of s2v_cond_position).
inline void s2v_rope_factors(const std::int64_t* pos, std::size_t n, std::size_t pairs, float* cos, float* sin,
                             cudaStream_t stream) {
  if (n == 0 || pairs == 0) return;
  detail::s2v_rope_factors_kernel<><<<blocks_for(n, 128), 128, 0, stream>>>(pos, n, pairs, cos, sin);
  check_launch("s2v_rope_factors");
}

// cos/sin [frames*gh*gw, pairs] of a streamed block whose first frame has rope position
// first_frame (current_start / frame_tokens in s2v_patch_forward).
inline void s2v_block_rope_factors(std::int64_t first_frame, std::size_t frames, std::size_t gh, std::size_t gw,
                                   std::size_t pairs, float* cos, float* sin, cudaStream_t stream) {
  const std::size_t tokens = frames * gh * gw;
  if (tokens == 0 || pairs == 0) return;
  detail::s2v_block_rope_factors_kernel<><<<blocks_for(tokens, 128), 128, 0, stream>>>(first_frame, tokens, gh, gw,
                                                                                      pairs, cos, sin);
  check_launch("s2v_block_rope_factors");
}

// --- convolutions as GEMMs ----------------------------------------------------------------------

// y [m, n] = x [m, k] · Wᵀ + b for f32 activations. bf16 (f16) weights are widened into `scratch`
// (n*k + n floats; unused for f32) first, as the Wan device path does (models/wan/cuda/forward.cuh):
// the GEMM is then the f32 one of the host's widened weights, with f32 accumulation.
template <storage_type W>
void s2v_linear(blaslt& blas, const float* x, std::size_t m, std::size_t k, const W* w, const W* b, std::size_t n,
                float* y, float* scratch, cudaStream_t stream) {
  if constexpr (std::is_same_v<W, float>) {
    blas.linear(x, m, k, w, b, n, y, activation::none, stream);
  } else {
    if (scratch == nullptr) throw_error("s2v_linear: ", n, "x", k, " weights in 16 bits need an f32 scratch");
    float* wf = scratch;
    float* bf = b ? scratch + n * k : nullptr;
    cuda::convert(w, n * k, wf, stream);
    if (b) cuda::convert(b, n, bf, stream);
    blas.linear(x, m, k, static_cast<const float*>(wf), static_cast<const float*>(bf), n, y, activation::none, stream);
  }
}

namespace detail {

// One thread per output row r = j * t_out + t: causal_conv_input_row of stream j's step t.
template <int = 0>
__global__ void causal_conv_columns_kernel(const float* x, std::size_t streams, std::size_t t_in,
                                           std::size_t channels, std::size_t stride, std::size_t t_out, float* cols) {
  const std::size_t rows = streams * t_out;
  for (std::size_t r = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    causal_conv_input_row(x + (r / t_out) * t_in * channels, channels, r % t_out, stride, cols + r * 3 * channels);
}

}  // namespace detail

// cols [streams * t_out, 3*channels] = the causal Conv1d's input vectors of every stream j (x + j *
// t_in * channels, time-major [t_in, channels]), t_out = conv_out_len(t_in, stride).
inline void causal_conv_columns(const float* x, std::size_t streams, std::size_t t_in, std::size_t channels,
                                std::size_t stride, float* cols, cudaStream_t stream) {
  if (streams == 0 || channels == 0) return;
  if (t_in == 0 || stride == 0) throw_error("causal_conv_columns: input length ", t_in, ", stride ", stride);
  const std::size_t rows = streams * unshard::detail::conv_out_len(t_in, stride);
  detail::causal_conv_columns_kernel<><<<blocks_for(rows, 128), 128, 0, stream>>>(
      x, streams, t_in, channels, stride, unshard::detail::conv_out_len(t_in, stride), cols);
  check_launch("causal_conv_columns");
}

// out [streams * t_out, out_channels] = CausalConv1d (kernel 3, stride 1 or 2) of every stream,
// through their input vectors and one GEMM with w [out_channels, channels, 3] (the host's
// s2v_causal_conv). cols holds streams * t_out * 3 * channels floats; w_scratch as s2v_linear.
template <storage_type W>
void causal_conv1d(blaslt& blas, const float* x, std::size_t streams, std::size_t t_in, std::size_t channels,
                   std::size_t stride, const W* w, const W* b, std::size_t out_channels, float* cols, float* out,
                   float* w_scratch, cudaStream_t stream) {
  causal_conv_columns(x, streams, t_in, channels, stride, cols, stream);
  s2v_linear(blas, cols, streams * unshard::detail::conv_out_len(t_in, stride), 3 * channels, w, b, out_channels,
             out, w_scratch, stream);
}

// The token grid of a Conv3d with kernel = stride (kt, kh, kh) over [.., frames, height, width]:
// floored, as the frame packer's buckets (1x2x2, 2x4x4, 4x8x8) are.
inline patch_grid frame_pack_grid(std::size_t frames, std::size_t height, std::size_t width, std::size_t kt,
                                  std::size_t kh) {
  if (kt == 0 || kh == 0) throw_error("frame_pack_grid: kernel ", kt, "x", kh, "x", kh);
  return {kt, kh, kh, frames / kt, height / kh, width / kh};
}

// y [tokens, dim] = Conv3d(x [channels, frames, height, width]) with kernel = stride (kt, kh, kh)
// and weight w [dim, channels, kt, kh, kh]: patchify (the Wan kernel, any patch size) + one GEMM,
// as s2v_pack_forward does. patches holds tokens * channels*kt*kh*kh floats.
template <storage_type W>
void frame_pack_conv(blaslt& blas, const float* x, std::size_t channels, std::size_t frames, std::size_t height,
                     std::size_t width, std::size_t kt, std::size_t kh, const W* w, const W* b, std::size_t dim,
                     float* patches, float* y, float* w_scratch, cudaStream_t stream) {
  const patch_grid g = frame_pack_grid(frames, height, width, kt, kh);
  const std::size_t tokens = g.gf * g.gh * g.gw;
  if (tokens == 0) return;
  cuda::patchify(x, channels, frames, height, width, g, patches, stream);
  s2v_linear(blas, patches, tokens, channels * kt * kh * kh, w, b, dim, y, w_scratch, stream);
}

}  // namespace unshard::cuda
