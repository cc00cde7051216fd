#pragma once
#include <cstddef>

#include "unshard/policy/granularity.hpp"

namespace unshard {

// Chunked unshard: no whole unit is ever gathered. Each weight is brought in chunks of at most
// Bytes of whole output rows (smaller weights grouped), the GEMM computes y[:, rows] from each
// chunk as it lands, and the chunk buffer is reused: the gathered peak is (depth + 1) chunks
// whatever the model. Weights smaller than a chunk are grouped into one; 1-D parameters (biases,
// norm scales) stay resident, since a chunk's epilogue needs its slice of the bias as soon as the
// chunk lands, and so do weights under ResidentBelow (none by default).
template <std::size_t Bytes, std::size_t ResidentBelow = 0>
struct chunked_unshard {
  static_assert(Bytes > 0, "chunked_unshard<Bytes>: the chunk size must be at least 1 byte (a chunk is then one row)");
  using granularity = per_chunk<Bytes>;
  static constexpr std::size_t resident_below_bytes = ResidentBelow;
  static constexpr const char* policy_name = "chunked";
};

// The policy-string spelling: chunked<64_MiB> is `chunked:64MiB`.
template <std::size_t Bytes>
using chunked = chunked_unshard<Bytes>;

}  // namespace unshard
