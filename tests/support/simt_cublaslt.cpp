// The cuBLASLt calls of kernels/cuda/gemm.cuh, implemented on the host for the SIMT-emulated tests
// (tests/simt.cmake), so the code around the GEMMs (row chunks, leading dimensions, bias slices and
// their realignment, the epilogue and its fallback, the fp8 scale pointers, the algorithm cache)
// runs without a GPU. It is a reading of cuBLASLt's documentation, not cuBLASLt: what it checks is
// that our calls mean what we think they mean under those documented semantics, never how the
// library's kernels round or how fast they are (tests/gpu on a GPU does that).
//
// Semantics (cublasLt.h): matrices are column-major unless a layout says otherwise;
//   D = alpha * scaleA * scaleB * op(A) op(B) + beta * C, then the epilogue: BIAS adds bias[i] (one
//   per row of D) and GELU applies the tanh approximation, bias first;
// compute type CUBLAS_COMPUTE_32F with an f32 scale type only (TF32 or any other compute type is
// NOT_SUPPORTED here, so a test that asks for one fails); fp8 (e4m3) A and B only in the "TN" form,
// 16-byte aligned with leading dimensions a multiple of 16. Sums are f32 in k order.
//
// Stricter than the library where the library would fault rather than refuse: a matmul whose A, B,
// D or bias pointer is less aligned than the heuristic was told (the preference's minimum
// alignments, the bias pointer in the descriptor), or an epilogue bias that is not 16-byte aligned,
// fails with CUBLAS_STATUS_EXECUTION_FAILED and a line on stderr.
#include <cublasLt.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "unshard/core/dtype.hpp"
#include "unshard/kernels/thread/activation.hpp"

#include "simt_streams.hpp"

namespace {

constexpr std::uint32_t magic = 0x51317e57u;

struct desc_fields {
  std::uint32_t magic;
  cublasComputeType_t compute;
  cudaDataType_t scale;
  std::int32_t transa, transb;
  std::uint32_t epilogue;
  const void* bias;
  std::int32_t bias_type;
  std::int8_t fast_accum;
  const void* a_scale;
  const void* b_scale;
};
struct layout_fields {
  std::uint32_t magic;
  cudaDataType_t type;
  std::uint64_t rows, cols;
  std::int64_t ld;
};
struct pref_fields {
  std::uint32_t magic;
  std::uint64_t max_workspace;
  std::uint32_t align_a, align_b, align_c, align_d;
};
// What an algorithm was chosen for: the alignments it may assume.
struct algo_fields {
  std::uint32_t magic;
  std::uint32_t align_a, align_b, align_d, align_bias;
};
static_assert(sizeof(desc_fields) <= sizeof(cublasLtMatmulDescOpaque_t));
static_assert(sizeof(layout_fields) <= sizeof(cublasLtMatrixLayoutOpaque_t));
static_assert(sizeof(pref_fields) <= sizeof(cublasLtMatmulPreferenceOpaque_t));
static_assert(sizeof(algo_fields) <= sizeof(cublasLtMatmulAlgo_t));

template <class F, class O>
F* fields(O* opaque) {
  return reinterpret_cast<F*>(opaque);
}
template <class F, class O>
const F* fields(const O* opaque) {
  return reinterpret_cast<const F*>(opaque);
}

std::uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  std::uint32_t align = 256;
  while (align > 1 && a % align != 0) align /= 2;
  return align;
}

bool supported_input(cudaDataType_t t) {
  return t == CUDA_R_32F || t == CUDA_R_16BF || t == CUDA_R_16F || t == CUDA_R_8F_E4M3;
}
bool supported_output(cudaDataType_t t) { return t == CUDA_R_32F || t == CUDA_R_16BF || t == CUDA_R_16F; }

float load(cudaDataType_t t, const void* p, std::size_t i) {
  switch (t) {
    case CUDA_R_32F: return static_cast<const float*>(p)[i];
    case CUDA_R_16BF: return unshard::bf16{static_cast<const std::uint16_t*>(p)[i]}.to_float();
    case CUDA_R_16F: return unshard::f16{static_cast<const std::uint16_t*>(p)[i]}.to_float();
    case CUDA_R_8F_E4M3: return unshard::e4m3_bits_to_float(static_cast<const std::uint8_t*>(p)[i]);
    default: return 0.0f;
  }
}

void store(cudaDataType_t t, void* p, std::size_t i, float v) {
  switch (t) {
    case CUDA_R_32F: static_cast<float*>(p)[i] = v; break;
    case CUDA_R_16BF: static_cast<std::uint16_t*>(p)[i] = unshard::bf16::from_float(v).bits; break;
    case CUDA_R_16F: static_cast<std::uint16_t*>(p)[i] = unshard::f16::from_float(v).bits; break;
    default: break;
  }
}

// The shapes agree and every type and option is one this implementation (and our code) uses.
cublasStatus_t check_problem(const desc_fields& d, const layout_fields& a, const layout_fields& b,
                             const layout_fields& c, const layout_fields& dl) {
  if (d.magic != magic || a.magic != magic || b.magic != magic || c.magic != magic || dl.magic != magic)
    return CUBLAS_STATUS_NOT_INITIALIZED;
  if (d.compute != CUBLAS_COMPUTE_32F || d.scale != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (a.type != b.type || !supported_input(a.type) || !supported_output(dl.type) || c.type != dl.type)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  const bool ta = d.transa == CUBLAS_OP_T, tb = d.transb == CUBLAS_OP_T;
  const std::uint64_t m = ta ? a.cols : a.rows, ka = ta ? a.rows : a.cols;
  const std::uint64_t kb = tb ? b.cols : b.rows, n = tb ? b.rows : b.cols;
  if (ka != kb || dl.rows != m || dl.cols != n || c.rows != m || c.cols != n) return CUBLAS_STATUS_INVALID_VALUE;
  for (const layout_fields* l : {&a, &b, &c, &dl})
    if (l->ld < static_cast<std::int64_t>(l->rows)) return CUBLAS_STATUS_INVALID_VALUE;
  const std::uint32_t epi = d.epilogue;
  if (epi != CUBLASLT_EPILOGUE_DEFAULT && epi != CUBLASLT_EPILOGUE_BIAS && epi != CUBLASLT_EPILOGUE_GELU &&
      epi != CUBLASLT_EPILOGUE_GELU_BIAS)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  if ((epi & CUBLASLT_EPILOGUE_BIAS) && d.bias == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  if (a.type == CUDA_R_8F_E4M3) {
    if (!ta || tb) return CUBLAS_STATUS_NOT_SUPPORTED;  // fp8: the TN form only
    if (a.ld % 16 != 0 || b.ld % 16 != 0) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (epi != CUBLASLT_EPILOGUE_DEFAULT) return CUBLAS_STATUS_NOT_SUPPORTED;  // what gemm.cuh never asks
  } else if (d.a_scale || d.b_scale) {
    return CUBLAS_STATUS_NOT_SUPPORTED;  // scale pointers belong to the fp8 GEMMs here
  }
  return CUBLAS_STATUS_SUCCESS;
}

// An attribute's value into its field: exactly the field's size, as the library checks it.
template <class F>
cublasStatus_t set_field(F& field, const void* buf, std::size_t bytes) {
  if (bytes != sizeof(field)) return CUBLAS_STATUS_INVALID_VALUE;
  std::memcpy(&field, buf, bytes);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t fault(const char* what, std::uint32_t have, std::uint32_t assumed) {
  std::fprintf(stderr, "simt cuBLASLt: %s is %u-byte aligned, the algorithm assumed %u: a fault on a GPU\n", what,
               have, assumed);
  return CUBLAS_STATUS_EXECUTION_FAILED;
}

}  // namespace

extern "C" {

cublasStatus_t CUBLASWINAPI cublasLtCreate(cublasLtHandle_t* handle) {
  static int the_handle = 0;
  *handle = reinterpret_cast<cublasLtHandle_t>(&the_handle);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtDestroy(cublasLtHandle_t) { return CUBLAS_STATUS_SUCCESS; }

const char* CUBLASWINAPI cublasLtGetStatusName(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    default: return "CUBLAS_STATUS (not produced by the SIMT emulator's cuBLASLt)";
  }
}

const char* CUBLASWINAPI cublasLtGetStatusString(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_NOT_SUPPORTED: return "not supported by the SIMT emulator's cuBLASLt (see its header)";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "a pointer less aligned than the algorithm assumed (stderr says which)";
    default: return cublasLtGetStatusName(s);
  }
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulDescInit_internal(cublasLtMatmulDesc_t desc, size_t size,
                                                            cublasComputeType_t compute, cudaDataType_t scale) {
  if (size < sizeof(desc_fields)) return CUBLAS_STATUS_INVALID_VALUE;
  std::memset(desc, 0, size);
  desc_fields& d = *fields<desc_fields>(desc);
  d.magic = magic;
  d.compute = compute;
  d.scale = scale;
  d.transa = d.transb = CUBLAS_OP_N;
  d.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  d.bias_type = -1;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc,
                                                           cublasLtMatmulDescAttributes_t attr, const void* buf,
                                                           size_t bytes) {
  desc_fields& d = *fields<desc_fields>(desc);
  const auto take = [&](auto& field) { return set_field(field, buf, bytes); };
  switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA: return take(d.transa);
    case CUBLASLT_MATMUL_DESC_TRANSB: return take(d.transb);
    case CUBLASLT_MATMUL_DESC_EPILOGUE: return take(d.epilogue);
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: return take(d.bias);
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: return take(d.bias_type);
    case CUBLASLT_MATMUL_DESC_FAST_ACCUM: return take(d.fast_accum);
    case CUBLASLT_MATMUL_DESC_A_SCALE_POINTER: return take(d.a_scale);
    case CUBLASLT_MATMUL_DESC_B_SCALE_POINTER: return take(d.b_scale);
    default: return CUBLAS_STATUS_NOT_SUPPORTED;
  }
}

cublasStatus_t CUBLASWINAPI cublasLtMatrixLayoutInit_internal(cublasLtMatrixLayout_t layout, size_t size,
                                                              cudaDataType type, uint64_t rows, uint64_t cols,
                                                              int64_t ld) {
  if (size < sizeof(layout_fields)) return CUBLAS_STATUS_INVALID_VALUE;
  std::memset(layout, 0, size);
  *fields<layout_fields>(layout) = layout_fields{magic, type, rows, cols, ld};
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceInit_internal(cublasLtMatmulPreference_t pref, size_t size) {
  if (size < sizeof(pref_fields)) return CUBLAS_STATUS_INVALID_VALUE;
  std::memset(pref, 0, size);
  *fields<pref_fields>(pref) = pref_fields{magic, 0, 256, 256, 256, 256};  // the library's defaults
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                                 cublasLtMatmulPreferenceAttributes_t attr,
                                                                 const void* buf, size_t bytes) {
  pref_fields& p = *fields<pref_fields>(pref);
  const auto take = [&](auto& field) { return set_field(field, buf, bytes); };
  switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: return take(p.max_workspace);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: return take(p.align_a);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: return take(p.align_b);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: return take(p.align_c);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: return take(p.align_d);
    default: return CUBLAS_STATUS_NOT_SUPPORTED;
  }
}

// One algorithm for every problem this implementation supports (fp8: A and B 16-byte aligned).
cublasStatus_t CUBLASWINAPI cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t desc,
                                                           cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                                           cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                                           cublasLtMatmulPreference_t pref, int requested,
                                                           cublasLtMatmulHeuristicResult_t results[], int* count) {
  *count = 0;
  if (requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
  const desc_fields& df = *fields<desc_fields>(desc);
  const pref_fields& pf = *fields<pref_fields>(pref);
  if (pf.magic != magic) return CUBLAS_STATUS_NOT_INITIALIZED;
  const cublasStatus_t st = check_problem(df, *fields<layout_fields>(a), *fields<layout_fields>(b),
                                          *fields<layout_fields>(c), *fields<layout_fields>(d));
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  if (fields<layout_fields>(a)->type == CUDA_R_8F_E4M3 && (pf.align_a < 16 || pf.align_b < 16))
    return CUBLAS_STATUS_NOT_SUPPORTED;
  std::memset(&results[0], 0, sizeof(results[0]));
  const std::uint32_t bias_align = (df.epilogue & CUBLASLT_EPILOGUE_BIAS) ? alignment(df.bias) : 256;
  *fields<algo_fields>(&results[0].algo) = algo_fields{magic, pf.align_a, pf.align_b, pf.align_d, bias_align};
  results[0].workspaceSize = 0;
  results[0].state = CUBLAS_STATUS_SUCCESS;
  results[0].wavesCount = 1.0f;
  *count = 1;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t desc, const void* alpha,
                                           const void* A, cublasLtMatrixLayout_t adesc, const void* B,
                                           cublasLtMatrixLayout_t bdesc, const void* beta, const void* C,
                                           cublasLtMatrixLayout_t cdesc, void* D, cublasLtMatrixLayout_t ddesc,
                                           const cublasLtMatmulAlgo_t* algo, void*, size_t, cudaStream_t stream) {
  // Copies: the descriptors are the caller's and may be gone when the stream runs the matmul.
  const desc_fields d = *fields<desc_fields>(desc);
  const layout_fields a = *fields<layout_fields>(adesc), b = *fields<layout_fields>(bdesc),
                      c = *fields<layout_fields>(cdesc), dl = *fields<layout_fields>(ddesc);
  const cublasStatus_t st = check_problem(d, a, b, c, dl);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  if (algo == nullptr || fields<algo_fields>(algo)->magic != magic) return CUBLAS_STATUS_INVALID_VALUE;
  const algo_fields& al = *fields<algo_fields>(algo);
  if (alignment(A) < al.align_a) return fault("A", alignment(A), al.align_a);
  if (alignment(B) < al.align_b) return fault("B", alignment(B), al.align_b);
  if (alignment(D) < al.align_d) return fault("D", alignment(D), al.align_d);
  const bool bias = d.epilogue & CUBLASLT_EPILOGUE_BIAS;
  if (bias && alignment(d.bias) < 16) return fault("the epilogue's bias", alignment(d.bias), 16);
  if (bias && alignment(d.bias) < al.align_bias) return fault("the epilogue's bias", alignment(d.bias), al.align_bias);
  if (bias && d.bias_type != CUDA_R_32F && d.bias_type != CUDA_R_16BF && d.bias_type != CUDA_R_16F)
    return CUBLAS_STATUS_NOT_SUPPORTED;

  // Queued on the stream like a kernel: alpha and beta are read now (host pointers), the matrices,
  // the bias and the scales when the stream runs it.
  const float al_v = *static_cast<const float*>(alpha), be_v = *static_cast<const float*>(beta);
  unshard::simt_testing::enqueue(stream, [d, a, b, c, dl, al_v, be_v, A, B, C, D] {
    const bool ta = d.transa == CUBLAS_OP_T, tb = d.transb == CUBLAS_OP_T;
    const bool bias = d.epilogue & CUBLASLT_EPILOGUE_BIAS, gelu = d.epilogue & CUBLASLT_EPILOGUE_GELU;
    const std::uint64_t m = dl.rows, n = dl.cols, k = ta ? a.rows : a.cols;
    const float sa = d.a_scale ? *static_cast<const float*>(d.a_scale) : 1.0f;
    const float sb = d.b_scale ? *static_cast<const float*>(d.b_scale) : 1.0f;
    std::vector<float> out(m * n);
    for (std::uint64_t j = 0; j < n; ++j)
      for (std::uint64_t i = 0; i < m; ++i) {
        float acc = 0.0f;
        for (std::uint64_t l = 0; l < k; ++l) {
          const std::size_t ai = ta ? l + i * a.ld : i + l * a.ld;  // op(A)[i, l]
          const std::size_t bi = tb ? j + l * b.ld : l + j * b.ld;  // op(B)[l, j]
          acc += load(a.type, A, ai) * load(b.type, B, bi);
        }
        float v = al_v * sa * sb * acc;
        if (be_v != 0.0f) v += be_v * load(c.type, C, i + j * c.ld);
        if (bias) v += load(static_cast<cudaDataType_t>(d.bias_type), d.bias, i);
        if (gelu) v = unshard::gelu_tanh(v);
        out[i + j * m] = v;
      }
    for (std::uint64_t j = 0; j < n; ++j)
      for (std::uint64_t i = 0; i < m; ++i) store(dl.type, D, i + j * dl.ld, out[i + j * m]);
  });
  return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"
