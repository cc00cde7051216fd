#pragma once
#include <cstddef>

namespace unshard {

// Granularity: what one unit of unsharding is. Empty tags, picked by type.
struct per_block {      // a whole layer (a transformer block) is gathered at once
  static constexpr const char* name = "block";
};
struct per_subunit {    // each declared sub-unit (attention, FFN, ...) is gathered on its own
  static constexpr const char* name = "subunit";
};

// Below the parameter: a unit's weights stream in chunks of at most Bytes (at least one whole
// weight row), and its linear layers compute each chunk's output columns as the chunk lands.
template <std::size_t Bytes>
struct per_chunk {
  static constexpr const char* name = "chunk";
  static constexpr std::size_t chunk_bytes = Bytes;
};

template <class G>
inline constexpr bool is_granularity = false;
template <>
inline constexpr bool is_granularity<per_block> = true;
template <>
inline constexpr bool is_granularity<per_subunit> = true;
template <std::size_t Bytes>
inline constexpr bool is_granularity<per_chunk<Bytes>> = Bytes > 0;

template <class G>
inline constexpr bool is_chunk_granularity = false;
template <std::size_t Bytes>
inline constexpr bool is_chunk_granularity<per_chunk<Bytes>> = true;

}  // namespace unshard
