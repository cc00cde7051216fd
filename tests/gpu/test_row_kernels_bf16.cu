// The ops layer's row kernels (kernels/cuda/norm.cuh, elementwise.cuh: layer_norm_modulate_rows,
// rms_norm_rows, rms_norm_rope_rows, rope_rows, gated_residual_rows, residual_rows,
// gelu_tanh_inplace, silu_inplace, write_rows) against the host row functions
// (kernels/thread/*.hpp), for bf16 and f32 storage, on the vectorised path (widths that are
// multiples of 8, aligned pointers) and the scalar one (odd widths, an unaligned modulation
// stride), with one and several modulation rows.
//
// Bounds, and why:
//  * f32 storage: the kernels keep the host's double statistics and run the same f32/double
//    formulas; only summation order (~1e-16) and the device's expf/tanhf (<= 2 ulp) differ:
//    row_rel = 1e-6 of max(1, max|ref|), as test_kernels.cu.
//  * bf16 storage, norms: the statistics are f32 (as torch's bf16 norms) where the host's are
//    double. A thread's sequential f32 sum of <= 64 values, 5 shuffle levels and <= 32 warp
//    partials give <= ~100 u32 relative error in Σx and Σ(x-mean)²; through (x - mean) rstd and the
//    modulation (|1 + scale| <= ~3) that is < 1e-5 of max(1, max|ref|). We allow 1e-4, still 40x
//    below the bf16 output's own rounding, which expect_close adds (one bf16 ulp of the value).
//  * bf16 storage, rope and elementwise: the same f32 math as the host's on the same widened
//    inputs (rope in f32 where the host uses double: a few u32), then one rounding to bf16:
//    row_rel + one bf16 ulp.
//  * write_rows: a copy, bit-identical.
#include "device_checks.cuh"

#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "unshard/kernels/cuda/elementwise.cuh"
#include "unshard/kernels/cuda/norm.cuh"
#include "unshard/kernels/thread/activation.hpp"
#include "unshard/kernels/thread/norm.hpp"
#include "unshard/kernels/thread/residual.hpp"
#include "unshard/kernels/thread/rope.hpp"

using namespace unshard;
using namespace unshard::gpu_testing;

namespace {

template <class T>
constexpr double norm_rel = std::is_same_v<T, float> ? row_rel : 1e-4;

}  // namespace

TEST_CASE_TEMPLATE("layer_norm_modulate_rows matches layer_norm_modulate_row, one or per-frame modulation rows", T, bf16,
                   float) {
  test_stream st;
  // (rows, d, mod_stride, tokens_per_mod_row): Wan's one modulation row at width 5120 (vector
  // path, 2 vectors per thread), per-frame rows (3 tokens each) with a padded stride, an odd
  // width (bf16: scalar path), an unaligned stride (scalar path), the FFN width 13824 (bf16: 4
  // vectors per thread), and 20000 (bf16: 8 vectors per thread; f32: past the register path, the
  // scalar kernel).
  for (const auto& [rows, d, stride, per] :
       {std::tuple<std::size_t, std::size_t, std::size_t, std::size_t>{9, 5120, 5120, 0},
        {12, 256, 264, 3},
        {7, 200, 200, 0},
        {8, 1024, 1025, 2},
        {3, 13824, 13824, 0},
        {2, 20000, 20000, 1}}) {
    const std::size_t mod_rows = per == 0 ? 1 : (rows + per - 1) / per;
    const auto x = stored<T>(random_floats(rows * d, 61, 0.3f, 2.0f));
    const auto shift = random_floats(mod_rows * stride, 62), scale = random_floats(mod_rows * stride, 63, 0.0f, 0.5f);
    device_vector<T> dx(x), dy(rows * d);
    device_vector<float> dshift(shift), dscale(scale);
    cuda::layer_norm_modulate_rows(dx.p, dy.p, rows, d, 1e-6, dshift.p, dscale.p, stride, per, st.s);
    const auto xf = widened(x);
    std::vector<float> ref(rows * d);
    for (std::size_t r = 0; r < rows; ++r) {
      const std::size_t m = per == 0 ? 0 : r / per;
      layer_norm_modulate_row(xf.data() + r * d, d, 1e-6, shift.data() + m * stride, scale.data() + m * stride,
                              ref.data() + r * d);
    }
    const std::string what = std::string("layer_norm_modulate_rows ") + storage_name<T>() + " " + std::to_string(rows) +
                             "x" + std::to_string(d) + " stride " + std::to_string(stride) + " per " + std::to_string(per);
    expect_close_rel(what, dy.get(st), ref, norm_rel<T>);
    // In place (y == x) gives the same.
    cuda::layer_norm_modulate_rows(dx.p, dx.p, rows, d, 1e-6, dshift.p, dscale.p, stride, per, st.s);
    expect_close_rel(what + " in place", dx.get(st), ref, norm_rel<T>);
  }
}

TEST_CASE_TEMPLATE("rms_norm_rows, rms_norm_rope_rows and rope_rows match rms_norm_row and rope_rotate_row", T, bf16, float) {
  test_stream st;
  // (rows, heads, head_dim): Wan's d = 128 (vector path), the tiny vectors' 32, 11 pairs (scalar).
  for (const auto& [rows, heads, hd] :
       {std::tuple<std::size_t, std::size_t, std::size_t>{33, 40, 128}, {48, 4, 32}, {19, 5, 22}}) {
    const std::size_t d = heads * hd, pairs = hd / 2;
    const auto x = stored<T>(random_floats(rows * d, 64, 0.1f, 1.3f));
    const auto wf = random_floats(d, 65, 1.0f, 0.3f);
    const auto wt = stored<T>(wf);
    std::vector<float> cos(rows * pairs), sin(rows * pairs);
    for (std::size_t t = 0; t < rows; ++t)
      rope_table_row(t / 6, (t / 2) % 3, t % 2, pairs, cos.data() + t * pairs, sin.data() + t * pairs);
    device_vector<float> dcos(cos), dsin(sin), dwf(wf);
    device_vector<T> dwt(wt);
    const auto xf = widened(x);
    const auto wtf = widened(wt);
    const std::string shape = std::string(storage_name<T>()) + " " + std::to_string(rows) + "x" + std::to_string(heads) +
                              "x" + std::to_string(hd);
    for (const bool weight_f32 : {false, true}) {
      const auto& wref = weight_f32 ? wf : wtf;
      auto reference = [&](bool norm, bool rope) {
        std::vector<float> ref = xf;
        for (std::size_t r = 0; r < rows; ++r) {
          float* row = ref.data() + r * d;
          if (norm) rms_norm_row(row, d, 1e-6, wref.data(), row);
          if (rope)
            for (std::size_t h = 0; h < heads; ++h)
              rope_rotate_row(row + h * hd, cos.data() + r * pairs, sin.data() + r * pairs, pairs);
        }
        return ref;
      };
      const std::string wname = weight_f32 ? " f32 weight" : " storage weight";
      {
        device_vector<T> dx(x);
        if (weight_f32) cuda::rms_norm_rows(dx.p, rows, d, 1e-6, dwf.p, st.s);
        else cuda::rms_norm_rows(dx.p, rows, d, 1e-6, dwt.p, st.s);
        expect_close_rel("rms_norm_rows " + shape + wname, dx.get(st), reference(true, false), norm_rel<T>);
      }
      {
        device_vector<T> dx(x);
        if (weight_f32) cuda::rms_norm_rope_rows(dx.p, rows, heads, hd, 1e-6, dwf.p, dcos.p, dsin.p, pairs, st.s);
        else cuda::rms_norm_rope_rows(dx.p, rows, heads, hd, 1e-6, dwt.p, dcos.p, dsin.p, pairs, st.s);
        expect_close_rel("rms_norm_rope_rows " + shape + wname, dx.get(st), reference(true, true), norm_rel<T>);
      }
    }
    device_vector<T> dx(x);
    cuda::rope_rows(dx.p, rows, heads, hd, dcos.p, dsin.p, pairs, st.s);
    std::vector<float> ref = xf;
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t h = 0; h < heads; ++h)
        rope_rotate_row(ref.data() + r * d + h * hd, cos.data() + r * pairs, sin.data() + r * pairs, pairs);
    expect_close_rel("rope_rows " + shape, dx.get(st), ref, row_rel);
  }
  test_stream s2;
  device_vector<T> dx(std::size_t{64});
  device_vector<float> dcs(std::size_t{64});
  CHECK_THROWS(cuda::rope_rows(dx.p, 2, 2, 16, dcs.p, dcs.p, 7, s2.s));  // pairs != head_dim / 2
  CHECK_THROWS(cuda::rms_norm_rope_rows(dx.p, 2, 2, 15, 1e-6, dcs.p, dcs.p, dcs.p, 7, s2.s));  // odd head_dim
}

TEST_CASE_TEMPLATE("gated_residual_rows, residual_rows, gelu_tanh_inplace, silu_inplace, write_rows match the host", T, bf16,
                   float) {
  test_stream st;
  for (const auto& [rows, d, stride, per] : {std::tuple<std::size_t, std::size_t, std::size_t, std::size_t>{29, 1024, 1024, 0},
                                            {12, 5120, 5128, 4},
                                            {7, 203, 203, 0},
                                            {6, 64, 65, 3}}) {
    const std::size_t n = rows * d, mod_rows = per == 0 ? 1 : (rows + per - 1) / per;
    const auto x = stored<T>(random_floats(n, 66, 0.5f, 3.0f));
    const auto y = stored<T>(random_floats(n, 67, 0.0f, 2.0f));
    const auto gate = random_floats(mod_rows * stride, 68);
    const auto xf = widened(x), yf = widened(y);
    const std::string shape = std::string(storage_name<T>()) + " " + std::to_string(rows) + "x" + std::to_string(d) +
                              " stride " + std::to_string(stride) + " per " + std::to_string(per);
    {
      device_vector<T> dx(x), dy(y);
      device_vector<float> dg(gate);
      cuda::gated_residual_rows(dx.p, static_cast<const T*>(dy.p), dg.p, stride, per, rows, d, st.s);
      std::vector<float> ref = xf;
      for (std::size_t r = 0; r < rows; ++r)
        gated_residual_row(ref.data() + r * d, yf.data() + r * d, gate.data() + (per == 0 ? 0 : r / per) * stride, d);
      expect_close_rel("gated_residual_rows " + shape, dx.get(st), ref, row_rel);
    }
    {
      device_vector<T> dx(x), dy(y);
      cuda::residual_rows(dx.p, static_cast<const T*>(dy.p), n, st.s);
      std::vector<float> ref = xf;
      residual_row(ref.data(), yf.data(), n);
      expect_close_rel("residual_rows " + shape, dx.get(st), ref, row_rel);
    }
    {
      device_vector<T> dy(y);
      cuda::gelu_tanh_inplace(dy.p, n, st.s);
      std::vector<float> ref(n);
      for (std::size_t i = 0; i < n; ++i) ref[i] = gelu_tanh(yf[i]);
      expect_close_rel("gelu_tanh_inplace " + shape, dy.get(st), ref, row_rel);
    }
    {
      device_vector<T> dy(y);
      cuda::silu_inplace(dy.p + 1, n - 1, st.s);  // unaligned start: the scalar path
      std::vector<float> ref = yf;
      for (std::size_t i = 1; i < n; ++i) ref[i] = silu(yf[i]);
      expect_close_rel("silu_inplace (from element 1) " + shape, dy.get(st), ref, row_rel);
    }
    {  // a KV-cache write: rows of y into columns [3, 3 + d/2) of a wider cache, rows from row 2
      const std::size_t ld = d + 8, cols = d / 2;
      device_vector<T> dy(y), cache(std::vector<T>((rows + 2) * ld, cuda::from_f32<T>(-7.0f)));
      cuda::write_rows(cache.p + 2 * ld + 3, ld, static_cast<const T*>(dy.p), d, rows, cols, st.s);
      const auto got = widened(cache.get(st));
      std::size_t wrong = 0;
      for (std::size_t r = 0; r < rows + 2; ++r)
        for (std::size_t c = 0; c < ld; ++c) {
          const bool inside = r >= 2 && c >= 3 && c < 3 + cols;
          wrong += got[r * ld + c] != (inside ? yf[(r - 2) * d + c - 3] : -7.0f);
        }
      CHECK_MESSAGE(wrong == 0, "write_rows ", shape, ": ", wrong, " elements wrong");
    }
  }
}
