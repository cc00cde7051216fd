// Built where the CUDA toolkit is found: the CUDA backend's headers compile as plain C++ against
// unshard::cuda, and its libraries (CUDA runtime, cuBLASLt, NCCL) link. Needs no GPU to run.
#include <unshard/backend/cuda/check.cuh>

#include <cstdio>

int main() {
  int nccl = 0;
  UNSHARD_CUDA_CHECK(ncclGetVersion(&nccl));
  int runtime = 0;
  UNSHARD_CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
  std::printf("CUDA runtime %d, cuBLASLt %zu, NCCL %d\n", runtime, cublasLtGetVersion(), nccl);
  return nccl > 0 && runtime > 0 ? 0 : 1;
}
