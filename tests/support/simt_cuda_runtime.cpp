// The CUDA runtime calls the SIMT-emulated kernel tests make (tests/simt.cmake), implemented on the
// host: "device" memory is host memory, every stream and event is complete at once (each kernel and
// copy runs to completion when called), one device, 0, of compute capability 9.0.
//
// Stricter than a loose stand-in, so the tests keep their teeth:
//  * device memory starts as 0xFF bytes (NaN in f32 and bf16), so a kernel that reads what nobody
//    wrote gives NaN, not a plausible zero;
//  * every copy and memset into or out of device memory must lie inside one allocation, and
//    cudaFree takes only what cudaMalloc gave: otherwise cudaErrorInvalidValue, as the tests check
//    every call's status;
//  * allocations are 256-byte aligned, as cudaMalloc's are (the kernels' 16-byte vector paths
//    depend on it).
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>

namespace {

struct allocations {
  std::mutex m;
  std::map<std::uintptr_t, std::size_t> device;  // start -> bytes
  std::map<std::uintptr_t, std::size_t> host;
};

allocations& table() {
  static allocations a;
  return a;
}

thread_local cudaError_t last_error = cudaSuccess;

cudaError_t fail(cudaError_t e) {
  last_error = e;
  return e;
}

// Exactly `bytes` (at least 1), 256-byte aligned: under AddressSanitizer the byte after the end is
// already out of bounds, as it is for compute-sanitizer on the GPU.
void* aligned(std::size_t bytes) {
  void* p = nullptr;
  return posix_memalign(&p, 256, bytes == 0 ? 1 : bytes) == 0 ? p : nullptr;
}

// [p, p + bytes) inside one device allocation.
bool in_device_allocation(const void* p, std::size_t bytes) {
  std::lock_guard lock(table().m);
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  auto it = table().device.upper_bound(a);
  if (it == table().device.begin()) return false;
  --it;
  return a >= it->first && a + bytes <= it->first + it->second;
}

bool device_side(cudaMemcpyKind kind, bool destination) {
  switch (kind) {
    case cudaMemcpyHostToDevice: return destination;
    case cudaMemcpyDeviceToHost: return !destination;
    case cudaMemcpyDeviceToDevice: return true;
    default: return false;
  }
}

cudaError_t copy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
  if (bytes == 0) return cudaSuccess;
  if (kind == cudaMemcpyHostToHost) {
    std::memmove(dst, src, bytes);
    return cudaSuccess;
  }
  if (kind != cudaMemcpyHostToDevice && kind != cudaMemcpyDeviceToHost && kind != cudaMemcpyDeviceToDevice &&
      kind != cudaMemcpyDefault)
    return fail(cudaErrorInvalidMemcpyDirection);
  if (kind != cudaMemcpyDefault) {
    if (device_side(kind, true) && !in_device_allocation(dst, bytes)) return fail(cudaErrorInvalidValue);
    if (device_side(kind, false) && !in_device_allocation(src, bytes)) return fail(cudaErrorInvalidValue);
  }
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

}  // namespace

extern "C" {

cudaError_t CUDARTAPI cudaGetLastError(void) {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

const char* CUDARTAPI cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaError (not emulated)";
  }
}

const char* CUDARTAPI cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument (SIMT emulator: outside every device allocation?)";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction";
    case cudaErrorInvalidDevice: return "invalid device ordinal (the SIMT emulator has device 0 only)";
    case cudaErrorNotSupported: return "not supported (the SIMT emulator has no such device property)";
    default: return "an error the SIMT emulator does not produce";
  }
}

cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaSetDevice(int device) { return device == 0 ? cudaSuccess : fail(cudaErrorInvalidDevice); }

cudaError_t CUDARTAPI cudaMalloc(void** p, std::size_t bytes) {
  void* q = aligned(bytes);
  if (q == nullptr) return fail(cudaErrorMemoryAllocation);
  std::memset(q, 0xFF, bytes);
  std::lock_guard lock(table().m);
  table().device[reinterpret_cast<std::uintptr_t>(q)] = bytes;
  *p = q;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaFree(void* p) {
  if (p == nullptr) return cudaSuccess;
  std::lock_guard lock(table().m);
  if (table().device.erase(reinterpret_cast<std::uintptr_t>(p)) != 1) return fail(cudaErrorInvalidValue);
  std::free(p);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaHostAlloc(void** p, std::size_t bytes, unsigned int) {
  void* q = aligned(bytes);
  if (q == nullptr) return fail(cudaErrorMemoryAllocation);
  std::lock_guard lock(table().m);
  table().host[reinterpret_cast<std::uintptr_t>(q)] = bytes;
  *p = q;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMallocHost(void** p, std::size_t bytes) { return cudaHostAlloc(p, bytes, 0); }

// The emulated device says it is compute capability 9.0 (a Hopper), so the fp8 GEMM paths that
// need sm_89 run against simt_cublaslt.cpp; no other property is emulated.
cudaError_t CUDARTAPI cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice);
  if (attr == cudaDevAttrComputeCapabilityMajor) *value = 9;
  else if (attr == cudaDevAttrComputeCapabilityMinor) *value = 0;
  else return fail(cudaErrorNotSupported);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaFreeHost(void* p) {
  if (p == nullptr) return cudaSuccess;
  std::lock_guard lock(table().m);
  if (table().host.erase(reinterpret_cast<std::uintptr_t>(p)) != 1) return fail(cudaErrorInvalidValue);
  std::free(p);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
  return copy(dst, src, bytes, kind);
}

cudaError_t CUDARTAPI cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind,
                                      cudaStream_t) {
  return copy(dst, src, bytes, kind);
}

cudaError_t CUDARTAPI cudaMemcpy2DAsync(void* dst, std::size_t dpitch, const void* src, std::size_t spitch,
                                        std::size_t width, std::size_t height, cudaMemcpyKind kind, cudaStream_t) {
  if (width > dpitch || width > spitch) return fail(cudaErrorInvalidValue);
  for (std::size_t r = 0; r < height; ++r) {
    const cudaError_t e = copy(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch,
                               width, kind);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMemsetAsync(void* p, int value, std::size_t bytes, cudaStream_t) {
  if (bytes == 0) return cudaSuccess;
  if (!in_device_allocation(p, bytes)) return fail(cudaErrorInvalidValue);
  std::memset(p, value, bytes);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMemset(void* p, int value, std::size_t bytes) { return cudaMemsetAsync(p, value, bytes, nullptr); }

// Streams and events: every operation completes when it is called, so there is nothing to wait for.
// A stream is a distinct non-null handle (code compares them), never dereferenced.
cudaError_t CUDARTAPI cudaStreamCreateWithFlags(cudaStream_t* s, unsigned int) {
  *s = reinterpret_cast<cudaStream_t>(new char);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaStreamDestroy(cudaStream_t s) {
  delete reinterpret_cast<char*>(s);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaDeviceSynchronize(void) { return cudaSuccess; }

cudaError_t CUDARTAPI cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int) {
  *e = reinterpret_cast<cudaEvent_t>(new char);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaEventDestroy(cudaEvent_t e) {
  delete reinterpret_cast<char*>(e);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }

}  // extern "C"
