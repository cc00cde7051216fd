#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "unshard/backend/host/host_backend.hpp"
#include "unshard/plan/ledger.hpp"
#include "unshard/runtime/rank_runtime.hpp"

namespace unshard {

struct session_options {
  std::size_t world_size = 1;
  policy_values policy{};
  std::size_t budget_bytes = 0;   // device memory per rank; 0: exactly the planned peak
  link_model link{};              // simulated interconnect for gathers
  link_model host_to_device{};    // simulated PCIe for offload copies
  bool trace = false;
  schedule_kind schedule = schedule_kind::replicated;  // what each rank computes on (schedule/schedule.hpp)
  std::size_t steps = 0;          // denoising steps; 0: as many as the model keeps state for
};

// The schedule a session runs: the options' kind over the model's steps unless they say otherwise.
template <model M>
schedule schedule_of(const M& m, const session_options& opt) {
  schedule s{opt.schedule, opt.steps ? opt.steps : steps_of(m.buffers())};
  s.validate(opt.world_size);
  return s;
}

// Measured memory of one rank after the forwards so far.
struct rank_measurement {
  std::size_t peak_bytes = 0;        // high-water mark of the device total
  category_bytes at_peak{};          // its composition
  category_bytes category_peaks{};   // each category's own high-water mark
  std::size_t host_peak_bytes = 0;
};

// What a rank's tracking allocators saw (shared by the threaded and the per-process sessions).
template <class Runtime>
rank_measurement measure(const Runtime& rt) {
  rank_measurement m;
  m.peak_bytes = rt.device_memory().peak_total();
  m.at_peak = rt.device_memory().at_peak();
  for (auto c : all_memory_categories) m.category_peaks[c] = rt.device_memory().peak(c);
  m.host_peak_bytes = rt.host_memory().peak_total();
  return m;
}

// A plan over its budget is refused before anything is allocated, with its terms in the message.
inline void require_fits(const memory_plan& plan) {
  if (!plan.fits())
    throw_error("the plan does not fit: ", plan.describe(), "; needs ", plan.peak_bytes() - plan.budget_bytes,
                " bytes more than the budget");
}

// A sharded model ready to run: plans the memory, refuses a plan over budget before allocating
// anything, starts one thread per rank, loads each rank's shard, and then runs forwards on
// demand. Rank threads live as long as the session, so a forward creates no thread and
// allocates nothing.
template <model M, backend B = host_backend>
class session {
 public:
  using state_type = typename M::state;
  static_assert(has_local_world<B>,
                "session runs every rank as a thread of this process and builds B::world(world_size, link); this "
                "backend's world spans processes: use process_session (runtime/process_session.hpp)");

  template <weight_source S>
  session(const M& m, const S& weights, session_options opt)
      : model_(m), opt_(std::move(opt)), sched_(schedule_of(m, opt_)), units_(build_units(m, opt_.world_size, opt_.policy)),
        plan_(plan_memory(m, opt_.world_size, opt_.policy, opt_.budget_bytes, sched_)),
        world_(opt_.world_size, opt_.link), trace_(opt_.trace ? std::make_unique<trace_recorder>() : nullptr) {
    require_fits(plan_);
    const std::size_t capacity = opt_.budget_bytes ? opt_.budget_bytes : plan_.peak_bytes();
    runtimes_.resize(opt_.world_size);
    errors_.resize(opt_.world_size);
    for (std::size_t r = 0; r < opt_.world_size; ++r)
      threads_.emplace_back([this, r, capacity, &weights] { rank_main(r, capacity, weights); });
    wait_all_done();
    if (failed_) {
      shutdown();
      rethrow_failure("while loading");
    }
  }

  ~session() { shutdown(); }
  session(const session&) = delete;
  session& operator=(const session&) = delete;

  // Runs one forward on every rank (on lane 0; a rank without lanes serves the gathers only).
  // prepare(rank, state&) runs on each rank before it (set the inputs), finish(rank, const state&)
  // after it (read the outputs).
  template <class Prepare, class Finish>
  void forward(Prepare&& prepare, Finish&& finish) {
    on_every_rank("during the forward", [&](std::size_t r, runtime_type& rt) {
      if (rt.lane_count()) prepare(r, rt.state());
      rt.forward();
      if (rt.lane_count()) finish(r, std::as_const(rt.state()));
    });
  }

  // Runs one tick on every rank (rank_runtime.hpp, run_tick_on): prepare(rank, lane, state&) ->
  // bool, finish(rank, lane, state&), then the transfers messages(rank, lanes) lists.
  template <class Prepare, class Finish, class Messages>
  void tick(Prepare&& prepare, Finish&& finish, Messages&& messages) {
    on_every_rank("during a tick", [&](std::size_t r, runtime_type& rt) { run_tick_on(r, rt, prepare, finish, messages); });
  }

  const memory_plan& plan() const noexcept { return plan_; }
  const unshard::schedule& schedule() const noexcept { return sched_; }
  const std::vector<unit_layout>& units() const noexcept { return units_; }
  std::size_t world_size() const noexcept { return opt_.world_size; }
  trace_recorder* trace() noexcept { return trace_.get(); }
  const M& model() const noexcept { return model_; }

  rank_measurement measured(std::size_t rank) const { return measure(*runtimes_.at(rank)); }
  const rank_runtime<M, B>& runtime(std::size_t rank) const { return *runtimes_.at(rank); }

  // Lowers every rank's cap (tests cap it at the planned peak; an overshoot then throws).
  void cap_device_memory(std::size_t cap) {
    for (auto& rt : runtimes_) rt->cap_device_memory(cap);
  }

 private:
  using runtime_type = rank_runtime<M, B>;
  // The work of one command on one rank, type-erased: the rank threads outlive every call.
  struct rank_job {
    const void* object = nullptr;
    void (*call)(const void*, std::size_t, runtime_type&) = nullptr;
  };

  template <class F>
  void on_every_rank(const char* when, F&& f) {
    if (failed_) throw_error("session: a rank failed earlier; this session cannot run again");
    job_ = {&f, [](const void* o, std::size_t r, runtime_type& rt) { (*static_cast<std::remove_reference_t<F>*>(const_cast<void*>(o)))(r, rt); }};
    {
      std::lock_guard lock(mutex_);
      done_ = 0;
      ++command_;
    }
    cv_.notify_all();
    wait_all_done();
    if (failed_) rethrow_failure(when);
  }

  template <weight_source S>
  void rank_main(std::size_t r, std::size_t capacity, const S& weights) {
    std::uint64_t seen = 0;
    try {
      runtimes_[r] = std::make_unique<rank_runtime<M, B>>(model_, weights, units_, opt_.policy, plan_, world_, r,
                                                          capacity, trace_.get(), opt_.host_to_device, sched_);
    } catch (...) {
      record_failure(r, std::current_exception());
    }
    for (;;) {
      report_done();
      {
        std::unique_lock lock(mutex_);
        cv_.wait(lock, [&] { return stop_ || command_ != seen; });
        if (stop_) return;
        seen = command_;
      }
      if (failed_) continue;
      try {
        job_.call(job_.object, r, *runtimes_[r]);
      } catch (...) {
        record_failure(r, std::current_exception());
      }
    }
  }

  void record_failure(std::size_t r, std::exception_ptr e) {
    std::string what = "unknown exception";
    try {
      std::rethrow_exception(e);
    } catch (const rank_failure&) {
      // A consequence of another rank's failure: that rank's own error is the one to report.
      std::lock_guard lock(mutex_);
      failed_ = true;
      return;
    } catch (const std::exception& ex) {
      what = ex.what();
    } catch (...) {
    }
    world_.abort(r, what);
    std::lock_guard lock(mutex_);
    failed_ = true;
    if (!errors_[r]) errors_[r] = e;
  }

  [[noreturn]] void rethrow_failure(const char* when) {
    const int r = world_.aborted() ? world_.failed_rank() : 0;
    std::string what = "unknown error";
    try {
      if (errors_[static_cast<std::size_t>(r)]) std::rethrow_exception(errors_[static_cast<std::size_t>(r)]);
    } catch (const std::exception& e) {
      what = e.what();
    }
    throw rank_failure(r, detail::concat("rank ", r, " failed ", when, ": ", what));
  }

  void report_done() {
    {
      std::lock_guard lock(mutex_);
      ++done_;
    }
    cv_.notify_all();
  }
  void wait_all_done() {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return done_ == opt_.world_size; });
  }

  void shutdown() noexcept {
    {
      std::lock_guard lock(mutex_);
      if (stop_) return;
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_)
      if (t.joinable()) t.join();
    for (auto& rt : runtimes_)
      if (rt) rt->stop_communication();
    runtimes_.clear();
  }

  const M& model_;
  session_options opt_;
  unshard::schedule sched_;
  std::vector<unit_layout> units_;
  memory_plan plan_;
  typename B::world world_;
  std::unique_ptr<trace_recorder> trace_;
  std::vector<std::unique_ptr<rank_runtime<M, B>>> runtimes_;
  std::vector<std::exception_ptr> errors_;
  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::uint64_t command_ = 0;
  std::size_t done_ = 0;
  bool stop_ = false;
  std::atomic<bool> failed_{false};
  rank_job job_;
};

}  // namespace unshard
