#pragma once
// The communication side of a tick: which gathers the communication stream runs, how far ahead of
// compute, and the events that keep a ring buffer from being refilled while compute still reads
// it. Two granularities: whole units (unit_gathers) and chunks of rows (chunk_gathers, chunked
// unshard). Both only enqueue: compute waits on events, the host never synchronises here.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "unshard/backend/backend.hpp"
#include "unshard/plan/unit_layout.hpp"
#include "unshard/policy/policy_values.hpp"
#include "unshard/runtime/shard_loading.hpp"

namespace unshard {

// Gathers of whole units. Before unit u computes, the gathers of the next prefetch_depth units
// that need one are enqueued; a gather into a ring slot first waits for the compute that last read
// the slot. Kept units are gathered in the first tick only.
template <backend B>
class unit_gathers {
 public:
  using stream = typename B::stream;

  unit_gathers(const std::vector<unit_layout>& units, const policy_values& policy, std::size_t rank,
               const unit_buffers& buffers)
      : units_(units), policy_(policy), rank_(rank), buffers_(buffers), gathered_(units.size()),
        slot_free_(buffers.ring.size()), kept_ready_(units.size(), false) {
    order_.reserve(units.size());
    rebuild_order();
  }

  // Whether unit u is gathered in this tick (not under chunked unshard, which gathers chunks).
  bool needs_gather(std::size_t u) const {
    return !policy_.chunked() && units_[u].gathered_bytes() > 0 && !(units_[u].kept && kept_ready_[u]);
  }

  // A tick starts with no gather enqueued.
  void begin_tick() noexcept { issued_ = passed_ = 0; }

  // Before unit u computes: enqueue gathers up to prefetch_depth units ahead of it, and make the
  // compute stream wait for u's own.
  void before_unit(std::size_t u, stream& comm, stream& compute) {
    while (passed_ < order_.size() && order_[passed_] < u) ++passed_;
    while (issued_ < order_.size() && issued_ <= passed_ + policy_.prefetch_depth) issue(order_[issued_++], comm);
    if (needs_gather(u)) compute.wait(gathered_[u]);
  }

  // After unit u computed: its ring slot may be refilled once compute gets here. Returns whether
  // u's gathered bytes went back to the ring (a kept unit keeps its own buffer).
  bool after_unit(std::size_t u, stream& compute) {
    if (!buffers_.in_ring(u)) return false;
    compute.record(slot_free_[buffers_.slot_of(u)]);
    return true;
  }

  // End of the tick: kept units are gathered for good.
  void end_tick() {
    for (const std::size_t u : order_)
      if (units_[u].kept) kept_ready_[u] = true;
    rebuild_order();
  }

  std::size_t bytes_gathered() const noexcept { return bytes_gathered_; }
  // Under offload: this rank's shard bytes copied from host memory into its gathered buffers.
  std::size_t bytes_copied_in() const noexcept { return bytes_copied_in_; }

 private:
  void rebuild_order() {
    order_.clear();
    for (std::size_t u = 0; u < units_.size(); ++u)
      if (needs_gather(u)) order_.push_back(u);
  }

  // Into its buffer: wait until the slot is free, [offload: this rank's shard from host memory into
  // its own slice], then the in-place all-gather.
  void issue(std::size_t u, stream& comm) {
    const unit_layout& ul = units_[u];
    std::byte* dst = buffers_.gathered(u);
    const std::size_t shard = ul.sharded.shard_bytes();
    std::byte* own = dst + rank_ * shard;
    const auto label = static_cast<std::uint32_t>(u);
    if (buffers_.in_ring(u)) comm.wait(slot_free_[buffers_.slot_of(u)]);
    if (policy_.offload) {
      comm.copy(own, buffers_.shards[u].data(), shard, label);
      bytes_copied_in_ += shard;
    }
    comm.all_gather(policy_.offload ? own : buffers_.shards[u].data(), dst, shard, label);
    comm.record(gathered_[u]);
    bytes_gathered_ += ul.gathered_bytes();
  }

  const std::vector<unit_layout>& units_;
  const policy_values& policy_;
  std::size_t rank_;
  const unit_buffers& buffers_;
  std::vector<typename B::event> gathered_, slot_free_;
  std::vector<bool> kept_ready_;
  std::vector<std::size_t> order_;  // the units gathered this tick, in forward order
  std::size_t issued_ = 0;          // gathers of order_ enqueued so far
  std::size_t passed_ = 0;          // gathers of order_ belonging to units before the current one
  std::size_t bytes_gathered_ = 0, bytes_copied_in_ = 0;
};

// Gathers of chunks (chunked unshard). Every chunk of a forward in order forms the chunk sequence;
// chunk g lands in ring slot g mod (K+1). Compute pulls chunks in the order the layers read their
// weights, and each acquire enqueues gathers up to K chunks ahead; a slot is refilled only after
// every lane of the tick has released the chunk in it.
template <backend B>
class chunk_gathers {
 public:
  using stream = typename B::stream;

  chunk_gathers(const std::vector<unit_layout>& units, const policy_values& policy, std::size_t rank,
                const unit_buffers& buffers)
      : units_(units), policy_(policy), rank_(rank), buffers_(buffers), ready_(buffers.ring.size()),
        free_(buffers.ring.size()), uses_(buffers.ring.size(), 0) {
    first_chunk_.assign(units.size() + 1, 0);
    for (std::size_t u = 0; u < units.size(); ++u) {
      first_chunk_[u] = sequence_.size();
      for (std::size_t c = 0; c < units[u].chunks.size(); ++c) sequence_.push_back({u, c});
    }
    first_chunk_[units.size()] = sequence_.size();
  }

  std::size_t count() const noexcept { return sequence_.size(); }
  const weight_chunk& chunk_at(std::size_t g) const { return units_[sequence_[g].unit].chunks[sequence_[g].chunk]; }
  std::size_t unit_of(std::size_t g) const { return sequence_[g].unit; }
  // One past the last chunk of unit u.
  std::size_t chunk_end(std::size_t u) const { return first_chunk_[u + 1]; }

  // A tick starts from the first chunk, with no slot in use.
  void begin_tick() {
    issued_ = 0;
    acquired_ = 0;
    std::fill(uses_.begin(), uses_.end(), std::size_t{0});
  }

  // Chunk g's buffer, once compute is ordered after its gather (the first lane to ask enqueues the
  // gathers up to g + K; the others find it acquired).
  std::byte* acquire(std::size_t g, stream& comm, stream& compute) {
    if (g >= acquired_) {
      while (issued_ < sequence_.size() && issued_ <= g + policy_.prefetch_depth) issue(issued_++, comm);
      compute.wait(ready_[g % slots()]);
      acquired_ = g + 1;
    }
    return buffers_.ring[g % slots()].data();
  }

  // One lane is done with chunk g; the last of `lanes` frees its slot. Returns whether it did.
  bool release(std::size_t g, std::size_t lanes, stream& compute) {
    const std::size_t slot = g % slots();
    if (++uses_[slot] < std::max<std::size_t>(lanes, 1)) return false;
    uses_[slot] = 0;
    compute.record(free_[slot]);
    return true;
  }

  std::size_t bytes_gathered() const noexcept { return bytes_gathered_; }
  // Under offload: bytes of this rank's parts of chunks copied from host memory.
  std::size_t bytes_copied_in() const noexcept { return bytes_copied_in_; }

 private:
  struct chunk_ref {
    std::size_t unit, chunk;
  };
  std::size_t slots() const noexcept { return buffers_.ring.size(); }

  // This rank's part of the chunk into its place in the slot (from host memory under offload),
  // then the in-place gather of the rest from the ranks that own it.
  void issue(std::size_t g, stream& comm) {
    const std::size_t u = sequence_[g].unit, slot = g % slots();
    const weight_chunk& ch = chunk_at(g);
    const std::size_t shard = units_[u].sharded.shard_bytes(), own_lo = rank_ * shard;
    const std::size_t lo = std::max(ch.begin, own_lo), hi = std::min(ch.end, own_lo + shard);
    std::byte* dst = buffers_.ring[slot].data();
    const auto label = static_cast<std::uint32_t>(u);
    comm.wait(free_[slot]);
    if (lo < hi) copy_own_part(comm, dst + (lo - ch.begin), buffers_.shards[u].data() + (lo - own_lo), hi - lo, label);
    comm.gather_range(dst, ch.begin, ch.end, shard, label);
    comm.record(ready_[slot]);
    bytes_gathered_ += ch.bytes();
  }

  // Under offload the part crosses from host memory (a host-to-device copy); otherwise it is a
  // copy within the device, which a backend may run apart from its host-to-device path.
  void copy_own_part(stream& comm, std::byte* dst, const std::byte* src, std::size_t bytes, std::uint32_t label) {
    if (policy_.offload) {
      comm.copy(dst, src, bytes, label);
      bytes_copied_in_ += bytes;
    } else if constexpr (has_local_copy<B>) comm.local_copy(dst, src, bytes, label);
    else comm.copy(dst, src, bytes, label);
  }

  const std::vector<unit_layout>& units_;
  const policy_values& policy_;
  std::size_t rank_;
  const unit_buffers& buffers_;
  std::vector<chunk_ref> sequence_;
  std::vector<std::size_t> first_chunk_;
  std::vector<typename B::event> ready_, free_;
  std::vector<std::size_t> uses_;  // per ring slot: lanes done with its chunk this tick
  std::size_t issued_ = 0, acquired_ = 0;
  std::size_t bytes_gathered_ = 0, bytes_copied_in_ = 0;
};

}  // namespace unshard
