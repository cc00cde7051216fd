#include <doctest/doctest.h>

#include <string>

#include "unshard/policy/compose.hpp"
#include "unshard/policy/chunked_unshard.hpp"
#include "unshard/policy/fp8_weights.hpp"
#include "unshard/policy/full_unshard.hpp"
#include "unshard/policy/kv_placement.hpp"
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

// What is stored (fp8 weights, the KV placement) composes with every gathering part, full included.
static_assert(policy_part<fp8_weights<>> && policy_part<kv_offload<2>> && policy_part<kv_on_device>);
static_assert(compose<fp8_weights<>>::fp8 && !compose<prefetch<1>>::fp8);
static_assert(compose<fp8_weights<>>::weight_scaling == quant::fp8_scaling::per_channel);
static_assert(compose<prefetch<1>, fp8_weights<quant::fp8_scaling::per_tensor>>::weight_scaling ==
              quant::fp8_scaling::per_tensor);
static_assert(compose<full_unshard, fp8_weights<>>::full && compose<full_unshard, fp8_weights<>, kv_offload<>>::full);
static_assert(compose<fp8_weights<>>::live_gathered_buffers == 1);  // alone it implies selective:block
static_assert(compose<kv_offload<3>>::kv_offloaded && compose<kv_offload<3>>::kv_prefetch_depth == 3);
static_assert(!compose<kv_on_device>::kv_offloaded && !compose<prefetch<1>>::kv_offloaded);
static_assert(compose<chunked<4096>, prefetch<1>, offload<>, fp8_weights<>, kv_offload<2>>::live_gathered_buffers == 2);

TEST_CASE("values_of lowers a composed policy to what the scheduler reads") {
  const auto v = values_of<sel_pf2_off>();
  CHECK(v.granularity == unshard_granularity::subunit);
  CHECK(v.prefetch_depth == 2);
  CHECK(v.offload);
  CHECK(v.ring_buffers() == 3);
  CHECK(v.name == "selective:subunit+prefetch:2+offload");
  CHECK(values_of<full_unshard>().full);
  CHECK(values_of<full_unshard>().resident_below_bytes == 0);
  CHECK(!v.fp8);
  CHECK(!v.kv_offload);
  CHECK(v.kv_prefetch == 1);
}

TEST_CASE("values_of lowers fp8_weights and the KV placement; the name ends with their terms") {
  const auto a = values_of<compose<prefetch<1>, fp8_weights<>>>();
  CHECK(a.fp8);
  CHECK(a.fp8_scaling == quant::fp8_scaling::per_channel);
  CHECK(a.name == "selective:block+prefetch:1+fp8");
  const auto b = values_of<compose<full_unshard, fp8_weights<quant::fp8_scaling::per_tensor>, kv_offload<2>>>();
  CHECK(b.full);
  CHECK(b.fp8);
  CHECK(b.fp8_scaling == quant::fp8_scaling::per_tensor);
  CHECK(b.kv_offload);
  CHECK(b.kv_prefetch == 2);
  CHECK(b.name == "full+fp8:tensor+kv:offload:2");
  const auto c = values_of<kv_offload<>>();
  CHECK(c.kv_offload);
  CHECK(c.kv_prefetch == 1);
  CHECK(!c.fp8);
  CHECK(c.name == "selective:block+kv:offload");
  const auto d = values_of<compose<offload<>, kv_on_device>>();
  CHECK(!d.kv_offload);
  CHECK(d.name == "selective:block+offload");
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

TEST_CASE("policy strings: fp8 and kv terms combine with every other term") {
  const auto f = parse_policy("fp8");
  CHECK(f.values.fp8);
  CHECK(f.values.fp8_scaling == quant::fp8_scaling::per_channel);
  CHECK(f.values.granularity == unshard_granularity::block);
  CHECK(f.values.name == "selective:block+fp8");
  CHECK(parse_policy("fp8:channel").values.fp8_scaling == quant::fp8_scaling::per_channel);
  CHECK(parse_policy("fp8:channel").values.name == "selective:block+fp8");
  const auto t = parse_policy("fp8:tensor+chunked:4KiB+offload+prefetch:2");
  CHECK(t.values.fp8);
  CHECK(t.values.fp8_scaling == quant::fp8_scaling::per_tensor);
  CHECK(t.values.chunked());
  CHECK(t.values.offload);
  CHECK(t.values.prefetch_depth == 2);
  CHECK(t.values.name == "chunked:4096+prefetch:2+offload+fp8:tensor");
  // full and fsdp combine with no gathering term, but with these.
  const auto ff = parse_policy("full+fp8");
  CHECK(ff.values.full);
  CHECK(ff.values.fp8);
  CHECK(ff.values.name == "full+fp8");
  const auto fs = parse_policy("fp8:tensor+fsdp+kv:offload:3");
  CHECK(fs.fsdp);
  CHECK(fs.values.fp8);
  CHECK(fs.values.kv_offload);
  CHECK(fs.values.kv_prefetch == 3);
  CHECK(fs.values.prefetch_depth == 1);
  CHECK(fs.values.name == "fsdp+fp8:tensor+kv:offload:3");
  for (const char* term : {"selective", "selective:subunit", "prefetch:1", "offload", "chunked:64KiB", "full", "fsdp"}) {
    CAPTURE(term);
    const auto p = parse_policy(std::string(term) + "+fp8+kv:offload");
    CHECK(p.values.fp8);
    CHECK(p.values.kv_offload);
    CHECK(parse_policy(std::string("kv:device+") + term + "+fp8:tensor").values.fp8_scaling == quant::fp8_scaling::per_tensor);
  }
  // kv: device is the default; offload prefetches K layers ahead (default 1).
  const auto kd = parse_policy("prefetch:1+kv:device");
  CHECK(!kd.values.kv_offload);
  CHECK(kd.values.kv_prefetch == 1);
  CHECK(kd.values.name == "selective:block+prefetch:1");
  const auto ko = parse_policy("kv:offload");
  CHECK(ko.values.kv_offload);
  CHECK(ko.values.kv_prefetch == 1);
  CHECK(ko.values.name == "selective:block+kv:offload");
  CHECK(parse_policy("kv:offload:4+selective:subunit").values.kv_prefetch == 4);
  CHECK(parse_policy("kv:offload:1").values.name == "selective:block+kv:offload");
  CHECK(!parse_policy("offload").values.kv_offload);
  CHECK(!parse_policy("offload").values.fp8);
  // Errors name the term.
  CHECK_THROWS_WITH_AS(parse_policy("fp8:block"), doctest::Contains("term 'fp8:block'"), error);
  CHECK_THROWS_WITH_AS(parse_policy("fp8:"), doctest::Contains("term 'fp8:'"), error);
  CHECK_THROWS_WITH_AS(parse_policy("fp8+fp8:tensor"), doctest::Contains("repeats the fp8 kind"), error);
  CHECK_THROWS_WITH_AS(parse_policy("fp8+prefetch:1+fp8"), doctest::Contains("repeats"), error);
  CHECK_THROWS_WITH_AS(parse_policy("fp16"), doctest::Contains("unknown term 'fp16'"), error);
  CHECK_THROWS_WITH_AS(parse_policy("kv:offload:0"), doctest::Contains("term 'kv:offload:0'"), error);
  CHECK_THROWS_WITH_AS(parse_policy("kv:offload:x"), doctest::Contains("term 'kv:offload:x'"), error);
  CHECK_THROWS_WITH_AS(parse_policy("kv:offload:65"), doctest::Contains("1 <= K <= 64"), error);
  CHECK_THROWS_WITH_AS(parse_policy("kv:host"), doctest::Contains("term 'kv:host'"), error);
  CHECK_THROWS_WITH_AS(parse_policy("kv"), doctest::Contains("term 'kv'"), error);
  CHECK_THROWS_WITH_AS(parse_policy("kv:device+kv:offload"), doctest::Contains("repeats the kv kind"), error);
  CHECK_THROWS_WITH_AS(parse_policy("full+fp8+prefetch:1"), doctest::Contains("'full' combines with no other term"),
                       error);
  CHECK_THROWS_WITH_AS(parse_policy("fp8+"), doctest::Contains("unknown term ''"), error);
  // The list of terms an unknown one is answered with names the new ones.
  CHECK_THROWS_WITH_AS(parse_policy("bogus"), doctest::Contains("fp8[:channel|:tensor]"), error);
  CHECK_THROWS_WITH_AS(parse_policy("bogus"), doctest::Contains("kv:offload[:K]"), error);
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
