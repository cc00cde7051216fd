#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "unshard/backend/backend.hpp"
#include "unshard/backend/link_model.hpp"
#include "unshard/core/tracking_allocator.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/plan/ledger.hpp"
#include "unshard/plan/unit_layout.hpp"
#include "unshard/runtime/trace.hpp"
#include "unshard/runtime/weight_source.hpp"

namespace unshard {

// Everything one rank owns, all allocated before the first forward: shards, resident parameters,
// gathered buffers (kept ones, plus the ring), the model's activation buffers, the two streams
// and their events, and every parameter view. forward() then allocates nothing.
template <model M, backend B>
class rank_runtime {
 public:
  using state_type = typename M::state;

  template <weight_source S>
  rank_runtime(const M& m, const S& weights, const std::vector<unit_layout>& units, const policy_values& policy,
               const memory_plan& plan, typename B::world& world, std::size_t rank, std::size_t device_capacity,
               trace_recorder* trace, link_model host_to_device)
      : model_(m), units_(units), policy_(policy), world_(world), rank_(rank), trace_(trace),
        device_(make_space<device_space>("device", device_capacity)),
        host_(make_space<host_space>("host", plan.ranks[rank].host_bytes)),
        compute_(B::compute_stream(world, rank, trace)), comm_(B::comm_stream(world, rank, trace)),
        state_(allocate_state()) {
    if constexpr (requires { comm_->set_copy_link(host_to_device); }) comm_->set_copy_link(host_to_device);
    // A device model launches its kernels on the rank's compute stream.
    if constexpr (requires { state_.attach_stream(*compute_); }) state_.attach_stream(*compute_);
    allocate_and_load(weights);
    build_views();
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

  state_type& state() noexcept { return state_; }
  const tracking_allocator& device_memory() const noexcept { return device_; }
  const tracking_allocator& host_memory() const noexcept { return host_; }
  void cap_device_memory(std::size_t cap) noexcept { device_.set_cap(cap); }

  // One forward. Gathers run on the communication stream up to prefetch_depth units ahead of
  // compute; a ring buffer is reused only after the compute that read it has been recorded.
  void forward() {
    std::size_t next_issue = 0;  // position in gather_order_ of the next gather to enqueue
    std::size_t gpos = 0;        // gathers belonging to units before the current one
    for (std::size_t u = 0; u < units_.size(); ++u) {
      while (gpos < gather_order_.size() && gather_order_[gpos] < u) ++gpos;
      while (next_issue < gather_order_.size() && next_issue <= gpos + policy_.prefetch_depth)
        issue_gather(gather_order_[next_issue++]);
      const bool gathered_now = needs_gather(u);
      if (gathered_now) compute_->wait(gathered_[u]);
      run_unit(u);
      if (ring_slot_[u] >= 0) compute_->record(slot_free_[static_cast<std::size_t>(ring_slot_[u])]);
    }
    for (auto u : gather_order_)
      if (units_[u].kept) kept_ready_[u] = true;
    rebuild_gather_order();
  }

 private:
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

  state_type allocate_state() {
    buffer_set set;
    for (const buffer_spec& b : model_.buffers()) {
      state_buffers_.push_back(device_.allocate(b.bytes, b.category));
      set.add(b.name, state_buffers_.back().span());
    }
    return model_.make_state(set);
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
        load_shard(weights, ul.sharded, ul.sharded_params, rank_, shards_[u].data());
      }
      if (ul.resident.used_bytes()) {
        resident_[u] = device_.allocate(ul.resident.used_bytes(), memory_category::resident);
        load_shard(weights, ul.resident, ul.resident_params, 0, resident_[u].data());
      }
      if (ul.kept && ul.gathered_bytes()) gathered_own_[u] = device_.allocate(ul.gathered_bytes(), memory_category::gathered);
    }
    const ring_shape ring = ring_for(units_, policy_);
    for (std::size_t i = 0; i < ring.buffers; ++i) ring_.push_back(device_.allocate(ring.buffer_bytes, memory_category::gathered));
    slot_free_ = std::vector<typename B::event>(ring.buffers);
    gathered_ = std::vector<typename B::event>(n);
    ring_slot_.assign(n, -1);
    std::size_t streamed = 0;
    for (std::size_t u = 0; u < n; ++u)
      if (!units_[u].kept && units_[u].gathered_bytes()) ring_slot_[u] = static_cast<int>(streamed++ % ring.buffers);
    kept_ready_.assign(n, false);
    gather_order_.reserve(n);
    rebuild_gather_order();
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
      if (ul.gathered_bytes()) ul.sharded.views_into(gathered_buffer(u), ul.sharded_params, sharded);
      if (ul.resident.used_bytes()) ul.resident.views_into(resident_[u].data(), ul.resident_params, resident);
      std::vector<param_views> per_sub;
      for (const auto& slots : ul.slots) {
        std::vector<tensor_view> v;
        for (const param_slot& s : slots) v.push_back(s.resident ? resident[s.index] : sharded[s.index]);
        per_sub.emplace_back(std::move(v));
      }
      views_.push_back(std::move(per_sub));
    }
  }

  bool needs_gather(std::size_t u) const {
    return units_[u].gathered_bytes() > 0 && !(units_[u].kept && kept_ready_[u]);
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
  }

  void run_unit(std::size_t u) {
    const unit_layout& ul = units_[u];
    const auto& layer = model_.layer(ul.info.layer);
    const auto t0 = trace_clock::now();
    for (std::size_t s = 0; s < ul.info.subunit_count; ++s) layer.forward(ul.info.first_subunit + s, views_[u][s], state_);
    if (trace_) trace_->add(rank_, trace_kind::compute, static_cast<std::uint32_t>(u), t0, trace_clock::now(), 0);
  }

  const M& model_;
  const std::vector<unit_layout>& units_;
  const policy_values& policy_;
  typename B::world& world_;
  std::size_t rank_;
  trace_recorder* trace_;
  tracking_allocator device_, host_;
  std::unique_ptr<typename B::stream> compute_, comm_;
  std::vector<allocation> state_buffers_;
  state_type state_;
  std::vector<allocation> shards_, resident_, gathered_own_, ring_;
  std::vector<typename B::event> slot_free_, gathered_;
  std::vector<int> ring_slot_;
  std::vector<bool> kept_ready_;
  std::vector<std::size_t> gather_order_;
  std::vector<std::vector<param_views>> views_;
};

}  // namespace unshard
