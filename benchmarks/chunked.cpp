// Chunked unshard against whole-unit gathering on the host backend: forward time (median of
// several runs) and per-rank peak of random-weight Wan models, for a range of chunk sizes, with
// and without a simulated per-collective latency. Writes a CSV (default
// benchmarks/results/chunked.csv); benchmarks/plot_chunked.py draws peak against time.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "unshard/models/wan/model.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/runtime/session.hpp"
#include "unshard/runtime/synthetic_weights.hpp"

namespace {
using namespace unshard;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

struct bench_model {
  const char* name;
  nlohmann::json config;
  wan::workload work;
};

std::size_t chunk_count(const std::vector<unit_layout>& units) {
  std::size_t n = 0;
  for (const auto& u : units) n += u.chunks.size();
  return n;
}
}  // namespace

int main(int argc, char** argv) {
  std::string out = "chunked.csv";
  int runs = 5;
  std::size_t world = 2;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) out = argv[++i];
    else if (a == "--runs" && i + 1 < argc) runs = std::max(1, std::atoi(argv[++i]));
    else if (a == "--world-size" && i + 1 < argc) world = static_cast<std::size_t>(std::max(1, std::atoi(argv[++i])));
    else {
      std::fprintf(stderr, "usage: %s [--out FILE.csv] [--runs N] [--world-size N]\n", argv[0]);
      return 2;
    }
  }
  const std::vector<bench_model> models = {
      {"wan-tiny", {{"dim", 32}, {"ffn_dim", 64}, {"freq_dim", 16}, {"text_dim", 24}, {"text_len", 8}, {"in_dim", 4},
                    {"out_dim", 4}, {"num_heads", 2}, {"num_layers", 2}},
       {{4, 2, 8, 8}, 6}},
      {"wan-medium", {{"dim", 512}, {"ffn_dim", 2048}, {"freq_dim", 64}, {"text_dim", 256}, {"text_len", 32},
                      {"in_dim", 16}, {"out_dim", 16}, {"num_heads", 8}, {"num_layers", 6}},
       {{16, 4, 16, 16}, 24}},
  };
  const std::vector<std::string> policies = {"prefetch:1",           "chunked:1B+prefetch:1",  "chunked:16KiB+prefetch:1",
                                             "chunked:64KiB+prefetch:1", "chunked:256KiB+prefetch:1",
                                             "chunked:1MiB+prefetch:1",  "chunked:256KiB+prefetch:2"};
  std::ofstream csv(out);
  csv << "model,policy,world_size,link_latency_us,median_forward_s,planned_peak_bytes,measured_peak_bytes,"
         "gathered_bytes,effective_chunk_bytes,chunks_per_forward\n";
  std::printf("%-11s %-28s %8s %11s %13s %13s %11s %7s\n", "model", "policy", "lat_us", "forward_ms", "planned_peak",
              "gathered", "chunk", "chunks");
  for (const bench_model& bm : models) {
    const wan::model m(wan::config::from_json(bm.config, bm.name), bm.work, {dtype::f32, gemm_path::blas, false});
    const synthetic_weights w(m, 3);
    const auto [C, F, H, W] = bm.work.latent_shape;
    std::vector<float> x(static_cast<std::size_t>(C * F * H * W)), ctx(static_cast<std::size_t>(bm.work.context_len) * bm.config["text_dim"].get<std::size_t>());
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.01f * static_cast<float>(i));
    for (std::size_t i = 0; i < ctx.size(); ++i) ctx[i] = std::cos(0.03f * static_cast<float>(i));
    for (double latency_us : {0.0, 50.0})
      for (const std::string& pol : policies) {
        session_options opt;
        opt.world_size = world;
        opt.policy = parse_policy(pol).values;
        opt.link.latency_s = latency_us * 1e-6;
        session<wan::model> s(m, w, opt);
        auto prepare = [&](std::size_t, wan::state& st) { m.set_inputs(st, x, 500.f, ctx); };
        auto finish = [](std::size_t, const wan::state&) {};
        s.forward(prepare, finish);  // warm-up
        std::vector<double> t;
        for (int r = 0; r < runs; ++r) {
          const auto t0 = std::chrono::steady_clock::now();
          s.forward(prepare, finish);
          t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        const double med = median(t);
        const auto& plan = s.plan();
        const std::size_t chunks = chunk_count(s.units());
        csv << bm.name << ',' << pol << ',' << world << ',' << latency_us << ',' << med << ',' << plan.peak_bytes() << ','
            << s.measured(0).peak_bytes << ',' << plan.ranks[0].terms[memory_category::gathered] << ','
            << plan.effective_chunk_bytes << ',' << chunks << '\n';
        std::printf("%-11s %-28s %8.0f %11.2f %13zu %13zu %11zu %7zu\n", bm.name, pol.c_str(), latency_us, med * 1e3,
                    plan.peak_bytes(), plan.ranks[0].terms[memory_category::gathered], plan.effective_chunk_bytes,
                    chunks);
      }
  }
  std::printf("wrote %s\n", out.c_str());
}
