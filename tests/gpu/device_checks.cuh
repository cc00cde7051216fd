#pragma once
// What the device-kernel tests share: a stream, device buffers, random data in a storage type, and
// the comparison against the host path (a bound per element for f32, plus one bf16 ulp for bf16),
// with the host GEMM reference and its per-element bound.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <doctest/doctest.h>

#include "unshard/backend/cuda/check.cuh"
#include "unshard/backend/cuda/memory.cuh"
#include "unshard/kernels/cuda/common.cuh"
#include "unshard/kernels/host/gemm.hpp"
#include "unshard/kernels/thread/activation.hpp"

namespace unshard::gpu_testing {

constexpr double row_rel = 1e-6;  // f32 row/elementwise kernels against the host: see test_kernels.cu

constexpr double u32 = 1.0 / (1 << 24);

struct test_stream {
  cudaStream_t s = nullptr;
  test_stream() { UNSHARD_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~test_stream() { cudaStreamDestroy(s); }
  void sync() const { UNSHARD_CUDA_CHECK(cudaStreamSynchronize(s)); }
};

// Host bytes to device memory, complete on the device when it returns, for every stream: the
// tests' kernels run on non-blocking streams, which a pageable cudaMemcpy (legacy default stream,
// returns before its DMA lands) does not order with (backend/cuda/memory.cuh).
inline void upload(void* dst, const void* src, std::size_t bytes) {
  int device = 0;
  UNSHARD_CUDA_CHECK(cudaGetDevice(&device));
  cuda::upload_to_device(device, static_cast<std::byte*>(dst), static_cast<const std::byte*>(src), bytes);
}

template <class T>
struct device_vector {
  T* p = nullptr;
  std::size_t n = 0;
  explicit device_vector(std::size_t count) : n(count) {
    UNSHARD_CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(T)));
  }
  explicit device_vector(const std::vector<T>& h) : device_vector(h.size()) {
    if (n > 0) upload(p, h.data(), n * sizeof(T));
  }
  ~device_vector() { cudaFree(p); }
  device_vector(const device_vector&) = delete;
  device_vector& operator=(const device_vector&) = delete;
  std::vector<T> get(const test_stream& stream) const {  // waits for `stream`, then copies back (empty: none)
    stream.sync();
    std::vector<T> h(n);
    // Device to pageable host memory: cudaMemcpy returns once the bytes are on the host, and the
    // stream that wrote them is synchronised above.
    if (n > 0) UNSHARD_CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

inline std::vector<float> random_floats(std::size_t n, unsigned seed, float mean = 0.0f, float stddev = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(mean, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

template <class T>
std::vector<T> stored(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = cuda::from_f32<T>(v[i]);
  return out;
}
template <class T>
std::vector<float> widened(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = to_f32(v[i]);
  return out;
}

inline double max_abs(const std::vector<float>& v) {
  double m = 0.0;
  for (const float x : v) m = std::max(m, std::abs(static_cast<double>(x)));
  return m;
}

inline double bf16_ulp(double v) {  // bf16 keeps 8 significant bits
  int e = 0;
  std::frexp(v == 0.0 ? 1e-30 : v, &e);
  return std::ldexp(1.0, e - 8);
}

template <class T>
constexpr const char* storage_name() {
  return std::is_same_v<T, float> ? "f32" : "bf16";
}

// got (storage T) against ref (f32); bf16 adds one bf16 ulp of the larger value to f32_bound(i).
template <class T>
void expect_close(const std::string& what, const std::vector<T>& got_stored, const std::vector<float>& ref_f32,
                  const std::function<double(std::size_t)>& f32_bound) {
  REQUIRE(got_stored.size() == ref_f32.size());
  const std::vector<float> got = widened(got_stored);
  double worst = 0.0;
  std::size_t bad = 0, first_bad = 0;
  for (std::size_t i = 0; i < ref_f32.size(); ++i) {
    double ref = ref_f32[i];
    if constexpr (!std::is_same_v<T, float>) ref = to_f32(cuda::from_f32<T>(ref_f32[i]));
    const double err = std::abs(static_cast<double>(got[i]) - ref);
    double bound = f32_bound(i);
    if constexpr (!std::is_same_v<T, float>)
      bound += bf16_ulp(std::max(std::abs(ref), std::abs(static_cast<double>(got[i]))));
    worst = std::max(worst, err / bound);
    if (!(err <= bound) && bad++ == 0) first_bad = i;
  }
  std::ostringstream msg;
  msg << what << ": worst err/bound " << worst;
  if (bad)
    msg << ", " << bad << " of " << ref_f32.size() << " over, first at " << first_bad << " (got " << got[first_bad]
        << ", ref " << ref_f32[first_bad] << ")";
  CHECK_MESSAGE(bad == 0, msg.str());
  MESSAGE(msg.str());
}

template <class T>
void expect_close_rel(const std::string& what, const std::vector<T>& got, const std::vector<float>& ref, double rel) {
  const double bound = rel * std::max(1.0, max_abs(ref));
  expect_close<T>(what, got, ref, [=](std::size_t) { return bound; });
}

// Host reference for a linear on the values the device multiplies (bf16 widened exactly), and
// the per-element GEMM bound of the header comment.
struct linear_reference {
  std::vector<float> y;      // [m, n]
  std::vector<double> bound;  // [m, n]
};

// The bound on |gelu(y_device) - gelu_tanh(y_host)| where y_device is within `gemm_bound` of
// y_host and gelu is the cuBLASLt epilogue's GELU (CUBLASLT_EPILOGUE_GELU*: the tanh form,
// 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3)))). Three terms:
//  * the GEMM's error carried through gelu: |gelu'| <= 1.13 everywhere, so 1.13 gemm_bound (1.2);
//  * the epilogue's tanh: cuBLASLt does not document how it evaluates it, and the fast hardware
//    approximation (PTX tanh.approx.f32, which fused epilogues use) is documented only to about
//    2^-11 absolute error, not to f32 ulps. Taking 2^-10 (twice that) as the error of tanh, the
//    GELU is off by at most 0.5 |y| 2^-10. The previous bound (f32 ulps only, 1e-6 relative) was
//    about 500 times tighter than this and would fail on a correct epilogue that uses tanh.approx;
//  * the f32 evaluation of the rest of the formula: a few ulps, 1e-6 relative (row_rel).
// Accurate tanh (tanhf, ~2 ulp) meets the bound with room; a GELU missing from the epilogue, or
// a wrong one (a lost factor 0.5, a sign, a wrong constant in the cubic term), does not.
inline double gelu_epilogue_bound(double y, double gemm_bound) {
  constexpr double tanh_abs_err = 1.0 / 1024;  // 2^-10
  return 1.2 * gemm_bound + 0.5 * std::abs(y) * tanh_abs_err + row_rel * std::max(1.0, std::abs(y));
}

inline linear_reference host_linear(const std::vector<float>& x, std::size_t m, std::size_t k, const std::vector<float>& w,
                             const std::vector<float>& b, std::size_t n, bool gelu = false) {
  linear_reference r{std::vector<float>(m * n), std::vector<double>(m * n)};
  const tensor_view wv(const_cast<float*>(w.data()), dtype::f32,
                       shape{static_cast<std::int64_t>(n), static_cast<std::int64_t>(k)});
  const tensor_view bv = b.empty() ? tensor_view{}
                                   : tensor_view(const_cast<float*>(b.data()), dtype::f32, shape{static_cast<std::int64_t>(n)});
  linear(x.data(), m, k, wv, bv, r.y.data());
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j) {
      double abs_sum = b.empty() ? 0.0 : std::abs(b[j]);
      for (std::size_t l = 0; l < k; ++l) abs_sum += std::abs(static_cast<double>(x[i * k + l]) * w[j * k + l]);
      double bound = 8.0 * std::sqrt(static_cast<double>(k)) * u32 * abs_sum + 1e-30;
      float& y = r.y[i * n + j];
      if (gelu) {
        bound = gelu_epilogue_bound(y, bound);
        y = gelu_tanh(y);
      }
      r.bound[i * n + j] = bound;
    }
  return r;
}

inline void expect_linear(const std::string& what, const std::vector<float>& got, const linear_reference& ref) {
  expect_close<float>(what, got, ref.y, [&](std::size_t i) { return ref.bound[i]; });
}

}  // namespace unshard::gpu_testing
