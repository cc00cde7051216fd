// The op set on the device (ops/cuda_ops.cuh) against the host's (ops/host_ops.hpp), op by op, on
// random data at sizes that are multiples of no tile: the forward the S2V model runs on both is the
// same code, so these are the only places device and host can differ. Needs a device (skipped, 77,
// without one). Also built for the SIMT emulator on the host (tests/simt.cmake), where the GEMMs run
// on its host reading of cuBLASLt (tests/support/simt_cublaslt.cpp).
//
// Bounds (u32 = 2^-24), per output element, relative to max(1, max|host|) of the tensor:
//  * moves and index math (patchify, unpatchify, conv inputs, copies, broadcasts, uploads, host
//    tables): bit-identical;
//  * pointwise ops through the same UNSHARD_HD function: 1e-6 (nvcc may contract a*b + c into an FMA
//    that g++ rounds twice: one ulp, ~6e-8);
//  * row reductions (norms) and the double-precision sums (mix_layers, sinusoids): 1e-6;
//  * attention: 1e-5 (another summation order, the flash kernel's online softmax rescaling);
//  * linear: the GEMM bound of device_checks.cuh (8 sqrt(K) u32 per |term| sum: f32 accumulation in
//    another order), with bf16 weights widened exactly on both sides.
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "unshard/kernels/cuda/fp8.cuh"
#include "unshard/kernels/cuda/gemm.cuh"
#include "unshard/kernels/host/gemm.hpp"
#include "unshard/ops/cuda_ops.cuh"
#include "unshard/ops/host_ops.hpp"
#include "unshard/quant/fp8.hpp"

#include "device_checks.cuh"

using namespace unshard;
using namespace unshard::gpu_testing;

namespace {

// A device ops context with scratch for the linear tests, on its own stream.
struct device_ops {
  test_stream stream;
  device_vector<float> widen{std::size_t{1} << 20};
  device_vector<std::byte> workspace{std::size_t{32} << 20};
  cuda_ops ops{stream.s, widen.p, widen.n, workspace.p, workspace.n};
};

std::vector<float> host_copy(const device_vector<float>& d, const device_ops& o) { return d.get(o.stream); }

void expect_equal(const char* what, const std::vector<float>& got, const std::vector<float>& want) {
  REQUIRE(got.size() == want.size());
  std::size_t bad = 0;
  for (std::size_t i = 0; i < got.size(); ++i) bad += got[i] != want[i] && !(std::isnan(got[i]) && std::isnan(want[i]));
  CHECK_MESSAGE(bad == 0, what, ": ", bad, " of ", got.size(), " values differ (expected bit-identical)");
}

tensor_view view_of(std::vector<float>& v, shape d) { return tensor_view(v.data(), dtype::f32, d); }
tensor_view view_of(device_vector<float>& v, shape d) { return tensor_view(v.p, dtype::f32, d); }



}  // namespace

// (A named namespace: nvcc warns about the concept probe's instantiation of an internal template.)
namespace s2v_ops_test {
// Parameters whose rows stream in chunks of 5 (a chunk's bias slice then starts at rows 5, 10, ...:
// 20 bytes in, not 16-byte aligned for f32), as chunked unshard delivers them.
struct chunked_params {
  param_views v;
  std::size_t rows_per = 5;
  const shape& dims(std::size_t i) const { return v[i].dims(); }
  const tensor_view& whole(std::size_t i) const { return v[i]; }
  template <class F>
  void rows(std::size_t i, F&& f) const {
    const tensor_view& w = v[i];
    const std::int64_t n_rows = w.dims()[0], per = static_cast<std::int64_t>(rows_per);
    for (std::int64_t r0 = 0; r0 < n_rows; r0 += per) {
      const std::int64_t r1 = std::min(n_rows, r0 + per);
      f(row_slice(w, r0, r1), r0, r1);
    }
  }
};
static_assert(param_source<chunked_params>);
}  // namespace s2v_ops_test
using s2v_ops_test::chunked_params;

TEST_CASE("s2v ops: rows and pointwise ops (layer norms, rms, rope, residuals, activations)") {
  device_ops dev;
  const host_ops host{gemm_path::portable};
  const std::size_t rows = 37, heads = 3, hd = 26, D = heads * hd, per = 12;  // 37 tokens: groups of 12 + a rest
  std::vector<float> x = random_floats(rows * D, 1), mod = random_floats(4 * 6 * D, 2, 0.f, 0.3f);
  std::vector<float> w = random_floats(D, 3, 1.f, 0.1f), b = random_floats(D, 4, 0.f, 0.1f);
  std::vector<float> cs = random_floats(rows * hd / 2, 5), sn = random_floats(rows * hd / 2, 6);
  device_vector<float> dx(x), dmod(mod), dw(w), db(b), dcs(cs), dsn(sn), dy(rows * D);
  const shape wd{static_cast<std::int64_t>(D)};

  SUBCASE("layer_norm_modulate over modulation rows per token group, and one row for all") {
    for (const std::size_t tpr : {per, std::size_t{0}}) {
      std::vector<float> y(rows * D);
      const modulation_rows hs{mod.data() + D, 6 * D, tpr}, hc{mod.data() + 2 * D, 6 * D, tpr};
      const modulation_rows ds{dmod.p + D, 6 * D, tpr}, dc{dmod.p + 2 * D, 6 * D, tpr};
      host.layer_norm_modulate(x.data(), y.data(), rows, D, 1e-6, hs, hc);
      dev.ops.layer_norm_modulate(dx.p, dy.p, rows, D, 1e-6, ds, dc);
      expect_close_rel<float>("layer_norm_modulate", host_copy(dy, dev), y, row_rel);
    }
  }
  SUBCASE("layer_norm (affine), layer_norm_silu, rms_norm, rope") {
    std::vector<float> y(rows * D);
    host.layer_norm(x.data(), y.data(), rows, D, 1e-6, view_of(w, wd), view_of(b, wd));
    dev.ops.layer_norm(dx.p, dy.p, rows, D, 1e-6, view_of(dw, wd), view_of(db, wd));
    expect_close_rel<float>("layer_norm", host_copy(dy, dev), y, row_rel);

    std::vector<float> z = x;
    device_vector<float> dz(x);
    host.layer_norm_silu(z.data(), rows, D, 1e-6);
    dev.ops.layer_norm_silu(dz.p, rows, D, 1e-6);
    expect_close_rel<float>("layer_norm_silu", host_copy(dz, dev), z, row_rel);

    z = x;
    device_vector<float> dr(x);
    host.rms_norm(z.data(), rows, D, 1e-6, view_of(w, wd));
    dev.ops.rms_norm(dr.p, rows, D, 1e-6, view_of(dw, wd));
    expect_close_rel<float>("rms_norm", host_copy(dr, dev), z, row_rel);

    host.rope(z.data(), rows, heads, hd, cs.data(), sn.data());
    dev.ops.rope(dr.p, rows, heads, hd, dcs.p, dsn.p);
    expect_close_rel<float>("rms_norm + rope", host_copy(dr, dev), z, row_rel);
  }
  SUBCASE("gated_residual per token group, residual, scaled_add, gelu_tanh, silu") {
    std::vector<float> y = random_floats(rows * D, 7), z = x;
    device_vector<float> dyy(y), dz(x);
    host.gated_residual(z.data(), y.data(), {mod.data() + 2 * D, 6 * D, per}, rows, D);
    dev.ops.gated_residual(dz.p, dyy.p, {dmod.p + 2 * D, 6 * D, per}, rows, D);
    expect_close_rel<float>("gated_residual", host_copy(dz, dev), z, row_rel);
    host.residual(z.data(), y.data(), rows * D);
    dev.ops.residual(dz.p, dyy.p, rows * D);
    expect_close_rel<float>("residual", host_copy(dz, dev), z, row_rel);
    host.scaled_add(z.data(), y.data(), -0.3125f, rows * D);
    dev.ops.scaled_add(dz.p, dyy.p, -0.3125f, rows * D);
    expect_close_rel<float>("scaled_add", host_copy(dz, dev), z, row_rel);
    host.gelu_tanh(z.data(), rows * D);
    dev.ops.gelu_tanh(dz.p, rows * D);
    expect_close_rel<float>("gelu_tanh", host_copy(dz, dev), z, row_rel);
    host.silu(z.data(), y.data(), rows * D);
    dev.ops.silu(dz.p, dyy.p, rows * D);
    expect_close_rel<float>("silu", host_copy(dyy, dev), y, row_rel);
  }
}

TEST_CASE("s2v ops: attention over one and two key segments, and grouped (per-frame) attention") {
  device_ops dev;
  const host_ops host{gemm_path::portable};
  const std::size_t heads = 3, hd = 40, ld = heads * hd;
  for (const auto [nq, n1, n2] : {std::array<std::size_t, 3>{1, 5, 0}, {70, 130, 17}, {65, 1, 40}}) {
    CAPTURE(nq);
    CAPTURE(n1);
    CAPTURE(n2);
    std::vector<float> q = random_floats(nq * ld, 11), k1 = random_floats(n1 * ld, 12), v1 = random_floats(n1 * ld, 13),
                       k2 = random_floats((n2 + 1) * ld, 14), v2 = random_floats((n2 + 1) * ld, 15), out(nq * ld);
    std::vector<float> scores(host.attention_scratch(n1 + n2));
    device_vector<float> dq(q), dk1(k1), dv1(v1), dk2(k2), dv2(v2), dout(nq * ld);
    host.attention(q.data(), nq, {k1.data(), v1.data(), n1}, {k2.data(), v2.data(), n2}, heads, hd, scores.data(),
                   out.data());
    dev.ops.attention(dq.p, nq, {dk1.p, dv1.p, n1}, {dk2.p, dv2.p, n2}, heads, hd, nullptr, dout.p);
    expect_close_rel<float>("attention", host_copy(dout, dev), out, 1e-5);
  }
  const std::size_t groups = 3, fs = 22, na = 5;
  std::vector<float> q = random_floats(groups * fs * ld, 21), k = random_floats(groups * na * ld, 22),
                     v = random_floats(groups * na * ld, 23), out(groups * fs * ld), scores(na);
  device_vector<float> dq(q), dk(k), dv(v), dout(out.size());
  host.grouped_attention(q.data(), groups * fs, {k.data(), v.data(), groups * na}, heads, hd, groups, scores.data(),
                         out.data());
  dev.ops.grouped_attention(dq.p, groups * fs, {dk.p, dv.p, groups * na}, heads, hd, groups, nullptr, dout.p);
  expect_close_rel<float>("grouped_attention", host_copy(dout, dev), out, 1e-5);
  CHECK_THROWS_WITH_AS(dev.ops.grouped_attention(dq.p, 10, {dk.p, dv.p, 15}, heads, hd, 4, nullptr, dout.p),
                       doctest::Contains("do not split into 4 equal groups"), error);
}

// The KV cache in bf16 (the bf16 precision's caches): a write rounds each value to nearest even
// exactly as the host does (bit-identical), a read widens exactly, and the bf16 attention reads a
// bf16 cache segment in place next to an f32 segment. Bound of that attention against the host
// attention over the same (rounded) keys: the bf16 path rounds q and the f32 segment too, and
// writes a bf16 output: 2^-8 relative per value, 2e-2 of max(1, max|out|) with the softmax's sums.
TEST_CASE("s2v ops: a bf16 KV cache: writes round as the host, reads widen exactly, bf16 attention reads it") {
  device_ops dev;
  const std::size_t heads = 2, hd = 64, ld = heads * hd, n1 = 48, n2 = 16, nq = 33;
  std::vector<float> k1 = random_floats(n1 * ld, 31), v1 = random_floats(n1 * ld, 32);
  std::vector<bf16> hk(n1 * ld), hv(n1 * ld);
  const host_ops host{gemm_path::portable};
  host.write_cache({hk.data(), dtype::bf16}, k1.data(), k1.size());
  host.write_cache({hv.data(), dtype::bf16}, v1.data(), v1.size());

  device_vector<float> dk1(k1), dv1(v1), back(n1 * ld);
  device_vector<bf16> ck(n1 * ld), cv(n1 * ld);
  dev.ops.write_cache({ck.p, dtype::bf16}, dk1.p, k1.size());
  dev.ops.write_cache({cv.p, dtype::bf16}, dv1.p, v1.size());
  const std::vector<bf16> gk = ck.get(dev.stream);
  std::size_t differ = 0;
  for (std::size_t i = 0; i < gk.size(); ++i) differ += gk[i].bits != hk[i].bits;
  CHECK_MESSAGE(differ == 0, differ, " of ", gk.size(), " bf16 cache values differ from the host's rounding");

  dev.ops.read_cache(back.p, {ck.p, dtype::bf16}, k1.size());
  std::vector<float> widened(k1.size());
  host.read_cache(widened.data(), {hk.data(), dtype::bf16}, k1.size());
  expect_equal("read_cache", host_copy(back, dev), widened);

  // f32 precision refuses a bf16 cache (our f32 attention reads f32 rows).
  std::vector<float> q = random_floats(nq * ld, 33), k2 = random_floats(n2 * ld, 34), v2 = random_floats(n2 * ld, 35);
  device_vector<float> dq(q), dk2(k2), dv2(v2), dout(nq * ld);
  CHECK_THROWS_WITH_AS(dev.ops.attention(dq.p, nq, {kv_rows(ck.p, dtype::bf16), kv_rows(cv.p, dtype::bf16), n1},
                                         {dk2.p, dv2.p, n2}, heads, hd, nullptr, dout.p),
                       doctest::Contains("needs the bf16 precision"), error);

  // bf16 precision: the cache segment read as it is, the f32 segment rounded while joined.
  device_vector<bf16> scratch(cuda_ops::bf16_scratch_elems(nq, nq, n1 + n2, ld));
  dev.ops.set_precision(cuda_precision::bf16, scratch.p, scratch.n);
  dev.ops.attention(dq.p, nq, {kv_rows(ck.p, dtype::bf16), kv_rows(cv.p, dtype::bf16), n1}, {dk2.p, dv2.p, n2}, heads,
                    hd, nullptr, dout.p);
  std::vector<float> wk(n1 * ld), wv(n1 * ld), out(nq * ld), scores(host.attention_scratch(n1 + n2));
  host.read_cache(wk.data(), {hk.data(), dtype::bf16}, wk.size());
  host.read_cache(wv.data(), {hv.data(), dtype::bf16}, wv.size());
  host.attention(q.data(), nq, {wk.data(), wv.data(), n1}, {k2.data(), v2.data(), n2}, heads, hd, scores.data(),
                 out.data());
  expect_close_rel<float>("bf16 attention over a bf16 cache", host_copy(dout, dev), out, 2e-2);
}

TEST_CASE("s2v ops: convolution inputs, patches, tables and moves are bit-identical") {
  device_ops dev;
  const host_ops host{gemm_path::portable};
  SUBCASE("patchify / unpatchify at a 2x4x4 and a 1x2x2 grid") {
    const std::size_t C = 5, F = 4, H = 12, W = 16;
    for (const patch_grid g : {patch_grid{2, 4, 4, F / 2, H / 4, W / 4}, patch_grid{1, 2, 2, F, H / 2, W / 2}}) {
      const std::size_t tokens = g.gf * g.gh * g.gw, vec = C * g.pt * g.ph * g.pw;
      std::vector<float> x = random_floats(C * F * H * W, 31), p(tokens * vec), back(C * F * H * W);
      device_vector<float> dx(x), dp(p.size()), dback(back.size());
      host.patchify(x.data(), C, F, H, W, g, tokens, p.data());
      dev.ops.patchify(dx.p, C, F, H, W, g, tokens, dp.p);
      expect_equal("patchify", host_copy(dp, dev), p);
      host.unpatchify(p.data(), C, g, tokens, back.data());
      dev.ops.unpatchify(dp.p, C, g, tokens, dback.p);
      expect_equal("unpatchify", host_copy(dback, dev), back);
    }
  }
  SUBCASE("causal conv inputs, strides 1 and 2, several streams") {
    for (const std::size_t stride : {1, 2}) {
      const std::size_t streams = 3, t_in = 11, ch = 7, t_out = causal_conv_out_len(t_in, stride);
      std::vector<float> x = random_floats(streams * t_in * ch, 32), cols(streams * t_out * 3 * ch);
      device_vector<float> dx(x), dcols(cols.size());
      host.causal_conv_inputs(x.data(), streams, t_in, ch, stride, cols.data());
      dev.ops.causal_conv_inputs(dx.p, streams, t_in, ch, stride, dcols.p);
      expect_equal("causal_conv_inputs", host_copy(dcols, dev), cols);
    }
  }
  SUBCASE("parameter rows, broadcasts, copies, fills, uploads, host tables, counts") {
    const std::size_t rows = 6, n = 18;
    std::vector<float> param = random_floats(3 * n, 41), in = random_floats(rows * 2 * n, 42), out(rows * n);
    device_vector<float> dparam(param), din(in), dout(out.size());
    const shape pd{3, static_cast<std::int64_t>(n)};
    host.add_param_rows(out.data(), view_of(param, pd), in.data(), rows, n, 2 * n, n / 2);
    dev.ops.add_param_rows(dout.p, view_of(dparam, pd), din.p, rows, n, 2 * n, n / 2);
    expect_equal("add_param_rows", host_copy(dout, dev), out);
    host.add_rows(out.data(), in.data(), rows, n, view_of(param, pd), 2);
    dev.ops.add_rows(dout.p, din.p, rows, n, view_of(dparam, pd), 2);
    expect_close_rel<float>("add_rows", host_copy(dout, dev), out, row_rel);
    host.broadcast_row(in.data() + 3, 2 * n, rows, view_of(param, pd), n);
    dev.ops.broadcast_row(din.p + 3, 2 * n, rows, view_of(dparam, pd), n);
    expect_equal("broadcast_row", host_copy(din, dev), in);
    host.copy_rows(out.data(), n, in.data() + 1, 2 * n, rows, n - 1);
    dev.ops.copy_rows(dout.p, n, din.p + 1, 2 * n, rows, n - 1);
    expect_equal("copy_rows", host_copy(dout, dev), out);
    host.fill(out.data() + 5, 7, 0.25f);
    dev.ops.fill(dout.p + 5, 7, 0.25f);
    expect_equal("fill", host_copy(dout, dev), out);
    // A host tensor in bf16 uploads widened, through pinned staging.
    std::vector<bf16> h16 = stored<bf16>(random_floats(rows * n, 43));
    const tensor_view v16(h16.data(), dtype::bf16, shape{static_cast<std::int64_t>(rows * n)});
    host.upload(out.data(), v16);
    dev.ops.upload(dout.p, v16);
    expect_equal("upload", host_copy(dout, dev), out);
    const auto fill = [](float* a, float* b) {
      for (int i = 0; i < 9; ++i) a[i] = 0.5f * i, b[i] = -1.0f * i;
    };
    std::vector<float> ha(9), hb(9);
    device_vector<float> da(9), dbb(9);
    host.host_tables(ha.data(), hb.data(), 9, as_host_fill(fill));
    dev.ops.host_tables(da.p, dbb.p, 9, as_host_fill(fill));
    expect_equal("host_tables a", host_copy(da, dev), ha);
    expect_equal("host_tables b", host_copy(dbb, dev), hb);
    device_vector<float> slot(std::vector<float>{0.0f});
    CHECK(dev.ops.load_count(slot.p) == 0);
    dev.ops.store_count(slot.p, 1234);
    CHECK(dev.ops.load_count(slot.p) == 1234);
    CHECK(host_copy(slot, dev)[0] == 1234.0f);
  }
  SUBCASE("sinusoid rows and the weighted layer mix") {
    std::vector<float> t{999.0f, 3.5f}, s(5 * 64);
    device_vector<float> dt(t), ds(s.size());
    host.sinusoid_rows(t.data(), 2, 5, 64, s.data());
    dev.ops.sinusoid_rows(dt.p, 2, 5, 64, ds.p);
    expect_close_rel<float>("sinusoid_rows", host_copy(ds, dev), s, row_rel);
    const std::size_t layers = 25, ch = 9, cols = 7, rows = 10;
    std::vector<float> a = random_floats(layers * ch * cols, 44), lw = random_floats(layers, 45), mixed(rows * ch);
    device_vector<float> da(a), dlw(lw), dmixed(mixed.size());
    const shape ld{static_cast<std::int64_t>(layers)};
    host.mix_layers(a.data(), layers, ch, cols, view_of(lw, ld), rows, 4, mixed.data());
    dev.ops.mix_layers(da.p, layers, ch, cols, view_of(dlw, ld), rows, 4, dmixed.p);
    expect_close_rel<float>("mix_layers", host_copy(dmixed, dev), mixed, row_rel);
  }
}

TEST_CASE("s2v ops: linear over row chunks, f32 and bf16 weights, bias slices at unaligned rows, GELU") {
  device_ops dev;
  const host_ops host{gemm_path::portable};
  const std::size_t m = 9, k = 50, n = 23;
  std::vector<float> x = random_floats(m * k, 51), w32 = random_floats(n * k, 52, 0.f, 0.2f), b32 = random_floats(n, 53);
  device_vector<float> dx(x), dy(m * n);
  for (const bool bf : {false, true}) {
    CAPTURE(bf);
    // The weights as stored: f32, or bf16 (the host widens exactly, as the device does).
    std::vector<std::byte> wbytes(n * k * (bf ? 2 : 4)), bbytes(n * (bf ? 2 : 4));
    const dtype t = bf ? dtype::bf16 : dtype::f32;
    const tensor_view hw(wbytes.data(), t, shape{static_cast<std::int64_t>(n), static_cast<std::int64_t>(k)});
    const tensor_view hb(bbytes.data(), t, shape{static_cast<std::int64_t>(n)});
    for (std::size_t i = 0; i < n * k; ++i) hw.store(i, w32[i]);
    for (std::size_t i = 0; i < n; ++i) hb.store(i, b32[i]);
    device_vector<std::byte> dwb(wbytes), dbb(bbytes);
    const tensor_view dw(dwb.p, t, hw.dims()), dbv(dbb.p, t, hb.dims());
    for (const linear_act act : {linear_act::none, linear_act::gelu_tanh}) {
      chunked_params hp{param_views({hw, hb})}, dp{param_views({dw, dbv})};
      std::vector<float> y(m * n);
      host.linear(x.data(), m, k, hp, 0, 1, y.data(), act);
      dev.ops.linear(dx.p, m, k, dp, 0, 1, dy.p, act);
      // The GEMM bound on the widened weights, through GELU's slope (|gelu'| <= 1.13).
      std::vector<float> wide(n * k), bwide(n);
      for (std::size_t i = 0; i < n * k; ++i) wide[i] = hw.load(i);
      for (std::size_t i = 0; i < n; ++i) bwide[i] = hb.load(i);
      linear_reference ref = host_linear(x, m, k, wide, bwide, n);
      for (std::size_t i = 0; i < y.size(); ++i) ref.bound[i] = 1.2 * ref.bound[i] + row_rel * std::max(1.0, std::abs(double(y[i])));
      ref.y = y;
      expect_linear(act == linear_act::gelu_tanh ? "linear + gelu" : "linear", host_copy(dy, dev), ref);
    }
  }
}

// ---- fp8 weights (issue 15 item 1, the GPU part) ----------------------------------------------
// f8e4m3 codes with their scales in device memory (the views carry them, as the fp8 policy's
// resident "<w>.scale" parameters), through cuda_ops::linear in both precisions and both activation
// modes, per-channel and per-tensor scales, with a bias, with GELU, whole and in row chunks, m = 1
// and m = 9, against the host computing the same thing. Bounds (u32 = 2^-24, Σ = Σ_k |x_k w_k| of
// the values multiplied, + |b|):
//  * dequantization (kernels/cuda/fp8.cuh): bit-identical to quant::dequantize_rows (f32), and to
//    those values rounded to bf16 (one RNE rounding on both sides), vector and scalar paths;
//  * weight-only, f32 precision: the same f32 weights as the host's fp8 path, another summation
//    order: device_checks.cuh's 8 sqrt(K) u32 Σ (GELU as a separate pass: 1.2x + 1e-6 |y|);
//  * weight-only, bf16 precision: x and the dequantized weights each rounded to bf16 (then exact
//    products), f32 tensor-core accumulation: 2 (ceil(K/4) + 16) u32 Σ (test_gemm_bf16.cu says why)
//    against the host on the same rounded inputs, GELU in cuBLASLt's epilogue (gelu_epilogue_bound).
//    Against the host's fp8 result (f32 inputs) the two bf16 roundings add (2 2^-9 + 2^-18) Σ;
//  * per-tensor activations: the codes and the scale bit-identical to the host's
//    (quantize_activations_per_tensor); the e4m3 x e4m3 products are exact (4 x 4 significant bits);
//    Hopper's fp8 MMA adds them with a reduced-precision accumulator (about 14 bits kept, DeepSeek-V3
//    report sec. 3.3.2) that cuBLASLt (FAST_ACCUM off) promotes to f32 at least every 128 products:
//    (128 2^-13 + 2 (ceil(K/128) + 16) u32) Σ|value products| sx sw, + 4 u32 |y| for the scale
//    multiplications and the bias. A lost or doubled scale (a factor of 448 or of sx), a wrong
//    layout or a lost chunk is off by order 1 and fails.
namespace {

std::vector<float> fp8_test_weights(std::size_t n, std::size_t k, unsigned seed) {
  std::vector<float> w = random_floats(n * k, seed, 0.f, 0.2f);
  for (std::size_t r = 0; r < n; r += 3)  // rows of smaller ranges: per-channel scales differ from the tensor's
    for (std::size_t c = 0; c < k; ++c) w[r * k + c] *= std::ldexp(1.0f, -static_cast<int>(r % 11));
  return w;
}

std::vector<float> bf16_rounded(const std::vector<float>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = to_f32(bf16::from_float(v[i]));
  return out;
}

// y = act(x · Wᵀ + b) in double over the given values, with Σ per element.
struct plain_reference {
  std::vector<float> y;
  std::vector<double> abs_sum;
};
plain_reference double_linear(const std::vector<float>& x, std::size_t m, std::size_t k, const std::vector<float>& w,
                              const std::vector<float>& b, std::size_t n, bool gelu) {
  plain_reference r{std::vector<float>(m * n), std::vector<double>(m * n)};
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j) {
      double sum = b[j], abs_sum = std::abs(b[j]);
      for (std::size_t l = 0; l < k; ++l) {
        const double p = static_cast<double>(x[i * k + l]) * w[j * k + l];
        sum += p;
        abs_sum += std::abs(p);
      }
      r.y[i * n + j] = gelu ? gelu_tanh(static_cast<float>(sum)) : static_cast<float>(sum);
      r.abs_sum[i * n + j] = abs_sum;
    }
  return r;
}

}  // namespace

TEST_CASE("s2v ops: fp8 weights dequantize on the device bit for bit as the host, whole weights and row chunks") {
  device_ops dev;
  for (const std::size_t k : {std::size_t{64}, std::size_t{50}}) {  // the vector path, then the element path
    for (const quant::fp8_scaling scaling : {quant::fp8_scaling::per_channel, quant::fp8_scaling::per_tensor}) {
      CAPTURE(k);
      CAPTURE(std::string(quant::name_of(scaling)));
      const std::size_t n = 23;
      const std::vector<float> w = fp8_test_weights(n, k, 71);
      const quant::fp8_weight q = quant::quantize("w", std::span<const float>(w), shape{std::int64_t(n), std::int64_t(k)}, scaling);
      const std::vector<float> want = quant::dequantize(q);
      device_vector<f8e4m3> codes(q.codes);
      device_vector<float> scales(q.scales), out32(n * k);
      device_vector<bf16> out16(n * k);
      const auto* c = reinterpret_cast<const std::uint8_t*>(codes.p);
      cuda::dequantize_fp8_rows(c, n, k, scales.p, q.scales.size(), out32.p, dev.stream.s);
      cuda::dequantize_fp8_rows(c, n, k, scales.p, q.scales.size(), out16.p, dev.stream.s);
      expect_equal("dequantized f32", out32.get(dev.stream), want);
      expect_equal("dequantized bf16", widened(out16.get(dev.stream)), bf16_rounded(want));
      // Rows [5, 12) alone, with those rows' scales (as a chunk's view carries them).
      const std::size_t r0 = 5, r1 = 12, count = scaling == quant::fp8_scaling::per_tensor ? 1 : r1 - r0;
      device_vector<float> part(n * k);
      cuda::dequantize_fp8_rows(c + r0 * k, r1 - r0, k, scales.p + (count == 1 ? 0 : r0), count, part.p, dev.stream.s);
      std::vector<float> got = part.get(dev.stream);
      got.resize((r1 - r0) * k);
      expect_equal("dequantized rows [5, 12)", got, std::vector<float>(want.begin() + r0 * k, want.begin() + r1 * k));
    }
  }
}

TEST_CASE("s2v ops: fp8 linear on the device (weight-only and per-tensor activations) against the host") {
  device_ops dev;
  const host_ops host{gemm_path::portable};
  const std::size_t max_input = 9 * 64;
  device_vector<bf16> narrow(cuda_ops::bf16_scratch_elems(max_input, 0, 0, 0));
  device_vector<std::byte> fp8_scratch(cuda_ops::fp8_scratch_bytes(max_input));
  const int sm = dev.ops.gemm().compute_capability();
  MESSAGE("device sm_", sm, std::string(sm >= 89 ? ": fp8 tensor cores" : ": no fp8 tensor cores, per-tensor activations fall back"));
  struct dims { std::size_t m, k, n; };
  // N a multiple of 16 and chunks of 16 rows where the fp8 GEMM must run (cuBLASLt's fp8 kernels want
  // 16-byte multiples, as torch._scaled_mm checks); K = 50 cannot run it: the fallback, counted.
  for (const dims d : {dims{9, 64, 48}, dims{1, 64, 48}, dims{9, 50, 23}}) {
    const std::size_t m = d.m, k = d.k, n = d.n;
    const std::vector<float> x = random_floats(m * k, 80 + static_cast<unsigned>(m + k)), b = random_floats(n, 81);
    const std::vector<float> w = fp8_test_weights(n, k, 82);
    device_vector<float> dx(x), dy(m * n), db(b);
    for (const quant::fp8_scaling scaling : {quant::fp8_scaling::per_channel, quant::fp8_scaling::per_tensor}) {
      quant::fp8_weight q = quant::quantize("w", std::span<const float>(w), shape{std::int64_t(n), std::int64_t(k)}, scaling);
      const std::vector<float> deq = quant::dequantize(q);
      device_vector<f8e4m3> dcodes(q.codes);
      device_vector<float> dscales(q.scales);
      const shape wd{std::int64_t(n), std::int64_t(k)}, bd{std::int64_t(n)};
      const tensor_view hw = tensor_view(q.codes.data(), dtype::f8e4m3, wd).with_scales(q.scales.data(), q.scales.size());
      const tensor_view dw = tensor_view(dcodes.p, dtype::f8e4m3, wd).with_scales(dscales.p, q.scales.size());
      std::vector<float> bcopy = b;
      const tensor_view hb(bcopy.data(), dtype::f32, bd), dbv(db.p, dtype::f32, bd);
      // The host's per-tensor activation path, and Σ of its value products scaled (its bound).
      std::vector<f8e4m3> xc(m * k);
      const float sx = quantize_activations_per_tensor(x.data(), m * k, xc.data());
      std::vector<float> y_act(m * n);
      linear_rows_fp8_activations(x.data(), m, k, hw, hb, 0, y_act.data(), n);
      std::vector<double> act_abs(m * n);
      for (std::size_t i = 0; i < m; ++i)
        for (std::size_t j = 0; j < n; ++j) {
          double s = 0.0;
          for (std::size_t l = 0; l < k; ++l) s += std::abs(double(xc[i * k + l].to_float()) * q.codes[j * k + l].to_float());
          act_abs[i * n + j] = s * sx * q.row_scale(j);
        }
      for (const cuda_precision prec : {cuda_precision::f32, cuda_precision::bf16}) {
        dev.ops.set_precision(prec, prec == cuda_precision::bf16 ? narrow.p : nullptr, narrow.n);
        for (const cuda::fp8_activations mode : {cuda::fp8_activations::none, cuda::fp8_activations::per_tensor}) {
          dev.ops.set_fp8_activations(mode, fp8_scratch.p, fp8_scratch.n);
          for (const std::size_t rows_per : {n, std::size_t{16}}) {
            for (const linear_act act : {linear_act::none, linear_act::gelu_tanh}) {
              const bool gelu = act == linear_act::gelu_tanh;
              const std::size_t chunks = (n + rows_per - 1) / rows_per;
              CAPTURE(m);
              CAPTURE(k);
              CAPTURE(std::string(quant::name_of(scaling)));
              CAPTURE(std::string(name_of(prec)));
              CAPTURE(std::string(cuda::name_of(mode)));
              CAPTURE(rows_per);
              CAPTURE(gelu);
              chunked_params hp{param_views({hw, hb}), rows_per}, dp{param_views({dw, dbv}), rows_per};
              dev.ops.gemm().reset_stats();
              dev.ops.linear(dx.p, m, k, dp, 0, 1, dy.p, act);
              const std::vector<float> got = host_copy(dy, dev);
              const cuda::blaslt_stats st = dev.ops.gemm().stats();
              // Where cuBLASLt's fp8 GEMM can run (sm_89+, K a multiple of 16) it must for m = 9; for m = 1
              // (cuBLASLt's n = 1) its heuristic may decline, and the fallback is then checked instead.
              const bool fp8_possible = mode == cuda::fp8_activations::per_tensor && k % 16 == 0 && sm >= 89;
              if (fp8_possible && m > 1) CHECK_MESSAGE(st.fp8_gemm > 0, "fp8 GEMM did not run: fp8_fallback ", st.fp8_fallback);
              if (fp8_possible && st.fp8_gemm == 0) MESSAGE("m = ", m, ": cuBLASLt gave no fp8 algorithm, weight-only fp8 ran");
              if (st.fp8_gemm > 0) {
                // Every chunk on fp8 tensor cores; the activation codes and scale are the host's.
                CHECK(st.fp8_gemm == chunks);
                CHECK(st.fp8_fallback == 0);
                CHECK(st.fp8_dequantized == 0);
                const std::vector<std::byte> scratch = fp8_scratch.get(dev.stream);
                float dsx = 0.0f;
                std::memcpy(&dsx, scratch.data() + 16, sizeof(float));
                CHECK(dsx == sx);
                std::size_t differ = 0;
                for (std::size_t i = 0; i < m * k; ++i)
                  differ += static_cast<std::uint8_t>(scratch[cuda_ops::fp8_scalar_bytes + i]) != xc[i].bits;
                CHECK_MESSAGE(differ == 0, differ, " of ", m * k, " activation codes differ from the host's");
                std::vector<float> want = y_act;
                if (gelu)
                  for (float& v : want) v = gelu_tanh(v);
                const double acc = 128.0 / 8192.0 + 2.0 * (double((k + 127) / 128) + 16.0) * u32;
                expect_close<float>("fp8 x fp8 linear", got, want, [&](std::size_t i) {
                  const double bound = acc * act_abs[i] + 4.0 * u32 * std::abs(double(y_act[i])) + 1e-30;
                  return gelu ? 1.2 * bound + row_rel * std::max(1.0, std::abs(double(want[i]))) : bound;
                });
                continue;
              }
              // Weight-only fp8 (asked for, or the fallback: counted, per chunk).
              CHECK(st.fp8_gemm == 0);
              CHECK(st.fp8_dequantized == chunks);
              CHECK(st.fp8_fallback == (mode == cuda::fp8_activations::per_tensor ? chunks : 0));
              std::vector<float> y_host(m * n);
              host.linear(x.data(), m, k, hp, 0, 1, y_host.data(), act);  // the host's fp8 path
              if (prec == cuda_precision::f32) {
                linear_reference ref = host_linear(x, m, k, deq, b, n);
                for (std::size_t i = 0; i < y_host.size(); ++i)
                  ref.bound[i] = gelu ? 1.2 * ref.bound[i] + row_rel * std::max(1.0, std::abs(double(y_host[i])))
                                      : ref.bound[i];
                ref.y = y_host;
                expect_linear("fp8 weight-only linear, f32", got, ref);
              } else {
                const plain_reference r = double_linear(bf16_rounded(x), m, k, bf16_rounded(deq), b, n, gelu);
                const plain_reference f = double_linear(x, m, k, deq, b, n, gelu);
                const double steps = 2.0 * (double((k + 3) / 4) + 16.0) * u32;
                const double rounding = 2.0 / 512.0 + 1.0 / 262144.0;
                expect_close<float>("fp8 weight-only linear, bf16 (vs the host on the same bf16 inputs)", got, r.y,
                                    [&](std::size_t i) {
                                      const double bound = steps * r.abs_sum[i] + 1e-30;
                                      return gelu ? gelu_epilogue_bound(r.y[i], bound) : bound;
                                    });
                expect_close<float>("fp8 weight-only linear, bf16 (vs the host's fp8 result)", got, y_host,
                                    [&](std::size_t i) {
                                      // |got - r| + |r - f| + |f - host|: r's Σ is within 1% of f's
                                      const double bound = (1.01 * steps + rounding + double(k) * u32) * f.abs_sum[i] + 1e-30;
                                      return gelu ? gelu_epilogue_bound(y_host[i], bound) : bound;
                                    });
              }
            }
          }
        }
      }
    }
  }
  dev.ops.set_precision(cuda_precision::f32);
}
