#pragma once
#include <cstddef>
#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "unshard/backend/backend.hpp"
#include "unshard/backend/link_model.hpp"
#include "unshard/core/tracking_allocator.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/layer/param_source.hpp"
#include "unshard/plan/ledger.hpp"
#include "unshard/plan/unit_layout.hpp"
#include "unshard/runtime/lane_turns.hpp"
#include "unshard/runtime/trace.hpp"
#include "unshard/runtime/weight_source.hpp"

namespace unshard {

// A point-to-point move between two ranks, run collectively between ticks (a latent from the rank
// of step s to the rank of step s + 1): every rank lists the same messages in the same order, with
// `src` set where it is `from` and `dst` where it is `to`.
struct transfer_message {
  std::size_t from = 0, to = 0, bytes = 0;
  const std::byte* src = nullptr;
  std::byte* dst = nullptr;
};

// Everything one rank owns, all allocated before the first forward: shards, resident parameters,
// gathered buffers (kept ones, plus the ring), the model's buffers for each of its lanes (one state
// per forward it may run in a tick, see schedule/schedule.hpp), the two streams and their events,
// and every parameter view. A tick then allocates nothing.
template <model M, backend B>
class rank_runtime {
 public:
  using state_type = typename M::state;

  template <weight_source S>
  rank_runtime(const M& m, const S& weights, const std::vector<unit_layout>& units, const policy_values& policy,
               const memory_plan& plan, typename B::world& world, std::size_t rank, std::size_t device_capacity,
               trace_recorder* trace, link_model host_to_device, const schedule& sched = {})
      : model_(m), units_(units), policy_(policy), world_(world), rank_(rank), trace_(trace),
        device_(make_space<device_space>("device", device_capacity)),
        host_(make_space<host_space>("host", plan.ranks[rank].host_bytes)),
        compute_(B::compute_stream(world, rank, trace)), comm_(B::comm_stream(world, rank, trace)) {
    if constexpr (requires { comm_->set_copy_link(host_to_device); }) comm_->set_copy_link(host_to_device);
    allocate_lanes(sched, plan.world_size);
    // A device model launches its kernels on the rank's compute stream.
    for (state_type& st : lanes_)
      if constexpr (requires { st.attach_stream(*compute_); }) st.attach_stream(*compute_);
    if (policy_.chunked()) require_streaming_layers();
    allocate_and_load(weights);
    build_views();
    if (policy_.chunked() && lanes_.size() > 1) {
      turns_ = std::make_unique<lane_turns>(lanes_.size());
      lane_body_ = [this](std::size_t turn) { forward_chunked_lane(lanes_[active_lanes_[turn]], turn); };
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
  state_type& lane(std::size_t l) {
    if (l >= lanes_.size())
      throw_error("rank ", rank_, " has ", lanes_.size(), " lane(s) (forwards per tick), no lane ", l,
                  lanes_.empty() ? ": it owns no denoising step and only serves gathers" : "");
    return lanes_[l];
  }
  const state_type& lane(std::size_t l) const { return const_cast<rank_runtime&>(*this).lane(l); }
  std::span<state_type> lanes() noexcept { return lanes_; }
  std::size_t lane_count() const noexcept { return lanes_.size(); }
  // The steps lane l holds state for.
  const std::vector<std::size_t>& lane_steps(std::size_t l) const { return lane_steps_.at(l); }
  // Weight bytes landed in this rank's gathered buffers (gathers and offload copies), and the
  // forwards it computed, since the start.
  std::size_t bytes_gathered() const noexcept { return bytes_gathered_; }
  std::size_t forwards() const noexcept { return forwards_; }
  const tracking_allocator& device_memory() const noexcept { return device_; }
  const tracking_allocator& host_memory() const noexcept { return host_; }
  void cap_device_memory(std::size_t cap) noexcept { device_.set_cap(cap); }

  // One forward on lane 0 (a rank without lanes only serves the gathers).
  void forward() { run_tick(lanes_.empty() ? 0 : 1); }

  // One tick: every unit is gathered once and applied to each lane whose bit is set in `active`
  // before it is released; with no lane set the rank still takes part in every gather (fill and
  // drain ticks, ranks that own no step). Gathers run on the communication stream up to
  // prefetch_depth units (or chunks) ahead of compute; a ring buffer is reused only after the
  // compute that read it has been recorded.
  void run_tick(std::uint64_t active) {
    active_lanes_.clear();
    for (std::size_t l = 0; l < lanes_.size(); ++l)
      if ((active >> l) & 1u) active_lanes_.push_back(l);
    if (lanes_.size() < 64 && (active >> lanes_.size()) != 0)
      throw_error("rank ", rank_, ": a tick selects lane(s) beyond its ", lanes_.size());
    if (policy_.chunked()) forward_chunked_tick();
    else forward_units();
    forwards_ += active_lanes_.size();
  }

  // The point-to-point moves after a tick, in the listed order (every rank lists the same ones);
  // returns once this rank's part has landed.
  void exchange(std::span<const transfer_message> messages) {
    for (const transfer_message& m : messages) {
      if ((m.from == rank_ && !m.src && m.bytes) || (m.to == rank_ && !m.dst && m.bytes))
        throw_error("rank ", rank_, ": transfer of ", m.bytes, " bytes from rank ", m.from, " to rank ", m.to,
                    " has no ", m.from == rank_ ? "source" : "destination", " buffer on this rank");
      comm_->transfer(m.from, m.to, m.src, m.dst, m.bytes);
    }
    if (!messages.empty()) comm_->synchronize();
  }

 private:
  void forward_units() {
    std::size_t next_issue = 0;  // position in gather_order_ of the next gather to enqueue
    std::size_t gpos = 0;        // gathers belonging to units before the current one
    for (std::size_t u = 0; u < units_.size(); ++u) {
      while (gpos < gather_order_.size() && gather_order_[gpos] < u) ++gpos;
      while (next_issue < gather_order_.size() && next_issue <= gpos + policy_.prefetch_depth)
        issue_gather(gather_order_[next_issue++]);
      const bool gathered_now = needs_gather(u);
      if (gathered_now) compute_->wait(gathered_[u]);
      for (const std::size_t l : active_lanes_) run_unit(u, lanes_[l]);
      if (ring_slot_[u] >= 0) {
        compute_->record(slot_free_[static_cast<std::size_t>(ring_slot_[u])]);
        trace_release(u, units_[u].gathered_bytes());
      }
    }
    for (auto u : gather_order_)
      if (units_[u].kept) kept_ready_[u] = true;
    rebuild_gather_order();
  }

  struct device_space {};
  struct host_space {};
  // A backend with memory of its own (cudaMalloc, cudaHostAlloc) provides it; otherwise the
  // arena reserves host memory, which is what the host backend's "device" is.
  template <class Space>
  tracking_allocator make_space(const char* space, std::size_t bytes) {
    std::string owner = "rank " + std::to_string(rank_) + " ";
    if constexpr (std::is_same_v<Space, device_space> && requires { B::device_backing(world_, rank_, bytes); })
      return tracking_allocator(space, bytes, std::move(owner), B::device_backing(world_, rank_, bytes));
    else if constexpr (std::is_same_v<Space, host_space> && requires { B::host_backing(world_, rank_, bytes); })
      return tracking_allocator(space, bytes, std::move(owner), B::host_backing(world_, rank_, bytes));
    else
      return tracking_allocator(space, bytes, std::move(owner));
  }

  // The model's buffers for each lane the schedule gives this rank (the ledger counts the same,
  // plan/ledger.hpp for_each_rank_buffer): a lane's own, the rank's shared ones, its steps' caches.
  void allocate_lanes(const schedule& sched, std::size_t world_size) {
    lane_steps_ = sched.lanes(rank_, world_size);
    std::vector<buffer_set> sets(lane_steps_.size());
    for_each_rank_buffer(model_.buffers(), sched, rank_, world_size, [&](const buffer_spec& b, std::size_t lane) {
      state_buffers_.push_back(device_.allocate(b.bytes, b.category));
      if (b.scope == buffer_scope::per_rank)
        for (buffer_set& set : sets) set.add(b.name, state_buffers_.back().span());
      else sets[lane].add(b.name, state_buffers_.back().span());
    });
    lanes_.reserve(sets.size());
    for (const buffer_set& set : sets) lanes_.push_back(model_.make_state(set));
    active_lanes_.reserve(lanes_.size());
  }

  template <weight_source S>
  void allocate_and_load(const S& weights) {
    const std::size_t n = units_.size();
    shards_.resize(n);
    resident_.resize(n);
    gathered_own_.resize(n);
    for (std::size_t u = 0; u < n; ++u) {
      const unit_layout& ul = units_[u];
      if (ul.sharded.shard_bytes()) {
        auto& mem = policy_.offload ? host_ : device_;
        shards_[u] = mem.allocate(ul.sharded.shard_bytes(), memory_category::shards);
        load_into(weights, ul.sharded, ul.sharded_params, rank_, shards_[u], !policy_.offload);
      }
      if (ul.resident.used_bytes()) {
        resident_[u] = device_.allocate(ul.resident.used_bytes(), memory_category::resident);
        load_into(weights, ul.resident, ul.resident_params, 0, resident_[u], true);
      }
      if (ul.kept && ul.gathered_bytes()) gathered_own_[u] = device_.allocate(ul.gathered_bytes(), memory_category::gathered);
    }
    const ring_shape ring = ring_for(units_, policy_);
    for (std::size_t i = 0; i < ring.buffers; ++i) ring_.push_back(device_.allocate(ring.buffer_bytes, memory_category::gathered));
    slot_free_ = std::vector<typename B::event>(ring.buffers);
    gathered_ = std::vector<typename B::event>(n);
    ring_slot_.assign(n, -1);
    std::size_t streamed = 0;
    if (policy_.chunked()) build_chunk_sequence(ring.buffers);
    else
      for (std::size_t u = 0; u < n; ++u)
        if (!units_[u].kept && units_[u].gathered_bytes()) ring_slot_[u] = static_cast<int>(streamed++ % ring.buffers);
    kept_ready_.assign(n, false);
    gather_order_.reserve(n);
    rebuild_gather_order();
  }

  // A backend whose device memory the host cannot write (CUDA) stages each shard through host
  // memory and copies it over with B::copy_to_device; the host backend loads in place.
  template <weight_source S>
  void load_into(const S& weights, const flat_layout& layout, const std::vector<param_spec>& params,
                 std::size_t piece, allocation& dst, bool on_device) {
    const std::size_t bytes = layout.shard_bytes();
    if constexpr (requires { B::copy_to_device(world_, rank_, dst.data(), dst.data(), bytes); }) {
      if (on_device) {
        std::vector<std::byte> staging(bytes);
        load_shard(weights, layout, params, piece, staging.data());
        B::copy_to_device(world_, rank_, dst.data(), staging.data(), bytes);
        return;
      }
    }
    load_shard(weights, layout, params, piece, dst.data());
  }

  std::byte* gathered_buffer(std::size_t u) const {
    return ring_slot_[u] >= 0 ? ring_[static_cast<std::size_t>(ring_slot_[u])].data() : gathered_own_[u].data();
  }

  // Parameter views per unit and sub-unit, fixed for the session: a unit always lands in the same
  // buffer (its own, or ring slot i mod (K+1) in a fixed forward order).
  void build_views() {
    for (std::size_t u = 0; u < units_.size(); ++u) {
      const unit_layout& ul = units_[u];
      std::vector<tensor_view> sharded, resident;
      if (ul.gathered_bytes() && !policy_.chunked()) ul.sharded.views_into(gathered_buffer(u), ul.sharded_params, sharded);
      if (ul.resident.used_bytes()) ul.resident.views_into(resident_[u].data(), ul.resident_params, resident);
      std::vector<param_views> per_sub;
      for (const auto& slots : ul.slots) {
        std::vector<tensor_view> v;
        for (const param_slot& s : slots)
          v.push_back(s.resident ? resident[s.index] : policy_.chunked() ? tensor_view{} : sharded[s.index]);
        per_sub.emplace_back(std::move(v));
      }
      views_.push_back(std::move(per_sub));
    }
  }

  bool needs_gather(std::size_t u) const {
    return !policy_.chunked() && units_[u].gathered_bytes() > 0 && !(units_[u].kept && kept_ready_[u]);
  }
  void rebuild_gather_order() {
    gather_order_.clear();
    for (std::size_t u = 0; u < units_.size(); ++u)
      if (needs_gather(u)) gather_order_.push_back(u);
  }

  void issue_gather(std::size_t u) {
    const unit_layout& ul = units_[u];
    std::byte* dst = gathered_buffer(u);
    const std::size_t shard = ul.sharded.shard_bytes();
    std::byte* own = dst + rank_ * shard;
    if (ring_slot_[u] >= 0) comm_->wait(slot_free_[static_cast<std::size_t>(ring_slot_[u])]);
    if (policy_.offload) comm_->copy(own, shards_[u].data(), shard, static_cast<std::uint32_t>(u));
    comm_->all_gather(policy_.offload ? own : shards_[u].data(), dst, shard, static_cast<std::uint32_t>(u));
    comm_->record(gathered_[u]);
    bytes_gathered_ += ul.gathered_bytes();
  }

  void run_unit(std::size_t u, state_type& st) {
    const unit_layout& ul = units_[u];
    const auto& layer = model_.layer(ul.info.layer);
    const auto t0 = trace_clock::now();
    for (std::size_t s = 0; s < ul.info.subunit_count; ++s) layer.forward(ul.info.first_subunit + s, views_[u][s], st);
    if (trace_) trace_->add(rank_, trace_kind::compute, static_cast<std::uint32_t>(u), t0, trace_clock::now(), 0);
  }

  // --- chunked unshard ------------------------------------------------------------------------
  // Every chunk of a forward in order; chunk g lands in ring slot g mod (K+1). The compute side
  // pulls chunks through a weight_stream in the order the layers read their weights, issuing
  // gathers up to K chunks ahead; a slot is refilled only after the compute that read it.
  struct chunk_ref {
    std::size_t unit, chunk;
  };

  class weight_stream;

  void require_streaming_layers() const {
    for (std::size_t l = 0; l < model_.layer_count(); ++l) {
      using layer_type = std::remove_cvref_t<decltype(model_.layer(l))>;
      if constexpr (!streams_weights<layer_type, state_type, weight_stream>)
        throw_error("policy ", policy_.name, ": layer '", model_.layer(l).name(),
                    "' cannot consume weight chunks; give it a forward(sub, P& params, state) over any "
                    "param_source P (layer/param_source.hpp)");
    }
  }

  void build_chunk_sequence(std::size_t slots) {
    unit_first_chunk_.assign(units_.size() + 1, 0);
    for (std::size_t u = 0; u < units_.size(); ++u) {
      unit_first_chunk_[u] = chunk_seq_.size();
      for (std::size_t c = 0; c < units_[u].chunks.size(); ++c) chunk_seq_.push_back({u, c});
    }
    unit_first_chunk_[units_.size()] = chunk_seq_.size();
    chunk_ready_ = std::vector<typename B::event>(slots);
    chunk_free_ = std::vector<typename B::event>(slots);
    chunk_uses_.assign(slots, 0);
  }

  const weight_chunk& chunk_at(std::size_t g) const { return units_[chunk_seq_[g].unit].chunks[chunk_seq_[g].chunk]; }

  // Own part of the chunk into its place in the slot (from host memory under offload), then the
  // in-place gather of the rest from the ranks that own it.
  void issue_chunk(std::size_t g) {
    const std::size_t u = chunk_seq_[g].unit, slot = g % ring_.size();
    const weight_chunk& ch = chunk_at(g);
    const std::size_t shard = units_[u].sharded.shard_bytes(), own_lo = rank_ * shard;
    const std::size_t lo = std::max(ch.begin, own_lo), hi = std::min(ch.end, own_lo + shard);
    std::byte* dst = ring_[slot].data();
    const auto label = static_cast<std::uint32_t>(u);
    comm_->wait(chunk_free_[slot]);
    if (lo < hi) {
      const std::byte* src = shards_[u].data() + (lo - own_lo);
      if (policy_.offload) comm_->copy(dst + (lo - ch.begin), src, hi - lo, label);
      else if constexpr (requires { comm_->local_copy(dst, src, hi, label); })
        comm_->local_copy(dst + (lo - ch.begin), src, hi - lo, label);
      else comm_->copy(dst + (lo - ch.begin), src, hi - lo, label);
    }
    comm_->gather_range(dst, ch.begin, ch.end, shard, label);
    comm_->record(chunk_ready_[slot]);
    bytes_gathered_ += ch.bytes();
  }

  // Lane `turn` of the tick asks for chunk g: it first hands the turn round (lane_turns.hpp), so
  // chunk g is fetched by the first lane to reach it and every lane has let go of g - 1 by then.
  std::byte* acquire_chunk(std::size_t g, std::size_t turn) {
    if (turns_ && active_lanes_.size() > 1) turns_->yield(turn);
    if (g >= chunks_acquired_) {
      while (chunks_issued_ < chunk_seq_.size() && chunks_issued_ <= g + policy_.prefetch_depth) issue_chunk(chunks_issued_++);
      compute_->wait(chunk_ready_[g % ring_.size()]);
      chunks_acquired_ = g + 1;
    }
    return ring_[g % ring_.size()].data();
  }
  // The slot is refilled only after every lane of the tick has released the chunk in it.
  void release_chunk(std::size_t g) {
    const std::size_t slot = g % ring_.size();
    if (++chunk_uses_[slot] < std::max<std::size_t>(active_lanes_.size(), 1)) return;
    chunk_uses_[slot] = 0;
    compute_->record(chunk_free_[slot]);
    trace_release(chunk_seq_[g].unit, chunk_at(g).bytes());
  }

  void trace_release(std::size_t u, std::size_t bytes) {
    if (!trace_) return;
    const auto t = trace_clock::now();
    trace_->add(rank_, trace_kind::release, static_cast<std::uint32_t>(u), t, t, bytes);
  }

  void forward_chunked_tick() {
    chunks_issued_ = 0;
    chunks_acquired_ = 0;
    std::fill(chunk_uses_.begin(), chunk_uses_.end(), std::size_t{0});
    if (active_lanes_.empty()) {
      // No forward here this tick: take part in every chunk's gather all the same.
      for (std::size_t g = 0; g < chunk_seq_.size(); ++g) {
        acquire_chunk(g, 0);
        release_chunk(g);
      }
    } else if (active_lanes_.size() == 1) {
      forward_chunked_lane(lanes_[active_lanes_[0]], 0);
    } else {
      turns_->run(active_lanes_.size(), lane_body_);
    }
  }

  // One lane's forward over the chunk sequence; `turn` is its place in the tick's turns.
  void forward_chunked_lane(state_type& st, std::size_t turn) {
    std::size_t next = 0;
    for (std::size_t u = 0; u < units_.size(); ++u) {
      const unit_layout& ul = units_[u];
      const auto& layer = model_.layer(ul.info.layer);
      using layer_type = std::remove_cvref_t<decltype(layer)>;
      const auto t0 = trace_clock::now();
      for (std::size_t s = 0; s < ul.info.subunit_count; ++s) {
        weight_stream stream(*this, u, s, next, turn);
        if constexpr (streams_weights<layer_type, state_type, weight_stream>)
          layer.forward(ul.info.first_subunit + s, stream, st);
        stream.finish();
      }
      if (trace_) trace_->add(rank_, trace_kind::compute, static_cast<std::uint32_t>(u), t0, trace_clock::now(), 0);
    }
  }

  std::vector<chunk_ref> chunk_seq_;
  std::vector<std::size_t> unit_first_chunk_;
  std::size_t chunks_issued_ = 0, chunks_acquired_ = 0;
  std::vector<std::size_t> chunk_uses_;  // per ring slot: lanes done with its chunk this tick
  std::vector<typename B::event> chunk_ready_, chunk_free_;

  const M& model_;
  const std::vector<unit_layout>& units_;
  const policy_values& policy_;
  typename B::world& world_;
  std::size_t rank_;
  trace_recorder* trace_;
  tracking_allocator device_, host_;
  std::unique_ptr<typename B::stream> compute_, comm_;
  std::vector<allocation> state_buffers_;
  std::vector<state_type> lanes_;
  std::vector<std::vector<std::size_t>> lane_steps_;
  std::vector<std::size_t> active_lanes_;  // this tick's, in lane order
  std::unique_ptr<lane_turns> turns_;      // chunked with several lanes: their turns
  std::function<void(std::size_t)> lane_body_;
  std::size_t bytes_gathered_ = 0, forwards_ = 0;
  std::vector<allocation> shards_, resident_, gathered_own_, ring_;
  std::vector<typename B::event> slot_free_, gathered_;
  std::vector<int> ring_slot_;
  std::vector<bool> kept_ready_;
  std::vector<std::size_t> gather_order_;
  std::vector<std::vector<param_views>> views_;

  // A sub-unit's parameters under chunked unshard (a param_source, layer/param_source.hpp):
  // resident ones at once, streamed ones chunk by chunk in declared order. Going back to a
  // parameter already passed is an error naming it: the chunk sequence is fixed, so a mismatch
  // would otherwise feed one weight's bytes to another.
  class weight_stream {
   public:
    weight_stream(rank_runtime& rt, std::size_t unit, std::size_t sub, std::size_t& next, std::size_t turn)
        : rt_(rt), unit_(rt.units_[unit]), sub_(sub), next_(next), end_(rt.unit_first_chunk_[unit + 1]), turn_(turn) {}
    weight_stream(const weight_stream&) = delete;
    weight_stream& operator=(const weight_stream&) = delete;
    ~weight_stream() {
      if (held_) rt_.release_chunk(held_at_);
    }

    shape dims(std::size_t i) const { return spec(i).dims; }

    tensor_view whole(std::size_t i) {
      const param_slot& sl = slot(i);
      if (sl.resident) return rt_.views_[unit_.info.index][sub_][i];
      if (held_ && covers(rt_.chunk_at(held_at_), sl.index)) return view_in_held(sl.index);
      release_held();
      const weight_chunk& c = expect(sl.index);
      if (c.split)
        throw_error("layer sub-unit ", unit_.name, "/", sub_, ": parameter '", spec(i).name,
                    "' streams in runs of rows; read it with rows(), not whole()");
      held_at_ = next_++;
      held_buffer_ = rt_.acquire_chunk(held_at_, turn_);
      held_ = true;
      return view_in_held(sl.index);
    }

    template <class F>
    void rows(std::size_t i, F&& f) {
      const param_slot& sl = slot(i);
      const bool streamed_in_runs = !sl.resident && !(held_ && covers(rt_.chunk_at(held_at_), sl.index)) &&
                                    next_ < end_ && rt_.chunk_at(next_).split;
      if (!streamed_in_runs) {
        const tensor_view v = whole(i);
        f(v, std::int64_t{0}, v.dims()[0]);
        return;
      }
      release_held();
      expect(sl.index);
      const param_spec& p = spec(i);
      while (next_ < end_ && rt_.chunk_at(next_).split && rt_.chunk_at(next_).first_param == sl.index) {
        const weight_chunk& c = rt_.chunk_at(next_);
        std::byte* buf = rt_.acquire_chunk(next_, turn_);
        f(tensor_view(buf, p.type, p.dims.with_rows(c.row_end - c.row_begin)), c.row_begin, c.row_end);
        rt_.release_chunk(next_++);
      }
    }

    // End of the sub-unit: give back the held chunk and pass over the chunks of parameters it did
    // not read (a sub-unit with nothing to do in this call). They were gathered all the same: every
    // rank runs the same chunk sequence, so the collectives stay matched.
    void finish() {
      release_held();
      while (next_ < end_ && unit_.sharded_subunit[rt_.chunk_at(next_).first_param] == sub_) skip_chunk();
    }

   private:
    const param_slot& slot(std::size_t i) const {
      const auto& slots = unit_.slots[sub_];
      if (i >= slots.size())
        throw_error("layer sub-unit ", unit_.name, "/", sub_, ": parameter ", i, " out of range (", slots.size(),
                    " declared)");
      return slots[i];
    }
    const param_spec& spec(std::size_t i) const {
      const param_slot& sl = slot(i);
      return sl.resident ? unit_.resident_params[sl.index] : unit_.sharded_params[sl.index];
    }
    static bool covers(const weight_chunk& c, std::size_t k) { return !c.split && c.first_param <= k && k <= c.last_param; }

    // The next chunk must hold streamed parameter k (whole or its first rows); chunks of parameters
    // declared before k and never read are passed over.
    const weight_chunk& expect(std::size_t k) {
      while (next_ < end_ && rt_.chunk_at(next_).last_param < k &&
             unit_.sharded_subunit[rt_.chunk_at(next_).first_param] == sub_)
        skip_chunk();
      if (next_ >= end_ || rt_.chunk_at(next_).first_param > k || rt_.chunk_at(next_).last_param < k ||
          (rt_.chunk_at(next_).split && rt_.chunk_at(next_).row_begin != 0)) {
        const std::string next = next_ < end_ ? unit_.sharded_params[rt_.chunk_at(next_).first_param].name : "nothing";
        throw_error("layer sub-unit ", unit_.name, "/", sub_, " read parameter '", unit_.sharded_params[k].name,
                    "' out of order: under chunked unshard streamed parameters are read once, in declared order "
                    "(the next chunk holds '", next, "')");
      }
      return rt_.chunk_at(next_);
    }
    tensor_view view_in_held(std::size_t k) const {
      const param_spec& p = unit_.sharded_params[k];
      const std::size_t offset = unit_.sharded.entry(k).offset - rt_.chunk_at(held_at_).begin;
      return tensor_view(held_buffer_ + offset, p.type, p.dims);
    }
    void skip_chunk() {
      rt_.acquire_chunk(next_, turn_);
      rt_.release_chunk(next_++);
    }
    void release_held() {
      if (!held_) return;
      rt_.release_chunk(held_at_);
      held_ = false;
    }

    rank_runtime& rt_;
    const unit_layout& unit_;
    std::size_t sub_;
    std::size_t& next_;
    std::size_t end_;
    std::size_t turn_;
    bool held_ = false;
    std::size_t held_at_ = 0;
    std::byte* held_buffer_ = nullptr;
  };
};

// One tick on one rank: prepare(rank, lane, state&) sets a lane's inputs and returns whether it
// computes in this tick; the runtime runs the tick (every unit gathered once for all of them);
// finish(rank, lane, state&) runs after it on each lane that computed; then the rank takes part in
// the transfers messages(rank, lanes) lists (the same list on every rank).
template <class Runtime, class Prepare, class Finish, class Messages>
void run_tick_on(std::size_t rank, Runtime& rt, Prepare& prepare, Finish& finish, Messages& messages) {
  std::uint64_t active = 0;
  for (std::size_t l = 0; l < rt.lane_count(); ++l)
    if (prepare(rank, l, rt.lane(l))) active |= std::uint64_t{1} << l;
  rt.run_tick(active);
  for (std::size_t l = 0; l < rt.lane_count(); ++l)
    if ((active >> l) & 1u) finish(rank, l, rt.lane(l));
  const auto& list = messages(rank, rt.lanes());
  rt.exchange(std::span<const transfer_message>(list.data(), list.size()));
}

}  // namespace unshard
