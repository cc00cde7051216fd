#pragma once
// Plain C++ (no CUDA): how the NCCL unique id reaches every rank of a multi-process job. The
// CUDA world takes any `unique_id_exchange`, so it depends on no transport; the launcher side
// (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; Slurm's equivalents) and the
// transports live in backend/net. A job started by torchrun or srun joins with:
//
//   const unshard::net::launch_env env = unshard::net::read_launch_env();
//   unshard::net::rendezvous rv(env);                       // TCP star on MASTER_ADDR:MASTER_PORT
//   unshard::cuda_world world(env, unshard::cuda::exchange_over(rv));   // GPU = LOCAL_RANK
//
// or, where nodes share a file system but not an open port,
//   unshard::cuda_world world(env, unshard::cuda::exchange_through_file(path, env.rank, job_tag));
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "unshard/backend/net/file_exchange.hpp"
#include "unshard/backend/net/launch_env.hpp"
#include "unshard/backend/net/rendezvous.hpp"
#include "unshard/core/error.hpp"

namespace unshard::cuda {

// Broadcasts the root's blob: on rank 0 `blob` holds the NCCL unique id when called; on every
// other rank the call overwrites `blob` with rank 0's bytes. Every rank of the job calls it once.
using unique_id_exchange = std::function<void(std::span<std::byte>)>;

namespace exchange_detail {
inline void take_broadcast(std::span<std::byte> blob, const std::vector<std::byte>& got, const char* how) {
  if (got.size() != blob.size())
    throw_error("NCCL unique id through ", how, ": received ", got.size(), " bytes, expected ", blob.size());
  std::copy(got.begin(), got.end(), blob.begin());
}
}  // namespace exchange_detail

// Over the TCP rendezvous (which must outlive the call only).
inline unique_id_exchange exchange_over(net::rendezvous& rv) {
  return [&rv](std::span<std::byte> blob) {
    std::vector<std::byte> v(blob.begin(), blob.end());
    rv.broadcast(v);
    exchange_detail::take_broadcast(blob, v, "the TCP rendezvous");
  };
}

// Through a file at `path` that every rank can read; `tag` tells this job's file from an earlier
// job's at the same path (the Slurm job id, say).
inline unique_id_exchange exchange_through_file(std::string path, std::size_t rank, std::string tag,
                                                std::chrono::duration<double> timeout = std::chrono::seconds(300)) {
  return [path = std::move(path), rank, tag = std::move(tag), timeout](std::span<std::byte> blob) {
    std::vector<std::byte> v(blob.begin(), blob.end());
    net::broadcast_through_file(path, rank, v, tag, timeout);
    exchange_detail::take_broadcast(blob, v, "a shared file");
  };
}

}  // namespace unshard::cuda
