#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <set>

#include "unshard/core/dtype.hpp"
#include "unshard/core/flat_layout.hpp"
#include "unshard/core/tracking_allocator.hpp"

using namespace unshard;

namespace {
// Reference RNE to bf16 via double arithmetic on the exact value.
std::uint16_t bf16_reference(float f) {
  if (std::isnan(f)) return 0x7fc0;
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  const std::uint16_t down = static_cast<std::uint16_t>(u >> 16);
  const std::uint16_t up = static_cast<std::uint16_t>(down + 1);
  const double d = f, lo = bf16_bits_to_float(down), hi = bf16_bits_to_float(up);
  const double dl = std::fabs(d - lo), dh = std::fabs(hi - d);
  if (dl < dh) return down;
  if (dh < dl) return up;
  return (down & 1) ? up : down;
}
}  // namespace

TEST_CASE("bf16 rounds to nearest, ties to even") {
  CHECK(float_to_bf16_bits(1.0f) == 0x3f80);
  CHECK(bf16_bits_to_float(float_to_bf16_bits(1.0f + 1.0f / 256)) == 1.0f);               // tie -> even (down)
  CHECK(bf16_bits_to_float(float_to_bf16_bits(1.0f + 3.0f / 256)) == 1.0f + 4.0f / 256);  // tie -> even (up)
  CHECK(float_to_bf16_bits(std::numeric_limits<float>::infinity()) == 0x7f80);
  CHECK(std::isnan(bf16_bits_to_float(float_to_bf16_bits(std::nanf("")))));
  std::uint32_t state = 12345;
  for (int i = 0; i < 200000; ++i) {
    state = state * 1664525u + 1013904223u;
    float f;
    std::memcpy(&f, &state, 4);
    if (std::isnan(f) || std::isinf(f) || std::fabs(f) > 3e38f) continue;
    REQUIRE(float_to_bf16_bits(f) == bf16_reference(f));
  }
}

TEST_CASE("f16 conversion is exact both ways on every f16 value and rounds ties to even") {
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const float f = f16_bits_to_float(static_cast<std::uint16_t>(h));
    if (std::isnan(f)) continue;
    REQUIRE(float_to_f16_bits(f) == h);
  }
  CHECK(f16_bits_to_float(0x3c00) == 1.0f);
  CHECK(f16_bits_to_float(0x0001) == std::ldexp(1.0f, -24));                        // smallest subnormal
  CHECK(float_to_f16_bits(std::ldexp(1.0f, -25)) == 0x0000);                        // tie to even: 0
  CHECK(float_to_f16_bits(std::ldexp(3.0f, -25)) == 0x0002);                        // 1.5 ulp -> 2
  CHECK(float_to_f16_bits(65504.0f) == 0x7bff);
  CHECK(float_to_f16_bits(65520.0f) == 0x7c00);                                     // rounds to inf
  CHECK(float_to_f16_bits(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);                 // tie -> even
  CHECK(float_to_f16_bits(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);
}

TEST_CASE("shape validation names the culprit") {
  CHECK_THROWS_WITH_AS(shape({4, 0, 3}).validate("tensor 'w'"), doctest::Contains("tensor 'w': dimension 1 is 0"),
                       error);
  CHECK_THROWS_WITH_AS(shape({1 << 30, 1 << 30, 1 << 30}).validate("tensor 'big'", 4),
                       doctest::Contains("overflows"), error);
  CHECK_NOTHROW(shape({2, 3}).validate("ok", 4));
}

TEST_CASE("flat layout: equal contiguous shards covering every parameter, for any world size") {
  const std::vector<param_spec> params{{"a", {3, 5}, dtype::f32}, {"b", {7}, dtype::bf16}, {"c", {100, 3}, dtype::f32}};
  for (std::size_t n : {1, 2, 3, 4, 5, 7, 8, 16}) {
    CAPTURE(n);
    flat_layout l(params, n);
    CHECK(l.padded_bytes() == l.shard_bytes() * n);
    CHECK(l.padded_bytes() >= l.used_bytes());
    CHECK(l.shard_bytes() % allocation_alignment == 0);
    for (std::size_t i = 0; i < params.size(); ++i) {
      CHECK(l.entry(i).offset % allocation_alignment == 0);
      CHECK(l.entry(i).bytes == params[i].bytes());
      if (i) CHECK(l.entry(i).offset >= l.entry(i - 1).offset + l.entry(i - 1).bytes);
    }
    CHECK(l.shard_range(n - 1).second == l.padded_bytes());
  }
  CHECK_THROWS_WITH_AS(flat_layout(params, 0), doctest::Contains("world size must be at least 1"), error);
  const std::vector<param_spec> bad{{"blocks.0.w", {4, 0}, dtype::f32}};
  CHECK_THROWS_WITH_AS(flat_layout(bad, 2), doctest::Contains("parameter 'blocks.0.w'"), error);
}

TEST_CASE("tracking allocator counts by category, records the peak and refuses an overshoot") {
  tracking_allocator a("device", 4096, "rank 3 ");
  {
    auto x = a.allocate(100, memory_category::shards);
    CHECK(x.size() == 256);
    auto y = a.allocate(1000, memory_category::gathered);
    CHECK(a.current(memory_category::gathered) == 1024);
    CHECK(a.peak_total() == 1280);
    CHECK_THROWS_WITH_AS(a.allocate(4096, memory_category::activations),
                         doctest::Contains("rank 3 device: allocating 4096 bytes of activations would exceed"),
                         out_of_memory);
  }
  CHECK(a.current_total() == 0);
  CHECK(a.peak_total() == 1280);
  CHECK(a.at_peak()[memory_category::shards] == 256);
  // Freed blocks coalesce: the whole capacity is usable again in one piece.
  auto z = a.allocate(4096, memory_category::workspace);
  CHECK(z.data() != nullptr);
  a.set_cap(1024);
  CHECK_THROWS_AS(a.allocate(1, memory_category::workspace), out_of_memory);
}
