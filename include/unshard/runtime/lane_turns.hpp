#pragma once
// Round-robin turns between a rank's lanes, so a streamed weight chunk serves every forward of a
// tick before it is released, while each lane's forward stays the code it is alone.
//
// Under chunked unshard a layer reads its weights chunk by chunk in the middle of its forward. To
// apply chunk g to k forwards before releasing it, the forwards must be interleaved at chunk
// boundaries: lane 0 runs until it asks for chunk g and hands the turn on, lane 1 runs until it
// asks for chunk g, ..., and when the turn comes back to lane 0 every lane has finished with chunk
// g - 1. Exactly one lane runs at any time (the rest wait for the turn), so the lanes share the
// rank's streams and bookkeeping without further locking and the result is the same as running
// the forwards one after another.
//
//   lane 0: |--c0--|yield              |--c1--|yield             ...
//   lane 1:         |--c0--|yield              |--c1--|yield
//   lane 2:                 |--c0--|yield              |--c1--|yield
//
// Lanes 1.. run on threads created once with the runtime (a tick creates no thread); lane 0 is the
// caller's thread.
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace unshard {

class lane_turns {
 public:
  // Thrown in a lane that waits for its turn when another lane failed: unwinds it quietly; run()
  // rethrows the failing lane's own exception.
  struct cancelled {};

  // on_thread_start: run first on each helper thread (a backend binds it to the rank's device).
  explicit lane_turns(std::size_t max_lanes, std::function<void()> on_thread_start = {}) {
    for (std::size_t i = 1; i < max_lanes; ++i)
      threads_.emplace_back([this, i, on_thread_start] {
        if (on_thread_start) on_thread_start();
        helper_main(i);
      });
  }
  ~lane_turns() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  lane_turns(const lane_turns&) = delete;
  lane_turns& operator=(const lane_turns&) = delete;

  std::size_t max_lanes() const noexcept { return threads_.size() + 1; }

  // Runs body(0) .. body(n - 1) in turns (n <= max_lanes()); returns when all have returned, and
  // rethrows the first exception one of them threw.
  void run(std::size_t n, const std::function<void(std::size_t)>& body) {
    {
      std::lock_guard lock(mutex_);
      body_ = &body;
      active_ = n;
      turn_ = 0;
      running_ = n;
      finished_.assign(n, false);
      failure_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    run_lane(0);
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return running_ == 0; });
    body_ = nullptr;
    if (failure_) std::rethrow_exception(failure_);
  }

  // Called by lane i at a turn point: hands the turn to the next lane still running and waits for
  // it to come back. Returns whether another lane had the turn meanwhile (false: none is running,
  // or the tick has one lane). Throws `cancelled` if another lane failed meanwhile.
  bool yield(std::size_t i) {
    std::unique_lock lock(mutex_);
    if (active_ <= 1 && !failure_) return false;
    pass_turn_locked(i);
    const bool passed = turn_ != i;
    cv_.notify_all();
    cv_.wait(lock, [&] { return turn_ == i || failure_; });
    if (failure_) throw cancelled{};
    return passed;
  }

 private:
  void helper_main(std::size_t i) {
    std::uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock lock(mutex_);
        cv_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
        if (i >= active_) continue;
      }
      run_lane(i);
    }
  }

  // A lane waits for its first turn, runs its body, then hands the turn on for good.
  void run_lane(std::size_t i) {
    std::exception_ptr failed;
    {
      std::unique_lock lock(mutex_);
      cv_.wait(lock, [&] { return turn_ == i || failure_; });
    }
    try {
      bool cancelled_before_start = false;
      {
        std::lock_guard lock(mutex_);
        cancelled_before_start = failure_ != nullptr;
      }
      if (!cancelled_before_start) (*body_)(i);
    } catch (const cancelled&) {
    } catch (...) {
      failed = std::current_exception();
    }
    {
      std::lock_guard lock(mutex_);
      if (failed && !failure_) failure_ = failed;
      finished_[i] = true;
      --running_;
      if (turn_ == i) pass_turn_locked(i);
    }
    cv_.notify_all();
  }

  void pass_turn_locked(std::size_t i) {
    for (std::size_t k = 1; k <= active_; ++k) {
      const std::size_t next = (i + k) % active_;
      if (!finished_[next]) {
        turn_ = next;
        return;
      }
    }
    turn_ = active_;  // nobody left
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<std::thread> threads_;
  const std::function<void(std::size_t)>* body_ = nullptr;
  std::vector<bool> finished_;
  std::size_t active_ = 0, turn_ = 0, running_ = 0;
  std::uint64_t generation_ = 0;
  bool stopping_ = false;
  std::exception_ptr failure_;
};

}  // namespace unshard
