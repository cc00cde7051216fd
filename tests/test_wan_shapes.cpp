// The Wan model on shapes the reference vectors do not cover -- a temporal patch (pt = 2), a grid
// that floors, head_dim 48 (rope sections 8/8/8), more text rows than tokens, out_dim != in_dim,
// qk_norm and cross_attn_norm off and on -- against a plain double-precision forward written
// directly from the description in tests/data/README.md (no shared kernels).
#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "unshard/models/wan/model.hpp"

using namespace unshard;

namespace {

using vec = std::vector<double>;
using params = std::map<std::string, vec>;

struct naive_wan {
  const wan::config& c;
  const params& p;

  const vec& at(const std::string& n) const { return p.at(n); }

  // y[rows, out] = x[rows, in] W^T + b
  vec linear(const vec& x, std::size_t rows, const std::string& name) const {
    const vec &w = at(name + ".weight"), &b = at(name + ".bias");
    const std::size_t out = b.size(), in = w.size() / out;
    vec y(rows * out);
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t o = 0; o < out; ++o) {
        double acc = b[o];
        for (std::size_t i = 0; i < in; ++i) acc += x[r * in + i] * w[o * in + i];
        y[r * out + o] = acc;
      }
    return y;
  }
  static double silu(double v) { return v / (1.0 + std::exp(-v)); }
  static double gelu(double v) {
    return 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / std::acos(-1.0)) * (v + 0.044715 * v * v * v)));
  }
  vec layer_norm(const vec& x, std::size_t rows, std::size_t n) const {
    vec y(x.size());
    for (std::size_t r = 0; r < rows; ++r) {
      double mean = 0, var = 0;
      for (std::size_t i = 0; i < n; ++i) mean += x[r * n + i] / n;
      for (std::size_t i = 0; i < n; ++i) var += (x[r * n + i] - mean) * (x[r * n + i] - mean) / n;
      for (std::size_t i = 0; i < n; ++i) y[r * n + i] = (x[r * n + i] - mean) / std::sqrt(var + c.eps);
    }
    return y;
  }
  void rms_norm(vec& x, std::size_t rows, std::size_t n, const vec& w) const {
    for (std::size_t r = 0; r < rows; ++r) {
      double ms = 0;
      for (std::size_t i = 0; i < n; ++i) ms += x[r * n + i] * x[r * n + i] / n;
      for (std::size_t i = 0; i < n; ++i) x[r * n + i] = x[r * n + i] / std::sqrt(ms + c.eps) * w[i];
    }
  }
  vec attention(const vec& q, std::size_t sq, const vec& k, const vec& v, std::size_t sk) const {
    const std::size_t D = static_cast<std::size_t>(c.dim), N = static_cast<std::size_t>(c.num_heads), d = D / N;
    vec out(sq * D, 0.0);
    for (std::size_t h = 0; h < N; ++h)
      for (std::size_t i = 0; i < sq; ++i) {
        vec s(sk);
        double mx = -1e300, sum = 0;
        for (std::size_t j = 0; j < sk; ++j) {
          double dot = 0;
          for (std::size_t e = 0; e < d; ++e) dot += q[i * D + h * d + e] * k[j * D + h * d + e];
          mx = std::max(mx, s[j] = dot / std::sqrt(static_cast<double>(d)));
        }
        for (auto& x : s) sum += (x = std::exp(x - mx));
        for (std::size_t j = 0; j < sk; ++j)
          for (std::size_t e = 0; e < d; ++e) out[i * D + h * d + e] += s[j] / sum * v[j * D + h * d + e];
      }
    return out;
  }

  // Returns the output latent [out_dim, gf*pt, gh*ph, gw*pw].
  vec forward(const vec& x, const std::array<std::size_t, 4>& xs, double t, const vec& context, std::size_t L) const {
    const std::size_t D = c.dim, pt = c.patch_size[0], ph = c.patch_size[1], pw = c.patch_size[2];
    const std::size_t C = xs[0], F = xs[1], H = xs[2], W = xs[3];
    const std::size_t gf = F / pt, gh = H / ph, gw = W / pw, S = gf * gh * gw, TL = c.text_len;
    // 1. patch embedding: the conv as a dot with each patch, (c, a, b, e) order
    vec tokens(S * D);
    const vec &pw_ = at("patch_embedding.weight"), &pb = at("patch_embedding.bias");
    for (std::size_t f = 0; f < gf; ++f)
      for (std::size_t h = 0; h < gh; ++h)
        for (std::size_t w = 0; w < gw; ++w)
          for (std::size_t o = 0; o < D; ++o) {
            double acc = pb[o];
            std::size_t i = 0;
            for (std::size_t ch = 0; ch < C; ++ch)
              for (std::size_t a = 0; a < pt; ++a)
                for (std::size_t b = 0; b < ph; ++b)
                  for (std::size_t e = 0; e < pw; ++e, ++i)
                    acc += pw_[o * C * pt * ph * pw + i] * x[((ch * F + f * pt + a) * H + h * ph + b) * W + w * pw + e];
            tokens[((f * gh + h) * gw + w) * D + o] = acc;
          }
    // 2. time
    const std::size_t half = c.freq_dim / 2;
    vec sinus(c.freq_dim);
    for (std::size_t j = 0; j < half; ++j) {
      const double arg = t * std::pow(10000.0, -static_cast<double>(j) / half);
      sinus[j] = std::cos(arg);
      sinus[half + j] = std::sin(arg);
    }
    vec hdn = linear(sinus, 1, "time_embedding.0");
    for (auto& v : hdn) v = silu(v);
    const vec e = linear(hdn, 1, "time_embedding.2");
    vec se = e;
    for (auto& v : se) v = silu(v);
    const vec e0 = linear(se, 1, "time_projection.1");
    // 3. text
    vec ctx_in(TL * c.text_dim, 0.0);
    for (std::size_t i = 0; i < L * c.text_dim; ++i) ctx_in[i] = context[i];
    vec th = linear(ctx_in, TL, "text_embedding.0");
    for (auto& v : th) v = gelu(v);
    const vec ctx = linear(th, TL, "text_embedding.2");
    // 4. rope angles per token and pair
    const std::size_t d = D / c.num_heads, cp = d / 2, ch_ = cp / 3, ct = cp - 2 * ch_;
    const auto angle = [&](std::size_t s, std::size_t i) {
      const std::size_t f = s / (gh * gw), h = (s / gw) % gh, w = s % gw;
      if (i < ct) return f * std::pow(10000.0, -static_cast<double>(i) / ct);
      if (i < ct + ch_) return h * std::pow(10000.0, -static_cast<double>(i - ct) / ch_);
      return w * std::pow(10000.0, -static_cast<double>(i - ct - ch_) / ch_);
    };
    const auto rope = [&](vec& q) {
      for (std::size_t s = 0; s < S; ++s)
        for (std::size_t h = 0; h < D / d; ++h)
          for (std::size_t i = 0; i < cp; ++i) {
            double& a = q[s * D + h * d + 2 * i];
            double& b = q[s * D + h * d + 2 * i + 1];
            const double th = angle(s, i), ra = a * std::cos(th) - b * std::sin(th), rb = a * std::sin(th) + b * std::cos(th);
            a = ra;
            b = rb;
          }
    };
    // 5. blocks
    for (std::int64_t blk = 0; blk < c.num_layers; ++blk) {
      const std::string pre = "blocks." + std::to_string(blk) + ".";
      vec m(6 * D);
      for (std::size_t i = 0; i < 6 * D; ++i) m[i] = at(pre + "modulation")[i] + e0[i];
      vec hm = layer_norm(tokens, S, D);
      for (std::size_t s = 0; s < S; ++s)
        for (std::size_t i = 0; i < D; ++i) hm[s * D + i] = hm[s * D + i] * (1 + m[D + i]) + m[i];
      vec q = linear(hm, S, pre + "self_attn.q"), k = linear(hm, S, pre + "self_attn.k");
      const vec v = linear(hm, S, pre + "self_attn.v");
      if (c.qk_norm) {
        rms_norm(q, S, D, at(pre + "self_attn.norm_q.weight"));
        rms_norm(k, S, D, at(pre + "self_attn.norm_k.weight"));
      }
      rope(q);
      rope(k);
      vec y = linear(attention(q, S, k, v, S), S, pre + "self_attn.o");
      for (std::size_t s = 0; s < S; ++s)
        for (std::size_t i = 0; i < D; ++i) tokens[s * D + i] += y[s * D + i] * m[2 * D + i];

      vec hc = tokens;
      if (c.cross_attn_norm) {
        hc = layer_norm(tokens, S, D);
        for (std::size_t s = 0; s < S; ++s)
          for (std::size_t i = 0; i < D; ++i)
            hc[s * D + i] = hc[s * D + i] * at(pre + "norm3.weight")[i] + at(pre + "norm3.bias")[i];
      }
      vec cq = linear(hc, S, pre + "cross_attn.q"), ck = linear(ctx, TL, pre + "cross_attn.k");
      const vec cv = linear(ctx, TL, pre + "cross_attn.v");
      if (c.qk_norm) {
        rms_norm(cq, S, D, at(pre + "cross_attn.norm_q.weight"));
        rms_norm(ck, TL, D, at(pre + "cross_attn.norm_k.weight"));
      }
      y = linear(attention(cq, S, ck, cv, TL), S, pre + "cross_attn.o");
      for (std::size_t i = 0; i < S * D; ++i) tokens[i] += y[i];

      vec h2 = layer_norm(tokens, S, D);
      for (std::size_t s = 0; s < S; ++s)
        for (std::size_t i = 0; i < D; ++i) h2[s * D + i] = h2[s * D + i] * (1 + m[4 * D + i]) + m[3 * D + i];
      vec f1 = linear(h2, S, pre + "ffn.0");
      for (auto& val : f1) val = gelu(val);
      y = linear(f1, S, pre + "ffn.2");
      for (std::size_t s = 0; s < S; ++s)
        for (std::size_t i = 0; i < D; ++i) tokens[s * D + i] += y[s * D + i] * m[5 * D + i];
    }
    // 6. head, 7. unpatchify (channel fastest in the head's vector)
    vec hh = layer_norm(tokens, S, D);
    for (std::size_t s = 0; s < S; ++s)
      for (std::size_t i = 0; i < D; ++i)
        hh[s * D + i] = hh[s * D + i] * (1 + at("head.modulation")[D + i] + e[i]) + at("head.modulation")[i] + e[i];
    const vec ho = linear(hh, S, "head.head");
    const std::size_t Co = c.out_dim, P = pt * ph * pw, OF = gf * pt, OH = gh * ph, OW = gw * pw;
    vec out(Co * OF * OH * OW);
    for (std::size_t s = 0; s < S; ++s) {
      const std::size_t f = s / (gh * gw), h = (s / gw) % gh, w = s % gw;
      for (std::size_t a = 0; a < pt; ++a)
        for (std::size_t b = 0; b < ph; ++b)
          for (std::size_t ee = 0; ee < pw; ++ee)
            for (std::size_t ch = 0; ch < Co; ++ch)
              out[((ch * OF + f * pt + a) * OH + h * ph + b) * OW + w * pw + ee] =
                  ho[s * Co * P + ((a * ph + b) * pw + ee) * Co + ch];
    }
    return out;
  }
};

void check_shape_case(const wan::config& cfg, std::array<std::int64_t, 4> latent, std::int64_t L, dtype storage) {
  const wan::model m(cfg, {latent, L}, {storage, gemm_path::portable, false});
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);

  // Random parameters (scaled by 1/sqrt(fan-in) so activations stay O(1)), stored as the model
  // declares them and, for the naive forward, as the exact values the model sees.
  params naive_params;
  std::vector<std::vector<std::byte>> storage_bytes;
  std::vector<std::vector<param_views>> views;
  for (std::size_t i = 0; i < m.layer_count(); ++i) {
    views.emplace_back();
    for (std::size_t j = 0; j < m.layer(i).subunit_count(); ++j) {
      std::vector<tensor_view> v;
      for (const auto& spec : m.layer(i).parameters(j)) {
        const std::size_t n = static_cast<std::size_t>(spec.dims.numel());
        const double scale = spec.dims.rank() >= 2 && !spec.name.ends_with("modulation")
                                 ? 1.0 / std::sqrt(static_cast<double>(n / spec.dims[0]))
                                 : 0.5;
        storage_bytes.emplace_back(spec.bytes());
        const tensor_view t(storage_bytes.back().data(), spec.type, spec.dims);
        vec& values = naive_params[spec.name];
        for (std::size_t e = 0; e < n; ++e) {
          t.store(e, static_cast<float>(dist(rng) * scale));
          values.push_back(t.load(e));
        }
        v.push_back(t);
      }
      views.back().emplace_back(std::move(v));
    }
  }
  std::vector<float> x(static_cast<std::size_t>(latent[0] * latent[1] * latent[2] * latent[3])),
      context(static_cast<std::size_t>(L * cfg.text_dim));
  for (auto& v : x) v = dist(rng);
  for (auto& v : context) v = dist(rng);
  const float t = 321.0f;

  std::vector<std::vector<std::byte>> arena;
  buffer_set buffers;
  for (const auto& b : m.buffers()) {
    arena.emplace_back(b.bytes);
    buffers.add(b.name, arena.back());
  }
  wan::state s = m.make_state(buffers);
  m.set_inputs(s, x, t, context);
  for (std::size_t i = 0; i < m.layer_count(); ++i)
    for (std::size_t j = 0; j < m.layer(i).subunit_count(); ++j) m.layer(i).forward(j, views[i][j], s);

  const naive_wan naive{cfg, naive_params};
  const vec want = naive.forward(vec(x.begin(), x.end()),
                                 {static_cast<std::size_t>(latent[0]), static_cast<std::size_t>(latent[1]),
                                  static_cast<std::size_t>(latent[2]), static_cast<std::size_t>(latent[3])},
                                 t, vec(context.begin(), context.end()), static_cast<std::size_t>(L));
  const tensor_view got = m.output(s);
  REQUIRE(static_cast<std::size_t>(got.numel()) == want.size());
  double err = 0, ref_max = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::abs(got.load(i) - want[i]));
    ref_max = std::max(ref_max, std::abs(want[i]));
  }
  MESSAGE("qk_norm ", cfg.qk_norm, " cross_attn_norm ", cfg.cross_attn_norm, " ", name_of(storage),
          ": max|err| vs double ", err, " (max|ref| ", ref_max, ")");
  CHECK(err <= 1e-5 * std::max(1.0, ref_max));
}

}  // namespace

TEST_CASE("wan::model matches a plain double forward on shapes the vectors do not cover") {
  wan::config cfg;
  cfg.dim = 96;
  cfg.num_heads = 2;  // head_dim 48: rope pairs 24 -> sections 8, 8, 8
  cfg.ffn_dim = 160;
  cfg.freq_dim = 32;
  cfg.text_dim = 24;
  cfg.text_len = 40;  // more text rows than tokens
  cfg.in_dim = 4;
  cfg.out_dim = 6;
  cfg.num_layers = 2;
  cfg.patch_size = {2, 2, 2};
  // Latent [4, 5, 7, 9] floors to a (2, 3, 4) grid: 24 tokens; output [6, 4, 6, 8].
  for (const bool qk : {false, true})
    for (const bool cross : {false, true}) {
      cfg.qk_norm = qk;
      cfg.cross_attn_norm = cross;
      check_shape_case(cfg, {4, 5, 7, 9}, 3, dtype::f32);
    }
  check_shape_case(cfg, {4, 5, 7, 9}, 0, dtype::bf16);  // no context rows at all; bf16 weights
}
