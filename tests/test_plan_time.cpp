// The planner's time model, profiles, chunked plans and predicted timeline: schedules worked out by
// hand, the shipped profiles file, user profiles, and the Live Avatar chunked and fsdp plans.
#include <doctest/doctest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <unistd.h>

#include "unshard/plan/liveavatar/ledger.hpp"
#include "unshard/plan/profiles.hpp"
#include "unshard/plan/time_model.hpp"

using namespace unshard;
using namespace unshard::liveavatar;

namespace {
const std::string data_dir = UNSHARD_TEST_DATA_DIR;
const std::string shipped_profiles = data_dir + "/../../data/profiles.json";

std::string message_of(auto&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

std::string write_temp(const std::string& name, const std::string& text) {
  const auto dir = std::filesystem::temp_directory_path() / ("unshard_test_plan_time_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto p = (dir / name).string();
  std::ofstream(p) << text;
  return p;
}

// 1 FLOP/s, 1 byte/s, 0.5 s per collective: times are FLOPs and bytes read as seconds.
constexpr time_rates unit_rates{1.0, 1.0, 0.5, 1.0, 0.0};

stack_plan live_avatar(const std::string& policy, std::size_t world = 5,
                       schedule_kind schedule = schedule_kind::steps) {
  plan_request rq;
  rq.world_size = world;
  rq.sched = {schedule, 4};
  return plan_stack(liveavatar_stack(liveavatar_14b()), parse_policy(policy), rq);
}

// The largest stacked memory counter of one rank in a Chrome trace.
std::size_t trace_peak(const nlohmann::json& trace, std::size_t rank) {
  std::size_t peak = 0;
  for (const auto& e : trace["traceEvents"]) {
    if (e["ph"] != "C" || e["pid"] != rank) continue;
    std::size_t total = 0;
    for (const auto& [k, v] : e["args"].items()) total += v.get<std::size_t>();
    peak = std::max(peak, total);
  }
  return peak;
}
}  // namespace

TEST_CASE("profiles: the shipped data/profiles.json is what the built-in fallback holds") {
  const profile_set file = load_profiles(shipped_profiles), builtin = builtin_profiles();
  REQUIRE(file.devices().size() == builtin.devices().size());
  REQUIRE(file.links().size() == builtin.links().size());
  for (const auto& d : builtin.devices()) {
    CAPTURE(d.name);
    const device_profile& f = file.device(d.name);
    CHECK(f.sustained_flops == d.sustained_flops);
    CHECK(f.h2d_bytes_s == d.h2d_bytes_s);
    CHECK(f.link == d.link);
  }
  for (const auto& l : builtin.links()) {
    CAPTURE(l.name);
    CHECK(file.link(l.name).bus_bytes_s == l.bus_bytes_s);
    CHECK(file.link(l.name).latency_s == l.latency_s);
  }
  // Found beside an executable in <src>/<build>/bin, as the tool looks for it.
  const auto exe_dir = std::filesystem::path(data_dir) / ".." / ".." / "build-x" / "bin";
  CHECK(find_profiles(exe_dir).source.find("data/profiles.json") != std::string::npos);
  CHECK(find_profiles("/nonexistent/bin").source == "built-in defaults");
}

TEST_CASE("profiles: a user file adds devices and links and replaces those it names") {
  const std::string user = write_temp("mine.json", R"({"devices": [
      {"name": "rtx4090", "sustained_flops": 80e12, "h2d_bytes_s": 20e9, "link": "pcie4-no-p2p"},
      {"name": "l40s", "sustained_flops": 180e12, "h2d_bytes_s": 25e9, "link": "pcie4-p2p", "note": "mine"}],
    "links": [{"name": "pcie4-p2p", "bus_bytes_s": 20e9, "latency_s": 30e-6}]})");
  const profile_set p = find_profiles("/nonexistent/bin", {user});
  CHECK(p.device("rtx4090").sustained_flops == 80e12);  // replaced
  CHECK(p.device("h100").sustained_flops == 600e12);    // kept
  CHECK(p.device("l40s").link == "pcie4-p2p");
  CHECK(p.link("pcie4-p2p").latency_s == 30e-6);
  CHECK(p.source == "built-in defaults + " + user);
}

TEST_CASE("profiles: bad files and unknown names are refused, naming the file, entry and key") {
  const auto bad = [](const std::string& name, const std::string& text) {
    return message_of([&] { load_profiles(write_temp(name, text), nullptr); });
  };
  CHECK(bad("a.json", R"({"devices": [{"name": "x", "h2d_bytes_s": 1, "link": "l"}], "links": [{"name": "l", "bus_bytes_s": 1, "latency_s": 0}]})")
            .find("a.json': devices[0] ('x'): missing \"sustained_flops\"") != std::string::npos);
  CHECK(bad("b.json", R"({"links": [{"name": "l", "bus_bytes_s": -4, "latency_s": 0}]})")
            .find("b.json': links[0] ('l'): \"bus_bytes_s\" is -4, must be > 0") != std::string::npos);
  CHECK(bad("c.json", R"({"devices": [{"name": "x", "sustained_flops": 1, "h2d_bytes_s": 1, "link": "nowhere"}]})")
            .find("device 'x' names link 'nowhere', which no profile defines") != std::string::npos);
  CHECK(bad("d.json", R"({"devices": 3})").find("\"devices\" is not an array") != std::string::npos);
  CHECK(bad("e.json", "{oops").find("e.json': invalid JSON") != std::string::npos);
  CHECK(bad("f.json", R"({"gpus": []})").find("has neither \"devices\" nor \"links\"") != std::string::npos);
  CHECK(message_of([] { load_profiles("/nonexistent/p.json"); }) == "cannot open profiles file '/nonexistent/p.json'");
  CHECK(message_of([] { builtin_profiles().device("rtx9090"); }) ==
        "unknown device profile 'rtx9090' (known: rtx4090, h100, h800; profiles from built-in defaults)");
}

TEST_CASE("time model: schedules worked out by hand") {
  // Three steps of 2 s compute, each gathering 1 byte (1 s + 0.5 s latency), buffers of 10 bytes.
  const std::vector<step_cost> steps{{"a", 2, 1, 0, 10, false}, {"b", 2, 1, 0, 10, false}, {"c", 2, 1, 0, 10, false}};
  SUBCASE("no prefetch: gather, then compute, in turn") {
    const timeline t = simulate_forward(steps, unit_rates, 0);
    CHECK(t.total_s == doctest::Approx(3 * (1.5 + 2)));
    CHECK(t.peak_gathered == 10);
  }
  SUBCASE("prefetch:1: the gather of step i+1 runs under the compute of step i") {
    const timeline t = simulate_forward(steps, unit_rates, 1);
    CHECK(t.total_s == doctest::Approx(1.5 + 3 * 2));
    CHECK(t.peak_gathered == 20);  // two buffers live: K + 1
    // gather b starts at 1.5 (when a's landed and compute a started), before compute a ends at 3.5
    double gather_b = -1, compute_a_end = -1;
    for (const auto& s : t.spans) {
      if (s.name == "gather b") gather_b = s.begin;
      if (s.name == "compute a") compute_a_end = s.end;
    }
    CHECK(gather_b == doctest::Approx(1.5));
    CHECK(gather_b < compute_a_end);
    CHECK(t.frees.size() == 3);
  }
  SUBCASE("transfer-bound: prefetch hides compute instead") {
    const std::vector<step_cost> slow{{"a", 1, 3, 0, 8, false}, {"b", 1, 3, 0, 8, false}};
    CHECK(forward_seconds(slow, unit_rates, 1) == doctest::Approx(3.5 + 3.5 + 1));
    CHECK(forward_seconds(slow, unit_rates, 0) == doctest::Approx(2 * (3.5 + 1)));
  }
  SUBCASE("a kept buffer stays live to the end; steps without gathers just compute") {
    const std::vector<step_cost> s{{"root", 0, 1, 0, 100, true}, {"pre", 1, 0, 0, 0, false}, {"blk", 2, 1, 0, 10, false}};
    const timeline t = simulate_forward(s, unit_rates, 1);
    CHECK(t.peak_gathered == 110);
    // root lands at 1.5; blk's gather follows on the same stream (1.5 to 3), only partly under pre (1.5 to 2.5)
    CHECK(t.total_s == doctest::Approx(1.5 + 1.5 + 2));
    CHECK(t.frees.size() == 1);
  }
  SUBCASE("offload: the host-to-device copy precedes the gather on the same stream") {
    const std::vector<step_cost> s{{"a", 1, 1, 2, 4, false}};
    CHECK(forward_seconds(s, unit_rates, 0) == doctest::Approx(2 + 1.5 + 1));
  }
}

TEST_CASE("time model: KV pages on the copy stream, issued kv_prefetch paged layers ahead, rows written back after") {
  // Three paged layers without weight gathers: a computes 4 s, b and c 1 s; each page takes 2 s to
  // copy in (1 B/s), each write-back 1 s. Pages go on the one in-order stream; a write-back waits for
  // its layer's compute.
  const auto layers = [](double out) {
    return std::vector<step_cost>{{"a", 4, 0, 0, 0, false, 2, out}, {"b", 1, 0, 0, 0, false, 2, out},
                                  {"c", 1, 0, 0, 0, false, 2, out}};
  };
  SUBCASE("kv:offload:2 hides the third page under a's long compute; kv:offload:1 cannot") {
    // K=1: pages a [0,2], b [2,4]; a computes [2,6]; c's page is issued when compute reaches b (its
    // slot held a's page until then): [6,8]; b [6,7]; c waits for its page: [8,9].
    CHECK(forward_seconds(layers(0), unit_rates, 0, 1) == doctest::Approx(9));
    // K=2: all three pages at the start, [0,2], [2,4], [4,6]; a [2,6], b [6,7], c [7,8].
    CHECK(forward_seconds(layers(0), unit_rates, 0, 2) == doctest::Approx(8));
  }
  SUBCASE("write-backs: after each layer's compute, ahead of the copies issued later") {
    // K=1: pages a [0,2], b [2,4]; a [2,6]; a's rows back [6,7]; c's page, issued at 6, queues behind
    // them: [7,9]; b [6,7]; b's rows back [9,10]; c [9,10]; c's rows back [10,11]: the forward ends when
    // the last write-back has landed.
    const timeline k1 = simulate_forward(layers(1), unit_rates, 0, 1);
    CHECK(k1.total_s == doctest::Approx(11));
    std::map<std::string, std::pair<double, double>> at;
    for (const auto& sp : k1.spans) at[sp.name] = {sp.begin, sp.end};
    CHECK(at.at("kv in c").first == doctest::Approx(7));
    CHECK(at.at("kv out a").first == doctest::Approx(6));
    CHECK(at.at("kv out b").first == doctest::Approx(9));
    CHECK(at.at("compute c").first == doctest::Approx(9));
    // K=2: pages [0,2], [2,4], [4,6]; a [2,6], rows back [6,7]; b [6,7], [7,8]; c [7,8], [8,9].
    CHECK(forward_seconds(layers(1), unit_rates, 0, 2) == doctest::Approx(9));
    const stream_load l = stream_load_of(layers(1), unit_rates);
    CHECK(l.kv_in_s == doctest::Approx(6));
    CHECK(l.kv_out_s == doctest::Approx(3));
    CHECK(l.all_gather_s == 0);
    CHECK(compute_seconds(layers(1), unit_rates) == doctest::Approx(6));
  }
  SUBCASE("weights and pages share the stream: a step's gathers are issued before its pages") {
    // Two steps of 2 s, each gathering 1 byte (1.5 s with the latency) one ahead, each a paged layer
    // with a 1 s page. At the start: gathers a [0,1.5], b [1.5,3], then pages a [3,4], b [4,5];
    // a computes [4,6], b [6,8]. Without pages: 1.5 + 2 + 2.
    const std::vector<step_cost> s{{"a", 2, 1, 0, 10, false, 1, 0}, {"b", 2, 1, 0, 10, false, 1, 0}};
    CHECK(forward_seconds(s, unit_rates, 1, 1) == doctest::Approx(8));
    const std::vector<step_cost> plain{{"a", 2, 1, 0, 10, false}, {"b", 2, 1, 0, 10, false}};
    CHECK(forward_seconds(plain, unit_rates, 1, 1) == doctest::Approx(5.5));
    const stream_load l = stream_load_of(s, unit_rates);
    CHECK(l.all_gather_s == doctest::Approx(3));
    CHECK(l.kv_in_s == doctest::Approx(2));
  }
  SUBCASE("a write-back delays the gathers issued after it") {
    // No prefetch, K_kv = 1. a: gather [0,1.5], pages a [1.5,2.5] and b [2.5,3.5], compute [2.5,4.5],
    // rows back [4.5,5.5]; b's gather, issued at 4.5, starts after them: [5.5,7]; b [7,9], rows back [9,10].
    const std::vector<step_cost> s{{"a", 2, 1, 0, 10, false, 1, 1}, {"b", 2, 1, 0, 10, false, 1, 1}};
    CHECK(forward_seconds(s, unit_rates, 0, 1) == doctest::Approx(10));
    // Without write-backs b's gather starts at 4.5: [4.5,6], b [6,8].
    const std::vector<step_cost> no_out{{"a", 2, 1, 0, 10, false, 1, 0}, {"b", 2, 1, 0, 10, false, 1, 0}};
    CHECK(forward_seconds(no_out, unit_rates, 0, 1) == doctest::Approx(8));
  }
  SUBCASE("without paged layers the KV depth changes nothing") {
    const std::vector<step_cost> s{{"a", 2, 1, 0, 10, false}, {"b", 1, 3, 0, 10, false}, {"c", 2, 1, 0, 10, false}};
    for (const std::size_t k : {0, 1, 2}) {
      CAPTURE(k);
      CHECK(forward_seconds(s, unit_rates, k, 1) == forward_seconds(s, unit_rates, k, 2));
      CHECK(forward_seconds(s, unit_rates, k, 5) == forward_seconds(s, unit_rates, k));
    }
  }
}

TEST_CASE("chunked plans: effective chunk, gathered term, per-chunk latency, auto searches sizes") {
  const stack st = liveavatar_stack(liveavatar_14b());
  // The widest row: ffn.2's 13824 in-features, bf16.
  CHECK(st.widest_row == 13824);
  const stack_plan c64 = live_avatar("chunked:64MiB+prefetch:1");
  CHECK(c64.effective_chunk == 64u << 20);
  CHECK(c64.terms.at("gathered") == 2 * (64u << 20));
  const stack_plan c64k3 = live_avatar("chunked:64MiB+prefetch:3");
  CHECK(c64k3.terms.at("gathered") == 4 * (64u << 20));
  const stack_plan row = live_avatar("chunked:1B+prefetch:2");  // smaller than a row: one row
  CHECK(row.effective_chunk == 13824 * 2);
  CHECK(row.terms.at("gathered") == 3 * 13824 * 2);
  // Chunks per forward: every unit in ceil(bytes / chunk) pieces.
  std::size_t want_chunks = 0;
  for (const auto& u : st.units) want_chunks += (static_cast<std::size_t>(u.params) * 2 + (64u << 20) - 1) / (64u << 20);
  CHECK(c64.chunks == want_chunks);
  // Each chunk pays the link latency: on a link with 1 ms per collective, small chunks cost more.
  plan_request rq;
  rq.world_size = 5;
  rq.link.latency_s = 1e-3;
  const auto t = [&](const char* pol) { return plan_stack(st, parse_policy(pol), rq).time_s; };
  CHECK(t("chunked:16MiB+prefetch:1") > t("chunked:256MiB+prefetch:1"));
  const double latency_share = (plan_stack(st, parse_policy("chunked:16MiB"), rq).time_s -
                                plan_stack(st, parse_policy("chunked:16MiB"), plan_request{5, rq.work}).time_s);
  CHECK(latency_share == doctest::Approx(plan_stack(st, parse_policy("chunked:16MiB"), rq).chunks * (1e-3 - 40e-6)));
  // The predicted live gathered bytes never exceed the planned gathered term.
  const timeline tl = simulate_forward(c64.steps, time_rates::of(rq.device, rq.link), c64.prefetch);
  CHECK(tl.peak_gathered == c64.terms.at("gathered"));
  // auto: every candidate parses, and chunk sizes from 16 MiB to 1 GiB are among them.
  std::size_t chunked = 0;
  for (const auto& c : auto_candidates()) {
    CAPTURE(c);
    CHECK_NOTHROW(parse_policy(c));
    chunked += c.starts_with("chunked:") ? 1 : 0;
  }
  CHECK(chunked == 4 * 3 * 2);
}

TEST_CASE("the predicted fsdp timeline on 5 x 4090: root kept, blocks one ahead, its peak is the plan's") {
  const stack_plan p = live_avatar("fsdp");
  const timeline tl = simulate_forward(p.steps, time_rates::of(plan_request{}.device, plan_request{}.link), p.prefetch);
  CHECK(tl.peak_gathered == p.terms.at("gathered"));  // root + two blocks
  CHECK(tl.spans.front().name == "gather root");
  CHECK(tl.total_s == doctest::Approx(p.time_s));
  CHECK(tl.frees.size() == 40);  // every block is freed after use; the root is not
  const stack_plan pf = live_avatar("prefetch:1");
  const timeline tp = simulate_forward(pf.steps, time_rates::of(plan_request{}.device, plan_request{}.link), pf.prefetch);
  CHECK(tp.peak_gathered <= pf.terms.at("gathered"));
  // Chrome trace: metadata, spans on two threads, memory counters, for every rank.
  std::ostringstream os;
  std::map<std::string, std::size_t> constant = p.terms;
  constant.erase("gathered");
  write_chrome_trace(os, tl, 5, constant, "fsdp");
  const nlohmann::json j = nlohmann::json::parse(os.str());
  std::size_t spans = 0, counters = 0, pids = 0;
  std::size_t max_total = 0;
  for (const auto& e : j["traceEvents"]) {
    spans += e["ph"] == "X" ? 1 : 0;
    pids += e["ph"] == "M" && e["name"] == "process_name" ? 1 : 0;
    if (e["ph"] == "C") {
      ++counters;
      std::size_t total = 0;
      for (const auto& [k, v] : e["args"].items()) total += v.get<std::size_t>();
      max_total = std::max(max_total, total);
    }
  }
  CHECK(pids == 5);
  CHECK(spans == 5 * tl.spans.size());
  CHECK(counters == 5 * tl.gathered_live.size());
  CHECK(max_total == p.peak());  // the memory curve reaches the planned peak
}

TEST_CASE("the predicted tick under steps: one pass of gathers serves every forward; each rank's memory curve") {
  // W = 2, S = 4: rank 0 runs steps 0 and 2 each tick, so each chunk computes twice before it is freed.
  const stack_plan p = live_avatar("chunked:64MiB+prefetch:1", 2);
  const time_rates rates = time_rates::of(plan_request{}.device, plan_request{}.link);
  const timeline tick = simulate_forward(p.tick_steps(), rates, p.prefetch);
  CHECK(tick.total_s == doctest::Approx(p.block_s));
  CHECK(tick.peak_gathered == p.terms.at("gathered"));  // the same K+1 chunk buffers
  const timeline one = simulate_forward(p.steps, rates, p.prefetch);
  CHECK(one.total_s == doctest::Approx(p.time_s));
  std::size_t gathers_tick = 0, gathers_one = 0;
  for (const auto& s : tick.spans) gathers_tick += s.lane == timeline_lane::comm ? 1 : 0;
  for (const auto& s : one.spans) gathers_one += s.lane == timeline_lane::comm ? 1 : 0;
  CHECK(gathers_tick == gathers_one);
  // W = 5: rank 4 holds no cache; each rank's counter peaks at its own planned peak.
  const stack_plan q = live_avatar("fsdp", 5);
  std::vector<std::map<std::string, std::size_t>> constant;
  for (std::size_t r = 0; r < 5; ++r) {
    constant.push_back(q.rank(r).terms);
    constant.back().erase("gathered");
  }
  std::ostringstream os;
  write_chrome_trace(os, simulate_forward(q.tick_steps(), rates, q.prefetch), constant, "fsdp, steps");
  const nlohmann::json j = nlohmann::json::parse(os.str());
  for (std::size_t r = 0; r < 5; ++r) {
    CAPTURE(r);
    CHECK(trace_peak(j, r) == q.rank(r).peak());
  }
  CHECK(trace_peak(j, 4) < trace_peak(j, 0));
}

TEST_CASE("cache sizes a workload overrides: the official pipelines' 13,500 + 2,800 slots") {
  plan_request rq;
  rq.world_size = 5;
  rq.work.kv_cache_tokens = 13500;
  rq.work.cond_cache_tokens = 2800;
  const stack_plan p = plan_stack(liveavatar_stack(liveavatar_14b()), parse_policy("fsdp"), rq);
  CHECK(p.details.at("kv_cache.noisy") == 40ull * 13500 * 5120 * 2 * 2);
  CHECK(p.details.at("kv_cache.cond") == 40ull * 2800 * 5120 * 2 * 2);
  CHECK(p.streamed_tokens == 3168);  // the forward itself does not change
}
