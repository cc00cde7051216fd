#pragma once
// A progress line while weights load: bytes so far, the rate and the time left, redrawn on one
// terminal line of stderr twice a second; nothing at all when stderr is not a terminal (piped or
// redirected output stays clean), and nothing for a load that ends within the first second.
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>

#include "unshard/runtime/weight_source.hpp"

namespace unshard::cli {

class load_progress_line {
 public:
  // `expected_bytes`: what the load should come to (the model's parameter bytes), for the ETA.
  load_progress_line(std::string tool, std::uint64_t expected_bytes)
      : tool_(std::move(tool)), expected_(expected_bytes), start_bytes_(load_progress::bytes()) {
    if (::isatty(STDERR_FILENO)) thread_ = std::thread([this] { run(); });
  }
  ~load_progress_line() {
    if (!thread_.joinable()) return;
    {
      std::lock_guard lock(mutex_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  load_progress_line(const load_progress_line&) = delete;
  load_progress_line& operator=(const load_progress_line&) = delete;

 private:
  void run() {
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    bool drawn = false;
    std::unique_lock lock(mutex_);
    while (!cv_.wait_for(lock, std::chrono::milliseconds(500), [&] { return done_; })) {
      const double s = std::chrono::duration<double>(clock::now() - t0).count();
      if (s < 1.0) continue;
      const double got = static_cast<double>(load_progress::bytes() - start_bytes_), rate = got / s;
      const double left = expected_ > got && rate > 0 ? (static_cast<double>(expected_) - got) / rate : 0.0;
      std::fprintf(stderr, "\r%s: loading weights: %.2f / %.2f GiB, %.0f MB/s, ETA %.0f s   ", tool_.c_str(),
                   got / (1u << 30), static_cast<double>(expected_) / (1u << 30), rate / 1e6, left);
      std::fflush(stderr);
      drawn = true;
    }
    if (drawn) std::fprintf(stderr, "\n");
  }

  std::string tool_;
  std::uint64_t expected_, start_bytes_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

// The parameter bytes of a model: every layer's every sub-unit's parameters.
template <class M>
std::uint64_t parameter_bytes(const M& m) {
  std::uint64_t n = 0;
  for (std::size_t l = 0; l < m.layer_count(); ++l)
    for (std::size_t s = 0; s < m.layer(l).subunit_count(); ++s)
      for (const auto& p : m.layer(l).parameters(s)) n += static_cast<std::uint64_t>(p.dims.numel()) * size_of(p.type);
  return n;
}

}  // namespace unshard::cli

namespace unshard::cli {

// make() (a session's construction, which loads every rank's shard) with the progress line shown
// meanwhile; returns what make() returns (a prvalue: sessions need not be movable).
template <class Model, class Make>
auto while_loading(const char* tool, const Model& m, Make&& make) {
  const load_progress_line line(tool, parameter_bytes(m));
  return make();
}

}  // namespace unshard::cli
