// A peft LoRA merged per shard at load (runtime/lora_weights.hpp): every rank's shard, at world
// sizes 1-5, equals the slice of a merge the test computes on the full unsharded weights; a Wan
// forward over the adapter equals one over a pre-merged checkpoint; bad LoRA files are refused,
// naming the tensor and the file.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include "unshard/core/flat_layout.hpp"
#include "unshard/io/checkpoint.hpp"
#include "unshard/io/safetensors_writer.hpp"
#include "unshard/kernels/host/gemm.hpp"
#include "unshard/models/wan/model.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/runtime/checkpoint_weights.hpp"
#include "unshard/runtime/lora_weights.hpp"
#include "unshard/runtime/session.hpp"

using namespace unshard;
namespace fs = std::filesystem;

namespace {

const std::string data_dir = UNSHARD_TEST_DATA_DIR;

fs::path scratch(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("unshard_test_lora_" + std::to_string(::getpid())) / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary) << text;
}

std::string adapter_config(double alpha, int r) {
  return "{\"peft_type\": \"LORA\", \"lora_alpha\": " + std::to_string(alpha) + ", \"r\": " + std::to_string(r) +
         ", \"target_modules\": [\"q\", \"k\", \"v\", \"o\", \"ffn.0\", \"ffn.2\"], \"rank_pattern\": {}, "
         "\"alpha_pattern\": {}, \"use_rslora\": false, \"use_dora\": false}";
}

// Live Avatar's targets in every block of the Wan model.
std::vector<std::string> target_modules(std::size_t blocks) {
  std::vector<std::string> out;
  for (std::size_t b = 0; b < blocks; ++b)
    for (const char* m : {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                          "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"})
      out.push_back("blocks." + std::to_string(b) + "." + m);
  return out;
}

struct lora_factors {
  std::vector<float> a, b;  // [r, in], [out, r] as stored (already rounded to the file's dtype)
};

// Random A and B for every target, written as a peft file; returns them as stored.
std::map<std::string, lora_factors> write_lora(const checkpoint& base, const std::vector<std::string>& modules,
                                               std::int64_t r, dtype type, const std::string& path) {
  std::mt19937 gen(1234);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  std::map<std::string, lora_factors> out;
  safetensors_writer w;
  for (const std::string& m : modules) {
    const shape d = base.at(m + ".weight").dims;
    lora_factors f;
    f.a.resize(static_cast<std::size_t>(r * d[1]));
    f.b.resize(static_cast<std::size_t>(d[0] * r));
    for (auto* v : {&f.a, &f.b})
      for (float& x : *v) {
        x = nd(gen);
        if (type == dtype::bf16) x = bf16_bits_to_float(float_to_bf16_bits(x));
      }
    w.add("base_model.model." + m + ".lora_A.weight", {r, d[1]}, f.a, type);
    w.add("base_model.model." + m + ".lora_B.weight", {d[0], r}, f.b, type);
    out.emplace(m + ".weight", std::move(f));
  }
  w.write(path);
  return out;
}

// The merge on the full weight, the f32 expression lora_weights documents: W + (s·B)·A with the
// portable GEMM over all rows at once.
std::vector<float> merge_full(const std::vector<float>& w, const lora_factors& f, std::size_t out, std::size_t in,
                              std::size_t r, float s) {
  std::vector<float> bs(f.b.size()), at(f.a.size()), delta(out * in);
  for (std::size_t i = 0; i < bs.size(); ++i) bs[i] = s * f.b[i];
  for (std::size_t k = 0; k < r; ++k)
    for (std::size_t j = 0; j < in; ++j) at[j * r + k] = f.a[k * in + j];
  const tensor_view a_rows(at.data(), dtype::f32, shape{static_cast<std::int64_t>(in), static_cast<std::int64_t>(r)});
  linear_rows(bs.data(), out, r, a_rows, tensor_view{}, 0, delta.data(), in, gemm_path::portable);
  std::vector<float> merged(w.size());
  for (std::size_t i = 0; i < w.size(); ++i) merged[i] = w[i] + delta[i];
  return merged;
}

// The same merge in double precision, written independently: checks the math (scale, which
// factor is transposed), where merge_full checks the slicing bit for bit.
double max_error_vs_double(const std::vector<float>& got, const std::vector<float>& w, const lora_factors& f,
                           std::size_t out, std::size_t in, std::size_t r, double s) {
  double worst = 0;
  for (std::size_t i = 0; i < out; ++i)
    for (std::size_t j = 0; j < in; ++j) {
      double d = 0;
      for (std::size_t k = 0; k < r; ++k) d += static_cast<double>(f.b[i * r + k]) * f.a[k * in + j];
      const double want = w[i * in + j] + s * d;
      worst = std::max(worst, std::fabs(got[i * in + j] - want) / std::max(1.0, std::fabs(want)));
    }
  return worst;
}

struct fixture {
  checkpoint base = checkpoint::open(data_dir + "/wan_tiny_a.safetensors");
  wan::config config = wan::config::load(data_dir + "/wan_tiny_a.config.json");
  wan::workload work;
  fixture() {
    const auto x = base.at("input.x").dims, ctx = base.at("input.context").dims;
    work = {{x[0], x[1], x[2], x[3]}, ctx[0]};
  }
};

// Every layer's parameters, as the loader sees them, in storage dtype `type`.
std::vector<std::vector<param_spec>> layer_params(const wan::model& m) {
  std::vector<std::vector<param_spec>> out;
  for (std::size_t l = 0; l < m.layer_count(); ++l) {
    out.emplace_back();
    for (std::size_t s = 0; s < m.layer(l).subunit_count(); ++s)
      for (const param_spec& p : m.layer(l).parameters(s)) out.back().push_back(p);
  }
  return out;
}

// Loads every layer through `src` at world size n, rank by rank, and checks each parameter of
// the reassembled buffer against `want` (name -> f32 values, rounded here to the storage dtype).
template <weight_source S>
void check_sharded_load(const S& src, const std::vector<std::vector<param_spec>>& layers,
                        const std::map<std::string, std::vector<float>>& want, std::size_t n) {
  for (const auto& params : layers) {
    const flat_layout layout(params, n);
    std::vector<std::byte> gathered(layout.padded_bytes());
    for (std::size_t rank = 0; rank < n; ++rank)
      load_shard(src, layout, params, rank, gathered.data() + layout.shard_range(rank).first);
    for (std::size_t i = 0; i < params.size(); ++i) {
      const param_spec& p = params[i];
      const auto it = want.find(p.name);
      REQUIRE(it != want.end());
      std::vector<std::byte> expect(p.bytes());
      for (std::size_t e = 0; e < it->second.size(); ++e) store_from_float(expect.data(), p.type, e, it->second[e]);
      CAPTURE(p.name);
      CHECK(std::memcmp(gathered.data() + layout.entry(i).offset, expect.data(), p.bytes()) == 0);
    }
  }
}

}  // namespace

TEST_CASE("LoRA merged per shard equals the merge of the full weights, world sizes 1-5, f32 and bf16 storage") {
  const fixture fx;
  const wan::model m(fx.config, fx.work, {dtype::f32, gemm_path::portable, false});
  const auto modules = target_modules(fx.config.num_layers);
  // r = 6 and alpha = 5: s = 5/6 is not a power of two, so s·B really rounds.
  for (dtype lora_type : {dtype::f32, dtype::bf16}) {
    CAPTURE(name_of(lora_type));
    const fs::path dir = scratch(std::string("merge_") + std::string(name_of(lora_type)));
    const std::int64_t r = 6;
    const double alpha = 5;
    const auto factors = write_lora(fx.base, modules, r, lora_type, (dir / "adapter_model.safetensors").string());
    write_text(dir / "adapter_config.json", adapter_config(alpha, static_cast<int>(r)));
    const checkpoint lora = checkpoint::open((dir / "adapter_model.safetensors").string());
    const checkpoint_weights base(fx.base);
    const lora_weights<checkpoint_weights> merged(base, lora);  // alpha from adapter_config.json
    CHECK(merged.targets().size() == modules.size());
    CHECK(merged.rank_of("blocks.0.ffn.2.weight") == r);
    CHECK(merged.scale_of("blocks.1.self_attn.q.weight") == static_cast<float>(alpha / r));
    CHECK(merged.describe("blocks.0.self_attn.q.bias").type == dtype::f32);  // untouched: the base's
    CHECK(merged.describe("blocks.0.ffn.0.weight").dims == fx.base.at("blocks.0.ffn.0.weight").dims);

    std::map<std::string, std::vector<float>> want;
    for (const auto& params : layer_params(m))
      for (const param_spec& p : params) {
        std::vector<float> w = read_f32(fx.base, p.name);
        if (const auto f = factors.find(p.name); f != factors.end()) {
          const auto out = static_cast<std::size_t>(p.dims[0]), in = static_cast<std::size_t>(p.dims[1]);
          std::vector<float> full = merge_full(w, f->second, out, in, static_cast<std::size_t>(r), static_cast<float>(alpha / r));
          CHECK(max_error_vs_double(full, w, f->second, out, in, static_cast<std::size_t>(r), alpha / r) < 1e-6);
          w = std::move(full);
        }
        want.emplace(p.name, std::move(w));
      }
    // f32 storage: bit-equal. bf16 storage: the f32 merge rounded once.
    const wan::model m16(fx.config, fx.work, {dtype::bf16, gemm_path::portable, false});
    for (std::size_t n = 1; n <= 5; ++n) {
      CAPTURE(n);
      check_sharded_load(merged, layer_params(m), want, n);
      check_sharded_load(merged, layer_params(m16), want, n);
    }
  }
}

TEST_CASE("LoRA over a bf16 base: the base is widened, merged in f32, rounded once") {
  const fixture fx;
  const fs::path dir = scratch("bf16_base");
  const wan::model m16(fx.config, fx.work, {dtype::bf16, gemm_path::portable, false});
  const auto layers = layer_params(m16);
  {
    safetensors_writer w;
    for (const auto& params : layers)
      for (const param_spec& p : params) w.add(p.name, p.dims, read_f32(fx.base, p.name), dtype::bf16);
    w.write((dir / "base.safetensors").string());
  }
  const checkpoint base_file = checkpoint::open((dir / "base.safetensors").string());
  const std::int64_t r = 4;
  const auto factors = write_lora(base_file, target_modules(fx.config.num_layers), r, dtype::bf16,
                                  (dir / "lora.safetensors").string());
  const checkpoint lora = checkpoint::open((dir / "lora.safetensors").string());
  const checkpoint_weights base(base_file);
  const lora_weights<checkpoint_weights> merged(base, lora, 3.0);  // explicit alpha, no adapter_config.json
  std::map<std::string, std::vector<float>> want;
  for (const auto& params : layers)
    for (const param_spec& p : params) {
      std::vector<float> w = read_f32(base_file, p.name);
      if (const auto f = factors.find(p.name); f != factors.end())
        w = merge_full(w, f->second, static_cast<std::size_t>(p.dims[0]), static_cast<std::size_t>(p.dims[1]),
                       static_cast<std::size_t>(r), static_cast<float>(3.0 / r));
      want.emplace(p.name, std::move(w));
    }
  for (std::size_t n : {1, 2, 3, 4, 5}) {
    CAPTURE(n);
    check_sharded_load(merged, layers, want, n);
  }
}

TEST_CASE("a Wan forward over the LoRA adapter equals one over a pre-merged checkpoint") {
  const fixture fx;
  const fs::path dir = scratch("forward");
  const std::int64_t r = 8;
  const auto modules = target_modules(fx.config.num_layers);
  const auto factors = write_lora(fx.base, modules, r, dtype::f32, (dir / "lora.safetensors").string());
  write_text(dir / "adapter_config.json", adapter_config(16, static_cast<int>(r)));
  {
    safetensors_writer w;
    for (const std::string& name : fx.base.names()) {
      std::vector<float> v = read_f32(fx.base, name);
      if (const auto f = factors.find(name); f != factors.end()) {
        const shape d = fx.base.at(name).dims;
        v = merge_full(v, f->second, static_cast<std::size_t>(d[0]), static_cast<std::size_t>(d[1]),
                       static_cast<std::size_t>(r), 2.0f);
      }
      w.add(name, fx.base.at(name).dims, v);
    }
    w.write((dir / "merged.safetensors").string());
  }
  const checkpoint merged_file = checkpoint::open((dir / "merged.safetensors").string());
  const checkpoint lora = checkpoint::open((dir / "lora.safetensors").string());
  const checkpoint_weights base(fx.base), premerged(merged_file);
  const lora_weights<checkpoint_weights> adapter(base, lora);
  const wan::model m(fx.config, fx.work, {dtype::f32, gemm_path::portable, false});

  const auto run = [&](const auto& weights) {
    session_options opt;
    opt.world_size = 3;
    opt.policy = parse_policy("prefetch:1").values;
    session<wan::model> s(m, weights, opt);
    s.cap_device_memory(s.plan().peak_bytes());
    std::vector<float> out;
    s.forward([&](std::size_t, wan::state& st) {
      m.set_inputs(st, fx.base.view("input.x"), fx.base.view("input.t"), fx.base.view("input.context"));
    },
              [&](std::size_t rank, const wan::state& st) {
                if (rank == 0) {
                  const auto o = m.output(st).as<float>();
                  out.assign(o.begin(), o.end());
                }
              });
    return out;
  };
  const std::vector<float> got = run(adapter), want = run(premerged), plain = run(base);
  REQUIRE(got.size() == want.size());
  CHECK(std::memcmp(got.data(), want.data(), got.size() * 4) == 0);
  CHECK(std::memcmp(got.data(), plain.data(), got.size() * 4) != 0);  // the LoRA did change the model
}

TEST_CASE("bad LoRA files are refused, naming the tensor and the file") {
  const fixture fx;
  const checkpoint_weights base(fx.base);
  // Writes one LoRA file from (name, shape) pairs plus an optional adapter_config.json.
  const auto make = [&](const std::string& name, const std::vector<std::pair<std::string, shape>>& tensors,
                        const std::string& config) {
    const fs::path dir = scratch(name);
    safetensors_writer w;
    for (const auto& [n, d] : tensors) w.add(n, d, std::vector<float>(static_cast<std::size_t>(d.numel()), 0.01f));
    w.write((dir / "lora.safetensors").string());
    if (!config.empty()) write_text(dir / "adapter_config.json", config);
    return (dir / "lora.safetensors").string();
  };
  const std::string qa = "base_model.model.blocks.0.self_attn.q.lora_A.weight";
  const std::string qb = "base_model.model.blocks.0.self_attn.q.lora_B.weight";
  const auto refuses = [&](const std::string& path, std::optional<double> alpha, std::vector<std::string> parts) {
    const checkpoint lora = checkpoint::open(path);
    try {
      const lora_weights<checkpoint_weights> w(base, lora, alpha);
      FAIL("accepted: ", path);
    } catch (const error& e) {
      const std::string what = e.what();
      for (const auto& part : parts) {
        CAPTURE(what);
        CHECK(what.find(part) != std::string::npos);
      }
    }
  };
  const std::string cfg = adapter_config(8, 4);

  SUBCASE("rank mismatch between A and B") {
    const auto p = make("rank", {{qa, {4, 128}}, {qb, {128, 3}}}, cfg);
    refuses(p, std::nullopt, {p, "rank mismatch", qa, qb, "[4,128]", "[128,3]"});
  }
  SUBCASE("update shape differs from the base weight") {
    const auto p = make("shape", {{qa, {4, 96}}, {qb, {128, 4}}}, cfg);
    refuses(p, std::nullopt, {p, "blocks.0.self_attn.q.weight", "[128,96]", "has shape [128,128]"});
  }
  SUBCASE("a LoRA tensor that targets no base weight") {
    const auto p = make("target", {{"base_model.model.blocks.0.self_attn.z.lora_A.weight", {4, 128}},
                                   {"base_model.model.blocks.0.self_attn.z.lora_B.weight", {128, 4}}},
                        cfg);
    refuses(p, std::nullopt, {p, "blocks.0.self_attn.z.lora_A.weight", "targets no base weight",
                              "blocks.0.self_attn.z.weight", "wan_tiny_a.safetensors"});
  }
  SUBCASE("missing alpha: no adapter_config.json and none given") {
    const auto p = make("alpha", {{qa, {4, 128}}, {qb, {128, 4}}}, "");
    refuses(p, std::nullopt, {p, "no LoRA alpha", "adapter_config.json", "--lora-alpha"});
  }
  SUBCASE("adapter_config.json without lora_alpha") {
    const auto p = make("noalpha", {{qa, {4, 128}}, {qb, {128, 4}}}, "{\"r\": 4}");
    refuses(p, std::nullopt, {"adapter_config.json", "missing \"lora_alpha\""});
  }
  SUBCASE("adapter_config.json r differs from lora_A's rank") {
    const auto p = make("cfgrank", {{qa, {4, 128}}, {qb, {128, 4}}}, adapter_config(8, 16));
    refuses(p, std::nullopt, {p, qa, "rank 4", "r = 16"});
  }
  SUBCASE("DoRA is refused, not merged as LoRA") {
    const auto p = make("dora", {{qa, {4, 128}}, {qb, {128, 4}}}, "{\"lora_alpha\": 8, \"r\": 4, \"use_dora\": true}");
    refuses(p, std::nullopt, {"use_dora"});
  }
  SUBCASE("lora_A without lora_B") {
    const auto p = make("partner", {{qa, {4, 128}}}, cfg);
    refuses(p, std::nullopt, {p, qa, "no partner", qb});
  }
  SUBCASE("a tensor that is not a peft LoRA weight") {
    const auto p = make("name", {{qa, {4, 128}}, {qb, {128, 4}}, {"blocks.0.self_attn.q.weight", {128, 128}}}, cfg);
    refuses(p, 2.0, {p, "'blocks.0.self_attn.q.weight' is not a peft LoRA weight"});
  }
  SUBCASE("a non-finite explicit alpha") {
    const auto p = make("nan", {{qa, {4, 128}}, {qb, {128, 4}}}, "");
    refuses(p, std::nan(""), {p, "not a finite number"});
  }
}
