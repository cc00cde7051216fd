// The S2V kernels of include/unshard/kernels/cuda/s2v.cuh against the host path of
// models/liveavatar (the UNSHARD_HD row functions of models/liveavatar/kernels.hpp and the host
// attention / GEMM), on random data, f32 and bf16 storage or weights, at sizes that are not
// multiples of any tile. Needs a device (tests/gpu.cmake skips it without one).
//
// Tolerances are those of tests/gpu/test_kernels.cu, for the same reasons (u32 = 2^-24):
//  * attention: 1e-5 · max(1, max|ref|) (another summation order, online softmax rescaling),
//    plus one bf16 ulp of the value for bf16 storage;
//  * copies (conv input vectors, patches): bit-identical;
//  * GEMM: 8·sqrt(K)·u32·(|b_j| + Σ_k |x_k w_k|) per element (f32 accumulation in another order);
//  * rope on the device (rms_norm_rope) against rope_rotate_row: 1e-6 · max(1, max|ref|);
//  * fp16-rounded rope factors: the same double formula on both sides, so the same binary16 value
//    unless device and host cos/sin/pow straddle a binary16 rounding midpoint (a few double ulps
//    out of 2^-11: improbable); asserted: every value is a binary16 value within one binary16 ulp.
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "unshard/backend/cuda/check.cuh"
#include "unshard/kernels/cuda/norm.cuh"
#include "unshard/kernels/cuda/s2v.cuh"
#include "unshard/kernels/host/attention.hpp"
#include "unshard/kernels/host/gemm.hpp"
#include "unshard/kernels/thread/patch.hpp"
#include "unshard/kernels/thread/rope.hpp"
#include "unshard/models/liveavatar/kernels.hpp"

#include "device_checks.cuh"

using namespace unshard;

using namespace unshard::gpu_testing;

namespace {

double f16_ulp(double v) {  // binary16: 11 significant bits, fixed 2^-24 steps below 2^-14
  int e = 0;
  std::frexp(v == 0.0 ? 1e-30 : v, &e);
  return std::ldexp(1.0, std::max(e - 1, -14) - 10);
}

}  // namespace

// --- attention ----------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("flash_attention_per_frame matches multi_head_attention frame by frame", T, float, bf16) {
  test_stream st;
  // (frames, tokens per frame, audio tokens per frame, heads, d): the tiny model's shape, frames
  // wider than a query tile with more keys than a key tile, a head not a multiple of 4, d = 256.
  for (const auto& [frames, fs, na, heads, d] :
       {std::tuple<std::size_t, std::size_t, std::size_t, std::size_t, std::size_t>{3, 70, 5, 4, 32},
        {3, 130, 33, 2, 128},
        {4, 9, 3, 3, 6},
        {2, 65, 40, 1, 256}}) {
    const std::size_t ld = heads * d;
    const auto q = stored<T>(random_floats(frames * fs * ld, 31, 0.0f, 1.5f));
    const auto k = stored<T>(random_floats(frames * na * ld, 32, 0.0f, 1.5f));
    const auto v = stored<T>(random_floats(frames * na * ld, 33));
    device_vector<T> dq(q), dk(k), dv(v), dout(frames * fs * ld);
    cuda::flash_attention_per_frame(dq.p, frames, fs, dk.p, dv.p, na, heads, d, dout.p, st.s);
    // The host's s2v_injector_attn_forward: one multi_head_attention per frame.
    const auto qf = widened(q), kf = widened(k), vf = widened(v);
    std::vector<float> ref(frames * fs * ld), scores(na);
    for (std::size_t f = 0; f < frames; ++f)
      multi_head_attention(qf.data() + f * fs * ld, fs, kf.data() + f * na * ld, vf.data() + f * na * ld, na, heads, d,
                           scores.data(), ref.data() + f * fs * ld);
    expect_close_rel(std::string("per-frame attention ") + storage_name<T>() + " F=" + std::to_string(frames) +
                         " fs=" + std::to_string(fs) + " na=" + std::to_string(na) + " h=" + std::to_string(heads) +
                         " d=" + std::to_string(d),
                     dout.get(st), ref, 1e-5);
  }
}

TEST_CASE_TEMPLATE("flash_attention_two_segments matches attention_row_two_segments over cache + roped cond keys", T,
                   float, bf16) {
  test_stream st;
  // (queries, active cache slots, cond keys, heads, d): segment boundaries inside a key tile,
  // an empty cache (the first block), no cond keys, odd pair counts.
  for (const auto& [nq, n1, n2, heads, d] :
       {std::tuple<std::size_t, std::size_t, std::size_t, std::size_t, std::size_t>{70, 100, 45, 3, 64},
        {48, 31, 97, 2, 128},
        {33, 0, 20, 4, 32},
        {20, 50, 0, 2, 22},
        {40, 17, 23, 1, 256}}) {
    const std::size_t ld = heads * d, pairs = d / 2;
    const auto q = stored<T>(random_floats(nq * ld, 34, 0.0f, 1.5f));
    const auto k1 = stored<T>(random_floats(n1 * ld, 35, 0.0f, 1.5f)), v1 = stored<T>(random_floats(n1 * ld, 36));
    const auto k2 = stored<T>(random_floats(n2 * ld, 37, 0.0f, 1.5f)), v2 = stored<T>(random_floats(n2 * ld, 38));

    // Cond positions as s2v_cond_position gives them: the reference frame at a roll-out, motion
    // frames at negative times, rows/columns of a floored bucket grid.
    std::vector<std::int64_t> pos(3 * n2);
    for (std::size_t i = 0; i < n2; ++i) {
      const std::int64_t times[5] = {30, -1, -3, -19, -4};
      pos[3 * i] = times[i % 5];
      pos[3 * i + 1] = static_cast<std::int64_t>(i / 7);
      pos[3 * i + 2] = static_cast<std::int64_t>(i % 7);
    }
    std::vector<float> cos(n2 * pairs), sin(n2 * pairs);
    for (std::size_t i = 0; i < n2; ++i)
      s2v_rope_factors_row(pos[3 * i], pos[3 * i + 1], pos[3 * i + 2], pairs, cos.data() + i * pairs,
                           sin.data() + i * pairs);

    // Device: rope tables, cond keys roped in place (rope only), one attention launch.
    device_vector<std::int64_t> dpos(pos);
    device_vector<float> dcos(n2 * pairs), dsin(n2 * pairs);
    cuda::s2v_rope_factors(dpos.p, n2, pairs, dcos.p, dsin.p, st.s);
    device_vector<T> dq(q), dk1(k1), dv1(v1), dk2(k2), dv2(v2), dout(nq * ld);
    cuda::rms_norm_rope(dk2.p, n2, ld, d, 1e-6, static_cast<const T*>(nullptr), dcos.p, dsin.p, st.s);
    cuda::flash_attention_two_segments(dq.p, nq, dk1.p, dv1.p, n1, dk2.p, dv2.p, n2, heads, d, dout.p, st.s);

    // The roped cond keys against the host's rope (s2v_rope_rows) ...
    std::vector<float> k2_rope = widened(k2);
    for (std::size_t i = 0; i < n2; ++i)
      for (std::size_t h = 0; h < heads; ++h)
        rope_rotate_row(k2_rope.data() + i * ld + h * d, cos.data() + i * pairs, sin.data() + i * pairs, pairs);
    const std::vector<T> k2_rope_dev = dk2.get(st);
    const std::string what = std::string(storage_name<T>()) + " q=" + std::to_string(nq) + " cache=" +
                             std::to_string(n1) + " cond=" + std::to_string(n2) + " h=" + std::to_string(heads) +
                             " d=" + std::to_string(d);
    if (n2 > 0) expect_close_rel("roped cond keys " + what, k2_rope_dev, k2_rope, 1e-6);

    // ... and the attention against attention_row_two_segments on the same inputs (the device's
    // roped keys, so that the comparison sees the attention alone).
    const auto qf = widened(q), k1f = widened(k1), v1f = widened(v1), k2f = widened(k2_rope_dev), v2f = widened(v2);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
    std::vector<float> ref(nq * ld), scores(n1 + n2);
    for (std::size_t t = 0; t < nq; ++t)
      for (std::size_t h = 0; h < heads; ++h) {
        const std::size_t col = h * d;
        attention_row_two_segments(qf.data() + t * ld + col, k1f.data() + col, v1f.data() + col, n1, k2f.data() + col,
                                   v2f.data() + col, n2, ld, d, scale, scores.data(), ref.data() + t * ld + col);
      }
    expect_close_rel("two-segment attention " + what, dout.get(st), ref, 1e-5);
  }
}

// --- rope factors -------------------------------------------------------------------------------

namespace {

void expect_f16_table(const std::string& what, const std::vector<float>& got, const std::vector<float>& ref) {
  REQUIRE(got.size() == ref.size());
  std::size_t not_f16 = 0, over = 0, differ = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    not_f16 += round_to_f16(got[i]) != got[i];
    over += std::abs(static_cast<double>(got[i]) - ref[i]) > f16_ulp(ref[i]);
    differ += got[i] != ref[i];
  }
  CHECK_MESSAGE(not_f16 == 0, what, ": ", not_f16, " values are not binary16 values");
  CHECK_MESSAGE(over == 0, what, ": ", over, " of ", ref.size(), " values more than one binary16 ulp from the host's");
  MESSAGE(what, ": ", differ, " of ", ref.size(), " values differ from the host's (by one binary16 ulp)");
}

}  // namespace

TEST_CASE("s2v_rope_factors and s2v_block_rope_factors match s2v_rope_factors_row at signed positions") {
  test_stream st;
  for (const std::size_t pairs : {std::size_t{16}, std::size_t{11}, std::size_t{64}}) {
    // Positions over the range a stream reaches: times from the oldest motion frame (-19) to a
    // long stream's (thousands), rows and columns up to a 720p grid's, signs mixed in every axis.
    const std::size_t n = 517;
    std::mt19937 gen(39);
    std::uniform_int_distribution<std::int64_t> t_dist(-19, 5000), hw_dist(-60, 90);
    std::vector<std::int64_t> pos(3 * n);
    for (std::size_t i = 0; i < n; ++i) pos[3 * i] = t_dist(gen), pos[3 * i + 1] = hw_dist(gen), pos[3 * i + 2] = hw_dist(gen);
    pos[0] = pos[1] = pos[2] = 0;  // the origin: cos 1, sin 0 exactly
    std::vector<float> cos(n * pairs), sin(n * pairs);
    for (std::size_t i = 0; i < n; ++i)
      s2v_rope_factors_row(pos[3 * i], pos[3 * i + 1], pos[3 * i + 2], pairs, cos.data() + i * pairs,
                           sin.data() + i * pairs);
    device_vector<std::int64_t> dpos(pos);
    device_vector<float> dcos(n * pairs), dsin(n * pairs);
    cuda::s2v_rope_factors(dpos.p, n, pairs, dcos.p, dsin.p, st.s);
    expect_f16_table("s2v_rope_factors cos pairs=" + std::to_string(pairs), dcos.get(st), cos);
    expect_f16_table("s2v_rope_factors sin pairs=" + std::to_string(pairs), dsin.get(st), sin);

    // A streamed block: 3 frames of a 5x9 grid whose first frame sits at position 7.
    const std::size_t frames = 3, gh = 5, gw = 9, tokens = frames * gh * gw;
    const std::int64_t first = 7;
    std::vector<float> bcos(tokens * pairs), bsin(tokens * pairs);
    for (std::size_t t = 0; t < tokens; ++t) {
      const std::size_t f = t / (gh * gw), j = t % (gh * gw);
      s2v_rope_factors_row(first + static_cast<std::int64_t>(f), static_cast<std::int64_t>(j / gw),
                           static_cast<std::int64_t>(j % gw), pairs, bcos.data() + t * pairs, bsin.data() + t * pairs);
    }
    device_vector<float> dbcos(tokens * pairs), dbsin(tokens * pairs);
    cuda::s2v_block_rope_factors(first, frames, gh, gw, pairs, dbcos.p, dbsin.p, st.s);
    expect_f16_table("s2v_block_rope_factors cos pairs=" + std::to_string(pairs), dbcos.get(st), bcos);
    expect_f16_table("s2v_block_rope_factors sin pairs=" + std::to_string(pairs), dbsin.get(st), bsin);
  }
}

// --- convolutions as GEMMs ------------------------------------------------------------------------

TEST_CASE_TEMPLATE("causal_conv1d matches causal_conv_input_row + the host linear, all streams at once", W, float,
                   bf16) {
  test_stream st;
  device_vector<std::byte> workspace(std::size_t{4} << 20);
  cuda::blaslt blas;
  blas.set_workspace(workspace.p, workspace.n);
  // (streams, input steps, channels, stride, output channels): the audio encoder's conv1 (one
  // stream, stride 1), its stride-2 convs over the n+1 local/global streams, odd lengths.
  for (const auto& [streams, t_in, channels, stride, out_ch] :
       {std::tuple<std::size_t, std::size_t, std::size_t, std::size_t, std::size_t>{1, 9, 200, 1, 50},
        {5, 13, 24, 2, 40},
        {5, 7, 40, 2, 72},
        {3, 2, 17, 1, 33}}) {
    const std::size_t t_out = (t_in - 1) / stride + 1, rows = streams * t_out, k = 3 * channels;
    const auto x = random_floats(streams * t_in * channels, 40);
    const auto w = stored<W>(random_floats(out_ch * k, 41, 0.0f, 0.1f));
    const auto b = stored<W>(random_floats(out_ch, 42));
    device_vector<float> dx(x), dcols(rows * k), dout(rows * out_ch), scratch(out_ch * k + out_ch);
    device_vector<W> dw(w), db(b);
    cuda::causal_conv1d(blas, dx.p, streams, t_in, channels, stride, dw.p, db.p, out_ch, dcols.p, dout.p, scratch.p,
                        st.s);
    std::vector<float> cols(rows * k);
    for (std::size_t j = 0; j < streams; ++j)
      for (std::size_t t = 0; t < t_out; ++t)
        causal_conv_input_row(x.data() + j * t_in * channels, channels, t, stride, cols.data() + (j * t_out + t) * k);
    const std::string what = std::string("causal conv ") + storage_name<W>() + " weights, " + std::to_string(streams) +
                             " streams T=" + std::to_string(t_in) + " C=" + std::to_string(channels) + " stride " +
                             std::to_string(stride);
    CHECK_MESSAGE(dcols.get(st) == cols, what, ": input vectors must be bit-identical copies");
    expect_linear(what, dout.get(st), host_linear(cols, rows, k, widened(w), widened(b), out_ch));
  }
}

TEST_CASE_TEMPLATE("frame_pack_conv matches patchify_token + the host linear at the 1x2x2, 2x4x4 and 4x8x8 buckets", W,
                   float, bf16) {
  test_stream st;
  device_vector<std::byte> workspace(std::size_t{4} << 20);
  cuda::blaslt blas;
  blas.set_workspace(workspace.p, workspace.n);
  // A 18x26 latent: no bucket divides it, so every grid floors (9x13, 4x6, 2x3 tokens per frame).
  const std::size_t C = 16, H = 18, Wd = 26, dim = 40;
  for (const auto& [nf, kt, kh] : {std::tuple<std::size_t, std::size_t, std::size_t>{1, 1, 2}, {2, 2, 4}, {16, 4, 8}}) {
    const patch_grid g{kt, kh, kh, nf / kt, H / kh, Wd / kh};
    const std::size_t tokens = g.gf * g.gh * g.gw, k = C * kt * kh * kh;
    const auto x = random_floats(C * nf * H * Wd, 43);
    const auto w = stored<W>(random_floats(dim * k, 44, 0.0f, 0.05f));
    const auto b = stored<W>(random_floats(dim, 45));
    device_vector<float> dx(x), dpatches(tokens * k), dy(tokens * dim), scratch(dim * k + dim);
    device_vector<W> dw(w), db(b);
    cuda::frame_pack_conv(blas, dx.p, C, nf, H, Wd, kt, kh, dw.p, db.p, dim, dpatches.p, dy.p, scratch.p, st.s);
    std::vector<float> patches(tokens * k);
    for (std::size_t s = 0; s < tokens; ++s) patchify_token(x.data(), C, nf, H, Wd, g, s, patches.data() + s * k);
    const std::string what = std::string("frame pack ") + std::to_string(kt) + "x" + std::to_string(kh) + "x" +
                             std::to_string(kh) + ", " + storage_name<W>() + " weights";
    CHECK_MESSAGE(dpatches.get(st) == patches, what, ": patches must be bit-identical copies");
    expect_linear(what, dy.get(st), host_linear(patches, tokens, k, widened(w), widened(b), dim));
  }
}
