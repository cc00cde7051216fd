#pragma once
// Flash-style multi-head attention on the device: out = softmax(Q Kᵀ / sqrt(d)) V per head, over
// [rows, heads*d] activations (the layout of kernels/host/attention.hpp), with no score matrix in
// memory. Used for self-attention (keys = tokens) and cross-attention (keys = text rows).
//
// Work split: a block of 256 threads takes 64 query rows of one head; each row belongs to 4
// adjacent lanes, each lane holding a quarter of the row's q and output accumulator in registers
// (float4 chunks p, p+4, p+8, ... of the head, so the 4 lanes read 64 contiguous bytes of a shared
// K/V row and 8 rows share that broadcast). K and V stream through shared memory in tiles of Bc
// keys; per tile the scores are completed by two lane shuffles and folded into the running
// (max, sum, accumulator) of an online softmax, as FlashAttention does. Everything is f32 from
// the load on (bf16 storage is widened as it enters shared memory).
//
// Differences from the host's attention_row, and why the results still agree to ~1e-6 relative:
// the host takes the max over all keys first, then sums exp(s - max); here each tile rescales the
// partial sums by exp(m_old - m_new) -- the same value up to rounding -- and the dot products sum
// in another order. The test (tests/gpu/test_kernels.cu) compares both on random data.
//
// Generalised for the S2V model (models/liveavatar/): blockIdx.z picks a group (a frame) whose query
// and key rows start at a per-group offset, and the keys may be two segments read through one index
// (the noisy cache, then the roped cond keys). flash_attention is the one-group, one-segment case.
//
// This is a CUDA-core (SIMT) f32 kernel: exact enough for the f32 references, not a tensor-core
// kernel. Head widths up to 256 (Wan uses 128); d need not be a multiple of 4 (tiles are
// zero-padded to the compiled width).
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>

#include "unshard/kernels/cuda/common.cuh"

namespace unshard::cuda {

namespace detail {

inline constexpr unsigned attn_threads = 256;
inline constexpr unsigned attn_lanes_per_row = 4;
inline constexpr unsigned attn_rows = attn_threads / attn_lanes_per_row;  // 64 query rows per block

template <int DMax>
inline constexpr int attn_key_tile = DMax <= 128 ? 32 : 16;  // K+V tiles stay at <= 32 KiB

}  // namespace detail

inline constexpr std::size_t flash_attention_max_head_dim = 256;

// One key segment: rows of k and v (leading dimension heads*d, like q), `n` keys per group, the
// first key of group g at row g * group_rows (0: every group reads the same rows).
template <class T>
struct key_segment {
  const T* k = nullptr;
  const T* v = nullptr;
  std::size_t n = 0;
  std::size_t group_rows = 0;
};

// softmax(Q [K_seg0; K_seg1]ᵀ scale) [V_seg0; V_seg1] for `groups` independent query groups of
// `queries` rows each, group g's first query row at g * q_group_rows (of q and of out).
template <class T>
struct segmented_attention {
  const T* q = nullptr;
  T* out = nullptr;
  std::size_t queries = 0;
  std::size_t groups = 1;
  std::size_t q_group_rows = 0;
  key_segment<T> seg[2];
  std::size_t heads = 0, d = 0;
  float scale = 0.0f;  // 0: 1/sqrt(d)
};

namespace detail {

template <int DMax, class T>
__global__ void __launch_bounds__(attn_threads) segmented_flash_attention_kernel(const segmented_attention<T> p) {
  constexpr int Bc = attn_key_tile<DMax>;
  constexpr int chunks = DMax / 4 / attn_lanes_per_row;  // float4 chunks per lane
  static_assert(DMax % (4 * attn_lanes_per_row) == 0, "DMax must be a multiple of 16");
  __shared__ float4 ks[Bc][DMax / 4];
  __shared__ float4 vs[Bc][DMax / 4];

  const std::size_t d = p.d, ld = p.heads * d, col = blockIdx.y * d, group = blockIdx.z;
  const unsigned part = threadIdx.x % attn_lanes_per_row;
  const std::size_t r = static_cast<std::size_t>(blockIdx.x) * attn_rows + threadIdx.x / attn_lanes_per_row;
  const bool row_valid = r < p.queries;
  const std::size_t row = group * p.q_group_rows + r;
  // This group's key rows: key j < n1 is row first1 + j of segment 0, key n1 + i row first2 + i of segment 1.
  const std::size_t n1 = p.seg[0].n, n_keys = n1 + p.seg[1].n;
  const std::size_t first1 = group * p.seg[0].group_rows, first2 = group * p.seg[1].group_rows;

  float4 qr[chunks], acc[chunks];
#pragma unroll
  for (int i = 0; i < chunks; ++i) {
    const std::size_t c = 4 * (part + attn_lanes_per_row * i);
    float e[4];
#pragma unroll
    for (int l = 0; l < 4; ++l) e[l] = row_valid && c + l < d ? to_f32(p.q[row * ld + col + c + l]) : 0.0f;
    qr[i] = make_float4(e[0], e[1], e[2], e[3]);
    acc[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  float m = -INFINITY, denom = 0.0f;

  for (std::size_t j0 = 0; j0 < n_keys; j0 += Bc) {
    __syncthreads();  // the previous tile has been read by every thread
    float* kf = reinterpret_cast<float*>(ks);
    float* vf = reinterpret_cast<float*>(vs);
    // A tile may straddle the two segments: each element picks its segment.
    for (unsigned idx = threadIdx.x; idx < Bc * DMax; idx += attn_threads) {
      const std::size_t j = j0 + idx / DMax, c = idx % DMax;
      float kv = 0.0f, vv = 0.0f;
      if (j < n_keys && c < d) {
        const bool first = j < n1;
        const std::size_t at = (first ? first1 + j : first2 + (j - n1)) * ld + col + c;
        kv = to_f32(first ? p.seg[0].k[at] : p.seg[1].k[at]);
        vv = to_f32(first ? p.seg[0].v[at] : p.seg[1].v[at]);
      }
      kf[idx] = kv;
      vf[idx] = vv;
    }
    __syncthreads();

    float s[Bc];
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < Bc; ++j) {
      float part_dot = 0.0f;
#pragma unroll
      for (int i = 0; i < chunks; ++i) {
        const float4 kv = ks[j][part + attn_lanes_per_row * i];
        part_dot += qr[i].x * kv.x + qr[i].y * kv.y + qr[i].z * kv.z + qr[i].w * kv.w;
      }
      part_dot += __shfl_xor_sync(0xffffffffu, part_dot, 1);
      part_dot += __shfl_xor_sync(0xffffffffu, part_dot, 2);
      s[j] = j0 + j < n_keys ? part_dot * p.scale : -INFINITY;
      tile_max = fmaxf(tile_max, s[j]);
    }
    const float m_new = fmaxf(m, tile_max);  // finite: every tile holds at least one key
    const float rescale = expf(m - m_new);   // 0 on the first tile (m = -inf)
    denom *= rescale;
#pragma unroll
    for (int i = 0; i < chunks; ++i) {
      acc[i].x *= rescale;
      acc[i].y *= rescale;
      acc[i].z *= rescale;
      acc[i].w *= rescale;
    }
#pragma unroll
    for (int j = 0; j < Bc; ++j) {
      const float pj = expf(s[j] - m_new);  // 0 for padded keys
      denom += pj;
#pragma unroll
      for (int i = 0; i < chunks; ++i) {
        const float4 vv = vs[j][part + attn_lanes_per_row * i];
        acc[i].x += pj * vv.x;
        acc[i].y += pj * vv.y;
        acc[i].z += pj * vv.z;
        acc[i].w += pj * vv.w;
      }
    }
    m = m_new;
  }

  if (!row_valid) return;
  const float inv = 1.0f / denom;
#pragma unroll
  for (int i = 0; i < chunks; ++i) {
    const std::size_t c = 4 * (part + attn_lanes_per_row * i);
    const float e[4] = {acc[i].x * inv, acc[i].y * inv, acc[i].z * inv, acc[i].w * inv};
#pragma unroll
    for (int l = 0; l < 4; ++l)
      if (c + l < d) p.out[row * ld + col + c + l] = from_f32<T>(e[l]);
  }
}

template <int DMax, class T>
void launch_segmented_attention(const segmented_attention<T>& p, cudaStream_t stream) {
  const dim3 grid(blocks_for(p.queries, attn_rows, 0x7fffffffu), static_cast<unsigned>(p.heads),
                  static_cast<unsigned>(p.groups));
  UNSHARD_LAUNCH(grid, attn_threads, stream, segmented_flash_attention_kernel<DMax, T>)(p);
  check_launch("segmented_flash_attention");
}

}  // namespace detail

// The general form behind flash_attention_per_frame and flash_attention_two_segments (and, with one
// group and one segment, flash_attention). Checks the sizes, sets the host's scale 1/sqrt(d)
// (computed in double, rounded once) unless p.scale > 0 was given, and picks the compiled head
// width.
template <storage_type T>
void segmented_flash_attention(segmented_attention<T> p, cudaStream_t stream) {
  if (p.queries == 0 || p.heads == 0 || p.groups == 0) return;
  if (p.seg[0].n + p.seg[1].n == 0) throw_error("segmented_flash_attention: no keys (softmax over an empty set)");
  if (p.heads > 65535) throw_error("segmented_flash_attention: ", p.heads, " heads exceed the grid's 65535");
  if (p.groups > 65535) throw_error("segmented_flash_attention: ", p.groups, " groups (frames) exceed the grid's 65535");
  if (p.d == 0 || p.d > flash_attention_max_head_dim)
    throw_error("segmented_flash_attention: head_dim ", p.d, " outside [1, ", flash_attention_max_head_dim, "]");
  for (int i = 0; i < 2; ++i)
    if (p.seg[i].n > 0 && (p.seg[i].k == nullptr || p.seg[i].v == nullptr))
      throw_error("segmented_flash_attention: key segment ", i, " has ", p.seg[i].n, " keys but no k or v");
  if (!(p.scale > 0.0f)) p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.d)));
  if (p.d <= 64)
    detail::launch_segmented_attention<64>(p, stream);
  else if (p.d <= 128)
    detail::launch_segmented_attention<128>(p, stream);
  else
    detail::launch_segmented_attention<256>(p, stream);
}

// out[s, h*d:(h+1)*d] = softmax(q_s,h · K_hᵀ / sqrt(d)) V_h for s < n_queries, h < heads, over all
// n_keys rows of k and v; q, k, v, out are [rows, heads*d]. out must not alias q, k or v. The one-group,
// one-segment case of segmented_flash_attention: one online softmax in the code base.
template <storage_type T>
void flash_attention(const T* q, std::size_t n_queries, const T* k, const T* v, std::size_t n_keys, std::size_t heads,
                     std::size_t head_dim, T* out, cudaStream_t stream) {
  if (n_queries == 0 || heads == 0) return;
  if (n_keys == 0) throw_error("flash_attention: no keys (softmax over an empty set)");
  segmented_attention<T> p;
  p.q = q;
  p.out = out;
  p.queries = n_queries;
  p.seg[0] = {k, v, n_keys, 0};
  p.heads = heads;
  p.d = head_dim;
  segmented_flash_attention(p, stream);
}

}  // namespace unshard::cuda
