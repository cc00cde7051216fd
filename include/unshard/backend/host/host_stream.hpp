#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <thread>

#include "unshard/backend/host/host_world.hpp"
#include "unshard/core/error.hpp"
#include "unshard/core/trace.hpp"

namespace unshard {

// An event with CUDA semantics: a wait refers to the latest record *enqueued* before it, and
// completes when that record has *executed* on its stream. Tickets make that exact on host.
class host_event {
 public:
  std::uint64_t enqueued = 0;   // touched only by the rank's control thread
  std::uint64_t completed = 0;  // guarded by the world's lock
};

// One in-order queue of work for one rank. `inline_stream` runs each operation at once on the
// calling thread (the compute stream: host compute is synchronous); `worker_stream` runs them in
// order on its own thread (the communication stream), so a gather overlaps compute as it does
// on a GPU's side stream. The queue is a fixed ring: enqueueing never allocates.
// World is the job the ranks form: host_world (threads) or process_world (processes); it
// provides the lock (wait/update), abort, and the collectives.
template <class World>
class basic_host_stream {
 public:
  enum class mode { inline_stream, worker_stream };

  basic_host_stream(World& world, std::size_t rank, mode m, trace_recorder* trace = nullptr)
      : world_(world), rank_(rank), mode_(m), trace_(trace) {
    if (m == mode::worker_stream) worker_ = std::thread([this] { run_worker(); });
  }
  ~basic_host_stream() {
    if (worker_.joinable()) {
      world_.update([&] { stopping_ = true; });
      worker_.join();
    }
  }
  basic_host_stream(const basic_host_stream&) = delete;
  basic_host_stream& operator=(const basic_host_stream&) = delete;

  // A host-to-device copy (offload). `unit` labels the trace; the stream's copy link (if set)
  // simulates a PCIe transfer.
  void copy(std::byte* dst, const std::byte* src, std::size_t bytes, std::uint32_t unit = 0) {
    submit({op_kind::copy, dst, src, bytes, nullptr, 0, unit});
  }
  void set_copy_link(link_model l) noexcept { copy_link_ = l; }
  // All-gather of `bytes` per rank (see host_world::all_gather); `unit` labels the trace.
  void all_gather(const std::byte* send, std::byte* recv, std::size_t bytes, std::uint32_t unit) {
    submit({op_kind::all_gather, recv, send, bytes, nullptr, 0, unit});
  }
  // Chunked unshard's collective (see host_world::gather_range); `bytes` of the op is the shard.
  void gather_range(std::byte* dst, std::size_t begin, std::size_t end, std::size_t shard_bytes, std::uint32_t unit) {
    submit({op_kind::gather_range, dst, nullptr, shard_bytes, nullptr, 0, unit, begin, end});
  }
  // A copy within device memory (a rank's own part of a chunk): no link is simulated.
  void local_copy(std::byte* dst, const std::byte* src, std::size_t bytes, std::uint32_t unit = 0) {
    submit({op_kind::local_copy, dst, src, bytes, nullptr, 0, unit});
  }
  // Point-to-point (see host_world::transfer): a collective every rank enqueues in the same order
  // with the same (from, to, bytes); src is read on rank `from`, dst written on rank `to`, and a
  // rank that is neither only keeps the collective order. Traced on the two endpoints as a gather
  // span of `bytes` labelled `unit`.
  void transfer(std::size_t from, std::size_t to, const std::byte* src, std::byte* dst, std::size_t bytes,
                std::uint32_t unit = 0) {
    if (from >= world_.size() || to >= world_.size())  // here, on the caller's thread, not on the worker
      throw_error("transfer from rank ", from, " to rank ", to, ": ", from >= world_.size() ? "from" : "to",
                  " is not a rank of this world of size ", world_.size());
    submit({op_kind::transfer, dst, src, bytes, nullptr, 0, unit, from, to});
  }
  void record(host_event& e) {
    const std::uint64_t ticket = ++e.enqueued;
    submit({op_kind::record, nullptr, nullptr, 0, &e, ticket, 0});
  }
  void wait(host_event& e) { submit({op_kind::wait, nullptr, nullptr, 0, &e, e.enqueued, 0}); }

  // Blocks the caller until everything enqueued so far has run (or the job aborted).
  void synchronize() {
    if (mode_ == mode::inline_stream) return;
    const std::uint64_t target = submitted_;
    world_.wait([&] { return executed_ >= target || worker_failed_; });
    if (worker_failed_) world_.throw_aborted();
  }

 private:
  enum class op_kind : std::uint8_t { copy, local_copy, all_gather, gather_range, transfer, record, wait };
  struct op {
    op_kind kind;
    std::byte* dst;
    const std::byte* src;
    std::size_t bytes;
    host_event* event;
    std::uint64_t ticket;
    std::uint32_t unit;
    std::size_t begin = 0, end = 0;  // gather_range: the byte range; transfer: from and to
  };
  static constexpr std::size_t capacity = 256;

  void submit(const op& o) {
    if (mode_ == mode::inline_stream) {
      execute(o);
      return;
    }
    world_.wait([&] { return submitted_ - executed_ < capacity; });
    world_.update([&] {
      queue_[submitted_ % capacity] = o;
      ++submitted_;
    });
  }

  void execute(const op& o) {
    switch (o.kind) {
      case op_kind::copy: {
        const auto t0 = trace_clock::now();
        if (o.bytes) std::memcpy(o.dst, o.src, o.bytes);
        const double s = copy_link_.seconds_for(o.bytes);
        if (s > 0) std::this_thread::sleep_for(std::chrono::duration<double>(s));
        if (trace_) trace_->add(rank_, trace_kind::host_to_device, o.unit, t0, trace_clock::now(), o.bytes);
        break;
      }
      case op_kind::local_copy:
        if (o.bytes) std::memcpy(o.dst, o.src, o.bytes);
        break;
      case op_kind::gather_range: {
        const auto t0 = trace_clock::now();
        world_.gather_range(rank_, o.dst, o.begin, o.end, o.bytes);
        if (trace_) trace_->add(rank_, trace_kind::gather, o.unit, t0, trace_clock::now(), o.end - o.begin);
        break;
      }
      case op_kind::all_gather: {
        const auto t0 = trace_clock::now();
        world_.all_gather(rank_, o.src, o.dst, o.bytes);
        if (trace_) trace_->add(rank_, trace_kind::gather, o.unit, t0, trace_clock::now(), o.bytes * world_.size());
        break;
      }
      case op_kind::transfer: {
        const auto t0 = trace_clock::now();
        world_.transfer(rank_, o.begin, o.end, o.src, o.dst, o.bytes);
        if (trace_ && (rank_ == o.begin || rank_ == o.end))
          trace_->add(rank_, trace_kind::gather, o.unit, t0, trace_clock::now(), o.bytes);
        break;
      }
      case op_kind::record:
        world_.update([&] { o.event->completed = o.ticket; });
        break;
      case op_kind::wait:
        world_.wait([&] { return o.event->completed >= o.ticket; });
        break;
    }
  }

  void run_worker() {
    for (;;) {
      op o{};
      try {
        world_.wait([&] { return stopping_ || submitted_ > executed_; });
      } catch (const rank_failure&) {
        world_.update([&] { worker_failed_ = true; });
        return;
      }
      {
        bool stop = false;
        world_.update([&] {
          stop = submitted_ == executed_;
          if (!stop) o = queue_[executed_ % capacity];
        });
        if (stop) return;
      }
      try {
        execute(o);
      } catch (const rank_failure&) {
        world_.update([&] { worker_failed_ = true; });
        return;
      } catch (const std::exception& e) {
        world_.abort(rank_, std::string("communication stream: ") + e.what());
        world_.update([&] { worker_failed_ = true; });
        return;
      }
      world_.update([&] { ++executed_; });
    }
  }

  World& world_;
  std::size_t rank_;
  mode mode_;
  trace_recorder* trace_;
  link_model copy_link_{};
  std::thread worker_;
  std::array<op, capacity> queue_{};
  std::uint64_t submitted_ = 0, executed_ = 0;  // guarded by the world's lock
  bool stopping_ = false, worker_failed_ = false;
};

using host_stream = basic_host_stream<host_world>;

}  // namespace unshard
