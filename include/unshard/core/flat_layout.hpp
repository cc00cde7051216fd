#pragma once
#include <cstddef>
#include <span>
#include <utility>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/core/memory_category.hpp"
#include "unshard/core/tensor_view.hpp"
#include "unshard/core/param_spec.hpp"
#include "unshard/core/world_size.hpp"

namespace unshard {

// Where one parameter sits in a flat buffer.
struct flat_entry {
  std::size_t offset = 0;  // bytes from the start of the flat buffer
  std::size_t bytes = 0;
};

// A unit's parameters packed into one flat buffer, each at an aligned offset, the total padded so
// it splits into `world_size` equal contiguous shards; rank r owns bytes [r*shard, (r+1)*shard).
// After an all-gather of the shards into a buffer of padded_bytes(), every parameter is a view at
// its offset: there is no concatenation step. Shards are multiples of the alignment, so an
// element never straddles two ranks.
class flat_layout {
 public:
  flat_layout() = default;
  flat_layout(std::span<const param_spec> params, std::size_t world_size, std::size_t alignment = allocation_alignment)
      : world_size_(world_size), alignment_(alignment) {
    require_world_size(world_size, "flat_layout");
    std::size_t offset = 0;
    for (const auto& p : params) {
      p.dims.validate("parameter '" + p.name + "'", size_of(p.type));
      offset = align_up(offset, alignment);
      entries_.push_back({offset, p.bytes()});
      offset += p.bytes();
    }
    used_bytes_ = offset;
    shard_bytes_ = align_up((used_bytes_ + world_size - 1) / world_size, alignment);
  }

  std::size_t world_size() const noexcept { return world_size_; }
  std::size_t size() const noexcept { return entries_.size(); }
  const flat_entry& entry(std::size_t i) const noexcept { return entries_[i]; }
  std::size_t used_bytes() const noexcept { return used_bytes_; }
  std::size_t shard_bytes() const noexcept { return shard_bytes_; }
  std::size_t padded_bytes() const noexcept { return shard_bytes_ * world_size_; }

  // Byte range [first, second) of the flat buffer owned by `rank`.
  std::pair<std::size_t, std::size_t> shard_range(std::size_t rank) const noexcept {
    return {rank * shard_bytes_, (rank + 1) * shard_bytes_};
  }

  // Views of every parameter inside a flat buffer holding this layout (gathered or resident).
  void views_into(std::byte* base, std::span<const param_spec> params, std::vector<tensor_view>& out) const {
    for (std::size_t i = 0; i < entries_.size(); ++i) out.emplace_back(base + entries_[i].offset, params[i].type, params[i].dims);
  }

 private:
  std::size_t world_size_ = 1;
  std::size_t alignment_ = allocation_alignment;
  std::vector<flat_entry> entries_;
  std::size_t used_bytes_ = 0;
  std::size_t shard_bytes_ = 0;
};

}  // namespace unshard
