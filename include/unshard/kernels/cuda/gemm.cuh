#pragma once
// Linear layers on the device through cuBLASLt: y = x · Wᵀ + b with PyTorch's weight layout
// W [out, in], row-major activations, f32 accumulation (CUBLAS_COMPUTE_32F: bf16/f16 inputs run
// on tensor cores; f32 inputs give a true f32 GEMM, no TF32), optionally GELU-tanh in the
// epilogue (cuBLASLt's GELU epilogue is the tanh approximation, as nn.GELU(approximate='tanh')).
//
// The row-major problem maps onto cuBLASLt's column-major one without copies: row-major
// y [M, ldy] is column-major yᵀ [ldy, M]; W [N, K] row-major is column-major Wᵀ [K, N], used
// transposed; x [M, K] row-major is column-major xᵀ [K, M]. So yᵀ = op(Wᵀ)ᵀ · xᵀ with
// transa = T, transb = N, and the bias runs along D's rows (the output features), which is how
// CUBLASLT_EPILOGUE_BIAS applies it. A row slice W[r0:r1] is just A = W + r0*K with N = r1 - r0
// and D = y + r0 with leading dimension ldy: the chunked unshard's "compute this chunk of output
// columns from this chunk of weight rows" needs no other call.
//
// The algorithm heuristic is the expensive host step; its answer is cached per problem (shape,
// types, epilogue, pointer alignments), so a forward after the first makes no heuristic query.
// Matmuls are enqueued on the caller's stream and never synchronised.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>

#include "unshard/kernels/cuda/common.cuh"
#include "unshard/kernels/cuda/elementwise.cuh"

namespace unshard::cuda {

template <class T>
constexpr cudaDataType_t cuda_type_of() {
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, bf16>) return CUDA_R_16BF;
  else return CUDA_R_16F;
}

enum class activation : std::uint8_t { none, gelu_tanh };

// The largest power of two (<= 256) dividing the address: what cuBLASLt may assume of a pointer.
inline std::uint32_t alignment_of(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  std::uint32_t align = 256;
  while (align > 1 && a % align != 0) align /= 2;
  return align;
}

namespace detail {

// The three descriptors a matmul needs, in caller storage (the *Init forms): a matmul makes no
// heap allocation, so a forward after the first allocates nothing on the host either.
struct lt_matmul_desc {
  cublasLtMatmulDescOpaque_t storage{};
  cublasLtMatmulDesc_t d = &storage;
  lt_matmul_desc() { UNSHARD_CUDA_CHECK(cublasLtMatmulDescInit(d, CUBLAS_COMPUTE_32F, CUDA_R_32F)); }
  lt_matmul_desc(const lt_matmul_desc&) = delete;
  lt_matmul_desc& operator=(const lt_matmul_desc&) = delete;
  template <class V>
  void set(cublasLtMatmulDescAttributes_t attr, const V& value) {
    UNSHARD_CUDA_CHECK(cublasLtMatmulDescSetAttribute(d, attr, &value, sizeof(value)));
  }
};

struct lt_layout {
  cublasLtMatrixLayoutOpaque_t storage{};
  cublasLtMatrixLayout_t l = &storage;
  lt_layout(cudaDataType_t type, std::uint64_t rows, std::uint64_t cols, std::int64_t ld) {
    UNSHARD_CUDA_CHECK(cublasLtMatrixLayoutInit(l, type, rows, cols, ld));
  }
  lt_layout(const lt_layout&) = delete;
  lt_layout& operator=(const lt_layout&) = delete;
};

struct lt_preference {
  cublasLtMatmulPreferenceOpaque_t storage{};
  cublasLtMatmulPreference_t p = &storage;
  lt_preference() { UNSHARD_CUDA_CHECK(cublasLtMatmulPreferenceInit(p)); }
  lt_preference(const lt_preference&) = delete;
  lt_preference& operator=(const lt_preference&) = delete;
  template <class V>
  void set(cublasLtMatmulPreferenceAttributes_t attr, const V& value) {
    UNSHARD_CUDA_CHECK(cublasLtMatmulPreferenceSetAttribute(p, attr, &value, sizeof(value)));
  }
};

}  // namespace detail

// Which path each linear call took: GPU tests assert on these instead of passing silently when
// the epilogue is never fused.
struct blaslt_stats {
  std::size_t calls = 0;              // linear / linear_rows calls that enqueued work
  std::size_t epilogue_fused = 0;     // bias and/or GELU applied in cuBLASLt's epilogue
  std::size_t epilogue_fallback = 0;  // matmul without epilogue + bias_activation kernel
  std::size_t bias_realigned = 0;     // bias copied into the 16-byte aligned scratch first
  std::size_t activation_kernel = 0;  // f32 GELU applied by bias_activation after the matmul (by design)
  std::size_t staged_f32 = 0;         // of the fallbacks, bf16/f16 y computed through an f32 staging (see below)
  std::size_t heuristic_queries = 0;  // cublasLtMatmulAlgoGetHeuristic calls (cache misses)
  std::size_t heuristic_failures = 0; // of which: an error status or no algorithm (cached as "none")
  // fp8 weights (kernels/cuda/fp8.cuh, ops/cuda_ops.cuh):
  std::size_t fp8_dequantized = 0;    // weight chunks dequantized to bf16/f32 for the bf16/f32 GEMM (weight-only fp8)
  std::size_t fp8_gemm = 0;           // e4m3 x e4m3 GEMMs on fp8 tensor cores (per-tensor activation quantization)
  std::size_t fp8_fallback = 0;       // activation quantization asked for, weight-only fp8 ran instead (see below)
};

// A cuBLASLt handle with its workspace and heuristic cache; one per rank (per stream user): not
// thread-safe, like the handle itself.
//
// Precision: every matmul is CUBLAS_COMPUTE_32F with an f32 scale type. For bf16/f16 x and W that
// is the tensor-core path with f32 accumulation; for f32 x and W it is a true f32 GEMM: TF32 is
// never requested (CUBLAS_COMPUTE_32F_FAST_TF32 would be), so the f32 path meets the references'
// 1e-5 rule.
//
// Bias epilogue alignment: cuBLASLt reads the epilogue's bias vector with 16-byte loads and
// faults on a pointer that is not 16-byte aligned (a chunk's `bias + r0`, a scratch offset). Such
// a bias is first copied (on the stream) into a small aligned scratch carved from the end of the
// workspace (bias_scratch_bytes of it); a bias that does not fit there, or any heuristic failure
// for the epilogue (NOT_SUPPORTED, INVALID_VALUE for m = 1, no result), takes the fallback: the
// matmul without epilogue, then bias_activation. stats() counts each path. For an f32 y that is the
// fused result up to f32 rounding; a bf16/f16 y would round twice (the matmul's output, then after
// the bias: up to half an ulp of the pre-bias value off, which cancellation makes large relative
// to the result), so its fallback goes through f32 pieces of columns in the workspace and rounds
// once, as the epilogue does (staged_fallback).
class blaslt {
 public:
  // Bytes at the end of a workspace of at least 2 * this size that hold realigned biases.
  static constexpr std::size_t bias_scratch_bytes = std::size_t{64} << 10;

  blaslt() { UNSHARD_CUDA_CHECK(cublasLtCreate(&handle_)); }
  ~blaslt() { cublasLtDestroy(handle_); }
  blaslt(const blaslt&) = delete;
  blaslt& operator=(const blaslt&) = delete;

  // Device scratch for the matmuls (cuBLASLt recommends 32 MiB on Hopper; 0 restricts the
  // heuristic to algorithms that need none). The memory must outlive every enqueued matmul.
  // When bytes >= 2 * bias_scratch_bytes, the last bias_scratch_bytes (256-byte aligned) hold
  // realigned biases and the matmuls get the rest.
  void set_workspace(void* ptr, std::size_t bytes) {
    if (!ptr) bytes = 0;
    std::byte* base = static_cast<std::byte*>(ptr);
    void* bias = nullptr;
    std::size_t mm_bytes = bytes;
    if (bytes >= 2 * bias_scratch_bytes) {
      const auto end = reinterpret_cast<std::uintptr_t>(base) + bytes;
      const std::uintptr_t at = (end - bias_scratch_bytes) & ~std::uintptr_t{255};
      bias = reinterpret_cast<void*>(at);
      mm_bytes = static_cast<std::size_t>(at - reinterpret_cast<std::uintptr_t>(base));
    }
    if (ptr != workspace_ || mm_bytes != workspace_bytes_) cache_.clear();
    workspace_ = ptr;
    workspace_bytes_ = mm_bytes;
    bias_scratch_ = bias;
  }
  // Bytes the matmuls may use (the workspace less the bias scratch).
  std::size_t workspace_bytes() const noexcept { return workspace_bytes_; }
  cublasLtHandle_t handle() const noexcept { return handle_; }

  const blaslt_stats& stats() const noexcept { return stats_; }
  void reset_stats() noexcept { stats_ = {}; }

  // Output columns [n0, n0 + n_rows) of y [m, ldy]:
  //   y[:, n0 + j] = act(x[m, k] · w_rows[j, :] + b_rows[j])  for j < n_rows,
  // w_rows = rows n0.. of W [N, k] (row-major), b_rows the same entries of the bias (nullptr: none,
  // any alignment). x and W share a type (f32, or bf16/f16 on tensor cores with f32 accumulation);
  // y is f32 or that type; the bias is any storage type. The bias and (bf16/f16 inputs) GELU-tanh
  // go into cuBLASLt's epilogue when an algorithm takes them (f32 inputs: GELU by the host's
  // gelu_tanh in bias_activation, for the references' 1e-5); otherwise the matmul runs without
  // and bias_activation finishes the columns (the same result, one more pass). No algorithm at
  // all: an error naming m, n, k and the types.
  template <storage_type TX, storage_type TW, storage_type TY, storage_type TB>
  void linear_rows(const TX* x, std::size_t m, std::size_t k, const TW* w_rows, const TB* b_rows, std::size_t n_rows,
                   std::size_t n0, TY* y, std::size_t ldy, activation act, cudaStream_t stream) {
    static_assert(std::is_same_v<TX, TW>, "cuBLASLt multiplies x and W of one type; widen or round one of them first");
    static_assert(std::is_same_v<TY, float> || std::is_same_v<TY, TX>, "y is f32 or the type of x");
    if (m == 0 || n_rows == 0) return;
    if (k == 0) throw_error("linear: inner dimension K is 0");
    if (n0 + n_rows > ldy)
      throw_error("linear: output columns [", n0, ", ", n0 + n_rows, ") exceed the leading dimension ", ldy);
    TY* d = y + n0;
    const bool bias = b_rows != nullptr, gelu = act == activation::gelu_tanh;
    const problem p{m, n_rows, k, ldy, cuda_type_of<TX>(), cuda_type_of<TY>(), cuda_type_of<TB>(),
                    alignment_of(w_rows), alignment_of(x), alignment_of(d)};
    ++stats_.calls;
    // f32 x/W: GELU never goes into the epilogue. cuBLASLt does not document the accuracy of its
    // GELU's tanh, and the f32 path answers to the references at 1e-5; bias_activation runs the
    // host's gelu_tanh. The bias still fuses.
    const bool gelu_in_epilogue = gelu && !std::is_same_v<TX, float>;
    const bool gelu_after = gelu && !gelu_in_epilogue;
    if (bias || gelu_in_epilogue) {
      const cublasLtEpilogue_t epi = gelu_in_epilogue ? (bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU)
                                                      : CUBLASLT_EPILOGUE_BIAS;
      const TB* eb = b_rows;
      bool usable = true;
      if (bias && alignment_of(b_rows) < 16) {
        const std::size_t bytes = n_rows * sizeof(TB);
        usable = bias_scratch_ != nullptr && bytes <= bias_scratch_bytes;
        if (usable) {
          UNSHARD_CUDA_CHECK(cudaMemcpyAsync(bias_scratch_, b_rows, bytes, cudaMemcpyDeviceToDevice, stream));
          eb = static_cast<const TB*>(bias_scratch_);
        }
      }
      if (usable && matmul(p, epi, x, w_rows, eb, d, stream)) {
        ++stats_.epilogue_fused;
        if (eb != b_rows) ++stats_.bias_realigned;
        if (gelu_after) {
          ++stats_.activation_kernel;
          bias_activation(d, m, n_rows, ldy, static_cast<const TB*>(nullptr), true, stream);
        }
        return;
      }
    }
    if constexpr (!std::is_same_v<TY, float>) {
      if (bias || gelu) {  // a bf16/f16 y: x and W are that type too, so any GELU was for the epilogue
        ++stats_.epilogue_fallback;
        ++stats_.staged_f32;
        staged_fallback(p, x, w_rows, b_rows, d, gelu, stream);
        return;
      }
    }
    if (!matmul(p, CUBLASLT_EPILOGUE_DEFAULT, x, w_rows, static_cast<const TB*>(nullptr), d, stream))
      throw no_algorithm(p, bias);
    if (bias || gelu) {
      if (bias || gelu_in_epilogue) ++stats_.epilogue_fallback;
      if (gelu_after) ++stats_.activation_kernel;
      bias_activation(d, m, n_rows, ldy, b_rows, gelu, stream);
    }
  }

  // y [m, n] = act(x [m, k] · W [n, k]ᵀ + b).
  template <storage_type TX, storage_type TW, storage_type TY, storage_type TB>
  void linear(const TX* x, std::size_t m, std::size_t k, const TW* w, const TB* b, std::size_t n, TY* y,
              activation act, cudaStream_t stream) {
    linear_rows(x, m, k, w, b, n, 0, y, n, act, stream);
  }

  // Compute capability of the handle's device (major * 10 + minor), read once.
  int compute_capability() {
    if (sm_ < 0) {
      int dev = 0, major = 0, minor = 0;
      UNSHARD_CUDA_CHECK(cudaGetDevice(&dev));
      UNSHARD_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
      UNSHARD_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
      sm_ = major * 10 + minor;
    }
    return sm_;
  }

  // The fp8 tensor-core GEMM: output columns [n0, n0 + n_rows) of y [m, ldy] (f32),
  //   y[:, n0 + j] = a_scale * b_scale * Σ_k value(x_codes[:, k]) · value(w_codes[j, k]),
  // x_codes [m, k] and w_codes rows n0.. of W [N, k] as e4m3 codes (row-major), a_scale/b_scale device
  // f32 scalars (CUBLASLT_MATMUL_DESC_A/B_SCALE_POINTER; null: 1). cuBLASLt's fp8 kernels take only
  // the "TN" layout, which is ours (W used transposed, x not: see the header comment), on sm_89 and
  // later, with 16-byte aligned A and B and their leading dimensions (k a multiple of 16).
  // Compute and scale type f32, FAST_ACCUM off (cuBLASLt promotes partial sums to f32 periodically).
  // No epilogue (bias, column scales and GELU: kernels/cuda/fp8.cuh's fp8_epilogue). Returns false,
  // with nothing enqueued, when the device is older than sm_89, a requirement above is not met, or the
  // heuristic finds no algorithm (cached per problem like linear_rows'): the caller falls back.
  bool linear_rows_fp8(const std::uint8_t* x_codes, std::size_t m, std::size_t k, const std::uint8_t* w_codes,
                       std::size_t n_rows, std::size_t n0, float* y, std::size_t ldy, const float* a_scale,
                       const float* b_scale, cudaStream_t stream) {
    if (m == 0 || n_rows == 0) return true;
    if (n0 + n_rows > ldy)
      throw_error("linear: output columns [", n0, ", ", n0 + n_rows, ") exceed the leading dimension ", ldy);
    float* d = y + n0;
    // cuBLASLt's fp8 requirements we know of up front; the rest (D's alignment and leading dimension
    // under a row chunk at any offset, m = 1) are the heuristic's to accept or refuse.
    fp8_refusal_ = compute_capability() < 89                                      ? "it needs sm_89 or newer"
                   : k % 16 != 0                                                  ? "K is not a multiple of 16"
                   : alignment_of(w_codes) < 16 || alignment_of(x_codes) < 16 ? "a weight or activation row is not 16-byte aligned"
                                                                                  : nullptr;
    if (fp8_refusal_) return false;
    const problem p{m, n_rows, k, ldy, CUDA_R_8F_E4M3, CUDA_R_32F, CUDA_R_32F,
                    alignment_of(w_codes), alignment_of(x_codes), alignment_of(d)};
    detail::lt_matmul_desc desc;
    desc.set(CUBLASLT_MATMUL_DESC_TRANSA, static_cast<std::int32_t>(CUBLAS_OP_T));
    desc.set(CUBLASLT_MATMUL_DESC_TRANSB, static_cast<std::int32_t>(CUBLAS_OP_N));
    desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<std::uint32_t>(CUBLASLT_EPILOGUE_DEFAULT));
    desc.set(CUBLASLT_MATMUL_DESC_FAST_ACCUM, static_cast<std::int8_t>(0));
    if (a_scale) desc.set(CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, static_cast<const void*>(a_scale));
    if (b_scale) desc.set(CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, static_cast<const void*>(b_scale));
    // The scale pointers take part in the key as present/absent (an algorithm does not depend on
    // their values); the fp8 type and the epilogue marker keep these apart from linear_rows' entries.
    const key kk{p.m, p.n, p.k, p.ldy, p.tx, p.ty, (a_scale ? 1 : 0) | (b_scale ? 2 : 0), fp8_epilogue_marker,
                 p.align_w, p.align_x, p.align_y, 0u};
    if (!run(p, kk, desc, w_codes, x_codes, d, stream)) return false;
    ++stats_.calls;
    ++stats_.fp8_gemm;
    return true;
  }
  // Counters the fp8 paths of cuda_ops keep here, with the GEMMs they run.
  blaslt_stats& mutable_stats() noexcept { return stats_; }
  // The last heuristic or launch status that made a matmul unavailable (for messages).
  cublasStatus_t last_status() const noexcept { return last_status_; }
  // Why the last linear_rows_fp8 that returned false did: a requirement known up front, or the
  // heuristic's or the launch's status (cached misses keep the status they had).
  std::string fp8_unavailable_reason() const {
    if (fp8_refusal_) return fp8_refusal_;
    return "cuBLASLt has no algorithm for it or refused the launch (status " + std::to_string(static_cast<int>(last_status_)) + ")";
  }

  // Problems the heuristic has been asked about (found or not).
  std::size_t cached_algorithms() const noexcept { return cache_.size(); }

 private:
  struct problem {
    std::size_t m, n, k, ldy;
    cudaDataType_t tx, ty, tb;
    std::uint32_t align_w, align_x, align_y;
  };
  using key = std::tuple<std::size_t, std::size_t, std::size_t, std::size_t, int, int, int, std::uint32_t,
                         std::uint32_t, std::uint32_t, std::uint32_t, std::uint32_t>;
  struct cached {
    bool found = false;
    cublasLtMatmulAlgo_t algo{};
    cublasStatus_t status = CUBLAS_STATUS_SUCCESS;  // why not found
  };

  static constexpr std::uint32_t fp8_epilogue_marker = 0xf8f8f8f8u;  // fp8 entries' "epilogue" in the key
  static constexpr std::uint32_t no_workspace_marker = 0xffffffffu;  // staged_fallback's entries' last key field

  static const char* type_name(cudaDataType_t t) {
    return t == CUDA_R_32F ? "f32" : t == CUDA_R_16BF ? "bf16" : t == CUDA_R_16F ? "f16" : t == CUDA_R_8F_E4M3 ? "e4m3" : "?";
  }

  ::unshard::error no_algorithm(const problem& p, bool bias) const {
    return ::unshard::error(::unshard::detail::concat("linear: cuBLASLt has no algorithm for m=", p.m, " n=", p.n, " k=", p.k, " ldy=", p.ldy,
                                " (x/W ", type_name(p.tx), ", y ", type_name(p.ty), ", bias ",
                                bias ? type_name(p.tb) : "none", ", compute f32; alignments W/x/y ", p.align_w, "/",
                                p.align_x, "/", p.align_y, " bytes, workspace ", workspace_bytes_,
                                " bytes; last heuristic status ", static_cast<int>(last_status_), ")"));
  }

  // The fallback for a bf16/f16 y with a bias or GELU: columns in pieces of at most workspace/(4 m),
  // each a matmul into f32 in the workspace (an algorithm that needs no workspace of its own: the
  // memory is the staging) and bias_activation_into y, one rounding. Stream order keeps the
  // staging free between pieces and from the next call's matmul.
  template <class TX, class TY, class TB>
  void staged_fallback(const problem& p, const TX* x, const TX* w_rows, const TB* b_rows, TY* d, bool gelu,
                       cudaStream_t stream) {
    const std::size_t floats = workspace_ ? workspace_bytes_ / sizeof(float) : 0;
    if (floats < p.m)
      throw_error("linear: a ", type_name(p.ty), " output whose bias/GELU cuBLASLt's epilogue did not take (m=", p.m,
                  " n=", p.n, " k=", p.k, ") is computed through f32 in the workspace, which needs at least ",
                  p.m * sizeof(float), " bytes (", workspace_bytes_, " given)");
    float* staging = static_cast<float*>(workspace_);
    const std::size_t per = std::min(p.n, floats / p.m);
    for (std::size_t c0 = 0; c0 < p.n; c0 += per) {
      const std::size_t c = std::min(per, p.n - c0);
      const TX* w = w_rows + c0 * p.k;
      const problem q{p.m, c, p.k, c, p.tx, CUDA_R_32F, p.tb, alignment_of(w), p.align_x, alignment_of(staging)};
      if (!matmul(q, CUBLASLT_EPILOGUE_DEFAULT, x, w, static_cast<const TB*>(nullptr), staging, stream, false))
        throw no_algorithm(q, false);
      bias_activation_into(static_cast<const float*>(staging), c, d + c0, p.ldy, p.m, c,
                           b_rows ? b_rows + c0 : nullptr, gelu, stream);
    }
  }

  // Enqueues D = epi(op(W)·x [+ b]) if cuBLASLt has an algorithm for it; false (nothing enqueued)
  // if not. The heuristic's answer, found or not, is cached per problem; any heuristic status
  // other than success (NOT_SUPPORTED, INVALID_VALUE, ...) or zero results means "no algorithm".
  // use_workspace false: an algorithm that needs none (the workspace holds the staging).
  template <class TX, class TY, class TB>
  bool matmul(const problem& p, cublasLtEpilogue_t epi, const TX* x, const TX* w, const TB* b, TY* d,
              cudaStream_t stream, bool use_workspace = true) {
    // CUBLAS_COMPUTE_32F, scale type f32 (lt_matmul_desc): f32 accumulation, never TF32.
    detail::lt_matmul_desc desc;
    desc.set(CUBLASLT_MATMUL_DESC_TRANSA, static_cast<std::int32_t>(CUBLAS_OP_T));
    desc.set(CUBLASLT_MATMUL_DESC_TRANSB, static_cast<std::int32_t>(CUBLAS_OP_N));
    desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<std::uint32_t>(epi));
    if (b) {
      desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, static_cast<const void*>(b));
      desc.set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, static_cast<std::int32_t>(p.tb));
    }
    const key k{p.m, p.n, p.k, p.ldy, p.tx, p.ty, b ? p.tb : -1, static_cast<std::uint32_t>(epi),
                p.align_w, p.align_x, p.align_y, !use_workspace ? no_workspace_marker : b ? alignment_of(b) : 0u};
    return run(p, k, desc, w, x, d, stream, use_workspace);
  }

  // Enqueues desc's D = op(W)·x for problem p (W: A, n x k used transposed; x: B, k x m; D: n x m
  // with leading dimension ldy: the column-major view of our row-major tensors) with the algorithm
  // cached under k, asking the heuristic the first time; false, nothing enqueued, when it has none
  // or the launch refuses the problem (remembered: the caller falls back).
  bool run(const problem& p, const key& k, const detail::lt_matmul_desc& desc, const void* w, const void* x, void* d,
           cudaStream_t stream, bool use_workspace = true) {
    void* const ws = use_workspace ? workspace_ : nullptr;
    const std::size_t ws_bytes = use_workspace ? workspace_bytes_ : 0;
    const detail::lt_layout a(p.tx, p.k, p.n, static_cast<std::int64_t>(p.k));    // Wᵀ slice, used transposed
    const detail::lt_layout bl(p.tx, p.k, p.m, static_cast<std::int64_t>(p.k));   // xᵀ
    const detail::lt_layout c(p.ty, p.n, p.m, static_cast<std::int64_t>(p.ldy));  // yᵀ, columns n0..
    auto it = cache_.find(k);
    if (it == cache_.end()) {
      detail::lt_preference pref;
      pref.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<std::uint64_t>(ws_bytes));
      pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, p.align_w);
      pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, p.align_x);
      pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, p.align_y);
      pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, p.align_y);
      cublasLtMatmulHeuristicResult_t result{};
      int found = 0;
      const cublasStatus_t st =
          cublasLtMatmulAlgoGetHeuristic(handle_, desc.d, a.l, bl.l, c.l, c.l, pref.p, 1, &result, &found);
      ++stats_.heuristic_queries;
      const bool ok = st == CUBLAS_STATUS_SUCCESS && found > 0 && result.state == CUBLAS_STATUS_SUCCESS;
      const cublasStatus_t why = st != CUBLAS_STATUS_SUCCESS ? st : CUBLAS_STATUS_NOT_SUPPORTED;
      if (!ok) ++stats_.heuristic_failures;
      it = cache_.emplace(k, cached{ok, result.algo, ok ? CUBLAS_STATUS_SUCCESS : why}).first;
    }
    if (!it->second.found) {
      last_status_ = it->second.status;  // this problem's own status, not an earlier one's
      return false;
    }
    const float alpha = 1.0f, beta = 0.0f;
    const cublasStatus_t st = cublasLtMatmul(handle_, desc.d, &alpha, w, a.l, x, bl.l, &beta, d, c.l, d, c.l,
                                             &it->second.algo, ws, ws_bytes, stream);
    if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE) {
      // Rejected at launch (nothing enqueued): remember, and let the caller fall back.
      it->second.found = false;
      it->second.status = last_status_ = st;
      return false;
    }
    UNSHARD_CUDA_CHECK(st);
    return true;
  }

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  std::size_t workspace_bytes_ = 0;
  void* bias_scratch_ = nullptr;
  cublasStatus_t last_status_ = CUBLAS_STATUS_SUCCESS;
  const char* fp8_refusal_ = nullptr;  // linear_rows_fp8's up-front refusal, or nullptr
  int sm_ = -1;
  blaslt_stats stats_{};
  std::map<key, cached> cache_;
};

}  // namespace unshard::cuda
