#pragma once
// UNSHARD_HD marks math shared by host code and CUDA kernels. Off nvcc it is plain `inline`,
// so every such function is compiled and tested by the host build (as CuTe's CUTE_HOST_DEVICE).
#if defined(__CUDACC__)
#define UNSHARD_HD __host__ __device__ inline
#else
#define UNSHARD_HD inline
#endif

#define UNSHARD_VERSION_MAJOR 0
#define UNSHARD_VERSION_MINOR 1
#define UNSHARD_VERSION_PATCH 0
