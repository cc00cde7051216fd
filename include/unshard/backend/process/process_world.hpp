#pragma once
// The ranks of a job as processes (one per rank, as under torchrun), joined by a full mesh of TCP
// connections built from the same rendezvous the NCCL path bootstraps with. It offers what the
// host stream needs from a world (wait/update/abort, all_gather, gather_range, transfer) with the host
// world's semantics, so the runtime and the host stream run over it unchanged.
//
// Failure model (NCCL's async error + abort): a peer whose connection closes or resets, or that
// sends an abort, makes this world abort; every blocked or later wait then throws
// rank_failure naming the failed rank. A monitor thread watches every connection for a hang-up
// even while no collective runs, so a SIGKILLed rank is noticed within milliseconds; a
// collective that makes no progress for the timeout aborts too, so nothing hangs.
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "unshard/core/world_size.hpp"
#include "unshard/backend/job_state.hpp"
#include "unshard/backend/net/rendezvous.hpp"
#include "unshard/backend/net/socket.hpp"
#include "unshard/backend/process/mesh.hpp"
#include "unshard/core/error.hpp"

namespace unshard {

struct process_world_options {
  std::chrono::duration<double> timeout = std::chrono::seconds(300);  // a collective with no progress
  // After another rank's failure, how long this process keeps its connections open before it
  // closes them, so every survivor learns the failed rank from that rank's own hang-up and not
  // from a survivor that exited first.
  std::chrono::duration<double> linger = std::chrono::milliseconds(500);
};

class process_world {
 public:
  explicit process_world(net::rendezvous& rv, process_world_options opt = {})
      : rank_(rv.rank()), size_(rv.size()), opt_(opt), peers_(rv.size()), pending_(rv.size()) {
    require_world_size(size_, "process_world");
    wake_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake_fd_ < 0) throw_error("process_world: eventfd failed: ", std::strerror(errno));
    try {
      peers_ = process_detail::connect_mesh(rv);
    } catch (...) {
      ::close(wake_fd_);
      throw;
    }
    pollfds_.reserve(size_ + 1);
    // The monitor's poll set is made here, not by the thread: a thread that allocated when it first
    // ran could do so in the middle of a forward (it may be scheduled late), which allocates nothing.
    monitor_fds_.assign(size_ + 1, pollfd{});
    monitor_fds_[0] = {wake_fd_, POLLIN, 0};
    for (std::size_t p = 0; p < size_; ++p) monitor_fds_[p + 1] = {p == rank_ ? -1 : peers_[p].fd(), POLLRDHUP, 0};
    monitor_ = std::thread([this] { monitor_connections(); });
  }

  ~process_world() {
    if (!aborted()) {
      closing_.store(true);  // from here a hang-up is a peer that finished, not a failure
      try {
        barrier();  // nobody closes while a peer may still read from it
      } catch (...) {
      }
    } else if (failed_rank() != static_cast<int>(rank_)) {
      linger_after_failure();
    }
    stop_.store(true);
    wake();
    if (monitor_.joinable()) monitor_.join();
    for (auto& p : peers_) p.close();
    if (wake_fd_ >= 0) ::close(wake_fd_);
  }
  process_world(const process_world&) = delete;
  process_world& operator=(const process_world&) = delete;

  std::size_t size() const noexcept { return size_; }
  std::size_t rank() const noexcept { return rank_; }

  // ---- the job-wide state (job_state), plus telling the peers when this rank is the one failing
  void abort(std::size_t failed_rank, const std::string& why) {
    if (!state_.abort(failed_rank, why)) return;
    wake();
    if (failed_rank != rank_) return;
    if (collective_owner_.load() == std::this_thread::get_id()) announce_pending_ = true;  // after run() unlocks
    else announce_failure(why);
  }
  bool aborted() const noexcept { return state_.aborted(); }
  int failed_rank() const { return state_.failed_rank(); }
  std::string failure_reason() const { return state_.failure_reason(); }
  [[noreturn]] void throw_aborted() const { state_.throw_aborted(); }
  template <class Pred>
  void wait(Pred pred) {
    state_.wait(pred);
  }
  template <class F>
  void update(F f) {
    state_.update(f);
  }

  // ---- collectives: every rank calls them in the same order ------------------------------------
  // All-gather of `bytes` per rank into recv (size * bytes, rank order); in place when
  // send == recv + rank * bytes. `rank` must be this process's rank (host_world's signature).
  void all_gather(std::size_t rank, const std::byte* send, std::byte* recv, std::size_t bytes) {
    check_rank(rank);
    begin(op_kind::all_gather, bytes);
    std::byte* own = recv + rank_ * bytes;
    if (send != own && bytes) std::memmove(own, send, bytes);
    for (std::size_t p = 0; p < size_; ++p)
      if (p != rank_) pending_[p] = {own, bytes, true, recv + p * bytes, bytes, true};
    run("all_gather");
  }

  // In-place all-gather-v of bytes [begin, end) of a flat buffer into dst: rank r owns flat bytes
  // [r*shard_bytes, (r+1)*shard_bytes) and has placed its part of the range at
  // dst + (max(begin, r*shard_bytes) - begin). Owners with an empty part exchange nothing.
  void gather_range(std::size_t rank, std::byte* dst, std::size_t begin_byte, std::size_t end_byte,
                    std::size_t shard_bytes) {
    check_rank(rank);
    begin(op_kind::gather_range, end_byte - begin_byte);
    const auto part = [&](std::size_t r) {
      const std::size_t lo = std::max(begin_byte, r * shard_bytes), hi = std::min(end_byte, (r + 1) * shard_bytes);
      return lo < hi ? std::pair{dst + (lo - begin_byte), hi - lo} : std::pair{dst, std::size_t{0}};
    };
    const auto [mine, my_bytes] = part(rank_);
    for (std::size_t p = 0; p < size_; ++p) {
      if (p == rank_) continue;
      const auto [theirs, their_bytes] = part(p);
      pending_[p] = {mine, my_bytes, my_bytes > 0, theirs, their_bytes, their_bytes > 0};
    }
    run("gather_range");
  }

  void broadcast(std::size_t rank, std::size_t root, std::byte* buf, std::size_t bytes) {
    check_rank(rank);
    begin(op_kind::broadcast, bytes);
    for (std::size_t p = 0; p < size_; ++p) {
      if (p == rank_) continue;
      if (rank_ == root) pending_[p] = {buf, bytes, true, nullptr, 0, false};
      else if (p == root) pending_[p] = {nullptr, 0, false, buf, bytes, true};
    }
    run("broadcast");
  }

  // Point-to-point: `bytes` at `src` on rank `from` land at `dst` on rank `to`. A collective all
  // the same: every rank calls it in the same order with the same (from, to, bytes), so the
  // collective numbers stay aligned, but only `from` sends (one frame and the bytes, to `to`) and
  // only `to` receives; a rank that is neither returns at once, and `from` returns once its bytes
  // are handed to the kernel, so it may reuse src at once. from == to: a local memmove.
  void transfer(std::size_t rank, std::size_t from, std::size_t to, const std::byte* src, std::byte* dst,
                std::size_t bytes) {
    check_rank(rank);
    if (from >= size_ || to >= size_)
      throw_error("process_world: transfer from rank ", from, " to rank ", to, ": ", from >= size_ ? "from" : "to",
                  " is not a rank of this world of size ", size_);
    begin(op_kind::transfer, bytes);
    if (from == to) {
      if (rank_ == from && bytes) std::memmove(dst, src, bytes);
      return;
    }
    if (rank_ == from) pending_[to] = {src, bytes, true, nullptr, 0, false};
    else if (rank_ == to) pending_[from] = {nullptr, 0, false, dst, bytes, true};
    else return;
    run("transfer");
  }

  void barrier() {
    begin(op_kind::barrier, 0);
    for (std::size_t p = 0; p < size_; ++p)
      if (p != rank_) pending_[p] = {nullptr, 0, true, nullptr, 0, true};
    run("barrier");
  }

 private:
  using op_kind = process_detail::op_kind;
  using frame = process_detail::frame;
  using trailer = process_detail::trailer;
  static constexpr std::uint32_t frame_magic = process_detail::frame_magic;
  static constexpr std::uint64_t trailer_magic = process_detail::trailer_magic;
  static constexpr std::size_t max_reason = process_detail::max_reason;

  // One peer's part of a collective: what to send it and what to receive from it.
  struct peer_part {
    const std::byte* send = nullptr;
    std::size_t send_bytes = 0;
    bool sending = false;
    std::byte* recv = nullptr;
    std::size_t recv_bytes = 0;
    bool receiving = false;
    // progress
    frame out{}, in{};
    std::size_t sent = 0, got = 0;  // including the frame
  };

  void check_rank(std::size_t rank) const {
    if (rank != rank_) throw_error("process_world: collective called for rank ", rank, " in the process of rank ", rank_);
  }

  void begin(op_kind kind, std::size_t bytes) {
    if (aborted()) throw_aborted();
    ++seq_;
    kind_ = kind;
    op_bytes_ = bytes;
    for (auto& t : pending_) t = {};
  }

  // Drives every peer's send and receive at once (non-blocking sockets, one poll), so large
  // transfers in both directions never deadlock on full socket buffers.
  void run(const char* what) {
    std::unique_lock collective(collective_mutex_);
    collective_owner_.store(std::this_thread::get_id());
    try {
      exchange(what);
    } catch (...) {
      // Left mid-frame to some peer: an abort frame could not be parsed there any more.
      for (const peer_part& t : pending_) send_broken_ |= t.sent > 0 && t.sent < sizeof(frame) + t.send_bytes;
      collective_owner_.store({});
      collective.unlock();
      if (announce_pending_) announce_failure(failure_reason());
      throw;
    }
    collective_owner_.store({});
  }

  void exchange(const char* what) {
    for (std::size_t p = 0; p < size_; ++p) {
      peer_part& t = pending_[p];
      if (t.sending) t.out = {frame_magic, static_cast<std::uint32_t>(kind_), seq_, t.send_bytes};
    }
    auto until = net::after(opt_.timeout);
    for (;;) {
      pollfds_.clear();
      pollfds_.push_back({wake_fd_, POLLIN, 0});
      for (std::size_t p = 0; p < size_; ++p) {
        const peer_part& t = pending_[p];
        short ev = 0;
        if (t.sending && t.sent < sizeof(frame) + t.send_bytes) ev |= POLLOUT;
        if (t.receiving && t.got < sizeof(frame) + t.recv_bytes) ev |= POLLIN;
        pollfds_.push_back({ev ? peers_[p].fd() : -1, ev, 0});
      }
      if (pollfds_.size() == 1 || all_done()) return;
      const int r = ::poll(pollfds_.data(), pollfds_.size(), net::millis_until(until));
      if (aborted()) throw_aborted();
      if (r < 0) {
        if (errno == EINTR) continue;
        throw_error("process_world: poll failed in ", what, ": ", std::strerror(errno));
      }
      if (r == 0) {
        if (net::net_clock::now() >= until) timed_out(what);
        continue;  // poll waits at most a minute at a time
      }
      bool progressed = false;
      for (std::size_t p = 0; p < size_; ++p) {
        const short re = pollfds_[p + 1].revents;
        const short hangup = re & (POLLHUP | POLLERR);
        // A hang-up is reported through whichever direction is pending (send: EPIPE, recv: EOF);
        // a peer this rank only sends to is never read from, its bytes belong to later collectives.
        if ((re & POLLOUT) || (hangup && (pollfds_[p + 1].events & POLLOUT))) progressed |= progress_send(p, what);
        if ((re & POLLIN) || (hangup && (pollfds_[p + 1].events & POLLIN))) progressed |= progress_recv(p, what);
      }
      if (progressed) until = net::after(opt_.timeout);
    }
  }

  bool all_done() const {
    for (const peer_part& t : pending_)
      if ((t.sending && t.sent < sizeof(frame) + t.send_bytes) || (t.receiving && t.got < sizeof(frame) + t.recv_bytes))
        return false;
    return true;
  }

  bool progress_send(std::size_t p, const char* what) {
    peer_part& t = pending_[p];
    bool any = false;
    while (t.sent < sizeof(frame) + t.send_bytes) {
      const bool in_frame = t.sent < sizeof(frame);
      const std::byte* src = in_frame ? reinterpret_cast<const std::byte*>(&t.out) + t.sent : t.send + (t.sent - sizeof(frame));
      const std::size_t left = in_frame ? sizeof(frame) - t.sent : sizeof(frame) + t.send_bytes - t.sent;
      const ssize_t n = ::send(peers_[p].fd(), src, left, MSG_NOSIGNAL);
      if (n > 0) {
        t.sent += static_cast<std::size_t>(n);
        any = true;
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      peer_lost(p, detail::concat("its connection broke while this rank sent it data in ", what, " (",
                                  std::strerror(errno), ")"));
    }
    return any;
  }

  bool progress_recv(std::size_t p, const char* what) {
    peer_part& t = pending_[p];
    bool any = false;
    while (t.got < sizeof(frame) + t.recv_bytes) {
      const bool in_frame = t.got < sizeof(frame);
      std::byte* dst = in_frame ? reinterpret_cast<std::byte*>(&t.in) + t.got : t.recv + (t.got - sizeof(frame));
      const std::size_t left = in_frame ? sizeof(frame) - t.got : sizeof(frame) + t.recv_bytes - t.got;
      const ssize_t n = ::recv(peers_[p].fd(), dst, left, 0);
      if (n > 0) {
        t.got += static_cast<std::size_t>(n);
        any = true;
        if (t.got == sizeof(frame)) check_frame(p, t, what);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      if (n == 0 && t.got > sizeof(frame) && !aborted()) {
        // The peer's failure trailer may have landed in this payload (its frame was cut).
        const trailer_info tail = decode_trailer(t.recv, t.got - sizeof(frame));
        if (tail.found) abort(tail.failed_rank, tail.reason);
      }
      peer_lost(p, n == 0 ? detail::concat("its process exited or was killed (connection closed during ", what, ")")
                          : detail::concat("its connection was reset during ", what, " (", std::strerror(errno), ")"));
    }
    return any;
  }

  void check_frame(std::size_t p, const peer_part& t, const char* what) {
    const frame& f = t.in;
    if (f.magic == frame_magic && f.kind == static_cast<std::uint32_t>(op_kind::abort)) {
      // The peer failed (or relays a failure): read its reason, then abort as it says.
      std::string reason(std::min<std::uint64_t>(f.bytes, max_reason), '\0');
      try {
        peers_[p].recv_all(std::as_writable_bytes(std::span(reason.data(), reason.size())),
                           net::after(std::chrono::seconds(1)));
      } catch (const error&) {
        reason = "(reason lost)";
      }
      abort(static_cast<std::size_t>(f.seq), reason);
      throw_aborted();
    }
    if (f.magic != frame_magic || f.kind != static_cast<std::uint32_t>(kind_) || f.seq != seq_ || f.bytes != t.recv_bytes) {
      const std::string why = detail::concat(
          "rank ", p, " sent ", f.magic == frame_magic ? process_detail::name_of(f.kind) : "a corrupt frame", " #", f.seq, " of ", f.bytes,
          " bytes while rank ", rank_, " expected ", what, " #", seq_, " of ", t.recv_bytes,
          " bytes: the ranks ran different collectives");
      abort(rank_, why);
      throw_aborted();
    }
  }

  [[noreturn]] void timed_out(const char* what) {
    std::size_t late = rank_;
    for (std::size_t p = 0; p < size_ && late == rank_; ++p)
      if (pending_[p].receiving && pending_[p].got < sizeof(frame) + pending_[p].recv_bytes) late = p;
    abort(late, detail::concat("no progress for ", opt_.timeout.count(), " s: rank ", rank_, " waited on rank ", late,
                               " in ", what, " #", seq_, " (", op_bytes_, " bytes; UNSHARD_TIMEOUT sets the limit)"));
    throw_aborted();
  }

  // A peer's connection ended: that peer failed, unless the stream ends with a failure trailer
  // naming another rank (a survivor relaying the failure it saw first).
  [[noreturn]] void peer_lost(std::size_t p, const std::string& why) {
    if (!aborted()) {
      trailer_info t = read_trailer(p);
      if (t.found) abort(t.failed_rank, t.reason);
      else abort(p, why);
    }
    throw_aborted();
  }

  struct trailer_info {
    bool found = false;
    std::size_t failed_rank = 0;
    std::string reason;
  };
  // Peeks at the bytes still buffered from peer p (all of them are there once it hung up) and
  // decodes a trailer at their end.
  trailer_info read_trailer(std::size_t p) {
    trailer_info out;
    int available = 0;
    if (::ioctl(peers_[p].fd(), FIONREAD, &available) != 0 || available < static_cast<int>(sizeof(trailer))) return out;
    std::vector<std::byte> buf(static_cast<std::size_t>(available));
    const ssize_t n = ::recv(peers_[p].fd(), buf.data(), buf.size(), MSG_PEEK | MSG_DONTWAIT);
    return n > 0 ? decode_trailer(buf.data(), static_cast<std::size_t>(n)) : out;
  }
  // A trailer ending the `n` bytes at `data`, if there is one.
  trailer_info decode_trailer(const std::byte* data, std::size_t n) const {
    trailer_info out;
    if (n < sizeof(trailer)) return out;
    trailer t{};
    std::memcpy(&t, data + n - sizeof(trailer), sizeof t);
    if (t.magic != trailer_magic || t.reason_bytes > max_reason || t.failed_rank >= size_ ||
        n < sizeof(trailer) + t.reason_bytes)
      return out;
    out.found = true;
    out.failed_rank = t.failed_rank;
    out.reason.assign(reinterpret_cast<const char*>(data + n - sizeof(trailer) - t.reason_bytes), t.reason_bytes);
    return out;
  }

  // The collective in flight (woken by the abort) leaves within a poll round. A try_lock loop
  // rather than a timed_mutex: ThreadSanitizer does not see timed_mutex's clocklock.
  static bool lock_within(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds limit) {
    const auto until = net::after(limit);
    while (!lock.try_lock()) {
      if (net::net_clock::now() >= until) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return true;
  }

  // This rank failed: tell every peer why (an abort frame where our stream to it is at a frame
  // boundary, and always a trailer), then half-close, so each peer names this rank promptly.
  void announce_failure(const std::string& why) noexcept {
    const std::string reason = why.substr(0, max_reason);
    std::unique_lock collective(collective_mutex_, std::defer_lock);
    const bool aligned = lock_within(collective, std::chrono::seconds(2)) && !send_broken_;
    const frame f{frame_magic, static_cast<std::uint32_t>(op_kind::abort), rank_, reason.size()};
    const trailer t{static_cast<std::uint32_t>(rank_), static_cast<std::uint32_t>(reason.size()), trailer_magic};
    for (std::size_t p = 0; p < size_; ++p) {
      if (p == rank_ || !peers_[p].valid()) continue;
      try {
        const auto until = net::after(std::chrono::milliseconds(500));
        if (aligned) peers_[p].send_all(std::as_bytes(std::span(&f, 1)), until);
        peers_[p].send_all(std::as_bytes(std::span(reason.data(), reason.size())), until);
        peers_[p].send_all(std::as_bytes(std::span(&t, 1)), until);
      } catch (...) {
      }
      peers_[p].shutdown_write();
    }
  }

  // Another rank failed: keep the connections open a moment, so slower survivors still see the
  // failed rank's own hang-up first, then relay the failure in a trailer before closing.
  void linger_after_failure() noexcept {
    std::this_thread::sleep_for(std::chrono::duration_cast<std::chrono::milliseconds>(opt_.linger));
    const std::string reason = failure_reason().substr(0, max_reason);
    const auto failed = static_cast<std::size_t>(failed_rank());
    const trailer t{static_cast<std::uint32_t>(failed), static_cast<std::uint32_t>(reason.size()), trailer_magic};
    std::unique_lock collective(collective_mutex_, std::defer_lock);
    if (!lock_within(collective, std::chrono::seconds(1))) return;
    for (std::size_t p = 0; p < size_; ++p) {
      if (p == rank_ || p == failed || !peers_[p].valid()) continue;
      try {
        const auto until = net::after(std::chrono::milliseconds(200));
        peers_[p].send_all(std::as_bytes(std::span(reason.data(), reason.size())), until);
        peers_[p].send_all(std::as_bytes(std::span(&t, 1)), until);
      } catch (...) {
      }
      peers_[p].shutdown_write();
    }
  }

  // Watches every connection for a hang-up (POLLRDHUP: the peer's side closed) without reading
  // its data, so a rank that dies while this one computes is noticed at once.
  void monitor_connections() {
    std::vector<pollfd>& fds = monitor_fds_;
    while (!stop_.load() && !aborted()) {
      const int r = ::poll(fds.data(), fds.size(), 1000);
      if (r < 0 && errno != EINTR) return;
      if (stop_.load() || aborted()) return;
      for (std::size_t p = 0; p < size_; ++p) {
        if (!(fds[p + 1].revents & (POLLRDHUP | POLLHUP | POLLERR))) continue;
        fds[p + 1].fd = -1;  // report it once
        if (closing_.load()) continue;
        // A collective in flight may be reading this peer's last bytes (its abort frame and reason)
        // while we peek, so the trailer can look cut: give it a moment to report the failure with
        // its reason before this hang-up is named as the failure (a race seen about 1 run in 20).
        const auto grace = net::after(std::chrono::milliseconds(200));
        trailer_info t = read_trailer(p);
        while (!t.found && !aborted() && net::net_clock::now() < grace) {
          std::this_thread::sleep_for(std::chrono::milliseconds(2));
          t = read_trailer(p);
        }
        if (aborted()) return;
        if (t.found) abort(t.failed_rank, t.reason);
        else abort(p, "its process exited or was killed (its connection closed)");
        return;
      }
    }
  }

  void wake() noexcept {
    if (wake_fd_ < 0) return;
    const std::uint64_t one = 1;
    [[maybe_unused]] const ssize_t n = ::write(wake_fd_, &one, sizeof one);
  }

  std::size_t rank_, size_;
  process_world_options opt_;
  std::vector<net::socket> peers_;       // peers_[rank_] stays invalid
  std::vector<peer_part> pending_;       // the current collective, one entry per peer
  std::vector<pollfd> pollfds_;
  std::uint64_t seq_ = 0;
  op_kind kind_ = op_kind::barrier;
  std::size_t op_bytes_ = 0;
  bool send_broken_ = false;             // a collective failed with a frame to some peer cut mid-way
  std::mutex collective_mutex_;          // one collective (or failure announcement) at a time
  std::atomic<std::thread::id> collective_owner_{};
  bool announce_pending_ = false;        // this rank failed inside a collective: announce on the way out
  int wake_fd_ = -1;
  std::vector<pollfd> monitor_fds_;      // the monitor thread's own (wake fd, then one per peer)
  std::thread monitor_;
  std::atomic<bool> stop_{false}, closing_{false};

  job_state state_;
};

}  // namespace unshard
