// The NCCL calls of backend/cuda for a world of one rank, on the host, for the SIMT-emulated tests
// (tests/simt.cmake): a communicator of one rank, whose all-gather, broadcast and send/receive to
// itself are copies queued on the stream (simt_streams.hpp) like any other work. That is enough for
// a cuda_backend session at world size 1 (the rank's compute, communication and copy streams, their
// events, the device arena, the scheduler) to run without a GPU; a communicator of more ranks is
// refused with ncclInvalidUsage and a message that says so. The multi-rank paths stay GPU-only.
#include <nccl.h>

#include <cstddef>
#include <cstring>
#include <vector>

#include "simt_streams.hpp"

namespace {

struct comm_state {
  int rank = 0;
};

thread_local const char* last_error = "";
thread_local int group_depth = 0;

struct pending_p2p {
  bool send;
  const void* src;
  void* dst;
  std::size_t bytes;
  cudaStream_t stream;
};
thread_local std::vector<pending_p2p> group_p2p;

std::size_t size_of(ncclDataType_t t) {
  switch (t) {
    case ncclInt8:
    case ncclUint8:
    case ncclFloat8e4m3:
    case ncclFloat8e5m2: return 1;
    case ncclFloat16:
    case ncclBfloat16: return 2;
    case ncclInt32:
    case ncclUint32:
    case ncclFloat32: return 4;
    default: return 8;
  }
}

ncclResult_t refuse(const char* why) {
  last_error = why;
  return ncclInvalidUsage;
}

void copy_on(cudaStream_t stream, void* dst, const void* src, std::size_t bytes) {
  if (dst == src || bytes == 0) return;
  unshard::simt_testing::enqueue(stream, [dst, src, bytes] { std::memmove(dst, src, bytes); });
}

// Pairs the group's sends with its receives (a rank's own, in order) and queues the copies.
ncclResult_t flush_p2p() {
  std::vector<pending_p2p> sends, recvs;
  for (const pending_p2p& p : group_p2p) (p.send ? sends : recvs).push_back(p);
  group_p2p.clear();
  if (sends.size() != recvs.size())
    return refuse("SIMT NCCL: a group's sends to this rank and receives from it do not pair up (a hang in NCCL)");
  for (std::size_t i = 0; i < sends.size(); ++i) {
    if (sends[i].bytes != recvs[i].bytes) return refuse("SIMT NCCL: a send and its receive differ in size");
    copy_on(recvs[i].stream, recvs[i].dst, sends[i].src, sends[i].bytes);
  }
  return ncclSuccess;
}

}  // namespace

extern "C" {

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  std::memset(id, 0, sizeof(*id));
  return ncclSuccess;
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId, int rank, ncclConfig_t*) {
  *comm = nullptr;
  if (nranks != 1 || rank != 0)
    return refuse("SIMT NCCL: the SIMT emulator runs a world of one rank only (the multi-rank paths need GPUs)");
  *comm = reinterpret_cast<ncclComm_t>(new comm_state);
  return ncclSuccess;
}

ncclResult_t ncclCommFinalize(ncclComm_t) { return ncclSuccess; }
ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  delete reinterpret_cast<comm_state*>(comm);
  return ncclSuccess;
}
ncclResult_t ncclCommAbort(ncclComm_t comm) { return ncclCommDestroy(comm); }
ncclResult_t ncclCommRevoke(ncclComm_t, int) { return ncclSuccess; }

ncclResult_t ncclCommGetAsyncError(ncclComm_t, ncclResult_t* state) {
  *state = ncclSuccess;
  return ncclSuccess;
}

const char* ncclGetErrorString(ncclResult_t r) {
  switch (r) {
    case ncclSuccess: return "no error";
    case ncclInvalidUsage: return "invalid usage (SIMT NCCL: see the last error)";
    case ncclInvalidArgument: return "invalid argument";
    default: return "an error the SIMT NCCL does not produce";
  }
}

const char* ncclGetLastError(ncclComm_t) { return last_error; }

ncclResult_t ncclGroupStart() {
  ++group_depth;
  return ncclSuccess;
}

ncclResult_t ncclGroupEnd() {
  if (group_depth == 0) return refuse("SIMT NCCL: ncclGroupEnd without ncclGroupStart");
  return --group_depth == 0 ? flush_p2p() : ncclSuccess;
}

ncclResult_t ncclAllGather(const void* send, void* recv, std::size_t count, ncclDataType_t type, ncclComm_t comm,
                           cudaStream_t stream) {
  if (comm == nullptr) return refuse("SIMT NCCL: all-gather on a null communicator");
  copy_on(stream, recv, send, count * size_of(type));  // rank 0's part is the whole output
  return ncclSuccess;
}

ncclResult_t ncclBroadcast(const void* send, void* recv, std::size_t count, ncclDataType_t type, int root,
                           ncclComm_t comm, cudaStream_t stream) {
  if (comm == nullptr || root != 0) return refuse("SIMT NCCL: broadcast from a rank that is not 0 in a world of one");
  copy_on(stream, recv, send, count * size_of(type));
  return ncclSuccess;
}

ncclResult_t ncclSend(const void* send, std::size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  if (comm == nullptr || peer != 0) return refuse("SIMT NCCL: a send to a rank that is not 0 in a world of one");
  group_p2p.push_back({true, send, nullptr, count * size_of(type), stream});
  return group_depth == 0 ? flush_p2p() : ncclSuccess;
}

ncclResult_t ncclRecv(void* recv, std::size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  if (comm == nullptr || peer != 0) return refuse("SIMT NCCL: a receive from a rank that is not 0 in a world of one");
  group_p2p.push_back({false, nullptr, recv, count * size_of(type), stream});
  return group_depth == 0 ? flush_p2p() : ncclSuccess;
}

}  // extern "C"
