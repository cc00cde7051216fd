#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <string>

#include "unshard/core/error.hpp"

namespace unshard {

// What every rank of a job shares about its health, and the one lock its waits go through:
// the first failure wins, and every blocked or later wait then throws rank_failure naming the
// failed rank (NCCL's async error + abort). The worlds (threads or processes) build on it; the
// host stream's queue state lives under the same lock (wait/update).
class job_state {
 public:
  // Records a failure; false if an earlier one was recorded (that one stands).
  bool abort(std::size_t rank, const std::string& why) {
    {
      std::lock_guard lock(mutex_);
      if (aborted_.load()) return false;
      failed_rank_ = rank;
      failure_ = why;
      aborted_.store(true);
    }
    cv_.notify_all();
    return true;
  }
  bool aborted() const noexcept { return aborted_.load(); }
  int failed_rank() const {
    std::lock_guard lock(mutex_);
    return static_cast<int>(failed_rank_);
  }
  std::string failure_reason() const {
    std::lock_guard lock(mutex_);
    return failure_;
  }
  [[noreturn]] void throw_aborted() const {
    std::lock_guard lock(mutex_);
    throw rank_failure(static_cast<int>(failed_rank_), detail::concat("rank ", failed_rank_, " failed: ", failure_));
  }

  // Blocks until pred() (evaluated under the lock) holds; throws if the job aborts first.
  template <class Pred>
  void wait(Pred pred) {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return aborted_.load() || pred(); });
    if (aborted_.load() && !pred()) {
      lock.unlock();
      throw_aborted();
    }
  }
  // Changes shared state under the lock, then wakes every waiter.
  template <class F>
  void update(F f) {
    {
      std::lock_guard lock(mutex_);
      f();
    }
    cv_.notify_all();
  }

 private:
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::atomic<bool> aborted_{false};
  std::size_t failed_rank_ = 0;
  std::string failure_;
};

}  // namespace unshard
