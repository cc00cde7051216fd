#include <doctest/doctest.h>

#include <cstring>
#include <thread>
#include <vector>

#include "unshard/backend/host/host_world.hpp"

using namespace unshard;

namespace {
template <class F>
void on_ranks(std::size_t n, F f) {
  std::vector<std::thread> t;
  for (std::size_t r = 0; r < n; ++r) t.emplace_back([&, r] { f(r); });
  for (auto& th : t) th.join();
}
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
