// Every CUDA kernel of include/unshard/kernels/cuda against the host implementation it shares its
// math with, on random data, for f32 storage and bf16 storage (f32 compute), at sizes that are
// not multiples of any block or tile. Built twice: for the GPU (tests/gpu.cmake skips it without
// one) and for the SIMT emulator on the host (tests/simt.cmake). The GEMMs, which are cuBLASLt's,
// are in test_gemm_linear.cu.
//
// Tolerances, and why (u32 = 2^-24, the f32 unit roundoff):
//  * f32 row and elementwise kernels: 1e-6 · max(1, max|ref|). They run the same UNSHARD_HD
//    code as the host; what may differ is the order of the double sums (1e-16 relative), nvcc's
//    contraction of a*b + c into one FMA (half an ulp of the product), and the device's
//    expf/tanhf/cos (<= 2 ulp). All of that is a few f32 ulps, i.e. < 1e-6 of the largest value.
//  * bf16 storage: the device and the host compute the same f32 value up to the above and each
//    rounds it to bf16; two f32 values that close round to the same bf16 or to neighbours, so one
//    bf16 ulp (2^-8 .. 2^-7 relative) of the reference plus the f32 bound.
//  * attention: a reduction over n_keys in another order (tiles, online softmax rescaling):
//    1e-5 · max(1, max|ref|), docs/conventions.md's f32 rule; the observed error is ~1e-6.
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "unshard/backend/cuda/check.cuh"
#include "unshard/kernels/cuda/attention.cuh"
#include "unshard/kernels/cuda/elementwise.cuh"
#include "unshard/kernels/cuda/fp8.cuh"
#include "unshard/kernels/cuda/norm.cuh"
#include "unshard/kernels/host/attention.hpp"
#include "unshard/kernels/host/gemm.hpp"
#include "unshard/kernels/thread/fp8_activation.hpp"
#include "unshard/kernels/thread/activation.hpp"
#include "unshard/kernels/thread/embedding.hpp"
#include "unshard/kernels/thread/norm.hpp"
#include "unshard/kernels/thread/patch.hpp"
#include "unshard/kernels/thread/residual.hpp"
#include "unshard/kernels/thread/rope.hpp"

#include "device_checks.cuh"

using namespace unshard;
using namespace unshard::gpu_testing;

TEST_CASE_TEMPLATE("layer_norm_modulate matches layer_norm_modulate_row", T, float, bf16) {
  test_stream st;
  for (const auto& [rows, n] : {std::pair<std::size_t, std::size_t>{37, 200}, {5, 5120}, {300, 129}}) {
    const auto x = stored<T>(random_floats(rows * n, 1, 0.3f, 2.0f));
    const auto shift = random_floats(n, 2), scale = random_floats(n, 3, 0.0f, 0.5f);
    device_vector<T> dx(x), dy(rows * n);
    device_vector<float> dshift(shift), dscale(scale);
    cuda::layer_norm_modulate(dx.p, rows, n, 1e-6, dshift.p, dscale.p, dy.p, st.s);
    std::vector<float> ref(rows * n);
    const auto xf = widened(x);
    for (std::size_t r = 0; r < rows; ++r)
      layer_norm_modulate_row(xf.data() + r * n, n, 1e-6, shift.data(), scale.data(), ref.data() + r * n);
    expect_close_rel(std::string("layer_norm_modulate ") + storage_name<T>() + " " + std::to_string(rows) + "x" +
                         std::to_string(n),
                     dy.get(st), ref, row_rel);
  }
}

TEST_CASE_TEMPLATE("layer_norm_affine matches layer_norm_row with weight and bias", T, float, bf16) {
  test_stream st;
  const std::size_t rows = 41, n = 384;
  const auto x = random_floats(rows * n, 4, -0.5f, 1.5f);
  const auto w = stored<T>(random_floats(n, 5, 1.0f, 0.2f)), b = stored<T>(random_floats(n, 6, 0.0f, 0.2f));
  device_vector<float> dx(x), dy(rows * n);
  device_vector<T> dw(w), db(b);
  cuda::layer_norm_affine(dx.p, rows, n, 1e-6, dw.p, db.p, dy.p, st.s);
  std::vector<float> ref(rows * n);
  for (std::size_t r = 0; r < rows; ++r) layer_norm_row(x.data() + r * n, n, 1e-6, w.data(), b.data(), ref.data() + r * n);
  expect_close_rel(std::string("layer_norm_affine, ") + storage_name<T>() + " weights", dy.get(st), ref, row_rel);
}

TEST_CASE_TEMPLATE("rms_norm_rope matches rms_norm_row then rope_rotate_row per head", T, float, bf16) {
  test_stream st;
  // (rows, heads, head_dim): the tiny vectors' d = 32, Wan's 128, and a head of 11 pairs.
  for (const auto& [rows, heads, d] :
       {std::tuple<std::size_t, std::size_t, std::size_t>{48, 4, 32}, {33, 3, 128}, {19, 5, 22}}) {
    const std::size_t n = heads * d, pairs = d / 2;
    const auto x = stored<T>(random_floats(rows * n, 7, 0.1f, 1.3f));
    const auto w = stored<T>(random_floats(n, 8, 1.0f, 0.3f));
    std::vector<float> cos(rows * pairs), sin(rows * pairs);
    for (std::size_t t = 0; t < rows; ++t)
      rope_table_row(t / 6, (t / 2) % 3, t % 2, pairs, cos.data() + t * pairs, sin.data() + t * pairs);
    device_vector<float> dcos(cos), dsin(sin);
    device_vector<T> dw(w);
    for (const bool norm : {true, false})
      for (const bool rope : {true, false}) {
        if (!norm && !rope) continue;
        device_vector<T> dx(x);
        const T* weight = norm ? dw.p : nullptr;
        cuda::rms_norm_rope(dx.p, rows, n, d, 1e-6, weight, rope ? dcos.p : nullptr, rope ? dsin.p : nullptr, st.s);
        // The host path: RMSNorm over the full row, then each head rotated (models/wan/block.hpp).
        std::vector<float> ref = widened(x);
        for (std::size_t r = 0; r < rows; ++r) {
          float* row = ref.data() + r * n;
          if (norm) rms_norm_row(row, n, 1e-6, w.data(), row);
          if (rope)
            for (std::size_t h = 0; h < heads; ++h) rope_rotate_row(row + h * d, cos.data() + r * pairs, sin.data() + r * pairs, pairs);
        }
        expect_close_rel(std::string("rms_norm_rope ") + storage_name<T>() + " d=" + std::to_string(d) +
                             (norm ? " norm" : "") + (rope ? " rope" : ""),
                         dx.get(st), ref, row_rel);
      }
  }
}

TEST_CASE("rope_table matches rope_table_row") {
  test_stream st;
  for (const auto& [gf, gh, gw, pairs] : {std::tuple<std::size_t, std::size_t, std::size_t, std::size_t>{3, 4, 4, 16},
                                         {21, 45, 80, 64}}) {  // Wan 14B at 720p: d = 128
    const std::size_t tokens = gf * gh * gw;
    device_vector<float> dcos(tokens * pairs), dsin(tokens * pairs);
    cuda::rope_table(gf, gh, gw, pairs, dcos.p, dsin.p, st.s);
    std::vector<float> cos(tokens * pairs), sin(tokens * pairs);
    for (std::size_t t = 0; t < tokens; ++t)
      rope_table_row(t / (gh * gw), (t / gw) % gh, t % gw, pairs, cos.data() + t * pairs, sin.data() + t * pairs);
    expect_close_rel("rope_table cos " + std::to_string(tokens) + " tokens", dcos.get(st), cos, row_rel);
    expect_close_rel("rope_table sin " + std::to_string(tokens) + " tokens", dsin.get(st), sin, row_rel);
  }
}

TEST_CASE_TEMPLATE("bias_gelu, bias_activation, silu, gated_residual, add_broadcast, convert match the thread functions", T, float, bf16) {
  test_stream st;
  const std::size_t rows = 29, cols = 1000, n = rows * cols;
  const auto y = stored<T>(random_floats(n, 9, 0.0f, 2.0f));
  const auto bias = stored<T>(random_floats(cols, 10));
  const auto yf = widened(y), bf = widened(bias);
  {
    device_vector<T> dy(y), db(bias);
    cuda::bias_gelu(dy.p, rows, cols, db.p, st.s);
    std::vector<float> ref(n);
    for (std::size_t i = 0; i < n; ++i) ref[i] = gelu_tanh(yf[i] + bf[i % cols]);
    expect_close_rel(std::string("bias_gelu ") + storage_name<T>(), dy.get(st), ref, row_rel);
  }
  for (const bool gelu : {true, false}) {  // strided: columns [3, 3 + 500) of each row
    device_vector<T> dy(y), db(bias);
    cuda::bias_activation(dy.p + 3, rows, 500, cols, db.p, gelu, st.s);
    std::vector<float> ref = yf;
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t c = 0; c < 500; ++c) {
        const float v = yf[r * cols + 3 + c] + bf[c];
        ref[r * cols + 3 + c] = gelu ? gelu_tanh(v) : v;
      }
    expect_close_rel(std::string("bias_activation (strided) ") + (gelu ? "gelu " : "identity ") + storage_name<T>(),
                     dy.get(st), ref, row_rel);
  }
  {
    device_vector<T> dx(y), dout(n);
    cuda::silu(dx.p, n, dout.p, st.s);
    std::vector<float> ref(n);
    for (std::size_t i = 0; i < n; ++i) ref[i] = silu(yf[i]);
    expect_close_rel(std::string("silu ") + storage_name<T>(), dout.get(st), ref, row_rel);
  }
  const auto x = stored<T>(random_floats(n, 11, 0.5f, 3.0f));
  const auto gate = random_floats(cols, 12);
  for (const bool gated : {true, false}) {
    device_vector<T> dx(x), dy(y);
    device_vector<float> dg(gate);
    cuda::gated_residual(dx.p, dy.p, gated ? dg.p : nullptr, rows, cols, st.s);
    std::vector<float> ref = widened(x);
    for (std::size_t r = 0; r < rows; ++r) {
      if (gated) gated_residual_row(ref.data() + r * cols, yf.data() + r * cols, gate.data(), cols);
      else residual_row(ref.data() + r * cols, yf.data() + r * cols, cols);
    }
    expect_close_rel(std::string(gated ? "gated_residual " : "residual ") + storage_name<T>(), dx.get(st), ref, row_rel);
  }
  {
    const auto e0 = random_floats(cols, 13);
    device_vector<T> dm(y);
    device_vector<float> de(e0), dout(n);
    cuda::add_broadcast(dm.p, de.p, n, cols, dout.p, st.s);
    std::vector<float> ref(n);
    for (std::size_t i = 0; i < n; ++i) ref[i] = yf[i] + e0[i % cols];
    expect_close_rel(std::string("add_broadcast ") + storage_name<T>(), dout.get(st), ref, row_rel);
  }
  {
    device_vector<T> src(y);
    device_vector<float> dst(n);
    cuda::convert(src.p, n, dst.p, st.s);
    const auto got = dst.get(st);
    CHECK_MESSAGE(got == yf, "convert to f32 must be exact");
    device_vector<bf16> back(n);
    cuda::convert(dst.p, n, back.p, st.s);
    const auto rounded = back.get(st);
    std::size_t differ = 0;
    for (std::size_t i = 0; i < n; ++i) differ += rounded[i].bits != bf16::from_float(yf[i]).bits;
    CHECK_MESSAGE(differ == 0, "f32 -> bf16 on the device must round as bf16::from_float does");
  }
}

TEST_CASE("patchify, unpatchify and time_sinusoid match the thread functions") {
  test_stream st;
  const std::size_t C = 16, F = 5, H = 9, W = 13;  // trailing rows/columns/frames dropped by the grid
  const patch_grid g{1, 2, 2, F / 1, H / 2, W / 2};
  const std::size_t tokens = g.gf * g.gh * g.gw, len = C * g.pt * g.ph * g.pw;
  const auto x = random_floats(C * F * H * W, 14);
  device_vector<float> dx(x), dp(tokens * len);
  cuda::patchify(dx.p, C, F, H, W, g, dp.p, st.s);
  std::vector<float> ref(tokens * len);
  for (std::size_t s = 0; s < tokens; ++s) patchify_token(x.data(), C, F, H, W, g, s, ref.data() + s * len);
  CHECK_MESSAGE(dp.get(st) == ref, "patchify is a copy: bit-identical");

  const auto vecs = random_floats(tokens * len, 15);
  device_vector<float> dv(vecs), dout(C * g.gf * g.pt * g.gh * g.ph * g.gw * g.pw);
  cuda::unpatchify(dv.p, C, g, dout.p, st.s);
  std::vector<float> out_ref(dout.n);
  for (std::size_t s = 0; s < tokens; ++s) unpatchify_token(vecs.data() + s * len, C, g, s, out_ref.data());
  CHECK_MESSAGE(dout.get(st) == out_ref, "unpatchify is a copy: bit-identical");

  for (const float t : {0.0f, 1.0f, 500.0f, 999.0f}) {
    const std::size_t dim = 256;
    device_vector<float> dt(std::vector<float>{t}), ds(dim);
    cuda::time_sinusoid(dt.p, dim, ds.p, st.s);
    std::vector<float> sref(dim);
    for (std::size_t i = 0; i < dim; ++i) sref[i] = time_sinusoid(static_cast<double>(t), i, dim);
    expect_close_rel("time_sinusoid t=" + std::to_string(t), ds.get(st), sref, row_rel);
  }
}

TEST_CASE_TEMPLATE("flash_attention matches multi_head_attention", T, float, bf16) {
  test_stream st;
  // (queries, keys, heads, d): self-attention, cross-attention with few keys, the widths each
  // compiled tile width serves (64, 128, 256) and ones that are not multiples of 4 or 16.
  for (const auto& [nq, nk, heads, d] : {std::tuple<std::size_t, std::size_t, std::size_t, std::size_t>{48, 48, 4, 32},
                                        {48, 16, 4, 32},
                                        {200, 77, 3, 128},
                                        {130, 300, 2, 64},
                                        {65, 33, 2, 80},
                                        {70, 40, 1, 256},
                                        {31, 5, 3, 6}}) {
    const std::size_t ld = heads * d;
    const auto q = stored<T>(random_floats(nq * ld, 16, 0.0f, 1.5f));
    const auto k = stored<T>(random_floats(nk * ld, 17, 0.0f, 1.5f));
    const auto v = stored<T>(random_floats(nk * ld, 18));
    device_vector<T> dq(q), dk(k), dv(v), dout(nq * ld);
    cuda::flash_attention(dq.p, nq, dk.p, dv.p, nk, heads, d, dout.p, st.s);
    const auto qf = widened(q), kf = widened(k), vf = widened(v);
    std::vector<float> ref(nq * ld), scores(nk);
    multi_head_attention(qf.data(), nq, kf.data(), vf.data(), nk, heads, d, scores.data(), ref.data());
    expect_close_rel(std::string("flash_attention ") + storage_name<T>() + " q=" + std::to_string(nq) +
                         " k=" + std::to_string(nk) + " h=" + std::to_string(heads) + " d=" + std::to_string(d),
                     dout.get(st), ref, 1e-5);
  }
}

// The per-tensor activation quantization of the fp8 GEMMs (the official path): the amax over the
// whole tensor (a grid of blocks, warp shuffles, then atomicMax), the scale and every code, bit for
// bit as the host (kernels/host/gemm.hpp), on the 16-wide vector path and the element one. The
// largest |x| sits late in the tensor, so a grid that missed a block or a warp would get another
// scale.
TEST_CASE("quantize_activations_fp8 gives the host's scale and codes bit for bit") {
  test_stream st;
  // (n, offset): the vector path (n % 16 == 0, aligned), an unaligned start and an odd n (element
  // path), a tensor larger than the amax grid (1024 blocks of 256) so it strides, and all zeros.
  for (const auto& [n, offset, zeros] : {std::tuple<std::size_t, std::size_t, bool>{4096, 0, false},
                                         {4096, 1, false},
                                         {1001, 0, false},
                                         {300000, 0, false},
                                         {64, 0, true}}) {
    std::vector<float> x = zeros ? std::vector<float>(n + offset, 0.0f) : random_floats(n + offset, 91, 0.0f, 3.0f);
    if (!zeros) x[offset + n - 3] = -57.25f;  // the amax, in the last block
    device_vector<float> dx(x);
    device_vector<std::uint32_t> amax(std::size_t{1});
    device_vector<float> scale(std::size_t{1});
    device_vector<std::uint8_t> codes(n);
    cuda::quantize_activations_fp8(dx.p + offset, n, amax.p, scale.p, codes.p, st.s);
    std::vector<f8e4m3> want(n);
    const float want_scale = quantize_activations_per_tensor(x.data() + offset, n, want.data());
    const std::vector<std::uint8_t> got = codes.get(st);
    const float got_scale = scale.get(st)[0];
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < n; ++i) wrong += got[i] != want[i].bits;
    CAPTURE(n);
    CAPTURE(offset);
    CHECK_MESSAGE(float_bits(got_scale) == float_bits(want_scale), "scale ", got_scale, ", host ", want_scale);
    CHECK_MESSAGE(wrong == 0, wrong, " of ", n, " codes differ from the host's");
  }
}

// The epilogue after the fp8 GEMM: y = act(y * col_scale + b) over n columns of rows of ldy, with
// one or per-column scales, with and without a bias and GELU; the padding columns [n, ldy) untouched.
// Product and sum round separately on both sides: bit for bit without GELU; with it, the device's
// tanhf may differ from the host's by ulps (row_rel, as the other elementwise kernels).
TEST_CASE("fp8_epilogue matches the host's scale, bias and GELU, and leaves the row padding alone") {
  test_stream st;
  const std::size_t m = 7, n = 300, ldy = 320;
  const std::vector<float> y0 = random_floats(m * ldy, 92, 0.0f, 20.0f);
  const std::vector<float> cs = random_floats(n, 93, 0.01f, 0.005f), b = random_floats(n, 94);
  device_vector<float> dcs(cs), db(b);
  for (const bool per_column : {true, false})
    for (const bool bias : {true, false})
      for (const bool gelu : {false, true}) {
        device_vector<float> dy(y0);
        cuda::fp8_epilogue(dy.p, m, n, ldy, dcs.p, per_column ? n : 1, bias ? db.p : nullptr, gelu, st.s);
        std::vector<float> ref = y0;
        for (std::size_t r = 0; r < m; ++r)
          for (std::size_t j = 0; j < n; ++j) {
            float v = ref[r * ldy + j];
            v = v * cs[per_column ? j : 0];
            if (bias) v = v + b[j];
            ref[r * ldy + j] = gelu ? gelu_tanh(v) : v;
          }
        const std::vector<float> got = dy.get(st);
        const std::string what = std::string("fp8_epilogue") + (per_column ? " per-column" : " one scale") +
                                 (bias ? " +bias" : "") + (gelu ? " gelu" : "");
        std::size_t padding_written = 0, differ = 0;
        for (std::size_t r = 0; r < m; ++r)
          for (std::size_t j = 0; j < ldy; ++j) {
            const std::size_t i = r * ldy + j;
            if (j >= n) padding_written += float_bits(got[i]) != float_bits(y0[i]);
            else differ += float_bits(got[i]) != float_bits(ref[i]);
          }
        CHECK_MESSAGE(padding_written == 0, what, ": ", padding_written, " padding elements written");
        if (gelu) expect_close_rel(what, got, ref, row_rel);
        else CHECK_MESSAGE(differ == 0, what, ": ", differ, " elements differ from the host (expected bit-identical)");
      }
}
