#pragma once
#include <concepts>
#include <cstddef>
#include <cstdint>

namespace unshard {

// What the scheduler needs from a backend, and nothing more:
//   B::world   the ranks of a job: collectives, abort (host threads, or an NCCL communicator)
//   B::stream  an in-order queue: copy, all_gather, transfer (point-to-point, called by every rank
//              in the same order, as a collective), record, wait, synchronize
//   B::event   a marker recorded on one stream and waited on by another
//   B::compute_stream(world, rank, trace) / B::comm_stream(...)   the two queues of a rank
// Compute and communication are ordered only by events: the scheduler never synchronises the
// host per layer (on CUDA, a forward can then be captured in a graph).
template <class B>
concept backend = requires { typename B::world; typename B::stream; typename B::event; } &&
                  requires(typename B::stream& s, typename B::event& e, std::byte* dst, const std::byte* src,
                           std::size_t n, std::uint32_t unit) {
                    s.copy(dst, src, n);
                    s.all_gather(src, dst, n, unit);
                    s.transfer(n, n, src, dst, n, unit);
                    s.record(e);
                    s.wait(e);
                    s.synchronize();
                  };

}  // namespace unshard
