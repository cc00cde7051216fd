// The planner's time model against the host backend. For the toy model and the tiny Wan DiT
// (tests/data/wan_tiny_a.*), under several policies and world sizes, it
//  * predicts one forward with plan/time_model.hpp: the session's own units (bytes, chunks, kept
//    units) as steps, FLOPs from the model's shapes, compute at this machine's measured GEMM rate
//    (shared among ranks when there are more ranks than cores), gathers at the simulated link of
//    session_options plus the measured memcpy rate, per-collective latency plus the measured
//    oversleep of the link's sleep;
//  * measures the forward with unshard::session (median of --runs after a warm-up) and each rank's
//    peak;
// and writes predicted, measured and relative error to a CSV (benchmarks/results/time_model_check.csv).
// With --trace-dir DIR it also writes the predicted and the measured Chrome trace of one case.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "unshard/io/checkpoint.hpp"
#include "unshard/kernels/host/gemm.hpp"
#include "toy_layer/toy_model.hpp"
#include "unshard/models/wan/model.hpp"
#include "unshard/plan/time_model.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/runtime/checkpoint_weights.hpp"
#include "unshard/runtime/session.hpp"

#ifndef UNSHARD_TEST_DATA_DIR
#define UNSHARD_TEST_DATA_DIR "tests/data"
#endif

namespace {
using namespace unshard;
using clk = std::chrono::steady_clock;

double seconds_since(clk::time_point t0) { return std::chrono::duration<double>(clk::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

// --- calibration: this machine ----------------------------------------------------------------

// FLOP/s of the portable GEMM on one thread for y[m, n] = x[m, k] W[n, k]^T.
double gemm_rate(std::size_t m, std::size_t k, std::size_t n, int reps = 5, double each_s = 0.05) {
  std::vector<float> x(m * k, 0.01f), w(n * k, 0.02f), y(m * n);
  const tensor_view wv(w.data(), dtype::f32, shape{static_cast<std::int64_t>(n), static_cast<std::int64_t>(k)});
  std::vector<double> rates;
  for (int rep = 0; rep < reps; ++rep) {
    std::size_t calls = 0;
    const auto t0 = clk::now();
    do {
      linear_rows(x.data(), m, k, wv, tensor_view{}, 0, y.data(), n, gemm_path::portable);
      ++calls;
    } while (seconds_since(t0) < each_s);
    rates.push_back(2.0 * static_cast<double>(m * k * n * calls) / seconds_since(t0));
  }
  return median(rates);
}

// The same, with `threads` threads running it at once: the rate each rank's compute gets when
// every rank computes (this is how a shared, possibly busy machine is calibrated, case by case).
double gemm_rate_concurrent(std::size_t threads, std::size_t m, std::size_t k, std::size_t n) {
  std::vector<double> rates(threads);
  std::vector<std::thread> pool;
  for (std::size_t i = 0; i < threads; ++i) pool.emplace_back([&, i] { rates[i] = gemm_rate(m, k, n, 3, 0.01); });
  for (auto& t : pool) t.join();
  return median(rates);
}

double memcpy_rate() {
  std::vector<std::byte> a(8 << 20, std::byte{1}), b(8 << 20);
  std::vector<double> rates;
  for (int rep = 0; rep < 5; ++rep) {
    std::size_t n = 0;
    const auto t0 = clk::now();
    do {
      std::memcpy(b.data(), a.data(), a.size());
      ++n;
    } while (seconds_since(t0) < 0.05);
    rates.push_back(static_cast<double>(a.size() * n) / seconds_since(t0));
  }
  return median(rates);
}

// How much longer than asked sleep_for(s) takes here (the simulated link sleeps).
double oversleep(double s, int samples = 50) {
  std::vector<double> extra;
  for (int i = 0; i < samples; ++i) {
    const auto t0 = clk::now();
    std::this_thread::sleep_for(std::chrono::duration<double>(s));
    extra.push_back(seconds_since(t0) - s);
  }
  return median(extra);
}

// --- FLOPs of each layer, from the models' shapes ---------------------------------------------

std::vector<double> toy_layer_flops(const toy::toy_config& c) {
  std::vector<double> f;
  const double T = static_cast<double>(c.tokens), D = static_cast<double>(c.dim);
  for (std::size_t l = 0; l < c.layers; ++l) {
    const double F = static_cast<double>(c.ffn_of(l));
    f.push_back(2 * T * D * D + 4 * T * D * F);  // mix, ffn.0, ffn.2
  }
  return f;
}

// Embeddings (patch, text, time), blocks (self attention over L tokens, cross attention to the
// text_len context, FFN), head.
std::vector<double> wan_layer_flops(const wan::config& c, const wan::workload& w) {
  const double pvol = static_cast<double>(c.patch_size[0] * c.patch_size[1] * c.patch_size[2]);
  const double L = static_cast<double>(w.latent_shape[1] / c.patch_size[0] * (w.latent_shape[2] / c.patch_size[1]) *
                                       (w.latent_shape[3] / c.patch_size[2]));
  const double D = static_cast<double>(c.dim), F = static_cast<double>(c.ffn_dim), Lc = static_cast<double>(c.text_len);
  const double C = static_cast<double>(c.in_dim), Td = static_cast<double>(c.text_dim), fd = static_cast<double>(c.freq_dim);
  std::vector<double> f;
  f.push_back(2 * L * D * C * pvol + 2 * Lc * (Td * D + D * D) + 2 * (fd * D + D * D + 6 * D * D));
  for (std::int64_t i = 0; i < c.num_layers; ++i)
    f.push_back(8 * L * D * D + 4 * L * L * D + 4 * L * D * D + 4 * Lc * D * D + 4 * L * Lc * D + 4 * L * D * F);
  f.push_back(2 * L * D * static_cast<double>(c.out_dim) * pvol);
  return f;
}

template <model M>
std::vector<std::size_t> layer_param_bytes(const M& m) {
  std::vector<std::size_t> b;
  for (std::size_t l = 0; l < m.layer_count(); ++l) {
    std::size_t t = 0;
    for (std::size_t s = 0; s < m.layer(l).subunit_count(); ++s)
      for (const auto& p : m.layer(l).parameters(s)) t += p.bytes();
    b.push_back(t);
  }
  return b;
}

std::size_t param_bytes(const std::vector<param_spec>& ps) {
  std::size_t t = 0;
  for (const auto& p : ps) t += p.bytes();
  return t;
}

// The steps of a steady-state forward (after the first: kept units are already gathered), from the
// session's own unit layouts. A unit's FLOPs are its layer's in proportion to its weight bytes.
std::vector<step_cost> steps_of(const std::vector<unit_layout>& units, const policy_values& pol, std::size_t n,
                                const std::vector<double>& layer_flops, const std::vector<std::size_t>& layer_bytes) {
  std::vector<step_cost> steps;
  const double remote = static_cast<double>(n - 1) / static_cast<double>(n);
  for (const auto& u : units) {
    const std::size_t own = param_bytes(u.sharded_params) + param_bytes(u.resident_params);
    const double flops = layer_flops[u.info.layer] * static_cast<double>(own) / static_cast<double>(layer_bytes[u.info.layer]);
    const double shard = static_cast<double>(u.sharded.shard_bytes());
    if (u.kept || u.gathered_bytes() == 0) {
      steps.push_back({u.name, flops, 0, 0, 0, u.kept});
    } else if (pol.chunked()) {
      const double total = static_cast<double>(u.sharded.used_bytes());
      for (std::size_t c = 0; c < u.chunks.size(); ++c) {
        const double b = static_cast<double>(u.chunks[c].bytes());
        steps.push_back({u.name + "#" + std::to_string(c), flops * b / total, b * remote, pol.offload ? b / static_cast<double>(n) : 0,
                         u.chunks[c].bytes(), false});
      }
    } else {
      steps.push_back({u.name, flops, static_cast<double>(u.gathered_bytes()) * remote, pol.offload ? shard : 0,
                       u.gathered_bytes(), false});
    }
  }
  return steps;
}

struct calibration {
  double memcpy = 0, oversleep = 0;
  std::size_t m = 0, k = 0, n = 0;  // the GEMM shape the model mostly runs
};

struct config {
  link_model link;
  int runs = 7;
  std::string trace_dir;
};

struct row {
  std::string model, policy;
  std::size_t world = 0;
  double predicted_s = 0, measured_s = 0;
  std::size_t planned_peak = 0, measured_peak = 0, predicted_gathered = 0, planned_gathered = 0;
  double gemm_per_rank = 0;
  double load = 0;  // the machine's 1-minute load average during the case (other processes compete)
  link_model link;
};

time_rates rates_for(const calibration& cal, const config& cfg, double gemm_per_rank) {
  time_rates r;
  r.flops = gemm_per_rank;
  // A host gather copies what it receives, then sleeps for the simulated link.
  r.link_bytes_s = cfg.link.bytes_per_s > 0 ? 1.0 / (1.0 / cfg.link.bytes_per_s + 1.0 / cal.memcpy) : cal.memcpy;
  r.link_latency_s = cfg.link.latency_s > 0 || cfg.link.bytes_per_s > 0 ? cfg.link.latency_s + cal.oversleep : 0;
  r.h2d_bytes_s = cal.memcpy;  // offload's copy: a memcpy (no host-to-device link simulated)
  return r;
}

template <model M, weight_source W, class Prepare>
row run_case(const std::string& model_name, const M& m, const W& w, const std::string& pol, std::size_t n,
             const std::vector<double>& layer_flops, const calibration& cal, const config& cfg, Prepare prepare) {
  session_options opt;
  opt.world_size = n;
  opt.policy = parse_policy(pol).values;
  opt.link = cfg.link;
  const bool trace = !cfg.trace_dir.empty();
  opt.trace = trace;
  session<M> s(m, w, opt);
  auto finish = [](std::size_t, const typename M::state&) {};
  s.forward(prepare, finish);  // warm-up; full/fsdp gather their kept units here
  // Each timed forward is paired with the GEMM rate each of n concurrent ranks gets just before
  // it, so a busy machine's changing load is in the prediction of the same moment.
  const auto steps = steps_of(s.units(), opt.policy, n, layer_flops, layer_param_bytes(m));
  std::vector<double> t, predicted, gemms;
  timeline tl;
  for (int r = 0; r < cfg.runs; ++r) {
    gemms.push_back(gemm_rate_concurrent(n, cal.m, cal.k, cal.n));
    calibration now = cal;
    if (cfg.link.latency_s > 0) now.oversleep = oversleep(cfg.link.latency_s, 5);
    tl = simulate_forward(steps, rates_for(now, cfg, gemms.back()), opt.policy.prefetch_depth);
    predicted.push_back(tl.total_s);
    if (trace && s.trace()) s.trace()->clear();
    const auto t0 = clk::now();
    s.forward(prepare, finish);
    t.push_back(seconds_since(t0));
  }
  const double gemm = median(gemms);
  row out{model_name, opt.policy.name, n, median(predicted), median(t), s.plan().peak_bytes(), 0, tl.peak_gathered,
          s.plan().ranks[0].terms[memory_category::gathered], gemm, 0, cfg.link};
  double load[1] = {0};
  if (getloadavg(load, 1) == 1) out.load = load[0];
  for (std::size_t r = 0; r < n; ++r) out.measured_peak = std::max(out.measured_peak, s.measured(r).peak_bytes);
  if (trace && s.trace()) {  // the last forward, measured, beside its prediction
    std::string stem = cfg.trace_dir + "/" + model_name + "_" + pol + "_w" + std::to_string(n);
    std::replace(stem.begin() + static_cast<std::ptrdiff_t>(cfg.trace_dir.size()), stem.end(), ':', '-');
    std::ofstream measured(stem + "_measured.json");
    s.trace()->write_chrome_json(measured, [&](std::uint32_t u) { return s.units()[u].name; });
    std::ofstream predicted(stem + "_predicted.json");
    const category_bytes& terms = s.plan().ranks[0].terms;
    std::map<std::string, std::size_t> constant;
    for (auto c : all_memory_categories)
      if (c != memory_category::gathered && terms[c]) constant[std::string(name_of(c))] = terms[c];
    write_chrome_trace(predicted, tl, n, constant, model_name + " " + pol + " world " + std::to_string(n) + " (host)");
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::string out = "time_model_check.csv";
  config cfg;
  // Two simulated links unless one is given: a fast one (compute-bound forwards) and a slow,
  // latency-heavy one (transfer-bound forwards, where the schedule, not the GEMM rate, decides).
  std::vector<link_model> links{{200e-6, 2e9}, {5e-3, 0.5e9}};
  bool link_given = false;
  cfg.link = links[0];
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) out = argv[++i];
    else if (a == "--runs" && i + 1 < argc) cfg.runs = std::max(1, std::atoi(argv[++i]));
    else if (a == "--latency-us" && i + 1 < argc) cfg.link.latency_s = std::atof(argv[++i]) * 1e-6, link_given = true;
    else if (a == "--link-gbs" && i + 1 < argc) cfg.link.bytes_per_s = std::atof(argv[++i]) * 1e9, link_given = true;
    else if (a == "--trace-dir" && i + 1 < argc) cfg.trace_dir = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--out FILE.csv] [--runs N] [--latency-us US] [--link-gbs GB/s] [--trace-dir DIR]\n", argv[0]);
      return 2;
    }
  }
  toy::toy_config tc;
  tc.layers = 8;
  tc.dim = 256;
  tc.ffn = 768;
  tc.tokens = 64;
  const toy::toy_model toy_m(tc);
  const toy::toy_weights toy_w(toy_m);
  std::vector<float> x(tc.tokens * tc.dim, 0.1f);
  auto toy_prepare = [&](std::size_t, toy::toy_state& st) { std::memcpy(st.x, x.data(), x.size() * 4); };

  const std::string data = UNSHARD_TEST_DATA_DIR;
  const checkpoint wan_file = checkpoint::open(data + "/wan_tiny_a.safetensors");
  const wan::config wc = wan::config::load(data + "/wan_tiny_a.config.json");
  const auto xd = wan_file.at("input.x").dims;
  const wan::workload ww{{xd[0], xd[1], xd[2], xd[3]}, wan_file.at("input.context").dims[0]};
  const wan::model wan_m(wc, ww, {dtype::f32, gemm_path::portable, false});
  const checkpoint_weights wan_w(wan_file);
  auto wan_prepare = [&](std::size_t, wan::state& st) {
    wan_m.set_inputs(st, wan_file.view("input.x"), wan_file.view("input.t"), wan_file.view("input.context"));
  };

  calibration toy_cal, wan_cal;
  toy_cal.memcpy = wan_cal.memcpy = memcpy_rate();
  if (link_given) links = {cfg.link};
  toy_cal.oversleep = wan_cal.oversleep = oversleep(links[0].latency_s);
  toy_cal.m = tc.tokens, toy_cal.k = tc.dim, toy_cal.n = tc.ffn;  // the toy's FFN shape
  const std::int64_t L = xd[1] / wc.patch_size[0] * (xd[2] / wc.patch_size[1]) * (xd[3] / wc.patch_size[2]);
  wan_cal.m = static_cast<std::size_t>(L), wan_cal.k = static_cast<std::size_t>(wc.dim), wan_cal.n = static_cast<std::size_t>(wc.ffn_dim);
  std::printf("calibration: %u hardware threads, memcpy %.2f GB/s, oversleep %.1f us; portable GEMM on one thread "
              "%.2f GFLOP/s (toy %zux%zux%zu), %.2f GFLOP/s (wan %zux%zux%zu)\n",
              std::thread::hardware_concurrency(), toy_cal.memcpy / 1e9, toy_cal.oversleep * 1e6,
              gemm_rate(toy_cal.m, toy_cal.k, toy_cal.n) / 1e9, toy_cal.m, toy_cal.k, toy_cal.n,
              gemm_rate(wan_cal.m, wan_cal.k, wan_cal.n) / 1e9, wan_cal.m, wan_cal.k, wan_cal.n);

  const std::vector<const char*> policies{"full",       "fsdp",     "selective", "prefetch:1", "prefetch:2",
                                          "selective:subunit+prefetch:1", "offload+prefetch:1", "chunked:64KiB+prefetch:1"};
  std::vector<row> rows;
  const auto add = [&](auto&& make) {
    try {
      rows.push_back(make());
      const row& r = rows.back();
      std::printf("%-5s %-34s %2zu  predicted %8.3f ms  measured %8.3f ms  error %+6.1f%%  peak %zu/%zu  gemm/rank %.2f GFLOP/s  load %.1f\n",
                  r.model.c_str(), r.policy.c_str(), r.world, r.predicted_s * 1e3, r.measured_s * 1e3,
                  100 * (r.predicted_s - r.measured_s) / r.measured_s, r.measured_peak, r.planned_peak, r.gemm_per_rank / 1e9, r.load);
    } catch (const std::exception& e) {
      std::printf("skipped: %s\n", e.what());
    }
  };
  for (const link_model& link : links) {
    std::printf("simulated link: %.0f us per collective + %.2f GB/s\n", link.latency_s * 1e6, link.bytes_per_s / 1e9);
    for (std::size_t n : {1, 2, 3, 4})
      for (const char* pol : policies) {
        add([&] { return run_case("toy", toy_m, toy_w, pol, n, toy_layer_flops(tc), toy_cal, config{link, cfg.runs, ""}, toy_prepare); });
        add([&] { return run_case("wan", wan_m, wan_w, pol, n, wan_layer_flops(wc, ww), wan_cal, config{link, cfg.runs, ""}, wan_prepare); });
      }
  }
  if (!cfg.trace_dir.empty()) {  // one traced case per model, for the pictures in docs/planner.md
    run_case("toy", toy_m, toy_w, "prefetch:1", 2, toy_layer_flops(tc), toy_cal, cfg, toy_prepare);
    run_case("wan", wan_m, wan_w, "prefetch:1", 2, wan_layer_flops(wc, ww), wan_cal, cfg, wan_prepare);
  }

  std::ofstream csv(out);
  csv << "model,policy,world_size,link_latency_us,link_gbs,predicted_s,measured_median_s,relative_error,planned_peak_bytes,measured_peak_bytes,"
         "predicted_live_gathered_bytes,planned_gathered_bytes,gemm_flops_per_rank,load_average\n";
  std::map<std::string, std::vector<double>> errors;  // per model and link
  for (const row& r : rows) {
    const double err = (r.predicted_s - r.measured_s) / r.measured_s;
    errors[r.model + ", link " + std::to_string(std::lround(r.link.latency_s * 1e6)) + " us"].push_back(std::fabs(err));
    csv << r.model << ',' << r.policy << ',' << r.world << ',' << r.link.latency_s * 1e6 << ',' << r.link.bytes_per_s / 1e9
        << ',' << r.predicted_s << ',' << r.measured_s << ',' << err << ','
        << r.planned_peak << ',' << r.measured_peak << ',' << r.predicted_gathered << ',' << r.planned_gathered << ',' << r.gemm_per_rank << ',' << r.load << '\n';
  }
  for (auto& [model, e] : errors)
    std::printf("%s: %zu cases, median |error| %.1f%%, max %.1f%%\n", model.c_str(), e.size(), 100 * median(e),
                100 * *std::max_element(e.begin(), e.end()));
  std::printf("wrote %s\n", out.c_str());
  return 0;
}
