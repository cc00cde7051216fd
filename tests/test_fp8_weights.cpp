// fp8 weights end to end on the host (issue 15 item 1): the `fp8` / `fp8:tensor` policy terms store
// every 2-D GEMM weight as f8e4m3 codes plus f32 scales, converted while each rank loads its shard.
//  * An fp8 forward equals, bit for bit, the f32 forward over the dequantized weights (the portable
//    GEMM dequantizes each chunk of rows to exactly quant::dequantize_rows' values), and a sharded
//    run (W = 3, chunked / prefetch / offload policies) equals the unsharded fp8 run bit for bit:
//    the Wan DiT and Live Avatar's S2V denoising loop, both scale modes.
//  * Accuracy against the f32 references: reported (per weight tensor, and on the outputs / the
//    final latents of the loop) and bounded; per channel against per tensor.
//  * Bytes: gathers move half of bf16's bytes; measured peaks within the plan; the scales are planned.
//  * Errors: a NaN/Inf weight, a NaN code or a bad scale in a checkpoint names the tensor.
//  * fp8 checkpoints (F8_E4M3 codes + "<weight>.scale" / "<weight>_scale") load directly: a round
//    trip through the safetensors writer gives the same results as converting at load.
#include <doctest/doctest.h>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "unshard/io/checkpoint.hpp"
#include "unshard/io/json_config.hpp"
#include "unshard/io/safetensors_writer.hpp"
#include "unshard/kernels/host/gemm.hpp"
#include "unshard/models/liveavatar/denoiser.hpp"
#include "unshard/models/liveavatar/loop_inputs.hpp"
#include "unshard/models/liveavatar/params.hpp"
#include "unshard/models/wan/model.hpp"
#include "unshard/models/wan/params.hpp"
#include "unshard/plan/ledger.hpp"
#include "unshard/plan/liveavatar/search.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/quant/fp8.hpp"
#include "unshard/runtime/checkpoint_weights.hpp"
#include "unshard/runtime/lora_weights.hpp"
#include "unshard/runtime/reference_forward.hpp"
#include "unshard/runtime/session.hpp"

#include "support/liveavatar_case.hpp"
#include "support/reference_checks.hpp"
#include "support/sharded_options.hpp"
#include "support/wan_case.hpp"

using namespace unshard;
using namespace unshard::testing;
using quant::fp8_scaling;
namespace fs = std::filesystem;

namespace {

const char* term_of(fp8_scaling s) { return s == fp8_scaling::per_tensor ? "fp8:tensor" : "fp8"; }

// Policies (each with the fp8 term added) the sharded runs are checked under.
std::vector<std::string> sharded_policies() {
  return {"chunked:4KiB+prefetch:1", "chunked:3000B+offload+prefetch:2", "chunked:64KiB", "selective", "prefetch:1",
          "offload+prefetch:2", "selective:subunit+prefetch:2", "fsdp"};
}

// The unsharded fp8 run everything is compared with: W = 1, every unit gathered once.
std::string unsharded_policy() { return "full"; }

std::string temp_file(const std::string& name) {
  return (fs::temp_directory_path() / ("unshard_fp8_" + std::to_string(::getpid()) + "_" + name)).string();
}

// The GEMM weights the fp8 policy quantizes (plan/unit_layout.hpp: by_rows, rank 2).
template <class M>
std::vector<param_spec> quantized_weights(const M& m) {
  std::vector<param_spec> out;
  policy_values pol;
  pol.fp8 = true;
  for (std::size_t l = 0; l < m.layer_count(); ++l)
    for (std::size_t s = 0; s < m.layer(l).subunit_count(); ++s)
      for (const param_spec& p : m.layer(l).parameters(s))
        if (detail::quantized_under(p, pol)) out.push_back(p);
  return out;
}

// How a weight's quantization error looks, summarised over the tensors of a model.
struct weight_errors {
  std::size_t tensors = 0;
  double worst_max = 0, sum_max = 0;  // max|W - Q(W)| / max|W| per tensor: the largest, and the sum
  double worst_rms = 0, sum_rms = 0;  // ||W - Q(W)|| / ||W|| per tensor
  void add(const std::vector<float>& w, const std::vector<float>& q) {
    double d = 0, m = 0, dd = 0, ww = 0;
    for (std::size_t i = 0; i < w.size(); ++i) {
      const double e = static_cast<double>(q[i]) - w[i];
      d = std::max(d, std::fabs(e));
      m = std::max(m, std::fabs(static_cast<double>(w[i])));
      dd += e * e;
      ww += static_cast<double>(w[i]) * w[i];
    }
    const double rel_max = m > 0 ? d / m : 0, rel_rms = ww > 0 ? std::sqrt(dd / ww) : 0;
    ++tensors;
    worst_max = std::max(worst_max, rel_max);
    sum_max += rel_max;
    worst_rms = std::max(worst_rms, rel_rms);
    sum_rms += rel_rms;
  }
};

enum class rewrite { dequantized_f32, fp8_codes };

// A copy of `file`'s weights (input.* and ref.* left out) with every quantized weight of m either
// quantized and dequantized back to f32 (what an fp8 forward must equal), or stored as F8_E4M3 codes
// with its scales in "<weight><scale_suffix>" (an fp8 checkpoint). `errors` gets each weight's.
template <class M>
std::string write_quantized(const M& m, const checkpoint& file, fp8_scaling scaling, rewrite how,
                            const std::string& path, const std::string& scale_suffix = ".scale",
                            weight_errors* errors = nullptr) {
  std::map<std::string, shape> quantized;
  for (const param_spec& p : quantized_weights(m)) quantized.emplace(p.name, p.dims);
  safetensors_writer wr;
  for (const std::string& name : file.names()) {
    if (name.starts_with("input.") || name.starts_with("ref.")) continue;
    const std::vector<float> v = read_f32(file, name);
    const auto it = quantized.find(name);
    if (it == quantized.end()) {
      wr.add(name, file.at(name).dims, v);
      continue;
    }
    const quant::fp8_weight q = quant::quantize(name, std::span<const float>(v), it->second, scaling);
    const std::vector<float> deq = quant::dequantize(q);
    if (errors) errors->add(v, deq);
    if (how == rewrite::dequantized_f32) {
      wr.add(name, it->second, deq);
    } else {
      wr.add(name, dtype::f8e4m3, it->second, std::as_bytes(std::span(q.codes)));
      wr.add(name + scale_suffix, shape{static_cast<std::int64_t>(q.scales.size())}, q.scales);
    }
  }
  wr.write(path);
  return path;
}

struct removing {
  std::string path;
  ~removing() { fs::remove(path); }
};

// max|got - want| / max|want| over every element.
double relative_max_error(const std::vector<float>& got, const std::vector<float>& want) {
  REQUIRE(got.size() == want.size());
  double d = 0, m = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    d = std::max(d, std::fabs(static_cast<double>(got[i]) - want[i]));
    m = std::max(m, std::fabs(static_cast<double>(want[i])));
  }
  return m > 0 ? d / m : d;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

// --- the Wan DiT ------------------------------------------------------------------------------

struct wan_run {
  wan_outputs out;
  std::vector<rank_measurement> measured;
  memory_plan plan;
  std::vector<std::size_t> gathered;  // bytes_gathered per rank
};

template <weight_source S>
wan_run run_wan(const wan::model& m, const S& w, const checkpoint& inputs, const policy_values& policy, std::size_t world) {
  session_options opt;
  opt.world_size = world;
  opt.policy = policy;
  session<wan::model> s(m, w, opt);
  s.cap_device_memory(s.plan().peak_bytes());
  wan_run r;
  forward_case(s, m, inputs, [&](std::size_t rank, const wan::state& st) {
    if (rank == 0) r.out = collect_outputs(m, st);
  });
  r.plan = s.plan();
  for (std::size_t i = 0; i < world; ++i) {
    r.measured.push_back(s.measured(i));
    r.gathered.push_back(s.runtime(i).bytes_gathered());
  }
  return r;
}

template <weight_source S>
wan_run run_wan(const wan::model& m, const S& w, const checkpoint& inputs, const std::string& policy, std::size_t world) {
  return run_wan(m, w, inputs, parse_policy(policy).values, world);
}

template <weight_source S>
wan_outputs run_wan_reference(const wan::model& m, const S& w, const checkpoint& inputs) {
  reference_runner<wan::model> ref(m, w);
  set_case_inputs(m, ref.state(), inputs);
  ref.forward();
  return collect_outputs(m, ref.state());
}

// --- the S2V denoising loop -------------------------------------------------------------------

const denoise_case& the_loop() {
  static const denoise_case c("liveavatar_denoise_a");
  return c;
}

s2v::model loop_model(const denoise_case& c) {
  s2v::options mo;
  mo.gemm = gemm_path::portable;
  mo.kv_cache = dtype::f32;
  return s2v::model(c.config, s2v::loop_workload(c.loop, c.file), mo);
}

using latents = std::map<std::string, std::vector<float>>;

struct loop_run {
  latents out;  // clip{r}.block{b}.latent
  std::vector<rank_measurement> measured;
  memory_plan plan;
};

// The loop over `weights` (inputs from the case's file) under a policy, world size and schedule.
template <weight_source S>
loop_run run_loop(const denoise_case& c, const s2v::model& m, const S& weights, const std::string& policy,
                  std::size_t world, schedule_kind kind) {
  session_options opt = sharded_options(policy, world);
  opt.schedule = kind;
  session<s2v::model> s(m, weights, opt);
  s.cap_device_memory(s.plan().peak_bytes());
  s2v::denoiser den(m, s, {c.loop.sampler, c.loop.blocks_per_clip, false});
  den.sink(s2v::loop_sink(c.file));
  loop_run r;
  den.denoise(s2v::loop_blocks(c.loop, c.file, 7), [&](s2v::block_result&& b) {
    r.out["clip" + std::to_string(b.clip) + ".block" + std::to_string(b.block) + ".latent"] = b.latent;
  });
  r.plan = s.plan();
  for (std::size_t i = 0; i < world; ++i) r.measured.push_back(s.measured(i));
  return r;
}

// Accuracy bound. A weight rounds to e4m3 with a relative error of at most 2^-4 (3 mantissa bits,
// half an ulp; measured per tensor below: max|dW|/max|W| about 0.034-0.036, ||dW||/||W|| about
// 0.026-0.028 in both modes). An output of a GEMM sums many products whose roundings are
// independent and partly cancel, so its relative error is a fraction of 2^-4; through the blocks,
// the residual stream adds the blocks' errors rather than multiplying them, and normalisations
// rescale them. So the end-to-end error stays below one e4m3 rounding step of the output's
// magnitude: max|got - ref| <= 2^-4 * max|ref| (measured: Wan DiT output 0.025 per channel, 0.033
// per tensor; the loop's final latents 0.004-0.005, the Euler steps adding dt * v to an exact x),
// and > 0 (the weights were quantized). A quantization bug (a wrong or shifted scale, codes read
// as values) is off by O(1) or more.
constexpr double output_bound = 0.0625;

}  // namespace

TEST_CASE("fp8 Wan DiT: equals the f32 forward over the dequantized weights; sharded equals unsharded, bit for bit") {
  const wan_case c = load_wan_case("wan_tiny_a");
  const wan::model m(c.config, c.work, {dtype::f32, gemm_path::portable, true});
  const checkpoint_weights w(c.file);
  const std::vector<float> ref = read_f32(c.file, "ref.output");
  const wan_outputs f32 = run_wan_reference(m, w, c.file);
  CHECK(excess(f32.output, ref) <= 1.0);
  const std::vector<std::string> policies = sharded_policies();
  double err[2] = {0, 0};
  for (const fp8_scaling scaling : {fp8_scaling::per_channel, fp8_scaling::per_tensor}) {
    const std::string term = term_of(scaling);
    CAPTURE(term);
    weight_errors we;
    const removing deq_file{write_quantized(m, c.file, scaling, rewrite::dequantized_f32, temp_file("wan_deq.safetensors"),
                                            ".scale", &we)};
    const checkpoint deq_ckpt = checkpoint::open(deq_file.path);
    const wan_outputs deq = run_wan_reference(m, checkpoint_weights(deq_ckpt), c.file);
    const wan_run one = run_wan(m, w, c.file, unsharded_policy() + "+" + term, 1);
    CHECK(same_bits(one.out.output, deq.output));
    for (std::size_t i = 0; i < deq.blocks.size(); ++i) CHECK(same_bits(one.out.blocks[i], deq.blocks[i]));
    for (const std::string& policy : policies)
      for (const std::size_t world : {std::size_t{3}, std::size_t{2}}) {
        CAPTURE(policy);
        CAPTURE(world);
        const wan_run r = run_wan(m, w, c.file, policy + "+" + term, world);
        CHECK(same_bits(r.out.output, one.out.output));
        for (std::size_t i = 0; i < deq.blocks.size(); ++i) CHECK(same_bits(r.out.blocks[i], one.out.blocks[i]));
        for (std::size_t k = 0; k < world; ++k) CHECK(r.measured[k].peak_bytes <= r.plan.ranks[k].peak());
      }
    // Accuracy against the official f32 references.
    const double e = relative_max_error(one.out.output, ref);
    err[scaling == fp8_scaling::per_tensor] = e;
    MESSAGE("Wan tiny, ", term, ": ", we.tensors, " weights quantized; per tensor max|dW|/max|W| worst ", we.worst_max,
            " mean ", we.sum_max / static_cast<double>(we.tensors), ", ||dW||/||W|| worst ", we.worst_rms, " mean ",
            we.sum_rms / static_cast<double>(we.tensors), "; output max|fp8 - f32 ref| / max|ref| = ", e);
    CHECK(e <= output_bound);
    CHECK(e > 0);
    for (std::size_t i = 0; i < deq.blocks.size(); ++i) {
      const double b = relative_max_error(one.out.blocks[i], read_f32(c.file, "ref.block." + std::to_string(i) + ".out"));
      INFO("block ", i, ": ", b);
      CHECK(b <= output_bound);
    }
  }
  MESSAGE("Wan tiny output error: per channel ", err[0], ", per tensor ", err[1]);
  // Measured on these vectors (not a theorem: per-channel scales are finer, so its roundings are
  // smaller, but the output errors are sums of signed roundings).
  CHECK(err[0] <= err[1]);
}

TEST_CASE("fp8 S2V denoising loop: sharded steps equal the unsharded loop bit for bit; final latents vs the f32 refs") {
  const denoise_case& c = the_loop();
  const s2v::model m = loop_model(c);
  const checkpoint_weights w(c.file);
  const std::vector<std::string> policies = sharded_policies();
  double worst[2] = {0, 0};
  for (const fp8_scaling scaling : {fp8_scaling::per_channel, fp8_scaling::per_tensor}) {
    const std::string term = term_of(scaling);
    CAPTURE(term);
    weight_errors we;
    const removing deq_file{write_quantized(m, c.file, scaling, rewrite::dequantized_f32,
                                            temp_file("loop_deq.safetensors"), ".scale", &we)};
    const checkpoint deq_ckpt = checkpoint::open(deq_file.path);
    // fp8 = f32 over the dequantized weights, bit for bit.
    const loop_run one = run_loop(c, m, w, unsharded_policy() + "+" + term, 1, schedule_kind::replicated);
    const loop_run deq = run_loop(c, m, checkpoint_weights(deq_ckpt), "full", 1, schedule_kind::replicated);
    REQUIRE(one.out.size() == c.loop.blocks());
    for (const auto& [name, v] : deq.out) CHECK(same_bits(one.out.at(name), v));
    // Sharded over 3 ranks under the steps schedule (and 2 replicated): the same bits.
    for (const std::string& policy : policies) {
      CAPTURE(policy);
      const loop_run r = run_loop(c, m, w, policy + "+" + term, 3, schedule_kind::steps);
      for (const auto& [name, v] : one.out) CHECK(same_bits(r.out.at(name), v));
      for (std::size_t k = 0; k < 3; ++k) CHECK(r.measured[k].peak_bytes <= r.plan.ranks[k].peak());
    }
    const loop_run rep = run_loop(c, m, w, policies.front() + "+" + term, 2, schedule_kind::replicated);
    for (const auto& [name, v] : one.out) CHECK(same_bits(rep.out.at(name), v));
    // Accuracy of the final latents (after all 4 Euler steps) against the official f32 references.
    double e = 0;
    for (const auto& [name, v] : one.out) {
      const double b = relative_max_error(v, read_f32(c.file, "ref." + name));
      MESSAGE("denoise_a, ", term, ": ", name, " max|fp8 - f32 ref| / max|ref| = ", b);
      e = std::max(e, b);
      CHECK(b <= output_bound);
      CHECK(b > 0);
    }
    worst[scaling == fp8_scaling::per_tensor] = e;
    MESSAGE("denoise_a, ", term, ": ", we.tensors, " weights quantized; per tensor max|dW|/max|W| worst ", we.worst_max,
            " mean ", we.sum_max / static_cast<double>(we.tensors), ", ||dW||/||W|| worst ", we.worst_rms, " mean ",
            we.sum_rms / static_cast<double>(we.tensors), "; final latents worst ", e);
  }
  MESSAGE("denoise_a final latents, worst block: per channel ", worst[0], ", per tensor ", worst[1]);
  CHECK(worst[0] <= worst[1]);  // measured, as for the Wan DiT
}

TEST_CASE("fp8 gathers move half of bf16's bytes; the ledger plans the codes and the scales; peaks within plan") {
  const wan_case c = load_wan_case("wan_tiny_a");
  const wan::model m16(c.config, c.work, {dtype::bf16, gemm_path::portable, true});
  const checkpoint_weights w(c.file);
  const std::vector<std::string> policies{"chunked:4KiB+prefetch:1", "chunked:64KiB+offload", "prefetch:1",
                                          "selective:subunit", "fsdp"};
  std::size_t scale_floats = 0;
  for (const param_spec& p : quantized_weights(m16)) scale_floats += static_cast<std::size_t>(p.dims[0]);
  for (const std::string& policy : policies) {
    CAPTURE(policy);
    // Nothing resident by size: a 64 KiB threshold would keep more of the tiny model's (half as
    // large) fp8 weights resident and gather less than half, which says nothing about the bytes.
    policy_values p16 = parse_policy(policy).values, p8 = parse_policy(policy + "+fp8").values;
    p16.resident_below_bytes = p8.resident_below_bytes = 0;
    const wan_run b16 = run_wan(m16, w, c.file, p16, 3);
    const wan_run f8 = run_wan(m16, w, c.file, p8, 3);
    for (std::size_t k = 0; k < 3; ++k) {
      CHECK(f8.measured[k].peak_bytes <= f8.plan.ranks[k].peak());
      const double ratio = static_cast<double>(f8.gathered[k]) / static_cast<double>(b16.gathered[k]);
      MESSAGE(policy, " rank ", k, ": bytes_gathered fp8 ", f8.gathered[k], " / bf16 ", b16.gathered[k], " = ", ratio);
      // Only the 2-D GEMM weights shrink (the patch Conv3d, and what padding rounds up, stay):
      // about half.
      CHECK(ratio <= 0.52);
      CHECK(ratio >= 0.48);
    }
    const auto term = [&](const wan_run& r, memory_category cat) { return r.plan.ranks[0].terms[cat]; };
    // Shards (device or host) halve too; the scales are resident, one f32 per output row.
    const std::size_t s16 = term(b16, memory_category::shards) + b16.plan.ranks[0].host_bytes;
    const std::size_t s8 = term(f8, memory_category::shards) + f8.plan.ranks[0].host_bytes;
    CHECK(static_cast<double>(s8) / static_cast<double>(s16) <= 0.53);
    const std::size_t extra = term(f8, memory_category::resident) - term(b16, memory_category::resident);
    // Nothing but 1-D parameters is resident either way: the difference is the scales.
    CHECK(extra >= scale_floats * 4);
    CHECK(extra <= scale_floats * 4 + quantized_weights(m16).size() * allocation_alignment);
  }
  // fp8:tensor: one scale per weight.
  const memory_plan ch = plan_memory(m16, 3, parse_policy("chunked:4KiB+fp8").values);
  const memory_plan te = plan_memory(m16, 3, parse_policy("chunked:4KiB+fp8:tensor").values);
  CHECK(ch.ranks[0].terms[memory_category::resident] > te.ranks[0].terms[memory_category::resident]);
  CHECK(ch.ranks[0].terms[memory_category::shards] == te.ranks[0].terms[memory_category::shards]);
  // The unit layout: quantized weights are f8e4m3 with a "<weight>.scale" resident f32 parameter.
  const auto units = build_units(m16, 3, parse_policy("chunked:4KiB+fp8").values);
  std::size_t quantized = 0;
  for (const unit_layout& u : units)
    for (std::size_t i = 0; i < u.sharded_params.size(); ++i) {
      const param_spec& p = u.sharded_params[i];
      if (p.type != dtype::f8e4m3) continue;
      ++quantized;
      REQUIRE(u.sharded_scale.size() == u.sharded_params.size());
      const param_spec& s = u.resident_params.at(u.sharded_scale[i]);
      CHECK(s.name == p.name + ".scale");
      CHECK(s.type == dtype::f32);
      CHECK(s.dims == shape{p.dims[0]});
    }
  CHECK(quantized == quantized_weights(m16).size());
}

TEST_CASE("a NaN or Inf weight in a checkpoint is an error naming the tensor under fp8") {
  const wan_case c = load_wan_case("wan_tiny_a");
  const wan::model m(c.config, c.work, {dtype::f32, gemm_path::portable, true});
  for (const float bad : {std::nanf(""), -INFINITY}) {
    safetensors_writer wr;
    for (const std::string& name : c.file.names()) {
      if (name.starts_with("input.") || name.starts_with("ref.")) continue;
      std::vector<float> v = read_f32(c.file, name);
      if (name == "blocks.1.ffn.2.weight") v[1000] = bad;
      wr.add(name, c.file.at(name).dims, v);
    }
    const removing file{temp_file("bad.safetensors")};
    wr.write(file.path);
    const checkpoint ck = checkpoint::open(file.path);
    for (const char* policy : {"chunked:4KiB+fp8", "chunked:64KiB+offload+fp8:tensor"}) {
      CAPTURE(policy);
      const std::string msg = error_of([&] { session<wan::model> s(m, checkpoint_weights(ck), sharded_options(policy, 3)); });
      CHECK(msg.find("'blocks.1.ffn.2.weight'") != std::string::npos);
      CHECK(msg.find("element 1000") != std::string::npos);
      CHECK(msg.find("NaN or Inf") != std::string::npos);
    }
  }
}

TEST_CASE("fp8 checkpoints load directly: a round trip equals converting at load; bad codes and scales are errors") {
  const wan_case c = load_wan_case("wan_tiny_a");
  const wan::model m(c.config, c.work, {dtype::f32, gemm_path::portable, true});
  const checkpoint_weights w(c.file);
  const std::string policy = "chunked:4KiB+prefetch:1";
  for (const fp8_scaling scaling : {fp8_scaling::per_channel, fp8_scaling::per_tensor}) {
    const std::string term = term_of(scaling);
    CAPTURE(term);
    const wan_run converted = run_wan(m, w, c.file, policy + "+" + term, 3);
    for (const std::string suffix : {".scale", "_scale"}) {
      CAPTURE(suffix);
      const removing file{write_quantized(m, c.file, scaling, rewrite::fp8_codes, temp_file("ckpt8.safetensors"), suffix)};
      const checkpoint ck = checkpoint::open(file.path);
      CHECK(ck.at("blocks.0.ffn.0.weight").type == dtype::f8e4m3);
      CHECK(unknown_tensors(m, ck, {"input.", "ref."}).empty());  // the scales belong to their weights
      for (const std::size_t world : {std::size_t{1}, std::size_t{3}}) {
        const wan_run r = run_wan(m, checkpoint_weights(ck), c.file, policy + "+" + term, world);
        CHECK(same_bits(r.out.output, converted.out.output));
        for (std::size_t i = 0; i < r.out.blocks.size(); ++i) CHECK(same_bits(r.out.blocks[i], converted.out.blocks[i]));
      }
      if (scaling == fp8_scaling::per_tensor) {
        // A per-tensor checkpoint serves the per-channel policy exactly: every row gets the tensor's scale.
        const wan_run r = run_wan(m, checkpoint_weights(ck), c.file, policy + "+fp8", 2);
        CHECK(same_bits(r.out.output, converted.out.output));
      } else {
        // Per-channel scales cannot be served as one per tensor without rounding twice.
        const std::string msg =
            error_of([&] { session<wan::model> s(m, checkpoint_weights(ck), sharded_options(policy + "+fp8:tensor", 2)); });
        CHECK(msg.find("one scale per output row") != std::string::npos);
        CHECK(msg.find(".weight' has one scale per output row ('") != std::string::npos);
      }
      // Without an fp8 term the codes are dequantized at load (code x stored scale): the run equals,
      // bit for bit, the same policy over the dequantized f32 checkpoint.
      const removing deq_file{write_quantized(m, c.file, scaling, rewrite::dequantized_f32, temp_file("deq8.safetensors"))};
      const checkpoint dc = checkpoint::open(deq_file.path);
      const wan_run want = run_wan(m, checkpoint_weights(dc), c.file, policy, 2);
      const wan_run got = run_wan(m, checkpoint_weights(ck), c.file, policy, 2);
      CHECK(same_bits(got.out.output, want.out.output));
      CHECK(same_bits(got.out.output, converted.out.output));  // and the fp8 policy's run: the same weights
    }
  }
  // Damaged fp8 checkpoints: a NaN code, a missing, zero, negative or infinite scale, a scale of the
  // wrong length: each an error naming the tensor.
  const auto damaged = [&](const std::string& target, auto&& edit) {
    const removing good{write_quantized(m, c.file, fp8_scaling::per_channel, rewrite::fp8_codes, temp_file("good8.safetensors"))};
    const checkpoint g = checkpoint::open(good.path);
    safetensors_writer wr;
    for (const std::string& name : g.names()) {
      const tensor_info& t = g.at(name);
      std::vector<std::byte> raw(t.bytes);
      g.read(name, 0, raw);
      if (name.starts_with(target)) {
        shape dims = t.dims;
        if (!edit(name, raw, dims)) continue;  // dropped
        wr.add(name, *t.type, dims, raw);
      } else {
        wr.add(name, *t.type, t.dims, raw);
      }
    }
    const removing bad{temp_file("bad8.safetensors")};
    wr.write(bad.path);
    const checkpoint b = checkpoint::open(bad.path);
    return error_of([&] { session<wan::model> s(m, checkpoint_weights(b), sharded_options(policy + "+fp8", 3)); });
  };
  const std::string w0 = "blocks.0.self_attn.k.weight";
  std::string msg = damaged(w0, [&](const std::string& n, std::vector<std::byte>& raw, shape&) {
    if (n == w0) raw[77] = std::byte{0x7f};
    return true;
  });
  CHECK(msg.find("'" + w0 + "'") != std::string::npos);
  CHECK(msg.find("NaN code") != std::string::npos);
  msg = damaged(w0, [&](const std::string& n, std::vector<std::byte>&, shape&) { return n == w0; });
  CHECK(msg.find("'" + w0 + "' is f8e4m3 but has no scale tensor") != std::string::npos);
  for (const float s : {0.0f, -1.0f, INFINITY}) {
    msg = damaged(w0, [&](const std::string& n, std::vector<std::byte>& raw, shape&) {
      if (n == w0 + ".scale") std::memcpy(raw.data() + 8, &s, 4);
      return true;
    });
    CHECK(msg.find("scale 2 of f8e4m3 weight '" + w0 + "'") != std::string::npos);
    CHECK(msg.find("positive and finite") != std::string::npos);
  }
  msg = damaged(w0, [&](const std::string& n, std::vector<std::byte>& raw, shape& dims) {
    if (n == w0 + ".scale") {
      raw.resize(raw.size() - 4);
      dims = shape{dims[0] - 1};
    }
    return true;
  });
  CHECK(msg.find("scale tensor '" + w0 + ".scale' of f8e4m3 weight '" + w0 + "'") != std::string::npos);
}

// A rank-3 LoRA on two weights of the tiny Wan model, written to `path`.
const std::vector<std::string> lora_modules = {"blocks.0.ffn.0", "blocks.1.self_attn.q"};
void write_test_lora(const checkpoint& base, const std::string& path) {
  safetensors_writer lw;
  std::uint32_t seed = 12345;
  const auto next = [&] {
    seed = seed * 1664525u + 1013904223u;
    return static_cast<float>(seed >> 8) / static_cast<float>(1u << 24) - 0.5f;
  };
  for (const std::string& module : lora_modules) {
    const shape d = base.at(module + ".weight").dims;
    std::vector<float> a(static_cast<std::size_t>(3 * d[1])), b(static_cast<std::size_t>(d[0] * 3));
    for (auto& v : a) v = next();
    for (auto& v : b) v = next();
    lw.add("base_model.model." + module + ".lora_A.weight", shape{3, d[1]}, a);
    lw.add("base_model.model." + module + ".lora_B.weight", shape{d[0], 3}, b);
  }
  lw.write(path);
}

TEST_CASE("fp8 with a LoRA: merged into each rank's slice first, then quantized") {
  const wan_case c = load_wan_case("wan_tiny_a");
  const wan::model m(c.config, c.work, {dtype::f32, gemm_path::portable, true});
  const checkpoint_weights base(c.file);
  const removing lora_file{temp_file("lora.safetensors")};
  write_test_lora(c.file, lora_file.path);
  const checkpoint lc = checkpoint::open(lora_file.path);
  const lora_weights<checkpoint_weights> merged(base, lc, 0.75);
  // The same merge written out whole, in f32: the weights an fp8 run with the LoRA must quantize.
  safetensors_writer mw;
  for (const std::string& name : c.file.names()) {
    if (name.starts_with("input.") || name.starts_with("ref.")) continue;
    const stored_tensor st = merged.describe(name);
    std::vector<float> v(static_cast<std::size_t>(st.dims.numel()));
    if (st.type == dtype::f32) merged.read(name, 0, std::as_writable_bytes(std::span(v)));
    else v = read_f32(c.file, name);
    mw.add(name, st.dims, v);
  }
  const removing merged_file{temp_file("merged.safetensors")};
  mw.write(merged_file.path);
  const checkpoint mc = checkpoint::open(merged_file.path);
  for (const char* term : {"fp8", "fp8:tensor"}) {
    CAPTURE(term);
    const wan_run want = run_wan(m, checkpoint_weights(mc), c.file, std::string("chunked:4KiB+") + term, 1);
    const wan_run got = run_wan(m, merged, c.file, std::string("chunked:3000B+prefetch:2+") + term, 3);
    CHECK(same_bits(got.out.output, want.out.output));
    const wan_run plain = run_wan(m, base, c.file, std::string("chunked:4KiB+") + term, 1);
    CHECK(!same_bits(plain.out.output, want.out.output));  // the LoRA changed something
  }
}

TEST_CASE("a LoRA over an fp8 checkpoint: merged into the dequantized weights, then quantized afresh") {
  const wan_case c = load_wan_case("wan_tiny_a");
  const wan::model m(c.config, c.work, {dtype::f32, gemm_path::portable, true});
  const removing lora_file{temp_file("lora8.safetensors")};
  write_test_lora(c.file, lora_file.path);
  const checkpoint lc = checkpoint::open(lora_file.path);
  for (const fp8_scaling scaling : {fp8_scaling::per_channel, fp8_scaling::per_tensor}) {
    const std::string term = term_of(scaling);
    CAPTURE(term);
    const removing fp8_file{write_quantized(m, c.file, scaling, rewrite::fp8_codes, temp_file("ckpt8l.safetensors"))};
    const checkpoint q = checkpoint::open(fp8_file.path);
    // The expected source: the fp8 checkpoint with the LoRA's two weights written out as their
    // dequantized f32 values (codes x stored scales, by hand) and their scales dropped.
    safetensors_writer ww;
    for (const std::string& name : q.names()) {
      const tensor_info& t = q.at(name);
      const bool target = std::any_of(lora_modules.begin(), lora_modules.end(), [&](const std::string& mod) {
        return name == mod + ".weight";
      });
      const bool target_scale = std::any_of(lora_modules.begin(), lora_modules.end(), [&](const std::string& mod) {
        return name == mod + ".weight.scale";
      });
      if (target_scale) continue;
      std::vector<std::byte> raw(t.bytes);
      q.read(name, 0, raw);
      if (!target) {
        ww.add(name, *t.type, t.dims, raw);
        continue;
      }
      REQUIRE(*t.type == dtype::f8e4m3);
      const std::vector<float> sc = read_f32(q, name + ".scale");
      const auto rows = static_cast<std::size_t>(t.dims[0]), cols = static_cast<std::size_t>(t.dims[1]);
      std::vector<float> deq(rows * cols);
      for (std::size_t i = 0; i < deq.size(); ++i)
        deq[i] = quant::e4m3_values()[static_cast<std::uint8_t>(raw[i])] * sc[sc.size() == 1 ? 0 : i / cols];
      ww.add(name, t.dims, deq);
    }
    const removing want_file{temp_file("want8l.safetensors")};
    ww.write(want_file.path);
    const checkpoint wc = checkpoint::open(want_file.path);
    const checkpoint_weights fp8_base(q), want_base(wc);
    const lora_weights<checkpoint_weights> over_fp8(fp8_base, lc, 0.75), over_want(want_base, lc, 0.75);
    CHECK(over_fp8.describe("blocks.0.ffn.0.weight").type == dtype::f32);
    const auto merged = [](const lora_weights<checkpoint_weights>& src, const std::string& name) {
      std::vector<float> v(static_cast<std::size_t>(src.describe(name).dims.numel()));
      src.read(name, 0, std::as_writable_bytes(std::span(v)));
      return v;
    };
    for (const std::string& mod : lora_modules)  // the merged values themselves
      CHECK(same_bits(merged(over_fp8, mod + ".weight"), merged(over_want, mod + ".weight")));
    const wan_run want = run_wan(m, over_want, c.file, "chunked:4KiB+" + term, 1);
    for (const std::size_t world : {std::size_t{1}, std::size_t{3}}) {
      const wan_run got = run_wan(m, over_fp8, c.file, "chunked:3000B+prefetch:2+" + term, world);
      CHECK(same_bits(got.out.output, want.out.output));
    }
    const wan_run plain = run_wan(m, fp8_base, c.file, "chunked:4KiB+" + term, 1);
    CHECK(!same_bits(plain.out.output, want.out.output));  // the LoRA changed something
  }
}

TEST_CASE("a shared fp8_weight_source serves every rank; one that does not know a weight is refused") {
  const wan_case c = load_wan_case("wan_tiny_a");
  const wan::model m(c.config, c.work, {dtype::f32, gemm_path::portable, true});
  const checkpoint_weights w(c.file);
  const policy_values pol = parse_policy("chunked:4KiB+prefetch:1+fp8").values;
  fp8_weight_source<checkpoint_weights> q(w, fp8_scaling::per_channel);
  register_fp8_weights(q, build_units(m, 3, pol));
  const wan_run shared = run_wan(m, q, c.file, "chunked:4KiB+prefetch:1+fp8", 3);
  const wan_run own = run_wan(m, w, c.file, "chunked:4KiB+prefetch:1+fp8", 3);
  CHECK(same_bits(shared.out.output, own.out.output));
  // The scales it computed are the codec's.
  const std::vector<float> w0 = read_f32(c.file, "blocks.0.ffn.0.weight");
  const quant::fp8_weight direct = quant::quantize("blocks.0.ffn.0.weight", std::span<const float>(w0),
                                                   c.file.at("blocks.0.ffn.0.weight").dims, fp8_scaling::per_channel);
  CHECK(q.scales("blocks.0.ffn.0.weight") == direct.scales);
  std::string msg = error_of([&] { session<wan::model> s(m, q, sharded_options("chunked:4KiB+fp8:tensor", 2)); });
  CHECK(msg.find("per channel") != std::string::npos);
  const fp8_weight_source<checkpoint_weights> empty(w, fp8_scaling::per_channel);
  msg = error_of([&] { session<wan::model> s(m, empty, sharded_options("chunked:4KiB+fp8", 2)); });
  CHECK(msg.find("register_fp8_weights") != std::string::npos);
}

// The per-tensor half of benchmarks/results/fp8_accuracy.md (run with -s to print the table; the
// final-latent half is the denoising-loop test case's output). A rounding error is at most half an
// e4m3 step of the value's binade; the largest step, 32 (in [256, 448]), is at the top, where the
// largest magnitude maps to 448 (scale = amax / 448). So |dW| <= 16 * scale = amax / 28 everywhere:
// max|dW| / max|W| <= 1/28 = 0.0357 per tensor (and per row under per-channel scales).
TEST_CASE("fp8 accuracy report: every quantized weight of liveavatar_denoise_a, both scale modes") {
  const denoise_case& c = the_loop();
  const s2v::model m = loop_model(c);
  std::string table = "\n| tensor | shape | per channel max\\|ΔW\\| / max\\|W\\| | per channel ‖ΔW‖ / ‖W‖ | "
                      "per tensor max\\|ΔW\\| / max\\|W\\| | per tensor ‖ΔW‖ / ‖W‖ |\n|---|---|---|---|---|---|\n";
  weight_errors all[2];
  std::size_t channel_better = 0, tensors = 0;
  for (const param_spec& p : quantized_weights(m)) {
    const std::vector<float> w = read_f32(c.file, p.name);
    weight_errors e[2];
    for (const fp8_scaling s : {fp8_scaling::per_channel, fp8_scaling::per_tensor}) {
      const quant::fp8_weight q = quant::quantize(p.name, std::span<const float>(w), p.dims, s);
      const std::vector<float> deq = quant::dequantize(q);
      e[s == fp8_scaling::per_tensor].add(w, deq);
      all[s == fp8_scaling::per_tensor].add(w, deq);
    }
    char row[256];
    std::snprintf(row, sizeof row, "| %s | %s | %.4f | %.4f | %.4f | %.4f |\n", p.name.c_str(), p.dims.to_string().c_str(),
                  e[0].worst_max, e[0].worst_rms, e[1].worst_max, e[1].worst_rms);
    table += row;
    CHECK(e[0].worst_max <= 1.0 / 28 * (1 + 1e-6));  // up to f32 rounding of the scale
    CHECK(e[1].worst_max <= 1.0 / 28 * (1 + 1e-6));
    channel_better += e[0].worst_rms <= e[1].worst_rms;
    ++tensors;
  }
  {
    const auto n = static_cast<double>(tensors);
    char row[320];
    std::snprintf(row, sizeof row,
                  "| **all %zu** | | worst %.4f, mean %.4f | worst %.4f, mean %.4f | worst %.4f, mean %.4f | worst %.4f, "
                  "mean %.4f |\n",
                  tensors, all[0].worst_max, all[0].sum_max / n, all[0].worst_rms, all[0].sum_rms / n, all[1].worst_max,
                  all[1].sum_max / n, all[1].worst_rms, all[1].sum_rms / n);
    table += row;
  }
  MESSAGE(table);
  MESSAGE("per-channel RMS error <= per-tensor on ", channel_better, " of ", tensors, " tensors");
  CHECK(all[0].sum_rms <= all[1].sum_rms);
}

TEST_CASE("the 14B stack planner under fp8: quantized weights at 1 byte, the scales resident, auto searches fp8 too") {
  using namespace unshard::liveavatar;
  const stack st = liveavatar_stack(liveavatar_14b());
  plan_request rq;
  rq.world_size = 5;
  // The quantized weights counted by the runtime's rule (plan/unit_layout.hpp) on the S2V model the
  // stack is counted from: the stack planner must agree.
  const ::unshard::s2v::model m(*st.s2v_model, s2v::pipeline_workload(*st.s2v_model, 720, 400));
  count q = 0, rows = 0, tensors = 0;
  for (const param_spec& p : quantized_weights(m)) {
    q += p.dims.numel();
    rows += p.dims[0];
    ++tensors;
  }
  count sq = 0;
  for (const dit_unit& u : st.units) sq += u.quantized;
  CHECK(sq == q);
  CHECK(static_cast<double>(q) / static_cast<double>(st.total_dit()) > 0.95);  // nearly every DiT parameter
  const stack_plan b16 = plan_stack(st, parse_policy("fsdp"), rq);
  const stack_plan f8 = plan_stack(st, parse_policy("fsdp+fp8"), rq);
  const stack_plan f8t = plan_stack(st, parse_policy("fsdp+fp8:tensor"), rq);
  const double shards = static_cast<double>(f8.details.at("shards.dit")) / static_cast<double>(b16.details.at("shards.dit"));
  const double blocks =
      static_cast<double>(f8.details.at("gathered.blocks")) / static_cast<double>(b16.details.at("gathered.blocks"));
  MESSAGE("liveavatar-14b, 5 ranks, fsdp: shards.dit ", b16.details.at("shards.dit"), " -> ", f8.details.at("shards.dit"),
          " (", shards, "), gathered.blocks ratio ", blocks, ", peak ", b16.peak(), " -> ", f8.peak());
  CHECK(shards > 0.5);
  CHECK(shards < 0.51);
  CHECK(blocks > 0.5);
  CHECK(blocks < 0.51);
  CHECK(f8.details.at("resident.fp8_scales") == static_cast<std::size_t>(rows) * 4);
  CHECK(f8t.details.at("resident.fp8_scales") == static_cast<std::size_t>(tensors) * 4);
  CHECK(f8.time_s < b16.time_s);  // half the bytes to gather
  // Chunked: the widest row at 1 byte (a quantized weight's) or 2 (a convolution's).
  const stack_plan c16 = plan_stack(st, parse_policy("chunked:1B"), rq), c8 = plan_stack(st, parse_policy("chunked:1B+fp8"), rq);
  CHECK(c8.effective_chunk < c16.effective_chunk);
  CHECK(c8.effective_chunk == static_cast<std::size_t>(st.widest_row_fp8_bytes));
  // --policy auto: without fp8 unless asked; with it, every candidate twice.
  CHECK(auto_candidates(true).size() == 2 * auto_candidates().size());
  const std::size_t budget = 24ull * (1ull << 30) - static_cast<std::size_t>(1.85 * (1ull << 30));
  const auto plain = plan_auto(st, rq, budget, schedules_to_search(std::nullopt));
  const auto both = plan_auto(st, rq, budget, schedules_to_search(std::nullopt), true);
  for (const auto& p : plain.fits) CHECK(!parse_policy(p.policy).values.fp8);
  REQUIRE(!both.fits.empty());
  CHECK(both.fits.size() > plain.fits.size());
  CHECK(both.fits.front().block_s <= plain.fits.front().block_s);
  MESSAGE("auto with fp8 at 5 x 24 GiB: fastest ", both.fits.front().policy, " (", both.fits.front().block_s,
          " s/block) against ", plain.fits.front().policy, " (", plain.fits.front().block_s, " s/block)");
}

TEST_CASE("the Wan stack planner's fp8 formulas agree with the unit layouts of a Wan model") {
  using namespace unshard::liveavatar;
  const wan_case c = load_wan_case("wan_tiny_a");
  const wan::model m(c.config, c.work, {dtype::bf16, gemm_path::portable, true});
  const stack st = wan_stack(c.config, "wan_tiny_a");
  count q = 0, rows = 0, tensors = 0, sq = 0, srows = 0, stensors = 0;
  for (const param_spec& p : quantized_weights(m)) {
    q += p.dims.numel();
    rows += p.dims[0];
    ++tensors;
  }
  for (const dit_unit& u : st.units) {
    sq += u.quantized;
    srows += u.quantized_rows;
    stensors += u.quantized_tensors;
  }
  CHECK(sq == q);
  CHECK(srows == rows);
  CHECK(stensors == tensors);
  // The widest row under fp8, from the model's own specs. (The largest sub-unit is the formulas'
  // max(self_attn, ffn, time projection) in both modes, as wan_stack always counted it: the model's
  // "time" sub-unit also holds the two time-embedding Linears, which that formula leaves out.)
  count widest = 0;
  policy_values pol;
  pol.fp8 = true;
  for (std::size_t l = 0; l < m.layer_count(); ++l)
    for (std::size_t s = 0; s < m.layer(l).subunit_count(); ++s)
      for (const param_spec& p : m.layer(l).parameters(s)) {
        const bool qz = unshard::detail::quantized_under(p, pol);
        if (p.by_rows && p.dims.rank() >= 2) widest = std::max(widest, p.dims.numel() / p.dims[0] * (qz ? 1 : 2));
      }
  CHECK(st.widest_row_fp8_bytes == widest);
  const auto d = static_cast<count>(c.config.dim);
  CHECK(st.largest_subunit_fp8_bytes == 2 * st.largest_subunit - 6 * d * d);  // the time projection: d x 6d at 1 byte
}

// The per-tensor activation quantization of the CUDA backend's --fp8-activations tensor (the official
// fp8_linear.py path), on the host: the reference the GPU test compares the device against, so its
// codes, scale and GEMM are checked here from first principles.
TEST_CASE("fp8 activations per tensor: codes and scale from amax / 448; the fp8 x fp8 linear; chunks equal the whole") {
  std::mt19937 gen(1515);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  const std::size_t m = 7, k = 48, n = 19;
  std::vector<float> x(m * k), w(n * k), b(n);
  for (float& v : x) v = dist(gen);
  for (float& v : w) v = 0.1f * dist(gen);
  for (float& v : b) v = dist(gen);
  x[13] = -9.5f;  // the amax, negative: its code is -448

  // Codes and scale.
  std::vector<f8e4m3> xc(m * k);
  const float sx = quantize_activations_per_tensor(x.data(), x.size(), xc.data());
  CHECK(sx == 9.5f / 448.0f);
  CHECK(xc[13].bits == 0xfe);  // -448
  for (std::size_t i = 0; i < x.size(); ++i) {
    const float v = xc[i].to_float() * sx, q = x[i] / sx;
    CHECK(xc[i].bits == float_to_e4m3(q).bits);  // |q| <= 448: never clamped here
    // Round to nearest: within half a step of e4m3 (2^-4 relative for normals, 2^-10 sx below 2^-6 sx).
    CHECK(std::abs(v - x[i]) <= std::max(std::abs(x[i]) / 16.0f, sx / 1024.0f) * 1.0001f);
  }
  // All zeros: scale 1, zero codes; a value that would round past 448 is clamped to it.
  std::vector<float> zeros(5, 0.0f);
  std::vector<f8e4m3> zc(5);
  CHECK(quantize_activations_per_tensor(zeros.data(), 5, zc.data()) == 1.0f);
  for (const f8e4m3 c : zc) CHECK((c.bits & 0x7f) == 0);
  CHECK(fp8_activation_code(std::nextafter(448.0f, 1000.0f) * 2.0f, 2.0f) == 0x7e);

  for (const fp8_scaling scaling : {fp8_scaling::per_channel, fp8_scaling::per_tensor}) {
    CAPTURE(quant::name_of(scaling));
    quant::fp8_weight q = quant::quantize("w", std::span<const float>(w), shape{std::int64_t(n), std::int64_t(k)}, scaling);
    const tensor_view wv =
        tensor_view(q.codes.data(), dtype::f8e4m3, shape{std::int64_t(n), std::int64_t(k)}).with_scales(q.scales.data(), q.scales.size());
    const tensor_view bv(b.data(), dtype::f32, shape{std::int64_t(n)});
    std::vector<float> y(m * n);
    linear_rows_fp8_activations(x.data(), m, k, wv, bv, 0, y.data(), n);
    // Against the definition in double: exact products of the values, sums within k 2^-24 of Σ.
    double worst = 0.0, worst_vs_f32 = 0.0, ymax = 0.0;
    for (std::size_t i = 0; i < m; ++i)
      for (std::size_t j = 0; j < n; ++j) {
        double sum = 0.0, abs_sum = 0.0, exact = b[j];
        for (std::size_t l = 0; l < k; ++l) {
          const double p = double(xc[i * k + l].to_float()) * q.codes[j * k + l].to_float();
          sum += p;
          abs_sum += std::abs(p);
          exact += double(x[i * k + l]) * w[j * k + l];
        }
        const double s = double(sx) * q.row_scale(j), want = sum * s + b[j];
        const double bound = (double(k) + 4.0) * 0x1p-24 * (abs_sum * s + std::abs(b[j]));
        CHECK(std::abs(y[i * n + j] - want) <= bound);
        worst = std::max(worst, std::abs(y[i * n + j] - want) / bound);
        worst_vs_f32 = std::max(worst_vs_f32, std::abs(y[i * n + j] - exact));
        ymax = std::max(ymax, std::abs(exact));
      }
    // The quantization error itself (x and W each within 2^-4 relative, most far less): reported, and
    // a coarse check that nothing is lost (a wrong scale is off by order 1).
    MESSAGE("fp8 activations, ", quant::name_of(scaling), " weights: worst err / bound ", worst,
            "; max|y - f32 linear| / max|y| = ", worst_vs_f32 / ymax);
    CHECK(worst_vs_f32 <= 0.1 * ymax);
    // Row chunks (as a chunked unshard hands them over) give the same values, bit for bit: x is
    // quantized whole either way and the portable order depends on K alone.
    std::vector<float> yc(m * n, -1.0f);
    for (std::int64_t r0 = 0; r0 < std::int64_t(n); r0 += 5) {
      const std::int64_t r1 = std::min<std::int64_t>(n, r0 + 5);
      linear_rows_fp8_activations(x.data(), m, k, row_slice(wv, r0, r1), row_slice(bv, r0, r1), std::size_t(r0),
                                  yc.data(), n);
    }
    CHECK(std::memcmp(yc.data(), y.data(), y.size() * sizeof(float)) == 0);
  }
  // Not an fp8 weight, or codes without scales: an error naming the shape.
  const tensor_view f32w(w.data(), dtype::f32, shape{std::int64_t(n), std::int64_t(k)});
  std::vector<float> y(m * n);
  CHECK_THROWS_WITH_AS(linear_rows_fp8_activations(x.data(), m, k, f32w, tensor_view{}, 0, y.data(), n),
                       doctest::Contains("must be f8e4m3 [N, 48]"), error);
}
