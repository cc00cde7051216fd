#pragma once
// Scaled dot-product attention for the ops layer: out = softmax(Q Kᵀ · scale) V per head, over
// one or two key segments (Live Avatar's KV cache, then the cond keys: one softmax over both) and
// `groups` independent query/key groups (the per-frame audio attention).
//
//   sdpa(cache, q, queries, seg1, seg2, heads, head_dim, groups, out, scale, stream)
//
// Layout: every tensor is rows [tokens, heads * head_dim], row-major (BSHD with the group as the
// batch). queries and each segment's rows are split into `groups` equal consecutive groups;
// group g's queries attend to group g's rows of seg1 followed by group g's rows of seg2.
//
// Implementations, chosen per call (sdpa_plan_cache::stats() and last_impl() say which ran):
//  * bf16 with the cuDNN frontend (UNSHARD_HAVE_CUDNN_FRONTEND, set by cmake/cudnn_frontend.cmake):
//    cuDNN's fused flash attention (tensor cores, f32 softmax and accumulation). cuDNN takes one
//    K/V tensor, so two segments are first joined into a contiguous K/V scratch owned by the cache
//    (sdpa_scratch_bytes); one segment is read in place. Graphs are built once per shape (groups,
//    queries and keys per group, heads, head_dim, scale) and cached with their workspace. A shape
//    cuDNN does not support (check_support fails), or pointers that are not 16-byte aligned, run
//    the fallback below.
//  * otherwise (f32: cuDNN has no f32 SDPA; bf16 without the frontend, or unsupported): unshard's
//    own segmented_flash_attention (attention.cuh), which reads both segments in place.
//
// The cache allocates its K/V scratch and cuDNN workspace with cudaMalloc when a call needs more
// than it has (after synchronising the stream so no enqueued call still reads the old buffer);
// reserve() sizes them up front, so that a forward allocates nothing (and can be captured).
// Not thread-safe: one cache per stream user, like blaslt.
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>

#include "unshard/backend/cuda/check.cuh"
#include "unshard/kernels/cuda/attention.cuh"
#include "unshard/kernels/cuda/common.cuh"

#if defined(UNSHARD_HAVE_CUDNN_FRONTEND)
#include <cudnn.h>
#include <cudnn_frontend.h>
#endif

namespace unshard::cuda {

#if defined(UNSHARD_HAVE_CUDNN_FRONTEND)
inline void check(cudnnStatus_t s, const call_site& at) {
  if (s == CUDNN_STATUS_SUCCESS) return;
  throw_call_error(at, "cuDNN", "cudnnStatus", cudnnGetErrorString(s));
}
inline constexpr bool sdpa_has_cudnn = true;
#else
inline constexpr bool sdpa_has_cudnn = false;
#endif

// One key/value segment: rows [rows, heads * head_dim] of k and v (rows 0: no segment).
template <class T>
struct attention_segment {
  const T* k = nullptr;
  const T* v = nullptr;
  std::size_t rows = 0;
};

enum class sdpa_impl : std::uint8_t { none, cudnn, unshard_kernel };

inline const char* sdpa_impl_name(sdpa_impl i) {
  return i == sdpa_impl::cudnn ? "cudnn_sdpa" : i == sdpa_impl::unshard_kernel ? "unshard_flash_attention" : "none";
}

struct sdpa_stats {
  std::size_t cudnn_calls = 0;      // calls run by cuDNN's SDPA
  std::size_t fallback_calls = 0;   // calls run by segmented_flash_attention
  std::size_t graphs_built = 0;     // cuDNN graphs built (one per shape)
  std::size_t graph_failures = 0;   // shapes cuDNN rejected (cached; they take the fallback)
  std::size_t segments_joined = 0;  // calls that copied two segments into the K/V scratch
};

// Bytes of K/V scratch a call needs: the joined K and V (keys1 + keys2 rows each, bf16) when both
// segments are present and cuDNN runs, else 0. The planner adds it (and the cuDNN workspace,
// usually 0 for inference SDPA: sdpa_plan_cache::workspace_bytes() after the first call) to the
// workspace term.
inline std::size_t sdpa_scratch_bytes(std::size_t keys1, std::size_t keys2, std::size_t heads, std::size_t head_dim,
                                      std::size_t element_bytes = sizeof(bf16)) {
  if (!sdpa_has_cudnn || keys1 == 0 || keys2 == 0) return 0;
  return 2 * (keys1 + keys2) * heads * head_dim * element_bytes;
}

class sdpa_plan_cache {
 public:
  sdpa_plan_cache() = default;
  ~sdpa_plan_cache() {
    cudaFree(scratch_);
    if (!planned_workspace_) cudaFree(workspace_);
#if defined(UNSHARD_HAVE_CUDNN_FRONTEND)
    graphs_.clear();
    if (handle_) cudnnDestroy(handle_);
#endif
  }
  sdpa_plan_cache(const sdpa_plan_cache&) = delete;
  sdpa_plan_cache& operator=(const sdpa_plan_cache&) = delete;

  // Allocates at least these many bytes of K/V scratch and cuDNN workspace now.
  void reserve(std::size_t scratch_bytes, std::size_t workspace_bytes) {
    grow(scratch_, scratch_bytes_, scratch_bytes, nullptr);
    if (!planned_workspace_) grow(workspace_, workspace_bytes_, workspace_bytes, nullptr);
  }

  // cuDNN's workspace is `bytes` at `p`, a buffer the plan declared (the model's workspace term):
  // the cache never allocates one itself from then on, and a graph that needs more than that runs
  // on the fallback kernel instead, with the reason (memory outside the ledger is never taken).
  void use_planned_workspace(void* p, std::size_t bytes) {
    if (!planned_workspace_) cudaFree(workspace_);
    workspace_ = p;
    workspace_bytes_ = bytes;
    planned_workspace_ = true;
  }

  const sdpa_stats& stats() const noexcept { return stats_; }
  void reset_stats() noexcept { stats_ = {}; }
  sdpa_impl last_impl() const noexcept { return last_; }
  const char* last_impl_name() const noexcept { return sdpa_impl_name(last_); }
  // Why the last bf16 call did not run on cuDNN ("" when it did or there is no frontend).
  const std::string& last_fallback_reason() const noexcept { return reason_; }
  std::size_t scratch_bytes() const noexcept { return scratch_bytes_; }
  std::size_t workspace_bytes() const noexcept { return workspace_bytes_; }
  std::size_t cached_graphs() const noexcept {
#if defined(UNSHARD_HAVE_CUDNN_FRONTEND)
    return graphs_.size();
#else
    return 0;
#endif
  }

  // The implementation of sdpa() below.
  template <storage_type T>
  void run(const T* q, std::size_t queries, attention_segment<T> seg1, attention_segment<T> seg2, std::size_t heads,
           std::size_t head_dim, std::size_t groups, T* out, float scale, cudaStream_t stream) {
    if (queries == 0 || heads == 0) return;
    if (groups == 0) throw_error("sdpa: groups is 0");
    if (seg1.rows == 0) std::swap(seg1, seg2);
    if (seg1.rows == 0) throw_error("sdpa: no keys (softmax over an empty set)");
    if (queries % groups != 0 || seg1.rows % groups != 0 || seg2.rows % groups != 0)
      throw_error("sdpa: queries ", queries, " and key rows ", seg1.rows, " + ", seg2.rows, " must split into ", groups,
                  " equal groups");
    if (!(scale > 0.0f)) scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
    reason_.clear();
    if constexpr (std::is_same_v<T, bf16>) {
#if defined(UNSHARD_HAVE_CUDNN_FRONTEND)
      if (run_cudnn(q, queries, seg1, seg2, heads, head_dim, groups, out, scale, stream)) return;
#else
      reason_ = "built without the cuDNN frontend";
#endif
    } else {
      reason_ = "f32/f16 storage: cuDNN has no such SDPA";
    }
    segmented_attention<T> p;
    p.q = q;
    p.out = out;
    p.groups = groups;
    p.queries = queries / groups;
    p.q_group_rows = queries / groups;
    const std::size_t n1 = seg1.rows / groups, n2 = seg2.rows / groups;
    p.seg[0] = {seg1.k, seg1.v, n1, groups > 1 ? n1 : 0};
    p.seg[1] = {seg2.k, seg2.v, n2, groups > 1 ? n2 : 0};
    p.heads = heads;
    p.d = head_dim;
    p.scale = scale;
    segmented_flash_attention(p, stream);
    ++stats_.fallback_calls;
    last_ = sdpa_impl::unshard_kernel;
  }

 private:
  // Grows buf to at least `bytes` (keeps it when large enough); syncs `stream` (or the device)
  // before freeing a buffer enqueued work may still read.
  static void grow(void*& buf, std::size_t& have, std::size_t bytes, cudaStream_t stream) {
    if (bytes <= have) return;
    if (buf) {
      if (stream) {
        UNSHARD_CUDA_CHECK(cudaStreamSynchronize(stream));
      } else {
        UNSHARD_CUDA_CHECK(cudaDeviceSynchronize());
      }
      UNSHARD_CUDA_CHECK(cudaFree(buf));
      buf = nullptr;
      have = 0;
    }
    UNSHARD_CUDA_CHECK(cudaMalloc(&buf, bytes));
    have = bytes;
  }

#if defined(UNSHARD_HAVE_CUDNN_FRONTEND)
  enum uid : std::int64_t { uid_q = 1, uid_k = 2, uid_v = 3, uid_o = 4 };
  // groups, queries per group, keys per group, heads, head_dim, scale bits
  using key = std::tuple<std::size_t, std::size_t, std::size_t, std::size_t, std::size_t, std::uint32_t>;
  struct entry {
    std::shared_ptr<cudnn_frontend::graph::Graph> graph;
    std::int64_t workspace = 0;
    bool ok = false;
    std::string why;
  };

  cudnnHandle_t handle() {
    if (!handle_) UNSHARD_CUDA_CHECK(cudnnCreate(&handle_));
    return handle_;
  }

  // Builds (once) the graph for one shape: Q [b, h, sq, d], K/V [b, h, skv, d], O like Q, all with
  // the strides of rows [b * s, h * d].
  entry& graph_for(std::size_t b, std::size_t sq, std::size_t skv, std::size_t h, std::size_t d, float scale) {
    std::uint32_t scale_bits = 0;
    std::memcpy(&scale_bits, &scale, sizeof(scale));
    const key k{b, sq, skv, h, d, scale_bits};
    auto it = graphs_.find(k);
    if (it != graphs_.end()) return it->second;
    namespace fe = cudnn_frontend;
    entry e;
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    const auto B = static_cast<std::int64_t>(b), H = static_cast<std::int64_t>(h), D = static_cast<std::int64_t>(d),
               SQ = static_cast<std::int64_t>(sq), SK = static_cast<std::int64_t>(skv);
    auto tensor = [&](const char* name, std::int64_t uid, std::int64_t s) {
      return g->tensor(fe::graph::Tensor_attributes()
                           .set_name(name)
                           .set_uid(uid)
                           .set_dim({B, H, s, D})
                           .set_stride({s * H * D, D, H * D, 1}));
    };
    auto Q = tensor("Q", uid_q, SQ);
    auto K = tensor("K", uid_k, SK);
    auto V = tensor("V", uid_v, SK);
    auto options = fe::graph::SDPA_attributes().set_name("unshard_sdpa").set_generate_stats(false).set_attn_scale(scale);
    auto outputs = g->sdpa(Q, K, V, options);
    outputs[0]->set_output(true).set_dim({B, H, SQ, D}).set_stride({SQ * H * D, D, H * D, 1}).set_uid(uid_o);
    const cudnnHandle_t hd = handle();
    auto fail = [&](const char* step, fe::error_t& st) {
      e.why = std::string(step) + ": " + st.get_message();
      return false;
    };
    [&] {
      if (auto st = g->validate(); !st.is_good()) return fail("validate", st);
      if (auto st = g->build_operation_graph(hd); !st.is_good()) return fail("build_operation_graph", st);
      if (auto st = g->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}); !st.is_good())
        return fail("create_execution_plans", st);
      if (auto st = g->check_support(hd); !st.is_good()) return fail("check_support", st);
      if (auto st = g->build_plans(hd); !st.is_good()) return fail("build_plans", st);
      if (auto st = g->get_workspace_size(e.workspace); !st.is_good()) return fail("get_workspace_size", st);
      e.ok = true;
      return true;
    }();
    if (e.ok) {
      e.graph = std::move(g);
      ++stats_.graphs_built;
    } else {
      ++stats_.graph_failures;
    }
    return graphs_.emplace(k, std::move(e)).first->second;
  }

  bool run_cudnn(const bf16* q, std::size_t queries, attention_segment<bf16> seg1, attention_segment<bf16> seg2,
                 std::size_t heads, std::size_t head_dim, std::size_t groups, bf16* out, float scale,
                 cudaStream_t stream) {
    if (!aligned16(q) || !aligned16(out) || !aligned16(seg1.k) || !aligned16(seg1.v) ||
        (seg2.rows > 0 && (!aligned16(seg2.k) || !aligned16(seg2.v)))) {
      reason_ = "a q/k/v/out pointer is not 16-byte aligned";
      return false;
    }
    if (head_dim % 8 != 0 || head_dim > 256) {
      reason_ = "head_dim must be a multiple of 8 and at most 256 for cuDNN";
      return false;
    }
    const std::size_t sq = queries / groups, n1 = seg1.rows / groups, n2 = seg2.rows / groups, skv = n1 + n2;
    entry& e = graph_for(groups, sq, skv, heads, head_dim, scale);
    if (!e.ok) {
      reason_ = "cuDNN rejected the shape: " + e.why;
      return false;
    }
    const std::size_t ld = heads * head_dim;
    const void* k = seg1.k;
    const void* v = seg1.v;
    if (n2 > 0) {  // join group g's rows of seg1 and seg2 into scratch rows [g * skv, (g + 1) * skv)
      const std::size_t half = groups * skv * ld * sizeof(bf16);
      grow(scratch_, scratch_bytes_, 2 * half, stream);
      auto* kj = static_cast<std::byte*>(scratch_);
      auto* vj = kj + half;
      const std::size_t w1 = n1 * ld * sizeof(bf16), w2 = n2 * ld * sizeof(bf16), pitch = skv * ld * sizeof(bf16);
      UNSHARD_CUDA_CHECK(cudaMemcpy2DAsync(kj, pitch, seg1.k, w1, w1, groups, cudaMemcpyDeviceToDevice, stream));
      UNSHARD_CUDA_CHECK(cudaMemcpy2DAsync(kj + w1, pitch, seg2.k, w2, w2, groups, cudaMemcpyDeviceToDevice, stream));
      UNSHARD_CUDA_CHECK(cudaMemcpy2DAsync(vj, pitch, seg1.v, w1, w1, groups, cudaMemcpyDeviceToDevice, stream));
      UNSHARD_CUDA_CHECK(cudaMemcpy2DAsync(vj + w1, pitch, seg2.v, w2, w2, groups, cudaMemcpyDeviceToDevice, stream));
      k = kj;
      v = vj;
      ++stats_.segments_joined;
    }
    const auto need = static_cast<std::size_t>(e.workspace);
    if (planned_workspace_ && need > workspace_bytes_) {
      reason_ = "the cuDNN graph needs " + std::to_string(need) + " bytes of workspace, the plan declared " +
                std::to_string(workspace_bytes_);
      return false;
    }
    if (!planned_workspace_) grow(workspace_, workspace_bytes_, need, stream);
    UNSHARD_CUDA_CHECK(cudnnSetStream(handle(), stream));
    std::unordered_map<std::int64_t, void*> pack{{uid_q, const_cast<bf16*>(q)},
                                                 {uid_k, const_cast<void*>(k)},
                                                 {uid_v, const_cast<void*>(v)},
                                                 {uid_o, out}};
    cudnn_frontend::error_t st = e.graph->execute(handle_, pack, workspace_);
    if (!st.is_good())
      throw_error("sdpa: cuDNN execution failed for groups=", groups, " queries/group=", sq, " keys/group=", skv,
                  " heads=", heads, " head_dim=", head_dim, ": ", st.get_message());
    ++stats_.cudnn_calls;
    last_ = sdpa_impl::cudnn;
    return true;
  }

  cudnnHandle_t handle_ = nullptr;
  std::map<key, entry> graphs_;
#endif

  void* scratch_ = nullptr;
  std::size_t scratch_bytes_ = 0;
  void* workspace_ = nullptr;
  std::size_t workspace_bytes_ = 0;
  bool planned_workspace_ = false;  // workspace_ is a planned buffer, not ours to grow or free
  sdpa_stats stats_{};
  sdpa_impl last_ = sdpa_impl::none;
  std::string reason_;
};

// out = softmax(q [seg1.k; seg2.k]ᵀ · scale) [seg1.v; seg2.v] per head and group (see the top of
// this file); scale <= 0 means 1/sqrt(head_dim). out must not alias q, k or v.
template <storage_type T>
void sdpa(sdpa_plan_cache& cache, const T* q, std::size_t queries, attention_segment<T> seg1,
          attention_segment<T> seg2, std::size_t heads, std::size_t head_dim, std::size_t groups, T* out, float scale,
          cudaStream_t stream) {
  cache.run(q, queries, seg1, seg2, heads, head_dim, groups, out, scale, stream);
}

// The bf16 entry point the ops layer calls (cuDNN's fused attention when available).
inline void sdpa_bf16(sdpa_plan_cache& cache, const bf16* q, std::size_t queries, attention_segment<bf16> seg1,
                      attention_segment<bf16> seg2, std::size_t heads, std::size_t head_dim, std::size_t groups,
                      bf16* out, float scale, cudaStream_t stream) {
  cache.run(q, queries, seg1, seg2, heads, head_dim, groups, out, scale, stream);
}

}  // namespace unshard::cuda
