#pragma once
// The adaLN modulation of a Wan sub-unit as the op set reads it (ops/op_set.hpp, modulation_rows):
// t2v has one modulation row for every token.
#include <cstddef>

#include "unshard/models/wan/geometry.hpp"
#include "unshard/ops/op_set.hpp"

namespace unshard::wan::detail {

// Chunk `chunk` (D floats) of a modulation table held in `table` ([6, D] of a block, [2, D] of the
// head), read by every token alike.
inline modulation_rows modulation(const wan::geometry& g, const float* table, std::size_t chunk) {
  return {table + chunk * g.dim, g.dim, 0};
}

}  // namespace unshard::wan::detail
