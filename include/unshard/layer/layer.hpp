#pragma once
#include <concepts>
#include <cstddef>
#include <string>
#include <vector>

#include "unshard/layer/param_spec.hpp"

namespace unshard {

// A layer: a named piece of a model with parameters and a forward over them.
//
// It is cut into one or more sub-units (a transformer block: self-attention, cross-attention,
// FFN), each with its own parameters and forward, so that a policy may unshard finer than the
// layer. Sub-units run in index order; a layer with no natural split has exactly one.
//
// `State` is the model's activation state (tensors in tracked memory); `forward` reads and writes
// it. Parameters arrive as views in the order `parameters(s)` declared them.
template <class L, class State>
concept layer = requires(const L& l, std::size_t sub, const param_views& params, State& state) {
  { l.name() } -> std::convertible_to<std::string>;
  { l.subunit_count() } -> std::convertible_to<std::size_t>;
  { l.subunit_name(sub) } -> std::convertible_to<std::string>;
  { l.parameters(sub) } -> std::convertible_to<std::vector<param_spec>>;
  { l.forward(sub, params, state) } -> std::same_as<void>;
};

}  // namespace unshard
