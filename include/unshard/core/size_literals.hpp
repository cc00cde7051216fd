#pragma once
#include <cstddef>

// Byte-size literals for policies written as types: compose<chunked<64_MiB>, prefetch<2>>.
namespace unshard::literals {
constexpr std::size_t operator""_KiB(unsigned long long n) { return static_cast<std::size_t>(n) << 10; }
constexpr std::size_t operator""_MiB(unsigned long long n) { return static_cast<std::size_t>(n) << 20; }
constexpr std::size_t operator""_GiB(unsigned long long n) { return static_cast<std::size_t>(n) << 30; }
}  // namespace unshard::literals
