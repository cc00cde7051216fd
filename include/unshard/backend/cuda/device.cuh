#pragma once
#include <cuda_runtime_api.h>

#include "unshard/backend/cuda/check.cuh"

namespace unshard::cuda {

// The calling thread's current device, for the scope of a call that must run on `device`
// (CUDA's current device is per host thread). Restores the previous one; sets nothing when it
// already is current, which is the common case: a rank's thread stays on its rank's device.
class device_guard {
 public:
  explicit device_guard(int device) {
    UNSHARD_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) UNSHARD_CUDA_CHECK(cudaSetDevice(device));
    else previous_ = -1;
  }
  ~device_guard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  device_guard(const device_guard&) = delete;
  device_guard& operator=(const device_guard&) = delete;

 private:
  int previous_ = -1;
};

// Number of devices this process sees; 0 when there is no device or no driver (the GPU tests then
// report "skipped").
inline int device_count() noexcept {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace unshard::cuda
