#pragma once
#include <cstddef>
#include <memory>

#include "unshard/backend/backend.hpp"
#include "unshard/backend/host/host_stream.hpp"
#include "unshard/backend/process/process_world.hpp"

namespace unshard {

// Ranks are processes (one per rank, started by a launcher: torchrun, srun, unshard-launch),
// joined over TCP; memory and streams are the host backend's: a fixed "device" arena per rank,
// compute inline, communication on a worker thread. What differs is only the world the stream
// talks to, so the host stream is reused as is, over process_world. This is the launcher path
// of the NCCL backend with the GPU taken out: same variables, same rendezvous, same failure
// model, testable without a GPU.
struct process_backend {
  using world = process_world;
  using stream = basic_host_stream<process_world>;
  using event = host_event;
  static constexpr const char* name = "process";
  // The "device" arena is host memory (see tracking_allocator): host models read their state in place.
  using memory = memory_spaces<host_memory>;

  static std::unique_ptr<stream> compute_stream(world& w, std::size_t rank, trace_recorder* t) {
    return std::make_unique<stream>(w, rank, stream::mode::inline_stream, t);
  }
  static std::unique_ptr<stream> comm_stream(world& w, std::size_t rank, trace_recorder* t) {
    return std::make_unique<stream>(w, rank, stream::mode::worker_stream, t);
  }
};
static_assert(backend<process_backend>);
static_assert(has_local_copy<process_backend> && has_copy_link<process_backend>);
static_assert(knows_own_rank<process_backend> && has_failure_reason<process_backend>);

}  // namespace unshard
