#pragma once
// kv:offload: a rank's paged buffers (buffer_spec::pages: the KV caches, one page per block) held
// whole in host memory (the rank's host allocator: pinned on CUDA), their pages streamed through
// rings of K+1 device slots (plan/ledger.hpp page_rings), one slot per layer in flight:
//
//   comm stream : wait done[s] | copy page i+K's read windows host -> slot s | record ready[s] ...
//                                                  ^ after the write-back of the layer that last used s
//   compute     : wait ready[i mod (K+1)] | layer i's units on every lane (page table -> slot) | record done
//   comm stream : wait done | copy each lane's write window of page i slot -> host
//
// Layer i's page is copied in K layers ahead, only the bytes the tick's calls may read; after the
// layer's last unit the bytes they wrote go back to the host copy, straight from the slot: the next
// copy into that slot is enqueued after the write-back on the same in-order stream, so no staging
// buffer is needed. Like the gathers, this only enqueues; the host waits once, at the end of a
// tick that wrote back, so the host copies are current between ticks (the caches' views read them).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "unshard/backend/backend.hpp"
#include "unshard/core/error.hpp"
#include "unshard/core/tracking_allocator.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/plan/ledger.hpp"
#include "unshard/plan/unit_layout.hpp"
#include "unshard/policy/policy_values.hpp"
#include "unshard/schedule/schedule.hpp"

namespace unshard {

// Where a rank's lanes find each of its buffers, indexed in for_each_rank_buffer order: a placed
// paged buffer's host copy and page table; not placed: the lanes allocate it on the device.
struct buffer_placement {
  std::vector<std::span<std::byte>> bytes;
  std::vector<const page_table*> tables;
  bool placed(std::size_t i) const noexcept { return i < tables.size() && tables[i] != nullptr; }
};

template <model M, backend B>
class paged_buffers {
 public:
  using stream = typename B::stream;
  using state_type = typename M::state;

  paged_buffers(const M& m, const std::vector<unit_layout>& units, const policy_values& policy, const schedule& sched,
                std::size_t rank, std::size_t world_size, tracking_allocator& device, tracking_allocator& host)
      : model_(m), specs_(m.buffers()), slots_(policy.kv_prefetch + 1), depth_(policy.kv_prefetch),
        ready_(slots_), done_(slots_) {
    require_kv_placement_supported(policy);
    // The rank's buffers in for_each_rank_buffer order; the paged ones whole in host memory, zeroed
    // (a model's caches start empty; a CUDA model cannot clear host memory with its device calls).
    for_each_rank_buffer(specs_, sched, rank, world_size, [&](const buffer_spec& b, std::size_t lane) {
      instances_.push_back({static_cast<std::size_t>(&b - specs_.data()), lane});
    });
    const std::size_t n = instances_.size();
    host_copies_.resize(n);
    tables_.resize(n);
    placement_.bytes.resize(n);
    placement_.tables.assign(n, nullptr);
    for (std::size_t i = 0; i < n; ++i) {
      const buffer_spec& b = spec(i);
      if (b.pages == 0) continue;
      if constexpr (!paged_model<M>)
        throw_error("policy ", policy.name, ": the model declares the paged buffer '", b.name,
                    "' but not which layer reads which page (give it page_of_layer and page_access_of, layer/model.hpp)");
      host_copies_[i] = host.allocate(b.bytes, b.category);
      std::memset(host_copies_[i].data(), 0, host_copies_[i].size());
      tables_[i].assign(b.pages, nullptr);
      placement_.bytes[i] = host_copies_[i].span().first(b.bytes);
      placement_.tables[i] = &tables_[i];
    }
    for (page_ring& shape : page_rings(specs_, sched, rank, world_size)) {
      ring r;
      r.shape = std::move(shape);
      for (std::size_t s = 0; s < slots_; ++s) r.slots.push_back(device.allocate(r.shape.page_bytes, r.shape.category));
      r.writes.reserve(std::max<std::size_t>(sched.lane_count(rank, world_size), 1));
      rings_.push_back(std::move(r));
    }
    if (!rings_.empty()) build_sequence(units);
  }

  paged_buffers(const paged_buffers&) = delete;
  paged_buffers& operator=(const paged_buffers&) = delete;

  const buffer_placement& placement() const noexcept { return placement_; }

  // A tick starts: which buffer of each ring the active lanes' calls touch (the model says, from the
  // call each state was set up for), the bytes to copy in (the union of their reads) and out.
  template <class Lanes>
  void begin_tick(Lanes& lanes) {
    issued_ = 0;
    any_ = writes_ = false;
    if constexpr (paged_model<M>) {
      for (ring& r : rings_) {
        r.member = none;
        r.read = {};
        r.writes.clear();
        for (const std::size_t l : lanes.active()) {
          if (r.shape.scope != buffer_scope::per_rank && r.shape.lane != l) continue;
          for (const std::size_t i : r.shape.members) {
            const page_access a = model_.page_access_of(std::as_const(lanes[l]), spec(i));
            if (!a.touches()) continue;
            check_window(i, a.read, "reads");
            check_window(i, a.write, "writes");
            if (r.member != none && r.member != i)
              throw_error("kv:offload: lane ", l, "'s call touches both '", spec(r.member).name, "' and '", spec(i).name,
                          "', which take turns in one ring of device pages (a forward runs one step)");
            r.member = i;
            r.read = hull(r.read, a.read);
            if (!a.write.empty() && std::find(r.writes.begin(), r.writes.end(), a.write) == r.writes.end())
              r.writes.push_back(a.write);
          }
        }
        any_ = any_ || r.member != none;
        writes_ = writes_ || !r.writes.empty();
      }
    }
  }

  // Before unit u computes: if it starts a paged layer, enqueue the copies of the next K layers'
  // pages, make compute wait for this layer's, and point the page tables at its slots.
  void before_unit(std::size_t u, stream& comm, stream& compute) {
    if (!any_ || starts_[u] == none) return;
    const std::size_t k = starts_[u];
    while (issued_ < sequence_.size() && issued_ <= k + depth_) issue(issued_++, comm);
    compute.wait(ready_[k % slots_]);
    for (ring& r : rings_)
      if (r.member != none) tables_[r.member][sequence_[k].page] = r.slots[k % slots_].data();
  }

  // After unit u computed: if it ends a paged layer, its slots are free once compute gets here,
  // after the bytes the calls wrote went back to the host copies.
  void after_unit(std::size_t u, stream& comm, stream& compute) {
    if (!any_ || ends_[u] == none) return;
    const std::size_t k = ends_[u], slot = k % slots_, page = sequence_[k].page;
    const auto label = static_cast<std::uint32_t>(u);
    compute.record(done_[slot]);
    bool waited = false;
    for (ring& r : rings_) {
      if (r.member == none) continue;
      tables_[r.member][page] = nullptr;
      for (const page_window& w : r.writes) {
        if (!waited) comm.wait(done_[slot]);
        waited = true;
        comm.copy(page_of(r.member, page) + w.offset, r.slots[slot].data() + w.offset, w.bytes, label);
        bytes_out_ += w.bytes;
      }
    }
  }

  // The tick is over: once its write-backs have landed the host copies are current.
  void end_tick(stream& comm) {
    if (writes_) comm.synchronize();
    any_ = writes_ = false;
  }

  // Bytes copied into device slots (reads) and back to host memory (writes) since the start.
  std::size_t bytes_in() const noexcept { return bytes_in_; }
  std::size_t bytes_out() const noexcept { return bytes_out_; }

 private:
  static constexpr std::size_t none = std::numeric_limits<std::size_t>::max();

  struct instance {
    std::size_t spec, lane;
  };
  struct ring {
    page_ring shape;
    std::vector<allocation> slots;  // K+1
    // This tick: the member the active calls touch, the bytes to copy in, the windows to copy out.
    std::size_t member = none;
    page_window read;
    std::vector<page_window> writes;
  };
  // A paged layer's run of units in forward order (its units are consecutive) and its page.
  struct element {
    std::size_t first_unit, last_unit, page;
  };

  const buffer_spec& spec(std::size_t i) const { return specs_[instances_[i].spec]; }
  std::byte* page_of(std::size_t i, std::size_t page) { return host_copies_[i].data() + page * spec(i).page_bytes(); }

  static page_window hull(page_window a, page_window b) noexcept {
    if (a.empty()) return b;
    if (b.empty()) return a;
    const std::size_t lo = std::min(a.offset, b.offset);
    return {lo, std::max(a.end(), b.end()) - lo};
  }

  void check_window(std::size_t i, const page_window& w, const char* what) const {
    if (!w.empty() && w.end() > spec(i).page_bytes())
      throw_error("kv:offload: the call ", what, " bytes [", w.offset, ", ", w.end(), ") of a page of '", spec(i).name,
                  "', whose pages hold ", spec(i).page_bytes(), " bytes");
  }

  // The paged layers in forward order, and which unit starts and ends each.
  void build_sequence(const std::vector<unit_layout>& units) {
    if constexpr (paged_model<M>) {
      starts_.assign(units.size(), none);
      ends_.assign(units.size(), none);
      std::size_t layer = none;
      for (std::size_t u = 0; u < units.size(); ++u) {
        const std::optional<std::size_t> page = model_.page_of_layer(units[u].info.layer);
        if (!page) continue;
        if (!sequence_.empty() && layer == units[u].info.layer && sequence_.back().last_unit + 1 == u) {
          sequence_.back().last_unit = u;
        } else {
          for (const ring& r : rings_)
            for (const std::size_t i : r.shape.members)
              if (*page >= spec(i).pages)
                throw_error("kv:offload: layer ", units[u].info.layer, " reads page ", *page, " of '", spec(i).name,
                            "', which has ", spec(i).pages, " pages");
          sequence_.push_back({u, u, *page});
        }
        layer = units[u].info.layer;
      }
      for (std::size_t k = 0; k < sequence_.size(); ++k) {
        starts_[sequence_[k].first_unit] = k;
        ends_[sequence_[k].last_unit] = k;
      }
    }
  }

  // Paged layer k's pages into slot k mod (K+1), once compute is done with the layer before it there
  // (and its write-back, enqueued before this on the same stream).
  void issue(std::size_t k, stream& comm) {
    const std::size_t slot = k % slots_, page = sequence_[k].page;
    const auto label = static_cast<std::uint32_t>(sequence_[k].first_unit);
    comm.wait(done_[slot]);
    for (ring& r : rings_) {
      if (r.member == none || r.read.empty()) continue;
      comm.copy(r.slots[slot].data() + r.read.offset, page_of(r.member, page) + r.read.offset, r.read.bytes, label);
      bytes_in_ += r.read.bytes;
    }
    comm.record(ready_[slot]);
  }

  const M& model_;
  std::vector<buffer_spec> specs_;
  std::vector<instance> instances_;
  std::vector<allocation> host_copies_;  // per instance: the whole paged buffer (empty if not paged)
  std::vector<page_table> tables_;       // per instance: where each page is now
  buffer_placement placement_;
  std::vector<ring> rings_;
  std::vector<element> sequence_;
  std::vector<std::size_t> starts_, ends_;  // per unit: the element it starts / ends, or none
  std::size_t slots_, depth_;
  std::vector<typename B::event> ready_, done_;  // per slot: copied in; compute done with it
  std::size_t issued_ = 0;
  bool any_ = false, writes_ = false;
  std::size_t bytes_in_ = 0, bytes_out_ = 0;
};

}  // namespace unshard
