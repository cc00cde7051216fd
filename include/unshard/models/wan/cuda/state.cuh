#pragma once
// The activation state of the CUDA Wan model: the host model's wan::state (same buffers, same
// names, same categories: the ledger plans both alike), with every pointer in device memory, plus
// the lane's ops context (ops/cuda_ops.cuh: the stream, the cuBLASLt handle, the widening scratch).
// The state holds buffers only; everything else a kernel needs is the context's.
//
// Buffers come from detail::buffer_table (models/wan/state.hpp), so the two models cannot
// disagree on a size; the host's "scores" row is dropped (device attention keeps its scores on
// chip) and workspace entries are added: cuBLASLt's workspace; the scratch that a weight chunk and
// a bias slice are converted (or realigned) into; and for the bf16 precision the bf16 scratch of
// the rounded GEMM inputs and attention operands, and the attention engine's workspace.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
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
  // f32: the path checked against the references; bf16: every GEMM input and q, k, v rounded to
  // bf16, tensor-core GEMMs with f32 accumulation, fused attention (ops/cuda_ops.cuh), with a
  // declared bf16 scratch. Activations stay f32 in memory either way.
  cuda_precision precision = cuda_precision::f32;
  // bf16: the attention engine each lane gets (ops/cudnn_attention.cuh's make_cudnn_attention for
  // cuDNN's SDPA); empty: our segmented flash kernel, in bf16.
  std::function<std::shared_ptr<bf16_attention_engine>()> attention_engine;
  // The engine's workspace, a declared workspace buffer (with an engine only).
  std::size_t attention_workspace_bytes = std::size_t{16} << 20;
  // fp8 weights (the policy's fp8 / fp8:tensor term): the widening scratch then holds the largest
  // weight dequantized (f32, or bf16 for the bf16 precision: ops/cuda_ops.cuh, weight-only fp8).
  // Set it with the policy.
  bool fp8_weights = false;
};

// The host model's buffers, in device memory, plus the lane's ops context (ops/cuda_model.cuh).
using cuda_state = unshard::cuda_state<wan::state>;

namespace detail {

// The largest linear weight and 1-D parameter, and the largest K (ops/cuda_model.cuh).
inline weight_extents weight_extents_of(const wan::geometry& g) {
  weight_extents e;
  for (const param_table& t :
       {patch_embedding_layout(g).table, time_layout(g).table, text_layout(g).table,
        self_attn_layout(g).table, cross_attn_layout(g).table, ffn_layout(g).table,
        head_layout(g).table})
    for (std::size_t i = 0; i < t.count; ++i) {
      const shape& d = t.slots[i].dims;
      const auto n = static_cast<std::size_t>(d.numel());
      if (d.rank() == 1) e.bias = std::max(e.bias, n);
      // linear weights, and the Conv3d weight (rank 5) read as a [D, C*pt*ph*pw] matrix; the
      // modulation tables (rank 3) are read as they are stored
      if (d.rank() == 2 || d.rank() == 5) {
        e.weight = std::max(e.weight, n);
        e.inner = std::max(e.inner, n / static_cast<std::size_t>(d[0]));
      }
    }
  return e;
}

// Floats of the widening scratch (cuda_ops' `widen`, ops/cuda_model.cuh): the largest linear weight
// converted for the GEMM (a row chunk of a weight is smaller still), then the largest 1-D parameter
// (a bf16 bias widened, or an f32 bias slice that starts at an odd row realigned).
inline std::size_t cuda_widen_floats(const wan::geometry& g, cuda_precision precision = cuda_precision::f32,
                                     bool fp8_weights = false) {
  const weight_extents e = weight_extents_of(g);
  return conversion_scratch_floats(e.weight, e.bias, precision, g.storage == dtype::f32, fp8_weights);
}

// bf16 scratch elements of the bf16 precision: the largest GEMM input (the token rows or the
// text rows, times the largest K) or an attention's q, k, v and output (tokens against
// max(tokens, text_len) keys of width dim).
inline std::size_t cuda_bf16_elems(const wan::geometry& g) {
  const std::size_t rows = std::max(g.tokens, g.text_len);
  return cuda_ops::bf16_scratch_elems(rows * weight_extents_of(g).inner, g.tokens, g.max_keys(), g.dim);
}

struct cuda_extra {
  const char* name;
  std::size_t bytes;
};

inline std::vector<cuda_extra> cuda_extra_buffers(const wan::geometry& g, const wan::cuda_options& o) {
  const bool bf16_compute = o.precision == cuda_precision::bf16;
  return {{"gemm_workspace", o.gemm_workspace_bytes},
          {"weight_f32", cuda_widen_floats(g, o.precision, o.fp8_weights) * sizeof(float)},
          {"bf16_scratch", bf16_compute ? cuda_bf16_elems(g) * sizeof(bf16) : 0},
          {"attention_workspace", bf16_compute && o.attention_engine ? o.attention_workspace_bytes : 0}};
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
  std::span<std::byte> workspace, widen, narrow, attention;
  for (const auto& e : cuda_extra_buffers(g, o)) {
    if (!e.bytes) continue;
    const std::span<std::byte> bytes = buffers.bytes(e.name);
    if (bytes.size() < e.bytes)
      throw_error("wan::cuda_model: buffer '", e.name, "' has ", bytes.size(), " bytes, needs ", e.bytes);
    if (reinterpret_cast<std::uintptr_t>(bytes.data()) % 16 != 0)
      throw_error("wan::cuda_model: buffer '", e.name, "' is not 16-byte aligned");
    const std::string_view name = e.name;
    (name == "gemm_workspace" ? workspace : name == "weight_f32" ? widen : name == "bf16_scratch" ? narrow : attention) =
        bytes.first(e.bytes);
  }
  s.ops = cuda_ops(nullptr, reinterpret_cast<float*>(widen.data()), widen.size() / sizeof(float), workspace.data(),
                   workspace.size());
  if (o.precision == cuda_precision::bf16) {
    s.ops.set_precision(cuda_precision::bf16, reinterpret_cast<bf16*>(narrow.data()), narrow.size() / sizeof(bf16));
    if (o.attention_engine) {
      std::shared_ptr<bf16_attention_engine> engine = o.attention_engine();
      engine->use_workspace(attention.data(), attention.size());
      s.ops.set_attention_engine(std::move(engine));
    }
  }
  return s;
}

}  // namespace detail
}  // namespace unshard::wan
