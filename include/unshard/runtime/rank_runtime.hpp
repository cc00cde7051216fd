#pragma once
// One rank's scheduler: ticks in lockstep with the other ranks over the units of a model. The
// parts live beside it; this header includes them all, so including it is enough:
//   shard_loading.hpp    the rank's arenas, its shards, resident parameters and gathered buffers
//   unit_views.hpp       parameter views per unit, and the weight_stream of chunked unshard
//   gather_pipeline.hpp  what the communication stream gathers, when, into which ring slot
//   lanes.hpp            the model states of a rank (its lanes), transfer_message, run_tick_on
//   lane_turns.hpp       turns between lanes at chunk boundaries
//   paged_buffers.hpp    kv:offload: paged buffers (the KV caches) in host memory, pages streamed per layer
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <type_traits>
#include <vector>

#include "unshard/backend/backend.hpp"
#include "unshard/backend/link_model.hpp"
#include "unshard/core/trace.hpp"
#include "unshard/core/tracking_allocator.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/layer/param_source.hpp"
#include "unshard/plan/ledger.hpp"
#include "unshard/plan/unit_layout.hpp"
#include "unshard/runtime/gather_pipeline.hpp"
#include "unshard/runtime/lane_turns.hpp"
#include "unshard/runtime/lanes.hpp"
#include "unshard/runtime/paged_buffers.hpp"
#include "unshard/runtime/shard_loading.hpp"
#include "unshard/runtime/unit_views.hpp"
#include "unshard/runtime/weight_source.hpp"

namespace unshard {

// Everything one rank owns, all allocated before the first forward: shards, resident parameters,
// gathered buffers (kept ones, plus the ring), the model's buffers for each of its lanes (one state
// per forward it may run in a tick, see schedule/schedule.hpp), the two streams and their events,
// and every parameter view. A tick then allocates nothing.
template <model M, backend B>
class rank_runtime {
 public:
  using state_type = typename M::state;

  static_assert(reaches_state<B, state_type>,
                "the model's state is read in a memory space this backend does not allocate in: its "
                "State::memory_space (host_memory when undeclared) is not in B::memory. Run a host model on "
                "host_backend or process_backend, and a CUDA model (memory_space = cuda_device_memory) on "
                "cuda_backend (core/memory_space.hpp, backend/backend.hpp)");

  template <weight_source S>
  rank_runtime(const M& m, const S& weights, const std::vector<unit_layout>& units, const policy_values& policy,
               const memory_plan& plan, typename B::world& world, std::size_t rank, std::size_t device_capacity,
               trace_recorder* trace, link_model host_to_device, const schedule& sched = {})
      : model_(m), units_(units), policy_(policy), world_(world), rank_(rank), trace_(trace),
        device_(rank_device_memory<B>(world, rank, device_capacity)),
        host_(rank_host_memory<B>(world, rank, plan.ranks[rank].host_bytes)),
        compute_(B::compute_stream(world, rank, trace)), comm_(B::comm_stream(world, rank, trace)),
        paged_(make_paged(m, units, policy, sched, rank, plan.world_size)),
        lanes_(m, sched, rank, plan.world_size, device_, paged_ ? &paged_->placement() : nullptr) {
    if constexpr (has_copy_link<B>) comm_->set_copy_link(host_to_device);
    attach_compute_stream();
    if (policy_.chunked()) require_streaming_layers();
    buffers_ = load_unit_buffers<B>(world_, rank_, weights, units_, policy_, device_, host_);
    views_ = build_unit_views(units_, buffers_, policy_.chunked());
    units_gathers_ = std::make_unique<unit_gathers<B>>(units_, policy_, rank_, buffers_);
    chunk_gathers_ = std::make_unique<chunk_gathers<B>>(units_, policy_, rank_, buffers_);
    if (policy_.chunked() && lanes_.size() > 1) {
      // The lanes' threads call the backend as the rank's own thread does (CUDA: the rank's device).
      turns_ = std::make_unique<lane_turns>(lanes_.size(), [this] {
        if constexpr (binds_thread<B>) B::bind_thread(world_, rank_);
      });
      lane_body_ = [this](std::size_t turn) { forward_chunked_lane(lanes_.active_state(turn), turn); };
    }
  }

  rank_runtime(const rank_runtime&) = delete;
  rank_runtime& operator=(const rank_runtime&) = delete;
  ~rank_runtime() { stop_communication(); }

  // Drains and joins the communication stream. The session calls it on every rank before any
  // rank frees its buffers, since an all-gather reads its peers' memory.
  void stop_communication() noexcept {
    try {
      if (comm_ && !world_.aborted()) comm_->synchronize();
    } catch (...) {
    }
    comm_.reset();
  }

  // Lane 0's state: the one state of a rank under the replicated schedule.
  state_type& state() { return lane(0); }
  state_type& lane(std::size_t l) { return lanes_[l]; }
  const state_type& lane(std::size_t l) const { return const_cast<rank_runtime&>(*this).lane(l); }
  std::span<state_type> lanes() noexcept { return lanes_.all(); }
  std::size_t lane_count() const noexcept { return lanes_.size(); }
  // The steps lane l holds state for.
  const std::vector<std::size_t>& lane_steps(std::size_t l) const { return lanes_.steps(l); }
  // Weight bytes landed in this rank's gathered buffers (gathers and offload copies), and the
  // forwards it computed, since the start.
  std::size_t bytes_gathered() const noexcept {
    return units_gathers_->bytes_gathered() + chunk_gathers_->bytes_gathered();
  }
  std::size_t forwards() const noexcept { return forwards_; }
  // Under offload: this rank's shard bytes copied from host memory into its gathered buffers since
  // the start (0 otherwise).
  std::size_t weight_bytes_in() const noexcept {
    return units_gathers_->bytes_copied_in() + chunk_gathers_->bytes_copied_in();
  }
  // kv:offload: bytes of paged buffers (KV-cache pages) copied into device slots and written back
  // to host memory since the start (0 under kv:device).
  std::size_t kv_bytes_in() const noexcept { return paged_ ? paged_->bytes_in() : 0; }
  std::size_t kv_bytes_out() const noexcept { return paged_ ? paged_->bytes_out() : 0; }
  const tracking_allocator& device_memory() const noexcept { return device_; }
  const tracking_allocator& host_memory() const noexcept { return host_; }
  void cap_device_memory(std::size_t cap) noexcept { device_.set_cap(cap); }

  // One forward on lane 0 (a rank without lanes only serves the gathers).
  void forward() { run_tick(lanes_.size() == 0 ? 0 : 1); }

  // One tick: every unit is gathered once and applied to each lane whose bit is set in `active`
  // before it is released; with no lane set the rank still takes part in every gather (fill and
  // drain ticks, ranks that own no step), since the collectives must match on every rank.
  void run_tick(std::uint64_t active) {
    lanes_.select(active);
    if (policy_.chunked()) forward_chunked_tick();
    else forward_units();
    forwards_ += lanes_.active().size();
  }

  // The point-to-point moves after a tick, in the listed order (every rank lists the same ones);
  // returns once this rank's part has landed.
  void exchange(std::span<const transfer_message> messages) {
    if (messages.empty()) return;
    // The sources were written by the tick's compute (the lanes' Euler updates): on a device the
    // communication stream must wait for it, as host order alone does not order two streams.
    compute_->record(exchange_ready_);
    comm_->wait(exchange_ready_);
    for (const transfer_message& m : messages) {
      check_endpoint_buffers(m);
      comm_->transfer(m.from, m.to, m.src, m.dst, m.bytes);
    }
    comm_->synchronize();
  }

 private:
  // weight_stream reads chunks through the Feed interface below (unit_views.hpp).
  friend class weight_stream<rank_runtime>;
  using stream_type = weight_stream<rank_runtime>;

  // A device model launches its kernels on the rank's compute stream; a host model takes none.
  void attach_compute_stream() {
    if constexpr (attaches_stream<state_type, B>)
      for (state_type& st : lanes_.all()) st.attach_stream(*compute_);
  }

  void check_endpoint_buffers(const transfer_message& m) const {
    if ((m.from == rank_ && !m.src && m.bytes) || (m.to == rank_ && !m.dst && m.bytes))
      throw_error("rank ", rank_, ": transfer of ", m.bytes, " bytes from rank ", m.from, " to rank ", m.to,
                  " has no ", m.from == rank_ ? "source" : "destination", " buffer on this rank");
  }

  // --- gathered units -----------------------------------------------------------------------------
  // Each unit: gathers enqueued up to prefetch_depth ahead, compute waits for the unit's, runs it
  // on every active lane, then hands its ring slot back.
  // Under kv:offload the pages of a paged layer stream alongside (runtime/paged_buffers.hpp).
  void forward_units() {
    unit_gathers<B>& gathers = *units_gathers_;
    gathers.begin_tick();
    if (paged_) paged_->begin_tick(lanes_);
    for (std::size_t u = 0; u < units_.size(); ++u) {
      gathers.before_unit(u, *comm_, *compute_);
      if (paged_) paged_->before_unit(u, *comm_, *compute_);
      for (const std::size_t l : lanes_.active()) run_unit(u, lanes_[l]);
      if (paged_) paged_->after_unit(u, *comm_, *compute_);
      if (gathers.after_unit(u, *compute_)) trace_release(u, units_[u].gathered_bytes());
    }
    gathers.end_tick();
    if (paged_) paged_->end_tick(*comm_);
  }

  // kv:offload: the rank's paged buffers in host memory and their device page rings (none when the
  // model has no paged buffers: a model without KV caches runs as under kv:device).
  std::unique_ptr<paged_buffers<M, B>> make_paged(const M& m, const std::vector<unit_layout>& units,
                                                  const policy_values& policy, const schedule& sched, std::size_t rank,
                                                  std::size_t world_size) {
    require_kv_placement_supported(policy);
    if (!policy.kv_offload) return nullptr;
    return std::make_unique<paged_buffers<M, B>>(m, units, policy, sched, rank, world_size, device_, host_);
  }

  void run_unit(std::size_t u, state_type& st) {
    const unit_layout& ul = units_[u];
    const auto& layer = model_.layer(ul.info.layer);
    traced_compute(u, [&] {
      for (std::size_t s = 0; s < ul.info.subunit_count; ++s) layer.forward(ul.info.first_subunit + s, views_[u][s], st);
    });
  }

  // --- chunked unshard ------------------------------------------------------------------------------
  void require_streaming_layers() const {
    for (std::size_t l = 0; l < model_.layer_count(); ++l) {
      using layer_type = std::remove_cvref_t<decltype(model_.layer(l))>;
      if constexpr (!streams_weights<layer_type, state_type, stream_type>)
        throw_error("policy ", policy_.name, ": layer '", model_.layer(l).name(),
                    "' cannot consume weight chunks; give it a forward(sub, P& params, state) over any "
                    "param_source P (layer/param_source.hpp)");
    }
  }

  // Under kv:offload the pages of the paged layers stream alongside the chunks: the first lane to
  // reach a paged layer enters it for all the tick's lanes, the last to finish it writes it back
  // (runtime/paged_buffers.hpp); the lanes' turns keep them within a layer of each other.
  void forward_chunked_tick() {
    chunk_gathers_->begin_tick();
    const std::size_t n = lanes_.active().size();
    if (paged_) paged_->begin_tick(lanes_);
    if (n == 0) {
      // No forward here this tick: take part in every chunk's gather all the same.
      for (std::size_t g = 0; g < chunk_gathers_->count(); ++g) {
        acquire_chunk(g, 0);
        release_chunk(g);
      }
    } else if (n == 1) {
      forward_chunked_lane(lanes_.active_state(0), 0);
    } else {
      turns_->run(n, lane_body_);
    }
    if (paged_) paged_->end_tick(*comm_);
  }

  // One lane's forward over the chunk sequence; `turn` is its place in the tick's turns.
  void forward_chunked_lane(state_type& st, std::size_t turn) {
    std::size_t next = 0;
    const std::size_t lanes = lanes_.active().size();
    // A lane that must wait for the lanes behind it to leave a paged layer hands them the turn.
    const auto pass_turn = [&] { return turns_ && lanes > 1 && turns_->yield(turn); };
    for (std::size_t u = 0; u < units_.size(); ++u) {
      const unit_layout& ul = units_[u];
      const auto& layer = model_.layer(ul.info.layer);
      using layer_type = std::remove_cvref_t<decltype(layer)>;
      if (paged_) paged_->before_unit(u, *comm_, *compute_, pass_turn);
      traced_compute(u, [&] {
        for (std::size_t s = 0; s < ul.info.subunit_count; ++s) {
          stream_type stream(*this, u, s, next, turn);
          if constexpr (streams_weights<layer_type, state_type, stream_type>)
            layer.forward(ul.info.first_subunit + s, stream, st);
          stream.finish();
        }
      });
      if (paged_) paged_->after_unit(u, *comm_, *compute_, lanes);
    }
  }

  // The Feed of weight_stream.
  const unit_layout& unit(std::size_t u) const { return units_[u]; }
  const tensor_view& resident_view(std::size_t u, std::size_t sub, std::size_t i) const { return views_[u][sub][i]; }
  const weight_chunk& chunk_at(std::size_t g) const { return chunk_gathers_->chunk_at(g); }
  std::size_t chunk_end(std::size_t u) const { return chunk_gathers_->chunk_end(u); }
  // Lane `turn` of the tick asks for chunk g: it first hands the turn round (lane_turns.hpp), so
  // chunk g is fetched by the first lane to reach it and every lane has let go of g - 1 by then.
  std::byte* acquire_chunk(std::size_t g, std::size_t turn) {
    if (turns_ && lanes_.active().size() > 1) turns_->yield(turn);
    return chunk_gathers_->acquire(g, *comm_, *compute_);
  }
  // The slot is refilled only after every lane of the tick has released the chunk in it.
  void release_chunk(std::size_t g) {
    if (chunk_gathers_->release(g, lanes_.active().size(), *compute_))
      trace_release(chunk_gathers_->unit_of(g), chunk_at(g).bytes());
  }

  // --- trace ----------------------------------------------------------------------------------------
  // A release hands gathered bytes back to the ring: gathers minus releases is the live gathered
  // memory of the Chrome trace.
  void trace_release(std::size_t u, std::size_t bytes) {
    if (!trace_) return;
    const auto t = trace_clock::now();
    trace_->add(rank_, trace_kind::release, static_cast<std::uint32_t>(u), t, t, bytes);
  }
  // Runs one unit's compute on a lane, traced as a compute span. Where the compute stream only
  // enqueues (has_device_spans: CUDA), the stream times the span when the device runs it; where
  // compute is synchronous (the host backends), the host clock around it is the compute time.
  // A span left open by an exception is abandoned with the failed session.
  template <class F>
  void traced_compute(std::size_t u, F&& compute) {
    const auto label = static_cast<std::uint32_t>(u);
    if (!trace_) {
      compute();
    } else if constexpr (has_device_spans<B>) {
      trace_spans::span* span = compute_->begin_span();
      compute();
      compute_->end_span(span, trace_kind::compute, label, 0);
    } else {
      const auto t0 = trace_clock::now();
      compute();
      trace_->add(rank_, trace_kind::compute, label, t0, trace_clock::now(), 0);
    }
  }

  const M& model_;
  const std::vector<unit_layout>& units_;
  const policy_values& policy_;
  typename B::world& world_;
  std::size_t rank_;
  trace_recorder* trace_;
  tracking_allocator device_, host_;  // before everything allocated from them
  std::unique_ptr<typename B::stream> compute_, comm_;
  std::unique_ptr<paged_buffers<M, B>> paged_;  // kv:offload only; before the lanes, whose states use it
  rank_lanes<M> lanes_;
  unit_buffers buffers_;
  std::vector<std::vector<param_views>> views_;
  std::unique_ptr<unit_gathers<B>> units_gathers_;
  std::unique_ptr<chunk_gathers<B>> chunk_gathers_;
  std::unique_ptr<lane_turns> turns_;  // chunked with several lanes: their turns
  typename B::event exchange_ready_;   // the tick's compute, before its transfers
  std::function<void(std::size_t)> lane_body_;
  std::size_t forwards_ = 0;
};

}  // namespace unshard
