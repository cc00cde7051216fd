#pragma once
// The planner's ledger for the Live Avatar stack: per-rank peak as named terms, under any policy of
// docs/conventions.md's grammar (fsdp as Live Avatar configures it included) and either schedule, plus the
// time of one forward and of one denoised block.
//
// Schedules (schedule/schedule.hpp): under `replicated` every rank runs every denoising step, so it
// holds every step's noisy KV cache and runs one forward at a time; under `steps` rank r owns steps
// r, r+W, ... and holds only their caches (plus the one cond cache they share), and runs one forward
// per owned step in each tick, on separate activations, all served by one pass of gathers.
#include <algorithm>
#include <cstddef>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "unshard/core/world_size.hpp"
#include "unshard/core/memory_category.hpp"
#include "unshard/plan/ledger.hpp"
#include "unshard/plan/liveavatar/stack.hpp"
#include "unshard/plan/time_model.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/schedule/schedule.hpp"

namespace unshard::liveavatar {

inline constexpr std::size_t bf16_bytes = 2, f32_bytes = 4;
// The Wan VAE's temporal stride: one latent frame decodes to 4 video frames in a streamed block.
inline constexpr std::size_t video_frames_per_latent_frame = 4;

// Where umT5 lives: FSDP-sharded over the devices (Live Avatar's --t5_fsdp, the default) or whole in
// host memory (--t5_cpu; the prompt is encoded once, off the DiT's critical path).
enum class t5_placement { device, host };

inline const char* name_of(t5_placement p) noexcept { return p == t5_placement::host ? "host" : "device"; }

inline t5_placement parse_t5_placement(std::string_view s) {
  if (s == "device") return t5_placement::device;
  if (s == "host") return t5_placement::host;
  throw_error("unknown umT5 placement '", s, "' (expected device or host)");
}

// One rank's ledger: the six categories (they sum to its peak) and a finer breakdown ("category.detail").
struct rank_ledger {
  std::size_t rank = 0;
  std::size_t forwards = 0;               // forwards per tick: steps owned under `steps`, 1 under `replicated`
  std::vector<std::size_t> cached_steps;  // denoising steps whose noisy KV caches it holds
  std::map<std::string, std::size_t> terms;
  std::map<std::string, std::size_t> details;
  std::size_t host_bytes = 0;             // pinned host memory: offloaded weights, and the caches under kv:offload
  std::size_t peak() const {
    std::size_t t = 0;
    for (const auto& [k, v] : terms) t += v;
    return t;
  }
};

struct stack_plan {
  std::string policy;
  ::unshard::schedule sched{schedule_kind::steps, 4};
  std::size_t world_size = 1;
  workload work;                         // as rendered: the size the forward computes on
  std::size_t streamed_tokens = 0;       // tokens one forward runs through the blocks
  std::size_t cond_tokens = 0;           // tokens the sink put in the cond cache (0 without one)
  std::size_t noisy_cache_slots = 0;     // one step's noisy KV cache, in tokens
  std::size_t cond_cache_slots = 0;
  // Rank 0's terms: rank 0 owns ceil(S/W) steps, the most of any rank, so its peak is the plan's.
  std::map<std::string, std::size_t> terms;
  std::map<std::string, std::size_t> details;
  std::size_t host_bytes = 0;
  std::size_t effective_chunk = 0;  // chunked: max(SIZE, the largest row of any chunked weight)
  std::size_t chunks = 0;           // chunked: chunks gathered per forward
  double time_s = 0;                // one DiT forward (one step of one streamed block)
  double block_s = 0;               // steady state: one denoised block, all its steps
  double frames_per_s = 0;          // video frames per second at block_s
  // The compute-bound time of the work block_s times (rank 0's forwards of a block: its FLOPs at the
  // sustained rate, nothing waited for), one forward's share, and what the communication stream
  // carries in the same time, by kind (docs/planner.md, "Time model").
  double compute_s = 0;
  double forward_compute_s = 0;
  stream_load transfers;
  std::vector<step_cost> steps;     // one forward, as the time model replays it (and --timeline draws)
  std::size_t prefetch = 0;         // gathers in flight ahead of compute
  std::size_t forwards_per_tick = 1;  // rank 0's: forwards one pass of gathers serves

  // What every rank's ledger is composed of (`rank` puts them together).
  std::map<std::string, std::size_t> shared_details;       // shards, resident, gathered: alike on every rank
  std::map<std::string, std::size_t> per_forward_details;  // activations and workspace of one forward
  std::size_t noisy_cache_bytes = 0;                       // one step's noisy KV cache
  std::size_t cond_cache_bytes = 0;                        // the cond cache, once per rank that runs a step
  // kv:offload[:K] (docs/design.md, the KV cache): the caches whole in host memory, each block's
  // pages (one layer's k and v) streamed through K+1 device slots per cache a tick's forwards read.
  bool kv_offload = false;
  std::size_t kv_prefetch = 1;
  std::size_t cache_pages = 1;                             // the blocks: pages of each cache
  // Per block: each forward's noisy page in and the rows it wrote back; the cond page once a tick.
  double kv_noisy_in_bytes = 0, kv_rows_out_bytes = 0, kv_cond_in_bytes = 0;

  std::size_t peak() const {
    std::size_t t = 0;
    for (const auto& [k, v] : terms) t += v;
    return t;
  }

  rank_ledger rank(std::size_t r) const {
    rank_ledger out;
    out.rank = r;
    for (const auto& lane : sched.lanes(r, world_size)) {
      ++out.forwards;
      out.cached_steps.insert(out.cached_steps.end(), lane.begin(), lane.end());
    }
    out.details = shared_details;
    for (const auto& [name, bytes] : per_forward_details) out.details[name] = bytes * out.forwards;
    out.host_bytes = host_bytes;
    if (cond_tokens && kv_offload) {  // K+1 pages of each cache a tick's forwards read; the caches on the host
      const std::size_t noisy_rings = sched.kind == schedule_kind::replicated ? (out.cached_steps.empty() ? 0 : 1) : out.forwards;
      out.details["kv_cache.noisy"] = (kv_prefetch + 1) * (noisy_cache_bytes / cache_pages) * noisy_rings;
      out.details["kv_cache.cond"] = out.cached_steps.empty() ? 0 : (kv_prefetch + 1) * (cond_cache_bytes / cache_pages);
      out.host_bytes += noisy_cache_bytes * out.cached_steps.size() + (out.cached_steps.empty() ? 0 : cond_cache_bytes);
    } else if (cond_tokens) {  // a causal stack: a rank that runs no step holds no cache at all
      out.details["kv_cache.noisy"] = noisy_cache_bytes * out.cached_steps.size();
      out.details["kv_cache.cond"] = out.cached_steps.empty() ? 0 : cond_cache_bytes;
    }
    for (const auto c : all_memory_categories) out.terms[std::string(name_of(c))] = 0;
    for (const auto& [name, bytes] : out.details) out.terms[name.substr(0, name.find('.'))] += bytes;
    return out;
  }

  // One tick of the busiest rank: each unit (or chunk) is gathered once and applied to every forward
  // the rank runs in the tick (one under `replicated`).
  std::vector<step_cost> tick_steps() const {
    std::vector<step_cost> tick = steps;
    const double more = static_cast<double>(forwards_per_tick - 1);
    for (auto& s : tick) {
      s.flops *= static_cast<double>(forwards_per_tick);
      // kv:offload: each forward's noisy page in and rows back; the cond page once per tick.
      if (s.kv_in_bytes > 0) s.kv_in_bytes += more * kv_noisy_in_bytes;
      if (s.kv_out_bytes > 0) s.kv_out_bytes += more * kv_rows_out_bytes;
    }
    return tick;
  }
  // The predicted tick (under `replicated`, one forward), as --timeline draws it.
  timeline tick_timeline(const time_rates& r) const { return simulate_forward(tick_steps(), r, prefetch, kv_prefetch); }
  // The busiest rank's pinned host memory (rank 0 holds the most caches).
  std::size_t host_peak() const { return rank(0).host_bytes; }
  // Rank r's compute-bound seconds per block: one forward's FLOPs for every step it runs in a block
  // (its own steps under `steps`, all S under `replicated`). Rank 0's is compute_s.
  double rank_compute_s(std::size_t r) const {
    std::size_t forwards = 0;
    for (const auto& lane : sched.lanes(r, world_size)) forwards += lane.size();
    return static_cast<double>(forwards) * forward_compute_s;
  }
  // block_s over compute_s: 1 when every transfer hides under compute.
  double compute_ratio() const { return compute_s > 0 ? block_s / compute_s : 0; }
};

struct plan_request {
  std::size_t world_size = 1;
  workload work;
  device_profile device = builtin_profiles().device("rtx4090");
  link_profile link = builtin_profiles().link("pcie4-no-p2p");
  ::unshard::schedule sched{schedule_kind::steps, 4};  // Live Avatar's 4 steps, spread over the ranks
  t5_placement t5 = t5_placement::device;
};

namespace detail {
inline std::size_t bytes_of(count params) { return static_cast<std::size_t>(params) * bf16_bytes; }
inline std::size_t shard_of(count params, std::size_t n) { return bytes_of((params + n - 1) / n); }

// A DiT unit's weight bytes: bf16, or under fp8 its 2-D GEMM weights at 1 byte per element (their
// scales are resident, counted apart: fp8_scale_bytes).
inline std::size_t unit_bytes(const dit_unit& u, bool fp8) {
  return fp8 ? static_cast<std::size_t>(u.params - u.quantized) * bf16_bytes + static_cast<std::size_t>(u.quantized)
             : bytes_of(u.params);
}
inline std::size_t dit_bytes(const stack& st, bool fp8, bool root_only = false) {
  std::size_t b = 0;
  for (const auto& u : st.units)
    if (!root_only || u.root) b += unit_bytes(u, fp8);
  return b;
}
// The f32 scales of every quantized DiT weight: resident, whole, on every rank.
inline std::size_t fp8_scale_bytes(const stack& st, const policy_values& v) {
  if (!v.fp8) return 0;
  count n = 0;
  for (const auto& u : st.units)
    n += v.fp8_scaling == quant::fp8_scaling::per_tensor ? u.quantized_tensors : u.quantized_rows;
  return static_cast<std::size_t>(n) * f32_bytes;
}

// The KV caches of the causal stack at this workload, sized by the S2V model's own cache buffers:
// a step's noisy cache holds one clip (4 blocks), the cond cache exactly the cond tokens. A
// workload may override either size in tokens (the official pipelines allocate 13,500 and 2,800).
struct cache_sizes {
  std::size_t streamed_tokens = 0, cond_tokens = 0;  // from the model's geometry
  std::size_t noisy_slots = 0, cond_slots = 0;
  std::size_t noisy_bytes = 0, cond_bytes = 0;       // one step's noisy cache; the cond cache (bf16)
};

inline cache_sizes caches_of(const stack& st, const workload& w) {
  cache_sizes c;
  c.streamed_tokens = static_cast<std::size_t>(streamed_tokens(w));
  if (!st.causal_kv || !st.s2v_model) return c;
  s2v::workload sw = s2v::pipeline_workload(*st.s2v_model, w.width, w.height);
  sw.frames_per_block = w.frames_per_block;
  const ::unshard::s2v::model m(*st.s2v_model, sw);
  const s2v::geometry& g = m.geometry();
  const s2v::counts counts = s2v::counts_of(*st.s2v_model, sw, bf16_bytes);
  c.streamed_tokens = g.block_tokens;
  c.cond_tokens = g.cond_tokens;
  c.noisy_slots = w.kv_cache_tokens ? static_cast<std::size_t>(w.kv_cache_tokens) : g.noisy_slots;
  c.cond_slots = w.cond_cache_tokens ? static_cast<std::size_t>(w.cond_cache_tokens) : g.cond_slots;
  c.noisy_bytes = counts.noisy_cache_bytes / g.noisy_slots * c.noisy_slots;
  c.cond_bytes = counts.cond_cache_bytes / g.cond_slots * c.cond_slots;
  return c;
}

// Activations live across a block: the f32 residual stream x and the block's f32 output/modulated
// copy. Workspace: the larger of attention's bf16 q, k, v, out plus the cond keys roped for this call,
// and the FFN's two bf16 hidden tensors. Both per forward: a rank running k forwards holds k sets.
inline std::map<std::string, std::size_t> forward_details(const stack& st, const cache_sizes& c) {
  const std::size_t L = c.streamed_tokens, d = static_cast<std::size_t>(st.dit.dim);
  const std::size_t f = static_cast<std::size_t>(st.dit.ffn_dim);
  const std::size_t attention = (4 * L + c.cond_slots) * d * bf16_bytes, ffn = 2 * L * f * bf16_bytes;
  return {{"activations.residual", align_up(L * d * f32_bytes) * 2}, {"workspace.block", align_up(std::max(attention, ffn))}};
}

inline std::size_t largest_streamed(const stack& st, bool fp8) {
  std::size_t m = 0;
  for (const auto& u : st.units) m = std::max(m, unit_bytes(u, fp8));
  return m;
}

// Shards: every DiT parameter, bf16 (fp8: its 2-D GEMM weights at 1 byte), 1/N per rank (FULL_SHARD),
// plus, under fp8, every weight's scales whole on every rank; umT5 sharded the same way (t5_fsdp)
// unless it lives in host memory; the VAE whole on every rank. Returns the host bytes.
inline std::size_t add_stored_terms(const stack& st, const parsed_policy& pol, const plan_request& rq,
                                    std::map<std::string, std::size_t>& shared) {
  const std::size_t n = rq.world_size;
  const bool offload = pol.values.offload;
  std::size_t host = bytes_of(st.audio_encoder_host);
  const std::size_t dit = pol.values.fp8 ? (dit_bytes(st, true) + n - 1) / n : shard_of(st.total_dit(), n);
  (offload ? host : shared["shards.dit"]) += dit;
  if (pol.values.fp8) shared["resident.fp8_scales"] = fp8_scale_bytes(st, pol.values);
  if (rq.t5 == t5_placement::host) host += bytes_of(st.text_encoder);
  else (offload ? host : shared["shards.text_encoder"]) += shard_of(st.text_encoder, n);
  shared["resident.vae"] = bytes_of(st.vae);
  return host;
}

inline std::size_t subunit_bytes(const stack& st, bool fp8) {
  return fp8 ? static_cast<std::size_t>(st.largest_subunit_fp8_bytes) : bytes_of(st.largest_subunit);
}

// The gathered term of a policy (and, for chunked, the effective chunk).
inline void add_gathered_terms(const stack& st, const parsed_policy& pol, std::map<std::string, std::size_t>& shared,
                               std::size_t& effective) {
  const policy_values& v = pol.values;
  const std::size_t depth = v.prefetch_depth;
  if (v.full) {
    shared["gathered.all"] = dit_bytes(st, v.fp8);
  } else if (pol.fsdp) {  // root kept for the whole forward; current block + the one prefetched
    std::size_t block = 0;
    for (const auto& u : st.units) block = std::max(block, u.block ? unit_bytes(u, v.fp8) : 0);
    shared["gathered.root"] = dit_bytes(st, v.fp8, /*root_only=*/true);
    shared["gathered.blocks"] = 2 * block;
  } else if (pol.chunk_bytes) {  // K+1 chunk buffers; a chunk is at least one whole row
    const std::size_t row = v.fp8 ? static_cast<std::size_t>(st.widest_row_fp8_bytes)
                                  : static_cast<std::size_t>(st.widest_row) * bf16_bytes;
    effective = std::max(*pol.chunk_bytes, row);
    shared["gathered.chunks"] = (depth + 1) * effective;
  } else {
    const std::size_t unit = v.granularity == unshard_granularity::subunit ? subunit_bytes(st, v.fp8)
                                                                            : largest_streamed(st, v.fp8);
    shared["gathered.ring"] = (depth + 1) * unit;
  }
}

// FLOPs of one unit in one streamed forward: 2 per weight per streamed token, plus self-attention's
// QK^T and PV from those tokens to every key. Once the cache ring has wrapped (the steady state) a
// causal block attends to the whole noisy cache (which holds the block itself) and the cond cache;
// a Wan t2v block attends to its own tokens.
inline double unit_flops(const stack& st, const dit_unit& u, const cache_sizes& c) {
  const double L = static_cast<double>(c.streamed_tokens);
  const double keys = st.causal_kv ? static_cast<double>(c.noisy_slots + c.cond_slots) : L;
  double f = 2.0 * static_cast<double>(u.params) * L;
  if (u.block) f += 4.0 * L * keys * static_cast<double>(st.dit.dim);
  return f;
}

// forward_steps' mark for a step that belongs to no unit of st.units (fsdp's root gather).
inline constexpr std::size_t no_unit = static_cast<std::size_t>(-1);

// The steps of one forward under a policy, in order (see time_model.hpp). Every rank receives
// (N-1)/N of each gathered unit; under offload it first copies its own 1/N from host memory.
//  * fsdp: the root unit (everything outside `blocks`) is one gather before the first block and
//    stays live; blocks are gathered one ahead.
//  * full: everything was gathered once and kept (at load), so a forward gathers nothing.
//  * selective:subunit: a unit's gathers are ceil(unit / largest sub-unit) equal pieces.
//  * chunked: ceil(unit / effective chunk) equal chunks, each one collective (paying the link's
//    latency) and one buffer of the effective chunk; compute splits in proportion.
// `unit_of_step`, if given, receives the index in st.units of each step's unit (no_unit: fsdp's root).
inline std::vector<step_cost> forward_steps(const stack& st, const parsed_policy& pol, const plan_request& rq,
                                            const cache_sizes& caches, std::size_t chunk,
                                            std::vector<std::size_t>* unit_of_step = nullptr) {
  const policy_values& v = pol.values;
  const double n = static_cast<double>(rq.world_size), remote = (n - 1) / n;
  std::vector<step_cost> steps;
  std::vector<std::size_t> owners;
  if (pol.fsdp) {
    const std::size_t root = dit_bytes(st, v.fp8, /*root_only=*/true);
    steps.push_back({"root", 0, static_cast<double>(root) * remote, 0, root, true});
    owners.push_back(no_unit);
  }
  for (std::size_t ui = 0; ui < st.units.size(); ++ui) {
    const dit_unit& u = st.units[ui];
    const double flops = unit_flops(st, u, caches);
    const std::size_t bytes = unit_bytes(u, v.fp8);
    if (v.full || (pol.fsdp && u.root) || bytes == 0) {
      steps.push_back({u.name, flops, 0, 0, 0, false});
      owners.push_back(ui);
      continue;
    }
    std::size_t pieces = 1, piece_buffer = bytes;
    if (pol.chunk_bytes) {
      pieces = (bytes + chunk - 1) / chunk;
      piece_buffer = chunk;
    } else if (v.granularity == unshard_granularity::subunit) {
      const std::size_t sub = subunit_bytes(st, v.fp8);
      pieces = (bytes + sub - 1) / sub;
      piece_buffer = (bytes + pieces - 1) / pieces;
    }
    const double piece = static_cast<double>(bytes) / static_cast<double>(pieces);
    for (std::size_t i = 0; i < pieces; ++i) {
      steps.push_back({pieces == 1 ? u.name : u.name + "#" + std::to_string(i), flops / static_cast<double>(pieces),
                       piece * remote, v.offload ? piece / n : 0, piece_buffer, false});
      owners.push_back(ui);
    }
  }
  if (unit_of_step) *unit_of_step = std::move(owners);
  return steps;
}

// kv:offload on the copy stream (runtime/paged_buffers.hpp: the stream the gathers and offloaded
// shards use): in the steady state each block reads its page of the whole noisy cache of the step a
// forward runs (the ring has wrapped, so it attends every slot) and of the cond cache (once per
// tick), copied in before the block's first step (its first piece, or its first chunk), and after
// its last step (last piece or chunk) the L rows the forward wrote go back. These are one forward's;
// tick_steps adds the tick's further forwards. The time model issues them kv_prefetch blocks ahead.
inline void add_kv_copies(const stack& st, stack_plan& p, const cache_sizes& c, const std::vector<std::size_t>& unit_of_step) {
  p.kv_noisy_in_bytes = static_cast<double>(p.noisy_cache_bytes / p.cache_pages);
  p.kv_cond_in_bytes = static_cast<double>(p.cond_cache_bytes / p.cache_pages);
  p.kv_rows_out_bytes = p.kv_noisy_in_bytes * static_cast<double>(c.streamed_tokens) / static_cast<double>(c.noisy_slots);
  for (std::size_t i = 0; i < p.steps.size(); ++i) {
    const std::size_t u = unit_of_step[i];
    if (u == no_unit || !st.units[u].block) continue;
    if (i == 0 || unit_of_step[i - 1] != u) p.steps[i].kv_in_bytes = p.kv_noisy_in_bytes + p.kv_cond_in_bytes;
    if (i + 1 == p.steps.size() || unit_of_step[i + 1] != u) p.steps[i].kv_out_bytes = p.kv_rows_out_bytes;
  }
}

// Steady-state time of one denoised block, its compute-bound time and the stream's load in it.
// `replicated`: every rank runs the S forwards one after another, each gathering every unit again.
// `steps`: a block leaves the pipeline every tick, and a tick is one pass of gathers serving
// ceil(S/W) forwards on the busiest rank (all ranks in lockstep).
inline void time_block(stack_plan& p, const time_rates& r) {
  p.time_s = forward_seconds(p.steps, r, p.prefetch, p.kv_prefetch);
  p.forward_compute_s = compute_seconds(p.steps, r);
  if (p.sched.kind == schedule_kind::replicated) {
    const double s = static_cast<double>(p.sched.steps);
    p.block_s = s * p.time_s;
    p.compute_s = s * p.forward_compute_s;
    p.transfers = stream_load_of(p.steps, r);
    p.transfers *= s;
  } else {
    const std::vector<step_cost> tick = p.tick_steps();
    p.block_s = forward_seconds(tick, r, p.prefetch, p.kv_prefetch);
    p.compute_s = compute_seconds(tick, r);
    p.transfers = stream_load_of(tick, r);
  }
}
}  // namespace detail

// The ledger and the time model for one parsed policy under the request's schedule.
inline stack_plan plan_stack(const stack& st, const parsed_policy& pol, const plan_request& rq) {
  require_world_size(rq.world_size, "plan");
  rq.sched.validate(rq.world_size);
  stack_plan p;
  p.policy = pol.values.name;
  p.sched = rq.sched;
  p.world_size = rq.world_size;
  p.work = rendered(st, rq.work);
  const detail::cache_sizes caches = detail::caches_of(st, p.work);
  p.streamed_tokens = caches.streamed_tokens;
  p.cond_tokens = caches.cond_tokens;
  p.noisy_cache_slots = caches.noisy_slots;
  p.cond_cache_slots = caches.cond_slots;
  p.noisy_cache_bytes = caches.noisy_bytes;
  p.cond_cache_bytes = caches.cond_bytes;

  require_kv_placement_supported(pol.values);
  p.kv_offload = pol.values.kv_offload && caches.cond_tokens;
  p.kv_prefetch = pol.values.kv_prefetch;
  p.cache_pages = static_cast<std::size_t>(std::max<std::int64_t>(st.dit.num_layers, 1));
  p.host_bytes = detail::add_stored_terms(st, pol, rq, p.shared_details);
  detail::add_gathered_terms(st, pol, p.shared_details, p.effective_chunk);
  p.per_forward_details = detail::forward_details(st, caches);
  const rank_ledger busiest = p.rank(0);
  p.terms = busiest.terms;
  p.details = busiest.details;
  p.forwards_per_tick = std::max<std::size_t>(busiest.forwards, 1);

  // Time of one DiT forward (one denoising step of one streamed block), then of a block.
  std::vector<std::size_t> unit_of_step;
  p.steps = detail::forward_steps(st, pol, rq, caches, p.effective_chunk, &unit_of_step);
  if (p.kv_offload) detail::add_kv_copies(st, p, caches, unit_of_step);
  p.prefetch = pol.fsdp ? 1 : pol.values.prefetch_depth;
  for (const auto& c : p.steps) p.chunks += pol.chunk_bytes && c.gather_bytes + c.h2d_bytes > 0 ? 1 : 0;
  detail::time_block(p, time_rates::of(rq.device, rq.link));
  p.frames_per_s = static_cast<double>(video_frames_per_latent_frame * static_cast<std::size_t>(p.work.frames_per_block)) / p.block_s;
  return p;
}

// --policy auto: the policies searched, in the grammar's spelling: every granularity with and
// without prefetch and offload, and chunk sizes from 16 MiB to 1 GiB; with `with_fp8`, each of them
// also with fp8 weights (per channel: the default scaling, whose scales cost a few MiB more than
// per tensor). fp8 changes the numbers a forward computes, so a caller opts in (unshard-plan's auto
// does unless --no-fp8).
inline std::vector<std::string> auto_candidates(bool with_fp8 = false) {
  std::vector<std::string> out{"full", "fsdp"};
  std::vector<std::string> grains{"selective:block", "selective:subunit"};
  for (const char* size : {"16MiB", "64MiB", "256MiB", "1GiB"}) grains.push_back(std::string("chunked:") + size);
  for (const auto& g : grains)
    for (const char* prefetch : {"", "+prefetch:1", "+prefetch:2"})
      for (const char* offload : {"", "+offload"}) out.push_back(g + prefetch + offload);
  if (with_fp8) {
    const std::size_t n = out.size();
    for (std::size_t i = 0; i < n; ++i) out.push_back(out[i] + "+fp8");
  }
  return out;
}

}  // namespace unshard::liveavatar
