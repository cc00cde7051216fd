// unshard-launch: starts one process per rank on this node with the variables torchrun sets
// (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so programs built on
// the process or CUDA backends run the same way under it, torchrun or srun. The ranks write to
// this process's stdout and stderr. If one rank fails (non-zero exit or a signal), the others
// get a grace period to report the failure themselves (they fail naming that rank), then are
// terminated; the launcher exits 1 naming the rank that failed first and how.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "common/cli.hpp"
#include "unshard/backend/net/socket.hpp"

namespace {

constexpr const char* usage =
    "unshard-launch --nproc N [--nnodes M --node-rank K] [--master-addr HOST] [--master-port P] [--grace SECONDS]"
    " -- PROGRAM [ARGS...]\n"
    "  --nproc N        processes (ranks) on this node\n"
    "  --nnodes M       nodes in the job (default 1); run one launcher per node with its --node-rank\n"
    "  --master-addr    rank 0's host (default 127.0.0.1)\n"
    "  --master-port P  rank 0's port (default 29500; 0: a free port of this host)\n"
    "  --grace SECONDS  after a rank fails, how long the others may take to exit on their own (default 5)\n"
    "  The ranks inherit the environment: UNSHARD_TIMEOUT=SECONDS (default 300) bounds how long they wait\n"
    "  for each other to join, and for a collective that makes no progress.";

std::atomic<int> g_signal{0};
extern "C" void remember_signal(int s) { g_signal.store(s); }

struct rank_process {
  std::size_t rank = 0;
  pid_t pid = -1;
  bool running = false;
  int status = 0;
};

std::string describe_status(int status) {
  if (WIFSIGNALED(status)) {
    const int s = WTERMSIG(status);
    const char* name = sigabbrev_np(s);
    return unshard::detail::concat("was killed by signal ", s, " (SIG", name ? name : "?", ")");
  }
  return unshard::detail::concat("exited with status ", WEXITSTATUS(status));
}
bool failed(int status) { return !(WIFEXITED(status) && WEXITSTATUS(status) == 0); }

pid_t spawn(const std::vector<char*>& argv, const std::vector<std::pair<std::string, std::string>>& env) {
  const pid_t pid = ::fork();
  if (pid < 0) unshard::throw_error("fork failed: ", std::strerror(errno));
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // a launcher that dies takes its ranks with it
    for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
    ::signal(SIGINT, SIG_DFL);
    ::signal(SIGTERM, SIG_DFL);
    ::execvp(argv[0], argv.data());
    std::fprintf(stderr, "unshard-launch: cannot run '%s': %s\n", argv[0], std::strerror(errno));
    ::_exit(127);
  }
  return pid;
}

// Reaps every rank that has exited; returns how many are still running.
std::size_t reap(std::vector<rank_process>& ranks, int& first_failed) {
  std::size_t running = 0;
  std::vector<std::size_t> newly_failed;
  for (auto& r : ranks) {
    if (!r.running) continue;
    const pid_t got = ::waitpid(r.pid, &r.status, WNOHANG);
    if (got == r.pid) {
      r.running = false;
      if (failed(r.status)) newly_failed.push_back(r.rank);
    } else {
      ++running;
    }
  }
  // Ranks that fail together: one killed by a signal is the cause, the others its consequence.
  if (first_failed < 0 && !newly_failed.empty()) {
    first_failed = static_cast<int>(newly_failed.front());
    for (std::size_t i : newly_failed)
      if (WIFSIGNALED(ranks[i].status)) {
        first_failed = static_cast<int>(i);
        break;
      }
  }
  return running;
}

void signal_all(std::vector<rank_process>& ranks, int sig) {
  for (auto& r : ranks)
    if (r.running) ::kill(r.pid, sig);
}

// Waits until every rank has exited or `seconds` passed; returns how many still run.
std::size_t wait_for(std::vector<rank_process>& ranks, int& first_failed, double seconds) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  for (;;) {
    const std::size_t running = reap(ranks, first_failed);
    if (running == 0 || std::chrono::steady_clock::now() >= until) return running;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

int launch(int argc, char** argv) {
  int split = 1;
  while (split < argc && std::strcmp(argv[split], "--") != 0) ++split;
  if (split >= argc - 1) throw unshard::cli::usage_error("missing '-- PROGRAM [ARGS...]'");
  unshard::cli::options opt(split, argv, {"--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--grace"},
                            {});
  const std::size_t nproc = opt.get_count("--nproc", 0);
  if (!opt.has("--nproc")) throw unshard::cli::usage_error("missing required option --nproc");
  if (nproc == 0 || nproc > 1024) throw unshard::cli::usage_error("--nproc must be between 1 and 1024");
  const std::size_t nnodes = opt.get_count("--nnodes", 1);
  const std::size_t node_rank = opt.get_count("--node-rank", 0);
  if (nnodes == 0) throw unshard::cli::usage_error("--nnodes must be at least 1");
  if (node_rank >= nnodes) throw unshard::cli::usage_error("--node-rank must be below --nnodes");
  std::size_t port = opt.get_count("--master-port", 29500);
  if (port > 65535) throw unshard::cli::usage_error("--master-port must be a TCP port (0-65535)");
  if (port == 0 && nnodes > 1) throw unshard::cli::usage_error("--master-port 0 works on one node only");
  if (port == 0) port = unshard::net::listen_on("", 0).local_endpoint().port;  // free now; rank 0 binds it next
  const std::string addr = opt.get("--master-addr", "127.0.0.1");
  double grace = 5;
  if (opt.has("--grace")) {
    char* end = nullptr;
    const std::string g = opt.get("--grace");
    grace = std::strtod(g.c_str(), &end);
    if (g.empty() || *end || grace < 0) throw unshard::cli::usage_error("--grace needs a non-negative number of seconds");
  }

  std::vector<char*> program(argv + split + 1, argv + argc);
  program.push_back(nullptr);
  struct sigaction sa {};
  sa.sa_handler = remember_signal;
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);

  std::vector<rank_process> ranks(nproc);
  for (std::size_t i = 0; i < nproc; ++i) {
    const std::size_t rank = node_rank * nproc + i;
    ranks[i] = {i, spawn(program, {{"RANK", std::to_string(rank)},
                                   {"WORLD_SIZE", std::to_string(nnodes * nproc)},
                                   {"LOCAL_RANK", std::to_string(i)},
                                   {"LOCAL_WORLD_SIZE", std::to_string(nproc)},
                                   {"GROUP_RANK", std::to_string(node_rank)},
                                   {"MASTER_ADDR", addr},
                                   {"MASTER_PORT", std::to_string(port)}}),
                true, 0};
  }

  int first_failed = -1;
  while (reap(ranks, first_failed) > 0 && first_failed < 0) {
    if (const int s = g_signal.exchange(0)) signal_all(ranks, s);  // Ctrl-C reaches every rank once
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (first_failed < 0) return 0;

  const auto& culprit = ranks[static_cast<std::size_t>(first_failed)];
  const std::size_t global_rank = node_rank * nproc + culprit.rank;
  std::fprintf(stderr, "unshard-launch: rank %zu (pid %d) %s; stopping the other ranks\n", global_rank,
               static_cast<int>(culprit.pid), describe_status(culprit.status).c_str());
  if (wait_for(ranks, first_failed, grace) > 0) {
    signal_all(ranks, SIGTERM);
    if (wait_for(ranks, first_failed, 5) > 0) {
      signal_all(ranks, SIGKILL);
      wait_for(ranks, first_failed, 60);
    }
  }
  for (const auto& r : ranks)
    if (r.rank != culprit.rank && failed(r.status))
      std::fprintf(stderr, "unshard-launch: rank %zu %s\n", node_rank * nproc + r.rank, describe_status(r.status).c_str());
  std::fprintf(stderr, "unshard-launch: failed: rank %zu %s\n", global_rank, describe_status(culprit.status).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  return unshard::cli::run_tool("unshard-launch", usage, argc, argv, [&] { return launch(argc, argv); });
}
