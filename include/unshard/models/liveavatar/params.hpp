#pragma once
// The parameters of each S2V sub-unit: names (CausalWanModel_S2V's state_dict names, after the
// sub-unit's prefix), shapes, and where each sits in the sub-unit's param_views. One function per
// sub-unit builds the table and the slot indices together (the Wan tables' scheme, which this
// reuses), so declaring and reading parameters share one source. Building a table never allocates.
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/layer/param_spec.hpp"
#include "unshard/models/liveavatar/geometry.hpp"
#include "unshard/models/wan/params.hpp"

namespace unshard::s2v {

enum class layer_kind { embeddings, frame_packer, cond_encoder, audio_encoder, block, injector, head };

}  // namespace unshard::s2v

namespace unshard::s2v::detail {

inline std::int64_t i64(std::size_t v) { return static_cast<std::int64_t>(v); }

// A Conv3d/Conv1d: weight [out, in, k...] (a [out, in * prod(k)] matrix) and bias [out].
inline wan::detail::linear_slots add_conv(wan::detail::param_table& t, const char* weight, const char* bias, shape dims) {
  const std::size_t w = t.add(weight, dims, true);  // used as a [O, C*k...] GEMM weight
  return {w, t.add(bias, {dims[0]})};
}

// --- embeddings (top-level names) -------------------------------------------------------------

struct patch_params {
  wan::detail::param_table table;
  wan::detail::linear_slots conv;
};
inline patch_params patch_layout(const s2v::geometry& g) {
  patch_params p;
  p.conv = add_conv(p.table, "patch_embedding.weight", "patch_embedding.bias", {i64(g.dim), i64(g.in_dim), 1, 2, 2});
  return p;
}

// time_embedding, time_projection and text_embedding: Wan's own (wan::detail::time_layout, wan::detail::text_layout).

// --- frame packer (prefix "frame_packer."): one sub-unit per bucket ----------------------------

struct pack_params {
  wan::detail::param_table table;
  wan::detail::linear_slots conv;
};
inline pack_params pack_layout(const s2v::geometry& g, std::size_t bucket) {
  pack_params p;
  const std::int64_t D = i64(g.dim), C = i64(s2v::pack_channels);
  if (bucket == 0) p.conv = add_conv(p.table, "proj.weight", "proj.bias", {D, C, 1, 2, 2});
  else if (bucket == 1) p.conv = add_conv(p.table, "proj_2x.weight", "proj_2x.bias", {D, C, 2, 4, 4});
  else p.conv = add_conv(p.table, "proj_4x.weight", "proj_4x.bias", {D, C, 4, 8, 8});
  return p;
}

// --- cond encoder and cond mask (top-level names) ----------------------------------------------

struct cond_params {
  wan::detail::param_table table;
  wan::detail::linear_slots conv;
  std::size_t mask;  // trainable_cond_mask.weight [3, D]: rows noisy, reference, motion
};
inline cond_params cond_layout(const s2v::geometry& g) {
  cond_params p;
  p.conv = add_conv(p.table, "cond_encoder.weight", "cond_encoder.bias", {i64(g.dim), i64(g.cond_dim), 1, 2, 2});
  p.mask = p.table.add("trainable_cond_mask.weight", {3, i64(g.dim)});
  return p;
}

// --- audio encoder (prefix "casual_audio_encoder."): conv1 | conv2 | conv3 | final_linear ------

struct audio_params {
  wan::detail::param_table table;
  std::size_t layer_weights = wan::detail::no_slot, padding_tokens = wan::detail::no_slot;
  wan::detail::linear_slots local{wan::detail::no_slot, wan::detail::no_slot}, global{wan::detail::no_slot, wan::detail::no_slot}, conv{wan::detail::no_slot, wan::detail::no_slot};
};
inline audio_params audio_layout(const s2v::geometry& g, std::size_t sub) {
  audio_params p;
  const std::int64_t D = i64(g.dim), Ca = i64(g.audio_dim), n = i64(g.audio_tokens);
  switch (sub) {
    case 0:
      p.layer_weights = p.table.add("weights", {1, i64(s2v::audio_layers), 1, 1});
      p.local = add_conv(p.table, "encoder.conv1_local.conv.weight", "encoder.conv1_local.conv.bias", {n * (D / 4), Ca, 3});
      p.global = add_conv(p.table, "encoder.conv1_global.conv.weight", "encoder.conv1_global.conv.bias", {D / 4, Ca, 3});
      break;
    case 1: p.conv = add_conv(p.table, "encoder.conv2.conv.weight", "encoder.conv2.conv.bias", {D / 2, D / 4, 3}); break;
    case 2:
      p.conv = add_conv(p.table, "encoder.conv3.conv.weight", "encoder.conv3.conv.bias", {D, D / 2, 3});
      p.padding_tokens = p.table.add("encoder.padding_tokens", {1, 1, 1, D});
      break;
    default: p.conv = wan::detail::add_linear(p.table, "encoder.final_linear.weight", "encoder.final_linear.bias", g.dim, g.dim); break;
  }
  return p;
}

// --- block (prefix "blocks.i."): self_attn | cross_attn | ffn -----------------------------------

struct attention_slots {
  wan::detail::linear_slots q, k, v, o;
  std::size_t norm_q, norm_k;
};
// q, k, v, o Linear(D, D) and RMSNorm(D) on q and k; `names` in that order (weight, bias, ...).
inline attention_slots add_attention(wan::detail::param_table& t, const std::array<const char*, 10>& names, std::size_t D) {
  attention_slots s;
  s.q = wan::detail::add_linear(t, names[0], names[1], D, D);
  s.k = wan::detail::add_linear(t, names[2], names[3], D, D);
  s.v = wan::detail::add_linear(t, names[4], names[5], D, D);
  s.o = wan::detail::add_linear(t, names[6], names[7], D, D);
  s.norm_q = t.add(names[8], {i64(D)});
  s.norm_k = t.add(names[9], {i64(D)});
  return s;
}

struct self_attn_params {
  wan::detail::param_table table;
  std::size_t modulation;  // [1, 6, D]
  attention_slots attn;
};
inline self_attn_params self_attn_layout(const s2v::geometry& g) {
  self_attn_params p;
  p.modulation = p.table.add("modulation", {1, 6, i64(g.dim)});
  p.attn = add_attention(p.table,
                         {"self_attn.q.weight", "self_attn.q.bias", "self_attn.k.weight", "self_attn.k.bias",
                          "self_attn.v.weight", "self_attn.v.bias", "self_attn.o.weight", "self_attn.o.bias",
                          "self_attn.norm_q.weight", "self_attn.norm_k.weight"},
                         g.dim);
  return p;
}

struct cross_attn_params {
  wan::detail::param_table table;
  std::size_t norm3_weight = wan::detail::no_slot, norm3_bias = wan::detail::no_slot;
  attention_slots attn;
};
inline cross_attn_params cross_attn_layout(const s2v::geometry& g) {
  cross_attn_params p;
  if (g.cross_attn_norm) {
    p.norm3_weight = p.table.add("norm3.weight", {i64(g.dim)});
    p.norm3_bias = p.table.add("norm3.bias", {i64(g.dim)});
  }
  p.attn = add_attention(p.table,
                         {"cross_attn.q.weight", "cross_attn.q.bias", "cross_attn.k.weight", "cross_attn.k.bias",
                          "cross_attn.v.weight", "cross_attn.v.bias", "cross_attn.o.weight", "cross_attn.o.bias",
                          "cross_attn.norm_q.weight", "cross_attn.norm_k.weight"},
                         g.dim);
  return p;
}

struct ffn_params {
  wan::detail::param_table table;
  wan::detail::linear_slots fc0, fc2;
};
inline ffn_params ffn_layout(const s2v::geometry& g) {
  ffn_params p;
  p.fc0 = wan::detail::add_linear(p.table, "ffn.0.weight", "ffn.0.bias", g.ffn_dim, g.dim);
  p.fc2 = wan::detail::add_linear(p.table, "ffn.2.weight", "ffn.2.bias", g.dim, g.ffn_dim);
  return p;
}

// --- audio injector j: adain (prefix "audio_injector.injector_adain_layers.j.") | attn
// (prefix "audio_injector.injector.j.") ------------------------------------------------------------

struct adain_params {
  wan::detail::param_table table;
  wan::detail::linear_slots linear;  // [2D, D]: shift rows first, then scale
};
inline adain_params adain_layout(const s2v::geometry& g) {
  adain_params p;
  p.linear = wan::detail::add_linear(p.table, "linear.weight", "linear.bias", 2 * g.dim, g.dim);
  return p;
}

struct injector_attn_params {
  wan::detail::param_table table;
  attention_slots attn;
};
inline injector_attn_params injector_attn_layout(const s2v::geometry& g) {
  injector_attn_params p;
  p.attn = add_attention(p.table,
                         {"q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias", "o.weight", "o.bias",
                          "norm_q.weight", "norm_k.weight"},
                         g.dim);
  return p;
}

// --- head (prefix "head.") -----------------------------------------------------------------------

struct head_params {
  wan::detail::param_table table;
  std::size_t modulation;  // [1, 2, D]
  wan::detail::linear_slots head;   // [out_dim * 4, D]
};
inline head_params head_layout(const s2v::geometry& g) {
  head_params p;
  p.modulation = p.table.add("modulation", {1, 2, i64(g.dim)});
  p.head = wan::detail::add_linear(p.table, "head.weight", "head.bias", g.patch_out, g.dim);
  return p;
}

// --- declaration and checking --------------------------------------------------------------------

inline std::vector<param_spec> param_specs(const wan::detail::param_table& t, const std::string& prefix, dtype storage) {
  return wan::detail::param_specs(t, prefix, storage);
}

// The views a sub-unit was handed must be what it declared (count, shapes, dtype). `prefix()`
// builds the names, only when reporting.
template <class Prefix>
void check_params(const wan::detail::param_table& t, const param_views& views, dtype storage, Prefix&& prefix) {
  if (views.size() != t.count)
    throw_error("liveavatar sub-unit '", prefix(), "': got ", views.size(), " parameter views, declared ", t.count);
  for (std::size_t i = 0; i < t.count; ++i) {
    const tensor_view& v = views[i];
    if (v.empty() || !(v.dims() == t.slots[i].dims) || !holds_declared_type(v, storage, t.slots[i].by_rows))
      throw_error("liveavatar parameter '", prefix(), t.slots[i].name, "': got ", name_of(v.type()), " ",
                  v.dims().to_string(), v.empty() ? " with no data" : "", ", declared ", name_of(storage), " ",
                  t.slots[i].dims.to_string());
  }
}
template <class Prefix>
void check_params(const wan::detail::param_table& t, const whole_params& p, dtype storage, Prefix&& prefix) {
  check_params(t, p.views(), storage, prefix);
}
// Streamed chunks are cut from this layer's own declarations; the stream checks the read order.
template <param_source P, class Prefix>
void check_params(const wan::detail::param_table&, const P&, dtype, Prefix&&) {}

}  // namespace unshard::s2v::detail
