#include <doctest/doctest.h>

#include "unshard/policy/compose.hpp"
#include "unshard/policy/full_unshard.hpp"
#include "unshard/policy/offload.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/policy/prefetch.hpp"
#include "unshard/policy/selective_unshard.hpp"

using namespace unshard;

// What is known at compile time is checked at compile time.
using sel_pf2_off = compose<selective_unshard<per_subunit>, prefetch<2>, offload<pinned_host>>;
static_assert(policy<sel_pf2_off>);
static_assert(sel_pf2_off::live_gathered_buffers == 3);
static_assert(sel_pf2_off::placement::offloaded);
static_assert(std::is_same_v<sel_pf2_off::granularity, per_subunit>);
static_assert(compose<prefetch<1>>::live_gathered_buffers == 2);  // alone it implies selective:block
static_assert(std::is_same_v<compose<prefetch<1>>::granularity, per_block>);
static_assert(compose<offload<>>::live_gathered_buffers == 1);
static_assert(compose<full_unshard>::full && compose<full_unshard>::live_gathered_buffers == 0);
static_assert(compose<prefetch<1>, offload<>>::prefetch_depth == compose<offload<>, prefetch<1>>::prefetch_depth,
              "terms compose in any order");
static_assert(!policy_part<int>);

TEST_CASE("values_of lowers a composed policy to what the scheduler reads") {
  const auto v = values_of<sel_pf2_off>();
  CHECK(v.granularity == unshard_granularity::subunit);
  CHECK(v.prefetch_depth == 2);
  CHECK(v.offload);
  CHECK(v.ring_buffers() == 3);
  CHECK(v.name == "selective:subunit+prefetch:2+offload");
  CHECK(values_of<full_unshard>().full);
  CHECK(values_of<full_unshard>().resident_below_bytes == 0);
}

TEST_CASE("policy strings follow the conventions' grammar") {
  CHECK(parse_policy("full").values.full);
  const auto p = parse_policy("offload+prefetch:2");
  CHECK(p.values.offload);
  CHECK(p.values.prefetch_depth == 2);
  CHECK(p.values.name == "selective:block+prefetch:2+offload");
  CHECK(parse_policy("prefetch:1+selective:subunit").values.granularity == unshard_granularity::subunit);
  CHECK(parse_policy("chunked:4KiB+prefetch:1").chunk_bytes == 4096u);
  CHECK(parse_policy("fsdp").fsdp);
  CHECK_THROWS_WITH_AS(parse_policy("selective+bogus"), doctest::Contains("unknown term 'bogus'"), error);
  CHECK_THROWS_WITH_AS(parse_policy("prefetch:0"), doctest::Contains("term 'prefetch:0'"), error);
  CHECK_THROWS_WITH_AS(parse_policy("prefetch:x"), doctest::Contains("term 'prefetch:x'"), error);
  CHECK_THROWS_WITH_AS(parse_policy("offload+offload"), doctest::Contains("repeats"), error);
  CHECK_THROWS_WITH_AS(parse_policy("full+prefetch:1"), doctest::Contains("'full' combines with no other term"), error);
  CHECK_THROWS_WITH_AS(parse_policy(""), doctest::Contains("invalid policy"), error);
  CHECK_THROWS_WITH_AS(parse_policy("prefetch:1+"), doctest::Contains("unknown term ''"), error);
}

TEST_CASE("sizes: KiB/MiB/GiB are powers of two, KB/MB/GB powers of ten") {
  CHECK(parse_size("4096") == 4096);
  CHECK(parse_size("4KiB") == 4096);
  CHECK(parse_size("1.5MiB") == 1572864);
  CHECK(parse_size("24GiB") == 24ull << 30);
  CHECK(parse_size("2GB") == 2000000000ull);
  CHECK(parse_size("10B") == 10);
  CHECK_THROWS_WITH_AS(parse_size("12XB"), doctest::Contains("unknown unit 'XB'"), error);
  CHECK_THROWS_WITH_AS(parse_size("MiB"), doctest::Contains("invalid size 'MiB'"), error);
  CHECK_THROWS_WITH_AS(parse_size("1.2.3MiB"), doctest::Contains("invalid size"), error);
}
