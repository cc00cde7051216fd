#pragma once
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "unshard/backend/job_state.hpp"
#include "unshard/backend/link_model.hpp"
#include "unshard/core/error.hpp"
#include "unshard/core/world_size.hpp"

namespace unshard {

// The ranks of one host job (threads of one process) and what they share: the collectives, and
// the abort that turns one rank's failure into an error on every rank instead of a hang
// (NCCL's async-error + ncclCommAbort model). All blocking waits of the job go through wait().
class host_world : private job_state {
 public:
  explicit host_world(std::size_t world_size, link_model link = {})
      : job_state(/*settle_waits=*/true), size_(world_size), link_(link), sends_(world_size, nullptr) {
    require_world_size(world_size, "host_world");
  }

  std::size_t size() const noexcept { return size_; }
  const link_model& link() const noexcept { return link_; }

  // The job's health and lock come from job_state: first failure wins, and every blocked or later
  // wait on any rank then throws rank_failure; wait(pred) blocks until pred() holds under the
  // job's lock, update(f) changes shared state under it and wakes every waiter.
  using job_state::abort, job_state::aborted, job_state::failed_rank, job_state::throw_aborted;
  using job_state::wait, job_state::update;

  void barrier() {
    std::size_t gen = 0;
    const bool last = with_lock([&] {
      gen = barrier_generation_;
      if (++barrier_count_ < size_) return false;
      barrier_count_ = 0;
      ++barrier_generation_;
      return true;
    });
    if (last) wake_all();
    else wait([&] { return barrier_generation_ != gen; });
  }

  // All-gather: rank r contributes `bytes` at `send`; every rank receives all contributions in
  // rank order at `recv` (size * bytes). In place when send == recv + r*bytes, as ncclAllGather.
  // Pull model: each rank copies its peers' pieces between two barriers, so a piece is never
  // read after its owner moved on.
  void all_gather(std::size_t rank, const std::byte* send, std::byte* recv, std::size_t bytes) {
    with_lock([&] { sends_[rank] = send; });
    barrier();
    for (std::size_t peer = 0; peer < size_; ++peer) {
      std::byte* dst = recv + peer * bytes;
      if (sends_[peer] != dst && bytes) std::memcpy(dst, sends_[peer], bytes);
    }
    simulate_link((size_ - 1) * bytes);
    barrier();
  }

  // The collective of chunked unshard: bytes [begin, end) of a unit's flat buffer, where rank r
  // owns flat bytes [r*shard, (r+1)*shard) and has already put its part of the range at
  // dst + (max(begin, r*shard) - begin). Afterwards every rank's dst holds the whole range: an
  // in-place all-gather-v (on NCCL, grouped broadcasts from the owners). Same pull model as
  // all_gather; one latency per chunk, which is what makes tiny chunks expensive.
  void gather_range(std::size_t rank, std::byte* dst, std::size_t begin, std::size_t end, std::size_t shard) {
    with_lock([&] { sends_[rank] = dst; });
    barrier();
    std::size_t received = 0;
    for (std::size_t peer = 0; peer < size_ && shard; ++peer) {
      const std::size_t lo = std::max(begin, peer * shard), hi = std::min(end, (peer + 1) * shard);
      if (peer == rank || lo >= hi) continue;
      std::memcpy(dst + (lo - begin), sends_[peer] + (lo - begin), hi - lo);
      received += hi - lo;
    }
    simulate_link(received);
    barrier();
  }

  // Broadcast `bytes` at `buf` from `root` to every rank.
  void broadcast(std::size_t rank, std::size_t root, std::byte* buf, std::size_t bytes) {
    with_lock([&] { sends_[rank] = buf; });
    barrier();
    if (rank != root && bytes) std::memcpy(buf, sends_[root], bytes);
    simulate_link(rank == root ? 0 : bytes);
    barrier();
  }

  // Point-to-point: `bytes` at `src` on rank `from` land at `dst` on rank `to`. A collective all
  // the same: every rank calls it in the same order with the same (from, to, bytes), so a rank
  // that is neither endpoint only takes part in the two barriers. src is read only on `from`, dst
  // written only on `to`. Same pull model as broadcast (`to` copies between two barriers), so
  // after the call `from` may reuse src at once, e.g. receive into it in the next transfer.
  // from == to: a local memmove on that rank, and no synchronisation at all.
  void transfer(std::size_t rank, std::size_t from, std::size_t to, const std::byte* src, std::byte* dst,
                std::size_t bytes) {
    check_endpoints(from, to);
    if (from == to) {
      if (rank == from && bytes) std::memmove(dst, src, bytes);
      return;
    }
    if (rank == from) with_lock([&] { sends_[rank] = src; });
    barrier();
    if (rank == to && bytes) std::memmove(dst, sends_[from], bytes);
    simulate_link(rank == to ? bytes : 0);
    barrier();
  }

 private:
  void check_endpoints(std::size_t from, std::size_t to) const {
    if (from >= size_ || to >= size_)
      throw_error("host_world: transfer from rank ", from, " to rank ", to, ": ", from >= size_ ? "from" : "to",
                  " is not a rank of this world of size ", size_);
  }

  void simulate_link(std::size_t bytes_received) const {
    const double s = link_.seconds_for(bytes_received);
    if (s > 0) std::this_thread::sleep_for(std::chrono::duration<double>(s));
  }

  std::size_t size_;
  link_model link_;
  std::size_t barrier_count_ = 0, barrier_generation_ = 0;
  std::vector<const std::byte*> sends_;
};

}  // namespace unshard
