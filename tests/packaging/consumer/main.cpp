// A downstream program that includes only the umbrella header: its own model, written against the
// layer and model concepts, run sharded over 2 host ranks under prefetch<1> and checked against the
// unsharded forward and its plan. Built twice: against unshard::unshard (the portable GEMM) and
// against unshard::blas (CONSUMER_EXPECT_CBLAS: 1 where OpenBLAS is installed, so its GEMMs must run
// on it, 0 where it is not).
#include <unshard/unshard.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#if defined(CONSUMER_EXPECT_CBLAS)
static_assert(unshard::blas_available() == (CONSUMER_EXPECT_CBLAS != 0), "unshard::blas and OpenBLAS disagree");
constexpr unshard::gemm_path path = unshard::gemm_path::blas;
#else
static_assert(!unshard::blas_available(), "unshard::unshard alone must not bring a BLAS");
constexpr unshard::gemm_path path = unshard::gemm_path::portable;
#endif

struct tiny_state {
  float* x = nullptr;  // [tokens, dim]
  float* y = nullptr;  // [tokens, dim]
  std::size_t tokens = 0, dim = 0;
};

// x += x · Wᵀ + b, one sub-unit.
class tiny_layer {
 public:
  tiny_layer(std::size_t index, std::size_t dim) : index_(index), dim_(dim) {}
  std::string name() const { return "blocks." + std::to_string(index_); }
  std::size_t subunit_count() const { return 1; }
  std::string subunit_name(std::size_t) const { return "linear"; }
  std::vector<unshard::param_spec> parameters(std::size_t) const {
    const auto d = static_cast<std::int64_t>(dim_);
    return {{name() + ".weight", {d, d}, unshard::dtype::f32}, {name() + ".bias", {d}, unshard::dtype::f32}};
  }
  template <unshard::param_source P>
  void forward(std::size_t, P& p, tiny_state& s) const {
    unshard::linear_params(s.x, s.tokens, s.dim, p, 0, 1, s.y, path);
    for (std::size_t i = 0; i < s.tokens * s.dim; ++i) s.x[i] += s.y[i];
  }
  void forward(std::size_t sub, const unshard::param_views& v, tiny_state& s) const {
    unshard::whole_params p(v);
    forward(sub, p, s);
  }

 private:
  std::size_t index_, dim_;
};

class tiny_model {
 public:
  using state = tiny_state;
  static constexpr std::size_t tokens = 4, dim = 160;  // 100 KiB weights: sharded, not resident

  tiny_model() {
    for (std::size_t i = 0; i < 3; ++i) layers_.emplace_back(i, dim);
  }
  std::size_t layer_count() const { return layers_.size(); }
  const tiny_layer& layer(std::size_t i) const { return layers_.at(i); }
  std::vector<unshard::buffer_spec> buffers() const {
    return {{"x", tokens * dim * 4, unshard::memory_category::activations},
            {"y", tokens * dim * 4, unshard::memory_category::workspace}};
  }
  tiny_state make_state(const unshard::buffer_set& b) const { return {b.as<float>("x"), b.as<float>("y"), tokens, dim}; }

 private:
  std::vector<tiny_layer> layers_;
};
static_assert(unshard::model<tiny_model>);

int main() {
  const tiny_model m;
  const unshard::synthetic_weights w(m);
  std::vector<float> x(tiny_model::tokens * tiny_model::dim, 0.5f), got;

  unshard::session_options opt;
  opt.world_size = 2;
  opt.policy = unshard::values_of<unshard::prefetch<1>>();
  unshard::session<tiny_model> s(m, w, opt);
  s.forward([&](std::size_t, tiny_state& st) { std::memcpy(st.x, x.data(), x.size() * 4); },
            [&](std::size_t r, const tiny_state& st) {
              if (r == 0) got.assign(st.x, st.x + x.size());
            });

  unshard::reference_runner<tiny_model> ref(m, w);
  std::memcpy(ref.state().x, x.data(), x.size() * 4);
  ref.forward();
  float diff = 0.f, scale = 1.f;
  for (std::size_t i = 0; i < x.size(); ++i) {
    diff = std::max(diff, std::fabs(got.at(i) - ref.state().x[i]));
    scale = std::max(scale, std::fabs(ref.state().x[i]));
  }
  // Bit for bit on the portable GEMM; a BLAS may sum in another order for another shape.
  const bool same = path == unshard::gemm_path::portable ? diff == 0.f : diff <= 1e-6f * scale;
  const bool within_plan = s.measured(0).peak_bytes <= s.plan().peak_bytes();
  std::printf("unshard %d.%d.%d, gemm %s: max|sharded - unsharded| = %g, peak %zu of %zu planned bytes\n",
              UNSHARD_VERSION_MAJOR, UNSHARD_VERSION_MINOR, UNSHARD_VERSION_PATCH,
              std::string(unshard::name_of(unshard::effective_gemm_path(path, unshard::dtype::f32))).c_str(), diff,
              s.measured(0).peak_bytes, s.plan().peak_bytes());
  return same && within_plan ? 0 : 1;
}
