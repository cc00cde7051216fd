#pragma once
// Where this process sits in a job, read from the variables launchers already set: torchrun's
// RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; under Slurm (srun
// without torchrun) SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID stand in for the first three.
// MASTER_ADDR and MASTER_PORT are always needed (Slurm scripts export them, as for PyTorch).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>

#include "unshard/core/world_size.hpp"
#include "unshard/core/error.hpp"

namespace unshard::net {

struct launch_env {
  std::size_t rank = 0;
  std::size_t world_size = 1;
  std::size_t local_rank = 0;        // selects the GPU on a node
  std::size_t local_world_size = 1;  // processes on this node; 0 when the launcher does not say
  std::string master_addr;
  std::uint16_t master_port = 0;
  std::string source;                // "torchrun" or "slurm": which variables were read
  // Where rank 0 listens for the rendezvous; 0: MASTER_PORT. Under torchrun with
  // TORCHELASTIC_USE_AGENT_STORE=True, torchrun's agent already serves its TCPStore on
  // MASTER_PORT, so the next port is used; UNSHARD_RENDEZVOUS_PORT overrides both.
  std::uint16_t rendezvous_port = 0;
  // UNSHARD_TIMEOUT (whole seconds, 1 to 86400): how long joining, and a collective with no
  // progress, may wait before the job aborts naming the late rank; 0: the options' default (300 s).
  std::size_t timeout_s = 0;

  std::uint16_t listen_port() const noexcept { return rendezvous_port ? rendezvous_port : master_port; }
};

// Looks a variable up; nullptr when unset. Tests pass a map instead of the real environment.
using env_lookup = std::function<const char*(const char*)>;

inline env_lookup process_environment() {
  return [](const char* name) -> const char* { return std::getenv(name); };
}
inline env_lookup environment_from(const std::map<std::string, std::string>& vars) {
  return [&vars](const char* name) -> const char* {
    const auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  };
}

namespace detail {
// A decimal count: digits only (no sign, no spaces, no suffix), no overflow.
inline std::size_t parse_count(const char* name, const char* text) {
  const std::string s = text;
  if (s.empty()) throw_error("environment variable ", name, " is empty; it must be a non-negative integer");
  std::size_t v = 0;
  for (const char c : s) {
    if (c < '0' || c > '9') throw_error("environment variable ", name, "='", s, "' is not a non-negative integer");
    const std::size_t next = v * 10 + static_cast<std::size_t>(c - '0');
    if (next / 10 != v) throw_error("environment variable ", name, "='", s, "' is out of range");
    v = next;
  }
  return v;
}

inline std::size_t required_count(const env_lookup& env, const char* name, const char* instead_of = nullptr) {
  const char* v = env(name);
  if (!v) {
    if (instead_of) throw_error("environment variable ", name, " is not set (nor ", instead_of, ")");
    throw_error("environment variable ", name, " is not set");
  }
  return parse_count(name, v);
}
}  // namespace detail

// Reads and checks the launch variables; every missing or malformed one is an error naming it.
inline launch_env read_launch_env(const env_lookup& env = process_environment()) {
  launch_env e;
  const bool torchrun = env("RANK") != nullptr || env("SLURM_PROCID") == nullptr;
  const char* rank_var = torchrun ? "RANK" : "SLURM_PROCID";
  const char* world_var = torchrun ? "WORLD_SIZE" : "SLURM_NTASKS";
  const char* local_var = torchrun ? "LOCAL_RANK" : "SLURM_LOCALID";
  e.source = torchrun ? "torchrun" : "slurm";
  e.rank = detail::required_count(env, rank_var, torchrun ? "SLURM_PROCID" : nullptr);
  e.world_size = detail::required_count(env, world_var);
  require_world_size(e.world_size, std::string("environment variable ") + world_var);
  if (e.rank >= e.world_size)
    throw_error("environment variable ", rank_var, "=", e.rank, " is not below ", world_var, "=", e.world_size);
  e.local_rank = detail::required_count(env, local_var);
  if (torchrun) {
    e.local_world_size = detail::required_count(env, "LOCAL_WORLD_SIZE");
  } else {
    // Slurm states the tasks per node only when asked for a fixed count: 0 means unknown.
    const char* per_node = env("LOCAL_WORLD_SIZE") ? "LOCAL_WORLD_SIZE" : "SLURM_NTASKS_PER_NODE";
    e.local_world_size = env(per_node) ? detail::parse_count(per_node, env(per_node)) : 0;
  }
  if (e.local_world_size != 0) {
    const char* lws = torchrun || env("LOCAL_WORLD_SIZE") ? "LOCAL_WORLD_SIZE" : "SLURM_NTASKS_PER_NODE";
    if (e.local_world_size > e.world_size)
      throw_error("environment variable ", lws, "=", e.local_world_size, " exceeds ", world_var, "=", e.world_size);
    if (e.local_rank >= e.local_world_size)
      throw_error("environment variable ", local_var, "=", e.local_rank, " is not below ", lws, "=",
                  e.local_world_size);
  }
  const char* addr = env("MASTER_ADDR");
  if (!addr) throw_error("environment variable MASTER_ADDR is not set");
  if (!*addr) throw_error("environment variable MASTER_ADDR is empty");
  e.master_addr = addr;
  const char* port = env("MASTER_PORT");
  if (!port) throw_error("environment variable MASTER_PORT is not set");
  const std::size_t p = detail::parse_count("MASTER_PORT", port);
  if (p == 0 || p > 65535) throw_error("environment variable MASTER_PORT=", p, " is not a TCP port (1-65535)");
  e.master_port = static_cast<std::uint16_t>(p);
  if (const char* own = env("UNSHARD_RENDEZVOUS_PORT")) {
    const std::size_t q = detail::parse_count("UNSHARD_RENDEZVOUS_PORT", own);
    if (q == 0 || q > 65535)
      throw_error("environment variable UNSHARD_RENDEZVOUS_PORT=", q, " is not a TCP port (1-65535)");
    e.rendezvous_port = static_cast<std::uint16_t>(q);
  } else if (const char* agent = env("TORCHELASTIC_USE_AGENT_STORE"); agent && std::string(agent) == "True") {
    if (p == 65535)
      throw_error("MASTER_PORT=65535 is torchrun's store, and no port follows it: set UNSHARD_RENDEZVOUS_PORT");
    e.rendezvous_port = static_cast<std::uint16_t>(p + 1);
  }
  if (const char* t = env("UNSHARD_TIMEOUT")) {
    e.timeout_s = detail::parse_count("UNSHARD_TIMEOUT", t);
    if (e.timeout_s == 0 || e.timeout_s > 86400)
      throw_error("environment variable UNSHARD_TIMEOUT=", e.timeout_s, " is not a timeout in seconds (1-86400)");
  }
  return e;
}

}  // namespace unshard::net
