#pragma once
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "unshard/backend/link_model.hpp"
#include "unshard/core/device_arena.hpp"
#include "unshard/core/memory_space.hpp"
#include "unshard/core/trace.hpp"
#include "unshard/core/trace_spans.hpp"

namespace unshard {

// What the scheduler (runtime/) always calls on a backend B, checked here so that a backend missing
// one fails at `backend<B>` with the requirement named, not deep inside the scheduler:
//   B::world    the ranks of a job (host threads, processes over TCP, an NCCL communicator):
//               size(), abort(rank, why) (first failure wins), aborted(), failed_rank()
//   B::stream   an in-order queue: copy (host to device), all_gather, gather_range (chunked),
//               transfer (point-to-point, called by every rank in the same order, as a collective),
//               record, wait, synchronize
//   B::event    a marker recorded on one stream and waited on by another; default-constructible
//               (the runtime allocates them in vectors before the first forward)
//   B::compute_stream(world, rank, trace) / B::comm_stream(...)   the two queues of a rank
//   B::memory   memory_spaces<...>: where the memory the backend gives a rank can be read from
//   B::name     for messages
// Compute and communication are ordered only by events: the scheduler never synchronises the
// host per layer (on CUDA, a forward can then be captured in a graph).
template <class W>
concept backend_world = requires(W& w, const W& cw, std::size_t rank, const std::string& why) {
  { cw.size() } -> std::convertible_to<std::size_t>;
  w.abort(rank, why);
  { cw.aborted() } -> std::convertible_to<bool>;
  { cw.failed_rank() } -> std::convertible_to<int>;
};

template <class S, class E>
concept backend_stream = requires(S& s, E& e, std::byte* dst, const std::byte* src, std::size_t n, std::uint32_t unit) {
  s.copy(dst, src, n, unit);
  s.all_gather(src, dst, n, unit);
  s.gather_range(dst, n, n, n, unit);
  s.transfer(n, n, src, dst, n, unit);
  s.record(e);
  s.wait(e);
  s.synchronize();
};

template <class T>
inline constexpr bool is_memory_spaces = false;
template <class... S>
inline constexpr bool is_memory_spaces<memory_spaces<S...>> = true;

template <class B>
concept backend =
    requires {
      typename B::world;
      typename B::stream;
      typename B::event;
      typename B::memory;
      { B::name } -> std::convertible_to<const char*>;
    } && backend_world<typename B::world> && backend_stream<typename B::stream, typename B::event> &&
    std::default_initializable<typename B::event> && is_memory_spaces<typename B::memory> &&
    requires(typename B::world& w, std::size_t rank, trace_recorder* trace) {
      { B::compute_stream(w, rank, trace) } -> std::same_as<std::unique_ptr<typename B::stream>>;
      { B::comm_stream(w, rank, trace) } -> std::same_as<std::unique_ptr<typename B::stream>>;
    };

// --- optional capabilities -----------------------------------------------------------------------
// Detected, not required: a backend that lacks one does not have to fake it, and the scheduler
// uses each by the name below (never an ad-hoc `requires` probe), so what a backend may offer is
// listed in one place.

// The rank's device memory is the backend's own (cudaMalloc): the arena is built over it. Without
// it the arena reserves host memory, which is what the host backend's "device" is.
template <class B>
concept has_device_backing = backend<B> && requires(typename B::world& w, std::size_t rank, std::size_t bytes) {
  { B::device_backing(w, rank, bytes) } -> std::same_as<arena_backing>;
};
// The rank's offload memory is the backend's own (pinned host memory, for asynchronous copies).
template <class B>
concept has_host_backing = backend<B> && requires(typename B::world& w, std::size_t rank, std::size_t bytes) {
  { B::host_backing(w, rank, bytes) } -> std::same_as<arena_backing>;
};
// The host cannot write the rank's device memory in place (CUDA): shards are loaded into host
// staging memory and copied over with this, at load time only.
template <class B>
concept has_copy_to_device =
    backend<B> && requires(typename B::world& w, std::size_t rank, std::byte* dst, const std::byte* src, std::size_t n) {
      B::copy_to_device(w, rank, dst, src, n);
    };
// A copy within device memory (a rank's own part of a chunk into the gather slot) that is not a
// host-to-device transfer: not traced as one, not slowed by a simulated link. Without it the
// runtime uses copy().
template <class B>
concept has_local_copy =
    backend<B> && requires(typename B::stream& s, std::byte* dst, const std::byte* src, std::size_t n, std::uint32_t unit) {
      s.local_copy(dst, src, n, unit);
    };
// A thread other than the rank's own may call the backend for the rank once bound to it (CUDA:
// the rank's device made current); the runtime binds the lanes' helper threads (lane_turns).
template <class B>
concept binds_thread = backend<B> && requires(typename B::world& w, std::size_t rank) { B::bind_thread(w, rank); };
// The stream can simulate a host-to-device link (PCIe) for offload copies (host backends).
template <class B>
concept has_copy_link = backend<B> && requires(typename B::stream& s, link_model link) { s.set_copy_link(link); };
// The compute stream times spans on the device (CUDA: a unit's kernels run long after the host
// enqueued them, so host clocks around the forward would trace enqueue times, not compute):
// begin_span() before the work, end_span(span, kind, unit, bytes) after it; a null span (tracing
// off, or every slot pending: counted as dropped) is ignored. Without it the runtime traces compute
// with host clocks, which is right where compute is synchronous (the host backends).
template <class B>
concept has_device_spans =
    backend<B> && requires(typename B::stream& s, trace_spans::span* span, std::uint32_t unit, std::size_t bytes) {
      { s.begin_span() } -> std::same_as<trace_spans::span*>;
      s.end_span(span, trace_kind::compute, unit, bytes);
    };
// The world knows which rank this process is (one rank per process: process_world, or a cuda_world
// from the launch environment), so a process_session need not be told.
template <class B>
concept knows_own_rank = backend<B> && requires(const typename B::world& w) {
  { w.rank() } -> std::convertible_to<std::size_t>;
};
// The world keeps the first failure's message (a peer process's, received over the wire), which
// then names the failure better than the local consequence does.
template <class B>
concept has_failure_reason = backend<B> && requires(const typename B::world& w) {
  { w.failure_reason() } -> std::convertible_to<std::string>;
};
// One process runs every rank (threads): session builds the world from a size and a link.
template <class B>
concept has_local_world = backend<B> && std::constructible_from<typename B::world, std::size_t, link_model>;

// --- the model state and the backend ----------------------------------------------------------------

// The state launches its work on the rank's compute stream, which the runtime hands it once
// (a CUDA model's kernels; a host model computes inline and takes none).
template <class State, class B>
concept attaches_stream = backend<B> && requires(State& st, typename B::stream& s) { st.attach_stream(s); };

// Whether B allocates a model state where the state's forward can read it: the state's declared
// memory_space (core/memory_space.hpp; host memory when it declares none). The runtime
// static_asserts this, so a host model on the CUDA backend (host code reading cudaMalloc memory)
// or a CUDA model on a host backend fails to compile instead of crashing at the first layer.
template <class B, class State>
concept reaches_state = backend<B> && B::memory::template contains<state_memory_space_t<State>>;

}  // namespace unshard
