#pragma once
// The planner's ledger for the Live Avatar stack: per-rank peak as named terms, under any policy of
// CONVENTIONS.md's grammar (fsdp as Live Avatar configures it included), plus the time model.
#include <algorithm>
#include <cstddef>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "unshard/core/memory_category.hpp"
#include "unshard/plan/liveavatar/stack.hpp"
#include "unshard/plan/time_model.hpp"
#include "unshard/policy/parse_policy.hpp"

namespace unshard::liveavatar {

inline constexpr std::size_t bf16_bytes = 2, f32_bytes = 4;

// The six categories (these sum to the peak) and a finer breakdown ("category.detail").
struct stack_plan {
  std::string policy;
  std::map<std::string, std::size_t> terms;
  std::map<std::string, std::size_t> details;
  std::size_t host_bytes = 0;
  std::size_t effective_chunk = 0;  // chunked: max(SIZE, the largest row of any chunked weight)
  std::size_t chunks = 0;           // chunked: chunks gathered per forward
  double time_s = 0;
  std::vector<step_cost> steps;     // what the time model replays (and --timeline draws)
  std::size_t prefetch = 0;         // gathers in flight ahead of compute
  std::size_t peak() const {
    std::size_t t = 0;
    for (const auto& [k, v] : terms) t += v;
    return t;
  }
};

struct plan_request {
  std::size_t world_size = 1;
  workload work;
  device_profile device = builtin_profiles().device("rtx4090");
  link_profile link = builtin_profiles().link("pcie4-no-p2p");
};

namespace detail {
inline std::size_t bytes_of(count params) { return static_cast<std::size_t>(params) * bf16_bytes; }
inline std::size_t shard_of(count params, std::size_t n) { return bytes_of((params + n - 1) / n); }

// Tokens one DiT forward carries: the noisy frames of a streamed block, the reference frame and the
// frame-packed motion (those only for the causal s2v pipeline).
inline count forward_tokens(const stack& st, const workload& w) {
  const count noisy = w.frames_per_block * frame_tokens(w);
  return st.causal_kv ? noisy + w.ref_frames * frame_tokens(w) + framepack_tokens(w) : noisy;
}

// Activations live across a block: the f32 residual stream x and the block's f32 output/modulated
// copy. Workspace: the larger of attention's bf16 q,k,v,out and the FFN's two bf16 hidden tensors.
inline void add_activation_terms(const stack& st, const workload& w, stack_plan& p) {
  const auto L = static_cast<std::size_t>(forward_tokens(st, w));
  const auto d = static_cast<std::size_t>(st.dit.dim), f = static_cast<std::size_t>(st.dit.ffn_dim);
  p.details["activations.residual"] = align_up(L * d * f32_bytes) * 2;
  p.details["workspace.block"] = align_up(std::max(4 * L * d * bf16_bytes, 2 * L * f * bf16_bytes));
  p.terms["activations"] = p.details["activations.residual"];
  p.terms["workspace"] = p.details["workspace.block"];
}

// Causal KV cache (causal_s2v_pipeline.py _initialize_kv_cache): per layer k and v of
// kv_cache_size tokens plus cond_k/cond_v of 2800, [tokens, heads, head_dim] bf16, on every rank:
// one set (the cond cache and one noisy cache), sized by the S2V model's own cache buffers.
inline std::size_t kv_cache_bytes(const stack& st, const workload& w) {
  if (!st.causal_kv) return 0;
  if (st.s2v_model) {
    // Bytes per cached token from the model's own cache buffers (at this resolution, with its default
    // cache shapes), times the pipeline's cache sizes, which need not be whole blocks.
    s2v_workload sw = s2v_pipeline_workload(*st.s2v_model, w.width, w.height);
    sw.frames_per_block = w.frames_per_block;
    const ::unshard::s2v_model m(*st.s2v_model, sw);
    const s2v_counts c = count_s2v(*st.s2v_model, sw, bf16_bytes);
    const std::size_t per_cond = c.cond_cache_bytes / m.geometry().cond_slots;
    const std::size_t per_noisy = c.noisy_cache_bytes / m.geometry().noisy_slots;
    return per_cond * static_cast<std::size_t>(w.cond_cache_tokens) + per_noisy * static_cast<std::size_t>(w.kv_cache_tokens);
  }
  const auto per_token = static_cast<std::size_t>(st.dit.dim) * 2 * bf16_bytes;
  return static_cast<std::size_t>(st.dit.num_layers) * static_cast<std::size_t>(w.kv_cache_tokens + w.cond_cache_tokens) * per_token;
}

inline count largest_streamed(const stack& st) {
  count m = 0;
  for (const auto& u : st.units) m = std::max(m, u.params);
  return m;
}

// FLOPs of one unit over L tokens: 2 per weight per token, plus self-attention's QK^T and PV over
// the tokens and the cached context.
inline double unit_flops(const stack& st, const dit_unit& u, const workload& w) {
  const double L = static_cast<double>(forward_tokens(st, w));
  double f = 2.0 * static_cast<double>(u.params) * L;
  if (u.block) f += 4.0 * L * (L + static_cast<double>(w.kv_cache_tokens)) * static_cast<double>(st.dit.dim);
  return f;
}

// chunked:SIZE gathers chunks of at most SIZE, but never less than one whole row: the effective
// chunk (what each of the K+1 buffers must hold) is max(SIZE, the largest row of any weight).
inline std::size_t effective_chunk(const stack& st, std::size_t requested) {
  return std::max(requested, static_cast<std::size_t>(st.widest_row) * bf16_bytes);
}

// The steps of one forward under a policy, in order (see time_model.hpp). Every rank receives
// (N-1)/N of each gathered unit; under offload it first copies its own 1/N from host memory.
//  * fsdp: the root unit (everything outside `blocks`) is one gather before the first block and
//    stays live; blocks are gathered one ahead.
//  * full: everything was gathered once and kept (at load), so a forward gathers nothing.
//  * selective:subunit: a unit's gathers are ceil(unit / largest sub-unit) equal pieces.
//  * chunked: ceil(unit / effective chunk) equal chunks, each one collective (paying the link's
//    latency) and one buffer of the effective chunk; compute splits in proportion.
inline std::vector<step_cost> forward_steps(const stack& st, const parsed_policy& pol, const plan_request& rq,
                                            std::size_t chunk) {
  const policy_values& v = pol.values;
  const double n = static_cast<double>(rq.world_size), remote = (n - 1) / n;
  std::vector<step_cost> steps;
  if (pol.fsdp) {
    const std::size_t root = bytes_of(st.root_params());
    steps.push_back({"root", 0, static_cast<double>(root) * remote, 0, root, true});
  }
  for (const auto& u : st.units) {
    const double flops = unit_flops(st, u, rq.work);
    const std::size_t bytes = bytes_of(u.params);
    if (v.full || (pol.fsdp && u.root) || bytes == 0) {
      steps.push_back({u.name, flops, 0, 0, 0, false});
      continue;
    }
    std::size_t pieces = 1, piece_buffer = bytes;
    if (pol.chunk_bytes) {
      pieces = (bytes + chunk - 1) / chunk;
      piece_buffer = chunk;
    } else if (v.granularity == unshard_granularity::subunit) {
      const std::size_t sub = bytes_of(st.largest_subunit);
      pieces = (bytes + sub - 1) / sub;
      piece_buffer = (bytes + pieces - 1) / pieces;
    }
    const double piece = static_cast<double>(bytes) / static_cast<double>(pieces);
    for (std::size_t i = 0; i < pieces; ++i)
      steps.push_back({pieces == 1 ? u.name : u.name + "#" + std::to_string(i), flops / static_cast<double>(pieces),
                       piece * remote, v.offload ? piece / n : 0, piece_buffer, false});
  }
  return steps;
}
}  // namespace detail

// The gathered term and the per-unit costs for one parsed policy.
inline stack_plan plan_stack(const stack& st, const parsed_policy& pol, const plan_request& rq) {
  if (rq.world_size == 0) throw_error("world size must be at least 1 (got 0)");
  validate(rq.work);
  const std::size_t n = rq.world_size;
  const policy_values& v = pol.values;
  stack_plan p;
  p.policy = v.name;
  // Shards: every DiT parameter, bf16, 1/N per rank (FULL_SHARD); T5 sharded the same way (t5_fsdp).
  const std::size_t dit_shards = detail::shard_of(st.total_dit(), n), t5_shards = detail::shard_of(st.text_encoder, n);
  (v.offload ? p.host_bytes : p.details["shards.dit"]) += dit_shards;
  (v.offload ? p.host_bytes : p.details["shards.text_encoder"]) += t5_shards;
  p.terms["shards"] = v.offload ? 0 : dit_shards + t5_shards;
  p.details["resident.vae"] = detail::bytes_of(st.vae);
  p.terms["resident"] = p.details["resident.vae"];
  p.host_bytes += detail::bytes_of(st.audio_encoder_host);

  std::size_t gathered = 0;
  const std::size_t depth = v.prefetch_depth;
  if (v.full) {
    gathered = detail::bytes_of(st.total_dit());
    p.details["gathered.all"] = gathered;
  } else if (pol.fsdp) {  // root kept for the whole forward; current block + the one prefetched
    count block = 0;
    for (const auto& u : st.units) block = std::max(block, u.block ? u.params : 0);
    p.details["gathered.root"] = detail::bytes_of(st.root_params());
    p.details["gathered.blocks"] = 2 * detail::bytes_of(block);
    gathered = p.details["gathered.root"] + p.details["gathered.blocks"];
  } else if (pol.chunk_bytes) {  // K+1 chunk buffers; a chunk is at least one whole row
    p.effective_chunk = detail::effective_chunk(st, *pol.chunk_bytes);
    gathered = (depth + 1) * p.effective_chunk;
    p.details["gathered.chunks"] = gathered;
  } else {
    const count unit = v.granularity == unshard_granularity::subunit ? st.largest_subunit : detail::largest_streamed(st);
    gathered = (depth + 1) * detail::bytes_of(unit);
    p.details["gathered.ring"] = gathered;
  }
  p.terms["gathered"] = gathered;
  detail::add_activation_terms(st, rq.work, p);
  p.details["kv_cache.causal"] = detail::kv_cache_bytes(st, rq.work);
  p.terms["kv_cache"] = p.details["kv_cache.causal"];

  // Time of one DiT forward (one denoising step of one streamed block).
  p.steps = detail::forward_steps(st, pol, rq, p.effective_chunk);
  p.prefetch = pol.fsdp ? 1 : depth;
  for (const auto& c : p.steps) p.chunks += pol.chunk_bytes && c.gather_bytes + c.h2d_bytes > 0 ? 1 : 0;
  p.time_s = forward_seconds(p.steps, time_rates::of(rq.device, rq.link), p.prefetch);
  return p;
}

// --policy auto: the policies searched, in the grammar's spelling: every granularity with and
// without prefetch and offload, and chunk sizes from 16 MiB to 1 GiB.
inline std::vector<std::string> auto_candidates() {
  std::vector<std::string> out{"full", "fsdp"};
  std::vector<std::string> grains{"selective:block", "selective:subunit"};
  for (const char* size : {"16MiB", "64MiB", "256MiB", "1GiB"}) grains.push_back(std::string("chunked:") + size);
  for (const auto& g : grains)
    for (const char* prefetch : {"", "+prefetch:1", "+prefetch:2"})
      for (const char* offload : {"", "+offload"}) out.push_back(g + prefetch + offload);
  return out;
}

}  // namespace unshard::liveavatar
