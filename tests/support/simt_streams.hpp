#pragma once
// The streams of the host CUDA runtime the SIMT-emulated tests link (simt_cuda_runtime.cpp), for
// the other host stand-ins (simt_cublaslt.cpp) to queue their work on.
#include <cuda_runtime_api.h>

#include <functional>

namespace unshard::simt_testing {

// Queues `work` on `stream`: it runs when the program's own synchronisation reaches it (a stream or
// event synchronisation, a wait of another stream that needs it, a synchronous copy, cudaFree), in
// stream order, never earlier. The null stream runs it at once.
void enqueue(cudaStream_t stream, std::function<void()> work);

}  // namespace unshard::simt_testing
