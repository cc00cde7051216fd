#pragma once
namespace unshard {

// Granularity: what one unit of unsharding is. Empty tags, picked by type.
struct per_block {      // a whole layer (a transformer block) is gathered at once
  static constexpr const char* name = "block";
};
struct per_subunit {    // each declared sub-unit (attention, FFN, ...) is gathered on its own
  static constexpr const char* name = "subunit";
};

template <class G>
inline constexpr bool is_granularity = false;
template <>
inline constexpr bool is_granularity<per_block> = true;
template <>
inline constexpr bool is_granularity<per_subunit> = true;

}  // namespace unshard
