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

namespace unshard {

enum class s2v_layer_kind { embeddings, frame_packer, cond_encoder, audio_encoder, block, injector, head };

}  // namespace unshard

namespace unshard::detail {

inline std::int64_t s2v_i64(std::size_t v) { return static_cast<std::int64_t>(v); }

// A Conv3d/Conv1d: weight [out, in, k...] (a [out, in * prod(k)] matrix) and bias [out].
inline wan_linear_slots add_conv(wan_param_table& t, const char* weight, const char* bias, shape dims) {
  const std::size_t w = t.add(weight, dims, true);  // used as a [O, C*k...] GEMM weight
  return {w, t.add(bias, {dims[0]})};
}

// --- embeddings (top-level names) -------------------------------------------------------------

struct s2v_patch_params {
  wan_param_table table;
  wan_linear_slots conv;
};
inline s2v_patch_params s2v_patch_layout(const s2v_geometry& g) {
  s2v_patch_params p;
  p.conv = add_conv(p.table, "patch_embedding.weight", "patch_embedding.bias", {s2v_i64(g.dim), s2v_i64(g.in_dim), 1, 2, 2});
  return p;
}

// time_embedding, time_projection and text_embedding: Wan's own (wan_time_layout, wan_text_layout).

// --- frame packer (prefix "frame_packer."): one sub-unit per bucket ----------------------------

struct s2v_pack_params {
  wan_param_table table;
  wan_linear_slots conv;
};
inline s2v_pack_params s2v_pack_layout(const s2v_geometry& g, std::size_t bucket) {
  s2v_pack_params p;
  const std::int64_t D = s2v_i64(g.dim), C = s2v_i64(s2v_pack_channels);
  if (bucket == 0) p.conv = add_conv(p.table, "proj.weight", "proj.bias", {D, C, 1, 2, 2});
  else if (bucket == 1) p.conv = add_conv(p.table, "proj_2x.weight", "proj_2x.bias", {D, C, 2, 4, 4});
  else p.conv = add_conv(p.table, "proj_4x.weight", "proj_4x.bias", {D, C, 4, 8, 8});
  return p;
}

// --- cond encoder and cond mask (top-level names) ----------------------------------------------

struct s2v_cond_params {
  wan_param_table table;
  wan_linear_slots conv;
  std::size_t mask;  // trainable_cond_mask.weight [3, D]: rows noisy, reference, motion
};
inline s2v_cond_params s2v_cond_layout(const s2v_geometry& g) {
  s2v_cond_params p;
  p.conv = add_conv(p.table, "cond_encoder.weight", "cond_encoder.bias", {s2v_i64(g.dim), s2v_i64(g.cond_dim), 1, 2, 2});
  p.mask = p.table.add("trainable_cond_mask.weight", {3, s2v_i64(g.dim)});
  return p;
}

// --- audio encoder (prefix "casual_audio_encoder."): conv1 | conv2 | conv3 | final_linear ------

struct s2v_audio_params {
  wan_param_table table;
  std::size_t layer_weights = wan_no_slot, padding_tokens = wan_no_slot;
  wan_linear_slots local{wan_no_slot, wan_no_slot}, global{wan_no_slot, wan_no_slot}, conv{wan_no_slot, wan_no_slot};
};
inline s2v_audio_params s2v_audio_layout(const s2v_geometry& g, std::size_t sub) {
  s2v_audio_params p;
  const std::int64_t D = s2v_i64(g.dim), Ca = s2v_i64(g.audio_dim), n = s2v_i64(g.audio_tokens);
  switch (sub) {
    case 0:
      p.layer_weights = p.table.add("weights", {1, s2v_i64(s2v_audio_layers), 1, 1});
      p.local = add_conv(p.table, "encoder.conv1_local.conv.weight", "encoder.conv1_local.conv.bias", {n * (D / 4), Ca, 3});
      p.global = add_conv(p.table, "encoder.conv1_global.conv.weight", "encoder.conv1_global.conv.bias", {D / 4, Ca, 3});
      break;
    case 1: p.conv = add_conv(p.table, "encoder.conv2.conv.weight", "encoder.conv2.conv.bias", {D / 2, D / 4, 3}); break;
    case 2:
      p.conv = add_conv(p.table, "encoder.conv3.conv.weight", "encoder.conv3.conv.bias", {D, D / 2, 3});
      p.padding_tokens = p.table.add("encoder.padding_tokens", {1, 1, 1, D});
      break;
    default: p.conv = add_linear(p.table, "encoder.final_linear.weight", "encoder.final_linear.bias", g.dim, g.dim); break;
  }
  return p;
}

// --- block (prefix "blocks.i."): self_attn | cross_attn | ffn -----------------------------------

struct s2v_attention_slots {
  wan_linear_slots q, k, v, o;
  std::size_t norm_q, norm_k;
};
// q, k, v, o Linear(D, D) and RMSNorm(D) on q and k; `names` in that order (weight, bias, ...).
inline s2v_attention_slots add_attention(wan_param_table& t, const std::array<const char*, 10>& names, std::size_t D) {
  s2v_attention_slots s;
  s.q = add_linear(t, names[0], names[1], D, D);
  s.k = add_linear(t, names[2], names[3], D, D);
  s.v = add_linear(t, names[4], names[5], D, D);
  s.o = add_linear(t, names[6], names[7], D, D);
  s.norm_q = t.add(names[8], {s2v_i64(D)});
  s.norm_k = t.add(names[9], {s2v_i64(D)});
  return s;
}

struct s2v_self_attn_params {
  wan_param_table table;
  std::size_t modulation;  // [1, 6, D]
  s2v_attention_slots attn;
};
inline s2v_self_attn_params s2v_self_attn_layout(const s2v_geometry& g) {
  s2v_self_attn_params p;
  p.modulation = p.table.add("modulation", {1, 6, s2v_i64(g.dim)});
  p.attn = add_attention(p.table,
                         {"self_attn.q.weight", "self_attn.q.bias", "self_attn.k.weight", "self_attn.k.bias",
                          "self_attn.v.weight", "self_attn.v.bias", "self_attn.o.weight", "self_attn.o.bias",
                          "self_attn.norm_q.weight", "self_attn.norm_k.weight"},
                         g.dim);
  return p;
}

struct s2v_cross_attn_params {
  wan_param_table table;
  std::size_t norm3_weight = wan_no_slot, norm3_bias = wan_no_slot;
  s2v_attention_slots attn;
};
inline s2v_cross_attn_params s2v_cross_attn_layout(const s2v_geometry& g) {
  s2v_cross_attn_params p;
  if (g.cross_attn_norm) {
    p.norm3_weight = p.table.add("norm3.weight", {s2v_i64(g.dim)});
    p.norm3_bias = p.table.add("norm3.bias", {s2v_i64(g.dim)});
  }
  p.attn = add_attention(p.table,
                         {"cross_attn.q.weight", "cross_attn.q.bias", "cross_attn.k.weight", "cross_attn.k.bias",
                          "cross_attn.v.weight", "cross_attn.v.bias", "cross_attn.o.weight", "cross_attn.o.bias",
                          "cross_attn.norm_q.weight", "cross_attn.norm_k.weight"},
                         g.dim);
  return p;
}

struct s2v_ffn_params {
  wan_param_table table;
  wan_linear_slots fc0, fc2;
};
inline s2v_ffn_params s2v_ffn_layout(const s2v_geometry& g) {
  s2v_ffn_params p;
  p.fc0 = add_linear(p.table, "ffn.0.weight", "ffn.0.bias", g.ffn_dim, g.dim);
  p.fc2 = add_linear(p.table, "ffn.2.weight", "ffn.2.bias", g.dim, g.ffn_dim);
  return p;
}

// --- audio injector j: adain (prefix "audio_injector.injector_adain_layers.j.") | attn
// (prefix "audio_injector.injector.j.") ------------------------------------------------------------

struct s2v_adain_params {
  wan_param_table table;
  wan_linear_slots linear;  // [2D, D]: shift rows first, then scale
};
inline s2v_adain_params s2v_adain_layout(const s2v_geometry& g) {
  s2v_adain_params p;
  p.linear = add_linear(p.table, "linear.weight", "linear.bias", 2 * g.dim, g.dim);
  return p;
}

struct s2v_injector_attn_params {
  wan_param_table table;
  s2v_attention_slots attn;
};
inline s2v_injector_attn_params s2v_injector_attn_layout(const s2v_geometry& g) {
  s2v_injector_attn_params p;
  p.attn = add_attention(p.table,
                         {"q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias", "o.weight", "o.bias",
                          "norm_q.weight", "norm_k.weight"},
                         g.dim);
  return p;
}

// --- head (prefix "head.") -----------------------------------------------------------------------

struct s2v_head_params {
  wan_param_table table;
  std::size_t modulation;  // [1, 2, D]
  wan_linear_slots head;   // [out_dim * 4, D]
};
inline s2v_head_params s2v_head_layout(const s2v_geometry& g) {
  s2v_head_params p;
  p.modulation = p.table.add("modulation", {1, 2, s2v_i64(g.dim)});
  p.head = add_linear(p.table, "head.weight", "head.bias", g.patch_out, g.dim);
  return p;
}

// --- declaration and checking --------------------------------------------------------------------

inline std::vector<param_spec> s2v_param_specs(const wan_param_table& t, const std::string& prefix, dtype storage) {
  return wan_param_specs(t, prefix, storage);
}

// The views a sub-unit was handed must be what it declared (count, shapes, dtype). `prefix()`
// builds the names, only when reporting.
template <class Prefix>
void check_s2v_params(const wan_param_table& t, const param_views& views, dtype storage, Prefix&& prefix) {
  if (views.size() != t.count)
    throw_error("liveavatar sub-unit '", prefix(), "': got ", views.size(), " parameter views, declared ", t.count);
  for (std::size_t i = 0; i < t.count; ++i) {
    const tensor_view& v = views[i];
    if (v.empty() || !(v.dims() == t.slots[i].dims) || v.type() != storage)
      throw_error("liveavatar parameter '", prefix(), t.slots[i].name, "': got ", name_of(v.type()), " ",
                  v.dims().to_string(), v.empty() ? " with no data" : "", ", declared ", name_of(storage), " ",
                  t.slots[i].dims.to_string());
  }
}
template <class Prefix>
void check_s2v_params(const wan_param_table& t, const whole_params& p, dtype storage, Prefix&& prefix) {
  check_s2v_params(t, p.views(), storage, prefix);
}
// Streamed chunks are cut from this layer's own declarations; the stream checks the read order.
template <param_source P, class Prefix>
void check_s2v_params(const wan_param_table&, const P&, dtype, Prefix&&) {}

}  // namespace unshard::detail
