// The Wan DiT sharded under every policy and world sizes 1-5, loaded from the checkpoint by each
// rank, against the official references and bit for bit against the unsharded forward.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "unshard/io/checkpoint.hpp"
#include "unshard/models/wan/model.hpp"
#include "unshard/policy/compose.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/policy/selective_unshard.hpp"
#include "unshard/runtime/checkpoint_weights.hpp"
#include "unshard/runtime/reference_forward.hpp"
#include "unshard/runtime/session.hpp"

#include "support/sharded_options.hpp"
#include "support/wan_case.hpp"

using namespace unshard;
using namespace unshard::testing;

namespace {

template <weight_source S>
wan_outputs run_reference(const wan::model& m, const S& w, const checkpoint& in) {
  reference_runner<wan::model> ref(m, w);
  set_case_inputs(m, ref.state(), in);
  ref.forward();
  return collect_outputs(m, ref.state());
}

}  // namespace

TEST_CASE("sharded Wan DiT: every policy, world sizes 1-5, equals the unsharded forward and the references") {
  const wan_case c = load_wan_case("wan_tiny_a");
  for (gemm_path path : {gemm_path::portable, gemm_path::blas}) {
    const wan::model m(c.config, c.work, {dtype::f32, path, true});
    const checkpoint_weights w(c.file);
    const wan_outputs want = run_reference(m, w, c.file);
    const auto ref_out = read_f32(c.file, "ref.output");
    CHECK(excess(want.output, ref_out) <= 1.0);
    for (const char* pol : {"full", "fsdp", "selective", "selective:subunit", "prefetch:1", "prefetch:2",
                            "selective:subunit+prefetch:3", "offload", "offload+prefetch:2"})
      for (std::size_t n = 1; n <= 5; ++n) {
        CAPTURE(pol);
        CAPTURE(n);
        CAPTURE(static_cast<int>(path));
        session<wan::model> s(m, w, sharded_options(pol, n));
        s.cap_device_memory(s.plan().peak_bytes());
        wan_outputs got;
        forward_case(s, m, c.file, [&](std::size_t rank, const wan::state& st) {
          if (rank == n - 1) got = collect_outputs(m, st);
        });
        CHECK(std::memcmp(got.output.data(), want.output.data(), want.output.size() * 4) == 0);
        for (std::size_t i = 0; i < got.blocks.size(); ++i) {
          CHECK(std::memcmp(got.blocks[i].data(), want.blocks[i].data(), want.blocks[i].size() * 4) == 0);
          CHECK(excess(got.blocks[i], read_f32(c.file, "ref.block." + std::to_string(i) + ".out")) <= 1.0);
        }
        CHECK(excess(got.output, ref_out) <= 1.0);
        for (std::size_t r = 0; r < n; ++r) CHECK(s.measured(r).peak_bytes <= s.plan().ranks[r].peak());
      }
  }
}

TEST_CASE("each rank reads only its shard: bytes read per rank are the model's bytes / N (plus resident)") {
  const wan_case c = load_wan_case("wan_tiny_a");
  const wan::model m(c.config, c.work, {dtype::f32, gemm_path::portable, true});
  std::size_t model_bytes = 0;
  for (std::size_t l = 0; l < m.layer_count(); ++l)
    for (std::size_t s = 0; s < m.layer(l).subunit_count(); ++s)
      for (const auto& p : m.layer(l).parameters(s)) model_bytes += p.bytes();
  for (std::size_t n : {1, 2, 3, 5}) {
    CAPTURE(n);
    const checkpoint file = checkpoint::open(data_dir + "/wan_tiny_a.safetensors");  // fresh counters
    const checkpoint_weights w(file);
    session_options opt;
    opt.world_size = n;
    opt.policy = values_of<selective_unshard<per_block, 0>>();  // nothing resident: every byte sharded
    session<wan::model> s(m, w, opt);
    CHECK(file.bytes_read() == model_bytes);  // all ranks together read the model exactly once
    MESSAGE("world ", n, ": ", file.bytes_read() / n, " bytes read per rank of ", model_bytes);
  }
}

TEST_CASE("bf16 weights: sharded run equals an f32-compute run on the same bf16-rounded weights") {
  const wan_case c = load_wan_case("wan_tiny_a");
  const wan::model m16(c.config, c.work, {dtype::bf16, gemm_path::portable, true});
  const checkpoint_weights w(c.file);
  const wan_outputs want16 = run_reference(m16, w, c.file);
  // The same weights rounded to bf16, written as f32: an f32 model over them is the comparison.
  const std::string rounded = write_bf16_rounded(c.file, "unshard_wan_bf16_rounded.safetensors");
  const checkpoint rounded_file = checkpoint::open(rounded);
  const wan::model m32(c.config, c.work, {dtype::f32, gemm_path::portable, true});
  const wan_outputs want32 = run_reference(m32, checkpoint_weights(rounded_file), c.file);
  CHECK(excess(want16.output, want32.output) <= 1.0);
  const session_options opt = sharded_options("offload+prefetch:1", 3);
  session<wan::model> s(m16, w, opt);
  wan_outputs got;
  forward_case(s, m16, c.file, [&](std::size_t rank, const wan::state& st) {
    if (rank == 0) got = collect_outputs(m16, st);
  });
  CHECK(std::memcmp(got.output.data(), want16.output.data(), got.output.size() * 4) == 0);
  const auto ref = read_f32(c.file, "ref.output");
  double d = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) d = std::max(d, static_cast<double>(std::fabs(got.output[i] - ref[i])));
  MESSAGE("bf16 weights: max |output - f32 reference| = ", d, " (reported, not asserted)");
  std::filesystem::remove(rounded);
}

TEST_CASE("a checkpoint that does not match the model is refused, naming the tensor") {
  const wan_case c = load_wan_case("wan_tiny_a");
  wan::config other = c.config;
  other.ffn_dim += 8;
  const wan::model m(other, c.work, {dtype::f32, gemm_path::portable, true});
  const checkpoint_weights w(c.file);
  session_options opt;
  opt.world_size = 2;
  // Which rank trips first (over ffn.0.weight or ffn.0.bias) is a race; both name the tensor.
  try {
    session<wan::model> s(m, w, opt);
    FAIL("a mismatched checkpoint was accepted");
  } catch (const rank_failure& e) {
    const std::string what = e.what();
    CHECK(what.find("wan_tiny_a.safetensors: tensor 'blocks.") != std::string::npos);
    CHECK(what.find(".ffn.0.") != std::string::npos);
    CHECK(what.find("' has shape [384") != std::string::npos);
  }
}

namespace {
// The checkpoint with one f32 element of one tensor replaced (a NaN, an Inf, any value).
class poisoned_weights {
 public:
  poisoned_weights(const checkpoint& c, std::string name, std::size_t element, float value)
      : base_(c), name_(std::move(name)), element_(element), value_(value) {}
  stored_tensor describe(std::string_view name) const { return base_.describe(name); }
  void read(std::string_view name, std::uint64_t offset, std::span<std::byte> dst) const {
    base_.read(name, offset, dst);
    const std::uint64_t at = element_ * sizeof(float);
    if (name == name_ && at >= offset && at + sizeof(float) <= offset + dst.size())
      std::memcpy(dst.data() + (at - offset), &value_, sizeof(float));
  }
  std::string origin() const { return base_.origin(); }

 private:
  checkpoint_weights base_;
  std::string name_;
  std::size_t element_;
  float value_;
};

std::string load_failure(const wan::model& m, const poisoned_weights& w, std::size_t world_size) {
  session_options opt;
  opt.world_size = world_size;
  try {
    session<wan::model> s(m, w, opt);
  } catch (const rank_failure& e) {
    return e.what();
  }
  return "(loaded)";
}
}  // namespace

TEST_CASE("a NaN or Inf weight is refused while loading, naming the tensor, row, column and byte offset") {
  const wan_case c = load_wan_case("wan_tiny_a");
  REQUIRE(c.file.find("blocks.1.ffn.0.weight")->dims[1] == 128);
  REQUIRE(c.file.find("blocks.1.ffn.0.weight")->type == dtype::f32);
  const wan::model f32_model(c.config, c.work, {dtype::f32, gemm_path::portable, true});
  const wan::model bf16_model(c.config, c.work, {dtype::bf16, gemm_path::portable, true});
  for (const std::size_t world : {1, 3}) {
    CAPTURE(world);
    const std::string nan = load_failure(f32_model, poisoned_weights(c.file, "blocks.1.ffn.0.weight", 1000, NAN), world);
    CHECK(nan.find("wan_tiny_a.safetensors: tensor 'blocks.1.ffn.0.weight' has NaN at element 1000 (row 7, column 104), "
                   "byte offset 4000 of the tensor's data (a checkpoint's weights must be finite)") != std::string::npos);
    // Through the conversion to bf16 storage.
    const std::string inf =
        load_failure(bf16_model, poisoned_weights(c.file, "blocks.1.ffn.0.weight", 1000, -INFINITY), world);
    CHECK(inf.find("tensor 'blocks.1.ffn.0.weight' has -Inf at element 1000 (row 7, column 104)") != std::string::npos);
    // Finite in f32, beyond bf16: named as such.
    const std::string big =
        load_failure(bf16_model, poisoned_weights(c.file, "blocks.1.ffn.0.weight", 1000, 3.4e38f), world);
    CHECK(big.find("tensor 'blocks.1.ffn.0.weight' element 1000 (row 7, column 104) = 3.4e+38 is beyond the range of bf16 "
                   "(stored as f32; it becomes +Inf)") != std::string::npos);
    // A 1-D parameter (resident on every rank) too.
    const std::string bias = load_failure(f32_model, poisoned_weights(c.file, "blocks.0.ffn.0.bias", 5, INFINITY), world);
    CHECK(bias.find("tensor 'blocks.0.ffn.0.bias' has +Inf at element 5, byte offset 20") != std::string::npos);
  }
  // The unpoisoned checkpoint loads (the checker passes finite weights).
  CHECK(load_failure(f32_model, poisoned_weights(c.file, "none", 0, NAN), 2) == "(loaded)");
}
