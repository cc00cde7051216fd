#pragma once
// The spans of an asynchronous stream, timed by callbacks the device runs later: on CUDA a host
// callback enqueued before an operation stamps its begin, one enqueued after it writes the trace
// entry (cudaLaunchHostFunc; capturable in a graph). Between the enqueue and the end callback the
// span's slot belongs to those callbacks, so it must not be handed out again: a stream that runs
// far ahead of the device (thousands of chunks enqueued, none done) would otherwise overwrite spans
// that pending callbacks still read, and the trace would silently show one span twice and lose
// another. Here a slot is reused only once its end callback has run; when the oldest slot is
// still pending, the new span is not traced and the recorder counts it as dropped.
//
// Slots are reserved at construction: tracing allocates nothing per operation.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "unshard/core/trace.hpp"

namespace unshard {

class trace_spans {
 public:
  static constexpr std::size_t default_capacity = 1024;

  // One traced operation, from open() until its end callback.
  class span {
   public:
    // What the end callback records; set before enqueueing it.
    void set(trace_kind kind, std::uint32_t unit, std::size_t bytes) noexcept {
      kind_ = kind;
      unit_ = unit;
      bytes_ = bytes;
    }
    // The two callbacks, in the shape of a host callback (void(void*)) taking the span.
    static void stamp_begin(void* p) noexcept { static_cast<span*>(p)->begin_ = trace_clock::now(); }
    static void write_end(void* p) noexcept {
      auto* s = static_cast<span*>(p);
      s->recorder_->add(s->rank_, s->kind_, s->unit_, s->begin_, trace_clock::now(), s->bytes_);
      s->pending_.store(false, std::memory_order_release);  // only now may open() hand the slot out again
    }

   private:
    friend class trace_spans;
    trace_recorder* recorder_ = nullptr;
    std::size_t rank_ = 0;
    trace_clock::time_point begin_{};
    trace_kind kind_{};
    std::uint32_t unit_ = 0;
    std::size_t bytes_ = 0;
    std::atomic<bool> pending_{false};
  };

  // `recorder` null: tracing off, open() always returns null and nothing is counted.
  trace_spans(trace_recorder* recorder, std::size_t rank, std::size_t capacity = default_capacity)
      : recorder_(recorder), capacity_(recorder ? capacity : 0),
        slots_(capacity_ ? std::make_unique<span[]>(capacity_) : nullptr) {
    for (std::size_t i = 0; i < capacity_; ++i) {
      slots_[i].recorder_ = recorder;
      slots_[i].rank_ = rank;
    }
  }
  trace_spans(const trace_spans&) = delete;
  trace_spans& operator=(const trace_spans&) = delete;

  bool enabled() const noexcept { return recorder_ != nullptr; }
  std::size_t capacity() const noexcept { return capacity_; }

  // A slot for an operation about to be enqueued (called on the stream's control thread only).
  // Slots are taken round-robin, so the next one is the oldest; if its end callback has not run
  // yet, returns null and counts the span as dropped rather than write over it.
  span* open() noexcept {
    if (!recorder_ || capacity_ == 0) return nullptr;
    span& s = slots_[cursor_ % capacity_];
    if (s.pending_.load(std::memory_order_acquire)) {
      recorder_->lose();
      return nullptr;
    }
    s.pending_.store(true, std::memory_order_relaxed);
    ++cursor_;
    return &s;
  }
  // Gives back a span whose begin callback could not be enqueued (so no callback will touch it).
  static void cancel(span* s) noexcept {
    if (s) s->pending_.store(false, std::memory_order_release);
  }

  // Spans whose end callback has not run yet (for tests and diagnostics).
  std::size_t pending() const noexcept {
    std::size_t n = 0;
    for (std::size_t i = 0; i < capacity_; ++i) n += slots_[i].pending_.load(std::memory_order_acquire) ? 1 : 0;
    return n;
  }

 private:
  trace_recorder* recorder_;
  std::size_t capacity_;
  std::unique_ptr<span[]> slots_;
  std::size_t cursor_ = 0;
};

}  // namespace unshard
