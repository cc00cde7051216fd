#pragma once
// One rank of a sharded model, run by this process: the per-process counterpart of session (which
// runs every rank as a thread). Under a launcher each process builds a process_world from the
// launch variables, then a process_session over it; the plan, the budget check, the loading of
// this rank's shard and the forward are the same code as the threaded session's.
#include <chrono>
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
  // UNSHARD_TIMEOUT, when set, replaces both timeouts (joining: rendezvous; a collective with no
  // progress: here).
  static std::unique_ptr<process_job> from_environment(process_world_options opt = {}) {
    const net::launch_env env = net::read_launch_env();
    if (env.timeout_s) opt.timeout = std::chrono::seconds(env.timeout_s);
    return std::make_unique<process_job>(env, opt);
  }

  const net::launch_env& env() const noexcept { return env_; }
  net::rendezvous& rendezvous() noexcept { return rendezvous_; }
  process_world& world() noexcept { return world_; }

 private:
  net::launch_env env_;
  net::rendezvous rendezvous_;
  process_world world_;
};

// One rank of a job in this process, over any backend whose world spans processes: process_world
// (ranks over TCP), or cuda_world built from the launch environment (one GPU per process, NCCL).
template <model M, backend B = process_backend>
class process_session {
 public:
  using state_type = typename M::state;
  using world_type = typename B::world;

  // opt.world_size is the job's (left at 0 or 1, or equal to WORLD_SIZE); opt.link must stay
  // unset (the link is real); opt.host_to_device still simulates PCIe for offload copies. Throws before allocating anything when the plan exceeds the budget; every
  // rank computes the same plan, so every rank refuses alike.
  template <weight_source S>
  process_session(const M& m, const S& weights, world_type& world, session_options opt)
    requires knows_own_rank<B>
      : process_session(m, weights, world, world.rank(), std::move(opt)) {}

  // `rank` is this process's rank in the world (a cuda_world holds only its local ranks).
  template <weight_source S>
  process_session(const M& m, const S& weights, world_type& world, std::size_t rank, session_options opt)
      : model_(m), world_(world), rank_(rank), opt_(checked(std::move(opt), world)), sched_(schedule_of(m, opt_)),
        units_(build_units(m, opt_.world_size, opt_.policy)),
        plan_(plan_memory(m, opt_.world_size, opt_.policy, opt_.budget_bytes, sched_)),
        trace_(opt_.trace ? std::make_unique<trace_recorder>() : nullptr) {
    require_fits(plan_);
    const std::size_t capacity = opt_.budget_bytes ? opt_.budget_bytes : plan_.peak_bytes();
    guarded("while loading", [&] {
      runtime_ = std::make_unique<rank_runtime<M, B>>(m, weights, units_, opt_.policy, plan_, world_, rank_, capacity,
                                                     trace_.get(), opt_.host_to_device, sched_);
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
      if (runtime_->lane_count()) prepare(rank_, runtime_->state());
      runtime_->forward();
      if (runtime_->lane_count()) finish(rank_, std::as_const(runtime_->state()));
    });
  }

  // One tick on this rank (rank_runtime.hpp, run_tick_on); the other ranks run theirs in their
  // processes, in lockstep through the collectives.
  template <class Prepare, class Finish, class Messages>
  void tick(Prepare&& prepare, Finish&& finish, Messages&& messages) {
    if (failed_) throw_error("process_session: a rank failed earlier; this session cannot run again");
    guarded("during a tick", [&] { run_tick_on(rank_, *runtime_, prepare, finish, messages); });
  }

  std::size_t rank() const noexcept { return rank_; }
  std::size_t world_size() const noexcept { return opt_.world_size; }
  const memory_plan& plan() const noexcept { return plan_; }
  const unshard::schedule& schedule() const noexcept { return sched_; }
  const rank_runtime<M, B>& runtime() const noexcept { return *runtime_; }
  const std::vector<unit_layout>& units() const noexcept { return units_; }
  trace_recorder* trace() noexcept { return trace_.get(); }
  const M& model() const noexcept { return model_; }
  world_type& world() noexcept { return world_; }

  // This rank's measured memory (the other ranks' live in their processes).
  rank_measurement measured() const { return measure(*runtime_); }
  void cap_device_memory(std::size_t cap) noexcept { runtime_->cap_device_memory(cap); }

  // "rank R planned_peak_bytes=N measured_peak_bytes=M" (docs/conventions.md): each process prints
  // its own line, so a launcher's combined output has every rank once.
  std::string peak_line() const {
    const auto& planned = plan_.ranks[rank()];
    return detail::concat("rank ", rank(), " planned_peak_bytes=", planned.peak(),
                          " measured_peak_bytes=", measured().peak_bytes, " bytes_gathered=", runtime_->bytes_gathered(),
                          " forwards=", runtime_->forwards());
  }

 private:
  static session_options checked(session_options opt, const world_type& world) {
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
    } catch (const rank_failure& e) {
      failed_ = true;
      throw failure(when, e);
    } catch (const std::exception& e) {
      failed_ = true;
      world_.abort(rank_, e.what());
      throw failure(when, e);
    }
  }
  // "rank R failed <when>: <why>", R being the rank that failed first (perhaps another process).
  rank_failure failure(const char* when, const std::exception& e) const {
    const int first = world_.failed_rank();
    if constexpr (has_failure_reason<B>)
      return rank_failure(first, detail::concat("rank ", first, " failed ", when, ": ", world_.failure_reason()));
    else
      return rank_failure(first, detail::concat("rank ", first, " failed ", when, ": ", e.what()));
  }

  const M& model_;
  world_type& world_;
  std::size_t rank_;
  session_options opt_;
  unshard::schedule sched_;
  std::vector<unit_layout> units_;
  memory_plan plan_;
  std::unique_ptr<trace_recorder> trace_;
  std::unique_ptr<rank_runtime<M, B>> runtime_;
  bool failed_ = false;
};

}  // namespace unshard
