// doctest's main for the GPU tests: runs them only where enough CUDA devices are usable, and
// otherwise exits with 77, which tests/gpu.cmake declares as ctest's SKIP_RETURN_CODE.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cuda_runtime_api.h>

#include <cstdio>

#include "gpu_main.hpp"

int main(int argc, char** argv) {
  constexpr int skipped = 77;
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  // No device, or no driver at all (a build machine): nothing here can run. Any other error is a
  // broken installation on a machine that has GPUs, and fails.
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) {
    std::fprintf(stderr, "skipped: no usable CUDA device (%s: %s)\n", cudaGetErrorName(e), cudaGetErrorString(e));
    return skipped;
  }
  if (e != cudaSuccess) {
    std::fprintf(stderr, "cudaGetDeviceCount failed: %s: %s\n", cudaGetErrorName(e), cudaGetErrorString(e));
    return 1;
  }
  const int needed = unshard::test::required_devices();
  if (count < needed) {
    std::fprintf(stderr, "skipped: this test needs %d CUDA device(s), %d visible\n", needed, count);
    return skipped;
  }
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, d) == cudaSuccess)
      std::printf("device %d: %s (sm_%d%d, %.1f GiB)\n", d, p.name, p.major, p.minor,
                  static_cast<double>(p.totalGlobalMem) / (1u << 30));
  }
  doctest::Context context(argc, argv);
  return context.run();
}
