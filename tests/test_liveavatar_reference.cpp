// Live Avatar's CausalWanModel_S2V against the official references (tests/data/liveavatar_*.safetensors):
// the recorded calls (sink, a, b) run layer by layer, and every ref.* tensor is compared with what
// the model holds at that point, within 1e-5 * max(1, max|ref|). Nothing depends on tiny_a's sizes:
// config, workload and calls come from the config.json and the inputs, so another
// liveavatar_<name>.safetensors placed next to it is checked the same way.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "unshard/io/checkpoint.hpp"
#include "unshard/models/liveavatar/calls.hpp"
#include "unshard/models/liveavatar/model.hpp"

#include "support/allocation_count.hpp"
#include "support/liveavatar_case.hpp"

using namespace unshard;
using namespace unshard::testing;

namespace {

// Every ref.* tensor compared, with its error relative to the tolerance.
struct comparisons {
  const checkpoint& file;
  std::map<std::string, double> excess;  // max|got - ref| / (1e-5 max(1, max|ref|))
  std::map<std::string, double> max_diff;

  // got(i) is element i of the ref tensor in its own (row-major) order.
  void check(const std::string& name, const std::function<float(std::size_t)>& got) {
    CAPTURE(name);
    REQUIRE(file.find(name) != nullptr);
    const std::vector<float> ref = read_f32(file, name);
    double diff = 0, scale = 1;
    for (std::size_t i = 0; i < ref.size(); ++i) {
      diff = std::max(diff, static_cast<double>(std::fabs(got(i) - ref[i])));
      scale = std::max(scale, static_cast<double>(std::fabs(ref[i])));
    }
    excess[name] = diff / (1e-5 * scale);
    max_diff[name] = diff;
    CHECK(diff <= 1e-5 * scale);
  }
  void check_rows(const std::string& name, const float* p) {
    check(name, [p](std::size_t i) { return p[i]; });
  }
  // A ref stored [D, n] (channels first: Conv3d outputs) against tokens [n, D].
  void check_channels_first(const std::string& name, const float* tokens, std::size_t n, std::size_t D) {
    check(name, [=](std::size_t i) { return tokens[(i % n) * D + i / n]; });
  }
};

// The model's parameters straight from the file (f32 views into the mapped file).
std::vector<std::vector<param_views>> file_params(const s2v::model& m, const checkpoint& f) {
  std::vector<std::vector<param_views>> all;
  for (std::size_t l = 0; l < m.layer_count(); ++l) {
    std::vector<param_views> subs;
    for (std::size_t s = 0; s < m.layer(l).subunit_count(); ++s) {
      std::vector<tensor_view> views;
      for (const auto& p : m.layer(l).parameters(s)) views.push_back(f.view(p.name));
      subs.emplace_back(std::move(views));
    }
    all.push_back(std::move(subs));
  }
  return all;
}

}  // namespace

TEST_CASE("S2V model: every ref.* tensor of the recorded stream, layer by layer") {
  for (const std::string& name : liveavatar_files(/*denoise_loops=*/false)) {
    CAPTURE(name);
    const stream_case c = load_case(name);
    const s2v::model m(c.config, c.work, {dtype::f32, gemm_path::portable, false});
    const s2v::geometry& g = m.geometry();
    test_buffers bufs(m.buffers());
    s2v::state s = m.make_state(bufs.set);
    const auto params = file_params(m, c.file);
    comparisons cmp{c.file, {}, {}};
    const std::size_t D = g.dim, Lc = g.cond_tokens, L = g.block_tokens, fs = g.frame_tokens;
    std::size_t streamed = 0;

    for (const s2v::call_spec& call : c.spec.calls) {
      CAPTURE(call.name);
      const std::string P = "ref." + call.name + ".";
      const auto has = [&](const std::string& n) { return c.file.find(P + n) != nullptr; };
      std::size_t cs = 0;
      if (call.sink) {
        m.begin_sink(s, s2v::sink_of(call, c.file));
      } else {
        const s2v::step_inputs in = s2v::step_of(m, call, c.file);
        m.begin_step(s, in);
        cs = s.call.current_start;
        if (c.file.find("input.cond_rope_rollout"))
          CHECK(static_cast<float>(s.call.roll) == read_f32(c.file, "input.cond_rope_rollout").at(streamed));
        ++streamed;
      }
      const std::size_t S = s.call.tokens;
      for (std::size_t l = 0; l < m.layer_count(); ++l) {
        const s2v::layer& layer = m.layer(l);
        for (std::size_t sub = 0; sub < layer.subunit_count(); ++sub) {
          const std::size_t allocs = allocation_count.load();
          layer.forward(sub, params[l][sub], s);
          CHECK(allocation_count.load() == allocs);  // a sub-unit allocates nothing
          // Compare what this sub-unit left in the state.
          const std::string unit = layer.name() + "." + layer.subunit_name(sub);
          if (unit == "embeddings.patch_embedding") {
            cmp.check_channels_first(P + "patch_embedding.out", s.x, call.sink ? fs : L, D);
            cmp.check_rows(P + "rope.tokens.cos", s.rope_cos);
            cmp.check_rows(P + "rope.tokens.sin", s.rope_sin);
            if (!call.sink) {
              cmp.check_rows(P + "rope.cond.cos", s.rope_cond_cos);
              cmp.check_rows(P + "rope.cond.sin", s.rope_cond_sin);
            }
          } else if (unit == "embeddings.time") {
            cmp.check_rows(P + "time.sinusoid", s.time_sinusoid);
            cmp.check_rows(P + "time.e", s.e);
            cmp.check_rows(P + "time.e0", s.e0);
          } else if (unit == "embeddings.text_embedding") {
            cmp.check_rows(P + "text_embedding.out", s.ctx);
          } else if (unit == "frame_packer.proj_4x" && call.sink) {
            cmp.check_rows(P + "frame_packer.out", s.x + fs * D);
          } else if (layer.name() == "cond_encoder") {
            if (!call.sink) cmp.check_channels_first(P + "cond_encoder.out", s.proj, L, D);
            cmp.check_rows(P + "block.0.in", s.x);
          } else if (unit == "audio_encoder.conv1" && has("audio.weighted_feat")) {
            cmp.check_rows(P + "audio.weighted_feat", s.audio_feat);
          } else if (unit == "audio_encoder.final_linear" && has("audio.encoder_local")) {
            cmp.check_rows(P + "audio.encoder_local", s.audio_local);
            cmp.check_rows(P + "audio.encoder_global", s.audio_global);
          } else if (unit == "blocks.0.self_attn") {
            if (has("block.0.q_norm")) {
              // q and k after RMS, before rope: recomputed from the block's input with its own weights.
              const auto lay = s2v::detail::self_attn_layout(g);
              const param_views& p = params[l][sub];
              whole_params wp(p);
              std::vector<float> q(S * D), k(S * D);
              host_ops ops{g.gemm};
              ops.linear(s.norm, S, D, wp, lay.attn.q.weight, lay.attn.q.bias, q.data());
              ops.linear(s.norm, S, D, wp, lay.attn.k.weight, lay.attn.k.bias, k.data());
              ops.rms_norm(q.data(), S, D, g.eps, p[lay.attn.norm_q]);
              ops.rms_norm(k.data(), S, D, g.eps, p[lay.attn.norm_k]);
              cmp.check_rows(P + "block.0.q_norm", q.data());
              cmp.check_rows(P + "block.0.k_norm", k.data());
            }
            cmp.check_rows(P + "block.0.self_attn.in", s.norm);
            cmp.check_rows(P + "block.0.attn_q", s.q);
            cmp.check_rows(P + "block.0.cond_k_rope", call.sink ? s.k : s.cond_k_rope);
            cmp.check_rows(P + "block.0.self_attn.core", s.attn);
            cmp.check_rows(P + "block.0.self_attn.out", s.proj);
          } else if (unit == "blocks.0.cross_attn") {
            if (has("block.0.cross_attn.in")) cmp.check_rows(P + "block.0.cross_attn.in", s.norm);
            if (has("block.0.cross_attn.core")) cmp.check_rows(P + "block.0.cross_attn.core", s.attn);
            cmp.check_rows(P + "block.0.cross_attn.out", s.proj);
          } else if (layer.kind() == s2v::layer_kind::block && sub == 2) {
            const std::string b = "block." + std::to_string(layer.index()) + ".";
            if (layer.index() == 0) {
              if (has("block.0.ffn.in")) cmp.check_rows(P + "block.0.ffn.in", s.norm);
              cmp.check_rows(P + "block.0.ffn.out", s.proj);
            }
            if (has(b + "out_pre_audio")) cmp.check_rows(P + b + "out_pre_audio", s.x);
            if (c.config.injector_of(static_cast<std::int64_t>(layer.index())) < 0 || call.sink)
              cmp.check_rows(P + b + "out", s.x);
          } else if (layer.kind() == s2v::layer_kind::injector && !call.sink) {
            const std::string j = "audio_inj." + std::to_string(layer.index()) + ".";
            if (sub == 0 && has(j + "adain_out")) cmp.check_rows(P + j + "adain_out", s.norm);
            if (sub == 1) {
              if (has(j + "cross_attn_core")) cmp.check_rows(P + j + "cross_attn_core", s.attn);
              if (has(j + "cross_attn_out")) cmp.check_rows(P + j + "cross_attn_out", s.proj);
              const std::size_t block = static_cast<std::size_t>(c.config.audio_inject_layers[layer.index()]);
              cmp.check_rows(P + "block." + std::to_string(block) + ".out", s.x);
            }
          } else if (layer.name() == "head" && !call.sink) {
            cmp.check_rows(P + "output", s.output);
          }
        }
      }
      // The caches this call wrote.
      for (std::size_t i = 0; i < g.num_layers; ++i) {
        const std::string kv = "kv." + std::to_string(i) + ".";
        if (call.sink) {
          cmp.check_rows(P + kv + "cond_k", m.cond_cache(s, i, false, Lc).as<float>().data());
          cmp.check_rows(P + kv + "cond_v", m.cond_cache(s, i, true, Lc).as<float>().data());
        } else if (has(kv + "k")) {
          cmp.check_rows(P + kv + "k", m.noisy_cache(s, call.step, i, false, cs % g.noisy_slots, L).as<float>().data());
          cmp.check_rows(P + kv + "v", m.noisy_cache(s, call.step, i, true, cs % g.noisy_slots, L).as<float>().data());
        }
      }
      if (call.sink && has("kv.cond_end")) CHECK(static_cast<float>(s.cond_end()) == read_f32(c.file, P + "kv.cond_end")[0]);
    }
    // Every ref.* tensor of the file was compared (cond_end above, as an integer).
    std::size_t refs = 0;
    for (const auto& n : c.file.names())
      if (n.starts_with("ref.") && n != "ref.sink.kv.cond_end") {
        ++refs;
        CHECK_MESSAGE(cmp.excess.count(n) == 1, "not compared: ", n);
      }
    CHECK(cmp.excess.size() == refs);
    // The worst tensor of each family (the name without its call and block numbers).
    std::map<std::string, std::pair<double, std::string>> worst;
    for (const auto& [n, e] : cmp.excess) {
      std::string fam;
      for (char ch : n) fam += std::isdigit(static_cast<unsigned char>(ch)) ? 'N' : ch;
      if (e >= worst[fam].first) worst[fam] = {e, n};
    }
    for (const auto& [fam, w] : worst)
      MESSAGE(name, ": ", w.second, " max|diff| = ", cmp.max_diff[w.second], " (", w.first * 100, "% of tolerance)");
  }
}

TEST_CASE("S2V config: vectors config, flat config with official defaults, and refused flags") {
  const std::string dir = UNSHARD_TEST_DATA_DIR;
  const s2v::config a = s2v::config::load(dir + "/liveavatar_tiny_a.config.json");
  std::ifstream in(dir + "/liveavatar_tiny_a.config.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  const s2v::config flat = s2v::config::from_json(j["model"], "flat");
  CHECK(flat.dim == a.dim);
  CHECK(flat.audio_inject_layers == a.audio_inject_layers);
  // A flat Wan2.2-S2V config with only the 14B keys takes the constructor defaults elsewhere.
  nlohmann::json s2v = {{"dim", 5120}, {"ffn_dim", 13824}, {"num_heads", 40}, {"num_layers", 40}, {"cond_dim", 16},
                        {"audio_dim", 1024}, {"enable_adain", true}, {"zero_timestep", true},
                        {"enable_motioner", false}, {"enable_framepack", true}, {"framepack_drop_mode", "padd"},
                        {"audio_inject_layers", {0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39}}};
  const s2v::config big = s2v::config::from_json(s2v, "s2v.json");
  CHECK(big.text_len == 512);
  CHECK(big.text_dim == 4096);
  CHECK(big.freq_dim == 256);
  CHECK(big.num_audio_token == 4);
  CHECK(big.head_dim() == 128);
  const auto refused = [&](const char* key, nlohmann::json value) {
    nlohmann::json bad = s2v;
    bad[key] = value;
    const std::string quoted = std::string("'") + key + "'";
    CHECK_THROWS_WITH_AS(s2v::config::from_json(bad, "x.json"), doctest::Contains(quoted.c_str()), error);
  };
  refused("enable_motioner", true);
  refused("zero_timestep", false);
  refused("local_attn_size", 12);
  refused("audio_inject_layers", nlohmann::json::array({3, 99}));
  refused("dim", "wide");
  refused("num_heads", 7);
}

namespace {

// softmax(q Kᵀ/√d) V for one head, in double: the oracle for "which keys a call attends".
void oracle_attention(const float* q, const std::vector<const float*>& keys, const std::vector<const float*>& values,
                      std::size_t d, float* out) {
  std::vector<double> s(keys.size());
  double mx = -1e300, den = 0;
  for (std::size_t j = 0; j < keys.size(); ++j) {
    double dot = 0;
    for (std::size_t c = 0; c < d; ++c) dot += static_cast<double>(q[c]) * keys[j][c];
    s[j] = dot / std::sqrt(static_cast<double>(d));
    mx = std::max(mx, s[j]);
  }
  for (auto& v : s) den += (v = std::exp(v - mx));
  for (std::size_t c = 0; c < d; ++c) {
    double acc = 0;
    for (std::size_t j = 0; j < keys.size(); ++j) acc += s[j] * values[j][c];
    out[c] = static_cast<float>(acc / den);
  }
}

}  // namespace

TEST_CASE("S2V ring cache: a stream longer than the noisy cache wraps it as the official model does") {
  const stream_case base = load_case("liveavatar_tiny_a");
  s2v::workload work = base.work;
  const std::size_t ring_blocks = 2;
  const s2v::model probe(base.config, work);
  work.noisy_cache_tokens = static_cast<std::int64_t>(ring_blocks * probe.geometry().block_tokens);
  const s2v::model m(base.config, work, {dtype::f32, gemm_path::portable, false});
  const s2v::geometry& g = m.geometry();
  const std::size_t D = g.dim, L = g.block_tokens, size = g.noisy_slots, d = g.head_dim;
  test_buffers bufs(m.buffers());
  s2v::state s = m.make_state(bufs.set);
  const auto params = file_params(m, base.file);
  const s2v::call_spec& sink = base.spec.calls.front();
  m.begin_sink(s, s2v::sink_of(sink, base.file));
  for (std::size_t l = 0; l < m.layer_count(); ++l)
    for (std::size_t sub = 0; sub < m.layer(l).subunit_count(); ++sub) m.layer(l).forward(sub, params[l][sub], s);

  const s2v::call_spec& a = base.spec.calls.at(1);
  for (std::size_t block = 0; block < 2 * ring_blocks + 1; ++block) {
    CAPTURE(block);
    s2v::step_inputs in = s2v::step_of(m, a, base.file);
    in.block = block;
    in.relative_dist = 4 + static_cast<std::int64_t>(block) * 7;
    m.begin_step(s, in);
    const std::size_t cs = block * L, slot = cs % size;
    const std::vector<float> cache_before(s.noisy_k[0], s.noisy_k[0] + g.num_layers * size * D);
    for (std::size_t l = 0; l < m.layer_count(); ++l)
      for (std::size_t sub = 0; sub < m.layer(l).subunit_count(); ++sub) {
        m.layer(l).forward(sub, params[l][sub], s);
        if (m.layer(l).name() != "blocks.0" || sub != 0) continue;
        // RoPE positions keep counting past the wrap: token 0 sits at frame cs / fs.
        std::vector<float> cos(g.rope_pairs), sin(g.rope_pairs);
        s2v::rope_factors_row(static_cast<std::int64_t>(cs / g.frame_tokens), 0, 0, g.rope_pairs, cos.data(), sin.data());
        CHECK(std::equal(cos.begin(), cos.end(), s.rope_cos));
        CHECK(std::equal(sin.begin(), sin.end(), s.rope_sin));
        // The core attends the noisy cache [0, cs + L), or all of it once cs reached its size, then the cond keys.
        const std::size_t active = cs >= size ? size : cs + L;
        CHECK(s.call.active_slots == active);
        const float* nk = s.noisy_k[0];
        const float* nv = s.noisy_v[0];
        double worst = 0;
        std::vector<float> out(d);
        for (std::size_t t = 0; t < L; t += 7)
          for (std::size_t h = 0; h < g.heads; ++h) {
            std::vector<const float*> keys, values;
            for (std::size_t j = 0; j < active; ++j) keys.push_back(nk + j * D + h * d), values.push_back(nv + j * D + h * d);
            for (std::size_t j = 0; j < s.cond_end(); ++j)
              keys.push_back(s.cond_k_rope + j * D + h * d), values.push_back(s.cond_v + j * D + h * d);
            oracle_attention(s.q + t * D + h * d, keys, values, d, out.data());
            for (std::size_t c = 0; c < d; ++c) worst = std::max(worst, static_cast<double>(std::fabs(out[c] - s.attn[t * D + h * d + c])));
          }
        CHECK(worst <= 1e-6);
      }
    // The call wrote slots [cs mod size, +L) of every layer and nothing else.
    for (std::size_t i = 0; i < g.num_layers; ++i)
      for (std::size_t j = 0; j < size; ++j) {
        const bool written = j >= slot && j < slot + L;
        const float* now = s.noisy_k[0] + (i * size + j) * D;
        const float* was = cache_before.data() + (i * size + j) * D;
        if (!written) REQUIRE(std::equal(now, now + D, was));
      }
  }
}

TEST_CASE("S2V self-attention over two key segments: the BLAS path equals the row kernel within 1e-6") {
  if (!attention_uses_blas(gemm_path::blas)) return;  // built without a CBLAS: both paths are the row kernel
  const std::size_t heads = 3, d = 16, ld = heads * d;
  std::uint32_t state = 12345;
  const auto rnd = [&] {
    state = state * 1664525u + 1013904223u;
    return static_cast<float>(state >> 8) / static_cast<float>(1u << 24) * 2.0f - 1.0f;
  };
  for (const auto [nq, n1, n2] : {std::array<std::size_t, 3>{1, 5, 0}, {70, 130, 17}, {64, 1, 40}, {129, 200, 80}}) {
    CAPTURE(nq);
    CAPTURE(n1);
    CAPTURE(n2);
    std::vector<float> q(nq * ld), k1(n1 * ld), v1(n1 * ld), k2((n2 + 1) * ld), v2((n2 + 1) * ld);
    for (auto* v : {&q, &k1, &v1, &k2, &v2})
      for (float& x : *v) x = rnd();  // |scores| <= d/sqrt(d) = 4: differences stay near f32 rounding of the scores
    std::vector<float> fast(nq * ld), slow(nq * ld), scratch(attention_scratch_floats(gemm_path::blas, n1 + n2));
    attention_two_segments(gemm_path::blas, q.data(), nq, k1.data(), v1.data(), n1, k2.data(), v2.data(), n2, heads, d,
                           scratch.data(), fast.data());
    attention_two_segments(gemm_path::portable, q.data(), nq, k1.data(), v1.data(), n1, k2.data(), v2.data(), n2, heads,
                           d, scratch.data(), slow.data());
    double diff = 0, scale = 0;
    for (std::size_t i = 0; i < fast.size(); ++i) {
      diff = std::max(diff, static_cast<double>(std::fabs(fast[i] - slow[i])));
      scale = std::max(scale, static_cast<double>(std::fabs(slow[i])));
    }
    CHECK(diff <= 1e-6 * std::max(1.0, scale));
    CHECK(scale > 0.05);  // not vacuous: averages of values in [-1, 1]
  }
}
