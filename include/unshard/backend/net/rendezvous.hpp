#pragma once
// Bootstrap of a multi-process job over TCP, as torch.distributed's env:// store does it: rank 0
// listens on MASTER_ADDR:MASTER_PORT, every other rank connects (retrying until the timeout,
// since rank 0 may start later) and says who it is; then small collectives over that star:
// broadcast from rank 0 (the ncclUniqueId), all_gather (the process backend's peer addresses),
// barrier. Not a data path: blobs are small and go through rank 0.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "unshard/backend/net/launch_env.hpp"
#include "unshard/backend/net/socket.hpp"

namespace unshard::net {

struct rendezvous_options {
  std::chrono::duration<double> timeout = std::chrono::seconds(300);  // joining, and each collective
};

class rendezvous {
 public:
  // Rank 0 listens on env.master_addr:env.master_port (every interface, as torchrun's store);
  // `listener`, when given to rank 0, is used instead (tests bind port 0 first and pass it on).
  // UNSHARD_TIMEOUT (env.timeout_s) replaces opt.timeout: the user's word wins over a default.
  explicit rendezvous(const launch_env& env, rendezvous_options opt = {}, std::optional<socket> listener = {})
      : env_(env), opt_(opt) {
    if (env.timeout_s) opt_.timeout = std::chrono::seconds(env.timeout_s);
    if (env.rank == 0) {
      socket l = listener ? std::move(*listener) : listen_for_ranks(env);
      accept_all(l);
    } else {
      join();
    }
  }

  std::size_t rank() const noexcept { return env_.rank; }
  std::size_t size() const noexcept { return env_.world_size; }
  const launch_env& env() const noexcept { return env_; }
  std::chrono::duration<double> timeout() const noexcept { return opt_.timeout; }

  // Rank 0's blob replaces every other rank's.
  void broadcast(std::vector<std::byte>& blob) {
    const deadline until = after(opt_.timeout);
    if (rank() == 0)
      for (auto& p : peers_) send_message(p, blob, until);
    else
      blob = recv_message(peers_.front(), until);
  }

  // Every rank's bytes, in rank order, on every rank.
  std::vector<std::vector<std::byte>> all_gather(std::span<const std::byte> mine) {
    const deadline until = after(opt_.timeout);
    std::vector<std::vector<std::byte>> all(size());
    all[rank()].assign(mine.begin(), mine.end());
    if (rank() != 0) {
      send_message(peers_.front(), mine, until);
      const std::vector<std::byte> table = recv_message(peers_.front(), until);
      decode_table(table, all);
      return all;
    }
    for (std::size_t r = 1; r < size(); ++r) all[r] = recv_message(peers_[r - 1], until);
    const std::vector<std::byte> table = encode_table(all);
    for (auto& p : peers_) send_message(p, table, until);
    return all;
  }

  void barrier() { all_gather({}); }

  // A host name or address of this process that its peers can reach: rank 0's is MASTER_ADDR;
  // another rank's is the local address of its connection to rank 0 (the interface that routes
  // to the job's network, not a guess from the host name).
  std::string reachable_host() const {
    if (rank() == 0) return env_.master_addr;
    return peers_.front().local_endpoint().host;
  }

 private:
  static constexpr std::uint32_t magic = 0x554e5352;  // "UNSR"
  static constexpr std::uint32_t version = 1;
  struct hello {
    std::uint32_t magic, version;
    std::uint64_t rank, world_size;
  };

  static socket listen_for_ranks(const launch_env& env) {
    try {
      return listen_on("", env.listen_port());
    } catch (const error& e) {
      throw_error("rendezvous: rank 0 ", e.what(),
                  " (another job on this port? under torchrun with TORCHELASTIC_USE_AGENT_STORE=True the port after"
                  " MASTER_PORT is used; UNSHARD_RENDEZVOUS_PORT picks another)");
    }
  }

  void accept_all(socket& listener) {
    peers_.resize(size() - 1);
    const deadline until = after(opt_.timeout);
    for (std::size_t joined = 1; joined < size(); ++joined) {
      socket s = accept_one(listener, until,
                            unshard::detail::concat(size() - joined, " more rank(s) to join on port ", env_.listen_port(),
                                           " (", joined, " of ", size(), " joined in ", opt_.timeout.count(),
                                                    " s; UNSHARD_TIMEOUT sets the limit)"));
      hello h{};
      s.recv_all(std::as_writable_bytes(std::span(&h, 1)), until);
      if (h.magic != magic || h.version != version)
        throw_error("rendezvous: a connection on port ", env_.listen_port(),
                    " is not an unshard rank of this version (another job on the same MASTER_PORT?)");
      if (h.world_size != size())
        throw_error("rendezvous: rank ", h.rank, " has WORLD_SIZE=", h.world_size, ", rank 0 has WORLD_SIZE=", size());
      if (h.rank == 0 || h.rank >= size()) throw_error("rendezvous: a process joined with RANK=", h.rank, " (world size ", size(), ")");
      socket& slot = peers_[h.rank - 1];
      if (slot.valid()) throw_error("rendezvous: two processes joined with RANK=", h.rank);
      s.set_peer("rank " + std::to_string(h.rank), static_cast<int>(h.rank));
      slot = std::move(s);
    }
    // Everyone is here: release them together, so no rank starts a collective with a missing peer.
    const hello ok{magic, version, 0, size()};
    for (auto& p : peers_) p.send_all(std::as_bytes(std::span(&ok, 1)), until);
  }

  void join() {
    const deadline until = after(opt_.timeout);
    const std::string port_name = env_.rendezvous_port ? " port " : " MASTER_PORT=";
    socket s = connect_to(env_.master_addr, env_.listen_port(), until,
                          "rank 0 (MASTER_ADDR=" + env_.master_addr + port_name + std::to_string(env_.listen_port()) + ")");
    s.set_peer(s.label(), 0);
    const hello me{magic, version, rank(), size()};
    s.send_all(std::as_bytes(std::span(&me, 1)), until);
    hello ok{};
    s.recv_all(std::as_writable_bytes(std::span(&ok, 1)), until);
    if (ok.magic != magic || ok.world_size != size()) throw_error("rendezvous: unexpected reply from ", s.label());
    peers_.push_back(std::move(s));
  }

  static void send_message(socket& s, std::span<const std::byte> data, deadline until) {
    const std::uint64_t n = data.size();
    s.send_all(std::as_bytes(std::span(&n, 1)), until);
    s.send_all(data, until);
  }
  static std::vector<std::byte> recv_message(socket& s, deadline until) {
    std::uint64_t n = 0;
    s.recv_all(std::as_writable_bytes(std::span(&n, 1)), until);
    if (n > (std::uint64_t{1} << 30)) throw_error("rendezvous: ", s.label(), " announced a message of ", n, " bytes");
    std::vector<std::byte> data(n);
    s.recv_all(data, until);
    return data;
  }

  static std::vector<std::byte> encode_table(const std::vector<std::vector<std::byte>>& all) {
    std::vector<std::byte> out;
    for (const auto& a : all) {
      const std::uint64_t n = a.size();
      const auto* p = reinterpret_cast<const std::byte*>(&n);
      out.insert(out.end(), p, p + sizeof n);
      out.insert(out.end(), a.begin(), a.end());
    }
    return out;
  }
  static void decode_table(const std::vector<std::byte>& table, std::vector<std::vector<std::byte>>& all) {
    std::size_t pos = 0;
    for (auto& a : all) {
      std::uint64_t n = 0;
      if (pos + sizeof n > table.size()) throw_error("rendezvous: truncated all_gather table from rank 0");
      std::memcpy(&n, table.data() + pos, sizeof n);
      pos += sizeof n;
      if (n > table.size() - pos) throw_error("rendezvous: truncated all_gather table from rank 0");
      a.assign(table.begin() + static_cast<std::ptrdiff_t>(pos), table.begin() + static_cast<std::ptrdiff_t>(pos + n));
      pos += n;
    }
  }

  launch_env env_;
  rendezvous_options opt_;
  std::vector<socket> peers_;  // rank 0: ranks 1..N-1 in order; others: rank 0
};

}  // namespace unshard::net
