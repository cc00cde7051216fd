// The Wan model against the official references (tests/data/wan_*.safetensors): every ref.* tensor
// the model produces, for both GEMM paths; bf16 weights against an f32 run on bf16-rounded
// weights; and a forward that allocates nothing.
//
// Nothing here depends on the tiny sizes: the workload comes from the file's inputs and the config
// from the matching config.json, so any wan_<name>.safetensors placed next to it is checked too.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "unshard/io/safetensors_file.hpp"
#include "unshard/models/wan/model.hpp"

#include "support/allocation_count.hpp"
#include "support/wan_case.hpp"

using namespace unshard;
using namespace unshard::testing;

namespace {

// How the test hands parameters to the model: the file's f32 tensors as they are, converted to
// bf16, or rounded to bf16 and kept in f32.
enum class weights { f32, bf16, bf16_rounded_f32 };

struct param_store {
  const safetensors_file& file;
  weights kind;
  std::map<std::string, std::vector<std::byte>> converted;

  tensor_view view(const param_spec& spec) {
    const tensor_view src = file.view(spec.name);
    REQUIRE(src.type() == dtype::f32);
    if (kind == weights::f32) return src;
    auto& bytes = converted[spec.name];
    const dtype t = kind == weights::bf16 ? dtype::bf16 : dtype::f32;
    bytes.resize(static_cast<std::size_t>(src.numel()) * size_of(t));
    const tensor_view dst(bytes.data(), t, src.dims());
    for (std::size_t i = 0; i < static_cast<std::size_t>(src.numel()); ++i)
      dst.store(i, bf16::from_float(src.load(i)).to_float());
    return dst;
  }
};

// One model, its buffers, state and every sub-unit's parameter views, built before the forward.
struct wan_run {
  wan::model model;
  test_buffers buffers;
  wan::state state;
  param_store params;
  std::vector<std::vector<param_views>> views;  // [layer][sub-unit]

  wan_run(const wan::config& cfg, const safetensors_file& f, const wan::options& opts, weights w)
      : model(cfg, workload_of(f), opts), buffers(model.buffers()), state(model.make_state(buffers.set)),
        params{f, w, {}} {
    for (std::size_t i = 0; i < model.layer_count(); ++i) {
      views.emplace_back();
      for (std::size_t j = 0; j < model.layer(i).subunit_count(); ++j) {
        std::vector<tensor_view> v;
        for (const auto& spec : model.layer(i).parameters(j)) v.push_back(params.view(spec));
        views.back().emplace_back(std::move(v));
      }
    }
    model.set_inputs(state, f.view("input.x"), f.view("input.t"), f.view("input.context"));
  }

  static wan::workload workload_of(const safetensors_file& f) {
    const shape& x = f.at("input.x").dims;
    REQUIRE(x.rank() == 4);
    return {{x[0], x[1], x[2], x[3]}, f.at("input.context").dims[0]};
  }

  // Runs every sub-unit in order; after_each(layer, sub) sees the state in between. Returns the
  // number of operator new calls made by the forwards themselves.
  std::size_t forward(const std::function<void(std::size_t, std::size_t)>& after_each = {}) {
    std::size_t allocations = 0;
    for (std::size_t i = 0; i < model.layer_count(); ++i)
      for (std::size_t j = 0; j < model.layer(i).subunit_count(); ++j) {
        const std::size_t before = allocation_count.load();
        model.layer(i).forward(j, views[i][j], state);
        allocations += allocation_count.load() - before;
        if (after_each) after_each(i, j);
      }
    return allocations;
  }
};

// The rule of docs/conventions.md: max|got - ref| <= 1e-5 * max(1, max|ref|), per tensor.
struct checker {
  std::ostringstream report;
  double worst_ratio = 0.0;
  std::set<std::string> checked;

  void operator()(const std::string& name, const float* got, const tensor_view& ref) {
    REQUIRE(ref.type() == dtype::f32);
    double err = 0.0, ref_max = 0.0;
    for (std::size_t i = 0; i < static_cast<std::size_t>(ref.numel()); ++i) {
      err = std::max(err, std::abs(static_cast<double>(got[i]) - ref.load(i)));
      ref_max = std::max(ref_max, std::abs(static_cast<double>(ref.load(i))));
    }
    const double bound = 1e-5 * std::max(1.0, ref_max);
    CHECK_MESSAGE(err <= bound, name, ": max|got-ref| = ", err, " > ", bound);
    worst_ratio = std::max(worst_ratio, err / std::max(1.0, ref_max));
    checked.insert(name);
    report << "  " << name << ": max|err| " << err << " (max|ref| " << ref_max << ")\n";
  }
};

// Compares every ref.* tensor the model exposes with `f`, for one run with f32 weights.
void check_against_refs(const std::string& name, const wan::config& cfg, gemm_path path) {
  const safetensors_file f(std::string(UNSHARD_TEST_DATA_DIR) + "/" + name + ".safetensors");
  wan_run run(cfg, f, {dtype::f32, path, true}, weights::f32);
  const wan::geometry& g = run.model.geometry();
  const wan::state& s = run.state;
  checker check;
  const auto ref = [&](const std::string& n) { return f.view(n); };
  const auto has = [&](const std::string& n) { return f.find(n) != nullptr; };

  const std::size_t allocations = run.forward([&](std::size_t layer, std::size_t sub) {
    const std::size_t last = run.model.layer_count() - 1;
    if (layer == 0 && sub == 0) {
      check("ref.patch_embedding.out", s.x, ref("ref.patch_embedding.out"));
      std::vector<float> conv(g.tokens * g.dim);  // conv_out is [1, D, F', H', W']: x transposed
      for (std::size_t t = 0; t < g.tokens; ++t)
        for (std::size_t d = 0; d < g.dim; ++d) conv[d * g.tokens + t] = s.x[t * g.dim + d];
      check("ref.patch_embedding.conv_out", conv.data(), ref("ref.patch_embedding.conv_out"));
      check("ref.rope.cos", s.rope_cos, ref("ref.rope.cos"));
      check("ref.rope.sin", s.rope_sin, ref("ref.rope.sin"));
    } else if (layer == 0 && sub == 1) {
      check("ref.time_sinusoid", s.time_sinusoid, ref("ref.time_sinusoid"));
      check("ref.time_embedding.out", s.e, ref("ref.time_embedding.out"));
      check("ref.time_projection.out", s.e0, ref("ref.time_projection.out"));
    } else if (layer == 0 && sub == 2) {
      check("ref.text_embedding.in", s.input_context, ref("ref.text_embedding.in"));
      check("ref.text_embedding.out", s.ctx, ref("ref.text_embedding.out"));
    } else if (layer == 1 && has("ref.block.0.q_rope")) {  // block-0 intermediates
      const char* sub_name = sub == 0 ? "self_attn" : sub == 1 ? "cross_attn" : "ffn";
      const std::string p = "ref.block.0.";
      if (sub != 1 || g.cross_attn_norm) check(p + sub_name + ".in", s.norm, ref(p + sub_name + ".in"));
      if (sub == 0) {
        check(p + "q_rope", s.q, ref(p + "q_rope"));
        check(p + "k_rope", s.k, ref(p + "k_rope"));
      }
      if (sub != 2) check(p + sub_name + ".core", s.attn, ref(p + sub_name + ".core"));
      check(p + sub_name + ".out", s.proj, ref(p + sub_name + ".out"));
    } else if (layer == last) {
      check("ref.head.out", s.head_out, ref("ref.head.out"));
    }
    // Block inputs: the residual stream after the previous layer's last sub-unit.
    if (layer + 1 < last && sub + 1 == run.model.layer(layer).subunit_count()) {
      const std::string n = "ref.block." + std::to_string(layer) + ".in";
      check(n, s.x, ref(n));
    }
  });
  for (std::size_t i = 0; i < g.num_layers; ++i) {
    const std::string n = "ref.block." + std::to_string(i) + ".out";
    check(n, reinterpret_cast<const float*>(run.model.block_output(s, i).data()), ref(n));
  }
  check("ref.output", reinterpret_cast<const float*>(run.model.output(s).data()), ref("ref.output"));
  CHECK(run.model.output(s).dims() == f.at("ref.output").dims);
  for (const auto& t : f.tensors())  // no reference may go unchecked
    if (t.name.starts_with("ref.")) CHECK_MESSAGE(check.checked.count(t.name) == 1, t.name, " was not compared");
  CHECK_MESSAGE(allocations == 0, "the forward called operator new ", allocations, " times");
  MESSAGE(name, " gemm ", name_of(path), " (effective ", name_of(effective_gemm_path(path, dtype::f32)),
          "), worst max|err|/max(1,max|ref|) = ", check.worst_ratio, "\n", check.report.str());
}

}  // namespace

TEST_CASE("wan::model matches the official references, portable GEMM") {
  const auto files = wan_vector_files();
  REQUIRE(!files.empty());
  for (const auto& name : files) check_against_refs(name, config_for(name), gemm_path::portable);
}

TEST_CASE("wan::model matches the official references, BLAS GEMM") {
  for (const auto& name : wan_vector_files()) check_against_refs(name, config_for(name), gemm_path::blas);
}

TEST_CASE("bf16 weights match an f32 run on bf16-rounded weights") {
  for (const auto& name : wan_vector_files()) {
    const safetensors_file f(std::string(UNSHARD_TEST_DATA_DIR) + "/" + name + ".safetensors");
    const wan::config cfg = config_for(name);
    for (const gemm_path path : {gemm_path::portable, gemm_path::blas}) {
      wan_run bf16_run(cfg, f, {dtype::bf16, path, true}, weights::bf16);
      wan_run rounded(cfg, f, {dtype::f32, path, true}, weights::bf16_rounded_f32);
      CHECK(bf16_run.forward() == 0);
      rounded.forward();

      // The f32 run on rounded weights plays the reference; every activation that survives the
      // forward is compared.
      checker against_rounded;
      const wan::model& m = rounded.model;
      const wan::geometry& g = m.geometry();
      const auto f32_view = [](float* p, std::size_t n) {
        return tensor_view(p, dtype::f32, shape{static_cast<std::int64_t>(n)});
      };
      const wan::state &sb = bf16_run.state, &sr = rounded.state;
      against_rounded("output", sb.output, m.output(sr));
      for (std::size_t i = 0; i < g.num_layers; ++i)
        against_rounded("block." + std::to_string(i) + ".out", sb.block_outputs + i * g.tokens * g.dim,
                        m.block_output(sr, i));
      against_rounded("e", sb.e, f32_view(sr.e, g.dim));
      against_rounded("e0", sb.e0, f32_view(sr.e0, 6 * g.dim));
      against_rounded("ctx", sb.ctx, f32_view(sr.ctx, g.text_len * g.dim));

      // Distance to the f32-weight references: reported, not asserted.
      std::ostringstream distances;
      for (const std::string n : {"ref.output", "ref.block.0.out"}) {
        const tensor_view r = f.view(n);
        const float* got = n == "ref.output" ? bf16_run.state.output : bf16_run.state.block_outputs;
        double err = 0.0;
        for (std::size_t i = 0; i < static_cast<std::size_t>(r.numel()); ++i)
          err = std::max(err, std::abs(static_cast<double>(got[i]) - r.load(i)));
        distances << "  " << n << ": max|bf16 - f32 ref| = " << err << "\n";
      }
      MESSAGE(name, " gemm ", name_of(path), ": bf16 vs f32 on rounded weights, worst ratio ",
              against_rounded.worst_ratio, "\n", against_rounded.report.str(), distances.str());
    }
  }
}

TEST_CASE("wan::model rejects parameter views that differ from its declarations, naming the parameter") {
  const std::string name = wan_vector_files().front();
  const safetensors_file f(std::string(UNSHARD_TEST_DATA_DIR) + "/" + name + ".safetensors");
  wan_run run(config_for(name), f, {}, weights::f32);
  std::vector<tensor_view> swapped(run.views[1][0].begin(), run.views[1][0].end());
  std::swap(swapped[1], swapped[2]);  // q.weight <-> q.bias
  CHECK_THROWS_WITH_AS(run.model.layer(1).forward(0, param_views(swapped), run.state),
                       doctest::Contains("wan parameter 'blocks.0.self_attn.q.weight': got f32 ["), error);
  CHECK_THROWS_WITH_AS(run.model.layer(1).forward(1, run.views[1][0], run.state),
                       doctest::Contains("wan sub-unit 'blocks.0.cross_attn': got "), error);
  CHECK_THROWS_WITH_AS(run.model.set_inputs(run.state, f.view("input.context"), f.view("input.t"), f.view("input.x")),
                       doctest::Contains("wan::model::set_inputs: input 'x' has shape ["), error);
}
