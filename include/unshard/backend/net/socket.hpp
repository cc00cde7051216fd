#pragma once
// A small RAII layer over POSIX TCP sockets: what the rendezvous and the process backend need,
// nothing more. Every blocking call takes a deadline and loops over EINTR and partial transfers;
// a peer that closes or resets becomes an error naming the peer (its `label`, e.g. "rank 3").
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <thread>
#include <utility>

#include "unshard/core/error.hpp"

namespace unshard::net {

using net_clock = std::chrono::steady_clock;
using deadline = net_clock::time_point;

inline deadline after(std::chrono::duration<double> d) {
  return net_clock::now() + std::chrono::duration_cast<net_clock::duration>(d);
}

// Milliseconds left before `d`, clamped to poll()'s int and to at least 0.
inline int millis_until(deadline d) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(d - net_clock::now()).count();
  if (left <= 0) return 0;
  return left > 60'000 ? 60'000 : static_cast<int>(left);
}

// The peer at the other end went away (EOF, reset, broken pipe): names it, so a survivor can
// report which rank died.
class peer_closed : public error {
 public:
  peer_closed(int peer_rank, const std::string& what) : error(what), peer_(peer_rank) {}
  int peer_rank() const noexcept { return peer_; }

 private:
  int peer_;
};

// An address a peer can connect to: numeric host and port.
struct endpoint {
  std::string host;
  std::uint16_t port = 0;
  std::string to_string() const { return host.find(':') != std::string::npos ? "[" + host + "]:" + std::to_string(port) : host + ":" + std::to_string(port); }
};

class socket {
 public:
  socket() = default;
  explicit socket(int fd, std::string label = "peer", int peer_rank = -1) noexcept
      : fd_(fd), label_(std::move(label)), peer_rank_(peer_rank) {}
  ~socket() { close(); }
  socket(socket&& o) noexcept
      : fd_(std::exchange(o.fd_, -1)), label_(std::move(o.label_)), peer_rank_(o.peer_rank_) {}
  socket& operator=(socket&& o) noexcept {
    if (this != &o) {
      close();
      fd_ = std::exchange(o.fd_, -1);
      label_ = std::move(o.label_);
      peer_rank_ = o.peer_rank_;
    }
    return *this;
  }
  socket(const socket&) = delete;
  socket& operator=(const socket&) = delete;

  int fd() const noexcept { return fd_; }
  bool valid() const noexcept { return fd_ >= 0; }
  const std::string& label() const noexcept { return label_; }
  int peer_rank() const noexcept { return peer_rank_; }
  void set_peer(std::string label, int rank) {
    label_ = std::move(label);
    peer_rank_ = rank;
  }
  void close() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  // Half-close: the peer reads EOF after everything sent so far.
  void shutdown_write() noexcept {
    if (fd_ >= 0) ::shutdown(fd_, SHUT_WR);
  }

  void set_nonblocking() {
    const int flags = ::fcntl(fd_, F_GETFL, 0);
    if (flags < 0 || ::fcntl(fd_, F_SETFL, flags | O_NONBLOCK) < 0) fail("cannot make the socket non-blocking");
  }
  void set_nodelay() noexcept {
    const int one = 1;
    ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }

  // The address this socket is bound to (the port chosen by the kernel for port 0).
  endpoint local_endpoint() const {
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    if (::getsockname(fd_, reinterpret_cast<sockaddr*>(&ss), &len) != 0) fail("getsockname failed");
    return to_endpoint(ss);
  }

  // Sends all of `data` before `until`; the socket must be non-blocking.
  void send_all(std::span<const std::byte> data, deadline until) {
    std::size_t done = 0;
    while (done < data.size()) {
      const ssize_t n = ::send(fd_, data.data() + done, data.size() - done, MSG_NOSIGNAL);
      if (n > 0) {
        done += static_cast<std::size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        wait_ready(POLLOUT, until, "sending");
        continue;
      }
      if (n < 0 && (errno == EPIPE || errno == ECONNRESET))
        throw peer_closed(peer_rank_, label_ + " closed its connection (" + std::strerror(errno) + ")");
      fail("send failed");
    }
  }
  // Receives exactly data.size() bytes before `until`; EOF first is peer_closed.
  void recv_all(std::span<std::byte> data, deadline until) {
    std::size_t done = 0;
    while (done < data.size()) {
      const ssize_t n = ::recv(fd_, data.data() + done, data.size() - done, 0);
      if (n > 0) {
        done += static_cast<std::size_t>(n);
        continue;
      }
      if (n == 0)
        throw peer_closed(peer_rank_, unshard::detail::concat(label_, " closed its connection after ", done, " of ",
                                                     data.size(), " bytes"));
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        wait_ready(POLLIN, until, "receiving");
        continue;
      }
      if (errno == ECONNRESET) throw peer_closed(peer_rank_, label_ + " reset its connection");
      fail("recv failed");
    }
  }

  // Blocks (poll, EINTR-safe) until the socket is ready for `events` or `until` passes.
  void wait_ready(short events, deadline until, const char* doing) const {
    for (;;) {
      pollfd p{fd_, events, 0};
      const int r = ::poll(&p, 1, millis_until(until));
      if (r > 0) return;  // readiness or an error condition: the next call reports which
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) fail("poll failed");
      if (net_clock::now() >= until) throw_error("timed out ", doing, " (", label_, ")");
    }
  }

  [[noreturn]] void fail(const char* what) const {
    throw_error(what, " (", label_, "): ", std::strerror(errno));
  }

  static endpoint to_endpoint(const sockaddr_storage& ss) {
    char host[INET6_ADDRSTRLEN] = {};
    std::uint16_t port = 0;
    if (ss.ss_family == AF_INET) {
      const auto* a = reinterpret_cast<const sockaddr_in*>(&ss);
      ::inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
      port = ntohs(a->sin_port);
    } else if (ss.ss_family == AF_INET6) {
      const auto* a = reinterpret_cast<const sockaddr_in6*>(&ss);
      ::inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
      port = ntohs(a->sin6_port);
    }
    return {host, port};
  }

 private:
  int fd_ = -1;
  std::string label_ = "peer";
  int peer_rank_ = -1;
};

namespace detail {
struct addrinfo_list {
  addrinfo* head = nullptr;
  ~addrinfo_list() {
    if (head) ::freeaddrinfo(head);
  }
};
// Resolves host (a name or numeric address; empty: the wildcard) for TCP.
inline addrinfo_list resolve(const std::string& host, std::uint16_t port, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo_list out;
  const std::string service = std::to_string(port);
  const int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &out.head);
  if (rc != 0) throw_error("cannot resolve host '", host, "': ", ::gai_strerror(rc));
  return out;
}
// Completes a non-blocking connect: true once connected; false (errno set) if it failed or the
// deadline passed.
inline bool finish_connect(int fd, deadline until) {
  if (errno != EINPROGRESS && errno != EINTR) return false;
  for (;;) {
    pollfd p{fd, POLLOUT, 0};
    const int r = ::poll(&p, 1, millis_until(until));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      errno = r == 0 ? ETIMEDOUT : errno;
      return false;
    }
    int err = 0;
    socklen_t len = sizeof err;
    ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    errno = err;
    return err == 0;
  }
}
}  // namespace detail

// A listening socket on host:port (empty host: every interface; port 0: the kernel picks one,
// read it back with local_endpoint()).
inline socket listen_on(const std::string& host, std::uint16_t port, int backlog = 128) {
  const auto list = detail::resolve(host, port, true);
  std::string last = "no address";
  for (addrinfo* a = list.head; a; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    socket s(fd, "listener on " + (host.empty() ? std::string("*") : host) + ":" + std::to_string(port));
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, backlog) == 0) {
      s.set_nonblocking();
      return s;
    }
    last = std::strerror(errno);
  }
  throw_error("cannot listen on ", host.empty() ? "*" : host, ":", port, ": ", last);
}

// Accepts one connection before `until`; the accepted socket is non-blocking with TCP_NODELAY.
inline socket accept_one(socket& listener, deadline until, const std::string& waiting_for) {
  for (;;) {
    const int fd = ::accept4(listener.fd(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      socket s(fd);
      s.set_nodelay();
      return s;
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) listener.fail("accept failed");
    pollfd p{listener.fd(), POLLIN, 0};
    const int r = ::poll(&p, 1, millis_until(until));
    if (r < 0 && errno != EINTR) listener.fail("poll failed");
    if (r == 0 && net_clock::now() >= until) throw_error("timed out waiting for ", waiting_for);
  }
}

// Connects to host:port, retrying while nobody listens yet (the listener may start later),
// until `until`. The socket is non-blocking with TCP_NODELAY.
inline socket connect_to(const std::string& host, std::uint16_t port, deadline until, const std::string& label) {
  std::string last = "no address";
  auto pause = std::chrono::milliseconds(10);
  for (;;) {
    const auto list = detail::resolve(host, port, false);
    for (addrinfo* a = list.head; a; a = a->ai_next) {
      const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
      if (fd < 0) continue;
      socket s(fd, label);
      s.set_nonblocking();  // a connect to an unreachable host then honours the deadline
      if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0 || detail::finish_connect(fd, until)) {
        s.set_nodelay();
        return s;
      }
      last = std::strerror(errno);
    }
    if (net_clock::now() + pause >= until)
      throw_error("cannot connect to ", label, " at ", endpoint{host, port}.to_string(), " before the timeout: ", last);
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(200));
  }
}

}  // namespace unshard::net
