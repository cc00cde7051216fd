// The replaced operators below pair malloc with free; GCC cannot see that and warns.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
// The process backend: ranks are real processes (fork, or re-exec under unshard-launch) joined on
// loopback with the bootstrap code the NCCL path uses. Every result is produced in the rank
// processes and checked here, in the parent.
#include <doctest/doctest.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include "unshard/backend/host/host_stream.hpp"
#include "unshard/backend/net/file_exchange.hpp"
#include "unshard/backend/net/launch_env.hpp"
#include "unshard/backend/net/rendezvous.hpp"
#include "unshard/backend/process/process_world.hpp"
#include "toy_layer/toy_model.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/runtime/process_session.hpp"
#include "unshard/runtime/reference_forward.hpp"

// A process-wide count of heap allocations (as in test_runtime): shows that a forward over
// processes allocates nothing, the sockets' bookkeeping included.
namespace {
std::atomic<std::size_t> g_heap_allocations{0};
}
void* operator new(std::size_t n) {
  g_heap_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

using namespace unshard;
using namespace unshard::toy;
using clock_type = std::chrono::steady_clock;

namespace {

// ---- rank processes ------------------------------------------------------------------------
// Runs body(env, listener, out) in `n` forked processes, one per rank, on a port bound here
// first (so parallel tests never collide): rank 0 inherits the listening socket. Each rank
// reports through `out` (lines to the parent); the parent collects the lines per rank with the
// time each arrived.
struct rank_line {
  std::string text;
  clock_type::time_point at;
};

class rank_processes {
 public:
  using body_fn = std::function<void(const net::launch_env&, std::optional<net::socket>, FILE*)>;

  rank_processes(std::size_t n, body_fn body) : lines_(n), pids_(n), fds_(n), partial_(n), status_(n, -1) {
    net::socket listener = net::listen_on("127.0.0.1", 0);
    const std::uint16_t port = listener.local_endpoint().port;
    std::fflush(stdout);
    std::fflush(stderr);
    for (std::size_t r = 0; r < n; ++r) {
      int p[2];
      REQUIRE(::pipe(p) == 0);
      const pid_t pid = ::fork();
      REQUIRE(pid >= 0);
      if (pid == 0) {
        ::close(p[0]);
        for (std::size_t q = 0; q < r; ++q) ::close(fds_[q]);
        FILE* out = ::fdopen(p[1], "w");
        std::setvbuf(out, nullptr, _IOLBF, 0);
        int code = 0;
        try {
          net::launch_env env{r, n, r, n, "127.0.0.1", port, "test"};
          std::optional<net::socket> l;
          if (r == 0) l = std::move(listener);
          else listener.close();
          body(env, std::move(l), out);
        } catch (const std::exception& e) {
          std::fprintf(out, "exception %s\n", e.what());
          code = 1;
        }
        std::fflush(out);
        ::_exit(code);
      }
      ::close(p[1]);
      pids_[r] = pid;
      fds_[r] = p[0];
    }
  }
  ~rank_processes() {
    for (std::size_t r = 0; r < pids_.size(); ++r)
      if (status_[r] < 0) ::kill(pids_[r], SIGKILL);
    wait_all(10);
    for (int fd : fds_)
      if (fd >= 0) ::close(fd);
  }

  // Reads lines until pred() holds, every pipe closed, or `seconds` passed; true if pred held.
  bool read_until(const std::function<bool()>& pred, double seconds) {
    const auto until = clock_type::now() + std::chrono::duration<double>(seconds);
    while (!pred()) {
      std::vector<pollfd> fds;
      std::vector<std::size_t> who;
      for (std::size_t r = 0; r < fds_.size(); ++r)
        if (fds_[r] >= 0) {
          fds.push_back({fds_[r], POLLIN, 0});
          who.push_back(r);
        }
      if (fds.empty()) return pred();
      const int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(until - clock_type::now()).count());
      if (left <= 0) return pred();
      if (::poll(fds.data(), fds.size(), left) <= 0) continue;
      for (std::size_t i = 0; i < fds.size(); ++i) {
        if (!fds[i].revents) continue;
        char buf[4096];
        const ssize_t got = ::read(fds[i].fd, buf, sizeof buf);
        const std::size_t r = who[i];
        if (got <= 0) {
          ::close(fds_[r]);
          fds_[r] = -1;
          continue;
        }
        partial_[r].append(buf, static_cast<std::size_t>(got));
        for (std::size_t nl; (nl = partial_[r].find('\n')) != std::string::npos;) {
          lines_[r].push_back({partial_[r].substr(0, nl), clock_type::now()});
          partial_[r].erase(0, nl + 1);
        }
      }
    }
    return true;
  }
  void read_all(double seconds = 120) {
    read_until([] { return false; }, seconds);
  }
  // Exit statuses (waitpid's), after every process ended or `seconds` passed (then killed).
  void wait_all(double seconds) {
    const auto until = clock_type::now() + std::chrono::duration<double>(seconds);
    for (std::size_t r = 0; r < pids_.size(); ++r) {
      while (status_[r] < 0) {
        int st = 0;
        const pid_t got = ::waitpid(pids_[r], &st, WNOHANG);
        if (got == pids_[r]) {
          status_[r] = st;
          break;
        }
        if (clock_type::now() >= until) ::kill(pids_[r], SIGKILL);
        ::usleep(2000);
      }
    }
  }
  void kill_rank(std::size_t r) { ::kill(pids_[r], SIGKILL); }
  void stop_rank(std::size_t r) { ::kill(pids_[r], SIGSTOP); }
  int status(std::size_t r) const { return status_[r]; }
  const std::vector<rank_line>& lines(std::size_t r) const { return lines_[r]; }
  // The first line of rank r starting with `key `, without the key.
  std::string find(std::size_t r, const std::string& key) const {
    for (const auto& l : lines_[r])
      if (l.text.rfind(key + " ", 0) == 0) return l.text.substr(key.size() + 1);
    return "";
  }
  bool has_line(std::size_t r, const std::string& text) const {
    for (const auto& l : lines_[r])
      if (l.text == text) return true;
    return false;
  }
  std::string all_text(std::size_t r) const {
    std::string s;
    for (const auto& l : lines_[r]) s += l.text + "\n";
    return s;
  }

 private:
  std::vector<std::vector<rank_line>> lines_;
  std::vector<pid_t> pids_;
  std::vector<int> fds_;
  std::vector<std::string> partial_;
  std::vector<int> status_;
};

bool exited_ok(int status) { return WIFEXITED(status) && WEXITSTATUS(status) == 0; }

// Waits for every rank to finish; each must exit normally having printed "bad 0" (no mismatched byte).
void expect_every_rank_clean(rank_processes& procs, std::size_t n) {
  procs.read_all(120);
  procs.wait_all(30);
  for (std::size_t r = 0; r < n; ++r) {
    CAPTURE(r);
    CAPTURE(procs.all_text(r));
    CHECK(exited_ok(procs.status(r)));
    CHECK(procs.find(r, "bad") == "0");
  }
}

std::vector<float> toy_input(const toy_config& c) {
  std::vector<float> x(c.tokens * c.dim);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i)) * 0.8f;
  return x;
}

toy_config small_toy() {
  toy_config c;
  c.layers = 5;
  c.dim = 144;  // weights above selective's resident threshold, norms and biases below it
  c.ffn = 120;
  c.tokens = 3;
  return c;
}

std::uint8_t pattern(std::size_t rank, std::size_t i, int round) {
  return static_cast<std::uint8_t>((rank * 131 + i * 7 + static_cast<std::size_t>(round) * 17) & 0xff);
}

}  // namespace

// ---- launch variables ------------------------------------------------------------------------

TEST_CASE("launch_env: torchrun's variables, Slurm's as fallback") {
  std::map<std::string, std::string> v{{"RANK", "3"},        {"WORLD_SIZE", "8"},          {"LOCAL_RANK", "1"},
                                       {"LOCAL_WORLD_SIZE", "2"}, {"MASTER_ADDR", "node7"}, {"MASTER_PORT", "29500"}};
  auto e = net::read_launch_env(net::environment_from(v));
  CHECK(e.rank == 3);
  CHECK(e.world_size == 8);
  CHECK(e.local_rank == 1);
  CHECK(e.local_world_size == 2);
  CHECK(e.master_addr == "node7");
  CHECK(e.master_port == 29500);
  CHECK(e.source == "torchrun");

  std::map<std::string, std::string> s{{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "6"},   {"SLURM_LOCALID", "2"},
                                       {"MASTER_ADDR", "10.0.0.1"}, {"MASTER_PORT", "1234"}};
  e = net::read_launch_env(net::environment_from(s));
  CHECK(e.rank == 5);
  CHECK(e.world_size == 6);
  CHECK(e.local_rank == 2);
  CHECK(e.local_world_size == 0);  // Slurm did not say
  CHECK(e.source == "slurm");
  s["SLURM_NTASKS_PER_NODE"] = "3";
  CHECK(net::read_launch_env(net::environment_from(s)).local_world_size == 3);
  s["SLURM_NTASKS_PER_NODE"] = "2";
  CHECK_THROWS_WITH_AS(net::read_launch_env(net::environment_from(s)),
                       "environment variable SLURM_LOCALID=2 is not below SLURM_NTASKS_PER_NODE=2", error);
}

TEST_CASE("launch_env: every missing or malformed variable is an error naming it") {
  const std::map<std::string, std::string> good{{"RANK", "1"},         {"WORLD_SIZE", "2"},
                                                {"LOCAL_RANK", "1"},   {"LOCAL_WORLD_SIZE", "2"},
                                                {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "29500"}};
  const auto message = [&](const std::map<std::string, std::string>& changes, const std::vector<std::string>& drop) {
    auto v = good;
    for (const auto& [k, x] : changes) v[k] = x;
    for (const auto& k : drop) v.erase(k);
    try {
      net::read_launch_env(net::environment_from(v));
    } catch (const error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK(message({}, {"RANK"}) == "environment variable RANK is not set (nor SLURM_PROCID)");
  CHECK(message({}, {"WORLD_SIZE"}) == "environment variable WORLD_SIZE is not set");
  CHECK(message({}, {"LOCAL_RANK"}) == "environment variable LOCAL_RANK is not set");
  CHECK(message({}, {"LOCAL_WORLD_SIZE"}) == "environment variable LOCAL_WORLD_SIZE is not set");
  CHECK(message({}, {"MASTER_ADDR"}) == "environment variable MASTER_ADDR is not set");
  CHECK(message({}, {"MASTER_PORT"}) == "environment variable MASTER_PORT is not set");
  CHECK(message({{"WORLD_SIZE", "0"}}, {}) == "environment variable WORLD_SIZE: world size must be at least 1 (got 0)");
  CHECK(message({{"WORLD_SIZE", "4096"}}, {}) == "environment variable WORLD_SIZE: world size 4096 is beyond the supported 1024");
  CHECK(message({{"UNSHARD_TIMEOUT", "0"}}, {}) == "environment variable UNSHARD_TIMEOUT=0 is not a timeout in seconds (1-86400)");
  CHECK(message({{"UNSHARD_TIMEOUT", "1.5"}}, {}) == "environment variable UNSHARD_TIMEOUT='1.5' is not a non-negative integer");
  CHECK(message({{"UNSHARD_TIMEOUT", "90000"}}, {}) ==
        "environment variable UNSHARD_TIMEOUT=90000 is not a timeout in seconds (1-86400)");
  {
    auto v = good;
    v["UNSHARD_TIMEOUT"] = "45";
    CHECK(net::read_launch_env(net::environment_from(v)).timeout_s == 45);
    CHECK(net::read_launch_env(net::environment_from(good)).timeout_s == 0);  // unset: the options' default
  }
  CHECK(message({{"RANK", "2"}}, {}) == "environment variable RANK=2 is not below WORLD_SIZE=2");
  CHECK(message({{"RANK", "-1"}}, {}) == "environment variable RANK='-1' is not a non-negative integer");
  CHECK(message({{"WORLD_SIZE", "2x"}}, {}) == "environment variable WORLD_SIZE='2x' is not a non-negative integer");
  CHECK(message({{"LOCAL_RANK", "2"}}, {}) == "environment variable LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2");
  CHECK(message({{"LOCAL_WORLD_SIZE", "3"}}, {}) == "environment variable LOCAL_WORLD_SIZE=3 exceeds WORLD_SIZE=2");
  CHECK(message({{"MASTER_PORT", "http"}}, {}) == "environment variable MASTER_PORT='http' is not a non-negative integer");
  CHECK(message({{"MASTER_PORT", "70000"}}, {}) == "environment variable MASTER_PORT=70000 is not a TCP port (1-65535)");
  CHECK(message({{"MASTER_PORT", "0"}}, {}) == "environment variable MASTER_PORT=0 is not a TCP port (1-65535)");
  CHECK(message({{"MASTER_PORT", ""}}, {}) == "environment variable MASTER_PORT is empty; it must be a non-negative integer");
  CHECK(message({{"MASTER_ADDR", ""}}, {}) == "environment variable MASTER_ADDR is empty");
  CHECK(message({{"RANK", "99999999999999999999999"}}, {}) ==
        "environment variable RANK='99999999999999999999999' is out of range");
  CHECK(message({{"UNSHARD_RENDEZVOUS_PORT", "0"}}, {}) ==
        "environment variable UNSHARD_RENDEZVOUS_PORT=0 is not a TCP port (1-65535)");
  CHECK(message({}, {}) == "no error");
}

TEST_CASE("launch_env: under torchrun's agent store the rendezvous moves off MASTER_PORT") {
  std::map<std::string, std::string> v{{"RANK", "0"},         {"WORLD_SIZE", "2"},        {"LOCAL_RANK", "0"},
                                       {"LOCAL_WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "29500"}};
  CHECK(net::read_launch_env(net::environment_from(v)).listen_port() == 29500);
  v["TORCHELASTIC_USE_AGENT_STORE"] = "True";  // torchrun's agent serves its TCPStore on MASTER_PORT
  CHECK(net::read_launch_env(net::environment_from(v)).listen_port() == 29501);
  v["UNSHARD_RENDEZVOUS_PORT"] = "31000";
  CHECK(net::read_launch_env(net::environment_from(v)).listen_port() == 31000);
  v.erase("UNSHARD_RENDEZVOUS_PORT");
  v["MASTER_PORT"] = "65535";
  CHECK_THROWS_WITH_AS(net::read_launch_env(net::environment_from(v)), doctest::Contains("UNSHARD_RENDEZVOUS_PORT"), error);
}

// ---- rendezvous and file exchange --------------------------------------------------------------

TEST_CASE("rendezvous across processes: broadcast from rank 0, all_gather, barrier, repeated") {
  for (std::size_t n : {1, 2, 4}) {
    CAPTURE(n);
    rank_processes procs(n, [](const net::launch_env& env, std::optional<net::socket> l, FILE* out) {
      net::rendezvous rv(env, {std::chrono::seconds(30)}, std::move(l));
      for (int round = 0; round < 3; ++round) {
        std::vector<std::byte> id(128);  // the size of an ncclUniqueId
        if (env.rank == 0)
          for (std::size_t i = 0; i < id.size(); ++i) id[i] = std::byte(pattern(0, i, round));
        rv.broadcast(id);
        bool same = true;
        for (std::size_t i = 0; i < id.size(); ++i) same &= id[i] == std::byte(pattern(0, i, round));
        const std::string mine(env.rank * 3 + static_cast<std::size_t>(round), static_cast<char>('a' + env.rank));
        const auto all = rv.all_gather(std::as_bytes(std::span(mine.data(), mine.size())));
        bool gathered = all.size() == env.world_size;
        for (std::size_t r = 0; gathered && r < all.size(); ++r)
          gathered = all[r].size() == r * 3 + static_cast<std::size_t>(round) &&
                     std::all_of(all[r].begin(), all[r].end(), [&](std::byte b) { return b == std::byte('a' + r); });
        rv.barrier();
        std::fprintf(out, "round%d %d %d\n", round, same ? 1 : 0, gathered ? 1 : 0);
      }
    });
    procs.read_all(60);
    procs.wait_all(30);
    for (std::size_t r = 0; r < n; ++r) {
      CAPTURE(r);
      CAPTURE(procs.all_text(r));
      CHECK(exited_ok(procs.status(r)));
      for (int round = 0; round < 3; ++round) CHECK(procs.find(r, "round" + std::to_string(round)) == "1 1");
    }
  }
}

TEST_CASE("rendezvous: rank 0 missing is a timeout naming MASTER_ADDR and MASTER_PORT; a duplicate RANK is named") {
  // Nobody listens on the port (bound and closed here): rank 1 retries, then gives up naming it.
  std::uint16_t port = 0;
  {
    auto l = net::listen_on("127.0.0.1", 0);
    port = l.local_endpoint().port;
  }
  const net::launch_env env{1, 2, 1, 2, "127.0.0.1", port, "test"};
  const auto t0 = clock_type::now();
  const std::string expected = "cannot connect to rank 0 (MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port) + ")";
  CHECK_THROWS_WITH_AS(net::rendezvous(env, {std::chrono::milliseconds(300)}), doctest::Contains(expected.c_str()),
                       error);
  CHECK(clock_type::now() - t0 < std::chrono::seconds(3));
  // UNSHARD_TIMEOUT (launch_env::timeout_s) wins over the options' 300 s.
  net::launch_env short_env = env;
  short_env.timeout_s = 1;
  const auto t1 = clock_type::now();
  CHECK_THROWS_WITH_AS(net::rendezvous(short_env, {std::chrono::seconds(300)}), doctest::Contains(expected.c_str()), error);
  CHECK(clock_type::now() - t1 < std::chrono::seconds(4));

  rank_processes procs(3, [](const net::launch_env& env, std::optional<net::socket> l, FILE* out) {
    net::launch_env e = env;
    if (e.rank == 2) e.rank = 1;  // two processes claim RANK=1
    net::rendezvous rv(e, {std::chrono::seconds(5)}, std::move(l));
    std::fprintf(out, "joined\n");
  });
  procs.read_all(30);
  procs.wait_all(10);
  CHECK(procs.find(0, "exception") == "rendezvous: two processes joined with RANK=1");
  for (std::size_t r = 1; r < 3; ++r) {  // the others learn that rank 0 went away, by name
    CAPTURE(procs.all_text(r));
    CHECK(procs.find(r, "exception").rfind("rank 0 (MASTER_ADDR=127.0.0.1 MASTER_PORT=", 0) == 0);
    CHECK(procs.find(r, "exception").find("closed its connection") != std::string::npos);
  }
}

TEST_CASE("file exchange: rank 0 renames a complete file into place; other ranks wait for it and ignore stale ones") {
  char dir_template[] = "/tmp/unshard-exchange-XXXXXX";
  REQUIRE(::mkdtemp(dir_template) != nullptr);
  const std::string path = std::string(dir_template) + "/nccl-id";
  {
    std::vector<std::byte> stale{std::byte{1}, std::byte{2}};
    net::broadcast_through_file(path, 0, stale, "old-job");  // an earlier job's file at the same path
  }
  rank_processes procs(3, [&](const net::launch_env& env, std::optional<net::socket>, FILE* out) {
    std::vector<std::byte> id;
    if (env.rank == 0) {
      ::usleep(200'000);  // the others start waiting first
      for (int i = 0; i < 128; ++i) id.push_back(std::byte(pattern(0, static_cast<std::size_t>(i), 5)));
    }
    net::broadcast_through_file(path, env.rank, id, "job-42", std::chrono::seconds(20));
    bool ok = id.size() == 128;
    for (std::size_t i = 0; ok && i < id.size(); ++i) ok = id[i] == std::byte(pattern(0, i, 5));
    std::fprintf(out, "id %d\n", ok ? 1 : 0);
  });
  procs.read_all(30);
  procs.wait_all(10);
  for (std::size_t r = 0; r < 3; ++r) CHECK(procs.find(r, "id") == "1");
  std::vector<std::byte> none;
  CHECK_THROWS_WITH_AS(net::broadcast_through_file(path, 1, none, "job-43", std::chrono::milliseconds(100)),
                       doctest::Contains("another job's tag"), error);
  std::filesystem::remove_all(dir_template);
}

// ---- process_world collectives ------------------------------------------------------------------

TEST_CASE("process_world: all_gather out of place and in place, gather_range, broadcast, across processes") {
  for (std::size_t n : {1, 2, 3, 5}) {
    CAPTURE(n);
    rank_processes procs(n, [](const net::launch_env& env, std::optional<net::socket> l, FILE* out) {
      net::rendezvous rv(env, {std::chrono::seconds(30)}, std::move(l));
      process_world w(rv, {std::chrono::seconds(30)});
      const std::size_t me = env.rank, size = env.world_size;
      int bad = 0;
      // Sizes from empty to several MiB: partial reads and writes on full socket buffers.
      for (std::size_t bytes : {std::size_t{0}, std::size_t{1}, std::size_t{4099}, std::size_t{3} << 20}) {
        for (int round = 0; round < 2; ++round) {
          std::vector<std::byte> send(bytes), recv(bytes * size, std::byte{0xee});
          for (std::size_t i = 0; i < bytes; ++i) send[i] = std::byte(pattern(me, i, round));
          w.all_gather(me, send.data(), recv.data(), bytes);
          for (std::size_t p = 0; p < size; ++p)
            for (std::size_t i = 0; i < bytes; ++i) bad += recv[p * bytes + i] != std::byte(pattern(p, i, round));
          std::fill(recv.begin(), recv.end(), std::byte{0xee});
          std::copy(send.begin(), send.end(), recv.begin() + static_cast<std::ptrdiff_t>(me * bytes));
          w.all_gather(me, recv.data() + me * bytes, recv.data(), bytes);  // in place
          for (std::size_t p = 0; p < size; ++p)
            for (std::size_t i = 0; i < bytes; ++i) bad += recv[p * bytes + i] != std::byte(pattern(p, i, round));
        }
      }
      // gather_range: ranges that start and end inside shards, span several, or miss some owners.
      const std::size_t shard = 1000;
      for (auto [b, e] : {std::pair<std::size_t, std::size_t>{0, shard * size}, {130, 1870}, {2500, 2600},
                          {999, 1001}, {0, 1}, {shard * size - 7, shard * size}}) {
        if (e > shard * size) continue;
        std::vector<std::byte> dst(e - b, std::byte{0xee});
        const std::size_t lo = std::max(b, me * shard), hi = std::min(e, (me + 1) * shard);
        for (std::size_t x = lo; x < hi; ++x) dst[x - b] = std::byte(pattern(x / shard, x, 9));
        w.gather_range(me, dst.data(), b, e, shard);
        for (std::size_t x = b; x < e; ++x) bad += dst[x - b] != std::byte(pattern(x / shard, x, 9));
      }
      std::vector<std::byte> buf(777);
      if (me == size - 1)
        for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = std::byte(pattern(me, i, 3));
      w.broadcast(me, size - 1, buf.data(), buf.size());
      for (std::size_t i = 0; i < buf.size(); ++i) bad += buf[i] != std::byte(pattern(size - 1, i, 3));
      w.barrier();
      std::fprintf(out, "bad %d\n", bad);
    });
    expect_every_rank_clean(procs, n);
  }
}

TEST_CASE("process_world: a rank that dies while no collective runs is noticed at once (the connection monitor)") {
  rank_processes procs(3, [](const net::launch_env& env, std::optional<net::socket> l, FILE* out) {
    net::rendezvous rv(env, {std::chrono::seconds(30)}, std::move(l));
    process_world w(rv, {std::chrono::seconds(30)});
    w.barrier();
    std::fprintf(out, "idle\n");
    const auto t0 = clock_type::now();
    while (!w.aborted() && clock_type::now() - t0 < std::chrono::seconds(20)) ::usleep(1000);  // "computing"
    std::fprintf(out, "aborted %d %d\n", w.aborted() ? 1 : 0, w.failed_rank());
    try {
      w.barrier();
    } catch (const rank_failure& e) {
      std::fprintf(out, "error %s\n", e.what());
    }
  });
  // Rank 2 is killed once every rank has left the barrier: no collective is in flight.
  REQUIRE(procs.read_until([&] { return procs.has_line(0, "idle") && procs.has_line(1, "idle") && procs.has_line(2, "idle"); },
                           60));
  const auto killed_at = clock_type::now();
  procs.kill_rank(2);
  procs.read_all(30);
  procs.wait_all(10);
  CHECK(WIFSIGNALED(procs.status(2)));
  for (std::size_t r = 0; r < 2; ++r) {
    CAPTURE(procs.all_text(r));
    CHECK(procs.find(r, "aborted") == "1 2");
    CHECK(procs.find(r, "error") == "rank 2 failed: its process exited or was killed (its connection closed)");
    for (const auto& line : procs.lines(r))
      if (line.text.rfind("aborted ", 0) == 0) {
        const double ms = std::chrono::duration<double, std::milli>(line.at - killed_at).count();
        MESSAGE("rank ", r, " noticed the death of idle rank 2 after ", ms, " ms");
        CHECK(ms < 3000);
      }
  }
}

TEST_CASE("process_world: ranks that run different collectives fail naming both, instead of mixing bytes") {
  rank_processes procs(2, [](const net::launch_env& env, std::optional<net::socket> l, FILE* out) {
    net::rendezvous rv(env, {std::chrono::seconds(30)}, std::move(l));
    process_world w(rv, {std::chrono::seconds(10)});
    std::vector<std::byte> b(64);
    try {
      if (env.rank == 0) w.all_gather(0, b.data(), b.data(), 32);
      else w.barrier();
    } catch (const error& e) {
      std::fprintf(out, "error %s\n", e.what());
    }
  });
  procs.read_all(30);
  procs.wait_all(10);
  for (std::size_t r = 0; r < 2; ++r) {
    CAPTURE(procs.all_text(r));
    CHECK(procs.find(r, "error").find("the ranks ran different collectives") != std::string::npos);
  }
  // Both ranks see the mismatch, and the first report wins on every rank, so rank 0 may carry its
  // own view or rank 1's: either way it names both collectives and both ranks.
  const std::string r0 = procs.find(0, "error");
  CHECK((r0.find("rank 1 sent barrier #1 of 0 bytes while rank 0 expected all_gather #1 of 32 bytes") !=
             std::string::npos ||
         r0.find("rank 0 sent all_gather #1 of 32 bytes while rank 1 expected barrier #1 of 0 bytes") !=
             std::string::npos));
}

TEST_CASE("process_world: transfer between every pair of processes, 0 B to 1 MiB; only `to`'s dst changes") {
  for (std::size_t n : {2, 3}) {
    CAPTURE(n);
    rank_processes procs(n, [](const net::launch_env& env, std::optional<net::socket> l, FILE* out) {
      net::rendezvous rv(env, {std::chrono::seconds(30)}, std::move(l));
      process_world w(rv, {std::chrono::seconds(30)});
      const std::size_t me = env.rank, size = env.world_size, guard = 16;
      const std::byte untouched{0xee};
      int bad = 0;
      for (std::size_t bytes : {std::size_t{0}, std::size_t{1}, std::size_t{1} << 20}) {
        std::vector<std::byte> src(bytes), dst(bytes + guard, untouched);
        for (std::size_t from = 0; from < size; ++from)
          for (std::size_t to = 0; to < size; ++to) {
            const int round = static_cast<int>(from * size + to);
            for (std::size_t i = 0; i < bytes; ++i) src[i] = std::byte(pattern(me, i, round));
            // src is only read on `from`, dst only written on `to`: the other ranks pass null.
            w.transfer(me, from, to, me == from ? src.data() : nullptr, me == to ? dst.data() : nullptr, bytes);
            for (std::size_t i = 0; i < bytes; ++i) bad += src[i] != std::byte(pattern(me, i, round));
            if (me == from) std::fill(src.begin(), src.end(), std::byte{0});  // reusable once the call returned
            for (std::size_t i = 0; i < bytes; ++i)
              bad += dst[i] != (me == to ? std::byte(pattern(from, i, round)) : untouched);
            for (std::size_t i = bytes; i < bytes + guard; ++i) bad += dst[i] != untouched;
            std::fill(dst.begin(), dst.end(), untouched);
          }
      }
      // A chain in descending order (each rank sends its buffer, then receives into it), then
      // rank 0 collects every rank's buffer, its own through from == to.
      const std::size_t bytes = 3000;
      std::vector<std::byte> buf(bytes), collected(me == 0 ? size * bytes : 0, untouched);
      for (std::size_t i = 0; i < bytes; ++i) buf[i] = std::byte(pattern(me, i, 40));
      for (std::size_t s = size; s-- > 1;) w.transfer(me, s - 1, s, buf.data(), buf.data(), bytes);
      for (std::size_t s = 0; s < size; ++s)
        w.transfer(me, s, 0, buf.data(), me == 0 ? collected.data() + s * bytes : nullptr, bytes);
      for (std::size_t i = 0; i < bytes; ++i) bad += buf[i] != std::byte(pattern(me == 0 ? 0 : me - 1, i, 40));
      for (std::size_t s = 0; me == 0 && s < size; ++s)
        for (std::size_t i = 0; i < bytes; ++i)
          bad += collected[s * bytes + i] != std::byte(pattern(s == 0 ? 0 : s - 1, i, 40));
      // A bad endpoint is an error on the caller, before the collective starts.
      try {
        w.transfer(me, 0, size, buf.data(), buf.data(), 1);
        bad += 1000;
      } catch (const error& e) {
        const std::string want = "to is not a rank of this world of size " + std::to_string(size);
        bad += std::string(e.what()).find(want) == std::string::npos;
      }
      // The process backend's stream (the host stream over this world): a transfer queued on the
      // worker after a slow copy runs after it and is done when synchronize() returns.
      {
        basic_host_stream<process_world> comm(w, me, basic_host_stream<process_world>::mode::worker_stream);
        comm.set_copy_link({0.02, 0.0});
        std::vector<std::byte> staging(bytes), device(bytes), got(bytes, untouched);
        for (std::size_t i = 0; i < bytes; ++i) staging[i] = std::byte(pattern(me, i, 41));
        comm.copy(device.data(), staging.data(), bytes, 1);
        comm.transfer(size - 1, 0, device.data(), got.data(), bytes, 2);
        comm.synchronize();
        for (std::size_t i = 0; i < bytes; ++i)
          bad += got[i] != (me == 0 ? std::byte(pattern(size - 1, i, 41)) : untouched);
      }
      w.barrier();
      std::fprintf(out, "bad %d\n", bad);
    });
    expect_every_rank_clean(procs, n);
  }
}

TEST_CASE("process_world: a transfer against another collective is 'the ranks ran different collectives'") {
  // Each way round, the receiving rank sees the mismatch first and both ranks report its view:
  // the sender of the transfer does not read, so it learns of the failure from the receiver.
  for (const bool transfer_on_sender : {true, false}) {
    CAPTURE(transfer_on_sender);
    rank_processes procs(2, [&](const net::launch_env& env, std::optional<net::socket> l, FILE* out) {
      net::rendezvous rv(env, {std::chrono::seconds(30)}, std::move(l));
      process_world w(rv, {std::chrono::seconds(10)});
      std::vector<std::byte> b(64);
      try {
        const bool transfers = (env.rank == 0) == transfer_on_sender;
        if (transfers) w.transfer(env.rank, 0, 1, b.data(), b.data(), 32);
        else w.all_gather(env.rank, b.data(), b.data(), 32);
        const auto t0 = clock_type::now();  // rank 0 after its send: wait for rank 1's verdict
        while (!w.aborted() && clock_type::now() - t0 < std::chrono::seconds(10)) ::usleep(1000);
        w.barrier();
        std::fprintf(out, "no error\n");
      } catch (const error& e) {
        std::fprintf(out, "error %s\n", e.what());
      }
    });
    procs.read_all(30);
    procs.wait_all(10);
    const std::string expected =
        transfer_on_sender ? "rank 0 sent transfer #1 of 32 bytes while rank 1 expected all_gather #1 of 32 bytes"
                           : "rank 0 sent all_gather #1 of 32 bytes while rank 1 expected transfer #1 of 32 bytes";
    for (std::size_t r = 0; r < 2; ++r) {
      CAPTURE(r);
      CAPTURE(procs.all_text(r));
      CHECK(procs.find(r, "error").find("the ranks ran different collectives") != std::string::npos);
      CHECK(procs.find(r, "error").find(expected) != std::string::npos);
    }
  }
}

namespace {

// Once every rank printed "ready" (it is inside its loop of collectives), kills `victim`; every
// survivor must exit normally having printed "failed <first failed rank> <reason>" starting with
// `expected`, within 3 s of the kill.
void kill_and_check_survivors(rank_processes& procs, int n, int victim, const std::string& expected, const char* during) {
  REQUIRE(procs.read_until(
      [&] {
        for (int r = 0; r < n; ++r)
          if (!procs.has_line(static_cast<std::size_t>(r), "ready")) return false;
        return true;
      },
      60));
  ::usleep(50'000);  // well inside the loop
  const auto killed_at = clock_type::now();
  procs.kill_rank(static_cast<std::size_t>(victim));
  procs.read_all(30);
  procs.wait_all(15);
  CHECK(WIFSIGNALED(procs.status(static_cast<std::size_t>(victim))));
  for (int r = 0; r < n; ++r) {
    if (r == victim) continue;
    CAPTURE(r);
    CAPTURE(procs.all_text(static_cast<std::size_t>(r)));
    CHECK(exited_ok(procs.status(static_cast<std::size_t>(r))));
    CHECK(procs.find(static_cast<std::size_t>(r), "failed").rfind(expected, 0) == 0);
    for (const auto& line : procs.lines(static_cast<std::size_t>(r)))
      if (line.text.rfind("failed ", 0) == 0) {
        const double latency = std::chrono::duration<double>(line.at - killed_at).count();
        MESSAGE("rank ", r, " reported the death of rank ", victim, " ", during, " after ", latency * 1e3, " ms");
        CHECK(latency < 3.0);
      }
  }
}

}  // namespace

TEST_CASE("process_world: a rank killed during transfers makes every survivor fail naming it") {
  for (auto [n, victim] : {std::pair{2, 1}, std::pair{3, 1}, std::pair{3, 0}}) {
    CAPTURE(n);
    CAPTURE(victim);
    rank_processes procs(static_cast<std::size_t>(n), [](const net::launch_env& env, std::optional<net::socket> l, FILE* out) {
      net::rendezvous rv(env, {std::chrono::seconds(30)}, std::move(l));
      process_world w(rv, {std::chrono::seconds(30)});
      const std::size_t me = env.rank, size = env.world_size;
      std::vector<std::byte> buf(4 << 20, std::byte{1});  // larger than the socket buffers: transfers block
      try {
        const auto until = clock_type::now() + std::chrono::seconds(60);
        for (std::size_t round = 0; clock_type::now() < until; ++round) {
          // A ring step by step: every rank sends and receives, and waits on its peers.
          for (std::size_t s = 0; s < size; ++s) w.transfer(me, s, (s + 1) % size, buf.data(), buf.data(), buf.size());
          if (round == 0) std::fprintf(out, "ready\n");
        }
        std::fprintf(out, "no failure seen\n");
      } catch (const rank_failure& e) {
        std::fprintf(out, "failed %d %s\n", e.failed_rank(), e.what());
      }
    });
    const std::string v = std::to_string(victim);
    kill_and_check_survivors(procs, n, victim, v + " rank " + v + " failed: its ", "during transfers");  // exited / broke
  }
}

// ---- the toy model over processes ---------------------------------------------------------------

namespace {
// One rank's part of a sharded toy forward: the reference computed in this process, the sharded
// forward capped at the planned peak, both compared bit for bit.
void toy_rank(const net::launch_env& env, std::optional<net::socket> listener, FILE* out, const std::string& policy,
              int forwards) {
  const toy_model m(small_toy());
  const toy_weights w(m);
  const auto x = toy_input(m.config());
  reference_runner<toy_model> ref(m, w);
  std::memcpy(ref.state().x, x.data(), x.size() * 4);
  ref.forward();
  const std::vector<float> want(ref.state().x, ref.state().x + x.size());

  process_job job(env, {std::chrono::seconds(60)}, {std::chrono::seconds(60)}, std::move(listener));
  session_options opt;
  opt.policy = parse_policy(policy).values;
  process_session<toy_model> s(m, w, job.world(), opt);
  s.cap_device_memory(s.plan().peak_bytes());  // an overshoot of the plan throws, naming the category
  bool equal = true;
  for (int f = 0; f < forwards; ++f)
    s.forward([&](std::size_t, toy_state& st) { std::memcpy(st.x, x.data(), x.size() * 4); },
              [&](std::size_t, const toy_state& st) { equal &= std::memcmp(st.x, want.data(), want.size() * 4) == 0; });
  const rank_measurement meas = s.measured();
  bool terms_equal = true;
  for (auto c : all_memory_categories) terms_equal &= meas.at_peak[c] == s.plan().ranks[s.rank()].terms[c];
  std::fprintf(out, "%s bitwise_equal=%d terms_equal=%d\n", s.peak_line().c_str(), equal ? 1 : 0, terms_equal ? 1 : 0);
  std::fprintf(out, "result %d %zu %zu\n", equal ? 1 : 0, meas.peak_bytes, s.plan().ranks[s.rank()].peak());
}
}  // namespace

TEST_CASE("toy forward over 2-4 processes equals the unsharded forward bit for bit; measured peak <= planned") {
  for (const char* policy : {"full", "selective", "selective:subunit", "prefetch:1", "prefetch:2", "offload+prefetch:1",
                             "chunked:4KiB", "chunked:10KiB+prefetch:2", "chunked:1B+offload"})
    for (std::size_t n : {2, 3, 4}) {
      CAPTURE(policy);
      CAPTURE(n);
      rank_processes procs(n, [&](const net::launch_env& env, std::optional<net::socket> l, FILE* out) {
        toy_rank(env, std::move(l), out, policy, 2);
      });
      procs.read_all(120);
      procs.wait_all(30);
      for (std::size_t r = 0; r < n; ++r) {
        CAPTURE(r);
        CAPTURE(procs.all_text(r));
        CHECK(exited_ok(procs.status(r)));
        std::istringstream is(procs.find(r, "result"));
        int equal = 0;
        std::size_t measured = 0, planned = 0;
        REQUIRE(static_cast<bool>(is >> equal >> measured >> planned));
        CHECK(equal == 1);
        CHECK(measured <= planned);
        CHECK(measured * 100 >= planned * 95);  // tight, as on the threaded host backend
        CHECK(procs.find(r, "rank").find("terms_equal=1") != std::string::npos);
      }
    }
}

TEST_CASE("a forward over processes allocates nothing on the heap") {
  for (const char* policy : {"full", "offload+prefetch:2", "chunked:4KiB+prefetch:1"}) {
    CAPTURE(policy);
    rank_processes procs(3, [&](const net::launch_env& env, std::optional<net::socket> l, FILE* out) {
      const toy_model m(small_toy());
      const toy_weights w(m);
      process_job job(env, {std::chrono::seconds(60)}, {std::chrono::seconds(60)}, std::move(l));
      session_options opt;
      opt.policy = parse_policy(policy).values;
      process_session<toy_model> s(m, w, job.world(), opt);
      const auto x = toy_input(m.config());
      auto prepare = [&](std::size_t, toy_state& st) { std::memcpy(st.x, x.data(), x.size() * 4); };
      auto finish = [](std::size_t, const toy_state&) {};
      s.forward(prepare, finish);  // the first forward of `full` gathers; later ones reuse
      const std::size_t before = g_heap_allocations.load();
      for (int i = 0; i < 3; ++i) s.forward(prepare, finish);
      std::fprintf(out, "allocations %zu\n", g_heap_allocations.load() - before);
      std::fprintf(out, "counter_works %d\n", before > 0 ? 1 : 0);  // loading did allocate: the count is live
    });
    procs.read_all(60);
    procs.wait_all(15);
    for (std::size_t r = 0; r < 3; ++r) {
      CAPTURE(procs.all_text(r));
      CHECK(exited_ok(procs.status(r)));
      CHECK(procs.find(r, "allocations") == "0");
      CHECK(procs.find(r, "counter_works") == "1");
    }
  }
}

TEST_CASE("a plan over the budget is refused on every rank before anything is allocated") {
  rank_processes procs(3, [](const net::launch_env& env, std::optional<net::socket> l, FILE* out) {
    const toy_model m(small_toy());
    const toy_weights w(m);
    process_job job(env, {std::chrono::seconds(30)}, {std::chrono::seconds(30)}, std::move(l));
    session_options opt;
    opt.policy = parse_policy("prefetch:1").values;
    opt.budget_bytes = plan_memory(m, 3, opt.policy).peak_bytes() - 1;
    try {
      process_session<toy_model> s(m, w, job.world(), opt);
    } catch (const error& e) {
      std::fprintf(out, "error %s\n", e.what());
    }
  });
  procs.read_all(60);
  procs.wait_all(10);
  for (std::size_t r = 0; r < 3; ++r) {
    CHECK(exited_ok(procs.status(r)));
    CAPTURE(procs.all_text(r));
    const std::string what = procs.find(r, "error");
    CHECK(what.rfind("the plan does not fit: policy ", 0) == 0);
    CHECK(what.find("world size 3") != std::string::npos);
    CHECK(what.find("needs 1 bytes more than the budget") != std::string::npos);
  }
}

TEST_CASE("process_session refuses options that contradict the job") {
  rank_processes procs(2, [](const net::launch_env& env, std::optional<net::socket> l, FILE* out) {
    const toy_model m(small_toy());
    const toy_weights w(m);
    process_job job(env, {std::chrono::seconds(30)}, {std::chrono::seconds(30)}, std::move(l));
    session_options opt;
    opt.world_size = 3;
    try {
      process_session<toy_model> s(m, w, job.world(), opt);
    } catch (const error& e) {
      std::fprintf(out, "size %s\n", e.what());
    }
    opt.world_size = 2;
    opt.link.latency_s = 1e-3;
    try {
      process_session<toy_model> s(m, w, job.world(), opt);
    } catch (const error& e) {
      std::fprintf(out, "link %s\n", e.what());
    }
  });
  procs.read_all(60);
  procs.wait_all(10);
  for (std::size_t r = 0; r < 2; ++r) {
    CAPTURE(procs.all_text(r));
    CHECK(exited_ok(procs.status(r)));
    CHECK(procs.find(r, "size") == "process_session: world size 3 requested, but the job has 2 processes (WORLD_SIZE)");
    CHECK(procs.find(r, "link").find("leave link unset") != std::string::npos);
  }
}

// ---- failures ---------------------------------------------------------------------------------

TEST_CASE("a rank killed with SIGKILL mid-run: every other rank fails naming it within a few seconds") {
  for (auto [n, victim, policy] : {std::tuple{2, 1, "prefetch:1"}, std::tuple{3, 1, "prefetch:2"},
                                   std::tuple{4, 0, "selective"}, std::tuple{4, 3, "offload+prefetch:1"}}) {
    CAPTURE(n);
    CAPTURE(victim);
    CAPTURE(policy);
    const std::string pol = policy;
    rank_processes procs(static_cast<std::size_t>(n), [&](const net::launch_env& env, std::optional<net::socket> l, FILE* out) {
      const toy_model m(small_toy());
      const toy_weights w(m);
      process_job job(env, {std::chrono::seconds(60)}, {std::chrono::seconds(60)}, std::move(l));
      session_options opt;
      opt.policy = parse_policy(pol).values;
      process_session<toy_model> s(m, w, job.world(), opt);
      auto none = [](std::size_t, toy_state&) {};
      auto done = [](std::size_t, const toy_state&) {};
      s.forward(none, done);
      std::fprintf(out, "ready\n");
      const auto until = clock_type::now() + std::chrono::seconds(60);
      try {
        while (clock_type::now() < until) s.forward(none, done);  // runs until the victim dies
        std::fprintf(out, "no failure seen\n");
      } catch (const rank_failure& e) {
        std::fprintf(out, "failed %d %s\n", e.failed_rank(), e.what());
      }
    });
    const std::string v = std::to_string(victim);
    kill_and_check_survivors(procs, n, victim, v + " rank " + v + " failed during the forward", "during forwards");
  }
}

TEST_CASE("a rank that stops responding (SIGSTOP): the others fail after the timeout naming it, never hang") {
  rank_processes procs(3, [](const net::launch_env& env, std::optional<net::socket> l, FILE* out) {
    const toy_model m(small_toy());
    const toy_weights w(m);
    process_job job(env, {std::chrono::seconds(1)}, {std::chrono::seconds(30)}, std::move(l));
    session_options opt;
    opt.policy = parse_policy("prefetch:1").values;
    process_session<toy_model> s(m, w, job.world(), opt);
    auto none = [](std::size_t, toy_state&) {};
    auto done = [](std::size_t, const toy_state&) {};
    s.forward(none, done);
    std::fprintf(out, "ready\n");
    const auto until = clock_type::now() + std::chrono::seconds(60);
    try {
      while (clock_type::now() < until) s.forward(none, done);
    } catch (const rank_failure& e) {
      std::fprintf(out, "failed %d %s\n", e.failed_rank(), e.what());
    }
  });
  REQUIRE(procs.read_until([&] { return procs.has_line(0, "ready") && procs.has_line(1, "ready") && procs.has_line(2, "ready"); },
                           60));
  const auto stopped_at = clock_type::now();
  procs.stop_rank(2);
  REQUIRE(procs.read_until([&] { return !procs.find(0, "failed").empty() && !procs.find(1, "failed").empty(); }, 30));
  // A hang is found by timeout, and the first rank to time out decides the report: usually each
  // survivor names the stopped rank itself, but a survivor blocked on a peer that is itself
  // blocked on rank 2 may time out on that peer first (a chain of waits, not a wrong report).
  // What must hold: every survivor fails within the timeout's reach, with the no-progress
  // reason, and the stopped rank is named as the one waited on.
  bool stopped_rank_named = false;
  for (std::size_t r = 0; r < 2; ++r) {
    CAPTURE(procs.all_text(r));
    const std::string failure = procs.find(r, "failed");
    CHECK(failure.find("failed during the forward: no progress for 1 s: rank ") != std::string::npos);
    stopped_rank_named = stopped_rank_named || failure.find("waited on rank 2") != std::string::npos;
    for (const auto& line : procs.lines(r))
      if (line.text.rfind("failed ", 0) == 0) {
        const double seconds = std::chrono::duration<double>(line.at - stopped_at).count();
        MESSAGE("rank ", r, " gave up on the stopped rank 2 after ", seconds, " s (timeout 1 s)");
        CHECK(seconds < 5);
      }
  }
  CHECK(stopped_rank_named);
}

TEST_CASE("a rank that throws makes every other rank fail with its reason") {
  rank_processes procs(3, [](const net::launch_env& env, std::optional<net::socket> l, FILE* out) {
    const toy_model m(small_toy());
    const toy_weights w(m);
    process_job job(env, {std::chrono::seconds(60)}, {std::chrono::seconds(60)}, std::move(l));
    session_options opt;
    opt.policy = parse_policy("prefetch:1").values;
    process_session<toy_model> s(m, w, job.world(), opt);
    const int fail_layer = 2;
    try {
      s.forward([&](std::size_t r, toy_state& st) { st.fail_at_layer = r == 1 ? &fail_layer : nullptr; },
                [](std::size_t, const toy_state&) {});
    } catch (const rank_failure& e) {
      std::fprintf(out, "failed %d %s\n", e.failed_rank(), e.what());
    }
    try {
      s.forward([](std::size_t, toy_state&) {}, [](std::size_t, const toy_state&) {});
    } catch (const error& e) {
      std::fprintf(out, "again %s\n", e.what());
    }
  });
  procs.read_all(60);
  procs.wait_all(15);
  for (std::size_t r = 0; r < 3; ++r) {
    CAPTURE(r);
    CAPTURE(procs.all_text(r));
    CHECK(exited_ok(procs.status(r)));
    CHECK(procs.find(r, "failed") == "1 rank 1 failed during the forward: toy block 2: injected failure");
    CHECK(procs.find(r, "again").find("cannot run again") != std::string::npos);
  }
}

// ---- under unshard-launch ---------------------------------------------------------------------

// Runs as a rank under unshard-launch (selected with --no-skip -tc); skipped in a normal run.
TEST_CASE("process worker: toy forward under a launcher" * doctest::skip()) {
  const net::launch_env env = net::read_launch_env();
  const char* kill_rank = std::getenv("UNSHARD_TEST_KILL_RANK");
  const toy_model m(small_toy());
  const toy_weights w(m);
  const auto x = toy_input(m.config());
  reference_runner<toy_model> ref(m, w);
  std::memcpy(ref.state().x, x.data(), x.size() * 4);
  ref.forward();
  auto job = process_job::from_environment({std::chrono::seconds(60)});
  session_options opt;
  opt.policy = parse_policy("prefetch:1").values;
  process_session<toy_model> s(m, w, job->world(), opt);
  s.cap_device_memory(s.plan().peak_bytes());
  bool equal = true;
  const int forwards = kill_rank ? 100000 : 2;
  const auto until = clock_type::now() + std::chrono::seconds(30);
  for (int f = 0; f < forwards && clock_type::now() < until; ++f) {
    if (kill_rank && f == 3 && std::to_string(env.rank) == kill_rank) ::raise(SIGKILL);
    s.forward([&](std::size_t, toy_state& st) { std::memcpy(st.x, x.data(), x.size() * 4); },
              [&](std::size_t, const toy_state& st) { equal &= std::memcmp(st.x, ref.state().x, x.size() * 4) == 0; });
  }
  std::printf("%s bitwise_equal=%d\n", s.peak_line().c_str(), equal ? 1 : 0);
  std::fflush(stdout);
  CHECK(equal);
}

#ifdef UNSHARD_LAUNCH_PATH
namespace {
struct command_result {
  int status = -1;
  std::string output;
};
command_result run_command(const std::string& cmd) {
  command_result r;
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) r.output.append(buf, n);
  r.status = ::pclose(p);
  return r;
}
std::string self_path() { return std::filesystem::read_symlink("/proc/self/exe").string(); }
std::string worker(const std::string& env = "") {
  return env + std::string(UNSHARD_LAUNCH_PATH) + " --nproc 3 --master-port 0 --grace 10 -- " + self_path() +
         " --no-skip --test-case='process worker: toy forward under a launcher'";
}
}  // namespace

TEST_CASE("unshard-launch: three ranks with torchrun's variables; every rank's peak line once, bit-identical") {
  const auto r = run_command(worker());
  CAPTURE(r.output);
  CHECK(WIFEXITED(r.status));
  CHECK(WEXITSTATUS(r.status) == 0);
  for (int rank = 0; rank < 3; ++rank) {
    const std::string key = "rank " + std::to_string(rank) + " planned_peak_bytes=";
    const auto at = r.output.find(key);
    REQUIRE(at != std::string::npos);
    CHECK(r.output.find(key, at + 1) == std::string::npos);
    std::size_t planned = 0, measured = 0;
    int equal = 0;
    REQUIRE(std::sscanf(r.output.c_str() + at + key.size(), "%zu measured_peak_bytes=%zu", &planned, &measured) == 2);
    const auto eq = r.output.find("bitwise_equal=", at);  // after the peak line's other key=value terms
    REQUIRE(eq != std::string::npos);
    REQUIRE(std::sscanf(r.output.c_str() + eq, "bitwise_equal=%d", &equal) == 1);
    CHECK(measured <= planned);
    CHECK(equal == 1);
  }
}

TEST_CASE("unshard-launch: a rank killed by SIGKILL stops the job; the launcher names it, the survivors name it too") {
  const auto t0 = clock_type::now();
  const auto r = run_command(worker("UNSHARD_TEST_KILL_RANK=1 "));
  const double seconds = std::chrono::duration<double>(clock_type::now() - t0).count();
  MESSAGE("launcher with a killed rank returned after ", seconds, " s");
  CAPTURE(r.output);
  CHECK(WIFEXITED(r.status));
  CHECK(WEXITSTATUS(r.status) == 1);
  CHECK(r.output.find("unshard-launch: failed: rank 1 was killed by signal 9 (SIGKILL)") != std::string::npos);
  // Both survivors failed by themselves (within the grace period), naming rank 1.
  std::size_t named = 0;
  for (std::size_t at = 0; (at = r.output.find("rank 1 failed during the forward", at)) != std::string::npos; ++at) ++named;
  CHECK(named >= 2);
  CHECK(r.output.find("unshard-launch: rank 0 exited with status") != std::string::npos);
  CHECK(r.output.find("unshard-launch: rank 2 exited with status") != std::string::npos);
  CHECK(seconds < 30);
}

TEST_CASE("unshard-launch: usage errors exit 2, a program that cannot start exits 1 naming the rank") {
  const std::string launch = UNSHARD_LAUNCH_PATH;
  for (const char* args : {"", " --nproc 2", " --nproc 0 -- true", " --nproc 2 --master-port 70000 -- true",
                           " --nproc x -- true", " --bogus 1 -- true", " -- true"}) {
    CAPTURE(args);
    const auto r = run_command(launch + args);
    CHECK(WEXITSTATUS(r.status) == 2);
    CHECK(r.output.find("usage:") != std::string::npos);
  }
  const auto ok = run_command(launch + " --nproc 2 --master-port 0 -- sh -c 'test \"$WORLD_SIZE\" = 2 && test \"$RANK\" = \"$LOCAL_RANK\"'");
  CHECK(WEXITSTATUS(ok.status) == 0);
  const auto missing = run_command(launch + " --nproc 2 --master-port 0 -- /nonexistent/program");
  CAPTURE(missing.output);
  CHECK(WEXITSTATUS(missing.status) == 1);
  CHECK(missing.output.find("cannot run '/nonexistent/program'") != std::string::npos);
  CHECK(missing.output.find("exited with status 127") != std::string::npos);
}
#endif
