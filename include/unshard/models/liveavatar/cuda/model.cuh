#pragma once
// s2v::cuda_model: Live Avatar's S2V DiT on a CUDA device. Not a second forward: each layer is the
// host s2v::layer, run over cuda_ops (ops/cuda_ops.cuh) instead of host_ops, on buffers in device
// memory. Layers, sub-units, parameter names and order, the buffer table and its categories are
// the host model's, so the unit layout, every policy and the ledger apply unchanged.
//
//   s2v::cuda_model m(config, workload, {dtype::bf16});
//   state = m.make_state(buffers of m.buffers(), in device memory); state.attach_stream(stream);
//   m.begin_sink(state, sink inputs) / m.begin_step(state, step inputs)   (host tensors: uploaded)
//   for each layer i, sub-unit j: m.layer(i).forward(j, views (device memory), state);
//   m.copy_output(state)   (a host vector; waits for the state's stream)
#include <cuda_runtime.h>

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "unshard/backend/cuda/check.cuh"
#include "unshard/core/error.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/layer/param_source.hpp"
#include "unshard/models/liveavatar/model.hpp"
#include "unshard/ops/cuda_model.cuh"
#include "unshard/ops/cuda_ops.cuh"

namespace unshard::s2v {

struct cuda_options {
  // cuBLASLt workspace, a declared workspace buffer (NVIDIA recommends 32 MiB on Hopper).
  std::size_t gemm_workspace_bytes = std::size_t{32} << 20;
  // f32: the path checked against the references; bf16: tensor-core GEMMs and fused attention
  // (ops/cuda_ops.cuh), with a declared bf16 scratch.
  cuda_precision precision = cuda_precision::f32;
  // bf16: the attention engine each lane gets (ops/cudnn_attention.cuh's make_cudnn_attention for
  // cuDNN's SDPA); empty: our segmented flash kernel.
  std::function<std::shared_ptr<bf16_attention_engine>()> attention_engine;
  // The engine's workspace, a declared workspace buffer (with an engine only). cuDNN's inference
  // SDPA graphs ask for none or little; one that needs more runs on our kernel, saying why.
  std::size_t attention_workspace_bytes = std::size_t{16} << 20;
  // fp8 weights (the policy's fp8 / fp8:tensor term): the widening scratch then holds the largest
  // weight dequantized (bf16 for the bf16 precision, f32 for the f32 one). Set it with the policy:
  // without it an fp8 GEMM is an error naming the scratch it lacks.
  bool fp8_weights = false;
  // How fp8 GEMMs treat their activations (ops/cuda_ops.cuh, set_fp8_activations): per_tensor adds
  // the declared workspace "fp8_scratch" (the largest GEMM input as e4m3 codes). Needs fp8_weights.
  cuda::fp8_activations fp8_activations = cuda::fp8_activations::none;
};

using cuda_state = unshard::cuda_state<s2v::state>;

// The host layer over cuda_ops, plus the S2V layer's own queries.
class cuda_layer : public unshard::cuda_layer<s2v::layer, s2v::cuda_state> {
 public:
  using unshard::cuda_layer<s2v::layer, s2v::cuda_state>::cuda_layer;
  s2v::layer_kind kind() const noexcept { return host().kind(); }
  bool fsdp_root() const noexcept { return host().fsdp_root(); }
};

static_assert(unshard::layer<s2v::cuda_layer, s2v::cuda_state>, "s2v::cuda_layer must model unshard::layer over s2v::cuda_state");

namespace detail {

inline weight_extents weight_extents_of(const s2v::model& m) {
  weight_extents e;
  for (std::size_t i = 0; i < m.layer_count(); ++i)
    for (std::size_t j = 0; j < m.layer(i).subunit_count(); ++j)
      for (const param_spec& p : m.layer(i).parameters(j)) {
        const auto n = static_cast<std::size_t>(p.dims.numel());
        if (p.dims.rank() == 1) {
          e.bias = std::max(e.bias, n);
        } else if (p.dims.rank() > 1) {
          e.weight = std::max(e.weight, n);
          e.inner = std::max(e.inner, n / static_cast<std::size_t>(p.dims[0]));
        }
      }
  return e;
}

// Floats of the scratch a weight chunk and a bias slice are converted into (ops/cuda_model.cuh).
inline std::size_t cuda_widen_floats(const s2v::model& m, cuda_precision precision, bool fp8_weights = false) {
  const weight_extents e = weight_extents_of(m);
  return conversion_scratch_floats(e.weight, e.bias, precision, m.geometry().storage == dtype::f32, fp8_weights);
}

// Elements of the largest GEMM input (rows x K).
inline std::size_t cuda_gemm_input_elems(const s2v::model& m) {
  const s2v::geometry& g = m.geometry();
  const std::size_t rows = std::max({g.kv_scratch_rows(), (g.audio_tokens + 1) * g.audio_t, 2 * g.frames});
  return rows * weight_extents_of(m).inner;
}

// bf16 scratch elements of the bf16 compute: the largest GEMM input (rows x K) or attention.
inline std::size_t cuda_bf16_elems(const s2v::model& m) {
  const s2v::geometry& g = m.geometry();
  return cuda_ops::bf16_scratch_elems(cuda_gemm_input_elems(m), g.max_tokens(), g.max_keys(), g.dim);
}

inline const s2v::cuda_options& checked(const s2v::cuda_options& o) {
  if (o.fp8_activations != cuda::fp8_activations::none && !o.fp8_weights)
    throw_error("liveavatar cuda model: fp8 activation quantization (", name_of(o.fp8_activations),
                ") applies to fp8 weights only (a policy with fp8 or fp8:tensor)");
  return o;
}

// The host's "scores" scratch is dropped: device attention keeps its scores on chip; so is its
// "kv_widen": the device reads a bf16 cache as it is.
inline bool cuda_uses_buffer(std::string_view name) { return name != "scores" && name != "kv_widen"; }

// The caches' storage follows the precision: f32 for the f32 path (our attention reads f32), bf16
// for the bf16 path, as the official caches (half the kv_cache term; cuDNN reads them in place).
inline s2v::options with_cache_of(s2v::options o, cuda_precision precision) {
  if (precision == cuda_precision::f32 && o.kv_cache != dtype::f32)
    throw_error("liveavatar cuda model: a ", name_of(o.kv_cache), " KV cache needs the bf16 precision");
  o.kv_cache = precision == cuda_precision::bf16 ? dtype::bf16 : dtype::f32;
  return o;
}

}  // namespace detail

class cuda_model {
 public:
  using state = s2v::cuda_state;

  cuda_model(const s2v::config& config, const s2v::workload& workload, const s2v::options& options = {},
                 const s2v::cuda_options& cuda_options = {})
      : host_(config, workload, detail::with_cache_of(options, cuda_options.precision)),
        options_(detail::checked(cuda_options)),
        widen_floats_(detail::cuda_widen_floats(host_, cuda_options.precision, cuda_options.fp8_weights)),
        bf16_elems_(cuda_options.precision == cuda_precision::bf16 ? detail::cuda_bf16_elems(host_) : 0),
        fp8_scratch_bytes_(cuda_options.fp8_activations == cuda::fp8_activations::per_tensor
                               ? cuda_ops::fp8_scratch_bytes(detail::cuda_gemm_input_elems(host_))
                               : 0) {
    for (std::size_t i = 0; i < host_.layer_count(); ++i) layers_.emplace_back(host_.layer(i));
  }

  const s2v::config& config() const noexcept { return host_.config(); }
  const s2v::geometry& geometry() const noexcept { return host_.geometry(); }
  // The host model with the same layers (planning, checks, or a reference forward on the host).
  const s2v::model& host_model() const noexcept { return host_; }

  std::size_t layer_count() const noexcept { return layers_.size(); }
  const s2v::cuda_layer& layer(std::size_t i) const {
    if (i >= layers_.size()) throw_error("liveavatar cuda model: layer ", i, " out of range (", layers_.size(), " layers)");
    return layers_[i];
  }

  std::vector<buffer_spec> buffers() const {
    std::vector<buffer_spec> specs;
    for (const buffer_spec& b : host_.buffers())
      if (detail::cuda_uses_buffer(b.name)) specs.push_back(b);
    specs.push_back({"gemm_workspace", options_.gemm_workspace_bytes, memory_category::workspace});
    specs.push_back({"weight_f32", widen_floats_ * sizeof(float), memory_category::workspace});
    if (bf16_elems_) specs.push_back({"bf16_scratch", bf16_elems_ * sizeof(bf16), memory_category::workspace});
    if (bf16_elems_ && options_.attention_engine)
      specs.push_back({"attention_workspace", options_.attention_workspace_bytes, memory_category::workspace});
    if (fp8_scratch_bytes_) specs.push_back({"fp8_scratch", fp8_scratch_bytes_, memory_category::workspace});
    return specs;
  }

  // Views into device buffers; the caches are zeroed on the device (as the official torch.zeros).
  // A cache whose pages the runtime places (kv:offload) is in pinned host memory, zeroed by the
  // runtime; block i reads its page from the device slot the runtime's page table names.
  state make_state(const buffer_set& buffers) const {
    state s;
    static_cast<s2v::state&>(s) = detail::make_state(geometry(), buffers, false);
    for (const auto& b : detail::buffer_table(geometry()))
      if (b.category == memory_category::kv_cache && (b.scope != buffer_scope::per_step || buffers.has(b.name)) &&
          !buffers.pages(b.name))
        UNSHARD_CUDA_CHECK(cudaMemset(buffers.bytes(b.name).data(), 0, b.floats * sizeof(float)));
    UNSHARD_CUDA_CHECK(cudaDeviceSynchronize());  // the zeros land before any stream reads them
    cuda_ops::reset_count(s.cond_end_slot);        // the cond cache is empty: its length is 0
    const auto ws = buffers.bytes("gemm_workspace");
    const auto widen = buffers.bytes("weight_f32");
    s.ops = cuda_ops(nullptr, reinterpret_cast<float*>(widen.data()), widen_floats_, ws.data(), ws.size());
    if (fp8_scratch_bytes_) {
      const auto f8 = buffers.bytes("fp8_scratch");
      s.ops.set_fp8_activations(options_.fp8_activations, f8.data(), f8.size());
    }
    if (bf16_elems_) {
      s.ops.set_precision(cuda_precision::bf16, reinterpret_cast<bf16*>(buffers.bytes("bf16_scratch").data()), bf16_elems_);
      if (options_.attention_engine) {
        std::shared_ptr<bf16_attention_engine> engine = options_.attention_engine();
        const auto aw = buffers.bytes("attention_workspace");
        engine->use_workspace(aw.data(), aw.size());
        s.ops.set_attention_engine(std::move(engine));
      }
    }
    return s;
  }

  // The host model's pages (paged_model): the same caches, the same blocks.
  std::optional<std::size_t> page_of_layer(std::size_t i) const { return host_.page_of_layer(i); }
  page_access page_access_of(const state& s, const buffer_spec& b) const { return host_.page_access_of(s, b); }

  void begin_sink(state& s, const s2v::sink_inputs& in) const { host_.begin_sink(s.ops, s, in); }
  void begin_step(state& s, const s2v::step_inputs& in) const { host_.begin_step(s.ops, s, in); }
  void check_step(const s2v::step_inputs& in) const { host_.check_step(in); }
  void check_sink(const s2v::sink_inputs& in) const { host_.check_sink(in); }

  // The lane's ops context (the denoiser's Euler update runs on it).
  cuda_ops& ops(state& s) const { return s.ops; }

  // Device memory (the current device) that another rank's results land in: NCCL writes only
  // device memory. read() copies it to the host once the transfers that wrote it have completed
  // (the runtime synchronises its communication stream after a tick's transfers).
  class landing {
   public:
    explicit landing(std::size_t floats) : floats_(floats) {
      UNSHARD_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p_), std::max<std::size_t>(floats, 1) * sizeof(float)));
    }
    landing(landing&& o) noexcept : p_(std::exchange(o.p_, nullptr)), floats_(o.floats_) {}
    landing& operator=(landing&&) = delete;
    ~landing() {
      if (p_) cudaFree(p_);
    }
    float* data() noexcept { return p_; }
    // A synchronous copy to pageable memory: it returns once the bytes are on the host, and the
    // transfers that wrote them finished before the tick returned.
    void read(std::vector<float>& out) const {
      out.resize(floats_);
      UNSHARD_CUDA_CHECK(cudaMemcpy(out.data(), p_, floats_ * sizeof(float), cudaMemcpyDeviceToHost));
    }

   private:
    float* p_ = nullptr;
    std::size_t floats_;
  };
  landing make_landing(std::size_t floats) const { return landing(floats); }

  // The streamed call's output latent [C_out, F, H, W] on the host, after the state's stream ran it.
  std::vector<float> copy_output(const state& s) const {
    return download(s, s.output, static_cast<std::size_t>(host_.output(s).numel()));
  }
  // Any f32 state buffer (tests read intermediates), n floats from `device`.
  std::vector<float> copy_buffer(const state& s, const float* device, std::size_t n) const {
    return download(s, device, n);
  }

 private:
  static std::vector<float> download(const state& s, const float* src, std::size_t n) { return s.ops.download(src, n); }

  s2v::model host_;
  s2v::cuda_options options_;
  std::size_t widen_floats_;
  std::size_t bf16_elems_;
  std::size_t fp8_scratch_bytes_;
  std::vector<s2v::cuda_layer> layers_;
};

static_assert(unshard::model<s2v::cuda_model>, "s2v::cuda_model must model unshard::model");
static_assert(unshard::paged_model<s2v::cuda_model>, "s2v::cuda_model pages its KV caches as the host model");

}  // namespace unshard::s2v
