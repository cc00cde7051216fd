#pragma once
// s2v::layer: one unit of CausalWanModel_S2V as the runtime sees it, with its sub-units:
//
//   embeddings           patch_embedding | time | text_embedding
//   frame_packer         proj | proj_2x | proj_4x
//   cond_encoder         cond_encoder (with trainable_cond_mask)
//   audio_encoder        conv1 | conv2 | conv3 | final_linear      (casual_audio_encoder.*)
//   blocks.i             self_attn | cross_attn | ffn
//   audio_injector.j     adain | attn                              (after blocks.audio_inject_layers[j])
//   head                 head
//
// Every part of the model outside the blocks is a unit of its own, so a policy places and streams
// the audio injectors and the encoders like any block instead of keeping one root lump gathered.
#include <cstddef>
#include <string>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/layer/layer.hpp"
#include "unshard/layer/param_source.hpp"
#include "unshard/models/liveavatar/forward.hpp"
#include "unshard/models/liveavatar/geometry.hpp"
#include "unshard/models/liveavatar/params.hpp"
#include "unshard/models/liveavatar/state.hpp"
#include "unshard/ops/host_ops.hpp"
#include "unshard/ops/op_set.hpp"

namespace unshard::s2v {

class layer {
 public:
  // `index`: the block number of a block, the injector number of an injector; `block`: the block an
  // injector follows.
  layer(s2v::layer_kind kind, std::size_t index, std::size_t block, const s2v::geometry& geometry)
      : kind_(kind), index_(index), block_(block), geometry_(geometry) {}

  s2v::layer_kind kind() const noexcept { return kind_; }
  std::size_t index() const noexcept { return index_; }
  // Part of Live Avatar's FSDP root unit (everything outside `blocks`, kept gathered for the whole
  // forward under the `fsdp` policy), as opposed to one FSDP unit per block.
  bool fsdp_root() const noexcept { return kind_ != s2v::layer_kind::block; }

  std::string name() const {
    switch (kind_) {
      case s2v::layer_kind::embeddings: return "embeddings";
      case s2v::layer_kind::frame_packer: return "frame_packer";
      case s2v::layer_kind::cond_encoder: return "cond_encoder";
      case s2v::layer_kind::audio_encoder: return "audio_encoder";
      case s2v::layer_kind::block: return "blocks." + std::to_string(index_);
      case s2v::layer_kind::injector: return "audio_injector." + std::to_string(index_);
      case s2v::layer_kind::head: break;
    }
    return "head";
  }

  std::size_t subunit_count() const noexcept {
    switch (kind_) {
      case s2v::layer_kind::embeddings:
      case s2v::layer_kind::frame_packer:
      case s2v::layer_kind::block: return 3;
      case s2v::layer_kind::audio_encoder: return 4;
      case s2v::layer_kind::injector: return 2;
      case s2v::layer_kind::cond_encoder:
      case s2v::layer_kind::head: break;
    }
    return 1;
  }

  std::string subunit_name(std::size_t sub) const { return label(sub); }

  std::vector<param_spec> parameters(std::size_t sub) const {
    return detail::param_specs(table(sub), prefix(sub), geometry_.storage);
  }

  void forward(std::size_t sub, const param_views& views, s2v::state& s) const {
    whole_params p(views);
    forward(sub, p, s);
  }

  // The same forward over any parameter source (whole views, or weight chunks as they land), on
  // the host's ops.
  template <param_source P>
  void forward(std::size_t sub, P& p, s2v::state& s) const {
    host_ops ops{geometry_.gemm, s.kv_widen};
    forward(ops, sub, p, s);
  }

  // The forward over a backend's op set (ops/op_set.hpp): the one forward every backend runs.
  template <op_set O, param_source P>
  void forward(O& ops, std::size_t sub, P& p, s2v::state& s) const {
    const s2v::geometry& g = geometry_;
    label(sub);  // range check
    switch (kind_) {
      case s2v::layer_kind::embeddings:
        if (sub == 0) return detail::patch_forward(ops, g, p, s);
        if (sub == 1) return detail::time_forward(ops, g, p, s);
        return detail::text_forward(ops, g, p, s);
      case s2v::layer_kind::frame_packer: return detail::pack_forward(ops, g, sub, p, s);
      case s2v::layer_kind::cond_encoder: return detail::cond_forward(ops, g, p, s);
      case s2v::layer_kind::audio_encoder: return detail::audio_forward(ops, g, sub, p, s);
      case s2v::layer_kind::block:
        if (sub == 0) return detail::self_attn_forward(ops, g, index_, p, s);
        if (sub == 1) return detail::cross_attn_forward(ops, g, index_, p, s);
        return detail::ffn_forward(ops, g, index_, p, s);
      case s2v::layer_kind::injector:
        if (sub == 0) return detail::adain_forward(ops, g, index_, p, s);
        return detail::injector_attn_forward(ops, g, index_, block_, p, s);
      case s2v::layer_kind::head: return detail::head_forward(ops, g, p, s);
    }
  }

  // The parameter names of sub-unit `sub` start with this.
  std::string prefix(std::size_t sub) const {
    switch (kind_) {
      case s2v::layer_kind::frame_packer: return "frame_packer.";
      case s2v::layer_kind::audio_encoder: return "casual_audio_encoder.";
      case s2v::layer_kind::block: return "blocks." + std::to_string(index_) + ".";
      case s2v::layer_kind::injector:
        return sub == 0 ? "audio_injector.injector_adain_layers." + std::to_string(index_) + "."
                        : "audio_injector.injector." + std::to_string(index_) + ".";
      case s2v::layer_kind::head: return "head.";
      case s2v::layer_kind::embeddings:
      case s2v::layer_kind::cond_encoder: break;
    }
    return "";
  }

 private:
  const char* label(std::size_t sub) const {
    if (sub >= subunit_count())
      throw_error("liveavatar layer '", name(), "': sub-unit ", sub, " out of range (", subunit_count(), " sub-units)");
    constexpr const char* embeddings[] = {"patch_embedding", "time", "text_embedding"};
    constexpr const char* packer[] = {"proj", "proj_2x", "proj_4x"};
    constexpr const char* audio[] = {"conv1", "conv2", "conv3", "final_linear"};
    constexpr const char* block[] = {"self_attn", "cross_attn", "ffn"};
    constexpr const char* injector[] = {"adain", "attn"};
    switch (kind_) {
      case s2v::layer_kind::embeddings: return embeddings[sub];
      case s2v::layer_kind::frame_packer: return packer[sub];
      case s2v::layer_kind::cond_encoder: return "cond_encoder";
      case s2v::layer_kind::audio_encoder: return audio[sub];
      case s2v::layer_kind::block: return block[sub];
      case s2v::layer_kind::injector: return injector[sub];
      case s2v::layer_kind::head: break;
    }
    return "head";
  }

  wan::detail::param_table table(std::size_t sub) const {
    const s2v::geometry& g = geometry_;
    label(sub);
    switch (kind_) {
      case s2v::layer_kind::embeddings:
        if (sub == 0) return detail::patch_layout(g).table;
        if (sub == 1) return wan::detail::time_layout(g).table;
        return wan::detail::text_layout(g).table;
      case s2v::layer_kind::frame_packer: return detail::pack_layout(g, sub).table;
      case s2v::layer_kind::cond_encoder: return detail::cond_layout(g).table;
      case s2v::layer_kind::audio_encoder: return detail::audio_layout(g, sub).table;
      case s2v::layer_kind::block:
        if (sub == 0) return detail::self_attn_layout(g).table;
        if (sub == 1) return detail::cross_attn_layout(g).table;
        return detail::ffn_layout(g).table;
      case s2v::layer_kind::injector:
        if (sub == 0) return detail::adain_layout(g).table;
        return detail::injector_attn_layout(g).table;
      case s2v::layer_kind::head: break;
    }
    return detail::head_layout(g).table;
  }

  s2v::layer_kind kind_;
  std::size_t index_, block_;
  s2v::geometry geometry_;
};

static_assert(unshard::layer<s2v::layer, s2v::state>, "s2v::layer must model unshard::layer over s2v::state");

}  // namespace unshard::s2v
