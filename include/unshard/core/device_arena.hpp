#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/core/memory_category.hpp"

namespace unshard {

// A fixed-capacity block of memory with first-fit sub-allocation: the host backend's stand-in for
// a GPU's memory. Its capacity is the budget, so "does not fit" is a real failure here too.
// All bookkeeping is reserved at construction: allocate/release never touch the heap.
// Memory a backend hands to an arena (a cudaMalloc region, pinned host memory): at least the
// arena's aligned capacity, released through `release` when the arena dies.
struct arena_backing {
  std::byte* base = nullptr;
  void (*release)(std::byte*) = nullptr;
};

class device_arena {
 public:
  static constexpr std::size_t max_blocks = 4096;

  // Host memory of its own (the host backend's "device").
  explicit device_arena(std::size_t capacity) : capacity_(align_up(capacity)) {
    if (capacity_ > 0) {
      base_ = static_cast<std::byte*>(std::aligned_alloc(allocation_alignment, capacity_));
      if (!base_) throw_error("device_arena: cannot reserve ", capacity_, " bytes of host memory for the arena");
      release_ = [](std::byte* p) { std::free(p); };
    }
    init_free_list();
  }
  // Memory from a backend, already reserved for at least align_up(capacity) bytes.
  device_arena(std::size_t capacity, arena_backing backing)
      : capacity_(align_up(capacity)), base_(backing.base), release_(backing.release) {
    if (capacity_ > 0 && !base_) throw_error("device_arena: the backend gave no memory for ", capacity_, " bytes");
    init_free_list();
  }
  ~device_arena() {
    if (base_ && release_) release_(base_);
  }
  device_arena(const device_arena&) = delete;
  device_arena& operator=(const device_arena&) = delete;

  std::size_t capacity() const noexcept { return capacity_; }
  std::byte* base() const noexcept { return base_; }

  // Returns nullptr when no free block is large enough (the caller names the category).
  std::byte* allocate(std::size_t bytes) noexcept {
    bytes = align_up(bytes);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->size < bytes) continue;
      std::byte* p = base_ + it->offset;
      it->offset += bytes;
      it->size -= bytes;
      if (it->size == 0) free_.erase(it);
      return p;
    }
    return nullptr;
  }

  void release(std::byte* p, std::size_t bytes) noexcept {
    bytes = align_up(bytes);
    const std::size_t off = static_cast<std::size_t>(p - base_);
    auto it = std::lower_bound(free_.begin(), free_.end(), off, [](const block& b, std::size_t o) { return b.offset < o; });
    it = free_.insert(it, {off, bytes});  // capacity reserved: no reallocation
    if (it + 1 != free_.end() && it->offset + it->size == (it + 1)->offset) {
      it->size += (it + 1)->size;
      free_.erase(it + 1);
    }
    if (it != free_.begin() && (it - 1)->offset + (it - 1)->size == it->offset) {
      (it - 1)->size += it->size;
      free_.erase(it);
    }
  }

 private:
  struct block {
    std::size_t offset;
    std::size_t size;
  };
  void init_free_list() {
    free_.reserve(max_blocks);
    if (capacity_ > 0) free_.push_back({0, capacity_});
  }

  std::size_t capacity_;
  std::byte* base_ = nullptr;
  void (*release_)(std::byte*) = nullptr;
  std::vector<block> free_;
};

}  // namespace unshard
