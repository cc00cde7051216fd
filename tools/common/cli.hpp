#pragma once
// Shared by the command-line tools: option parsing, exit codes, the per-rank peak lines.
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "unshard/core/dtype.hpp"
#include "unshard/core/error.hpp"
#include "unshard/core/memory_category.hpp"
#include "unshard/core/world_size.hpp"
#include "unshard/kernels/host/gemm.hpp"
#include "unshard/policy/parse_policy.hpp"

namespace unshard::cli {

// Exit statuses of docs/conventions.md: 1 for bad input, 2 for a usage error.
struct usage_error : error {
  using error::error;
};

// --name VALUE options and --flag switches; anything else is a usage error naming it.
class options {
 public:
  options(int argc, char** argv, const std::set<std::string>& valued, const std::set<std::string>& flags) {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (valued.count(a)) {
        if (i + 1 >= argc) throw usage_error("option " + a + " needs a value");
        values_[a] = argv[++i];
      } else if (flags.count(a)) {
        flags_.insert(a);
      } else {
        throw usage_error("unknown option '" + a + "'");
      }
    }
  }
  bool has(const std::string& k) const { return values_.count(k) || flags_.count(k); }
  std::string get(const std::string& k, const std::string& fallback = "") const {
    const auto it = values_.find(k);
    return it == values_.end() ? fallback : it->second;
  }
  std::string require(const std::string& k) const {
    if (!values_.count(k)) throw usage_error("missing required option " + k);
    return values_.at(k);
  }
  std::size_t get_count(const std::string& k, std::size_t fallback) const {
    if (!values_.count(k)) return fallback;
    const std::string& v = values_.at(k);
    char* end = nullptr;
    errno = 0;
    const unsigned long long n = std::strtoull(v.c_str(), &end, 10);
    // strtoull accepts a sign (and wraps "-1"): only digits are a count.
    if (v.empty() || v.find_first_not_of("0123456789") != std::string::npos || *end != '\0')
      throw usage_error("option " + k + " needs a non-negative integer, got '" + v + "'");
    if (errno == ERANGE || n > std::numeric_limits<std::size_t>::max())
      throw usage_error("option " + k + " is out of range: '" + v + "'");
    return static_cast<std::size_t>(n);
  }

 private:
  std::map<std::string, std::string> values_;
  std::set<std::string> flags_;
};

// The options every sharded model tool takes, read into its settings in this order: --world-size
// (at least 1), --policy (default prefetch:1), --budget, and the model's --dtype (f32 or bf16)
// and --gemm (blas by default, or portable). A bad value is a usage error naming the option.
template <class Settings>
  requires requires(Settings& s) {
    s.world_size = std::size_t{};
    s.policy = parsed_policy{};
    s.budget = std::size_t{};
    s.model_options.storage = dtype::f32;
    s.model_options.gemm = gemm_path::blas;
  }
void read_sharding_options(const options& o, Settings& s) {
  s.world_size = o.get_count("--world-size", 1);
  try {
    require_world_size(s.world_size, "--world-size");
  } catch (const error& e) {
    throw usage_error(e.what());
  }
  try {
    s.policy = parse_policy(o.get("--policy", "prefetch:1"));
    if (o.has("--budget")) s.budget = parse_size(o.get("--budget"), "--budget");
  } catch (const error& e) {
    throw usage_error(e.what());
  }
  // session_options reads a budget of 0 as "none": on the command line that is leaving --budget out.
  if (o.has("--budget") && s.budget == 0)
    throw usage_error("--budget " + o.get("--budget") + " is 0 bytes; leave --budget out to run without a budget");
  const std::string dt = o.get("--dtype", "f32");
  if (dt != "f32" && dt != "bf16") throw usage_error("--dtype must be f32 or bf16, got '" + dt + "'");
  s.model_options.storage = dt == "bf16" ? dtype::bf16 : dtype::f32;
  const std::string g = o.get("--gemm", "blas");
  if (g != "portable" && g != "blas") throw usage_error("--gemm must be portable or blas, got '" + g + "'");
  s.model_options.gemm = g == "blas" ? gemm_path::blas : gemm_path::portable;
}

// --help or -h among a tool's own arguments (before a "--" that starts another program's).
inline bool asks_for_help(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--") return false;
    if (a == "--help" || a == "-h") return true;
  }
  return false;
}

// Runs a tool body, mapping exceptions to the exit statuses; never lets one escape. --help prints
// the usage on stdout and exits 0.
template <class Body>
int run_tool(const char* tool, const char* usage, int argc, char** argv, Body body) {
  if (asks_for_help(argc, argv)) {
    std::printf("usage: %s\n", usage);
    return 0;
  }
  use_one_blas_thread_per_rank();
  try {
    return body();
  } catch (const usage_error& e) {
    std::fprintf(stderr, "%s: %s\nusage: %s\n", tool, e.what(), usage);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", tool, e.what());
    return 1;
  }
}

// "rank R planned_peak_bytes=N measured_peak_bytes=M ..." once per rank, on stdout.
template <class Session>
void print_rank_peaks(const Session& s) {
  for (std::size_t r = 0; r < s.world_size(); ++r) {
    const auto& planned = s.plan().ranks[r];
    const auto measured = s.measured(r);
    std::printf("rank %zu planned_peak_bytes=%zu measured_peak_bytes=%zu planned_peak_gib=%.4f", r, planned.peak(),
                measured.peak_bytes, static_cast<double>(planned.peak()) / (1ull << 30));
    for (auto c : all_memory_categories)
      std::printf(" %s=%zu", std::string(name_of(c)).c_str(), planned.terms[c]);
    std::printf(" host_bytes=%zu", planned.host_bytes);
    if (s.plan().effective_chunk_bytes) std::printf(" effective_chunk_bytes=%zu", s.plan().effective_chunk_bytes);
    if constexpr (requires { s.runtime(r).bytes_gathered(); })
      std::printf(" bytes_gathered=%zu forwards=%zu", s.runtime(r).bytes_gathered(), s.runtime(r).forwards());
    std::printf("\n");
  }
}

}  // namespace unshard::cli
