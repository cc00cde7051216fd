#pragma once
// The shared-file alternative to the TCP rendezvous for a broadcast from rank 0 (the
// ncclUniqueId), for clusters where compute nodes share a filesystem but not an open port:
// rank 0 writes the blob to a temporary name beside `path` and renames it into place, so a
// reader sees either nothing or the whole file (rename is atomic on POSIX filesystems, NFS
// included). The file carries a job tag, so a stale file from an earlier job with the same
// path is ignored instead of read.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "unshard/core/error.hpp"

namespace unshard::net {

namespace detail {
inline constexpr char file_exchange_magic[] = "UNSHARD-EXCHANGE 1\n";

inline std::string encode_exchange(const std::string& tag, const std::vector<std::byte>& blob) {
  std::string out = std::string(file_exchange_magic) + tag + "\n";
  const std::uint64_t n = blob.size();
  out.append(reinterpret_cast<const char*>(&n), sizeof n);
  out.append(reinterpret_cast<const char*>(blob.data()), blob.size());
  return out;
}

// The blob, if `text` is a complete exchange file with this tag; nothing otherwise.
inline bool decode_exchange(const std::string& text, const std::string& tag, std::vector<std::byte>& blob) {
  const std::string head = std::string(file_exchange_magic) + tag + "\n";
  if (text.compare(0, head.size(), head) != 0 || text.size() < head.size() + 8) return false;
  std::uint64_t n = 0;
  std::memcpy(&n, text.data() + head.size(), 8);
  if (text.size() != head.size() + 8 + n) return false;
  const auto* p = reinterpret_cast<const std::byte*>(text.data() + head.size() + 8);
  blob.assign(p, p + n);
  return true;
}
}  // namespace detail

// Rank 0: writes `blob` under `tag`. Others: wait (polling) until `path` holds a file with the
// same tag, then replace `blob` with its contents. `tag` must differ between jobs sharing a path
// (e.g. the Slurm job id, or MASTER_ADDR:MASTER_PORT and a start time the launcher exports).
inline void broadcast_through_file(const std::string& path, std::size_t rank, std::vector<std::byte>& blob,
                                   const std::string& tag,
                                   std::chrono::duration<double> timeout = std::chrono::seconds(300)) {
  if (tag.find('\n') != std::string::npos) throw_error("file exchange: the job tag must be one line");
  if (rank == 0) {
    const std::string tmp = path + ".tmp." + std::to_string(::getpid());
    const std::string bytes = detail::encode_exchange(tag, blob);
    {
      std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
      if (!f) throw_error("file exchange: cannot create '", tmp, "'");
      f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
      f.flush();
      if (!f) throw_error("file exchange: cannot write '", tmp, "'");
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
      std::remove(tmp.c_str());
      throw_error("file exchange: cannot rename '", tmp, "' to '", path, "'");
    }
    return;
  }
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(timeout);
  auto pause = std::chrono::milliseconds(5);
  bool stale = false;
  for (;;) {
    std::ifstream f(path, std::ios::binary);
    if (f) {
      const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
      if (detail::decode_exchange(text, tag, blob)) return;
      stale = true;
    }
    if (std::chrono::steady_clock::now() >= until)
      throw_error("file exchange: timed out waiting for rank 0 to write '", path, "'",
                  stale ? " (the file there has another job's tag or is incomplete)" : "");
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(100));
  }
}

}  // namespace unshard::net
