#pragma once
// The parameters of each Wan sub-unit: names (Wan's state_dict names, after the layer's prefix),
// shapes, and where each sits in the sub-unit's param_views.
//
// One function per sub-unit builds a fixed-capacity table and the slot indices together, so
// parameters() (names for the gatherer) and forward() (which view is which) read one source. The
// table never allocates: forward rebuilds it to check the views it was handed.
// Order within a sub-unit is the state_dict order (a module's own parameters, then its children).
#include <array>
#include <cstddef>
#include <string>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/layer/param_source.hpp"
#include "unshard/layer/param_spec.hpp"
#include "unshard/models/wan/geometry.hpp"

namespace unshard::wan {

enum class layer_kind { embeddings, block, head };

}  // namespace unshard::wan

namespace unshard::wan::detail {

struct param_slot {
  const char* name = "";  // suffix after the layer prefix ("" for embeddings, "blocks.i.", "head.")
  shape dims;
  bool by_rows = false;   // a GEMM weight, consumed row by row (see param_spec)
};

struct param_table {
  std::array<param_slot, 16> slots{};
  std::size_t count = 0;

  std::size_t add(const char* name, shape dims, bool by_rows = false) {
    if (count == slots.size()) throw_error("wan::param_table: more than ", slots.size(), " parameters ('", name, "')");
    slots[count] = {name, dims, by_rows};
    return count++;
  }
};

struct linear_slots {
  std::size_t weight, bias;
};

// nn.Linear(in, out): weight [out, in], bias [out].
inline linear_slots add_linear(param_table& t, const char* weight, const char* bias, std::size_t out,
                                   std::size_t in) {
  const auto o = static_cast<std::int64_t>(out), i = static_cast<std::int64_t>(in);
  const std::size_t w = t.add(weight, {o, i}, true);
  return {w, t.add(bias, {o})};
}

inline constexpr std::size_t no_slot = static_cast<std::size_t>(-1);

// --- embeddings -----------------------------------------------------------------------------

struct patch_embedding_params {
  param_table table;
  linear_slots conv;  // Conv3d weight [D, C, pt, ph, pw] used as a [D, C*pt*ph*pw] matrix
};

inline patch_embedding_params patch_embedding_layout(const wan::geometry& g) {
  patch_embedding_params p;
  const auto i64 = [](std::size_t v) { return static_cast<std::int64_t>(v); };
  const std::size_t w = p.table.add("patch_embedding.weight", {i64(g.dim), i64(g.in_dim), i64(g.grid.pt),
                                                               i64(g.grid.ph), i64(g.grid.pw)}, true);
  p.conv = {w, p.table.add("patch_embedding.bias", {i64(g.dim)})};
  return p;
}

struct time_params {
  param_table table;
  linear_slots embed0, embed2, projection;
};

inline time_params time_layout(const wan::backbone_geometry& g) {
  time_params p;
  p.embed0 = add_linear(p.table, "time_embedding.0.weight", "time_embedding.0.bias", g.dim, g.freq_dim);
  p.embed2 = add_linear(p.table, "time_embedding.2.weight", "time_embedding.2.bias", g.dim, g.dim);
  p.projection = add_linear(p.table, "time_projection.1.weight", "time_projection.1.bias", 6 * g.dim, g.dim);
  return p;
}

struct text_params {
  param_table table;
  linear_slots embed0, embed2;
};

inline text_params text_layout(const wan::backbone_geometry& g) {
  text_params p;
  p.embed0 = add_linear(p.table, "text_embedding.0.weight", "text_embedding.0.bias", g.dim, g.text_dim);
  p.embed2 = add_linear(p.table, "text_embedding.2.weight", "text_embedding.2.bias", g.dim, g.dim);
  return p;
}

// --- block (prefix "blocks.i.") ---------------------------------------------------------------

struct self_attn_params {
  param_table table;
  std::size_t modulation;  // [1, 6, D]
  linear_slots q, k, v, o;
  std::size_t norm_q = no_slot, norm_k = no_slot;  // absent without qk_norm
};

inline self_attn_params self_attn_layout(const wan::geometry& g) {
  self_attn_params p;
  const auto D = static_cast<std::int64_t>(g.dim);
  p.modulation = p.table.add("modulation", {1, 6, D});
  p.q = add_linear(p.table, "self_attn.q.weight", "self_attn.q.bias", g.dim, g.dim);
  p.k = add_linear(p.table, "self_attn.k.weight", "self_attn.k.bias", g.dim, g.dim);
  p.v = add_linear(p.table, "self_attn.v.weight", "self_attn.v.bias", g.dim, g.dim);
  p.o = add_linear(p.table, "self_attn.o.weight", "self_attn.o.bias", g.dim, g.dim);
  if (g.qk_norm) {
    p.norm_q = p.table.add("self_attn.norm_q.weight", {D});
    p.norm_k = p.table.add("self_attn.norm_k.weight", {D});
  }
  return p;
}

struct cross_attn_params {
  param_table table;
  std::size_t norm3_weight = no_slot, norm3_bias = no_slot;  // absent without cross_attn_norm
  linear_slots q, k, v, o;
  std::size_t norm_q = no_slot, norm_k = no_slot;  // absent without qk_norm
};

inline cross_attn_params cross_attn_layout(const wan::geometry& g) {
  cross_attn_params p;
  const auto D = static_cast<std::int64_t>(g.dim);
  if (g.cross_attn_norm) {
    p.norm3_weight = p.table.add("norm3.weight", {D});
    p.norm3_bias = p.table.add("norm3.bias", {D});
  }
  p.q = add_linear(p.table, "cross_attn.q.weight", "cross_attn.q.bias", g.dim, g.dim);
  p.k = add_linear(p.table, "cross_attn.k.weight", "cross_attn.k.bias", g.dim, g.dim);
  p.v = add_linear(p.table, "cross_attn.v.weight", "cross_attn.v.bias", g.dim, g.dim);
  p.o = add_linear(p.table, "cross_attn.o.weight", "cross_attn.o.bias", g.dim, g.dim);
  if (g.qk_norm) {
    p.norm_q = p.table.add("cross_attn.norm_q.weight", {D});
    p.norm_k = p.table.add("cross_attn.norm_k.weight", {D});
  }
  return p;
}

struct ffn_params {
  param_table table;
  linear_slots fc0, fc2;
};

inline ffn_params ffn_layout(const wan::geometry& g) {
  ffn_params p;
  p.fc0 = add_linear(p.table, "ffn.0.weight", "ffn.0.bias", g.ffn_dim, g.dim);
  p.fc2 = add_linear(p.table, "ffn.2.weight", "ffn.2.bias", g.dim, g.ffn_dim);
  return p;
}

// --- head (prefix "head.") --------------------------------------------------------------------

struct head_params {
  param_table table;
  std::size_t modulation;  // [1, 2, D]
  linear_slots head;   // [out_dim*pt*ph*pw, D]
};

inline head_params head_layout(const wan::geometry& g) {
  head_params p;
  p.modulation = p.table.add("modulation", {1, 2, static_cast<std::int64_t>(g.dim)});
  p.head = add_linear(p.table, "head.weight", "head.bias", g.patch_out, g.dim);
  return p;
}

// --- declaration and checking -------------------------------------------------------------------

inline std::vector<param_spec> param_specs(const param_table& t, const std::string& prefix, dtype storage) {
  std::vector<param_spec> specs;
  for (std::size_t i = 0; i < t.count; ++i)
    specs.push_back({prefix + t.slots[i].name, t.slots[i].dims, storage, t.slots[i].by_rows});
  return specs;
}

// Where a parameter name starts: "" for the embeddings (their names are top-level), "blocks.i."
// and "head.".
inline std::string param_prefix(wan::layer_kind kind, std::size_t block) {
  switch (kind) {
    case wan::layer_kind::block: return "blocks." + std::to_string(block) + ".";
    case wan::layer_kind::head: return "head.";
    case wan::layer_kind::embeddings: break;
  }
  return "";
}

// The views a sub-unit was handed must be exactly what it declared (count, shapes, dtype): a
// mis-ordered gather would otherwise compute garbage silently. Allocates only to report.
inline void check_params(const param_table& t, const param_views& views, dtype storage, wan::layer_kind kind,
                             std::size_t block, const char* subunit) {
  if (views.size() != t.count)
    throw_error("wan sub-unit '", param_prefix(kind, block), subunit, "': got ", views.size(),
                " parameter views, declared ", t.count);
  for (std::size_t i = 0; i < t.count; ++i) {
    const tensor_view& v = views[i];
    if (v.empty() || !(v.dims() == t.slots[i].dims) || !holds_declared_type(v, storage, t.slots[i].by_rows))
      throw_error("wan parameter '", param_prefix(kind, block), t.slots[i].name, "': got ", name_of(v.type()), " ",
                  v.dims().to_string(), v.empty() ? " with no data" : "", ", declared ", name_of(storage), " ",
                  t.slots[i].dims.to_string());
  }
}
inline void check_params(const param_table& t, const whole_params& p, dtype storage, wan::layer_kind kind,
                             std::size_t block, const char* subunit) {
  check_params(t, p.views(), storage, kind, block, subunit);
}
// Streamed chunks are cut by the runtime from the specs this layer declared, and the stream
// itself checks the order they are read in: nothing more to check here.
template <param_source P>
void check_params(const param_table&, const P&, dtype, wan::layer_kind, std::size_t, const char*) {}

}  // namespace unshard::wan::detail
