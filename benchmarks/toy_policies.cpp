// Forward time (median of several runs) and per-rank peak of the toy model under each policy and
// world size, on the host backend. Writes a CSV (default benchmarks/results/toy_policies.csv) and
// prints a table. One BLAS-free thread per rank; a simulated link can be added with --latency-us.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "toy_layer/toy_model.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/runtime/session.hpp"

namespace {
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}
}  // namespace

int main(int argc, char** argv) {
  using namespace unshard;
  std::string out = "toy_policies.csv";
  int runs = 7;
  double latency_us = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) out = argv[++i];
    else if (a == "--runs" && i + 1 < argc) runs = std::max(1, std::atoi(argv[++i]));
    else if (a == "--latency-us" && i + 1 < argc) latency_us = std::atof(argv[++i]);
    else {
      std::fprintf(stderr, "usage: %s [--out FILE.csv] [--runs N] [--latency-us US]\n", argv[0]);
      return 2;
    }
  }
  toy::toy_config c;
  c.layers = 8;
  c.dim = 256;
  c.ffn = 768;
  c.tokens = 64;
  const toy::toy_model m(c);
  const toy::toy_weights w(m);
  std::vector<float> x(c.tokens * c.dim, 0.1f);
  std::ofstream csv(out);
  csv << "policy,world_size,median_forward_s,planned_peak_bytes,measured_peak_bytes,gathered_bytes,shards_bytes\n";
  std::printf("%-34s %5s %12s %14s %14s\n", "policy", "world", "forward_ms", "planned_peak", "measured_peak");
  for (const char* pol : {"full", "selective", "selective:subunit", "prefetch:1", "prefetch:2", "offload",
                          "offload+prefetch:1"})
    for (std::size_t n : {1, 2, 4}) {
      session_options opt;
      opt.world_size = n;
      opt.policy = parse_policy(pol).values;
      opt.link.latency_s = latency_us * 1e-6;
      session<toy::toy_model> s(m, w, opt);
      auto prepare = [&](std::size_t, toy::toy_state& st) { std::memcpy(st.x, x.data(), x.size() * 4); };
      auto finish = [](std::size_t, const toy::toy_state&) {};
      s.forward(prepare, finish);  // warm-up (and the one-time gathers of `full`)
      std::vector<double> t;
      for (int r = 0; r < runs; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        s.forward(prepare, finish);
        t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      const auto& plan = s.plan().ranks[0];
      const auto meas = s.measured(0);
      csv << opt.policy.name << ',' << n << ',' << median(t) << ',' << plan.peak() << ',' << meas.peak_bytes << ','
          << plan.terms[memory_category::gathered] << ',' << plan.terms[memory_category::shards] << '\n';
      std::printf("%-34s %5zu %12.3f %14zu %14zu\n", opt.policy.name.c_str(), n, median(t) * 1e3, plan.peak(),
                  meas.peak_bytes);
    }
  std::printf("wrote %s\n", out.c_str());
  return 0;
}
