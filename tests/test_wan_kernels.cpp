// Thread kernels and the host GEMM of the Wan DiT against straightforward double-precision
// formulas; the Wan config parser and the model's declared layout.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <complex>
#include <cstddef>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "unshard/kernels/host/attention.hpp"
#include "unshard/kernels/host/gemm.hpp"
#include "unshard/kernels/thread/activation.hpp"
#include "unshard/kernels/thread/attention.hpp"
#include "unshard/kernels/thread/embedding.hpp"
#include "unshard/kernels/thread/norm.hpp"
#include "unshard/kernels/thread/patch.hpp"
#include "unshard/kernels/thread/residual.hpp"
#include "unshard/kernels/thread/rope.hpp"
#include "unshard/models/wan/config.hpp"
#include "unshard/models/wan/model.hpp"

using namespace unshard;

namespace {

std::vector<float> random_vector(std::size_t n, unsigned seed, float lo = -2.0f, float hi = 2.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

double max_abs_diff(const float* a, const double* b, std::size_t n) {
  double m = 0.0;
  for (std::size_t i = 0; i < n; ++i) m = std::max(m, std::abs(static_cast<double>(a[i]) - b[i]));
  return m;
}

std::vector<bf16> to_bf16(const std::vector<float>& v) {
  std::vector<bf16> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = bf16::from_float(v[i]);
  return out;
}

std::vector<float> bf16_rounded(const std::vector<float>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = bf16::from_float(v[i]).to_float();
  return out;
}

tensor_view view_of(std::vector<float>& v, shape s) { return tensor_view(v.data(), dtype::f32, s); }
tensor_view view_of(std::vector<bf16>& v, shape s) { return tensor_view(v.data(), dtype::bf16, s); }

}  // namespace

TEST_CASE("layer_norm_row, affine and adaLN-modulated, match the double formula") {
  for (const std::size_t n : {1u, 7u, 128u, 5120u}) {
    const auto x = random_vector(n, 1 + static_cast<unsigned>(n), -3.0f, 5.0f);  // non-zero mean
    const auto w = random_vector(n, 2), b = random_vector(n, 3), shift = random_vector(n, 4, -0.1f, 0.1f),
               scale = random_vector(n, 5, -0.1f, 0.1f);
    const double eps = 1e-6;
    double mean = 0.0, var = 0.0;
    for (const float v : x) mean += v;
    mean /= static_cast<double>(n);
    for (const float v : x) var += (v - mean) * (v - mean);
    var /= static_cast<double>(n);
    std::vector<double> plain(n), affine(n), modulated(n);
    for (std::size_t i = 0; i < n; ++i) {
      plain[i] = (x[i] - mean) / std::sqrt(var + eps);
      affine[i] = plain[i] * w[i] + b[i];
      modulated[i] = plain[i] * (1.0 + scale[i]) + shift[i];
    }
    std::vector<float> y(n);
    layer_norm_row(x.data(), n, eps, y.data());
    CHECK(max_abs_diff(y.data(), plain.data(), n) < 1e-6);
    layer_norm_row(x.data(), n, eps, w.data(), b.data(), y.data());
    CHECK(max_abs_diff(y.data(), affine.data(), n) < 3e-6);
    layer_norm_modulate_row(x.data(), n, eps, shift.data(), scale.data(), y.data());
    CHECK(max_abs_diff(y.data(), modulated.data(), n) < 1e-6);
    std::vector<float> inplace = x;  // y == x is allowed
    layer_norm_row(inplace.data(), n, eps, inplace.data());
    CHECK(max_abs_diff(inplace.data(), plain.data(), n) < 1e-6);
  }
}

TEST_CASE("rms_norm_row matches x / sqrt(mean(x^2) + eps) * w, for f32 and bf16 weights") {
  const std::size_t n = 384;
  const auto x = random_vector(n, 11), w = random_vector(n, 12);
  const auto wb = to_bf16(w);
  const double eps = 1e-6;
  double ms = 0.0;
  for (const float v : x) ms += static_cast<double>(v) * v;
  ms /= static_cast<double>(n);
  std::vector<double> want(n), want_b(n);
  for (std::size_t i = 0; i < n; ++i) {
    want[i] = x[i] / std::sqrt(ms + eps) * w[i];
    want_b[i] = x[i] / std::sqrt(ms + eps) * wb[i].to_float();
  }
  std::vector<float> y(n);
  rms_norm_row(x.data(), n, eps, w.data(), y.data());
  CHECK(max_abs_diff(y.data(), want.data(), n) < 2e-6);
  rms_norm_row(x.data(), n, eps, wb.data(), y.data());
  CHECK(max_abs_diff(y.data(), want_b.data(), n) < 2e-6);
}

TEST_CASE("gelu_tanh and silu match their double formulas") {
  const double pi = std::acos(-1.0);
  double gelu_err = 0.0, silu_err = 0.0;
  for (int i = -2000; i <= 2000; ++i) {
    const float x = static_cast<float>(i) * 0.005f;
    const double xd = x;
    const double g = 0.5 * xd * (1.0 + std::tanh(std::sqrt(2.0 / pi) * (xd + 0.044715 * xd * xd * xd)));
    const double s = xd / (1.0 + std::exp(-xd));
    gelu_err = std::max(gelu_err, std::abs(gelu_tanh(x) - g));
    silu_err = std::max(silu_err, std::abs(silu(x) - s));
  }
  CHECK(gelu_err < 1e-6);
  CHECK(silu_err < 1e-6);
  CHECK(gelu_tanh(0.0f) == 0.0f);
  CHECK(silu(-100.0f) == doctest::Approx(0.0).epsilon(1e-30));  // no overflow to NaN
}

TEST_CASE("rope: section split, angle table and rotation of interleaved pairs") {
  CHECK(rope_split(16).t == 6);  // Wan tiny: d = 32
  CHECK(rope_split(16).h == 5);
  CHECK(rope_split(64).t == 22);  // Wan 14B: d = 128 -> 22, 21, 21
  CHECK(rope_split(64).w == 21);
  CHECK(rope_split(3).t == 1);

  const std::size_t pairs = 16, f = 2, h = 3, w = 1;
  std::vector<float> cos(pairs), sin(pairs);
  rope_table_row(f, h, w, pairs, cos.data(), sin.data());
  const std::size_t sections[3][3] = {{0, 6, f}, {6, 5, h}, {11, 5, w}};  // first pair, pairs, position
  for (const auto& s : sections)
    for (std::size_t j = 0; j < s[1]; ++j) {
      const double angle = static_cast<double>(s[2]) * std::pow(10000.0, -static_cast<double>(j) / s[1]);
      CHECK(cos[s[0] + j] == doctest::Approx(std::cos(angle)).epsilon(1e-7));
      CHECK(sin[s[0] + j] == doctest::Approx(std::sin(angle)).epsilon(1e-7));
    }

  auto x = random_vector(2 * pairs, 21);
  const auto x0 = x;
  rope_rotate_row(x.data(), cos.data(), sin.data(), pairs);
  for (std::size_t i = 0; i < pairs; ++i) {
    const std::complex<double> z = std::complex<double>(x0[2 * i], x0[2 * i + 1]) *
                                   std::complex<double>(cos[i], sin[i]);
    CHECK(x[2 * i] == doctest::Approx(z.real()).epsilon(1e-6));
    CHECK(x[2 * i + 1] == doctest::Approx(z.imag()).epsilon(1e-6));
  }
}

TEST_CASE("time_sinusoid puts the cos half first, argument in double") {
  const std::size_t dim = 256, half = dim / 2;
  const double t = 999.0;
  for (std::size_t j = 0; j < half; ++j) {
    const double arg = t * std::pow(10000.0, -static_cast<double>(j) / half);
    CHECK(time_sinusoid(t, j, dim) == static_cast<float>(std::cos(arg)));
    CHECK(time_sinusoid(t, half + j, dim) == static_cast<float>(std::sin(arg)));
  }
}

TEST_CASE("attention_row equals a double softmax(q k^T * scale) v, also for large scores") {
  const std::size_t d = 32, heads = 3, n_keys = 37, ld = heads * d;
  const auto q = random_vector(ld, 31, -3.0f, 3.0f), k = random_vector(n_keys * ld, 32, -3.0f, 3.0f),
             v = random_vector(n_keys * ld, 33);
  std::vector<float> scores(n_keys), out(ld);
  for (const float scale : {1.0f / std::sqrt(32.0f), 50.0f}) {  // 50: exp would overflow unshifted
    for (std::size_t h = 0; h < heads; ++h) {
      attention_row(q.data() + h * d, k.data() + h * d, v.data() + h * d, n_keys, ld, d, scale, scores.data(),
                    out.data() + h * d);
      std::vector<double> s(n_keys), want(d, 0.0);
      double mx = -1e300, sum = 0.0;
      for (std::size_t j = 0; j < n_keys; ++j) {
        double dot = 0.0;
        for (std::size_t c = 0; c < d; ++c) dot += static_cast<double>(q[h * d + c]) * k[j * ld + h * d + c];
        s[j] = dot * scale;
        mx = std::max(mx, s[j]);
      }
      for (auto& e : s) sum += (e = std::exp(e - mx));
      for (std::size_t j = 0; j < n_keys; ++j)
        for (std::size_t c = 0; c < d; ++c) want[c] += s[j] / sum * v[j * ld + h * d + c];
      CHECK(max_abs_diff(out.data() + h * d, want.data(), d) < 1e-5);
    }
  }
}

TEST_CASE("gated and plain residual rows") {
  std::vector<float> x = {1, 2, 3}, y = {4, 5, 6}, gate = {0.5f, -1, 0};
  gated_residual_row(x.data(), y.data(), gate.data(), 3);
  CHECK(x == std::vector<float>{3, -3, 3});
  residual_row(x.data(), y.data(), 3);
  CHECK(x == std::vector<float>{7, 2, 9});
}

TEST_CASE("patchify orders (c, a, b, e) channel-slowest; unpatchify reads channel-fastest") {
  // Latent [C=2, F=3, H=5, W=4] with patch (1, 2, 2): grid floors to (3, 2, 2); row 4 is dropped.
  const std::size_t C = 2, F = 3, H = 5, W = 4;
  const patch_grid g{1, 2, 2, 3, 2, 2};
  std::vector<float> x(C * F * H * W);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i);
  const std::size_t s = (1 * g.gh + 1) * g.gw + 0;  // f=1, h=1, w=0
  std::vector<float> vec(C * 4);
  patchify_token(x.data(), C, F, H, W, g, s, vec.data());
  for (std::size_t c = 0; c < C; ++c)
    for (std::size_t b = 0; b < 2; ++b)
      for (std::size_t e = 0; e < 2; ++e)
        CHECK(vec[(c * 2 + b) * 2 + e] == x[((c * F + 1) * H + 2 + b) * W + 0 + e]);

  std::vector<float> out(C * 3 * 4 * 4, -1.0f), token(C * 4);
  for (std::size_t i = 0; i < token.size(); ++i) token[i] = static_cast<float>(100 + i);
  unpatchify_token(token.data(), C, g, s, out.data());
  for (std::size_t c = 0; c < C; ++c)
    for (std::size_t b = 0; b < 2; ++b)
      for (std::size_t e = 0; e < 2; ++e) CHECK(out[((c * 3 + 1) * 4 + 2 + b) * 4 + e] == token[(b * 2 + e) * C + c]);
}

TEST_CASE("linear: portable GEMM against double, fixed order, row ranges, bf16 and BLAS") {
  // K spans several k blocks with a ragged tail; M and N are not multiples of the tiles.
  const std::size_t M = 11, K = 600, N = 37;
  auto x = random_vector(M * K, 41), w = random_vector(N * K, 42, -0.1f, 0.1f), b = random_vector(N, 43);
  std::vector<float> y(M * N);
  linear(x.data(), M, K, view_of(w, {static_cast<std::int64_t>(N), static_cast<std::int64_t>(K)}),
         view_of(b, {static_cast<std::int64_t>(N)}), y.data(), gemm_path::portable);
  std::vector<double> want(M * N);
  for (std::size_t m = 0; m < M; ++m)
    for (std::size_t n = 0; n < N; ++n) {
      double acc = b[n];
      for (std::size_t k = 0; k < K; ++k) acc += static_cast<double>(x[m * K + k]) * w[n * K + k];
      want[m * N + n] = acc;
    }
  CHECK(max_abs_diff(y.data(), want.data(), M * N) < 1e-5);
  const tensor_view wv = view_of(w, {static_cast<std::int64_t>(N), static_cast<std::int64_t>(K)});
  const tensor_view bv = view_of(b, {static_cast<std::int64_t>(N)});

  SUBCASE("row ranges and single rows of x are bit-identical to the full product") {
    std::vector<float> chunked(M * N, 0.0f);
    for (std::size_t n0 = 0; n0 < N; n0 += 5) {
      const std::size_t n1 = std::min(N, n0 + 5);
      linear_rows(x.data(), M, K, row_slice(wv, n0, n1), row_slice(bv, n0, n1), n0, chunked.data(), N);
    }
    CHECK(chunked == y);
    std::vector<float> row(N);
    for (std::size_t m = 0; m < M; ++m) {
      linear(x.data() + m * K, 1, K, wv, bv, row.data());
      CHECK(std::equal(row.begin(), row.end(), y.begin() + static_cast<std::ptrdiff_t>(m * N)));
    }
  }

  SUBCASE("bf16 weights equal f32 weights rounded to bf16, bit for bit") {
    auto wb = to_bf16(w);
    auto bb = to_bf16(b);
    auto wr = bf16_rounded(w), br = bf16_rounded(b);
    std::vector<float> y_bf16(M * N), y_rounded(M * N);
    linear(x.data(), M, K, view_of(wb, wv.dims()), view_of(bb, bv.dims()), y_bf16.data());
    linear(x.data(), M, K, view_of(wr, wv.dims()), view_of(br, bv.dims()), y_rounded.data());
    CHECK(y_bf16 == y_rounded);
    // A BLAS cannot take bf16: the blas path falls back to the portable one.
    CHECK(effective_gemm_path(gemm_path::blas, dtype::bf16) == gemm_path::portable);
    linear(x.data(), M, K, view_of(wb, wv.dims()), view_of(bb, bv.dims()), y_bf16.data(), gemm_path::blas);
    CHECK(y_bf16 == y_rounded);
  }

  SUBCASE("the blas path agrees with double; its row-range form too") {
    MESSAGE("BLAS available: ", blas_available());
    std::vector<float> yb(M * N), chunked(M * N);
    linear(x.data(), M, K, wv, bv, yb.data(), gemm_path::blas);
    CHECK(max_abs_diff(yb.data(), want.data(), M * N) < 1e-5);
    linear_rows(x.data(), M, K, row_slice(wv, 3, N), row_slice(bv, 3, N), 3, chunked.data(), N, gemm_path::blas);
    linear_rows(x.data(), M, K, row_slice(wv, 0, 3), row_slice(bv, 0, 3), 0, chunked.data(), N, gemm_path::blas);
    CHECK(max_abs_diff(chunked.data(), want.data(), M * N) < 1e-5);
  }

  SUBCASE("no bias, and shape errors name the mismatch") {
    std::vector<float> y0(M * N);
    linear(x.data(), M, K, wv, tensor_view{}, y0.data());
    for (std::size_t i = 0; i < M * N; ++i) CHECK(y0[i] + b[i % N] == doctest::Approx(y[i]).epsilon(1e-6));
    CHECK_THROWS_WITH_AS(linear(x.data(), M, K + 1, wv, bv, y0.data()),
                         "linear: weight of shape [37,600] is not [N, K] with K = 601", error);
    CHECK_THROWS_WITH_AS(linear_rows(x.data(), M, K, wv, bv, 1, y0.data(), N),
                         "linear: output columns [1, 38) exceed the leading dimension 37", error);
  }
}

TEST_CASE("multi_head_attention loops heads over [S, heads*d] rows") {
  const std::size_t S = 5, L = 9, heads = 2, d = 4, ld = heads * d;
  const auto q = random_vector(S * ld, 51), k = random_vector(L * ld, 52), v = random_vector(L * ld, 53);
  std::vector<float> out(S * ld), scores(L), row(d);
  multi_head_attention(q.data(), S, k.data(), v.data(), L, heads, d, scores.data(), out.data());
  for (std::size_t s = 0; s < S; ++s)
    for (std::size_t h = 0; h < heads; ++h) {
      attention_row(q.data() + s * ld + h * d, k.data() + h * d, v.data() + h * d, L, ld, d, 0.5f, scores.data(),
                    row.data());
      CHECK(std::equal(row.begin(), row.end(), out.begin() + static_cast<std::ptrdiff_t>(s * ld + h * d)));
    }
}

TEST_CASE("wan_config: Wan's config.json, defaults, and errors naming key and file") {
  const auto tiny = wan::config::load(UNSHARD_TEST_DATA_DIR "/wan_tiny_a.config.json");
  CHECK(tiny.dim == 128);
  CHECK(tiny.ffn_dim == 384);
  CHECK(tiny.num_heads == 4);
  CHECK(tiny.head_dim() == 32);
  CHECK(tiny.text_len == 16);
  CHECK(tiny.eps == 1e-6);

  // Wan2.1-T2V-14B's config.json omits text_dim, patch_size, qk_norm, cross_attn_norm, window_size.
  const auto big = wan::config::from_json(nlohmann::json::parse(R"({"_class_name": "WanModel", "dim": 5120,
      "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 40,
      "num_layers": 40, "out_dim": 16, "text_len": 512})"));
  CHECK(big.text_dim == 4096);
  CHECK(big.patch_size == std::array<std::int64_t, 3>{1, 2, 2});
  CHECK(big.qk_norm);
  CHECK(big.cross_attn_norm);
  CHECK(big.head_dim() == 128);
  const auto defaults = wan::config::from_json(nlohmann::json::object());
  CHECK(defaults.dim == 2048);
  CHECK(defaults.num_layers == 32);

  const auto parse = [](const char* text) { return wan::config::from_json(nlohmann::json::parse(text), "c.json"); };
  CHECK_THROWS_WITH_AS(parse(R"({"window_size": [4, 4]})"),
                       "wan config 'c.json': key 'window_size' is [4,4]: window_size local attention is not "
                       "supported (only [-1,-1], global attention)",
                       error);
  CHECK_THROWS_WITH_AS(parse(R"({"dim": 100, "num_heads": 16})"),
                       "wan config 'c.json': key 'num_heads' (16) does not divide key 'dim' (100)", error);
  CHECK_THROWS_WITH_AS(parse(R"({"dim": 96, "num_heads": 32})"),
                       "wan config 'c.json': head_dim = dim / num_heads = 96 / 32 = 3 is odd (rope needs pairs)",
                       error);
  CHECK_THROWS_WITH_AS(parse(R"({"ffn_dim": "big"})"),
                       "wan config 'c.json': key 'ffn_dim' must be a positive integer, got \"big\"", error);
  CHECK_THROWS_WITH_AS(parse(R"({"num_layers": 0})"),
                       "wan config 'c.json': key 'num_layers' must be a positive integer, got 0", error);
  CHECK_THROWS_WITH_AS(parse(R"({"qk_norm": 1})"), "wan config 'c.json': key 'qk_norm' must be true or false, got 1",
                       error);
  CHECK_THROWS_WITH_AS(parse(R"({"patch_size": [1, 2]})"),
                       "wan config 'c.json': key 'patch_size' must be an array of 3 integers, got [1,2]", error);
  CHECK_THROWS_WITH_AS(wan::config::load("/nonexistent/config.json"),
                       "wan config '/nonexistent/config.json': cannot open the file", error);
}

TEST_CASE("wan::model: layers, sub-units, parameter names and buffers follow the config") {
  auto cfg = wan::config::load(UNSHARD_TEST_DATA_DIR "/wan_tiny_a.config.json");
  cfg.num_layers = 3;
  cfg.qk_norm = false;  // norm_q/norm_k disappear from the declarations
  const wan::model m(cfg, {{16, 5, 11, 7}, 3}, {dtype::bf16, gemm_path::portable, true});
  REQUIRE(m.layer_count() == 5);
  CHECK(m.layer(0).name() == "embeddings");
  CHECK(m.layer(2).name() == "blocks.1");
  CHECK(m.layer(4).name() == "head");
  CHECK(m.layer(0).subunit_name(1) == "time");
  CHECK(m.layer(3).subunit_name(2) == "ffn");
  CHECK_THROWS_WITH_AS(m.layer(3).subunit_name(3), "wan layer 'blocks.2': sub-unit 3 out of range (3 sub-units)", error);

  const auto sa = m.layer(2).parameters(0);
  REQUIRE(sa.size() == 9);
  CHECK(sa[0].name == "blocks.1.modulation");
  CHECK(sa[0].dims == shape{1, 6, 128});
  CHECK(sa[0].type == dtype::bf16);
  CHECK(sa[8].name == "blocks.1.self_attn.o.bias");
  const auto ca = m.layer(2).parameters(1);
  CHECK(ca.front().name == "blocks.1.norm3.weight");
  CHECK(ca.size() == 10);
  const auto pe = m.layer(0).parameters(0);
  CHECK(pe[0].dims == shape{128, 16, 1, 2, 2});
  const auto head = m.layer(4).parameters(0);
  CHECK(head[1].name == "head.head.weight");
  CHECK(head[1].dims == shape{64, 128});

  // The grid floors as Conv3d does: F=5, H=11, W=7, patch (1,2,2) -> (5, 5, 3), 75 tokens, output [16, 5, 10, 6].
  CHECK(m.geometry().tokens == 75);
  CHECK(m.geometry().output_shape() == std::array<std::int64_t, 4>{16, 5, 10, 6});

  const auto bufs = m.buffers();
  const auto find = [&](const std::string& name) {
    const auto it = std::find_if(bufs.begin(), bufs.end(), [&](const buffer_spec& b) { return b.name == name; });
    REQUIRE(it != bufs.end());
    return *it;
  };
  CHECK(find("block_outputs").bytes == 3 * 75 * 128 * 4);
  CHECK(find("block_outputs").category == memory_category::activations);
  CHECK(find("ffn_hidden").bytes == 75 * 384 * 4);
  CHECK(find("ffn_hidden").category == memory_category::workspace);
  CHECK(find("k").bytes == 75 * 128 * 4);  // max(S, text_len) rows
  CHECK(find("input.context").bytes == 16 * 64 * 4);
  CHECK(find("output").bytes == 16 * 5 * 10 * 6 * 4);

  CHECK_THROWS_WITH_AS(wan::model(cfg, {{8, 5, 11, 7}, 3}), "wan workload: latent has 8 channels but the config's in_dim is 16",
                       error);
  CHECK_THROWS_WITH_AS(wan::model(cfg, {{16, 5, 11, 7}, 17}),
                       "wan workload: context length 17 is outside [0, text_len = 16]", error);
  CHECK_THROWS_WITH_AS(wan::model(cfg, {{16, 5, 1, 7}, 3}),
                       "wan workload: latent H=1 is smaller than the patch size 2", error);
}
