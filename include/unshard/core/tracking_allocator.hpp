#pragma once
#include <array>
#include <cstddef>
#include <limits>
#include <mutex>
#include <span>
#include <string>
#include <utility>

#include "unshard/core/device_arena.hpp"
#include "unshard/core/error.hpp"
#include "unshard/core/memory_category.hpp"

namespace unshard {

class tracking_allocator;

// One tracked block; returns its bytes to the allocator when destroyed.
class allocation {
 public:
  allocation() = default;
  allocation(tracking_allocator* owner, std::byte* p, std::size_t bytes, memory_category c)
      : owner_(owner), data_(p), bytes_(bytes), category_(c) {}
  allocation(allocation&& o) noexcept { swap(o); }
  allocation& operator=(allocation&& o) noexcept {
    allocation tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  allocation(const allocation&) = delete;
  allocation& operator=(const allocation&) = delete;
  ~allocation();

  std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return bytes_; }
  std::span<std::byte> span() const noexcept { return {data_, bytes_}; }
  memory_category category() const noexcept { return category_; }

 private:
  void swap(allocation& o) noexcept {
    std::swap(owner_, o.owner_);
    std::swap(data_, o.data_);
    std::swap(bytes_, o.bytes_);
    std::swap(category_, o.category_);
  }
  tracking_allocator* owner_ = nullptr;
  std::byte* data_ = nullptr;
  std::size_t bytes_ = 0;
  memory_category category_ = memory_category::activations;
};

// Byte counts per category: what the ledger plans and what the allocator measures.
struct category_bytes {
  std::array<std::size_t, memory_category_count> bytes{};

  std::size_t& operator[](memory_category c) noexcept { return bytes[static_cast<std::size_t>(c)]; }
  std::size_t operator[](memory_category c) const noexcept { return bytes[static_cast<std::size_t>(c)]; }
  std::size_t total() const noexcept {
    std::size_t t = 0;
    for (auto b : bytes) t += b;
    return t;
  }
  std::string to_string() const {
    std::string s;
    for (auto c : all_memory_categories) {
      if (!s.empty()) s += ", ";
      s += std::string(name_of(c)) + "=" + std::to_string((*this)[c]);
    }
    return s;
  }
};

// Per-rank allocator for one memory space: every byte the runtime allocates goes through here,
// counted by category; the peak is the high-water mark of the total. A cap (the planned peak in
// tests, the budget in tools) turns an overshoot into an out_of_memory naming the category.
class tracking_allocator {
 public:
  tracking_allocator(std::string space_name, std::size_t capacity, std::string owner = "")
      : space_(std::move(space_name)), owner_(std::move(owner)), arena_(capacity), cap_(capacity) {}
  // Over memory a backend provides (device memory, pinned host memory).
  tracking_allocator(std::string space_name, std::size_t capacity, std::string owner, arena_backing backing)
      : space_(std::move(space_name)), owner_(std::move(owner)), arena_(capacity, backing), cap_(capacity) {}

  allocation allocate(std::size_t bytes, memory_category c) {
    const std::size_t rounded = align_up(bytes == 0 ? 1 : bytes);
    std::lock_guard lock(mutex_);
    if (current_.total() + rounded > cap_)
      throw out_of_memory(detail::concat(owner_, space_, ": allocating ", rounded, " bytes of ", name_of(c),
                                         " would exceed the cap of ", cap_, " bytes (in use: ", current_.to_string(),
                                         ")"));
    std::byte* p = arena_.allocate(rounded);
    if (!p)
      throw out_of_memory(detail::concat(owner_, space_, ": ", rounded, " bytes of ", name_of(c),
                                         " do not fit in one free block of the arena (in use: ",
                                         current_.to_string(), ")"));
    current_[c] += rounded;
    peak_[c] = std::max(peak_[c], current_[c]);
    if (current_.total() > peak_total_) {
      peak_total_ = current_.total();
      at_peak_ = current_;
    }
    return allocation(this, p, rounded, c);
  }

  void release(std::byte* p, std::size_t bytes, memory_category c) noexcept {
    std::lock_guard lock(mutex_);
    arena_.release(p, bytes);
    current_[c] -= bytes;
  }

  // Lower the cap (never above the arena's capacity): tests cap at the planned peak.
  void set_cap(std::size_t cap) noexcept { cap_ = std::min(cap, arena_.capacity()); }

  std::size_t current(memory_category c) const {
    std::lock_guard lock(mutex_);
    return current_[c];
  }
  std::size_t peak(memory_category c) const {
    std::lock_guard lock(mutex_);
    return peak_[c];
  }
  std::size_t current_total() const {
    std::lock_guard lock(mutex_);
    return current_.total();
  }
  std::size_t peak_total() const {
    std::lock_guard lock(mutex_);
    return peak_total_;
  }
  // The per-category composition of the peak total (not the per-category peaks).
  category_bytes at_peak() const {
    std::lock_guard lock(mutex_);
    return at_peak_;
  }
  const std::string& space() const noexcept { return space_; }

 private:
  std::string space_;
  std::string owner_;
  device_arena arena_;
  std::size_t cap_;
  mutable std::mutex mutex_;
  category_bytes current_{}, peak_{}, at_peak_{};
  std::size_t peak_total_ = 0;
};

inline allocation::~allocation() {
  if (owner_) owner_->release(data_, bytes_, category_);
}

}  // namespace unshard
