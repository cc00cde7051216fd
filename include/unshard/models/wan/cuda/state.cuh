#pragma once
// The activation state of the CUDA Wan forward: the host model's wan_state (same buffers, same
// names, same categories: the ledger plans both alike), with every pointer in device memory, plus
// what only the device needs -- the cuBLASLt workspace, a scratch for bf16 weights widened to
// f32, the compute stream and the cuBLASLt handle.
//
// Buffers come from detail::wan_buffer_table (models/wan/state.hpp), so the two models cannot
// disagree on a size; the host's "scores" row is dropped (flash attention keeps scores in
// registers) and two workspace entries are added.
#include <cuda_runtime.h>

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "unshard/kernels/cuda/gemm.cuh"
#include "unshard/layer/model.hpp"
#include "unshard/models/wan/params.hpp"
#include "unshard/models/wan/state.hpp"

namespace unshard {

struct wan_cuda_options {
  // GELU-tanh of the FFN and text embedding in the cuBLASLt epilogue (CUBLASLT_EPILOGUE_GELU_BIAS);
  // false: a separate bias + GELU kernel running kernels/thread/activation.hpp's gelu_tanh.
  bool gelu_in_epilogue = true;
  // cuBLASLt workspace, a declared workspace buffer (NVIDIA recommends 32 MiB on Hopper).
  std::size_t gemm_workspace_bytes = std::size_t{32} << 20;
};

struct wan_cuda_state : wan_state {
  // bf16 storage only: one linear's weight rows widened to f32, then its bias at bias_offset
  // floats. Activations stay f32 and cuBLASLt multiplies x and W of one type, so bf16 weights
  // are widened (exactly) rather than x rounded to bf16: the result is then an f32 GEMM on the
  // bf16-rounded weights, which is what CONVENTIONS.md asks a bf16 run to match.
  float* weight_f32 = nullptr;
  std::size_t weight_f32_bias_offset = 0;
  std::byte* gemm_workspace = nullptr;
  std::size_t gemm_workspace_bytes = 0;
  // Every kernel and matmul of the forward goes here; the runtime sets it to the rank's compute
  // stream (attach_stream). Until then: the legacy default stream.
  cudaStream_t stream = nullptr;
  std::shared_ptr<cuda::blaslt> blas;

  // Called once by the rank runtime, on the rank's thread (its device current), with the rank's
  // compute stream. Accepts the backend's stream type or a raw cudaStream_t.
  template <class S>
  void attach_stream(S& s) {
    stream = native_stream(s);
    blas.reset();  // re-created on this thread's device at first use
  }

  // The cuBLASLt handle, created on first use on the calling thread's current device.
  cuda::blaslt& gemm() {
    if (!blas) {
      blas = std::make_shared<cuda::blaslt>();
      blas->set_workspace(gemm_workspace, gemm_workspace_bytes);
    }
    return *blas;
  }

 private:
  template <class S>
  static cudaStream_t native_stream(S& s) {
    if constexpr (std::convertible_to<S&, cudaStream_t>) {
      return s;
    } else if constexpr (requires { { s.native() } -> std::convertible_to<cudaStream_t>; }) {
      return s.native();
    } else if constexpr (requires { { s.handle() } -> std::convertible_to<cudaStream_t>; }) {
      return s.handle();
    } else {
      static_assert(requires { { s.get() } -> std::convertible_to<cudaStream_t>; },
                    "attach_stream: the stream type exposes no cudaStream_t (native(), handle() or get())");
      return s.get();
    }
  }
};

namespace detail {

// Floats of the widened-weight scratch: the largest linear weight plus the largest bias, over
// every sub-unit (a row chunk of a weight is smaller still).
struct wan_widen_sizes {
  std::size_t weight = 0, bias = 0;
};

inline wan_widen_sizes wan_cuda_widen_sizes(const wan_geometry& g) {
  wan_widen_sizes w;
  const auto visit = [&](const wan_param_table& t) {
    for (std::size_t i = 0; i < t.count; ++i) {
      const auto n = static_cast<std::size_t>(t.slots[i].dims.numel());
      if (t.slots[i].dims.rank() == 2) w.weight = std::max(w.weight, n);  // linear weights (the conv is rank 5)
      if (t.slots[i].dims.rank() == 1) w.bias = std::max(w.bias, n);
    }
  };
  const wan_param_table conv = wan_patch_embedding_layout(g).table;
  for (std::size_t i = 0; i < conv.count; ++i)  // the Conv3d weight is a [D, C*pt*ph*pw] matrix
    if (conv.slots[i].dims.rank() > 1) w.weight = std::max(w.weight, static_cast<std::size_t>(conv.slots[i].dims.numel()));
  visit(conv);
  visit(wan_time_layout(g).table);
  visit(wan_text_layout(g).table);
  visit(wan_self_attn_layout(g).table);
  visit(wan_cross_attn_layout(g).table);
  visit(wan_ffn_layout(g).table);
  visit(wan_head_layout(g).table);
  w.weight = align_up(w.weight, allocation_alignment / sizeof(float));  // the bias starts 256-byte aligned
  return w;
}

struct wan_cuda_extra {
  const char* name;
  std::size_t bytes;
};

inline std::vector<wan_cuda_extra> wan_cuda_extra_buffers(const wan_geometry& g, const wan_cuda_options& o) {
  std::vector<wan_cuda_extra> extra{{"gemm_workspace", o.gemm_workspace_bytes}};
  if (g.storage != dtype::f32) {
    const wan_widen_sizes w = wan_cuda_widen_sizes(g);
    extra.push_back({"weight_f32", (w.weight + w.bias) * sizeof(float)});
  }
  return extra;
}

inline bool wan_cuda_uses_buffer(std::string_view name) { return name != "scores"; }

inline std::vector<buffer_spec> wan_cuda_buffer_specs(const wan_geometry& g, const wan_cuda_options& o) {
  std::vector<buffer_spec> specs;
  for (const auto& b : wan_buffer_table(g))
    if (wan_cuda_uses_buffer(b.name)) specs.push_back({b.name, b.floats * sizeof(float), b.category});
  for (const auto& e : wan_cuda_extra_buffers(g, o))
    if (e.bytes) specs.push_back({e.name, e.bytes, memory_category::workspace});
  return specs;
}

inline wan_cuda_state make_wan_cuda_state(const wan_geometry& g, const wan_cuda_options& o, const buffer_set& buffers) {
  wan_cuda_state s;
  for (const auto& b : wan_buffer_table(g)) {
    if (!wan_cuda_uses_buffer(b.name)) continue;
    const std::span<std::byte> bytes = buffers.bytes(b.name);
    if (bytes.size() < b.floats * sizeof(float))
      throw_error("wan_cuda_model: buffer '", b.name, "' has ", bytes.size(), " bytes, needs ", b.floats * sizeof(float));
    if (reinterpret_cast<std::uintptr_t>(bytes.data()) % 16 != 0)
      throw_error("wan_cuda_model: buffer '", b.name, "' is not 16-byte aligned");
    s.*b.member = reinterpret_cast<float*>(bytes.data());
  }
  for (const auto& e : wan_cuda_extra_buffers(g, o)) {
    if (!e.bytes) continue;
    const std::span<std::byte> bytes = buffers.bytes(e.name);
    if (bytes.size() < e.bytes)
      throw_error("wan_cuda_model: buffer '", e.name, "' has ", bytes.size(), " bytes, needs ", e.bytes);
    if (std::string_view(e.name) == "gemm_workspace") {
      s.gemm_workspace = bytes.data();
      s.gemm_workspace_bytes = e.bytes;
    } else {
      s.weight_f32 = reinterpret_cast<float*>(bytes.data());
      s.weight_f32_bias_offset = wan_cuda_widen_sizes(g).weight;
    }
  }
  return s;
}

}  // namespace detail
}  // namespace unshard
