#pragma once
#include <array>
#include <cstddef>
#include <string_view>

namespace unshard {

// What a tracked byte is for. The ledger's terms and the tracking allocator's counters use the
// same names, so a planned term can always be compared with a measured one.
enum class memory_category : std::size_t { shards, resident, gathered, activations, workspace, kv_cache };
inline constexpr std::size_t memory_category_count = 6;

inline constexpr std::array<memory_category, memory_category_count> all_memory_categories{
    memory_category::shards,      memory_category::resident,  memory_category::gathered,
    memory_category::activations, memory_category::workspace, memory_category::kv_cache};

constexpr std::string_view name_of(memory_category c) noexcept {
  constexpr std::array<std::string_view, memory_category_count> names{"shards",      "resident",  "gathered",
                                                                      "activations", "workspace", "kv_cache"};
  return names[static_cast<std::size_t>(c)];
}

// Every tracked block is rounded to this many bytes (the CUDA allocation granularity for
// vectorised access); the ledger rounds identically, so planned == measured, not "about".
inline constexpr std::size_t allocation_alignment = 256;

constexpr std::size_t align_up(std::size_t n, std::size_t a = allocation_alignment) noexcept {
  return (n + a - 1) / a * a;
}

}  // namespace unshard
