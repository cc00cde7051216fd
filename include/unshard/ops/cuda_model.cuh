#pragma once
// A host model's layers on a CUDA device, without a second forward: cuda_state<Buffers> is the host
// model's state (its buffers, now device pointers) plus the lane's cuda_ops context, and
// cuda_layer<HostLayer, State> is the host layer whose forward runs over that context. A model's
// CUDA twin (models/liveavatar/cuda/, models/wan/cuda/) then only declares its extra buffers and
// builds the ops context in make_state.
#include <cuda_runtime.h>

#include <concepts>
#include <cstddef>
#include <string>
#include <vector>

#include "unshard/core/memory_space.hpp"
#include "unshard/layer/layer.hpp"
#include "unshard/layer/param_source.hpp"
#include "unshard/ops/cuda_ops.cuh"

namespace unshard {

// What a model's conversion and bf16 scratches are sized by, over the weights its GEMMs read.
struct weight_extents {
  std::size_t weight = 0;  // elements of the largest weight
  std::size_t bias = 0;    // elements of the largest 1-D parameter
  std::size_t inner = 0;   // the largest K of a weight [N, K...]
};

// Floats of the scratch a model declares for cuda_ops' `widen`: the largest weight (`weight`
// elements) as the GEMM needs it -- widened to f32 for the f32 precision when the storage is not
// f32, rounded to bf16 (two per float) for the bf16 precision when it is f32, dequantized (f32 or
// bf16) under fp8 weights, nothing when the storage is what the GEMM reads -- then the largest 1-D
// parameter (`bias`), which cuda_ops keeps 16-byte aligned at the tail. Each part a multiple of 64
// floats, so the tail starts 256-byte aligned.
inline std::size_t conversion_scratch_floats(std::size_t weight, std::size_t bias, cuda_precision precision,
                                             bool f32_storage, bool fp8_weights) {
  const bool bf16 = precision == cuda_precision::bf16;
  const std::size_t w = fp8_weights ? (bf16 ? (weight + 1) / 2 : weight)
                        : bf16      ? (f32_storage ? (weight + 1) / 2 : 0)
                                    : (f32_storage ? 0 : weight);
  const auto up = [](std::size_t f) { return (f + 63) / 64 * 64; };
  return up(w) + up(bias);
}

// The host state's buffers, in device memory, plus the lane's ops context.
template <class Buffers>
struct cuda_state : Buffers {
  using memory_space = cuda_device_memory;  // every buffer is device memory: only cuda_backend reaches it
  cuda_ops ops;

  // Called once by the rank runtime, on the rank's thread (its device current), with the rank's
  // compute stream: the backend's stream type or a raw cudaStream_t.
  template <class S>
  void attach_stream(S& s) {
    if constexpr (std::convertible_to<S&, cudaStream_t>) {
      ops.set_stream(s);
    } else {
      static_assert(requires { { s.native() } -> std::convertible_to<cudaStream_t>; },
                    "attach_stream: the stream type exposes no cudaStream_t (native())");
      ops.set_stream(s.native());
    }
  }
};

// The host layer, its forward run over the state's ops context.
template <class HostLayer, class State>
class cuda_layer {
 public:
  explicit cuda_layer(const HostLayer& host) : host_(host) {}

  const HostLayer& host() const noexcept { return host_; }
  std::string name() const { return host_.name(); }
  std::size_t subunit_count() const noexcept { return host_.subunit_count(); }
  std::string subunit_name(std::size_t sub) const { return host_.subunit_name(sub); }
  std::vector<param_spec> parameters(std::size_t sub) const { return host_.parameters(sub); }

  // Enqueues sub-unit `sub` on the state's stream; params are device views of parameters(sub).
  void forward(std::size_t sub, const param_views& params, State& s) const {
    whole_params whole(params);
    forward(sub, whole, s);
  }
  template <param_source P>
  void forward(std::size_t sub, P& params, State& s) const {
    host_.forward(s.ops, sub, params, s);
  }

 private:
  HostLayer host_;
};

}  // namespace unshard
