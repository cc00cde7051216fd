#pragma once
// wan::layer: one unit of the Wan DiT as the runtime sees it -- the embeddings, a block, or the
// head -- with its sub-units, their parameters (Wan's state_dict names) and their forwards, written
// once over an op set (ops/op_set.hpp): host_ops here, cuda_ops for wan::cuda_model.
//
//   embeddings  sub-units patch_embedding | time | text_embedding
//   blocks.i    sub-units self_attn | cross_attn | ffn
//   head        sub-unit  head
#include <cstddef>
#include <string>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/layer/layer.hpp"
#include "unshard/layer/param_source.hpp"
#include "unshard/models/wan/block.hpp"
#include "unshard/models/wan/embeddings.hpp"
#include "unshard/models/wan/geometry.hpp"
#include "unshard/models/wan/head.hpp"
#include "unshard/models/wan/params.hpp"
#include "unshard/models/wan/state.hpp"
#include "unshard/ops/host_ops.hpp"
#include "unshard/ops/op_set.hpp"

namespace unshard::wan {

class layer {
 public:
  layer(wan::layer_kind kind, std::size_t block_index, const wan::geometry& geometry)
      : kind_(kind), block_(block_index), geometry_(geometry) {}

  wan::layer_kind kind() const noexcept { return kind_; }
  std::size_t block_index() const noexcept { return block_; }  // meaningful for blocks only

  std::string name() const {
    switch (kind_) {
      case wan::layer_kind::embeddings: return "embeddings";
      case wan::layer_kind::block: return "blocks." + std::to_string(block_);
      case wan::layer_kind::head: break;
    }
    return "head";
  }

  std::size_t subunit_count() const noexcept { return kind_ == wan::layer_kind::head ? 1 : 3; }

  std::string subunit_name(std::size_t sub) const { return subunit_label(sub); }

  std::vector<param_spec> parameters(std::size_t sub) const {
    return detail::param_specs(table(sub), detail::param_prefix(kind_, block_), geometry_.storage);
  }

  // Runs sub-unit `sub` on the state; params are the views of parameters(sub), in that order.
  void forward(std::size_t sub, const param_views& params, wan::state& state) const {
    whole_params whole(params);
    forward(sub, whole, state);
  }

  // The same forward over any parameter source (whole views, or chunks as they stream in), on the
  // host's ops.
  template <param_source P>
  void forward(std::size_t sub, P& params, wan::state& state) const {
    host_ops ops{geometry_.gemm};
    forward(ops, sub, params, state);
  }

  // The forward over a backend's op set (ops/op_set.hpp): the one forward every backend runs.
  template <op_set O, param_source P>
  void forward(O& ops, std::size_t sub, P& params, wan::state& state) const {
    const wan::geometry& g = geometry_;
    subunit_label(sub);  // range check; allocates only to throw
    switch (kind_) {
      case wan::layer_kind::embeddings:
        if (sub == 0) return detail::patch_embedding_forward(ops, g, params, state);
        if (sub == 1) return detail::time_forward(ops, g, params, state);
        return detail::text_embedding_forward(ops, g, params, state);
      case wan::layer_kind::block:
        if (sub == 0) return detail::self_attn_forward(ops, g, block_, params, state);
        if (sub == 1) return detail::cross_attn_forward(ops, g, block_, params, state);
        return detail::ffn_forward(ops, g, block_, params, state);
      case wan::layer_kind::head: return detail::head_forward(ops, g, params, state);
    }
  }

 private:
  // Checks the index (once, for every entry point) and names the sub-unit.
  const char* subunit_label(std::size_t sub) const {
    if (sub >= subunit_count())
      throw_error("wan layer '", name(), "': sub-unit ", sub, " out of range (", subunit_count(), " sub-units)");
    constexpr const char* embeddings[] = {"patch_embedding", "time", "text_embedding"};
    constexpr const char* block[] = {"self_attn", "cross_attn", "ffn"};
    switch (kind_) {
      case wan::layer_kind::embeddings: return embeddings[sub];
      case wan::layer_kind::block: return block[sub];
      case wan::layer_kind::head: break;
    }
    return "head";
  }

  detail::param_table table(std::size_t sub) const {
    const wan::geometry& g = geometry_;
    subunit_label(sub);
    switch (kind_) {
      case wan::layer_kind::embeddings:
        if (sub == 0) return detail::patch_embedding_layout(g).table;
        if (sub == 1) return detail::time_layout(g).table;
        return detail::text_layout(g).table;
      case wan::layer_kind::block:
        if (sub == 0) return detail::self_attn_layout(g).table;
        if (sub == 1) return detail::cross_attn_layout(g).table;
        return detail::ffn_layout(g).table;
      case wan::layer_kind::head: break;
    }
    return detail::head_layout(g).table;
  }

  wan::layer_kind kind_;
  std::size_t block_;
  wan::geometry geometry_;
};

static_assert(unshard::layer<wan::layer, wan::state>, "wan::layer must model unshard::layer over wan::state");

}  // namespace unshard::wan
