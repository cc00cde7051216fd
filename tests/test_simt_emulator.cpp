// The SIMT emulator itself (kernels/cuda/simt_emulator.cuh): the CUDA semantics the kernels rely on
// (thread and block indices, block-shared memory, __syncthreads, warp shuffles, atomics), and the
// faults it must name instead of running on: a barrier only some threads reach, a shuffle without
// the whole warp, an unlaunchable shape, a kernel that throws, and a missing barrier, which one of
// the two thread orders turns into a wrong value.
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <cstddef>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "support/error_of.hpp"
#include "unshard/kernels/cuda/common.cuh"

using namespace unshard;
using unshard::testing::error_of;

namespace {

// Runs f with the emulator's thread order set to `o`, restoring the previous order.
template <class F>
void with_order(simt::thread_order o, F&& f) {
  const simt::thread_order before = simt::options().order;
  simt::options().order = o;
  struct restore {
    simt::thread_order o;
    ~restore() { simt::options().order = o; }
  } r{before};
  f();
}

template <int = 0>
__global__ void write_indices(unsigned* out) {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  out[b * blockDim.x * blockDim.y * blockDim.z + t] = b * 1000 + t;
}

// Each block reverses its 256 values through shared memory: right only with the barrier.
template <bool Barrier>
__global__ void reverse_in_shared(const int* in, int* out) {
  __shared__ int tile[256];
  const unsigned t = threadIdx.x, base = blockIdx.x * 256;
  tile[t] = in[base + t];
  if constexpr (Barrier) __syncthreads();
  out[base + t] = tile[255 - t];
}

template <int = 0>
__global__ void warp_sum(const float* in, float* out) {
  float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

template <int = 0>
__global__ void block_max(const unsigned* in, unsigned* out) {
  atomicMax(out, in[blockIdx.x * blockDim.x + threadIdx.x]);
}

template <int = 0>
__global__ void barrier_in_branch(int* out) {
  if (threadIdx.x < 64) __syncthreads();  // the other 192 threads never arrive
  out[threadIdx.x] = 1;
}

template <int = 0>
__global__ void early_exit_then_barrier(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

template <int = 0>
__global__ void shuffle_in_branch(float* out) {
  float v = 1.0f;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);  // half the warp
  out[threadIdx.x] = v;
}

template <int = 0>
__global__ void half_warp_mask(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1);
}

template <int = 0>
__global__ void throws_in_thread(int* out) {
  if (threadIdx.x == 77) throw_error("thread 77 failed");
  out[threadIdx.x] = 1;
}

}  // namespace

TEST_CASE("simt emulator: every thread of every block runs once, with its own indices") {
  for (const auto order : {simt::thread_order::forward, simt::thread_order::reverse}) {
    with_order(order, [] {
      const dim3 grid(3, 2, 2), block(8, 4, 2);
      const unsigned blocks = 12, threads = 64;
      std::vector<unsigned> out(blocks * threads, 0xffffffffu);
      UNSHARD_LAUNCH(grid, block, nullptr, write_indices<>)(out.data());
      std::size_t wrong = 0;
      for (unsigned b = 0; b < blocks; ++b)
        for (unsigned t = 0; t < threads; ++t) wrong += out[b * threads + t] != b * 1000 + t;
      CHECK(wrong == 0);
    });
  }
}

TEST_CASE("simt emulator: shared memory with a barrier is right in both orders; without one, wrong in one") {
  const unsigned blocks = 3;
  std::vector<int> in(blocks * 256);
  for (std::size_t i = 0; i < in.size(); ++i) in[i] = static_cast<int>(i);
  auto wrong_values = [&](auto kernel) {
    std::vector<int> out(in.size(), -1);
    UNSHARD_LAUNCH(blocks, 256, nullptr, kernel)(in.data(), out.data());
    std::size_t wrong = 0;
    for (unsigned b = 0; b < blocks; ++b)
      for (unsigned t = 0; t < 256; ++t) wrong += out[b * 256 + t] != in[b * 256 + 255 - t];
    return wrong;
  };
  std::size_t without_barrier = 0;
  for (const auto order : {simt::thread_order::forward, simt::thread_order::reverse})
    with_order(order, [&] {
      CHECK(wrong_values(reverse_in_shared<true>) == 0);
      without_barrier += wrong_values(reverse_in_shared<false>);
    });
  CHECK_MESSAGE(without_barrier > 0, "the missing __syncthreads went unnoticed in both thread orders");
}

TEST_CASE("simt emulator: warp shuffles exchange within the warp; atomicMax sees every thread") {
  std::vector<float> in(128);
  for (std::size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i);
  std::vector<float> out(in.size());
  UNSHARD_LAUNCH(2, 64, nullptr, warp_sum<>)(in.data(), out.data());
  for (std::size_t w = 0; w < 4; ++w) {
    float sum = 0;
    for (std::size_t l = 0; l < 32; ++l) sum += in[w * 32 + l];
    for (std::size_t l = 0; l < 32; ++l) CHECK(out[w * 32 + l] == sum);
  }
  std::vector<unsigned> values(1024);
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = static_cast<unsigned>((i * 7919) % 1021);
  values[700] = 5000;
  unsigned m = 0;
  UNSHARD_LAUNCH(4, 256, nullptr, block_max<>)(values.data(), &m);
  CHECK(m == 5000);
}

TEST_CASE("simt emulator: a barrier or a shuffle that not every thread reaches is an error, not a hang") {
  std::vector<int> out(256);
  std::vector<float> f(256);
  CHECK(error_of([&] { UNSHARD_LAUNCH(1, 256, nullptr, barrier_in_branch<>)(out.data()); })
            .find("__syncthreads reached by 64 of 256 threads; 192 had exited") != std::string::npos);
  CHECK(error_of([&] { UNSHARD_LAUNCH(1, 256, nullptr, early_exit_then_barrier<>)(out.data()); })
            .find("__syncthreads reached by 255 of 256 threads; 1 had exited") != std::string::npos);
  CHECK(error_of([&] { UNSHARD_LAUNCH(1, 64, nullptr, shuffle_in_branch<>)(f.data()); })
            .find("16 of 32 lanes wait at a warp shuffle") != std::string::npos);
  CHECK(error_of([&] { UNSHARD_LAUNCH(1, 32, nullptr, half_warp_mask<>)(f.data()); })
            .find("only the whole warp is emulated") != std::string::npos);
}

TEST_CASE("simt emulator: unlaunchable shapes are refused; a throwing thread fails the launch with its error") {
  std::vector<int> out(4096);
  CHECK(error_of([&] { UNSHARD_LAUNCH(1, 2048, nullptr, throws_in_thread<>)(out.data()); })
            .find("2048x1x1 threads is not launchable") != std::string::npos);
  CHECK(error_of([&] { UNSHARD_LAUNCH(dim3(1, 70000), 32, nullptr, throws_in_thread<>)(out.data()); })
            .find("is not launchable") != std::string::npos);
  CHECK(error_of([&] { UNSHARD_LAUNCH(1, 128, nullptr, throws_in_thread<>)(out.data()); }) == "thread 77 failed");
  // The emulator is usable again after a failed launch.
  std::vector<unsigned> idx(64);
  UNSHARD_LAUNCH(1, 64, nullptr, write_indices<>)(idx.data());
  CHECK(idx[63] == 63);
}

namespace {
template <int = 0>
__global__ void fill_value(float* out, std::size_t n, float v) {
  for (std::size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = v;
}
}  // namespace

// The host runtime (support/simt_cuda_runtime.cpp) runs stream work as late as the program's own
// synchronisation allows: a read not ordered after the writer sees the old bytes, every time.
TEST_CASE("simt runtime: stream work waits for the program's synchronisation, events order streams") {
  const std::size_t n = 1000;
  float* d = nullptr;
  REQUIRE(cudaMalloc(reinterpret_cast<void**>(&d), n * sizeof(float)) == cudaSuccess);
  cudaStream_t a = nullptr, b = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking) == cudaSuccess);
  REQUIRE(cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking) == cudaSuccess);
  float* pinned = nullptr;
  REQUIRE(cudaHostAlloc(reinterpret_cast<void**>(&pinned), n * sizeof(float), 0) == cudaSuccess);
  std::vector<float> host(n, -1.0f);

  // Written on a, read on b without a wait: b's copy runs first and reads what a has not written.
  UNSHARD_LAUNCH(4, 128, a, fill_value<>)(d, n, 1.0f);
  REQUIRE(cudaMemcpyAsync(pinned, d, n * sizeof(float), cudaMemcpyDeviceToHost, b) == cudaSuccess);
  REQUIRE(cudaStreamSynchronize(b) == cudaSuccess);
  CHECK(std::isnan(pinned[0]));  // fresh device memory is 0xFF bytes: NaN
  REQUIRE(cudaStreamSynchronize(a) == cudaSuccess);

  // With the event wait, the copy sees the kernel's values.
  cudaEvent_t written = nullptr;
  REQUIRE(cudaEventCreateWithFlags(&written, cudaEventDisableTiming) == cudaSuccess);
  UNSHARD_LAUNCH(4, 128, a, fill_value<>)(d, n, 2.0f);
  REQUIRE(cudaEventRecord(written, a) == cudaSuccess);
  REQUIRE(cudaStreamWaitEvent(b, written, 0) == cudaSuccess);
  REQUIRE(cudaMemcpyAsync(pinned, d, n * sizeof(float), cudaMemcpyDeviceToHost, b) == cudaSuccess);
  REQUIRE(cudaStreamSynchronize(b) == cudaSuccess);
  CHECK(pinned[0] == 2.0f);
  CHECK(pinned[n - 1] == 2.0f);

  // A pinned source rewritten before its copy ran is copied as rewritten; a pageable one as it was
  // at the call (CUDA stages pageable memory before returning).
  for (std::size_t i = 0; i < n; ++i) pinned[i] = 3.0f;
  REQUIRE(cudaMemcpyAsync(d, pinned, n * sizeof(float), cudaMemcpyHostToDevice, a) == cudaSuccess);
  for (std::size_t i = 0; i < n; ++i) pinned[i] = 4.0f;
  REQUIRE(cudaMemcpyAsync(host.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost, a) == cudaSuccess);
  CHECK(host[0] == 4.0f);  // to pageable memory: complete on return, after the stream's earlier work
  std::vector<float> pageable(n, 5.0f);
  REQUIRE(cudaMemcpyAsync(d, pageable.data(), n * sizeof(float), cudaMemcpyHostToDevice, a) == cudaSuccess);
  pageable.assign(n, 6.0f);
  REQUIRE(cudaMemcpyAsync(host.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost, a) == cudaSuccess);
  CHECK(host[0] == 5.0f);

  // An event recorded on an idle stream is complete: waiting on it holds nothing up.
  cudaEvent_t later = nullptr;
  REQUIRE(cudaEventCreateWithFlags(&later, cudaEventDisableTiming) == cudaSuccess);
  REQUIRE(cudaEventRecord(later, b) == cudaSuccess);
  REQUIRE(cudaStreamWaitEvent(a, later, 0) == cudaSuccess);
  REQUIRE(cudaStreamSynchronize(a) == cudaSuccess);

  cudaEventDestroy(written);
  cudaEventDestroy(later);
  cudaStreamDestroy(a);
  cudaStreamDestroy(b);
  cudaFreeHost(pinned);
  cudaFree(d);
}
