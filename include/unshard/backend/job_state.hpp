#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <string>
#include <thread>

#include "unshard/core/error.hpp"

namespace unshard {

// What every rank of a job shares about its health, and the one lock its waits go through:
// the first failure wins, and every blocked or later wait then throws rank_failure naming the
// failed rank (NCCL's async error + abort). The worlds (threads or processes) build on it; the
// host stream's queue state and host_world's collectives live under the same lock (wait/update).
class job_state {
 public:
  // settle_waits: yield a few times before a wait sleeps (see settle()), for waits that mostly end
  // within microseconds, as host_world's threads' do.
  explicit job_state(bool settle_waits = false) : settle_waits_(settle_waits) {}

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
    const auto done = [&] { return aborted_.load() || pred(); };
    if (settle_waits_) settle(lock, done);
    cv_.wait(lock, done);
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
  // Runs f under the lock and returns its result without waking anyone: for changes no waiter is
  // waiting for (a buffer published before a barrier, a barrier arrival that is not the last).
  template <class F>
  decltype(auto) with_lock(F f) {
    std::lock_guard lock(mutex_);
    return f();
  }
  // Wakes every waiter (after a with_lock change that some of them wait for).
  void wake_all() { cv_.notify_all(); }

 private:
  // Most waits end within microseconds (a peer slightly behind, a chunk about to land): yielding a
  // few times before sleeping saves a futex sleep and wake-up per wait, which dominated chunk-sized
  // collectives (measured on 2 cores, one-row chunks of the toy model: ~80-190 us per chunk with a
  // plain condition-variable wait, ~7-30 us with this).
  template <class Done>
  static void settle(std::unique_lock<std::mutex>& lock, const Done& done) {
    for (int i = 0; i < 32 && !done(); ++i) {
      lock.unlock();
      std::this_thread::yield();
      lock.lock();
    }
  }

  const bool settle_waits_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::atomic<bool> aborted_{false};
  std::size_t failed_rank_ = 0;
  std::string failure_;
};

}  // namespace unshard
