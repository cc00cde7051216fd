#pragma once
// The activation state of a Wan forward: every non-weight buffer, declared once in a table that
// both the buffer list (for the ledger and allocator) and make_state (the views) read, so the two
// can never disagree. All buffers are f32.
//
// activations outlive a sub-unit (the residual stream, e/e0, the text context, the modulation the
// self-attention sub-unit hands to the FFN sub-unit, outputs, inputs); workspace is scratch that a
// sub-unit overwrites before reading. After a block sub-unit runs, its workspace still holds that
// sub-unit's intermediates (norm = its input, q/k after rope, attn = attention before the output
// projection, proj = the projection before the gate): tests compare them with the references.
#include <cstddef>
#include <string>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/core/memory_category.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/models/wan/geometry.hpp"

namespace unshard::wan {

struct state {
  // inputs (activations)
  float* input_x = nullptr;        // [C, F, H, W]
  float* input_t = nullptr;        // [1] timestep
  float* input_context = nullptr;  // [text_len, text_dim], rows past the context length zero
  // activations
  float* x = nullptr;              // [S, D] residual stream (tokens)
  float* e = nullptr;              // [D] time embedding
  float* e0 = nullptr;             // [6, D] time projection
  float* ctx = nullptr;            // [text_len, D] embedded text context (shared by all blocks)
  float* rope_cos = nullptr;       // [S, head_dim/2]
  float* rope_sin = nullptr;       // [S, head_dim/2]
  float* modulation = nullptr;     // [6, D]: a block's modulation + e0 (head: [2, D] of head.modulation + e)
  float* output = nullptr;         // [C_out, gf*pt, gh*ph, gw*pw]
  float* block_outputs = nullptr;  // [num_layers, S, D], only with record_block_outputs
  // workspace
  float* patches = nullptr;        // [S, in_dim*pt*ph*pw] patch vectors
  float* time_sinusoid = nullptr;  // [freq_dim]
  float* time_hidden = nullptr;    // [D]
  float* text_hidden = nullptr;    // [text_len, D]
  float* norm = nullptr;           // [S, D] normalised input of the running sub-unit
  float* q = nullptr;              // [S, D]
  float* k = nullptr;              // [max(S, text_len), D]
  float* v = nullptr;              // [max(S, text_len), D]
  float* attn = nullptr;           // [S, D] attention output, heads concatenated
  float* proj = nullptr;           // [S, D] output projection / ffn.2 output, before gate and residual
  float* ffn_hidden = nullptr;     // [S, ffn_dim]
  float* scores = nullptr;         // [max(S, text_len)] one row of attention probabilities
  float* head_out = nullptr;       // [S, out_dim*pt*ph*pw]
};

namespace detail {

using state_member = float* wan::state::*;  // an alias: nvcc warns on the bare declarator

struct buffer_entry {
  const char* name;
  std::size_t floats;
  memory_category category;
  state_member member;
};

inline std::vector<buffer_entry> buffer_table(const wan::geometry& g) {
  using mc = memory_category;
  const std::size_t S = g.tokens, D = g.dim;
  std::vector<buffer_entry> t = {
      {"input.x", g.latent[0] * g.latent[1] * g.latent[2] * g.latent[3], mc::activations, &wan::state::input_x},
      {"input.t", 1, mc::activations, &wan::state::input_t},
      {"input.context", g.text_len * g.text_dim, mc::activations, &wan::state::input_context},
      {"x", S * D, mc::activations, &wan::state::x},
      {"e", D, mc::activations, &wan::state::e},
      {"e0", 6 * D, mc::activations, &wan::state::e0},
      {"ctx", g.text_len * D, mc::activations, &wan::state::ctx},
      {"rope.cos", S * g.rope_pairs, mc::activations, &wan::state::rope_cos},
      {"rope.sin", S * g.rope_pairs, mc::activations, &wan::state::rope_sin},
      {"modulation", 6 * D, mc::activations, &wan::state::modulation},
      {"output", g.patch_out * S, mc::activations, &wan::state::output},
      {"patches", S * g.patch_in, mc::workspace, &wan::state::patches},
      {"time_sinusoid", g.freq_dim, mc::workspace, &wan::state::time_sinusoid},
      {"time_hidden", D, mc::workspace, &wan::state::time_hidden},
      {"text_hidden", g.text_len * D, mc::workspace, &wan::state::text_hidden},
      {"norm", S * D, mc::workspace, &wan::state::norm},
      {"q", S * D, mc::workspace, &wan::state::q},
      {"k", g.max_keys() * D, mc::workspace, &wan::state::k},
      {"v", g.max_keys() * D, mc::workspace, &wan::state::v},
      {"attn", S * D, mc::workspace, &wan::state::attn},
      {"proj", S * D, mc::workspace, &wan::state::proj},
      {"ffn_hidden", S * g.ffn_dim, mc::workspace, &wan::state::ffn_hidden},
      {"scores", g.max_keys(), mc::workspace, &wan::state::scores},
      {"head_out", S * g.patch_out, mc::workspace, &wan::state::head_out},
  };
  if (g.record_block_outputs)
    t.push_back({"block_outputs", g.num_layers * S * D, mc::activations, &wan::state::block_outputs});
  return t;
}

// The buffer specs of a table of f32 buffers (entries with name, floats, category).
template <class Table>
std::vector<buffer_spec> float_buffer_specs(const Table& table) {
  std::vector<buffer_spec> specs;
  for (const auto& b : table) {
    specs.push_back({b.name, b.floats * sizeof(float), b.category});
    if constexpr (requires { b.scope; b.step; }) {
      specs.back().scope = b.scope;
      specs.back().step = b.step;
    }
  }
  return specs;
}

inline std::vector<buffer_spec> buffer_specs(const wan::geometry& g) { return float_buffer_specs(buffer_table(g)); }

inline wan::state make_state(const wan::geometry& g, const buffer_set& buffers) {
  wan::state s;
  for (const auto& b : buffer_table(g)) s.*b.member = buffers.checked_as<float>(b.name, b.floats, "wan::model");
  return s;
}

}  // namespace detail
}  // namespace unshard::wan
