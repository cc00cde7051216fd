#pragma once
// The wire of the process backend: the full mesh of TCP connections between the ranks, and the
// frames every message on it starts with.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "unshard/backend/net/rendezvous.hpp"
#include "unshard/backend/net/socket.hpp"
#include "unshard/core/error.hpp"

namespace unshard::process_detail {

enum class op_kind : std::uint32_t {
  all_gather = 1,
  gather_range = 2,
  broadcast = 3,
  barrier = 4,
  transfer = 5,  // point-to-point: only `from` sends, only `to` receives
  abort = 15
};
inline constexpr std::uint32_t frame_magic = 0x554e5346;  // "UNSF"
inline constexpr std::uint64_t trailer_magic = 0x554e53484152444full;
inline constexpr std::size_t max_reason = 2048;

// Every message starts with a frame, so ranks that disagree about the collective (a bug in the
// caller) get an error naming both sides instead of silently mixing bytes.
struct frame {
  std::uint32_t magic;
  std::uint32_t kind;
  std::uint64_t seq;    // collective number; abort: the failed rank
  std::uint64_t bytes;  // payload bytes; abort: reason length
};
// The last bytes a failing rank writes before it closes, after the reason: found at the tail of
// the stream wherever the reader stood, so the reason survives a frame cut in the middle.
struct trailer {
  std::uint32_t failed_rank;
  std::uint32_t reason_bytes;
  std::uint64_t magic;
};

inline const char* name_of(std::uint32_t kind) {
  switch (static_cast<op_kind>(kind)) {
    case op_kind::all_gather: return "all_gather";
    case op_kind::gather_range: return "gather_range";
    case op_kind::broadcast: return "broadcast";
    case op_kind::barrier: return "barrier";
    case op_kind::transfer: return "transfer";
    case op_kind::abort: return "abort";
  }
  return "an unknown collective";
}

struct mesh_hello {
  std::uint32_t magic;
  std::uint32_t rank;
  std::uint64_t world_size;
};

// Every rank listens on a port of its own (chosen by the kernel), publishes host:port through
// the rendezvous, connects to every lower rank and accepts every higher one. Entry r of the
// result is the connection to rank r (this rank's own stays invalid).
inline std::vector<net::socket> connect_mesh(net::rendezvous& rv) {
  const std::size_t me = rv.rank(), size = rv.size();
  std::vector<net::socket> peers(size);
  net::socket listener = net::listen_on("", 0, static_cast<int>(size));
  const std::string address = rv.reachable_host() + " " + std::to_string(listener.local_endpoint().port);
  const auto table = rv.all_gather(std::as_bytes(std::span(address.data(), address.size())));
  const auto until = net::after(rv.timeout());
  for (std::size_t p = 0; p < me; ++p) {
    const std::string entry(reinterpret_cast<const char*>(table[p].data()), table[p].size());
    const auto space = entry.rfind(' ');
    if (space == std::string::npos) throw_error("process_world: rank ", p, " published a malformed address '", entry, "'");
    const std::string label = "rank " + std::to_string(p);
    peers[p] = net::connect_to(entry.substr(0, space), static_cast<std::uint16_t>(std::stoul(entry.substr(space + 1))),
                               until, label);
    peers[p].set_peer(label, static_cast<int>(p));
    const mesh_hello h{frame_magic, static_cast<std::uint32_t>(me), size};
    peers[p].send_all(std::as_bytes(std::span(&h, 1)), until);
  }
  for (std::size_t joined = me + 1; joined < size; ++joined) {
    net::socket s = net::accept_one(listener, until, unshard::detail::concat("rank(s) above ", me, " to connect"));
    mesh_hello h{};
    s.recv_all(std::as_writable_bytes(std::span(&h, 1)), until);
    if (h.magic != frame_magic || h.world_size != size || h.rank <= me || h.rank >= size || peers[h.rank].valid())
      throw_error("process_world: rank ", me, " got an unexpected connection (claims rank ", h.rank, ")");
    s.set_peer("rank " + std::to_string(h.rank), static_cast<int>(h.rank));
    peers[h.rank] = std::move(s);
  }
  rv.barrier();  // every connection of the mesh exists before any rank starts a collective
  return peers;
}

}  // namespace unshard::process_detail
