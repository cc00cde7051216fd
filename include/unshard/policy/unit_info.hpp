#pragma once
#include <cstddef>

namespace unshard {

// What a residency policy may look at to decide about one unit (a layer, or one sub-unit of it).
struct unit_info {
  std::size_t index = 0;          // position of the unit in forward order
  std::size_t unit_count = 0;     // number of units in the model under this granularity
  std::size_t layer = 0;          // the layer the unit belongs to
  std::size_t layer_count = 0;
  std::size_t first_subunit = 0;  // sub-units [first_subunit, first_subunit + subunit_count) of that layer
  std::size_t subunit_count = 1;
  std::size_t gathered_bytes = 0; // bytes of its sharded parameters once gathered (padded)
  // Outside the repeated blocks, as FSDP's auto-wrap sees it (everything not wrapped in its own
  // FSDP unit falls in the root unit). A layer says so with `bool fsdp_root() const`; otherwise the
  // first and last layers (embeddings, head) are taken to be the root.
  bool root = false;
};

}  // namespace unshard
