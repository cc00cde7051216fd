#pragma once
// Plain C++ (no CUDA): the per-rank device memory the plan leaves to what it does not count.
//
// The ledger counts every byte the runtime allocates (shards, resident, gathered, activations,
// workspace, kv_cache: one cudaMalloc region per rank, memory.cuh). A rank's GPU holds more than
// that, outside the runtime's control and allocated lazily:
//  * the CUDA context: a few hundred MiB, more as kernel modules load on first launch
//    (CUDA_MODULE_LOADING=LAZY, the default);
//  * NCCL: the communicator, then the buffers of each connection it sets up at the first collective
//    that needs it (NCCL_RUNTIME_CONNECT, the default since 2.22): ring and tree channels for the
//    all-gather and broadcast groups, peer-to-peer channels for send/recv;
//  * cuBLASLt's handle and kernels (its workspace is the ledger's `workspace` term).
// So the budget the plan may fill on a card of M bytes is M - planned_reserve_bytes: what
// `unshard-plan --reserve` defaults to (1.85 GiB, the 24 GB - 22.15 GB "usable" of the
// Live Avatar report on RTX 4090s). tests/gpu/test_cuda_backend.cu measures the real amount on the
// machine it runs on (cudaMemGetInfo after the context, then after NCCL's and cuBLASLt's first use)
// and fails when it exceeds this, so the number is checked on every GPU the tests run on rather
// than assumed.
#include <cstddef>

namespace unshard::cuda {

inline constexpr std::size_t planned_reserve_bytes = static_cast<std::size_t>(1.85 * (1 << 30) + 0.5);  // 1.85 GiB, as --reserve 1.85GiB parses

}  // namespace unshard::cuda
