#pragma once
// The state of a Live Avatar stream on one rank: every non-weight buffer, declared once in a table
// that both the buffer list (ledger, allocator) and make_state (the views) read; plus the
// parameters of the call about to run, which prepare() sets, and the cond-cache length the sink
// leaves behind.
//
// Categories: kv_cache -- the cond cache and one noisy cache per denoising step, written by calls
// and read by later ones; activations -- inputs and what outlives a sub-unit; workspace -- scratch
// a sub-unit overwrites before reading (after a sub-unit ran it still holds that sub-unit's
// intermediates, which the tests compare with the references).
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/core/memory_category.hpp"
#include "unshard/kernels/host/attention.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/models/liveavatar/geometry.hpp"
#include "unshard/models/wan/state.hpp"
#include "unshard/ops/host_ops.hpp"
#include "unshard/ops/op_set.hpp"

namespace unshard::s2v {

enum class call_kind { none, sink, stream };

// One call of the stream, as prepare() sets it (see s2v::model::begin_sink / begin_step).
struct call {
  s2v::call_kind kind = s2v::call_kind::none;
  std::size_t tokens = 0;          // sequence length: Lc (sink) or L (streamed)
  std::size_t current_start = 0;   // streamed: first token of the block in the stream (not wrapped)
  std::size_t write_slot = 0;      // current_start mod noisy cache size
  std::size_t active_slots = 0;    // noisy slots attended: current_start + L, or the whole cache once wrapped
  std::size_t step = 0;            // denoising step: which noisy cache
  std::int64_t roll = 0;           // reference-frame roll-out of this call's cond positions
};

struct state {
  // inputs (activations)
  float* input_x = nullptr;        // [C, F, H, W] noisy latents
  float* input_cond = nullptr;     // [cond_dim, F, H, W] cond states
  float* input_ref = nullptr;      // [C, H, W] reference latent
  float* input_motion = nullptr;   // [16, Tm, H, W] motion latents
  float* input_audio = nullptr;    // [25, C_a, audio_frames]
  float* input_t = nullptr;        // [F]
  float* input_context = nullptr;  // [text_len, text_dim], rows past the context zero
  // activations
  float* x = nullptr;              // [S, D] residual stream
  float* e = nullptr;              // [2F, D] time embedding (rows F.. at t = 0)
  float* e0 = nullptr;             // [2F, 6D] time projection
  float* ctx = nullptr;            // [text_len, D]
  float* rope_cos = nullptr;       // [S, c] the sequence's rope factors
  float* rope_sin = nullptr;
  float* rope_cond_cos = nullptr;  // [Lc, c] cond positions at this call's roll
  float* rope_cond_sin = nullptr;
  float* modulation = nullptr;     // [2F, 6D] block modulation + e0 (head: [F, 2D])
  float* audio_local = nullptr;    // [T3, n_tok + 1, D]
  float* audio_global = nullptr;   // [T3, D]
  float* output = nullptr;         // [C_out, F, 2gh, 2gw]
  float* block_outputs = nullptr;  // [num_layers, S, D], with record_block_outputs
  // workspace
  float* patches = nullptr;        // [tokens, patch vector] of the largest patchify
  float* pack_in = nullptr;        // [16, 16, H, W] one frame-pack bucket's frames
  float* time_sinusoid = nullptr;  // [2F, freq_dim]
  float* time_hidden = nullptr;    // [2F, D]
  float* text_hidden = nullptr;    // [text_len, D]
  float* norm = nullptr;           // [S, D]
  float* q = nullptr;              // [S, D]
  float* k = nullptr;              // [kv_scratch_rows, D]
  float* v = nullptr;              // [kv_scratch_rows, D]
  float* cond_k_rope = nullptr;    // [cond_slots, D] the cond keys roped for this call
  float* attn = nullptr;           // [S, D]
  float* proj = nullptr;           // [S, D]
  float* ffn_hidden = nullptr;     // [S, ffn_dim]
  float* scores = nullptr;         // [max_keys], or [attention_block_rows, max_keys] on the blas path
  float* head_out = nullptr;       // [L, patch_out]
  float* audio_feat = nullptr;     // [T, C_a] weighted wav2vec2 features, time-major
  float* audio_cols = nullptr;     // [n_tok + 1, T, 3 max(C_a, D/2)] causal-conv input vectors
  float* audio_z1 = nullptr;       // [n_tok + 1, T, D/4] conv1 streams (local 0..n-1, global n)
  float* audio_z2 = nullptr;       // [n_tok + 1, T2, D/2]
  float* audio_z3 = nullptr;       // [n_tok + 1, T3, D] conv3 streams (global n before final_linear)
  float* adain = nullptr;          // [F, 2D] shift | scale per frame
  float* kv_widen = nullptr;       // host, bf16 caches: [2 (noisy_slots + cond_slots), D] f32 rows
  // kv_cache: the cond cache is one per rank, shared by its lanes (the sink writes it once, every
  // step reads it); a step's noisy cache is held only by the lane that runs that step (null in
  // the others). Elements of kv_type (f32 or bf16) at these addresses: read them through kv().
  dtype kv_type = dtype::f32;
  float* cond_k = nullptr;         // [num_layers, cond_slots, D] after RMS, not roped
  float* cond_v = nullptr;
  float* cond_end_slot = nullptr;  // [1] cond tokens cached by the sink, an exact integer (0 before it)
  std::vector<float*> noisy_k;     // per step: [num_layers, noisy_slots, D] roped
  std::vector<float*> noisy_v;
  // Each cache is paged by layer (block i reads and writes page i alone). Where a runtime places the
  // pages (kv:offload), the bases above are the whole caches in host memory and block i reaches its
  // page through the runtime's page table, which points it at a device slot while the block runs;
  // without a table page i is at base + i * page. The forward addresses a cache only via kv_page.
  const page_table* cond_k_pages = nullptr;
  const page_table* cond_v_pages = nullptr;
  std::vector<const page_table*> noisy_k_pages;  // per step
  std::vector<const page_table*> noisy_v_pages;

  s2v::call call;                   // the call about to run (set by prepare)

  std::size_t cond_end() const noexcept { return static_cast<std::size_t>(*cond_end_slot); }
  void set_cond_end(std::size_t n) noexcept { *cond_end_slot = static_cast<float>(n); }
  bool holds_step(std::size_t step) const noexcept { return step < noisy_k.size() && noisy_k[step] != nullptr; }
  // Element `offset` of the cache buffer at `base`, in the caches' type.
  kv_cache_ref kv(float* base, std::size_t offset) const noexcept { return kv_cache_ref{base, kv_type}.at(offset); }
  // Page `page` (of `page_elements` cache values) of the cache at `base`: where its page table
  // says, or at base + page * page_elements.
  kv_cache_ref kv_page(float* base, const page_table* pages, std::size_t page, std::size_t page_elements) const noexcept {
    if (pages) return kv_cache_ref{(*pages)[page], kv_type};
    return kv(base, page * page_elements);
  }
};

namespace detail {

struct buffer_entry {
  std::string name;
  std::size_t floats;
  memory_category category;
  // (Aliases: nvcc's front end rewrites a pointer-to-member declarator with parentheses g++ warns about.)
  using buffer_member = float* s2v::state::*;
  using buffer_list = std::vector<float*> s2v::state::*;
  buffer_member member = nullptr;  // a single buffer, or
  buffer_list list = nullptr;      // entry `index` of a per-step list
  std::size_t index = 0;
  buffer_scope scope = buffer_scope::per_lane;
  std::size_t step = 0;  // per_step
  std::size_t pages = 0;  // a cache: one page per block (buffer_spec::pages)
};

// Floats of storage for `elements` cache values of the geometry's kv_type (buffers count floats).
inline std::size_t kv_floats(const s2v::geometry& g, std::size_t elements) noexcept {
  return (elements * size_of(g.kv_type) + sizeof(float) - 1) / sizeof(float);
}

inline std::vector<buffer_entry> buffer_table(const s2v::geometry& g) {
  using mc = memory_category;
  using st = s2v::state;
  const std::size_t S = g.max_tokens(), D = g.dim, F = g.frames, HW = g.height * g.width;
  // Patch vectors of the largest patchify: the block's latents or cond states, the reference
  // frame, or one frame-pack bucket (few tokens, long vectors: 4x has 16*4*8*8 inputs each).
  const std::size_t C = s2v::pack_channels;
  const std::size_t patch_floats = std::max({g.block_tokens * std::max(g.patch_in, g.cond_dim * 4),
                                             g.frame_tokens * C * 4, g.h2 * g.w2 * C * 2 * 4 * 4,
                                             4 * g.h4 * g.w4 * C * 4 * 8 * 8});
  std::vector<buffer_entry> t = {
      {"input.x", g.in_dim * F * HW, mc::activations, &st::input_x},
      {"input.cond", g.cond_dim * F * HW, mc::activations, &st::input_cond},
      {"input.ref", g.in_dim * HW, mc::activations, &st::input_ref},
      {"input.motion", s2v::pack_channels * g.motion_latent_frames * HW, mc::activations, &st::input_motion},
      {"input.audio", s2v::audio_layers * g.audio_dim * g.audio_frames, mc::activations, &st::input_audio},
      {"input.t", F, mc::activations, &st::input_t},
      {"input.context", g.text_len * g.text_dim, mc::activations, &st::input_context},
      {"x", S * D, mc::activations, &st::x},
      {"e", 2 * F * D, mc::activations, &st::e},
      {"e0", 2 * F * 6 * D, mc::activations, &st::e0},
      {"ctx", g.text_len * D, mc::activations, &st::ctx},
      {"rope.cos", S * g.rope_pairs, mc::activations, &st::rope_cos},
      {"rope.sin", S * g.rope_pairs, mc::activations, &st::rope_sin},
      {"rope.cond.cos", g.cond_tokens * g.rope_pairs, mc::activations, &st::rope_cond_cos},
      {"rope.cond.sin", g.cond_tokens * g.rope_pairs, mc::activations, &st::rope_cond_sin},
      {"modulation", 2 * F * 6 * D, mc::activations, &st::modulation},
      {"audio.local", g.audio_t3 * (g.audio_tokens + 1) * D, mc::activations, &st::audio_local},
      {"audio.global", g.audio_t3 * D, mc::activations, &st::audio_global},
      {"output", g.block_tokens * g.patch_out, mc::activations, &st::output},
      {"patches", patch_floats, mc::workspace, &st::patches},
      {"pack_in", s2v::pack_channels * s2v::pack_frames[2] * HW, mc::workspace, &st::pack_in},
      {"time_sinusoid", 2 * F * g.freq_dim, mc::workspace, &st::time_sinusoid},
      {"time_hidden", 2 * F * D, mc::workspace, &st::time_hidden},
      {"text_hidden", g.text_len * D, mc::workspace, &st::text_hidden},
      {"norm", S * D, mc::workspace, &st::norm},
      {"q", S * D, mc::workspace, &st::q},
      {"k", g.kv_scratch_rows() * D, mc::workspace, &st::k},
      {"v", g.kv_scratch_rows() * D, mc::workspace, &st::v},
      {"cond_k_rope", g.cond_slots * D, mc::workspace, &st::cond_k_rope},
      {"attn", S * D, mc::workspace, &st::attn},
      {"proj", S * D, mc::workspace, &st::proj},
      {"ffn_hidden", S * g.ffn_dim, mc::workspace, &st::ffn_hidden},
      {"scores", attention_scratch_floats(g.gemm, g.max_keys()), mc::workspace, &st::scores},
      {"head_out", g.block_tokens * g.patch_out, mc::workspace, &st::head_out},
      {"audio.feat", g.audio_t * g.audio_dim, mc::workspace, &st::audio_feat},
      {"audio.cols", (g.audio_tokens + 1) * g.audio_t * 3 * std::max(g.audio_dim, D / 2), mc::workspace,
       &st::audio_cols},
      {"audio.z1", (g.audio_tokens + 1) * g.audio_t * (D / 4), mc::workspace, &st::audio_z1},
      {"audio.z2", (g.audio_tokens + 1) * g.audio_t2 * (D / 2), mc::workspace, &st::audio_z2},
      {"audio.z3", (g.audio_tokens + 1) * g.audio_t3 * D, mc::workspace, &st::audio_z3},
      {"adain", F * 2 * D, mc::workspace, &st::adain},
      {"kv.cond.k", kv_floats(g, g.num_layers * g.cond_slots * D), mc::kv_cache, &st::cond_k, nullptr, 0,
       buffer_scope::per_rank, 0, g.num_layers},
      {"kv.cond.v", kv_floats(g, g.num_layers * g.cond_slots * D), mc::kv_cache, &st::cond_v, nullptr, 0,
       buffer_scope::per_rank, 0, g.num_layers},
      {"kv.cond.end", 1, mc::kv_cache, &st::cond_end_slot, nullptr, 0, buffer_scope::per_rank},
  };
  for (std::size_t s = 0; s < g.steps; ++s) {
    const std::string step = "kv.step" + std::to_string(s);
    t.push_back({step + ".k", kv_floats(g, g.num_layers * g.noisy_slots * D), mc::kv_cache, nullptr, &st::noisy_k, s,
                 buffer_scope::per_step, s, g.num_layers});
    t.push_back({step + ".v", kv_floats(g, g.num_layers * g.noisy_slots * D), mc::kv_cache, nullptr, &st::noisy_v, s,
                 buffer_scope::per_step, s, g.num_layers});
  }
  // The host attention widens a bf16 cache's rows to f32 first (the device reads bf16 as it is).
  if (g.kv_type != dtype::f32)
    t.push_back({"kv_widen", host_ops::kv_widen_floats(g.noisy_slots + g.cond_slots, D), mc::workspace, &st::kv_widen});
  if (g.record_block_outputs)
    t.push_back({"block_outputs", g.num_layers * S * D, mc::activations, &st::block_outputs});
  return t;
}

inline std::vector<buffer_spec> buffer_specs(const s2v::geometry& g) {
  const std::vector<buffer_entry> table = buffer_table(g);
  std::vector<buffer_spec> specs = wan::detail::float_buffer_specs(table);
  for (std::size_t i = 0; i < specs.size(); ++i) specs[i].pages = table[i].pages;
  return specs;
}

// What the call set up in `s` does with its block's page of cache `b` (s2v::model::page_access_of):
// the sink writes the cond tokens' rows of the cond caches; a streamed call of step s reads the
// cond caches' cond rows and the noisy slots it attends of step s's caches, and writes its block's
// slots [write_slot, write_slot + L) there (never wrapping: the cache is a whole number of blocks).
inline page_access cache_page_access(const s2v::geometry& g, const s2v::state& s, const buffer_spec& b) {
  const std::size_t row = g.dim * size_of(g.kv_type);  // one token's keys (or values) in the cache
  page_access a;
  if (b.category != memory_category::kv_cache || b.pages == 0) return a;
  if (b.scope == buffer_scope::per_rank) {  // kv.cond.k, kv.cond.v
    if (s.call.kind == s2v::call_kind::sink) a.write = {0, s.call.tokens * row};
    else if (s.call.kind == s2v::call_kind::stream) a.read = {0, g.cond_tokens * row};
  } else if (b.scope == buffer_scope::per_step && s.call.kind == s2v::call_kind::stream && b.step == s.call.step) {
    a.read = {0, s.call.active_slots * row};
    a.write = {s.call.write_slot * row, s.call.tokens * row};
  }
  return a;
}

// The state's views into `buffers`. host_memory: the caches are zeroed here. Otherwise (device
// memory) the views are all this function touches, the backend zeroes the caches, and a buffer
// the device model did not declare (the host attention's "scores") stays null.
inline s2v::state make_state(const s2v::geometry& g, const buffer_set& buffers, bool host_memory = true) {
  s2v::state s;
  s.kv_type = g.kv_type;
  s.noisy_k.assign(g.steps, nullptr);
  s.noisy_v.assign(g.steps, nullptr);
  s.noisy_k_pages.assign(g.steps, nullptr);
  s.noisy_v_pages.assign(g.steps, nullptr);
  for (const auto& b : buffer_table(g)) {
    // A lane holds the caches of its own steps only (the schedule decides which).
    if ((b.scope == buffer_scope::per_step || !host_memory) && !buffers.has(b.name)) continue;
    float* p = buffers.checked_as<float>(b.name, b.floats, "liveavatar model");
    if (b.member) s.*b.member = p;
    else (s.*b.list)[b.index] = p;
    // Pages a runtime places: block i finds its page through the runtime's table.
    if (const page_table* t = b.pages ? buffers.pages(b.name) : nullptr) {
      if (t->size() != b.pages)
        throw_error("liveavatar model: the page table of '", b.name, "' has ", t->size(), " pages, not ", b.pages);
      if (b.member == &s2v::state::cond_k) s.cond_k_pages = t;
      else if (b.member == &s2v::state::cond_v) s.cond_v_pages = t;
      else (b.list == &s2v::state::noisy_k ? s.noisy_k_pages : s.noisy_v_pages)[b.index] = t;
    }
    // The caches start empty: unused slots are zero, as the official torch.zeros caches.
    if (host_memory && b.category == memory_category::kv_cache) std::fill(p, p + b.floats, 0.0f);
  }
  return s;
}

}  // namespace detail
}  // namespace unshard::s2v
