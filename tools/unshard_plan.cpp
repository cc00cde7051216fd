// unshard-plan: will the Live Avatar stack fit, with which policy, and how fast? Per rank, term by
// term, before anything is loaded (docs/planner.md derives every term).
#include <cstdio>
#include <filesystem>
#include <map>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/cli.hpp"
#include "unshard/plan/liveavatar/ledger.hpp"

namespace {
using namespace unshard;
using namespace unshard::liveavatar;

constexpr const char* usage =
    "unshard-plan --model liveavatar-14b|CONFIG.json --world-size N --device-memory SIZE [--reserve SIZE] "
    "[--policy NAME|fsdp|auto] [--resolution WxH] [--frames N] [--device-profile NAME] [--link-profile NAME] "
    "[--profiles FILE] [--timeline FILE.json] [--json]";

constexpr double gib = 1024.0 * 1024.0 * 1024.0;

struct settings {
  stack st;
  plan_request rq;
  std::size_t budget = 0;
  std::string policy;
  std::string profiles_source;
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

stack load_model(const std::string& name) {
  if (name == "liveavatar-14b") return liveavatar_stack(liveavatar_14b());
  if (name.size() > 5 && name.substr(name.size() - 5) == ".json") return wan_stack(wan_config::load(name), name);
  throw error("unknown model '" + name + "': expected the preset liveavatar-14b or a Wan CONFIG.json");
}

settings settings_from(const cli::options& o, const std::filesystem::path& dir) {
  settings s;
  const std::string model = o.require("--model");
  s.rq.world_size = o.get_count("--world-size", 0);
  if (!o.has("--world-size")) throw cli::usage_error("missing required option --world-size");
  std::size_t memory = 0, reserve = 0;
  try {
    memory = parse_size(o.require("--device-memory"), "--device-memory");
    reserve = parse_size(o.get("--reserve", "1.85GiB"), "--reserve");
  } catch (const cli::usage_error&) {
    throw;
  } catch (const error& e) {
    throw cli::usage_error(e.what());
  }
  s.policy = o.get("--policy", "fsdp");
  if (o.has("--resolution")) s.rq.work = parse_resolution(o.get("--resolution"), s.rq.work);
  s.rq.work.frames_per_block = static_cast<count>(o.get_count("--frames", 3));
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
  if (s.rq.world_size == 0) throw error("--world-size must be at least 1 (got 0)");
  if (memory <= reserve)
    throw error("--device-memory " + o.get("--device-memory") + " is not above the reserve " + o.get("--reserve", "1.85GiB") +
                " (CUDA context and allocator): nothing left for the model");
  if (s.rq.work.frames_per_block == 0) throw error("--frames must be at least 1 (got 0)");
  validate(s.rq.work);
  s.budget = memory - reserve;
  s.st = load_model(model);
  if (s.st.causal_kv) {  // Live Avatar's causal pipeline keeps this cache on every rank
    s.rq.work.kv_cache_tokens = 13500;
    s.rq.work.cond_cache_tokens = 2800;
  }
  return s;
}

nlohmann::json to_json(const settings& s, const stack_plan& p) {
  nlohmann::json ranks = nlohmann::json::array();
  for (std::size_t r = 0; r < s.rq.world_size; ++r)  // every rank runs the same forward (CONVENTIONS.md)
    ranks.push_back({{"rank", r}, {"peak_bytes", p.peak()}, {"terms", p.terms}, {"details", p.details},
                     {"host_bytes", p.host_bytes}});
  nlohmann::json j{{"model", s.st.model}, {"world_size", s.rq.world_size}, {"budget_bytes", s.budget},
                   {"policy", p.policy},  {"fits", p.peak() <= s.budget},  {"peak_bytes", p.peak()},
                   {"ranks", ranks},      {"time_s", p.time_s},            {"device_profile", s.rq.device.name},
                   {"link_profile", s.rq.link.name}, {"profiles", s.profiles_source}};
  if (p.effective_chunk) {
    j["effective_chunk_bytes"] = p.effective_chunk;
    j["chunks_per_forward"] = p.chunks;
  }
  return j;
}

void print_text(const settings& s, const stack_plan& p, std::FILE* out) {
  std::fprintf(out, "%s, world size %zu, policy %s: peak %zu bytes (%.2f GiB) of %zu (%.2f GiB) -> %s, %.3f s per forward on %s over %s\n",
               s.st.model.c_str(), s.rq.world_size, p.policy.c_str(), p.peak(), p.peak() / gib, s.budget, s.budget / gib,
               p.peak() <= s.budget ? "fits" : "does not fit", p.time_s, s.rq.device.name.c_str(), s.rq.link.name.c_str());
  for (std::size_t r = 0; r < s.rq.world_size; ++r) {
    std::fprintf(out, "rank %zu planned_peak_bytes=%zu planned_peak_gib=%.3f", r, p.peak(), p.peak() / gib);
    for (const auto& [k, v] : p.details) std::fprintf(out, " %s=%.3fGiB", k.c_str(), v / gib);
    std::fprintf(out, " host=%.3fGiB\n", p.host_bytes / gib);
  }
  if (p.effective_chunk)
    std::fprintf(out, "effective chunk: %zu bytes (%.2f MiB), %zu chunks per forward\n", p.effective_chunk,
                 p.effective_chunk / (1024.0 * 1024.0), p.chunks);
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
  const timeline tl = simulate_forward(p.steps, time_rates::of(s.rq.device, s.rq.link), p.prefetch);
  std::map<std::string, std::size_t> constant = p.terms;
  constant.erase("gathered");
  const std::string title = s.st.model + ", " + std::to_string(s.rq.world_size) + " x " + s.rq.device.name + " (" +
                            s.rq.link.name + "), " + p.policy + ", peak " + std::to_string(p.peak()) + " of budget " +
                            std::to_string(s.budget);
  write_chrome_trace(out, tl, s.rq.world_size, constant, title);
  if (!out) throw error("--timeline: cannot write '" + path + "'");
}

int run(const cli::options& o, const std::filesystem::path& dir) {
  const settings s = settings_from(o, dir);
  const bool json = o.has("--json");
  std::FILE* text = json ? stderr : stdout;
  if (o.has("--timeline") && s.policy == "auto")
    throw cli::usage_error("--timeline draws one policy; give --policy NAME, not auto");
  if (s.policy != "auto") {
    const stack_plan p = plan_one(s, s.policy);
    print_text(s, p, text);
    if (o.has("--timeline")) write_timeline(s, p, o.get("--timeline"));
    if (json) std::printf("%s\n", to_json(s, p).dump(2).c_str());
    return 0;
  }
  std::vector<stack_plan> fits;
  for (const auto& c : auto_candidates()) {
    const stack_plan p = plan_one(s, c);
    if (p.peak() <= s.budget) fits.push_back(p);
  }
  // Fastest first; among equally fast plans the smaller peak.
  std::stable_sort(fits.begin(), fits.end(), [](const auto& a, const auto& b) {
    return a.time_s < b.time_s || (a.time_s == b.time_s && a.peak() < b.peak());
  });
  if (fits.empty()) std::fprintf(text, "no policy fits %.2f GiB per rank at world size %zu\n", s.budget / gib, s.rq.world_size);
  nlohmann::json all = nlohmann::json::array();
  for (const auto& p : fits) {
    print_text(s, p, text);
    all.push_back(to_json(s, p));
  }
  if (json) std::printf("%s\n", nlohmann::json{{"candidates", all}}.dump(2).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return unshard::cli::run_tool("unshard-plan", usage, [&] {
    const unshard::cli::options o(argc, argv,
                                  {"--model", "--world-size", "--device-memory", "--reserve", "--policy", "--resolution",
                                   "--frames", "--device-profile", "--link-profile", "--profiles", "--timeline"},
                                  {"--json"});
    return run(o, exe_dir(argv[0]));
  });
}
