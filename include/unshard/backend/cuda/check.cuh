#pragma once
// The CUDA backend's headers are named .cuh, not .hpp: they include the CUDA runtime, cuBLASLt and
// NCCL headers, so they cannot join the "every public .hpp compiles on its own" test of the plain
// C++ build (no CUDA include path there). They contain no kernels: any C++20 TU compiles them with
// g++ and /usr/local/cuda/include (tests/gpu.cmake builds each one that way, alone, so a .cpp tool
// can use the backend without nvcc), and .cu TUs include them as they are. bootstrap.hpp, plain
// C++ without CUDA, keeps the .hpp name and joins the plain test.
#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include "unshard/core/error.hpp"

namespace unshard::cuda {

// Where a checked call was made, and its text: an error names the call, the file and the line.
struct call_site {
  const char* call;
  const char* file;
  int line;
};

[[noreturn]] inline void throw_call_error(const call_site& at, const char* library, const char* code,
                                          const char* text) {
  throw_error(library, " call `", at.call, "` failed at ", at.file, ":", at.line, ": ", code, " (", text, ")");
}

inline void check(cudaError_t e, const call_site& at) {
  if (e == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so the next unrelated call does not report it again
  throw_call_error(at, "CUDA", cudaGetErrorName(e), cudaGetErrorString(e));
}

inline const char* nccl_result_name(ncclResult_t r) noexcept {
  switch (r) {
    case ncclSuccess: return "ncclSuccess";
    case ncclUnhandledCudaError: return "ncclUnhandledCudaError";
    case ncclSystemError: return "ncclSystemError";
    case ncclInternalError: return "ncclInternalError";
    case ncclInvalidArgument: return "ncclInvalidArgument";
    case ncclInvalidUsage: return "ncclInvalidUsage";
    case ncclRemoteError: return "ncclRemoteError";
    case ncclInProgress: return "ncclInProgress";
    default: return "ncclResult";
  }
}

// ncclInProgress is not an error: communicators are non-blocking (see nccl_world.cuh), and their
// calls may return before the operation is issued; the caller polls the communicator.
inline void check(ncclResult_t r, const call_site& at) {
  if (r == ncclSuccess || r == ncclInProgress) return;
  throw_call_error(at, "NCCL", nccl_result_name(r), ncclGetErrorString(r));
}

inline void check(cublasStatus_t s, const call_site& at) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  throw_call_error(at, "cuBLAS", cublasLtGetStatusName(s), cublasLtGetStatusString(s));
}

}  // namespace unshard::cuda

// UNSHARD_CUDA_CHECK(cudaMemcpyAsync(...)) / (ncclAllGather(...)) / (cublasLtMatmul(...)): throws
// unshard::error "CUDA call `cudaMemcpyAsync(...)` failed at file.cu:42: cudaErrorInvalidValue (...)".
// A macro because only a macro sees the call's text, file and line.
#define UNSHARD_CUDA_CHECK(...) ::unshard::cuda::check((__VA_ARGS__), ::unshard::cuda::call_site{#__VA_ARGS__, __FILE__, __LINE__})
