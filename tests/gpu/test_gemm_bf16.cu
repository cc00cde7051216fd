// blaslt's bf16 GEMMs on tensor cores (kernels/cuda/gemm.cuh) against a host reference in double
// on the same (bf16, widened exactly) inputs, and the paths the review found broken: a bias
// pointer that is not 16-byte aligned, an m = 1 GEMM, the epilogue fallback. Each test asserts
// which path ran (blaslt::stats()), so none passes by taking a path silently.
//
// Bounds, and why (u32 = 2^-24):
//  * inputs: bf16 x and W are exact in f32 and so are their products (8 x 8 significant bits);
//  * accumulation in f32 (CUBLAS_COMPUTE_32F): a tensor-core MMA adds a block of at least 4 exact
//    products to the f32 accumulator with one rounding, which may truncate (<= 2 u32 relative,
//    Fasi et al., "Numerical behavior of NVIDIA tensor cores", 2021); with at most ceil(K/4)
//    such steps plus up to 16 more for a split-K reduction, the sum is within
//    2 (ceil(K/4) + 16) u32 Σ_k |x_k w_k| (+|b|) of the exact one. A bf16 accumulator, or inputs
//    rounded again, would miss it by ~100x at K = 1024 (2^-9 relative);
//  * GELU in the epilogue: |gelu'| <= 1.13 carries the GEMM bound (1.2x), and cuBLASLt's tanh may
//    be the hardware approximation (PTX tanh.approx.f32, ~2^-11 absolute): + 0.5 |y| 2^-10;
//  * output: f32 y, none more; bf16 y rounds once (expect_close adds one bf16 ulp = 2^-8 relative
//    of the larger of the two values, covering the half-ulp rounding of each side).
#include "device_checks.cuh"

#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <string>
#include <tuple>
#include <vector>

#include "unshard/kernels/cuda/gemm.cuh"
#include "unshard/kernels/thread/activation.hpp"

using namespace unshard;
using namespace unshard::gpu_testing;

namespace {

struct reference {
  std::vector<float> y;
  std::vector<double> bound;
};

// y = act(x · Wᵀ + b) in double from the widened values, with the bound of the header comment.
reference bf16_linear_reference(const std::vector<float>& x, std::size_t m, std::size_t k, const std::vector<float>& w,
                                const std::vector<float>* b, std::size_t n, bool gelu) {
  reference r{std::vector<float>(m * n), std::vector<double>(m * n)};
  const double steps = 2.0 * (static_cast<double>((k + 3) / 4) + 16.0) * u32;
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j) {
      double sum = b ? (*b)[j] : 0.0, abs_sum = b ? std::abs((*b)[j]) : 0.0;
      for (std::size_t l = 0; l < k; ++l) {
        const double p = static_cast<double>(x[i * k + l]) * w[j * k + l];
        sum += p;
        abs_sum += std::abs(p);
      }
      double bound = steps * abs_sum + 1e-30;
      if (gelu) {
        bound = 1.2 * bound + 0.5 * std::abs(sum) / 1024.0 + row_rel * std::max(1.0, std::abs(sum));
        sum = gelu_tanh(static_cast<float>(sum));
      }
      r.y[i * n + j] = static_cast<float>(sum);
      r.bound[i * n + j] = bound;
    }
  return r;
}

std::string stats_text(const cuda::blaslt_stats& s) {
  return "calls " + std::to_string(s.calls) + ", epilogue_fused " + std::to_string(s.epilogue_fused) +
         ", epilogue_fallback " + std::to_string(s.epilogue_fallback) + " (" + std::to_string(s.staged_f32) +
         " through f32), bias_realigned " + std::to_string(s.bias_realigned) + ", heuristic_failures " +
         std::to_string(s.heuristic_failures);
}

}  // namespace

TEST_CASE("bf16 linear (tensor cores, f32 accumulation) matches a double reference; bias bf16 or f32, GELU, y bf16 or f32") {
  test_stream st;
  device_vector<std::byte> workspace(std::size_t{32} << 20);
  cuda::blaslt blas;
  blas.set_workspace(workspace.p, workspace.n);
  std::size_t with_epilogue = 0;
  // (m, k, n): the FFN at a small width, the time embedding (m = 1, wide K), odd sizes, a tall one.
  for (const auto& [m, k, n] : {std::tuple<std::size_t, std::size_t, std::size_t>{128, 1024, 384},
                               {1, 5120, 256}, {77, 200, 136}, {300, 64, 1000}}) {
    const auto x = stored<bf16>(random_floats(m * k, 31));
    const auto w = stored<bf16>(random_floats(n * k, 32, 0.0f, 0.05f));
    const auto bf = random_floats(n, 33);
    const auto b = stored<bf16>(bf);
    const auto xw = widened(x), ww = widened(w), bw = widened(b);
    device_vector<bf16> dx(x), dw(w), db(b);
    device_vector<float> dbf(bf);
    for (const int bias : {0, 1, 2})  // none, bf16, f32
      for (const bool gelu : {false, true}) {
        const std::vector<float>* bref = bias == 1 ? &bw : bias == 2 ? &bf : nullptr;
        const reference ref = bf16_linear_reference(xw, m, k, ww, bref, n, gelu);
        const auto act = gelu ? cuda::activation::gelu_tanh : cuda::activation::none;
        const std::string what = "bf16 linear " + std::to_string(m) + "x" + std::to_string(k) + "x" + std::to_string(n) +
                                 (bias == 1 ? " +bf16 bias" : bias == 2 ? " +f32 bias" : "") + (gelu ? " gelu" : "");
        auto bound = [&](std::size_t i) { return ref.bound[i]; };
        for (const bool out_bf16 : {true, false}) {
          blas.reset_stats();
          if (out_bf16) {
            device_vector<bf16> dy(m * n);
            if (bias == 2) blas.linear(dx.p, m, k, dw.p, dbf.p, n, dy.p, act, st.s);
            else blas.linear(dx.p, m, k, dw.p, bias == 1 ? db.p : nullptr, n, dy.p, act, st.s);
            expect_close<bf16>(what + " -> bf16", dy.get(st), ref.y, bound);
          } else {
            device_vector<float> dy(m * n);
            if (bias == 2) blas.linear(dx.p, m, k, dw.p, dbf.p, n, dy.p, act, st.s);
            else blas.linear(dx.p, m, k, dw.p, bias == 1 ? db.p : nullptr, n, dy.p, act, st.s);
            expect_close<float>(what + " -> f32", dy.get(st), ref.y, bound);
          }
          const auto& s = blas.stats();
          const std::string paths = what + (out_bf16 ? " -> bf16: " : " -> f32: ") + stats_text(s);
          MESSAGE(paths);
          CHECK(s.calls == 1);
          if (bias || gelu) {
            // Exactly one of the two paths applied the epilogue's work.
            CHECK(s.epilogue_fused + s.epilogue_fallback == 1);
            with_epilogue += s.epilogue_fused;
          } else {
            CHECK(s.epilogue_fused + s.epilogue_fallback == 0);
          }
          CHECK(s.bias_realigned == 0);  // cudaMalloc'd biases are 256-byte aligned
        }
      }
  }
  // cuBLASLt on sm_80+ fuses a bf16 bias / GELU for bf16 GEMMs: if no call fused, the fused path
  // never ran and this test would be checking only the fallback.
  CHECK_MESSAGE(with_epilogue > 0, "no bf16 linear took the fused bias/GELU epilogue");
}

TEST_CASE("a bias pointer that is not 16-byte aligned is realigned into the scratch, or takes the fallback") {
  test_stream st;
  const std::size_t m = 48, k = 256, n = 200;
  const auto x = stored<bf16>(random_floats(m * k, 34));
  const auto w = stored<bf16>(random_floats(n * k, 35, 0.0f, 0.05f));
  const auto b = stored<bf16>(random_floats(n + 1, 36));
  const auto bf = random_floats(n + 1, 37);
  device_vector<bf16> dx(x), dw(w), db(b);
  device_vector<float> dbf(bf);
  const auto xw = widened(x), ww = widened(w), bw = widened(b);
  const std::vector<float> b_slice(bw.begin() + 1, bw.end());
  const std::vector<float> bf_slice(bf.begin() + 1, bf.end());
  for (const bool gelu : {false, true}) {
    const auto act = gelu ? cuda::activation::gelu_tanh : cuda::activation::none;
    for (const bool big_workspace : {true, false}) {
      // 32 MiB: the last 64 KiB hold realigned biases; 64 KiB: no scratch, so the fallback runs.
      device_vector<std::byte> workspace(big_workspace ? std::size_t{32} << 20 : std::size_t{64} << 10);
      cuda::blaslt blas;
      blas.set_workspace(workspace.p, workspace.n);
      const std::string tag = std::string(gelu ? " gelu" : "") + (big_workspace ? ", 32 MiB workspace" : ", 64 KiB workspace");
      {  // bf16 bias at db.p + 1: 2-byte aligned
        const reference ref = bf16_linear_reference(xw, m, k, ww, &b_slice, n, gelu);
        device_vector<bf16> dy(m * n);
        blas.reset_stats();
        blas.linear(dx.p, m, k, dw.p, db.p + 1, n, dy.p, act, st.s);
        expect_close<bf16>("bf16 bias at +2 bytes" + tag, dy.get(st), ref.y, [&](std::size_t i) { return ref.bound[i]; });
        const auto& s = blas.stats();
        MESSAGE("bf16 bias at +2 bytes", tag, ": ", stats_text(s));
        if (big_workspace) {
          CHECK(s.bias_realigned + s.epilogue_fallback == 1);
          CHECK(s.bias_realigned == s.epilogue_fused);  // a fused call used the realigned copy
        } else {
          CHECK(s.bias_realigned == 0);
          CHECK(s.epilogue_fallback == 1);
          // A bf16 y: the fallback rounds once, through f32 in the workspace (rounding the matmul's
          // bf16 output and again after the bias was off by up to half an ulp of the pre-bias value).
          CHECK(s.staged_f32 == 1);
        }
      }
      {  // f32 bias at dbf.p + 1 (4-byte aligned), f32 output: the f32 chunk path's `bias + r0`
        const reference ref = bf16_linear_reference(xw, m, k, ww, &bf_slice, n, gelu);
        device_vector<float> dy(m * n);
        blas.reset_stats();
        blas.linear(dx.p, m, k, dw.p, dbf.p + 1, n, dy.p, act, st.s);
        expect_close<float>("f32 bias at +4 bytes" + tag, dy.get(st), ref.y, [&](std::size_t i) { return ref.bound[i]; });
        const auto& s = blas.stats();
        MESSAGE("f32 bias at +4 bytes", tag, ": ", stats_text(s));
        CHECK(s.epilogue_fused + s.epilogue_fallback == 1);
        if (!big_workspace) CHECK(s.epilogue_fallback == 1);
      }
    }
  }
}

TEST_CASE_TEMPLATE("an m = 1 linear (the time embedding) runs, with bias and GELU, whatever the heuristic says", T, float, bf16) {
  test_stream st;
  device_vector<std::byte> workspace(std::size_t{32} << 20);
  cuda::blaslt blas;
  blas.set_workspace(workspace.p, workspace.n);
  const std::size_t m = 1, k = 256, n = 1536;
  const auto x = stored<T>(random_floats(m * k, 38));
  const auto w = stored<T>(random_floats(n * k, 39, 0.0f, 0.05f));
  const auto b = stored<T>(random_floats(n, 40));
  device_vector<T> dx(x), dw(w), db(b);
  const auto bw = widened(b);
  for (const bool gelu : {false, true}) {
    const reference ref = bf16_linear_reference(widened(x), m, k, widened(w), &bw, n, gelu);
    device_vector<float> dy(m * n);
    blas.reset_stats();
    blas.linear(dx.p, m, k, dw.p, db.p, n, dy.p, gelu ? cuda::activation::gelu_tanh : cuda::activation::none, st.s);
    expect_close<float>(std::string("m=1 linear ") + storage_name<T>() + (gelu ? " gelu" : ""), dy.get(st), ref.y,
                        [&](std::size_t i) { return ref.bound[i]; });
    const auto& s = blas.stats();
    MESSAGE("m=1 ", std::string(storage_name<T>()), std::string(gelu ? " gelu: " : ": "), stats_text(s));
    CHECK(s.epilogue_fused + s.epilogue_fallback == 1);
    if constexpr (std::is_same_v<T, float>) CHECK(s.activation_kernel == (gelu ? 1u : 0u));  // f32: exact GELU
  }
}

TEST_CASE("the f32 linear is a true f32 GEMM: no TF32") {
  // x = 1 + 2^-12 is exact in f32 and needs 13 significant bits; TF32 keeps 11 (10 stored), so a
  // TF32 GEMM returns 1 (or 1 + 2^-10) where an f32 GEMM returns x exactly, for every k.
  test_stream st;
  device_vector<std::byte> workspace(std::size_t{4} << 20);
  cuda::blaslt blas;
  blas.set_workspace(workspace.p, workspace.n);
  const std::size_t m = 64, k = 128, n = 64;
  const float v = 1.0f + std::ldexp(1.0f, -12);
  std::vector<float> x(m * k, 0.0f), w(n * k, 0.0f);
  for (std::size_t i = 0; i < m; ++i) x[i * k + i % k] = v;
  for (std::size_t j = 0; j < n; ++j) w[j * k + j % k] = 1.0f;
  device_vector<float> dx(x), dw(w), dy(m * n);
  blas.linear(dx.p, m, k, dw.p, static_cast<const float*>(nullptr), n, dy.p, cuda::activation::none, st.s);
  const auto y = dy.get(st);
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j) wrong += y[i * n + j] != (i % k == j % k ? v : 0.0f);
  CHECK_MESSAGE(wrong == 0, wrong, " outputs differ from the exact f32 products (TF32 in use?)");
}

TEST_CASE("a bf16 output whose bias cannot fuse, without a workspace to stage f32 in, is an error naming the need") {
  test_stream st;
  const std::size_t m = 8, k = 64, n = 24;
  device_vector<bf16> dx(stored<bf16>(random_floats(m * k, 38))), dw(stored<bf16>(random_floats(n * k, 39)));
  device_vector<bf16> db(stored<bf16>(random_floats(n + 1, 40))), dy(m * n);
  cuda::blaslt blas;  // no workspace: no realigned bias, no f32 staging
  std::string message;
  try {
    blas.linear(dx.p, m, k, dw.p, db.p + 1, n, dy.p, cuda::activation::none, st.s);
  } catch (const error& e) {
    message = e.what();
  }
  CHECK_MESSAGE(message.find("through f32 in the workspace, which needs at least 32 bytes (0 given)") !=
                    std::string::npos,
                "got: '", message, "'");
  // An f32 output needs no staging: the same call into f32 takes the fallback and succeeds.
  device_vector<float> dyf(m * n);
  blas.reset_stats();
  blas.linear(dx.p, m, k, dw.p, db.p + 1, n, dyf.p, cuda::activation::none, st.s);
  st.sync();
  CHECK(blas.stats().epilogue_fallback == 1);
}
