#pragma once
#include <cstddef>
#include <memory>

#include "unshard/backend/backend.hpp"
#include "unshard/backend/host/host_stream.hpp"
#include "unshard/backend/host/host_world.hpp"

namespace unshard {

// Ranks are threads of one process; "device" memory is a fixed arena per rank (see
// tracking_allocator); compute runs inline on the rank's thread, communication on a worker
// thread per rank, so prefetch overlaps compute for real.
struct host_backend {
  using world = host_world;
  using stream = host_stream;
  using event = host_event;
  static constexpr const char* name = "host";
  // The "device" arena is host memory (see tracking_allocator): host models read their state in place.
  using memory = memory_spaces<host_memory>;

  static std::unique_ptr<stream> compute_stream(world& w, std::size_t rank, trace_recorder* t) {
    return std::make_unique<stream>(w, rank, stream::mode::inline_stream, t);
  }
  static std::unique_ptr<stream> comm_stream(world& w, std::size_t rank, trace_recorder* t) {
    return std::make_unique<stream>(w, rank, stream::mode::worker_stream, t);
  }
};
static_assert(backend<host_backend>);
static_assert(has_local_copy<host_backend> && has_copy_link<host_backend>);
static_assert(has_local_world<host_backend>);

}  // namespace unshard
