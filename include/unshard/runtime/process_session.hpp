#pragma once
// One rank of a sharded model, run by this process: the per-process counterpart of session (which
// runs every rank as a thread). Under a launcher each process builds a process_world from the
// launch variables, then a process_session over it; the plan, the budget check, the loading of
// this rank's shard and the forward are the same code as the threaded session's.
#include <cstddef>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "unshard/backend/net/launch_env.hpp"
#include "unshard/backend/net/rendezvous.hpp"
#include "unshard/backend/process/process_backend.hpp"
#include "unshard/runtime/session.hpp"

namespace unshard {

// The job this process belongs to, from the launch variables (torchrun's or Slurm's): the
// rendezvous on MASTER_ADDR:MASTER_PORT, then the mesh between the ranks.
class process_job {
 public:
  explicit process_job(const net::launch_env& env, process_world_options opt = {},
                       net::rendezvous_options rv_opt = {}, std::optional<net::socket> listener = {})
      : env_(env), rendezvous_(env, rv_opt, std::move(listener)), world_(rendezvous_, opt) {}
  static std::unique_ptr<process_job> from_environment(process_world_options opt = {}) {
    return std::make_unique<process_job>(net::read_launch_env(), opt);
  }

  const net::launch_env& env() const noexcept { return env_; }
  net::rendezvous& rendezvous() noexcept { return rendezvous_; }
  process_world& world() noexcept { return world_; }

 private:
  net::launch_env env_;
  net::rendezvous rendezvous_;
  process_world world_;
};

template <model M>
class process_session {
 public:
  using state_type = typename M::state;

  // opt.world_size is the job's (left at 0 or 1, or equal to WORLD_SIZE); opt.link must stay
  // unset (the link is real); opt.host_to_device still simulates PCIe for offload copies. Throws before allocating anything when the plan exceeds the budget; every
  // rank computes the same plan, so every rank refuses alike.
  template <weight_source S>
  process_session(const M& m, const S& weights, process_world& world, session_options opt)
      : model_(m), world_(world), opt_(checked(std::move(opt), world)),
        units_(build_units(m, opt_.world_size, opt_.policy)),
        plan_(plan_memory(m, opt_.world_size, opt_.policy, opt_.budget_bytes)),
        trace_(opt_.trace ? std::make_unique<trace_recorder>() : nullptr) {
    if (!plan_.fits())
      throw_error("the plan does not fit: ", plan_.describe(), "; needs ", plan_.peak_bytes() - opt_.budget_bytes,
                  " bytes more than the budget");
    const std::size_t capacity = opt_.budget_bytes ? opt_.budget_bytes : plan_.peak_bytes();
    guarded("while loading", [&] {
      runtime_ = std::make_unique<rank_runtime<M, process_backend>>(m, weights, units_, opt_.policy, plan_, world_,
                                                                   world_.rank(), capacity, trace_.get(),
                                                                   opt_.host_to_device);
    });
  }
  ~process_session() {
    if (runtime_) runtime_->stop_communication();
  }
  process_session(const process_session&) = delete;
  process_session& operator=(const process_session&) = delete;

  // One forward on this rank: prepare(rank, state&) sets the inputs, finish(rank, const state&)
  // reads the outputs. A failure here or on any other rank throws rank_failure naming the rank
  // that failed first; the session cannot run again after it.
  template <class Prepare, class Finish>
  void forward(Prepare&& prepare, Finish&& finish) {
    if (failed_) throw_error("process_session: a rank failed earlier; this session cannot run again");
    guarded("during the forward", [&] {
      prepare(world_.rank(), runtime_->state());
      runtime_->forward();
      finish(world_.rank(), std::as_const(runtime_->state()));
    });
  }

  std::size_t rank() const noexcept { return world_.rank(); }
  std::size_t world_size() const noexcept { return opt_.world_size; }
  const memory_plan& plan() const noexcept { return plan_; }
  const std::vector<unit_layout>& units() const noexcept { return units_; }
  trace_recorder* trace() noexcept { return trace_.get(); }
  const M& model() const noexcept { return model_; }
  process_world& world() noexcept { return world_; }

  // This rank's measured memory (the other ranks' live in their processes).
  rank_measurement measured() const {
    const auto& rt = *runtime_;
    rank_measurement m;
    m.peak_bytes = rt.device_memory().peak_total();
    m.at_peak = rt.device_memory().at_peak();
    for (auto c : all_memory_categories) m.category_peaks[c] = rt.device_memory().peak(c);
    m.host_peak_bytes = rt.host_memory().peak_total();
    return m;
  }
  void cap_device_memory(std::size_t cap) noexcept { runtime_->cap_device_memory(cap); }

  // "rank R planned_peak_bytes=N measured_peak_bytes=M" (CONVENTIONS.md): each process prints
  // its own line, so a launcher's combined output has every rank once.
  std::string peak_line() const {
    const auto& planned = plan_.ranks[rank()];
    return detail::concat("rank ", rank(), " planned_peak_bytes=", planned.peak(),
                          " measured_peak_bytes=", measured().peak_bytes);
  }

 private:
  static session_options checked(session_options opt, const process_world& world) {
    // The job decides the world size: 0 or session_options' default 1 mean "the job's".
    if (opt.world_size > 1 && opt.world_size != world.size())
      throw_error("process_session: world size ", opt.world_size, " requested, but the job has ", world.size(),
                  " processes (WORLD_SIZE)");
    if (opt.link.seconds_for(1) > 0)
      throw_error("process_session: session_options.link simulates the threaded backend's interconnect; the process"
                  " backend's link is the real one (leave link unset)");
    opt.world_size = world.size();
    return opt;
  }

  // Runs f; a local error aborts the job (every peer then fails naming this rank), and any
  // failure is rethrown as rank_failure naming the rank that failed first, as session does.
  template <class F>
  void guarded(const char* when, F&& f) {
    try {
      f();
    } catch (const rank_failure&) {
      failed_ = true;
      throw rank_failure(world_.failed_rank(), detail::concat("rank ", world_.failed_rank(), " failed ", when, ": ",
                                                              world_.failure_reason()));
    } catch (const std::exception& e) {
      failed_ = true;
      world_.abort(world_.rank(), e.what());
      throw rank_failure(world_.failed_rank(), detail::concat("rank ", world_.failed_rank(), " failed ", when, ": ",
                                                              world_.failure_reason()));
    }
  }

  const M& model_;
  process_world& world_;
  session_options opt_;
  std::vector<unit_layout> units_;
  memory_plan plan_;
  std::unique_ptr<trace_recorder> trace_;
  std::unique_ptr<rank_runtime<M, process_backend>> runtime_;
  bool failed_ = false;
};

}  // namespace unshard
