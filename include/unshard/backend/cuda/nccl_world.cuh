#pragma once
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <deque>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "unshard/core/world_size.hpp"
#include "unshard/backend/cuda/bootstrap.hpp"
#include "unshard/backend/cuda/check.cuh"
#include "unshard/backend/cuda/device.cuh"
#include "unshard/backend/link_model.hpp"
#include "unshard/core/error.hpp"

namespace unshard {

struct cuda_world_options {
  // How long communicator set-up, or a stream synchronize, may wait before the job is aborted as
  // hung (a rank that never joined, a peer that died without NCCL noticing). Like PyTorch's NCCL
  // timeout: a failure becomes an error on every rank instead of a hang.
  std::chrono::milliseconds timeout = std::chrono::minutes(10);
};

// The ranks of a CUDA job and their NCCL communicators: the backend's `world`.
//
// Two ways in, one object:
//  * one process drives N local GPUs (rank r on device r, or on a listed device): what
//    session<M, cuda_backend> builds from its world size, one host thread per rank;
//  * one process per rank (torchrun, srun, mpirun): this process holds rank R of W on one device;
//    the NCCL unique id travels from rank 0 through a caller-supplied unique_id_exchange (TCP from
//    backend/net, or a shared file; see bootstrap.hpp), so this class depends on no transport.
//
// Failure model (NCCL's async-error + ncclCommAbort): the communicators are non-blocking, so no
// NCCL call ever blocks the host indefinitely; callers poll. The first failure, whether reported by
// a rank (abort(rank, why): an exception on its thread) or seen as an NCCL async error, aborts every
// local communicator (which also releases GPU kernels stuck waiting on a dead peer), and every later
// or pending operation on any local rank throws rank_failure naming the failed rank. NCCL does not
// say *which* peer died: a remote error names the rank that observed it, unless the out-of-band
// channel (the TCP bootstrap noticing a closed socket) called abort(peer, ...) first.
//
// abort() never waits for a call in flight. A call can block inside NCCL's enqueue even on a
// non-blocking communicator (a kernel launch into a stream whose queue is full of collectives
// waiting for a dead peer): if abort waited for it, nothing would ever release those kernels, the
// hang the failure model forbids. So every use of a communicator (call, poll, the set-up wait)
// counts itself in and out of the communicator's `users`, and abort, after marking the job failed,
// frees (ncclCommAbort) only a communicator nobody is using; one that is in use it revokes
// (ncclCommRevoke: stops its in-flight operations and releases their kernels, frees nothing), and
// the last user to leave it frees it. No lock is held across an NCCL call.
class cuda_world {
 public:
  // One process, `world_size` local GPUs, rank r on device r. The link is real here: a simulated
  // link_model (the host backend's) is accepted for session's sake and ignored.
  explicit cuda_world(std::size_t world_size, link_model = {}, cuda_world_options opt = {})
      : cuda_world(first_devices(world_size), opt) {}

  // One process, rank r on devices[r].
  explicit cuda_world(std::vector<int> devices, cuda_world_options opt = {}) : size_(devices.size()), opt_(opt) {
    require_world_size(devices.size(), "cuda_world");
    const int visible = cuda::device_count();
    for (std::size_t r = 0; r < devices.size(); ++r)
      if (devices[r] < 0 || devices[r] >= visible)
        throw_error("cuda_world: rank ", r, " is to run on device ", devices[r], " but this process sees ", visible,
                    " CUDA device(s)");
    slot_of_.assign(size_, -1);
    for (std::size_t r = 0; r < size_; ++r) {
      local_.emplace_back(r, devices[r]);
      slot_of_[r] = static_cast<int>(r);
    }
    ncclUniqueId id{};
    UNSHARD_CUDA_CHECK(ncclGetUniqueId(&id));
    init_local_communicators(id);
  }

  // This process is rank `rank` of `world_size`, on `device`. `exchange` brings rank 0's unique id
  // to every rank (see launch_env.hpp); every rank of the job must make this call.
  cuda_world(std::size_t rank, std::size_t world_size, int device, const cuda::unique_id_exchange& exchange,
             cuda_world_options opt = {})
      : size_(world_size), opt_(opt) {
    require_world_size(world_size, "cuda_world");
    if (rank >= world_size) throw_error("cuda_world: rank ", rank, " is not below the world size ", world_size);
    const int visible = cuda::device_count();
    if (device < 0 || device >= visible)
      throw_error("cuda_world: rank ", rank, " is to run on device ", device, " (LOCAL_RANK) but this process sees ",
                  visible, " CUDA device(s)");
    if (!exchange) throw_error("cuda_world: rank ", rank, ": no unique-id exchange given");
    slot_of_.assign(size_, -1);
    local_.emplace_back(rank, device);
    slot_of_[rank] = 0;

    ncclUniqueId id{};
    std::array<std::byte, sizeof(ncclUniqueId)> blob{};
    if (rank == 0) {
      UNSHARD_CUDA_CHECK(ncclGetUniqueId(&id));
      std::memcpy(blob.data(), &id, sizeof id);
    }
    exchange(std::span<std::byte>(blob));
    std::memcpy(&id, blob.data(), sizeof id);
    init_local_communicators(id);
  }

  // This process is the rank a launcher says (RANK, WORLD_SIZE), on the device cuda::device_for
  // picks (bootstrap.hpp): GPU LOCAL_RANK when the process sees all of the node's GPUs, GPU 0 when
  // the launcher gave each process one GPU (CUDA_VISIBLE_DEVICES per rank); an error otherwise.
  cuda_world(const net::launch_env& env, const cuda::unique_id_exchange& exchange, cuda_world_options opt = {})
      : cuda_world(env.rank, env.world_size, cuda::device_for(env, cuda::device_count()), exchange, opt) {}

  ~cuda_world() { release_communicators(); }
  cuda_world(const cuda_world&) = delete;
  cuda_world& operator=(const cuda_world&) = delete;

  std::size_t size() const noexcept { return size_; }
  bool is_local(std::size_t rank) const noexcept { return rank < size_ && slot_of_[rank] >= 0; }
  std::vector<std::size_t> local_ranks() const {
    std::vector<std::size_t> r;
    for (const auto& l : local_) r.push_back(l.rank);
    return r;
  }
  int device_of(std::size_t rank) const { return slot(rank).device; }
  // The calling thread works on `rank`'s device from now on (a rank's thread calls it once).
  void make_current(std::size_t rank) const { UNSHARD_CUDA_CHECK(cudaSetDevice(device_of(rank))); }
  const cuda_world_options& options() const noexcept { return opt_; }

  // Issues one NCCL call (or a group) for `rank`: f(ncclComm_t) -> ncclResult_t. Returns once NCCL
  // has issued it to the stream (a non-blocking communicator may need a few polls for that); an
  // error aborts the job and throws rank_failure. `what` names the operation in errors.
  template <class F>
  void call(std::size_t rank, const char* what, F&& f) {
    ncclResult_t r = ncclSuccess;
    std::string last;
    {
      const comm_use use(*this, rank);  // no lock: abort() does not wait for this call
      r = f(use.comm());
      if (r != ncclSuccess && r != ncclInProgress) last = ncclGetLastError(use.comm());
    }
    if (r == ncclInProgress) return wait_ready(rank, what);
    if (r != ncclSuccess) fail(rank, what, r, last);
  }

  // Polls `rank`'s communicator for an asynchronous error (a peer failed, a network error) and
  // turns it into an abort and a rank_failure. Never blocks.
  void poll(std::size_t rank, const char* what) {
    ncclResult_t state = ncclSuccess;
    std::string last;
    {
      const comm_use use(*this, rank);
      UNSHARD_CUDA_CHECK(ncclCommGetAsyncError(use.comm(), &state));
      if (state != ncclSuccess && state != ncclInProgress) last = ncclGetLastError(use.comm());
    }
    if (state != ncclSuccess && state != ncclInProgress) fail(rank, what, state, last);
  }

  // First failure wins: records it and aborts every local communicator (ncclCommAbort also makes
  // GPU kernels waiting on a dead peer return). Safe from any thread, at any time, and it never
  // waits for a call in flight (see the class comment): a communicator in use is revoked now and
  // freed by its last user.
  void abort(std::size_t rank, const std::string& why) {
    {
      std::lock_guard lock(failure_mutex_);
      if (aborted_.load()) return;
      failed_rank_ = rank;
      failure_ = why;
      aborted_.store(true);  // from here on no new use of any communicator begins
    }
    for (auto& l : local_) {
      // abort is a user too while it looks: the communicator cannot be freed under its revoke.
      if (l.users.fetch_add(1) > 0) revoke(l);
      leave(l);
    }
  }
  // Uses of `rank`'s communicator in progress (calls, polls), for tests and diagnostics.
  int users_of(std::size_t rank) const { return slot(rank).users.load(); }
  bool aborted() const noexcept { return aborted_.load(); }
  int failed_rank() const {
    std::lock_guard lock(failure_mutex_);
    return static_cast<int>(failed_rank_);
  }
  [[noreturn]] void throw_aborted() const {
    std::lock_guard lock(failure_mutex_);
    throw rank_failure(static_cast<int>(failed_rank_), detail::concat("rank ", failed_rank_, " failed: ", failure_));
  }

 private:
  struct local_rank {
    local_rank(std::size_t r, int d) : rank(r), device(d) {}
    std::size_t rank;
    int device;
    std::atomic<ncclComm_t> comm{nullptr};  // null once freed
    mutable std::atomic<int> users{0};      // uses in progress (comm_use), abort's included
  };

  // One use of a rank's communicator, counted in `users` (see the class comment): the
  // communicator is not freed before the use ends. Entering after the abort throws its failure.
  // Sequentially consistent: either abort sees this use and leaves the free to it, or this use
  // sees the abort and backs out.
  class comm_use {
   public:
    comm_use(cuda_world& w, std::size_t rank) : w_(w), l_(w.slot_mut(rank)) {
      l_.users.fetch_add(1);
      if (w_.aborted_.load() || !(comm_ = l_.comm.load())) {
        w_.leave(l_);
        w_.throw_aborted();
      }
    }
    ~comm_use() { w_.leave(l_); }
    comm_use(const comm_use&) = delete;
    comm_use& operator=(const comm_use&) = delete;
    ncclComm_t comm() const noexcept { return comm_; }

   private:
    cuda_world& w_;
    local_rank& l_;
    ncclComm_t comm_ = nullptr;
  };

  // The end of a use: the last user out after an abort frees the communicator (exactly once: the
  // pointer is taken by exchange).
  void leave(local_rank& l) noexcept {
    if (l.users.fetch_sub(1) == 1 && aborted_.load())
      if (ncclComm_t c = l.comm.exchange(nullptr)) ncclCommAbort(c);
  }
  // Stops the operations of a communicator that another thread is using (maybe blocked in an
  // enqueue) without freeing it: ncclCommRevoke (NCCL >= 2.28); before that there is no such call,
  // and the communicator's kernels are released when its last user frees it.
  static void revoke(local_rank& l) noexcept {
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= NCCL_VERSION(2, 28, 0)
    if (ncclComm_t c = l.comm.load()) ncclCommRevoke(c, NCCL_REVOKE_DEFAULT);
#else
    (void)l;
#endif
  }

  static std::vector<int> first_devices(std::size_t n) {
    std::vector<int> d(n);
    for (std::size_t i = 0; i < n; ++i) d[i] = static_cast<int>(i);
    return d;
  }

  const local_rank& slot(std::size_t rank) const {
    if (!is_local(rank)) {
      std::string mine;
      for (const auto& l : local_) mine += (mine.empty() ? "" : ", ") + std::to_string(l.rank);
      throw_error("cuda_world: rank ", rank, " of ", size_, " is not driven by this process (it drives rank(s) ",
                  mine, ")");
    }
    return local_[static_cast<std::size_t>(slot_of_[rank])];
  }
  local_rank& slot_mut(std::size_t rank) { return const_cast<local_rank&>(slot(rank)); }

  [[noreturn]] void fail(std::size_t rank, const char* what, ncclResult_t r, const std::string& last) {
    abort(rank, detail::concat(what, ": NCCL ", cuda::nccl_result_name(r), " (", ncclGetErrorString(r),
                               last.empty() ? "" : "; ", last, ")"));
    throw_aborted();
  }

  // Polls until the rank's communicator has no call in progress (non-blocking mode).
  void wait_ready(std::size_t rank, const char* what) {
    const auto deadline = std::chrono::steady_clock::now() + opt_.timeout;
    for (;;) {
      ncclResult_t state = ncclSuccess;
      std::string last;
      {
        const comm_use use(*this, rank);
        UNSHARD_CUDA_CHECK(ncclCommGetAsyncError(use.comm(), &state));
        if (state != ncclSuccess && state != ncclInProgress) last = ncclGetLastError(use.comm());
      }
      if (state == ncclSuccess) return;
      if (state != ncclInProgress) fail(rank, what, state, last);
      if (std::chrono::steady_clock::now() > deadline) {
        abort(rank, detail::concat(what, ": rank ", rank, " still in progress after ", opt_.timeout.count(),
                                   " ms (a rank did not join, or a peer stopped)"));
        throw_aborted();
      }
      std::this_thread::yield();
    }
  }

  // Non-blocking communicators for every local rank, in one NCCL group (so one thread can create
  // several: in a group, NCCL does not wait for each rank's peers before the next call).
  void init_local_communicators(const ncclUniqueId& id) {
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclResult_t first_error = ncclSuccess;
    std::size_t failed = 0;
    UNSHARD_CUDA_CHECK(ncclGroupStart());
    for (auto& l : local_) {
      cuda::device_guard on(l.device);
      ncclConfig_t c = config;
      ncclComm_t comm = nullptr;
      const ncclResult_t r = ncclCommInitRankConfig(&comm, static_cast<int>(size_), id, static_cast<int>(l.rank), &c);
      l.comm.store(comm);
      if (r != ncclSuccess && r != ncclInProgress && first_error == ncclSuccess) {
        first_error = r;
        failed = l.rank;
      }
    }
    const ncclResult_t end = ncclGroupEnd();
    if (first_error == ncclSuccess && end != ncclSuccess && end != ncclInProgress) {
      first_error = end;
      failed = local_.front().rank;
    }
    if (first_error != ncclSuccess) {
      abort(failed, detail::concat("ncclCommInitRankConfig for rank ", failed, " of ", size_, ": NCCL ",
                                   cuda::nccl_result_name(first_error), " (", ncclGetErrorString(first_error), ")"));
      throw_aborted();
    }
    for (const auto& l : local_) wait_ready(l.rank, "NCCL communicator set-up");
  }

  // Finalizes every local communicator first and then waits for all of them, since a finalize may
  // need its local peers' (a single thread drives all local ranks here); anything wrong: abort.
  // No call is in flight any more (the world outlives its streams' calls). After an abort every
  // communicator is freed already, or by its last user, which has left by now.
  void release_communicators() noexcept {
    if (aborted_.load()) {
      for (auto& l : local_)
        if (ncclComm_t c = l.comm.exchange(nullptr)) ncclCommAbort(c);
      return;
    }
    int previous = 0;
    cudaGetDevice(&previous);
    bool ok = true;
    for (auto& l : local_)
      if (ncclComm_t c = l.comm.load()) {
        cudaSetDevice(l.device);  // no device_guard: nothing may throw here
        const ncclResult_t r = ncclCommFinalize(c);
        ok = ok && (r == ncclSuccess || r == ncclInProgress);
      }
    const auto deadline = std::chrono::steady_clock::now() + opt_.timeout;
    for (auto& l : local_) {
      while (ok && l.comm.load()) {
        ncclResult_t state = ncclSuccess;
        if (ncclCommGetAsyncError(l.comm.load(), &state) != ncclSuccess || (state != ncclSuccess && state != ncclInProgress))
          ok = false;
        if (state == ncclSuccess) break;
        if (std::chrono::steady_clock::now() > deadline) ok = false;
        std::this_thread::yield();
      }
    }
    for (auto& l : local_)
      if (ncclComm_t c = l.comm.exchange(nullptr)) {
        if (ok) ncclCommDestroy(c);
        else ncclCommAbort(c);
      }
    cudaSetDevice(previous);
  }

  std::size_t size_;
  cuda_world_options opt_;
  std::deque<local_rank> local_;  // a deque: its elements (atomics) never move
  std::vector<int> slot_of_;       // rank -> index in local_, -1 for a rank of another process
  std::atomic<bool> aborted_{false};
  mutable std::mutex failure_mutex_;
  std::size_t failed_rank_ = 0;
  std::string failure_;
};

}  // namespace unshard
