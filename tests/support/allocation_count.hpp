#pragma once
// A process-wide count of operator new, so a test can show that a forward allocates nothing.
//
// This header replaces the global operator new and delete: include it from exactly one source
// file of a test executable (a replacement may be defined once per program and not inline).
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>

namespace unshard::testing {
inline std::atomic<std::size_t> allocation_count{0};
}  // namespace unshard::testing

// GCC 12 pairs the inlined malloc of this replacement with the free below and warns, wrongly.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void* operator new(std::size_t n) {
  unshard::testing::allocation_count.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#pragma GCC diagnostic pop
