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
//
// Two ways to run a tick, one bookkeeping. Whole units (forward_units): every lane runs unit u,
// then the next unit, so a layer is entered once and left once. Chunked unshard (lane_turns.hpp):
// each lane runs its own forward on a thread of its own, one lane at a time, taking turns at chunk
// boundaries, so lanes reach a layer at different moments. Then the first lane to reach layer i
// enters it for all (enqueues the copies up to i+K, the compute wait, points the tables at the
// slots); the last lane to leave it leaves it for all (records done, enqueues the write-backs,
// and the copies that waited for this slot). A copy into the slot of layer i-K-1 is never enqueued
// before every lane has left that layer: if a lane would enter a layer whose page cannot be copied
// in yet (possible only when K+1 paged layers in a row have no chunk, so no turn is taken between
// them), it hands the turn on until the lanes behind it have left that layer.
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
        ready_(slots_), done_(slots_), leaving_(slots_, 0) {
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
    issued_ = entered_ = left_ = 0;
    std::fill(leaving_.begin(), leaving_.end(), std::size_t{0});
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

  // Before unit u computes on a lane: if it starts a paged layer no lane of the tick has entered
  // yet, enter it for all of them: enqueue the copies of the layers up to K ahead whose slots are
  // free, make compute wait for this layer's pages (one wait: the lanes share the compute stream),
  // and point the page tables at its slots. A lane that finds the layer entered just runs it.
  //
  // pass_turn() is called when this layer's page cannot be copied in yet because a lane of the tick
  // has not left the layer that last used its slot (chunked lanes only; see the top of this file):
  // it lets the other lanes run on and returns true, or returns false when no other lane can run
  // (then nothing could ever free the slot: an error, not a hang). Whole-unit ticks pass one that
  // returns false: there every lane has left layer i-1 before any enters layer i.
  template <class PassTurn>
  void before_unit(std::size_t u, stream& comm, stream& compute, PassTurn&& pass_turn) {
    if (!any_ || starts_[u] == none) return;
    const std::size_t k = starts_[u];
    for (;;) {
      if (k < entered_) return;
      if (k > entered_)
        throw_error("kv:offload: a lane entered paged layer ", k, " (unit ", u, ") before layer ", entered_,
                    ": the units of a forward run in order");
      issue_up_to(k, comm);
      if (issued_ > k) break;
      if (!pass_turn())
        throw_error("kv:offload: no lane is left to leave paged layer ", k - slots_, " (unit ",
                    sequence_[k - slots_].last_unit, "), whose device slot paged layer ", k, " (unit ", u, ") needs");
    }
    entered_ = k + 1;
    compute.wait(ready_[k % slots_]);
    for (ring& r : rings_)
      if (r.member != none) tables_[r.member][sequence_[k].page] = r.slots[k % slots_].data();
  }
  void before_unit(std::size_t u, stream& comm, stream& compute) {
    before_unit(u, comm, compute, [] { return false; });
  }

  // After unit u computed on one of the `lanes` lanes that run it in this tick (1: it ran on all of
  // them): if it ends a paged layer and it was the last of them there, the layer's slots are free
  // once compute gets here, after the bytes the calls wrote went back to the host copies; then the
  // copies that waited for this slot are enqueued (chunked: a lane may already be in a later layer).
  void after_unit(std::size_t u, stream& comm, stream& compute, std::size_t lanes = 1) {
    if (!any_ || ends_[u] == none) return;
    const std::size_t k = ends_[u], slot = k % slots_, page = sequence_[k].page;
    if (++leaving_[slot] < std::max<std::size_t>(lanes, 1)) return;
    leaving_[slot] = 0;
    left_ = k + 1;
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
    if (entered_ > k + 1) issue_up_to(entered_ - 1, comm);
  }

  // The tick is over: once its write-backs have landed the host copies are current.
  void end_tick(stream& comm) {
    if (any_ && left_ != sequence_.size())
      throw_error("kv:offload: the tick left ", left_, " of its ", sequence_.size(), " paged layers");
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

  // The copies of the layers up to `entered` + K whose slot is free: layer j's slot held layer
  // j - (K+1), which every lane must have left (left_ counts the layers all lanes have left).
  void issue_up_to(std::size_t entered, stream& comm) {
    while (issued_ < sequence_.size() && issued_ <= entered + depth_ && issued_ <= left_ + depth_) issue(issued_++, comm);
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
  // This tick: layers whose copies are enqueued, entered by a lane, left by every lane; per slot,
  // the lanes that left the layer in it so far.
  std::size_t issued_ = 0, entered_ = 0, left_ = 0;
  std::vector<std::size_t> leaving_;
  bool any_ = false, writes_ = false;
  std::size_t bytes_in_ = 0, bytes_out_ = 0;
};

}  // namespace unshard
