// Issue 15 item 3: the planner's plans for Live Avatar 14B on 1 x 24 GiB and 2 x 24 GiB, run on
// the host backend on a scaled model, with the bytes each forward moves counted by the runtime.
//
// The plans (`unshard-plan --model liveavatar-14b --world-size 1|2 --device-memory 24GiB --policy auto
// --fp8 --host-memory 96GiB`): W = 1 `selective:subunit+prefetch:2+offload+fp8+kv:offload`, W = 2
// `selective:subunit+prefetch:2+fp8+kv:offload`, both under the steps schedule. Each runs here as
// planned, with `kv:offload:2`, with `kv:device` and without fp8 (and with neither), over Live
// Avatar's denoising loop (sink, 1 clip x 4 blocks x 4 steps) on a random-weight S2V model with the
// 14B's proportions where a host run allows them (benchmarks/results/fp8_kv_schedules.md):
//   14B: dim 5120, 40 heads (head dim 128), FFN 13824 (2.7 x dim), 40 blocks, 12 audio injectors,
//        3168 tokens per block, a noisy cache of 4 blocks (12672 tokens) per step, 2640 cond tokens,
//        bf16 weights and caches;
//   here: dim 512, 4 heads (head dim 128), FFN 1384 (2.7 x dim), 8 blocks, 3 injectors, 312 tokens per
//        block (latent 16x26, 3 frames), a noisy cache of 4 blocks (1248 tokens) per step, 256 cond
//        tokens, bf16 weights and caches: tokens / dim and cache tokens / dim within 2 % of the 14B's,
//        so one block's KV page against one block's weights has the 14B's ratio.
//
// Per run and rank 0 (the busiest: it owns steps 0, W, ...), from the runtime's counters: weight bytes
// gathered (rank_runtime::bytes_gathered), weight bytes copied host -> device under offload (the
// shards' copies; see weight_bytes_in below), KV-cache bytes copied in and written back under
// kv:offload (kv_bytes_in/kv_bytes_out), the forwards; from the tracking allocators: the measured
// device and host peaks, per category; from the ledger (plan_memory): the planned ones. Next to the
// measured bytes, the bytes expected from the unit layouts (gathers, offload copies: one pass per
// tick) and from the model's cache access rule (KV: each forward reads the noisy rows it attends,
// writes its block's rows back; the cond rows are read once per tick). The loop time is the median
// of --runs runs (session construction not included).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
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

// Weight bytes copied host -> device under offload: rank_runtime::weight_bytes_in(), counted where
// the runtime makes the copies (runtime/gather_pipeline.hpp). The runtime's trace cross-checks it:
// every host<->device copy of the communication stream is a host_to_device entry with its bytes, and
// the KV pages' copies in and out are counted on their own.
std::size_t traced_copy_bytes(const trace_recorder& t, std::size_t rank) {
  if (t.dropped()) {
    std::fprintf(stderr, "the trace dropped %zu entries: the copy count would be short\n", t.dropped());
    std::exit(1);
  }
  std::size_t bytes = 0;
  for (const trace_entry& e : t.entries())
    if (e.rank == rank && e.kind == trace_kind::host_to_device) bytes += e.bytes;
  return bytes;
}

struct run_result {
  double loop_s = 0;
  std::size_t ticks = 0, forwards = 0, gathered = 0, weight_in = 0, kv_in = 0, kv_out = 0;
  std::size_t weight_in_traced = 0;
  rank_plan planned;
  rank_measurement measured;
  std::vector<float> last_latent;
};

template <weight_source W>
run_result run_once(const s2v::model& m, const W& weights, const s2v::loop_spec& loop, const s2v::synthetic_loop_inputs& data,
                    std::size_t world, const std::string& policy) {
  session_options opt;
  opt.world_size = world;
  opt.policy = parse_policy(policy).values;
  opt.schedule = schedule_kind::steps;
  opt.trace = true;  // host_to_device entries: the cross-check of weight_bytes_in()
  session<s2v::model> s(m, weights, opt);
  s2v::denoiser den(m, s, {loop.sampler, loop.blocks_per_clip, false});
  run_result r;
  const auto t0 = std::chrono::steady_clock::now();
  den.sink(data.sink());
  den.denoise(data.blocks(), [&](s2v::block_result&& res) { r.last_latent = std::move(res.latent); });
  r.loop_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.ticks = den.ticks_run();
  const auto& rt = s.runtime(0);
  r.forwards = rt.forwards();
  r.gathered = rt.bytes_gathered();
  r.kv_in = rt.kv_bytes_in();
  r.kv_out = rt.kv_bytes_out();
  r.weight_in = rt.weight_bytes_in();
  r.weight_in_traced = traced_copy_bytes(*s.trace(), 0) - r.kv_in - r.kv_out;
  r.planned = s.plan().ranks[0];
  r.measured = s.measured(0);
  return r;
}

// What the unit layouts and the cache access rule (s2v::detail::cache_page_access) say rank 0 moves
// over the loop: one pass of gathers (and of offload copies) per tick; under kv:offload, per forward
// of block k the noisy rows it attends in (min((k+1) L, cache) per layer, k and v) and its L rows
// back, the cond rows in once per tick that runs a forward, the sink's cond rows back.
struct expected_bytes {
  std::size_t gathered = 0, weight_in = 0, kv_in = 0, kv_out = 0;
};

expected_bytes expect(const s2v::model& m, const s2v::loop_spec& loop, std::size_t world, const std::string& policy,
                      std::size_t ticks) {
  const policy_values pol = parse_policy(policy).values;
  expected_bytes e;
  for (const unit_layout& u : build_units(m, world, pol)) {
    if (u.kept || u.gathered_bytes() == 0) continue;
    e.gathered += u.gathered_bytes();
    if (pol.offload) e.weight_in += u.sharded.shard_bytes();
  }
  e.gathered *= ticks;
  e.weight_in *= ticks;
  if (!pol.kv_offload) return e;
  const s2v::geometry& g = m.geometry();
  const std::size_t per_row = 2 * g.num_layers * g.dim * size_of(g.kv_type);  // k and v rows of every block
  const std::size_t steps = loop.sampler.steps, blocks = loop.blocks(), L = g.block_tokens;
  e.kv_out += g.cond_tokens * per_row;  // the sink
  for (std::size_t t = 0; t + 1 < blocks + steps; ++t) {
    bool any = false;
    for (std::size_t s = 0; s < steps; ++s) {
      if (s % world != 0 || t < s || t - s >= blocks) continue;  // rank 0 owns steps 0, W, 2W, ...
      const std::size_t k = t - s, cs = k * L;
      e.kv_in += (cs >= g.noisy_slots ? g.noisy_slots : cs + L) * per_row;
      e.kv_out += L * per_row;
      any = true;
    }
    if (any) e.kv_in += g.cond_tokens * per_row;
  }
  return e;
}

std::string mb(double bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2f", bytes / 1e6);
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  std::string out = "fp8_kv_schedules.csv";
  int runs = 3;
  bool list_units = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) out = argv[++i];
    else if (a == "--units") list_units = true;
    else if (a == "--runs" && i + 1 < argc) runs = std::max(1, std::atoi(argv[++i]));
    else {
      std::fprintf(stderr, "usage: %s [--out FILE.csv] [--runs N] [--units]\n", argv[0]);
      return 2;
    }
  }
  use_one_blas_thread_per_rank();
  const s2v::config cfg = s2v::config::from_json(
      nlohmann::json{{"dim", 512}, {"ffn_dim", 1384}, {"freq_dim", 256}, {"text_dim", 128}, {"text_len", 32},
                     {"num_heads", 4}, {"num_layers", 8}, {"cond_dim", 16}, {"audio_dim", 128},
                     {"audio_inject_layers", {0, 3, 6}}, {"enable_adain", true}, {"zero_timestep", true},
                     {"enable_motioner", false}, {"enable_framepack", true}, {"framepack_drop_mode", "padd"}},
      "bench config");
  s2v::loop_spec loop;
  loop.clips = 1;
  loop.blocks_per_clip = 4;
  loop.latent_hw = {16, 26};  // 8 x 13 tokens per frame, 312 per block of 3 frames
  s2v::workload work;
  work.latent_hw = loop.latent_hw;
  work.context_len = 16;
  s2v::options mopt;
  mopt.storage = dtype::bf16;
  mopt.gemm = gemm_path::blas;
  mopt.kv_cache = dtype::bf16;
  const s2v::model m(cfg, work, mopt);
  const synthetic_weights weights(m, 5);
  const s2v::synthetic_loop_inputs data(m.geometry(), loop, 16, 1);
  const s2v::geometry& g = m.geometry();
  std::printf("S2V dim %zu, %zu heads, FFN %zu, %zu blocks, %zu tokens per block, noisy cache %zu tokens per step, "
              "%zu cond tokens, bf16 weights and caches; %zu clip x %zu blocks x %zu steps, steps schedule\n",
              g.dim, g.heads, g.ffn_dim, g.num_layers, g.block_tokens, g.noisy_slots, g.cond_tokens, loop.clips,
              loop.blocks_per_clip, loop.sampler.steps);

  if (list_units) {  // the gathered bytes of each unit, bf16 and fp8 weights, world size 1
    const auto bf = build_units(m, 1, parse_policy("selective:subunit").values);
    const auto f8 = build_units(m, 1, parse_policy("selective:subunit+fp8").values);
    for (std::size_t u = 0; u < bf.size(); ++u)
      std::printf("  %-28s bf16 %10zu  fp8 %10zu\n", bf[u].name.c_str(), bf[u].gathered_bytes(), f8[u].gathered_bytes());
    return 0;
  }

  struct row {
    std::size_t world;
    std::string policy;
  };
  const std::string w1 = "selective:subunit+prefetch:2+offload", w2 = "selective:subunit+prefetch:2";
  std::vector<row> rows;
  for (const auto& [world, base] : {std::pair<std::size_t, std::string>{1, w1}, {2, w2}})
    // kv:device first: each kv:offload row's latents are compared with it (bit-identical expected).
    for (const char* tail : {"+fp8+kv:device", "+fp8+kv:offload", "+fp8+kv:offload:2", "+kv:device", "+kv:offload"})
      rows.push_back({world, base + tail});

  std::ofstream csv(out);
  csv << "world_size,policy,schedule,runs,loop_s_median,loop_s_min,loop_s_max,ticks,forwards,"
         "gathered_bytes,weight_h2d_bytes,kv_in_bytes,kv_out_bytes,"
         "gathered_per_forward,weight_h2d_per_forward,kv_in_per_forward,kv_out_per_forward,"
         "expected_gathered_bytes,expected_weight_h2d_bytes,expected_kv_in_bytes,expected_kv_out_bytes,"
         "planned_peak_bytes,measured_peak_bytes,planned_host_bytes,measured_host_bytes,"
         "planned_gathered_term,measured_gathered_peak,planned_kv_cache_term,measured_kv_cache_peak,"
         "max_abs_diff_vs_kv_device\n";
  std::vector<run_result> results;
  std::vector<std::vector<float>> latents;  // per row: the first run's last latent
  bool all_agree = true, all_identical = true;
  for (const row& rw : rows) {
    std::vector<double> t;
    run_result last;
    for (int i = 0; i < runs; ++i) {
      last = run_once(m, weights, loop, data, rw.world, rw.policy);
      t.push_back(last.loop_s);
    }
    const expected_bytes e = expect(m, loop, rw.world, rw.policy, last.ticks);
    const bool agree = e.gathered == last.gathered && e.weight_in == last.weight_in && e.kv_in == last.kv_in &&
                       e.kv_out == last.kv_out && last.weight_in_traced == last.weight_in;
    all_agree = all_agree && agree;
    // Bit-identity of the KV placements: compare with the same weight policy under kv:device.
    double diff = -1;
    const std::string device = rw.policy.substr(0, rw.policy.find("+kv:")) + "+kv:device";
    for (std::size_t j = 0; j < results.size(); ++j)
      if (rows[j].world == rw.world && rows[j].policy == device) {
        diff = 0;
        for (std::size_t k = 0; k < latents[j].size(); ++k)
          diff = std::max(diff, static_cast<double>(std::fabs(latents[j][k] - last.last_latent[k])));
      }
    all_identical = all_identical && diff <= 0;
    const double f = static_cast<double>(std::max<std::size_t>(last.forwards, 1));
    const auto cat = [](const category_bytes& c, memory_category k) { return c[k]; };
    std::printf("W=%zu %-50s loop %.3f s (median of %zu; %.3f-%.3f), %zu ticks, %zu forwards on rank 0\n", rw.world,
                rw.policy.c_str(), median(t), t.size(), *std::min_element(t.begin(), t.end()),
                *std::max_element(t.begin(), t.end()), last.ticks, last.forwards);
    std::printf("    per forward (MB): gathered %s, weights host->device %s, KV in %s, KV out %s   [expected totals %s: "
                "%zu %zu %zu %zu; measured %zu %zu %zu %zu%s]\n",
                mb(last.gathered / f).c_str(), mb(last.weight_in / f).c_str(), mb(last.kv_in / f).c_str(),
                mb(last.kv_out / f).c_str(), agree ? "agree" : "DIFFER", e.gathered, e.weight_in, e.kv_in, e.kv_out,
                last.gathered, last.weight_in, last.kv_in, last.kv_out,
                last.weight_in_traced == last.weight_in ? " (weight_bytes_in() agrees with the trace)" : " (weight_bytes_in() DIFFERS from the trace)");
    std::printf("    peak planned %zu measured %zu; host planned %zu measured %zu; gathered term %zu / %zu; kv_cache term "
                "%zu / %zu%s\n",
                last.planned.peak(), last.measured.peak_bytes, last.planned.host_bytes, last.measured.host_peak_bytes,
                cat(last.planned.terms, memory_category::gathered), cat(last.measured.category_peaks, memory_category::gathered),
                cat(last.planned.terms, memory_category::kv_cache), cat(last.measured.category_peaks, memory_category::kv_cache),
                diff >= 0 ? (diff == 0 ? "; latents bit-identical to kv:device" : "; latents DIFFER from kv:device") : "");
    csv << rw.world << ',' << rw.policy << ",steps," << t.size() << ',' << median(t) << ','
        << *std::min_element(t.begin(), t.end()) << ',' << *std::max_element(t.begin(), t.end()) << ',' << last.ticks << ','
        << last.forwards << ',' << last.gathered << ',' << last.weight_in << ',' << last.kv_in << ',' << last.kv_out << ','
        << last.gathered / f << ',' << last.weight_in / f << ',' << last.kv_in / f << ',' << last.kv_out / f << ','
        << e.gathered << ',' << e.weight_in << ',' << e.kv_in << ',' << e.kv_out << ',' << last.planned.peak() << ','
        << last.measured.peak_bytes << ',' << last.planned.host_bytes << ',' << last.measured.host_peak_bytes << ','
        << cat(last.planned.terms, memory_category::gathered) << ','
        << cat(last.measured.category_peaks, memory_category::gathered) << ','
        << cat(last.planned.terms, memory_category::kv_cache) << ','
        << cat(last.measured.category_peaks, memory_category::kv_cache) << ',' << diff << '\n';
    results.push_back(std::move(last));
    latents.push_back(results.back().last_latent);
  }
  // fp8 against bf16 weights: the bytes each policy moves, measured (rows +fp8+kv:offload and +kv:offload).
  const auto ratio = [&](std::size_t a, std::size_t b, std::size_t run_result::*field) {
    const std::size_t x = results[a].*field, y = results[b].*field;
    char buf[32];
    if (y == 0) std::snprintf(buf, sizeof buf, "-");
    else std::snprintf(buf, sizeof buf, "%.4f", static_cast<double>(x) / static_cast<double>(y));
    return std::string(buf);
  };
  for (std::size_t w = 0; w < 2; ++w) {
    const std::size_t fp8 = 5 * w + 1, bf16 = 5 * w + 4;
    std::printf("W=%zu fp8 / bf16 weights, measured: gathered %s, weights host->device %s, KV in %s, KV out %s\n", w + 1,
                ratio(fp8, bf16, &run_result::gathered).c_str(), ratio(fp8, bf16, &run_result::weight_in).c_str(),
                ratio(fp8, bf16, &run_result::kv_in).c_str(), ratio(fp8, bf16, &run_result::kv_out).c_str());
  }
  // Where the ratio is not 1/2: the units that hold no 2-D GEMM weight (the frame packer's and audio
  // encoder's convolutions, the patch embedding) stay bf16; they scale with dim, the blocks with dim^2.
  {
    std::size_t blocks_bf16 = 0, blocks_fp8 = 0, rest_bf16 = 0, rest_fp8 = 0;
    const auto bf = build_units(m, 1, parse_policy("selective:subunit").values);
    const auto f8 = build_units(m, 1, parse_policy("selective:subunit+fp8").values);
    for (std::size_t u = 0; u < bf.size(); ++u) {
      const auto kind = m.layer(bf[u].info.layer).kind();
      const bool block = kind == s2v::layer_kind::block || kind == s2v::layer_kind::injector;
      (block ? blocks_bf16 : rest_bf16) += bf[u].gathered_bytes();
      (block ? blocks_fp8 : rest_fp8) += f8[u].gathered_bytes();
    }
    std::printf("unit layouts: blocks and audio injectors %zu -> %zu bytes with fp8 (%.4f); the other units %zu -> %zu "
                "(%.1f %% of the bf16 weight bytes here)\n",
                blocks_bf16, blocks_fp8, static_cast<double>(blocks_fp8) / static_cast<double>(blocks_bf16), rest_bf16,
                rest_fp8, 100.0 * static_cast<double>(rest_bf16) / static_cast<double>(blocks_bf16 + rest_bf16));
  }
  // Steady state (once the noisy cache is full; this 1-clip loop fills it in its last block).
  {
    const std::size_t per_row = 2 * g.num_layers * g.dim * size_of(g.kv_type);
    std::printf("kv:offload in steady state (full cache): per forward %zu bytes in (one step's noisy cache, k and v) "
                "and %zu back (one block's rows); %zu bytes of cond rows in per tick\n",
                g.noisy_slots * per_row, g.block_tokens * per_row, g.cond_tokens * per_row);
  }
  std::printf("measured bytes %s the expected ones in every row; kv:offload latents %s kv:device's\n",
              all_agree ? "equal" : "DO NOT equal", all_identical ? "bit-identical to" : "DIFFER from");
  return all_agree ? 0 : 1;
}
