// unshard-plan: will the Live Avatar stack fit, with which policy, and how fast? Per rank, term by
// term, before anything is loaded (docs/planner.md derives every term).
#include <cstdio>
#include <filesystem>
#include <map>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/cli.hpp"
#include "unshard/backend/cuda/reserve.hpp"
#include "unshard/plan/liveavatar/ledger.hpp"
#include "unshard/plan/liveavatar/search.hpp"

namespace {
using namespace unshard;
using namespace unshard::liveavatar;

constexpr const char* usage =
    "unshard-plan --model liveavatar-14b|CONFIG.json --world-size N --device-memory SIZE [--reserve SIZE] "
    "[--policy NAME|fsdp|auto] [--schedule steps|replicated] [--steps S] [--t5 device|host] [--resolution WxH] "
    "[--frames N] [--host-memory SIZE] [--device-profile NAME] [--link-profile NAME] [--profiles FILE] "
    "[--timeline FILE.json] [--no-fp8] [--json] [--verbose]\n"
    "  --model: the preset, a Wan t2v config.json, or a Live Avatar (S2V) config (model_type s2v, or a vectors\n"
    "  config with a model section: its S2V DiT planned as Live Avatar runs the 14B)\n"
    "  --policy: terms joined by + (full|fsdp|selective[:subunit]|prefetch:K|offload|chunked:SIZE, fp8|fp8:tensor,\n"
    "  kv:device|kv:offload[:K]); fp8 plans 2-D GEMM weights at 1 byte per element plus f32 scales; kv:offload\n"
    "  keeps the KV caches in pinned host memory and streams each block's pages through K+1 device slots\n"
    "  --host-memory: caps the pinned host memory per rank (offloaded shards, caches under kv:offload); without\n"
    "  it host memory is not capped, and every plan reports what it needs (host=, \"host_bytes\")\n"
    "  --policy auto searches every weight policy, each also with fp8 weights and with the KV caches in host\n"
    "  memory (kv:offload, kv:offload:2), under both schedules (or the --schedule given); it lists the 10 fastest\n"
    "  that fit, then the best one rank by rank; --no-fp8 leaves fp8 weights out (--fp8, their inclusion, is\n"
    "  the default); --verbose prints every candidate in full; --json one document\n"
    "  time: each plan's seconds per block against the compute-bound seconds of the same forwards (x compute)";

constexpr double gib = 1024.0 * 1024.0 * 1024.0;

// Bounds that keep every byte count far inside 64 bits (a 16384x16384 video, 256 latent frames per
// block and 1000 steps on one rank still plan); well beyond any real run.
constexpr std::size_t max_steps = 1000;
constexpr count max_side = 16384, max_frames = 256;

struct settings {
  stack st;
  plan_request rq;
  std::size_t budget = 0;
  std::size_t host_budget = 0;  // --host-memory; 0: not capped
  std::string policy;
  std::string profiles_source;
  std::optional<schedule_kind> schedule;  // --schedule, when given (auto searches both otherwise)
};

// The directory of this executable, where the shipped profiles are looked for.
std::filesystem::path exe_dir(const char* argv0) {
  std::error_code ec;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) return self.parent_path();
  return std::filesystem::absolute(argv0, ec).parent_path();
}

workload parse_resolution(const std::string& text, workload w) {
  const auto x = text.find('x');
  try {
    if (x == std::string::npos) throw std::invalid_argument("no x");
    std::size_t a = 0, b = 0;
    w.width = std::stoll(text.substr(0, x), &a);
    w.height = std::stoll(text.substr(x + 1), &b);
    if (a != x || b != text.size() - x - 1) throw std::invalid_argument("trailing");
  } catch (const std::exception&) {
    throw cli::usage_error("--resolution must be WxH (e.g. 720x400), got '" + text + "'");
  }
  return w;
}

// An S2V configuration: a Live Avatar vectors config (its `model` section) or a flat one whose
// model_type is "s2v". Anything else is read as a Wan t2v config (whose reader would otherwise take
// an S2V file's missing top-level sizes as Wan's defaults and plan a model nobody asked for).
bool is_s2v_config(const nlohmann::json& j) {
  if (!j.is_object()) return false;
  if (j.contains("model")) return true;
  const auto type = j.find("model_type");
  return type != j.end() && type->is_string() && *type == "s2v";
}

stack load_model(const std::string& name) {
  if (name == "liveavatar-14b") return liveavatar_stack(liveavatar_14b());
  if (name.size() > 5 && name.substr(name.size() - 5) == ".json") {
    const nlohmann::json j = load_json_config(name, "model config");
    if (is_s2v_config(j)) return liveavatar_stack(s2v::config::from_json(j, name), name);
    return wan_stack(wan::config::from_json(j, name), name);
  }
  throw error("unknown model '" + name + "': expected the preset liveavatar-14b, a Wan CONFIG.json or a Live Avatar (S2V) CONFIG.json");
}

settings settings_from(const cli::options& o, const std::filesystem::path& dir) {
  settings s;
  const std::string model = o.require("--model");
  s.rq.world_size = o.get_count("--world-size", 0);
  if (!o.has("--world-size")) throw cli::usage_error("missing required option --world-size");
  std::size_t memory = 0, reserve = 0;
  try {
    memory = parse_size(o.require("--device-memory"), "--device-memory");
    reserve = o.has("--reserve") ? parse_size(o.get("--reserve"), "--reserve") : cuda::planned_reserve_bytes;
    if (o.has("--host-memory")) s.host_budget = parse_size(o.get("--host-memory"), "--host-memory");
  } catch (const cli::usage_error&) {
    throw;
  } catch (const error& e) {
    throw cli::usage_error(e.what());
  }
  s.policy = o.get("--policy", "fsdp");
  if (o.has("--resolution")) s.rq.work = parse_resolution(o.get("--resolution"), s.rq.work);
  s.rq.work.frames_per_block = static_cast<count>(std::min<std::size_t>(o.get_count("--frames", 3), max_frames + 1));
  s.rq.sched.steps = std::min(o.get_count("--steps", 4), max_steps + 1);
  try {
    if (o.has("--schedule")) s.schedule = parse_schedule(o.get("--schedule"));
    s.rq.t5 = parse_t5_placement(o.get("--t5", "device"));
  } catch (const error& e) {
    throw cli::usage_error(e.what());
  }
  s.rq.sched.kind = s.schedule.value_or(schedule_kind::steps);
  std::vector<std::string> user_profiles;
  if (o.has("--profiles")) user_profiles.push_back(o.get("--profiles"));
  const profile_set profiles = find_profiles(dir, user_profiles);
  s.profiles_source = profiles.source;
  // A name that no profile defines is a bad option value (exit 2); a bad file is bad input (1).
  const auto lookup = [](const char* option, auto&& find) {
    try {
      return find();
    } catch (const error& e) {
      throw cli::usage_error(std::string(option) + ": " + e.what());
    }
  };
  s.rq.device = lookup("--device-profile", [&] { return profiles.device(o.get("--device-profile", "rtx4090")); });
  s.rq.link = lookup("--link-profile", [&] { return profiles.link(o.get("--link-profile", s.rq.device.link)); });
  // Input checks (exit 1): each names the culprit.
  require_world_size(s.rq.world_size, "--world-size");
  if (s.rq.sched.steps == 0) throw error("--steps must be at least 1 (got 0)");
  if (s.rq.sched.steps > max_steps)
    throw error("--steps " + o.get("--steps") + " is above the " + std::to_string(max_steps) + " denoising steps planned");
  if (o.has("--host-memory") && s.host_budget == 0) throw error("--host-memory must be more than 0 bytes");
  if (memory <= reserve)
    throw error("--device-memory " + o.get("--device-memory") + " is not above the reserve " + o.get("--reserve", "1.85GiB (the default)") +
                " (CUDA context and allocator): nothing left for the model");
  if (s.rq.work.frames_per_block == 0) throw error("--frames must be at least 1 (got 0)");
  if (s.rq.work.frames_per_block > max_frames)
    throw error("--frames " + o.get("--frames") + " is above the " + std::to_string(max_frames) + " latent frames per block planned");
  if (s.rq.work.width > max_side || s.rq.work.height > max_side)
    throw error("--resolution " + o.get("--resolution") + " has a side above " + std::to_string(max_side) + " pixels");
  s.budget = memory - reserve;
  s.st = load_model(model);
  rendered(s.st, s.rq.work);  // refuses a size the stack cannot render, before any plan
  return s;
}

std::string size_text(count w, count h) { return std::to_string(w) + "x" + std::to_string(h); }

// What the forward computes on: the size the pipeline renders the requested one at, the tokens a
// streamed forward runs and those the cond cache holds.
void print_workload(const settings& s, const stack_plan& p, std::FILE* out) {
  const workload& w = p.work;
  std::fprintf(out, "%s: --resolution %s renders at %s (latent %lldx%lld, %lld tokens per latent frame), %lld latent frames per block: "
               "%zu streamed tokens per forward", s.st.model.c_str(), size_text(s.rq.work.width, s.rq.work.height).c_str(),
               size_text(w.width, w.height).c_str(), static_cast<long long>(w.height / 8), static_cast<long long>(w.width / 8),
               static_cast<long long>(frame_tokens(w)), static_cast<long long>(w.frames_per_block), p.streamed_tokens);
  if (p.cond_tokens)
    std::fprintf(out, ", %zu cond tokens (cached once, by the sink); KV caches: %zu noisy tokens per step, %zu cond",
                 p.cond_tokens, p.noisy_cache_slots, p.cond_cache_slots);
  std::fprintf(out, "\n");
}

std::string steps_text(const std::vector<std::size_t>& steps) {
  std::string t;
  for (std::size_t i : steps) {
    if (!t.empty()) t += ',';
    t += std::to_string(i);
  }
  return t.empty() ? "none" : t;
}

// docs/conventions.md's object, plus the schedule, the block time and what the forward computes on.
nlohmann::json to_json(const settings& s, const stack_plan& p) {
  nlohmann::json ranks = nlohmann::json::array();
  for (std::size_t r = 0; r < s.rq.world_size; ++r) {
    const rank_ledger l = p.rank(r);
    ranks.push_back({{"rank", r}, {"peak_bytes", l.peak()}, {"terms", l.terms}, {"details", l.details},
                     {"host_bytes", l.host_bytes}, {"forwards_per_tick", l.forwards}, {"cached_steps", l.cached_steps},
                     {"compute_s", p.rank_compute_s(r)}});
  }
  const bool fits = liveavatar::fits(p, s.budget, s.host_budget);
  nlohmann::json j{{"model", s.st.model}, {"world_size", s.rq.world_size}, {"budget_bytes", s.budget},
                   {"policy", p.policy},  {"fits", fits},  {"peak_bytes", p.peak()},
                   {"ranks", ranks},      {"time_s", p.time_s},            {"device_profile", s.rq.device.name},
                   {"link_profile", s.rq.link.name}, {"profiles", s.profiles_source},
                   {"schedule", name_of(p.sched.kind)}, {"steps", p.sched.steps}, {"block_s", p.block_s},
                   {"compute_s", p.compute_s}, {"compute_ratio", p.compute_ratio()},
                   {"transfers_s", {{"all_gather", p.transfers.all_gather_s}, {"shard_copy", p.transfers.shard_copy_s},
                                    {"kv_in", p.transfers.kv_in_s}, {"kv_out", p.transfers.kv_out_s}}},
                   {"host_bytes", p.host_peak()}, {"frames_per_s", p.frames_per_s}, {"t5", name_of(s.rq.t5)},
                   {"resolution", {{"requested", size_text(s.rq.work.width, s.rq.work.height)},
                                   {"rendered", size_text(p.work.width, p.work.height)},
                                   {"frames_per_block", p.work.frames_per_block}}},
                   {"streamed_tokens", p.streamed_tokens}, {"cond_tokens", p.cond_tokens}};
  if (p.effective_chunk) {
    j["effective_chunk_bytes"] = p.effective_chunk;
    j["chunks_per_forward"] = p.chunks;
  }
  if (!fits) j["why_not"] = why_not(p, s.budget, s.host_budget);
  if (s.host_budget) j["host_budget_bytes"] = s.host_budget;
  if (p.kv_offload) j["kv_prefetch"] = p.kv_prefetch;
  if (const std::string note = time_note(p); !note.empty()) j["time_note"] = note;
  return j;
}

void print_text(const settings& s, const stack_plan& p, std::FILE* out) {
  char host_text[96];
  if (s.host_budget)
    std::snprintf(host_text, sizeof host_text, "pinned host %.2f GiB of %.2f GiB", p.host_peak() / gib, s.host_budget / gib);
  else
    std::snprintf(host_text, sizeof host_text, "pinned host %.2f GiB", p.host_peak() / gib);
  std::fprintf(out, "%s, world size %zu, schedule %s (%zu steps, %zu forward%s per tick on rank 0), policy %s, umT5 on %s: "
               "peak %zu bytes (%.2f GiB) of %zu (%.2f GiB), %s -> %s; %.3f s per forward, %.3f s per block against "
               "%.3f s compute-bound (%.2fx), %.2f frames/s, on %s over %s\n",
               s.st.model.c_str(), s.rq.world_size, name_of(p.sched.kind), p.sched.steps, p.forwards_per_tick,
               p.forwards_per_tick == 1 ? "" : "s", p.policy.c_str(), name_of(s.rq.t5), p.peak(), p.peak() / gib, s.budget,
               s.budget / gib, host_text, liveavatar::fits(p, s.budget, s.host_budget) ? "fits" : "does not fit", p.time_s,
               p.block_s, p.compute_s, p.compute_ratio(), p.frames_per_s, s.rq.device.name.c_str(), s.rq.link.name.c_str());
  if (const std::string note = time_note(p); !note.empty())
    std::fprintf(out, "%.2fx compute-bound, above the %.1fx goal: %s\n", p.compute_ratio(), compute_bound_goal, note.c_str());
  if (!liveavatar::fits(p, s.budget, s.host_budget))
    std::fprintf(out, "does not fit: %s\n", why_not(p, s.budget, s.host_budget).c_str());
  for (std::size_t r = 0; r < s.rq.world_size; ++r) {
    const rank_ledger l = p.rank(r);
    std::fprintf(out, "rank %zu planned_peak_bytes=%zu planned_peak_gib=%.3f steps=%s forwards_per_tick=%zu compute_s=%.3f", r,
                 l.peak(), l.peak() / gib, steps_text(l.cached_steps).c_str(), l.forwards, p.rank_compute_s(r));
    for (const auto& [k, v] : l.details) std::fprintf(out, " %s=%.3fGiB", k.c_str(), v / gib);
    std::fprintf(out, " host=%.3fGiB\n", l.host_bytes / gib);
  }
  if (p.effective_chunk)
    std::fprintf(out, "effective chunk: %zu bytes (%.2f MiB), %zu chunks per forward\n", p.effective_chunk,
                 p.effective_chunk / (1024.0 * 1024.0), p.chunks);
}

// `auto` without --verbose: one line per candidate for the best few that fit, a count of the rest, and
// the per-rank detail of the best one (at most 60 lines for any world size up to 32).
void print_candidates(const settings& s, const std::vector<stack_plan>& fits, std::FILE* out) {
  constexpr std::size_t shown = 10;
  if (fits.empty()) return;
  std::fprintf(out, "%zu configurations fit, fastest first:\n", fits.size());
  std::fprintf(out, "  %-56s %-10s %9s %9s %5s %9s %9s %9s\n", "policy", "schedule", "peak GiB", "host GiB", "fits", "s/block",
               "x compute", "frames/s");
  for (std::size_t i = 0; i < fits.size() && i < shown; ++i) {
    const stack_plan& p = fits[i];
    std::fprintf(out, "  %-56s %-10s %9.2f %9.2f %5s %9.3f %9.2f %9.2f\n", p.policy.c_str(), name_of(p.sched.kind), p.peak() / gib,
                 p.host_peak() / gib, liveavatar::fits(p, s.budget, s.host_budget) ? "yes" : "no", p.block_s, p.compute_ratio(),
                 p.frames_per_s);
  }
  if (fits.size() > shown) std::fprintf(out, "  ... and %zu more that fit (--verbose lists every one)\n", fits.size() - shown);
  std::fprintf(out, "the best one, rank by rank:\n");
  print_text(s, fits.front(), out);
}

stack_plan plan_one(const settings& s, const std::string& text) {
  parsed_policy pol;
  try {
    pol = parse_policy(text);
  } catch (const error& e) {
    throw cli::usage_error(std::string(e.what()) + " (or auto)");
  }
  return plan_stack(s.st, pol, s.rq);
}

// The predicted timeline of one forward as Chrome trace JSON (docs/planner.md, "Timeline").
void write_timeline(const settings& s, const stack_plan& p, const std::string& path) {
  std::ofstream out(path);
  if (!out) throw error("--timeline: cannot create '" + path + "'");
  // One tick: under `steps` each gather serves the forwards of every step the rank owns.
  const timeline tl = p.tick_timeline(time_rates::of(s.rq.device, s.rq.link));
  std::vector<std::map<std::string, std::size_t>> constant;
  for (std::size_t r = 0; r < s.rq.world_size; ++r) {
    constant.push_back(p.rank(r).terms);
    constant.back().erase("gathered");
  }
  const std::string title = s.st.model + ", " + std::to_string(s.rq.world_size) + " x " + s.rq.device.name + " (" +
                            s.rq.link.name + "), " + p.policy + ", schedule " + name_of(p.sched.kind) + ", peak " +
                            std::to_string(p.peak()) + " of budget " + std::to_string(s.budget);
  write_chrome_trace(out, tl, constant, title);
  if (!out) throw error("--timeline: cannot write '" + path + "'");
}

int run(const cli::options& o, const std::filesystem::path& dir) {
  const settings s = settings_from(o, dir);
  if (o.has("--fp8") && o.has("--no-fp8")) throw cli::usage_error("--fp8 and --no-fp8 contradict each other; give one");
  const bool json = o.has("--json");
  std::FILE* text = json ? stderr : stdout;
  if (o.has("--timeline") && s.policy == "auto")
    throw cli::usage_error("--timeline draws one policy; give --policy NAME, not auto");
  if (s.policy != "auto") {
    const stack_plan p = plan_one(s, s.policy);
    print_workload(s, p, text);
    print_text(s, p, text);
    if (o.has("--timeline")) write_timeline(s, p, o.get("--timeline"));
    if (json) std::printf("%s\n", to_json(s, p).dump(2).c_str());
    return 0;
  }
  // Every policy under each schedule (only the one asked for, if any), with and without fp8 weights
  // (--no-fp8: without) and the KV caches on the device or in host memory; fastest block first.
  const auto found = plan_auto(s.st, s.rq, s.budget, schedules_to_search(s.schedule),
                               auto_options{!o.has("--no-fp8"), true, s.host_budget});
  print_workload(s, *found.closest, text);
  nlohmann::json all = nlohmann::json::array();
  for (const auto& p : found.fits) all.push_back(to_json(s, p));
  if (o.has("--verbose"))
    for (const auto& p : found.fits) print_text(s, p, text);
  else
    print_candidates(s, found.fits, text);
  nlohmann::json doc{{"candidates", all}};
  if (found.fits.empty()) {
    std::fprintf(text, "no policy fits %.2f GiB per rank at world size %zu; the smallest peak is %s under %s: %s\n",
                 s.budget / gib, s.rq.world_size, found.closest->policy.c_str(), name_of(found.closest->sched.kind),
                 why_not(*found.closest, s.budget, s.host_budget).c_str());
    doc["closest"] = to_json(s, *found.closest);
  }
  if (json) std::printf("%s\n", doc.dump(2).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return unshard::cli::run_tool("unshard-plan", usage, argc, argv, [&] {
    const unshard::cli::options o(argc, argv,
                                  {"--model", "--world-size", "--device-memory", "--reserve", "--policy", "--resolution",
                                   "--frames", "--schedule", "--steps", "--t5", "--host-memory", "--device-profile", "--link-profile",
                                   "--profiles", "--timeline"},
                                  {"--json", "--verbose", "--fp8", "--no-fp8"});
    return run(o, exe_dir(argv[0]));
  });
}
