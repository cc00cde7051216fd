#pragma once
// Session options as the sharded tests state them: a policy string (docs/conventions.md) at a world size.
#include <cstddef>
#include <string_view>

#include "unshard/policy/parse_policy.hpp"
#include "unshard/runtime/session.hpp"

namespace unshard::testing {

inline session_options sharded_options(std::string_view policy, std::size_t world_size) {
  session_options opt;
  opt.world_size = world_size;
  opt.policy = parse_policy(policy).values;
  return opt;
}

}  // namespace unshard::testing
