#pragma once
// Plain C++ (no CUDA): how the NCCL unique id reaches every rank of a multi-process job. The
// CUDA world takes any `unique_id_exchange`, so it depends on no transport; the launcher side
// (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; Slurm's equivalents) and the
// transports live in backend/net. A job started by torchrun or srun joins with:
//
//   const unshard::net::launch_env env = unshard::net::read_launch_env();
//   unshard::net::rendezvous rv(env);                       // TCP star on MASTER_ADDR:MASTER_PORT
//   unshard::cuda_world world(env, unshard::cuda::exchange_over(rv));   // GPU: device_for below
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

// Which of the `visible` CUDA devices a launched process (rank) runs on. Two launcher set-ups are
// common, and both are served by one rule:
//  * every process sees all of the node's GPUs (torchrun's default): device LOCAL_RANK;
//  * the launcher gives each process its own GPU (CUDA_VISIBLE_DEVICES set per rank, Slurm's
//    --gpus-per-task=1): the process sees one device, device 0, whatever its LOCAL_RANK.
// Anything else is an error naming both numbers, never a silent choice: LOCAL_RANK beyond the
// visible devices (taking it modulo the count would put two ranks on one GPU, which NCCL refuses
// at set-up with "Duplicate GPU detected"), or more processes on the node (LOCAL_WORLD_SIZE) than
// visible GPUs when each process sees several.
inline int device_for_local_rank(std::size_t local_rank, std::size_t local_world_size, int visible) {
  if (visible <= 0)
    throw_error("rank with LOCAL_RANK=", local_rank, ": this process sees no CUDA device (check the driver, ",
                "and CUDA_VISIBLE_DEVICES)");
  if (visible == 1) return 0;  // one GPU per process (or a one-GPU node): it is device 0
  const auto n = static_cast<std::size_t>(visible);
  if (local_world_size > n)
    throw_error("LOCAL_WORLD_SIZE=", local_world_size, " processes on this node, but each sees ", visible,
                " CUDA devices: two ranks would share a GPU. Start at most ", visible,
                " processes per node, or give each process one GPU (CUDA_VISIBLE_DEVICES per rank)");
  if (local_rank >= n)
    throw_error("LOCAL_RANK=", local_rank, " but this process sees only ", visible,
                " CUDA devices (0..", visible - 1, "): let every process see all of the node's GPUs, ",
                "or give each process one GPU (CUDA_VISIBLE_DEVICES per rank)");
  return static_cast<int>(local_rank);
}
inline int device_for(const net::launch_env& env, int visible) {
  return device_for_local_rank(env.local_rank, env.local_world_size, visible);
}

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
