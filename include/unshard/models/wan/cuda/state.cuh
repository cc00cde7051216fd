#pragma once
// The activation state of the CUDA Wan model: the host model's wan::state (same buffers, same
// names, same categories: the ledger plans both alike), with every pointer in device memory, plus
// the lane's ops context (ops/cuda_ops.cuh: the stream, the cuBLASLt handle, the widening scratch).
// The state holds buffers only; everything else a kernel needs is the context's.
//
// Buffers come from detail::buffer_table (models/wan/state.hpp), so the two models cannot
// disagree on a size; the host's "scores" row is dropped (device attention keeps its scores on
// chip) and two workspace entries are added: cuBLASLt's workspace, and the f32 scratch that a bf16
// weight chunk and a bias slice are widened (or realigned) into.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/models/wan/params.hpp"
#include "unshard/models/wan/state.hpp"
#include "unshard/ops/cuda_model.cuh"
#include "unshard/ops/cuda_ops.cuh"

namespace unshard::wan {

struct cuda_options {
  // cuBLASLt workspace, a declared workspace buffer (NVIDIA recommends 32 MiB on Hopper).
  std::size_t gemm_workspace_bytes = std::size_t{32} << 20;
  // fp8 weights (the policy's fp8 / fp8:tensor term): the widening scratch then holds the largest
  // weight dequantized to f32 (ops/cuda_ops.cuh: weight-only fp8). Set it with the policy.
  bool fp8_weights = false;
};

// The host model's buffers, in device memory, plus the lane's ops context (ops/cuda_model.cuh).
using cuda_state = unshard::cuda_state<wan::state>;

namespace detail {

// Floats of the widening scratch (cuda_ops' `widen`): the largest linear weight when the storage
// is not f32 (a row chunk of a weight is smaller still), then room for the largest 1-D parameter,
// which cuda_ops keeps 16-byte aligned at the scratch's tail (a bf16 bias widened, or an f32 bias
// slice that starts at an odd row realigned). Each part is a multiple of 64 floats.
inline std::size_t cuda_widen_floats(const wan::geometry& g, bool fp8_weights = false) {
  std::size_t weight = 0, bias = 0;
  for (const param_table& t :
       {patch_embedding_layout(g).table, time_layout(g).table, text_layout(g).table,
        self_attn_layout(g).table, cross_attn_layout(g).table, ffn_layout(g).table,
        head_layout(g).table})
    for (std::size_t i = 0; i < t.count; ++i) {
      const auto n = static_cast<std::size_t>(t.slots[i].dims.numel());
      if (t.slots[i].dims.rank() == 1) bias = std::max(bias, n);
      // linear weights, and the Conv3d weight (rank 5) read as a [D, C*pt*ph*pw] matrix; the
      // modulation tables (rank 3) are read as they are stored
      if (t.slots[i].dims.rank() == 2 || t.slots[i].dims.rank() == 5) weight = std::max(weight, n);
    }
  const auto up = [](std::size_t f) { return (f + 63) / 64 * 64; };
  return (g.storage == dtype::f32 && !fp8_weights ? 0 : up(weight)) + up(bias);
}

struct cuda_extra {
  const char* name;
  std::size_t bytes;
};

inline std::vector<cuda_extra> cuda_extra_buffers(const wan::geometry& g, const wan::cuda_options& o) {
  return {{"gemm_workspace", o.gemm_workspace_bytes}, {"weight_f32", cuda_widen_floats(g, o.fp8_weights) * sizeof(float)}};
}

inline bool cuda_uses_buffer(std::string_view name) { return name != "scores"; }

inline std::vector<buffer_spec> cuda_buffer_specs(const wan::geometry& g, const wan::cuda_options& o) {
  std::vector<buffer_spec> specs;
  for (const auto& b : buffer_table(g))
    if (cuda_uses_buffer(b.name)) specs.push_back({b.name, b.floats * sizeof(float), b.category});
  for (const auto& e : cuda_extra_buffers(g, o))
    if (e.bytes) specs.push_back({e.name, e.bytes, memory_category::workspace});
  return specs;
}

// The state's buffer views, and its ops context built over the declared workspace buffers (the
// stream comes later, from attach_stream).
inline wan::cuda_state make_cuda_state(const wan::geometry& g, const wan::cuda_options& o, const buffer_set& buffers) {
  wan::cuda_state s;
  for (const auto& b : buffer_table(g)) {
    if (!cuda_uses_buffer(b.name)) continue;
    const std::span<std::byte> bytes = buffers.bytes(b.name);
    if (bytes.size() < b.floats * sizeof(float))
      throw_error("wan::cuda_model: buffer '", b.name, "' has ", bytes.size(), " bytes, needs ", b.floats * sizeof(float));
    if (reinterpret_cast<std::uintptr_t>(bytes.data()) % 16 != 0)
      throw_error("wan::cuda_model: buffer '", b.name, "' is not 16-byte aligned");
    s.*b.member = reinterpret_cast<float*>(bytes.data());
  }
  std::byte* workspace = nullptr;
  float* widen = nullptr;
  std::size_t workspace_bytes = 0, widen_floats = 0;
  for (const auto& e : cuda_extra_buffers(g, o)) {
    if (!e.bytes) continue;
    const std::span<std::byte> bytes = buffers.bytes(e.name);
    if (bytes.size() < e.bytes)
      throw_error("wan::cuda_model: buffer '", e.name, "' has ", bytes.size(), " bytes, needs ", e.bytes);
    if (reinterpret_cast<std::uintptr_t>(bytes.data()) % 16 != 0)
      throw_error("wan::cuda_model: buffer '", e.name, "' is not 16-byte aligned");
    if (std::string_view(e.name) == "gemm_workspace") {
      workspace = bytes.data();
      workspace_bytes = e.bytes;
    } else {
      widen = reinterpret_cast<float*>(bytes.data());
      widen_floats = e.bytes / sizeof(float);
    }
  }
  s.ops = cuda_ops(nullptr, widen, widen_floats, workspace, workspace_bytes);
  return s;
}

}  // namespace detail
}  // namespace unshard::wan
