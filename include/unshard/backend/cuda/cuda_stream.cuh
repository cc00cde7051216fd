#pragma once
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <thread>
#include <utility>

#include "unshard/backend/cuda/check.cuh"
#include "unshard/backend/cuda/device.cuh"
#include "unshard/backend/cuda/nccl_world.cuh"
#include "unshard/core/trace.hpp"
#include "unshard/core/trace_spans.hpp"

namespace unshard {

// A CUDA event without timing (cudaEventDisableTiming: the cheapest kind, and what stream ordering
// needs). Created on first record, on the recording stream's device, so a default-constructed
// vector of events needs no device; waiting on an event never recorded is a no-op, as in CUDA.
class cuda_event {
 public:
  cuda_event() = default;
  cuda_event(cuda_event&& o) noexcept : event_(std::exchange(o.event_, nullptr)), device_(o.device_) {}
  cuda_event& operator=(cuda_event&& o) noexcept {
    if (this != &o) {
      reset();
      event_ = std::exchange(o.event_, nullptr);
      device_ = o.device_;
    }
    return *this;
  }
  cuda_event(const cuda_event&) = delete;
  cuda_event& operator=(const cuda_event&) = delete;
  ~cuda_event() { reset(); }

  cudaEvent_t native() const noexcept { return event_; }
  bool created() const noexcept { return event_ != nullptr; }
  // True when the latest record has executed (host-side check; never blocks).
  bool query() const {
    if (!event_) return true;
    const cudaError_t e = cudaEventQuery(event_);
    if (e == cudaErrorNotReady) return false;
    UNSHARD_CUDA_CHECK(e);
    return true;
  }

 private:
  friend class cuda_stream;
  // Under the caller's device_guard for `device`.
  cudaEvent_t for_record(int device) {
    if (!event_) {
      UNSHARD_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
      device_ = device;
    } else if (device_ != device) {
      throw_error("cuda_event: created on device ", device_, ", recorded on a stream of device ", device);
    }
    return event_;
  }
  void reset() noexcept {
    if (event_) cudaEventDestroy(event_);
    event_ = nullptr;
  }
  cudaEvent_t event_ = nullptr;
  int device_ = -1;
};

// What a stream is for. The roles differ only in priority and in how copy() runs:
//  * compute: the model's kernels (state.attach_stream gives the model this stream);
//  * communication: NCCL collectives, at high priority so a gather's kernels are scheduled ahead
//    of compute blocks and prefetch overlaps; its copy() runs on a copy lane (below);
//  * copy: host-to-device transfers only (uploads, staging), in order.
enum class stream_role : std::uint8_t { compute, communication, copy };

// One in-order queue of a rank's GPU work: the backend's `stream`. Every operation only enqueues;
// the host waits only in synchronize(), so a forward has no host synchronisation per layer and the
// compute stream can be captured in a CUDA graph.
//
// The communication stream's copy lane: an H2D copy (offload: shard from pinned host memory into
// the rank's slot of the gathered buffer) runs on a second CUDA stream of its own, ordered after
// the earlier wait()s and copies of this stream but not after its earlier collectives; every later
// operation of this stream waits for it. So the copy of unit i+2 runs on a copy engine while the
// all-gather of unit i+1 is running, and the gather that reads it still sees it. The runtime fences
// a buffer with wait(slot_free) before copying into it, which is the ordering the copy needs.
class cuda_stream {
 public:
  cuda_stream(cuda_world& world, std::size_t rank, stream_role role, trace_recorder* trace = nullptr)
      : world_(world), rank_(rank), device_(world.device_of(rank)), role_(role), trace_(trace), spans_(trace, rank) {
    world.make_current(rank);  // the rank's thread stays on its device (its kernels launch there)
    int least = 0, greatest = 0;  // CUDA priorities: lower numbers are higher priority
    UNSHARD_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    const int priority = role == stream_role::communication ? greatest : least;
    UNSHARD_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, priority));
    if (role == stream_role::communication) {
      UNSHARD_CUDA_CHECK(cudaStreamCreateWithPriority(&copy_lane_, cudaStreamNonBlocking, least));
      UNSHARD_CUDA_CHECK(cudaEventCreateWithFlags(&copy_done_, cudaEventDisableTiming));
    }
  }
  ~cuda_stream() {
    // Destroying a stream with work queued is legal: CUDA frees it once the work is done.
    if (copy_done_) cudaEventDestroy(copy_done_);
    if (copy_lane_) cudaStreamDestroy(copy_lane_);
    if (stream_) cudaStreamDestroy(stream_);
  }
  cuda_stream(const cuda_stream&) = delete;
  cuda_stream& operator=(const cuda_stream&) = delete;

  cudaStream_t native() const noexcept { return stream_; }
  int device() const noexcept { return device_; }
  std::size_t rank() const noexcept { return rank_; }
  stream_role role() const noexcept { return role_; }
  cuda_world& world() const noexcept { return world_; }

  // Copies `bytes` (host to device for offload; any direction works: unified addressing). From
  // pinned or registered host memory it is asynchronous; from pageable memory CUDA stages it.
  void copy(std::byte* dst, const std::byte* src, std::size_t bytes, std::uint32_t unit = 0) {
    if (bytes == 0) return;
    cuda::device_guard on(device_);
    const cudaStream_t s = copy_lane_ ? copy_lane_ : stream_;
    trace_begin(s);
    UNSHARD_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s));
    trace_end(s, trace_kind::host_to_device, unit, bytes);
    if (copy_lane_) {
      UNSHARD_CUDA_CHECK(cudaEventRecord(copy_done_, copy_lane_));
      UNSHARD_CUDA_CHECK(cudaStreamWaitEvent(stream_, copy_done_, 0));
    }
  }

  // A copy within the rank's device memory (its own part of a chunk into the gather slot): in
  // order on this stream itself, not on the copy lane, and not traced as a transfer (the host
  // backend's local_copy likewise).
  void local_copy(std::byte* dst, const std::byte* src, std::size_t bytes, std::uint32_t /*unit*/ = 0) {
    if (bytes == 0) return;
    cuda::device_guard on(device_);
    UNSHARD_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
  }

  // ncclAllGather of `bytes` per rank into `recv` (world size x bytes). In place when
  // send == recv + rank * bytes, which is how the runtime calls it: no staging copy of the shard.
  void all_gather(const std::byte* send, std::byte* recv, std::size_t bytes, std::uint32_t unit) {
    cuda::device_guard on(device_);
    trace_begin(stream_);
    world_.call(rank_, "ncclAllGather", [&](ncclComm_t c) {
      return ncclAllGather(send, recv, bytes, ncclUint8, c, stream_);
    });
    trace_end(stream_, trace_kind::gather, unit, bytes * world_.size());
  }

  // In-place all-gather-v of bytes [begin, end) of a unit's flat buffer into dst, where rank r owns
  // flat bytes [r*shard_bytes, (r+1)*shard_bytes) and has already put its part of the range at
  // dst + (max(begin, r*shard_bytes) - begin). One NCCL group of in-place broadcasts, one per
  // owner with a non-empty part, rooted at that owner: the chunked policy's gather.
  void gather_range(std::byte* dst, std::size_t begin, std::size_t end, std::size_t shard_bytes,
                    std::uint32_t unit) {
    if (end <= begin) return;
    if (shard_bytes == 0) throw_error("gather_range: rank ", rank_, ": shard size 0 for a non-empty range");
    cuda::device_guard on(device_);
    trace_begin(stream_);
    world_.call(rank_, "ncclBroadcast group (gather_range)", [&](ncclComm_t c) {
      ncclResult_t first = ncclGroupStart();
      if (first != ncclSuccess) return first;
      const std::size_t first_owner = begin / shard_bytes;
      const std::size_t last_owner = std::min(world_.size() - 1, (end - 1) / shard_bytes);
      for (std::size_t r = first_owner; r <= last_owner; ++r) {
        const std::size_t lo = std::max(begin, r * shard_bytes), hi = std::min(end, (r + 1) * shard_bytes);
        if (lo >= hi) continue;
        std::byte* part = dst + (lo - begin);
        const ncclResult_t res = ncclBroadcast(part, part, hi - lo, ncclUint8, static_cast<int>(r), c, stream_);
        if (first == ncclSuccess && res != ncclSuccess && res != ncclInProgress) first = res;
      }
      const ncclResult_t end_result = ncclGroupEnd();  // always closes the group, even after an error
      return first != ncclSuccess ? first : end_result;
    });
    trace_end(stream_, trace_kind::gather, unit, end - begin);
  }

  // Point-to-point: `bytes` at `src` on rank `from` land at `dst` on rank `to`. Every rank calls it
  // in the same order with the same (from, to, bytes), as the host backend's transfer; on NCCL only
  // the two endpoints act: one group holding ncclSend on `from` and ncclRecv on `to`, on the
  // communicator of the all-gather. A rank that is neither returns at once; from == to is a
  // device-to-device copy on this stream. Traced on the endpoints as a gather span.
  void transfer(std::size_t from, std::size_t to, const std::byte* src, std::byte* dst, std::size_t bytes,
                std::uint32_t unit = 0) {
    if (from >= world_.size() || to >= world_.size())
      throw_error("transfer from rank ", from, " to rank ", to, ": ", from >= world_.size() ? "from" : "to",
                  " is not a rank of this world of size ", world_.size());
    if ((rank_ != from && rank_ != to) || bytes == 0) return;  // both endpoints know bytes: both skip
    cuda::device_guard on(device_);
    trace_begin(stream_);
    if (from == to) {
      UNSHARD_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
    } else {
      world_.call(rank_, rank_ == from ? "ncclSend (transfer)" : "ncclRecv (transfer)", [&](ncclComm_t c) {
        const ncclResult_t start = ncclGroupStart();
        if (start != ncclSuccess) return start;
        const ncclResult_t res = rank_ == from ? ncclSend(src, bytes, ncclUint8, static_cast<int>(to), c, stream_)
                                               : ncclRecv(dst, bytes, ncclUint8, static_cast<int>(from), c, stream_);
        const ncclResult_t end_result = ncclGroupEnd();  // always closes the group, even after an error
        return res != ncclSuccess && res != ncclInProgress ? res : end_result;
      });
    }
    trace_end(stream_, trace_kind::gather, unit, bytes);
  }

  void record(cuda_event& e) {
    cuda::device_guard on(device_);
    UNSHARD_CUDA_CHECK(cudaEventRecord(e.for_record(device_), stream_));
  }
  // Later work of this stream (and of its copy lane) waits for e's latest record.
  void wait(cuda_event& e) {
    if (!e.created()) return;
    cuda::device_guard on(device_);
    UNSHARD_CUDA_CHECK(cudaStreamWaitEvent(stream_, e.native(), 0));
    if (copy_lane_) UNSHARD_CUDA_CHECK(cudaStreamWaitEvent(copy_lane_, e.native(), 0));
  }
  // A span of work the caller enqueues on this stream itself (a unit's kernels: the runtime's
  // "compute" span), timed when the GPU reaches it, not when the host enqueues it: a host callback
  // at the stream position of begin_span stamps the begin, one at end_span's writes the entry
  // (the same trace_spans slots as the gathers). The host returns from a unit's forward long
  // before its kernels run, so host times around it would show enqueue times, not compute.
  // Returns null with tracing off (or when every slot is still pending: the span is then counted
  // as dropped); end_span(null, ...) does nothing. Spans may interleave (lanes of a tick).
  trace_spans::span* begin_span() {
    trace_spans::span* span = spans_.open();
    if (!span) return nullptr;
    cuda::device_guard on(device_);
    const cudaError_t e = cudaLaunchHostFunc(stream_, trace_spans::span::stamp_begin, span);
    if (e != cudaSuccess) trace_spans::cancel(span);  // no callback holds it
    UNSHARD_CUDA_CHECK(e);
    return span;
  }
  void end_span(trace_spans::span* span, trace_kind kind, std::uint32_t unit, std::size_t bytes = 0) {
    if (!span) return;
    span->set(kind, unit, bytes);
    cuda::device_guard on(device_);
    const cudaError_t e = cudaLaunchHostFunc(stream_, trace_spans::span::write_end, span);
    if (e != cudaSuccess) trace_spans::cancel(span);  // never written: give the slot back
    UNSHARD_CUDA_CHECK(e);
  }
  bool tracing() const noexcept { return spans_.enabled(); }

  // Native handles, for work launched outside this class (kernels, cuBLASLt) to be ordered with it.
  void record_native(cudaEvent_t e) {
    cuda::device_guard on(device_);
    UNSHARD_CUDA_CHECK(cudaEventRecord(e, stream_));
  }

  // Blocks until everything enqueued so far has run. Polls instead of cudaStreamSynchronize, so a
  // peer's failure (NCCL async error, another local rank's abort) or the world's timeout ends the
  // wait with rank_failure instead of a hang on a collective that will never complete.
  void synchronize() {
    cuda::device_guard on(device_);
    const auto deadline = std::chrono::steady_clock::now() + world_.options().timeout;
    for (std::uint64_t spins = 0;; ++spins) {
      if (world_.aborted()) world_.throw_aborted();
      const cudaError_t e = cudaStreamQuery(stream_);
      if (e == cudaSuccess) return;
      if (e != cudaErrorNotReady) {
        cudaGetLastError();
        world_.abort(rank_, detail::concat("rank ", rank_, " (device ", device_, "): stream failed: ",
                                           cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
        world_.throw_aborted();
      }
      world_.poll(rank_, "stream synchronize");
      if (std::chrono::steady_clock::now() > deadline) {
        world_.abort(rank_, detail::concat("rank ", rank_, " (device ", device_, "): stream not done after ",
                                           world_.options().timeout.count(),
                                           " ms (a collective waits for a peer that stopped?)"));
        world_.throw_aborted();
      }
      // Spin briefly (a layer's work ends within microseconds of the query), then back off.
      if (spins < 1000) std::this_thread::yield();
      else std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

 private:
  // Tracing: the time an operation starts and ends *on the GPU* is when the stream reaches a host
  // callback placed before and after it (cudaLaunchHostFunc, capturable in a graph). A span's slot
  // stays reserved until its end callback has run (core/trace_spans.hpp), so a stream enqueueing
  // far ahead of the GPU drops spans (counted by the recorder) instead of overwriting pending ones.
  // With tracing off nothing is enqueued.
  void trace_begin(cudaStream_t s) {
    open_span_ = spans_.open();
    if (!open_span_) return;
    const cudaError_t e = cudaLaunchHostFunc(s, trace_spans::span::stamp_begin, open_span_);
    if (e != cudaSuccess) trace_spans::cancel(std::exchange(open_span_, nullptr));  // no callback holds it
    UNSHARD_CUDA_CHECK(e);
  }
  void trace_end(cudaStream_t s, trace_kind kind, std::uint32_t unit, std::size_t bytes) {
    trace_spans::span* span = std::exchange(open_span_, nullptr);
    if (!span) return;
    span->set(kind, unit, bytes);
    UNSHARD_CUDA_CHECK(cudaLaunchHostFunc(s, trace_spans::span::write_end, span));
  }

  cuda_world& world_;
  std::size_t rank_;
  int device_;
  stream_role role_;
  trace_recorder* trace_;
  cudaStream_t stream_ = nullptr;
  cudaStream_t copy_lane_ = nullptr;  // communication streams only
  cudaEvent_t copy_done_ = nullptr;
  trace_spans spans_;
  trace_spans::span* open_span_ = nullptr;  // between trace_begin and trace_end
};

}  // namespace unshard
