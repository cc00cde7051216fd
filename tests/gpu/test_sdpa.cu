// sdpa / sdpa_bf16 (kernels/cuda/sdpa.cuh) against a host reference in double on the same
// (bf16, widened exactly) inputs: one key segment, two segments under one softmax (KV cache +
// cond keys), groups > 1 (per-frame audio attention), head_dim 128. Every case prints which
// implementation ran (cuDNN's SDPA or unshard's kernel); with the cuDNN frontend compiled in, the
// bf16 cases must have run on cuDNN.
//
// Bound for bf16, and why: q and k are exact in f32, their products too, and the scores sum in
// f32 (~K u32 relative: negligible). A flash kernel on tensor cores rounds the probabilities P to
// bf16 before P·V (relative 2^-9 each, as cuDNN and FlashAttention do), so the output moves by at
// most 2^-9 Σ_j p_j |v_j|; the exp, the online rescaling and the f32 sums add a few u32 more. We
// allow twice that, 2^-8 Σ_j p_j |v_j|, plus the output's own rounding to bf16 (expect_close adds
// one bf16 ulp of the larger value). A kernel that rounded the scores to bf16 (error ~2^-9 |s|
// in the exponent, ~1% for |s| ~ 3), used the wrong scale, mixed groups or dropped a segment
// misses it. f32 runs unshard's kernel (cuDNN has no f32 SDPA): the 1e-5 rule of the references.
#include "device_checks.cuh"

#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <tuple>
#include <vector>

#include "unshard/kernels/cuda/sdpa.cuh"

using namespace unshard;
using namespace unshard::gpu_testing;

namespace {

struct attention_reference {
  std::vector<float> out;
  std::vector<double> pv_abs;  // Σ_j p_j |v_j| per output element
};

// Group g's queries against group g's rows of seg1 then seg2, per head, in double.
attention_reference host_sdpa(const std::vector<float>& q, std::size_t queries, const std::vector<float>& k1,
                              const std::vector<float>& v1, std::size_t rows1, const std::vector<float>& k2,
                              const std::vector<float>& v2, std::size_t rows2, std::size_t heads, std::size_t d,
                              std::size_t groups, double scale) {
  const std::size_t ld = heads * d, qg = queries / groups, n1 = rows1 / groups, n2 = rows2 / groups;
  attention_reference r{std::vector<float>(queries * ld), std::vector<double>(queries * ld)};
  std::vector<double> s(n1 + n2);
  for (std::size_t g = 0; g < groups; ++g)
    for (std::size_t h = 0; h < heads; ++h)
      for (std::size_t i = 0; i < qg; ++i) {
        const float* qi = q.data() + (g * qg + i) * ld + h * d;
        auto key = [&](std::size_t j) {
          return j < n1 ? k1.data() + (g * n1 + j) * ld + h * d : k2.data() + (g * n2 + j - n1) * ld + h * d;
        };
        auto value = [&](std::size_t j) {
          return j < n1 ? v1.data() + (g * n1 + j) * ld + h * d : v2.data() + (g * n2 + j - n1) * ld + h * d;
        };
        double mx = -1e300;
        for (std::size_t j = 0; j < n1 + n2; ++j) {
          const float* kj = key(j);
          double dot = 0.0;
          for (std::size_t c = 0; c < d; ++c) dot += static_cast<double>(qi[c]) * kj[c];
          s[j] = dot * scale;
          mx = std::max(mx, s[j]);
        }
        double sum = 0.0;
        for (auto& e : s) sum += (e = std::exp(e - mx));
        for (std::size_t c = 0; c < d; ++c) {
          double acc = 0.0, abs_acc = 0.0;
          for (std::size_t j = 0; j < n1 + n2; ++j) {
            const double vj = value(j)[c];
            acc += s[j] * vj;
            abs_acc += s[j] * std::abs(vj);
          }
          const std::size_t at = (g * qg + i) * ld + h * d + c;
          r.out[at] = static_cast<float>(acc / sum);
          r.pv_abs[at] = abs_acc / sum;
        }
      }
  return r;
}

}  // namespace

TEST_CASE_TEMPLATE("sdpa matches the host attention: one and two key segments, groups, head_dim 128", T, bf16, float) {
  test_stream st;
  cuda::sdpa_plan_cache cache;
  // (queries, rows1, rows2, heads, head_dim, groups): self-attention; cache + cond keys; the
  // per-frame audio attention (4 frames of 33 queries, 16 audio tokens each); groups and two
  // segments together; cross-attention with few keys.
  for (const auto& [nq, r1, r2, heads, d, groups] :
       {std::tuple<std::size_t, std::size_t, std::size_t, std::size_t, std::size_t, std::size_t>{200, 300, 0, 3, 128, 1},
        {150, 256, 77, 2, 128, 1},
        {4 * 33, 4 * 16, 0, 2, 128, 4},
        {2 * 40, 2 * 64, 2 * 24, 2, 128, 2},
        {96, 13, 0, 4, 64, 1}}) {
    const std::size_t ld = heads * d;
    const auto q = stored<T>(random_floats(nq * ld, 51, 0.0f, 1.0f));
    const auto k1 = stored<T>(random_floats(r1 * ld, 52, 0.0f, 1.0f));
    const auto v1 = stored<T>(random_floats(r1 * ld, 53));
    const auto k2 = stored<T>(random_floats(std::max<std::size_t>(r2, 1) * ld, 54, 0.0f, 1.0f));
    const auto v2 = stored<T>(random_floats(std::max<std::size_t>(r2, 1) * ld, 55));
    device_vector<T> dq(q), dk1(k1), dv1(v1), dk2(k2), dv2(v2), dout(nq * ld);
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    cache.reset_stats();
    cuda::sdpa<T>(cache, dq.p, nq, {dk1.p, dv1.p, r1}, {dk2.p, dv2.p, r2}, heads, d, groups, dout.p, 0.0f, st.s);
    const auto got = dout.get(st);
    const auto ref = host_sdpa(widened(q), nq, widened(k1), widened(v1), r1, widened(k2), widened(v2), r2, heads, d,
                               groups, static_cast<double>(static_cast<float>(scale)));
    const std::string what = std::string("sdpa ") + storage_name<T>() + " q=" + std::to_string(nq) + " keys=" +
                             std::to_string(r1) + "+" + std::to_string(r2) + " h=" + std::to_string(heads) +
                             " d=" + std::to_string(d) + " groups=" + std::to_string(groups);
    MESSAGE(what, ": ran on ", cache.last_impl_name(),
            cache.last_fallback_reason().empty() ? std::string() : " (" + cache.last_fallback_reason() + ")");
    if constexpr (std::is_same_v<T, bf16>) {
      expect_close<T>(what, got, ref.out, [&](std::size_t i) { return std::ldexp(ref.pv_abs[i], -8) + 1e-30; });
      if (cuda::sdpa_has_cudnn) {
        CHECK_MESSAGE(cache.last_impl() == cuda::sdpa_impl::cudnn, what, " did not run on cuDNN: ",
                      cache.last_fallback_reason());
        CHECK(cache.stats().segments_joined == (r2 > 0 ? 1u : 0u));
      } else {
        CHECK(cache.last_impl() == cuda::sdpa_impl::unshard_kernel);
      }
    } else {
      expect_close_rel(what, got, ref.out, 1e-5);
      CHECK(cache.last_impl() == cuda::sdpa_impl::unshard_kernel);
    }
  }
  if constexpr (std::is_same_v<T, bf16>) {
    if (cuda::sdpa_has_cudnn) {
      // One graph per shape; running the first shape again reuses it.
      const std::size_t built = cache.stats().graphs_built;
      CHECK(cache.cached_graphs() >= 4);
      MESSAGE("cuDNN graphs built: ", built, ", workspace ", cache.workspace_bytes(), " bytes, K/V scratch ",
              cache.scratch_bytes(), " bytes");
    }
  }
}

TEST_CASE("sdpa_bf16 reuses its cuDNN graph and scratch across calls of one shape, and rejects uneven groups") {
  test_stream st;
  cuda::sdpa_plan_cache cache;
  const std::size_t nq = 64, r1 = 128, r2 = 32, heads = 2, d = 128, ld = heads * d;
  const auto q = stored<bf16>(random_floats(nq * ld, 56));
  const auto k = stored<bf16>(random_floats((r1 + r2) * ld, 57));
  const auto v = stored<bf16>(random_floats((r1 + r2) * ld, 58));
  device_vector<bf16> dq(q), dk(k), dv(v), dout(nq * ld);
  const cuda::attention_segment<bf16> s1{dk.p, dv.p, r1}, s2{dk.p + r1 * ld, dv.p + r1 * ld, r2};
  CHECK(cuda::sdpa_scratch_bytes(r1, r2, heads, d) == (cuda::sdpa_has_cudnn ? 2 * (r1 + r2) * ld * sizeof(bf16) : 0u));
  cache.reserve(cuda::sdpa_scratch_bytes(r1, r2, heads, d), 0);
  for (int i = 0; i < 3; ++i) cuda::sdpa_bf16(cache, dq.p, nq, s1, s2, heads, d, 1, dout.p, 0.0f, st.s);
  st.sync();
  MESSAGE("3 calls: ", cache.last_impl_name(), ", cuDNN calls ", cache.stats().cudnn_calls, ", graphs built ",
          cache.stats().graphs_built);
  if (cuda::sdpa_has_cudnn) {
    CHECK(cache.stats().cudnn_calls == 3);
    CHECK(cache.stats().graphs_built == 1);
    CHECK(cache.scratch_bytes() == cuda::sdpa_scratch_bytes(r1, r2, heads, d));  // reserved, not regrown
  }
  // Two segments given as one contiguous segment: the same result (the join is a copy).
  device_vector<bf16> dout1(nq * ld);
  cuda::sdpa_bf16(cache, dq.p, nq, {dk.p, dv.p, r1 + r2}, {}, heads, d, 1, dout1.p, 0.0f, st.s);
  const auto a = dout.get(st), b = dout1.get(st);
  std::size_t differ = 0;
  for (std::size_t i = 0; i < a.size(); ++i) differ += a[i].bits != b[i].bits;
  CHECK_MESSAGE(differ == 0, differ, " outputs differ between the joined segments and one segment");
  CHECK_THROWS(cuda::sdpa_bf16(cache, dq.p, nq, s1, s2, heads, d, 3, dout.p, 0.0f, st.s));  // 64 % 3 != 0
}
