#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "unshard/backend/host/host_backend.hpp"
#include "unshard/backend/host/host_stream.hpp"
#include "unshard/backend/host/host_world.hpp"
#include "unshard/backend/process/process_backend.hpp"
#include "unshard/core/trace.hpp"

using namespace unshard;

namespace concept_checks {  // named, not anonymous: members only the concepts look at are "used"
// A stream with everything but gather_range, chunked unshard's collective: the scheduler calls it
// whatever the backend, so the concept refuses the backend up front.
struct stream_without_gather_range {
  void copy(std::byte*, const std::byte*, std::size_t, std::uint32_t = 0) {}
  void all_gather(const std::byte*, std::byte*, std::size_t, std::uint32_t) {}
  void transfer(std::size_t, std::size_t, const std::byte*, std::byte*, std::size_t, std::uint32_t = 0) {}
  void record(host_event&) {}
  void wait(host_event&) {}
  void synchronize() {}
};
struct backend_without_gather_range {
  using world = host_world;
  using stream = stream_without_gather_range;
  using event = host_event;
  using memory = memory_spaces<host_memory>;
  static constexpr const char* name = "partial";
  static std::unique_ptr<stream> compute_stream(world&, std::size_t, trace_recorder*) { return {}; }
  static std::unique_ptr<stream> comm_stream(world&, std::size_t, trace_recorder*) { return {}; }
};
// A host backend that forgot to say where its memory is.
struct backend_without_memory {
  using world = host_world;
  using stream = host_stream;
  using event = host_event;
  static constexpr const char* name = "no memory";
  static std::unique_ptr<stream> compute_stream(world&, std::size_t, trace_recorder*) { return {}; }
  static std::unique_ptr<stream> comm_stream(world&, std::size_t, trace_recorder*) { return {}; }
};
}  // namespace concept_checks

static_assert(!backend<concept_checks::backend_without_gather_range>);
static_assert(!backend<concept_checks::backend_without_memory>);
// The optional capabilities, by name: the host backends have no memory of their own and load in place.
static_assert(!has_device_backing<host_backend> && !has_host_backing<host_backend> && !has_copy_to_device<host_backend>);
static_assert(has_local_world<host_backend> && !knows_own_rank<host_backend> && !has_failure_reason<host_backend>);
static_assert(!has_local_world<process_backend> && knows_own_rank<process_backend>);
// Host compute is synchronous: the runtime times it with host clocks, not device spans.
static_assert(!has_device_spans<host_backend> && !has_device_spans<process_backend>);
// A host model's state (declares no space) is reachable on the host backends only through host memory.
static_assert(reaches_state<host_backend, int> && reaches_state<process_backend, int>);

namespace {
template <class F>
void on_ranks(std::size_t n, F f) {
  std::vector<std::thread> t;
  for (std::size_t r = 0; r < n; ++r) t.emplace_back([&, r] { f(r); });
  for (auto& th : t) th.join();
}

std::byte pattern(std::size_t rank, std::size_t i, std::size_t round) {
  return std::byte(static_cast<std::uint8_t>((rank * 131 + i * 7 + round * 17) & 0xff));
}
constexpr std::byte untouched{0xee};
constexpr std::size_t guard = 16;  // bytes after each destination that no transfer may write
}  // namespace

TEST_CASE("all_gather: out of place and in place, any world size, repeated") {
  for (std::size_t n : {1, 2, 3, 5, 8}) {
    host_world w(n);
    const std::size_t bytes = 40;
    std::vector<std::vector<std::byte>> recv(n, std::vector<std::byte>(n * bytes));
    std::vector<std::vector<std::byte>> send(n, std::vector<std::byte>(bytes));
    on_ranks(n, [&](std::size_t r) {
      for (int round = 0; round < 3; ++round) {
        for (std::size_t i = 0; i < bytes; ++i) send[r][i] = std::byte(r * 31 + i + round);
        w.all_gather(r, send[r].data(), recv[r].data(), bytes);  // out of place
        for (std::size_t p = 0; p < n; ++p)
          for (std::size_t i = 0; i < bytes; ++i) CHECK(recv[r][p * bytes + i] == std::byte(p * 31 + i + round));
        std::memcpy(recv[r].data() + r * bytes, send[r].data(), bytes);
        std::memset(recv[r].data(), 0xff, r * bytes);
        w.all_gather(r, recv[r].data() + r * bytes, recv[r].data(), bytes);  // in place, as ncclAllGather
        for (std::size_t p = 0; p < n; ++p) CHECK(recv[r][p * bytes] == std::byte(p * 31 + round));
      }
    });
  }
}

TEST_CASE("broadcast and barrier") {
  const std::size_t n = 4;
  host_world w(n);
  std::vector<std::vector<int>> buf(n, std::vector<int>(16, -1));
  on_ranks(n, [&](std::size_t r) {
    if (r == 2)
      for (int i = 0; i < 16; ++i) buf[r][i] = i * i;
    w.broadcast(r, 2, reinterpret_cast<std::byte*>(buf[r].data()), 16 * sizeof(int));
    w.barrier();
  });
  for (std::size_t r = 0; r < n; ++r)
    for (int i = 0; i < 16; ++i) CHECK(buf[r][i] == i * i);
}

TEST_CASE("abort: a rank that dies wakes every waiting rank with an error naming it") {
  const std::size_t n = 3;
  host_world w(n);
  std::vector<std::string> errors(n);
  on_ranks(n, [&](std::size_t r) {
    try {
      if (r == 1) {
        w.abort(1, "loader crashed");
        return;
      }
      std::vector<std::byte> b(8 * n);
      w.all_gather(r, b.data(), b.data(), 8);  // would hang forever without the abort
    } catch (const rank_failure& e) {
      errors[r] = e.what();
      CHECK(e.failed_rank() == 1);
    }
  });
  CHECK(errors[0] == "rank 1 failed: loader crashed");
  CHECK(errors[2] == "rank 1 failed: loader crashed");
  CHECK_THROWS_WITH_AS(host_world(0), doctest::Contains("world size must be at least 1"), error);
}

TEST_CASE("transfer: every (from, to) pair, world sizes 1-5, 0 B, 1 B and 1 MiB; only `to`'s dst changes") {
  for (std::size_t n : {1, 2, 3, 4, 5}) {
    CAPTURE(n);
    host_world w(n);
    std::vector<std::size_t> bad(n, 0);
    on_ranks(n, [&](std::size_t r) {
      for (std::size_t bytes : {std::size_t{0}, std::size_t{1}, std::size_t{1} << 20}) {
        std::vector<std::byte> src(bytes), dst(bytes + guard, untouched);
        for (std::size_t from = 0; from < n; ++from)
          for (std::size_t to = 0; to < n; ++to) {
            const std::size_t round = from * n + to;
            for (std::size_t i = 0; i < bytes; ++i) src[i] = pattern(r, i, round);
            // src is only read on `from`, dst only written on `to`: the other ranks pass null.
            w.transfer(r, from, to, r == from ? src.data() : nullptr, r == to ? dst.data() : nullptr, bytes);
            for (std::size_t i = 0; i < bytes; ++i) bad[r] += src[i] != pattern(r, i, round);
            // Once the call returned, `from` may reuse src at once: `to` has its copy already.
            if (r == from && from != to) std::fill(src.begin(), src.end(), std::byte{0});
            for (std::size_t i = 0; i < bytes; ++i) bad[r] += dst[i] != (r == to ? pattern(from, i, round) : untouched);
            for (std::size_t i = bytes; i < bytes + guard; ++i) bad[r] += dst[i] != untouched;
            std::fill(dst.begin(), dst.end(), untouched);
            w.barrier();  // every rank checked its buffers before the next pair writes them
          }
      }
    });
    for (std::size_t r = 0; r < n; ++r) {
      CAPTURE(r);
      CHECK(bad[r] == 0);
    }
  }
}

TEST_CASE("transfer: from == to is a local move (overlapping too); a bad rank is an error naming it") {
  host_world w(3);
  std::vector<std::byte> buf(64);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = pattern(1, i, 0);
  w.transfer(1, 1, 1, buf.data(), buf.data() + 8, 48);  // memmove semantics, and no barrier: one rank may call it alone
  for (std::size_t i = 0; i < 48; ++i) CHECK(buf[8 + i] == pattern(1, i, 0));
  CHECK_THROWS_WITH_AS(w.transfer(0, 0, 3, buf.data(), buf.data(), 1),
                       "host_world: transfer from rank 0 to rank 3: to is not a rank of this world of size 3", error);
  CHECK_THROWS_WITH_AS(w.transfer(0, 7, 0, buf.data(), buf.data(), 1),
                       "host_world: transfer from rank 7 to rank 0: from is not a rank of this world of size 3", error);
}

TEST_CASE("transfer: a descending chain (each rank sends its buffer, then receives into it); rank 0 collects") {
  for (std::size_t n : {1, 2, 3, 5}) {
    CAPTURE(n);
    host_world w(n);
    const std::size_t bytes = 1000;
    std::vector<std::vector<std::byte>> buf(n, std::vector<std::byte>(bytes));
    std::vector<std::byte> collected(n * bytes, untouched);
    on_ranks(n, [&](std::size_t r) {
      for (std::size_t i = 0; i < bytes; ++i) buf[r][i] = pattern(r, i, 0);
      // The latents move one step on: rank s's buffer goes to rank s + 1, last pair first, so a
      // rank's send has completed before its receive overwrites the same buffer.
      for (std::size_t s = n; s-- > 1;) w.transfer(r, s - 1, s, buf[r].data(), buf[r].data(), bytes);
      // Rank 0 collects every rank's buffer (its own through from == to).
      for (std::size_t s = 0; s < n; ++s)
        w.transfer(r, s, 0, buf[r].data(), r == 0 ? collected.data() + s * bytes : nullptr, bytes);
    });
    for (std::size_t r = 0; r < n; ++r) {
      CAPTURE(r);
      const std::size_t origin = r == 0 ? 0 : r - 1;
      std::size_t bad = 0;
      for (std::size_t i = 0; i < bytes; ++i) bad += buf[r][i] != pattern(origin, i, 0);
      for (std::size_t i = 0; i < bytes; ++i) bad += collected[r * bytes + i] != pattern(origin, i, 0);
      CHECK(bad == 0);
    }
  }
}

TEST_CASE("transfer on a worker stream: after the ops queued before it, done at synchronize(), traced on endpoints") {
  const std::size_t n = 3, bytes = 4096;
  host_world w(n);
  trace_recorder trace;
  std::vector<std::vector<std::byte>> staging(n, std::vector<std::byte>(bytes));
  std::vector<std::vector<std::byte>> shard(n, std::vector<std::byte>(bytes));
  std::vector<std::vector<std::byte>> gathered(n, std::vector<std::byte>(n * bytes, untouched));
  std::vector<std::vector<std::byte>> out(n, std::vector<std::byte>(n * bytes, untouched));
  on_ranks(n, [&](std::size_t r) {
    host_stream comm(w, r, host_stream::mode::worker_stream, &trace);
    comm.set_copy_link({0.0, 1e6});  // ~4 ms per copy: the transfer would overtake a copy it is not ordered after
    for (std::size_t i = 0; i < bytes; ++i) staging[r][i] = pattern(r, i, 5);
    comm.copy(shard[r].data(), staging[r].data(), bytes, 1);                   // host -> "device"
    comm.local_copy(gathered[r].data() + r * bytes, shard[r].data(), bytes);  // into its slot
    comm.all_gather(gathered[r].data() + r * bytes, gathered[r].data(), bytes, 2);
    // Rank 1 hands its gathered buffer to rank 0; rank 2 only keeps the collective order.
    comm.transfer(1, 0, r == 1 ? gathered[r].data() : nullptr, r == 0 ? out[r].data() : nullptr, n * bytes, 7);
    comm.synchronize();
  });
  std::size_t bad = 0;
  for (std::size_t p = 0; p < n; ++p)
    for (std::size_t i = 0; i < bytes; ++i) bad += out[0][p * bytes + i] != pattern(p, i, 5);
  for (std::size_t r = 1; r < n; ++r)
    for (const std::byte b : out[r]) bad += b != untouched;
  CHECK(bad == 0);
  std::vector<std::size_t> transfers(n, 0);
  for (const auto& e : trace.entries())
    if (e.kind == trace_kind::gather && e.unit == 7) {
      CHECK(e.bytes == n * bytes);
      CHECK(e.begin <= e.end);
      ++transfers[e.rank];
    }
  CHECK(transfers == std::vector<std::size_t>{1, 1, 0});
  // A bad endpoint is refused on the caller's thread, before anything is queued.
  host_stream comm(w, 0, host_stream::mode::worker_stream);
  CHECK_THROWS_WITH_AS(comm.transfer(0, 5, nullptr, nullptr, 1),
                       doctest::Contains("to is not a rank of this world of size 3"), error);
  comm.synchronize();
}
