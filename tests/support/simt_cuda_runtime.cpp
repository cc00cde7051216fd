// The CUDA runtime calls the SIMT-emulated tests make (tests/simt.cmake), implemented on the host:
// "device" memory is host memory; one device, 0, of compute capability 9.0.
//
// Streams are modelled, adversarially: work queued on a stream (kernels, asynchronous copies and
// memsets, host functions, simt_cublaslt.cpp's matmuls) runs as late as the program's own
// synchronisation allows, in stream order: when the host waits for the stream or an event recorded
// after it, when another stream that waits on such an event needs it, or when a call synchronises
// the device (cudaFree, cudaDeviceSynchronize). So a read of device memory without the wait that
// orders it after the writer sees the old bytes, and a host buffer reused while a copy out of it is
// pending is copied in its new state: the races a GPU shows now and then show here every time.
// Copies follow CUDA's rules for pageable memory: an asynchronous copy from pageable host memory
// takes the bytes at the call (after the stream's earlier work, as CUDA synchronises the stream
// first), one to pageable host memory completes before it returns; pinned memory (cudaHostAlloc)
// is read and written when the copy runs. The null stream runs its work at once.
//
// Stricter than a loose stand-in, so the tests keep their teeth:
//  * device memory starts as 0xFF bytes (NaN in f32 and bf16), so a kernel that reads what nobody
//    wrote gives NaN, not a plausible zero;
//  * every copy and memset into or out of device memory must lie inside one allocation, and
//    cudaFree takes only what cudaMalloc gave: otherwise cudaErrorInvalidValue, as the tests check
//    every call's status;
//  * allocations are exactly their size and 256-byte aligned, as cudaMalloc's are (the kernels'
//    16-byte vector paths depend on the alignment; AddressSanitizer sees the first byte past the end).
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#define UNSHARD_SIMT_EMULATION 1
#include "unshard/core/error.hpp"
#include "unshard/kernels/cuda/simt_emulator.cuh"

#include "simt_streams.hpp"

namespace {

struct allocations {
  std::map<std::uintptr_t, std::size_t> device;  // start -> bytes
  std::map<std::uintptr_t, std::size_t> host;    // pinned
};

// One lock for the whole runtime, recursive: work that runs while a stream is driven may queue or
// wait again.
std::recursive_mutex& runtime_lock() {
  static std::recursive_mutex m;
  return m;
}

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

bool inside(const std::map<std::uintptr_t, std::size_t>& t, const void* p, std::size_t bytes) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  auto it = t.upper_bound(a);
  if (it == t.begin()) return false;
  --it;
  return a >= it->first && a + bytes <= it->first + it->second;
}
bool in_device_allocation(const void* p, std::size_t bytes) { return inside(table().device, p, bytes); }
bool pinned(const void* p, std::size_t bytes) { return inside(table().host, p, bytes); }

// ---- streams and events ----------------------------------------------------------------------------

struct stream_state {
  bool blocking = false;  // synchronises with the legacy null stream (created without cudaStreamNonBlocking)
  std::deque<std::function<void()>> pending;
  std::uint64_t enqueued = 0, executed = 0;
  bool running = false;
};

struct event_state {
  stream_state* stream = nullptr;  // where it was last recorded (null: never, or on the null stream)
  std::uint64_t position = 0;      // complete once that stream has executed this many operations
};

std::vector<stream_state*>& live_streams() {
  static std::vector<stream_state*> s;
  return s;
}

bool is_null_stream(cudaStream_t s) {
  return s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread;
}

stream_state* state_of(cudaStream_t s) { return is_null_stream(s) ? nullptr : reinterpret_cast<stream_state*>(s); }

// A destroyed stream ran all its work first: its events are complete.
bool is_live(const stream_state* s) {
  for (const stream_state* l : live_streams())
    if (l == s) return true;
  return false;
}

// Runs s's operations until `upto` of them have run.
void drive(stream_state& s, std::uint64_t upto) {
  while (s.executed < upto) {
    if (s.running)
      unshard::throw_error("SIMT runtime: streams wait on each other in a cycle (a wait on an event recorded after it)");
    std::function<void()> op = std::move(s.pending.front());
    s.pending.pop_front();
    s.running = true;
    struct done {
      stream_state& s;
      ~done() {
        s.running = false;
        ++s.executed;
      }
    } mark{s};
    op();
  }
}

void drive_all(bool blocking_only) {
  // A stream's work may make another stream's work run; loop until every queue is empty.
  for (bool again = true; again;) {
    again = false;
    for (stream_state* s : live_streams())
      if ((!blocking_only || s->blocking) && s->executed < s->enqueued) {
        drive(*s, s->enqueued);
        again = true;
      }
  }
}

void queue_on(cudaStream_t stream, std::function<void()> work) {
  std::lock_guard lock(runtime_lock());
  stream_state* s = state_of(stream);
  if (s == nullptr) {  // the legacy null stream: after every blocking stream's work, at once
    drive_all(true);
    work();
    return;
  }
  s->pending.push_back(std::move(work));
  ++s->enqueued;
}

void kernel_hook(cudaStream_t stream, unshard::simt::stream_work&& work) { queue_on(stream, std::move(work)); }

// Kernels launched through UNSHARD_LAUNCH queue here from the first launch on.
const bool hook_installed = (unshard::simt::stream_hook() = &kernel_hook, true);

// ---- copies ----------------------------------------------------------------------------------------

cudaError_t check_copy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
  if (kind != cudaMemcpyHostToDevice && kind != cudaMemcpyDeviceToHost && kind != cudaMemcpyDeviceToDevice &&
      kind != cudaMemcpyHostToHost && kind != cudaMemcpyDefault)
    return fail(cudaErrorInvalidMemcpyDirection);
  const bool dst_device = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool src_device = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (dst_device && !in_device_allocation(dst, bytes)) return fail(cudaErrorInvalidValue);
  if (src_device && !in_device_allocation(src, bytes)) return fail(cudaErrorInvalidValue);
  return cudaSuccess;
}

bool host_side(const void* p, std::size_t bytes) { return !in_device_allocation(p, bytes); }

// cudaMemcpyAsync's rules for pageable host memory (see the header), modelled.
cudaError_t copy_async(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  std::lock_guard lock(runtime_lock());
  if (const cudaError_t e = check_copy(dst, src, bytes, kind); e != cudaSuccess) return e;
  stream_state* s = state_of(stream);
  const bool src_pageable = host_side(src, bytes) && !pinned(src, bytes);
  const bool dst_pageable = host_side(dst, bytes) && !pinned(dst, bytes);
  if (s != nullptr && dst_pageable) {  // to pageable memory: complete when the call returns
    drive(*s, s->enqueued);
    std::memmove(dst, src, bytes);
    return cudaSuccess;
  }
  if (s != nullptr && src_pageable) {  // from pageable memory: the bytes as they are now
    drive(*s, s->enqueued);
    auto copy = std::make_shared<std::vector<unsigned char>>(static_cast<const unsigned char*>(src),
                                                             static_cast<const unsigned char*>(src) + bytes);
    queue_on(stream, [dst, copy] { std::memcpy(dst, copy->data(), copy->size()); });
    return cudaSuccess;
  }
  queue_on(stream, [dst, src, bytes] { std::memmove(dst, src, bytes); });
  return cudaSuccess;
}

}  // namespace

namespace unshard::simt_testing {
void enqueue(cudaStream_t stream, std::function<void()> work) { queue_on(stream, std::move(work)); }
}  // namespace unshard::simt_testing

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
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
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
    case cudaErrorInvalidResourceHandle: return "invalid resource handle (an event never created)";
    default: return "an error the SIMT emulator does not produce";
  }
}

cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaSetDevice(int device) { return device == 0 ? cudaSuccess : fail(cudaErrorInvalidDevice); }

// The emulated device says it is compute capability 9.0 (a Hopper), so the fp8 GEMM paths that
// need sm_89 run against simt_cublaslt.cpp; no other property is emulated.
cudaError_t CUDARTAPI cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice);
  if (attr == cudaDevAttrComputeCapabilityMajor) *value = 9;
  else if (attr == cudaDevAttrComputeCapabilityMinor) *value = 0;
  else return fail(cudaErrorNotSupported);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMalloc(void** p, std::size_t bytes) {
  void* q = aligned(bytes);
  if (q == nullptr) return fail(cudaErrorMemoryAllocation);
  std::memset(q, 0xFF, bytes);
  std::lock_guard lock(runtime_lock());
  table().device[reinterpret_cast<std::uintptr_t>(q)] = bytes;
  *p = q;
  return cudaSuccess;
}

// cudaFree and cudaFreeHost synchronise the device first, as CUDA's do.
cudaError_t CUDARTAPI cudaFree(void* p) {
  if (p == nullptr) return cudaSuccess;
  std::lock_guard lock(runtime_lock());
  drive_all(false);
  if (table().device.erase(reinterpret_cast<std::uintptr_t>(p)) != 1) return fail(cudaErrorInvalidValue);
  std::free(p);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaHostAlloc(void** p, std::size_t bytes, unsigned int) {
  void* q = aligned(bytes);
  if (q == nullptr) return fail(cudaErrorMemoryAllocation);
  std::lock_guard lock(runtime_lock());
  table().host[reinterpret_cast<std::uintptr_t>(q)] = bytes;
  *p = q;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMallocHost(void** p, std::size_t bytes) { return cudaHostAlloc(p, bytes, 0); }

cudaError_t CUDARTAPI cudaFreeHost(void* p) {
  if (p == nullptr) return cudaSuccess;
  std::lock_guard lock(runtime_lock());
  drive_all(false);
  if (table().host.erase(reinterpret_cast<std::uintptr_t>(p)) != 1) return fail(cudaErrorInvalidValue);
  std::free(p);
  return cudaSuccess;
}

// On the legacy null stream: after the blocking streams' work (ours are non-blocking: it does not
// wait for them, as on a GPU), complete when it returns.
cudaError_t CUDARTAPI cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
  if (bytes == 0) return cudaSuccess;
  std::lock_guard lock(runtime_lock());
  if (const cudaError_t e = check_copy(dst, src, bytes, kind); e != cudaSuccess) return e;
  drive_all(true);
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind,
                                      cudaStream_t stream) {
  return copy_async(dst, src, bytes, kind, stream);
}

cudaError_t CUDARTAPI cudaMemcpy2DAsync(void* dst, std::size_t dpitch, const void* src, std::size_t spitch,
                                        std::size_t width, std::size_t height, cudaMemcpyKind kind,
                                        cudaStream_t stream) {
  if (width > dpitch || width > spitch) return fail(cudaErrorInvalidValue);
  for (std::size_t r = 0; r < height; ++r) {
    const cudaError_t e = copy_async(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch,
                                     width, kind, stream);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMemsetAsync(void* p, int value, std::size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  std::lock_guard lock(runtime_lock());
  if (!in_device_allocation(p, bytes)) return fail(cudaErrorInvalidValue);
  queue_on(stream, [p, value, bytes] { std::memset(p, value, bytes); });
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMemset(void* p, int value, std::size_t bytes) { return cudaMemsetAsync(p, value, bytes, nullptr); }

cudaError_t CUDARTAPI cudaStreamCreateWithFlags(cudaStream_t* s, unsigned int flags) {
  std::lock_guard lock(runtime_lock());
  auto* st = new stream_state;
  st->blocking = (flags & cudaStreamNonBlocking) == 0;
  live_streams().push_back(st);
  *s = reinterpret_cast<cudaStream_t>(st);
  return cudaSuccess;
}

// Pending work completes, as CUDA lets it after the call returns.
cudaError_t CUDARTAPI cudaStreamDestroy(cudaStream_t s) {
  std::lock_guard lock(runtime_lock());
  stream_state* st = state_of(s);
  if (st == nullptr) return fail(cudaErrorInvalidResourceHandle);
  drive(*st, st->enqueued);
  auto& all = live_streams();
  for (auto it = all.begin(); it != all.end(); ++it)
    if (*it == st) {
      all.erase(it);
      break;
    }
  delete st;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaStreamSynchronize(cudaStream_t s) {
  std::lock_guard lock(runtime_lock());
  if (stream_state* st = state_of(s)) drive(*st, st->enqueued);
  else drive_all(true);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaDeviceSynchronize(void) {
  std::lock_guard lock(runtime_lock());
  drive_all(false);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int) {
  *e = reinterpret_cast<cudaEvent_t>(new event_state);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaEventDestroy(cudaEvent_t e) {
  delete reinterpret_cast<event_state*>(e);
  return cudaSuccess;
}

// The event completes once its stream has run everything queued before the record.
cudaError_t CUDARTAPI cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  if (e == nullptr) return fail(cudaErrorInvalidResourceHandle);
  std::lock_guard lock(runtime_lock());
  auto& ev = *reinterpret_cast<event_state*>(e);
  ev.stream = state_of(s);
  ev.position = ev.stream ? ev.stream->enqueued : 0;
  if (ev.stream == nullptr) drive_all(true);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaEventSynchronize(cudaEvent_t e) {
  if (e == nullptr) return fail(cudaErrorInvalidResourceHandle);
  std::lock_guard lock(runtime_lock());
  const auto& ev = *reinterpret_cast<const event_state*>(e);
  if (ev.stream && is_live(ev.stream)) drive(*ev.stream, ev.position);
  return cudaSuccess;
}

// Work queued on s after this waits for what was queued before the event's record.
cudaError_t CUDARTAPI cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned int) {
  if (e == nullptr) return fail(cudaErrorInvalidResourceHandle);
  std::lock_guard lock(runtime_lock());
  const event_state ev = *reinterpret_cast<const event_state*>(e);
  if (ev.stream == nullptr) return cudaSuccess;
  queue_on(s, [ev] {
    if (is_live(ev.stream)) drive(*ev.stream, ev.position);
  });
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaDeviceGetStreamPriorityRange(int* least, int* greatest) {
  *least = 0;
  *greatest = -5;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaStreamCreateWithPriority(cudaStream_t* s, unsigned int flags, int) {
  return cudaStreamCreateWithFlags(s, flags);
}

// A query runs what the stream has pending first (so a program that polls makes progress), then
// reports it done.
cudaError_t CUDARTAPI cudaStreamQuery(cudaStream_t s) { return cudaStreamSynchronize(s); }
cudaError_t CUDARTAPI cudaEventQuery(cudaEvent_t e) { return cudaEventSynchronize(e); }

// Registered host memory is pinned memory: copies read and write it when they run.
cudaError_t CUDARTAPI cudaHostRegister(void* p, std::size_t bytes, unsigned int) {
  std::lock_guard lock(runtime_lock());
  table().host[reinterpret_cast<std::uintptr_t>(p)] = bytes;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaHostUnregister(void* p) {
  std::lock_guard lock(runtime_lock());
  drive_all(false);
  return table().host.erase(reinterpret_cast<std::uintptr_t>(p)) == 1 ? cudaSuccess : fail(cudaErrorInvalidValue);
}

cudaError_t CUDARTAPI cudaLaunchHostFunc(cudaStream_t s, cudaHostFn_t fn, void* data) {
  queue_on(s, [fn, data] { fn(data); });
  return cudaSuccess;
}

}  // extern "C"
