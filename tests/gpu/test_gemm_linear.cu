// blaslt::linear and blaslt::linear_rows (kernels/cuda/gemm.cuh, cuBLASLt) against the host linear,
// f32 and bf16 storage, with and without the bias and GELU epilogue, and which path each call took.
// Also built for the SIMT emulator (tests/simt.cmake), against its host reading of cuBLASLt.
//
// Bound, and why (u32 = 2^-24): both sides sum K products of f32 (or exact bf16 x bf16) values in
// different orders; rounding errors of a length-K sum grow like sqrt(K) u32 · Σ|x_k w_k|, so the
// bound is 8·sqrt(K)·u32·Σ_k|x_k w_k| per element (+ the GELU bound where the epilogue applies it).
// A TF32 GEMM (10-bit mantissa) would miss it by 10x: the test also shows no TF32 is used.
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "unshard/kernels/cuda/gemm.cuh"

#include "device_checks.cuh"

using namespace unshard;
using namespace unshard::gpu_testing;

TEST_CASE_TEMPLATE("blaslt::linear matches the host linear, with bias, without, with GELU-tanh", T, float, bf16) {
  test_stream st;
  device_vector<std::byte> workspace(std::size_t{32} << 20);
  cuda::blaslt blas;
  blas.set_workspace(workspace.p, workspace.n);
  // (m, k, n): the FFN's shape at a small width, a GEMV (time embedding), odd sizes.
  for (const auto& [m, k, n] : {std::tuple<std::size_t, std::size_t, std::size_t>{48, 128, 384}, {1, 256, 768},
                               {77, 200, 130}, {300, 1024, 64}}) {
    const auto x = stored<T>(random_floats(m * k, 19));
    const auto w = stored<T>(random_floats(n * k, 20, 0.0f, 0.1f));
    const auto b = stored<T>(random_floats(n, 21));
    device_vector<T> dx(x), dw(w), db(b);
    for (const bool bias : {true, false})
      for (const bool gelu : {false, true}) {
        const linear_reference ref = host_linear(widened(x), m, k, widened(w), bias ? widened(b) : std::vector<float>{}, n, gelu);
        const auto act = gelu ? cuda::activation::gelu_tanh : cuda::activation::none;
        const T* bp = bias ? db.p : nullptr;
        const std::string what = std::string("linear ") + storage_name<T>() + " " + std::to_string(m) + "x" +
                                 std::to_string(k) + "x" + std::to_string(n) + (bias ? " +bias" : "") + (gelu ? " gelu" : "");
        device_vector<float> dy(m * n);  // f32 output (the Wan model's)
        blas.linear(dx.p, m, k, dw.p, bp, n, dy.p, act, st.s);
        expect_close<float>(what + " -> f32", dy.get(st), ref.y, [&](std::size_t i) { return ref.bound[i]; });
        if constexpr (!std::is_same_v<T, float>) {  // and output in the storage type
          device_vector<T> dyt(m * n);
          blas.linear(dx.p, m, k, dw.p, bp, n, dyt.p, act, st.s);
          expect_close<T>(what + " -> bf16", dyt.get(st), ref.y, [&](std::size_t i) { return ref.bound[i]; });
        }
      }
  }
  // Which path the calls took: the epilogue (bias, GELU) must have been taken at least once, or
  // this test checked only the fallback kernel and said nothing about cuBLASLt's epilogue.
  const cuda::blaslt_stats& ps = blas.stats();
  MESSAGE("blaslt::linear ", std::string(storage_name<T>()), " GEMM paths: ", ps.calls, " calls, ", ps.epilogue_fused,
          " with the epilogue fused, ", ps.epilogue_fallback, " on the fallback (", ps.heuristic_failures,
          " heuristic failures)");
  CHECK(ps.epilogue_fused > 0);
}

TEST_CASE("blaslt::linear_rows computes a row slice of W into its output columns, nothing else") {
  test_stream st;
  device_vector<std::byte> workspace(std::size_t{4} << 20);
  cuda::blaslt blas;
  blas.set_workspace(workspace.p, workspace.n);
  const std::size_t m = 40, k = 96, n = 150;
  const auto x = random_floats(m * k, 22), w = random_floats(n * k, 23, 0.0f, 0.1f), b = random_floats(n, 24);
  const linear_reference ref = host_linear(x, m, k, w, b, n, false);
  device_vector<float> dx(x), dw(w), db(b);
  constexpr float untouched = 12345.0f;
  device_vector<float> dy(std::vector<float>(m * n, untouched));
  // Chunks of 1, 7, 64 and the rest of the rows, as a chunked unshard delivers them: the slices
  // start at rows 1, 8 and 72, so W, b and y are passed at 4-byte-aligned addresses too.
  std::size_t r0 = 0;
  for (const std::size_t rows : {std::size_t{1}, std::size_t{7}, std::size_t{64}, n - 72}) {
    const std::size_t r1 = r0 + rows;
    blas.linear_rows(dx.p, m, k, dw.p + r0 * k, db.p + r0, rows, r0, dy.p, n, cuda::activation::none, st.s);
    r0 = r1;
  }
  REQUIRE(r0 == n);
  expect_close<float>("linear_rows, 4 chunks", dy.get(st), ref.y, [&](std::size_t i) { return ref.bound[i]; });

  // A single middle slice writes its columns only.
  device_vector<float> dz(std::vector<float>(m * n, untouched));
  blas.linear_rows(dx.p, m, k, dw.p + 50 * k, db.p + 50, 20, 50, dz.p, n, cuda::activation::none, st.s);
  const auto z = dz.get(st);
  std::size_t outside_written = 0;
  std::vector<float> got_slice, ref_slice;
  std::vector<double> bound_slice;
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j) {
      if (j >= 50 && j < 70) {
        got_slice.push_back(z[i * n + j]);
        ref_slice.push_back(ref.y[i * n + j]);
        bound_slice.push_back(ref.bound[i * n + j]);
      } else {
        outside_written += z[i * n + j] != untouched;
      }
    }
  CHECK_MESSAGE(outside_written == 0, "linear_rows wrote ", outside_written, " elements outside columns [50, 70)");
  expect_close<float>("linear_rows, columns [50, 70)", got_slice, ref_slice, [&](std::size_t i) { return bound_slice[i]; });
  // Not "cached_algorithms() >= 1" (true after any call): the path each call took, said and
  // checked. The same shape again is served from the cache: no new heuristic query.
  const cuda::blaslt_stats before = blas.stats();
  MESSAGE("linear_rows GEMM paths: ", before.calls, " calls, ", before.epilogue_fused, " with the bias epilogue (",
          before.bias_realigned, " realigned), ", before.epilogue_fallback, " on the fallback; ",
          before.heuristic_queries, " heuristic queries (", before.heuristic_failures, " failed), ",
          blas.cached_algorithms(), " cached");
  CHECK(before.calls == 5);
  CHECK(before.epilogue_fused + before.epilogue_fallback == before.calls);
  blas.linear_rows(dx.p, m, k, dw.p + 50 * k, db.p + 50, 20, 50, dz.p, n, cuda::activation::none, st.s);
  st.sync();
  CHECK(blas.stats().heuristic_queries == before.heuristic_queries);
}
