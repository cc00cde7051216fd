// Live Avatar's denoising loop on the host backend under both schedules: the whole loop's time
// (sink + every block's steps; median of several runs) at world size 2 with prefetch:1 on a model
// where one forward takes a few hundred milliseconds (dim 384, 6 layers, 384 tokens per block,
// 2 clips x 4 blocks x 4 steps), and, at world size 1 with offload, the weight bytes moved per
// forward. Writes a CSV (default denoise.csv); benchmarks/README.md has the results.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "unshard/models/liveavatar/denoiser.hpp"
#include "unshard/models/liveavatar/loop_inputs.hpp"
#include "unshard/models/liveavatar/synthetic_loop.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/runtime/session.hpp"
#include "unshard/runtime/synthetic_weights.hpp"

namespace {
using namespace unshard;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

struct run_result {
  double loop_s = 0;
  std::size_t ticks = 0, forwards = 0, bytes_gathered = 0, peak = 0;
  std::vector<float> last_latent;
};

template <weight_source W>
run_result run_once(const s2v::model& m, const W& weights, const s2v::loop_spec& loop, const s2v::synthetic_loop_inputs& data,
                    std::size_t world, const char* policy, schedule_kind kind) {
  session_options opt;
  opt.world_size = world;
  opt.policy = parse_policy(policy).values;
  opt.schedule = kind;
  session<s2v::model> s(m, weights, opt);
  s2v::denoiser den(m, s, {loop.sampler, loop.blocks_per_clip, false});
  run_result r;
  const auto t0 = std::chrono::steady_clock::now();
  den.sink(data.sink());
  den.denoise(data.blocks(), [&](s2v::block_result&& res) { r.last_latent = std::move(res.latent); });
  r.loop_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.ticks = den.ticks_run();
  for (std::size_t k = 0; k < world; ++k) {
    r.forwards = std::max(r.forwards, s.runtime(k).forwards());
    r.bytes_gathered = std::max(r.bytes_gathered, s.runtime(k).bytes_gathered());
    r.peak = std::max(r.peak, s.plan().ranks[k].peak());
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  std::string out = "denoise.csv";
  int runs = 3;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) out = argv[++i];
    else if (a == "--runs" && i + 1 < argc) runs = std::max(1, std::atoi(argv[++i]));
    else {
      std::fprintf(stderr, "usage: %s [--out FILE.csv] [--runs N]\n", argv[0]);
      return 2;
    }
  }
  use_one_blas_thread_per_rank();
  const s2v::config cfg = s2v::config::from_json(
      nlohmann::json{{"dim", 384}, {"ffn_dim", 1024}, {"freq_dim", 256}, {"text_dim", 128}, {"text_len", 32},
                     {"num_heads", 6}, {"num_layers", 6}, {"cond_dim", 16}, {"audio_dim", 64},
                     {"audio_inject_layers", {0, 3}}, {"enable_adain", true}, {"zero_timestep", true},
                     {"enable_motioner", false}, {"enable_framepack", true}, {"framepack_drop_mode", "padd"}},
      "bench config");
  s2v::loop_spec loop;
  loop.clips = 2;
  loop.blocks_per_clip = 4;
  loop.latent_hw = {16, 32};  // 8 x 16 tokens per frame, 384 per block of 3 frames
  s2v::workload work;
  work.latent_hw = loop.latent_hw;
  work.context_len = 16;
  const s2v::model m(cfg, work, {dtype::f32, gemm_path::blas, false});
  const synthetic_weights weights(m, 5);
  const s2v::synthetic_loop_inputs data(m.geometry(), loop, 16, 1);
  std::printf("S2V dim %zu, %zu layers, %zu tokens per block, %zu clips x %zu blocks x %zu steps\n", m.geometry().dim,
              m.geometry().num_layers, m.geometry().block_tokens, loop.clips, loop.blocks_per_clip, loop.sampler.steps);

  std::ofstream csv(out);
  csv << "world_size,policy,schedule,runs,loop_s_median,loop_s_min,loop_s_max,ticks,forwards_per_rank,"
         "bytes_gathered_per_rank,bytes_per_forward,peak_bytes\n";
  // The W = 1 offload rows count bytes (deterministic): one run each.
  struct row {
    std::size_t world;
    const char* policy;
    schedule_kind kind;
    bool timed;
  };
  const row rows[] = {{2, "prefetch:1", schedule_kind::replicated, true}, {2, "prefetch:1", schedule_kind::steps, true},
                      {1, "offload+prefetch:1", schedule_kind::replicated, false},
                      {1, "offload+prefetch:1", schedule_kind::steps, false}};
  std::vector<double> medians;
  std::vector<double> per_forward;
  std::vector<float> reference;
  for (const row& rw : rows) {
    std::vector<double> t;
    run_result last;
    for (int i = 0; i < (rw.timed ? runs : 1); ++i) {
      last = run_once(m, weights, loop, data, rw.world, rw.policy, rw.kind);
      t.push_back(last.loop_s);
    }
    if (reference.empty()) reference = last.last_latent;
    double diff = 0;
    for (std::size_t k = 0; k < reference.size(); ++k)
      diff = std::max(diff, static_cast<double>(std::fabs(reference[k] - last.last_latent[k])));
    const double bpf = static_cast<double>(last.bytes_gathered) / static_cast<double>(std::max<std::size_t>(last.forwards, 1));
    medians.push_back(median(t));
    per_forward.push_back(bpf);
    std::printf("W=%zu %-20s %-10s loop %.3f s (median of %zu; min %.3f, max %.3f), %zu ticks, %zu forwards/rank, "
                "%.3g weight bytes per forward, last latent within %.2g of the first run\n",
                rw.world, rw.policy, name_of(rw.kind), medians.back(), t.size(), *std::min_element(t.begin(), t.end()),
                *std::max_element(t.begin(), t.end()), last.ticks, last.forwards, bpf, diff);
    csv << rw.world << ',' << rw.policy << ',' << name_of(rw.kind) << ',' << t.size() << ',' << medians.back() << ','
        << *std::min_element(t.begin(), t.end()) << ',' << *std::max_element(t.begin(), t.end()) << ',' << last.ticks << ','
        << last.forwards << ',' << last.bytes_gathered << ',' << bpf << ',' << last.peak << '\n';
  }
  std::printf("W=2 prefetch:1: steps / replicated = %.3f (ideal 18/32 forward-times = 0.5625)\n", medians[1] / medians[0]);
  std::printf("W=1 offload: weight bytes per forward, steps / replicated = %.3f (ideal 1/4 in steady state; 11 ticks "
              "for 32 forwards here = 0.344)\n", per_forward[3] / per_forward[2]);
  return 0;
}
