#pragma once
// The op set (ops/op_set.hpp) on a CUDA device, activations in f32 memory, in one of two precisions:
//  * f32: the path checked against the references at 1e-5 (TF32 off: cuBLASLt computes in
//    CUBLAS_COMPUTE_32F; GELU as a separate pass of the host's exact gelu_tanh);
//  * bf16: the tensor-core path. A GEMM's input rows are rounded to bf16 (weights are bf16 as
//    stored), cuBLASLt multiplies on tensor cores with f32 accumulation and writes f32, bias and
//    GELU in its epilogue; attention rounds q, k, v to bf16 and runs the installed bf16 attention
//    engine (ops/cudnn_attention.cuh: cuDNN's fused SDPA), or our flash kernel. Norm statistics, modulation, the time embedding, residuals
//    and the KV cache stay f32, as the official code keeps them f32 or as our cache is.
// f8e4m3 weights (the fp8 policy) run in either precision: dequantized per chunk into the widening
// scratch (weight-only, the default), or, with set_fp8_activations(per_tensor), as e4m3 x e4m3
// GEMMs on fp8 tensor cores over per-tensor quantized activations (the official path).
// Every op enqueues on the
// context's stream and never synchronises the device, except where the op set returns a value to
// the host (load_count, answered from a host shadow) or reuses pinned staging still being copied.
//
// A cuda_ops is the ops *context* of one lane: the stream, the cuBLASLt handle (created on the
// lane's thread, the rank's device current), the f32 scratch bf16/f16 weights are widened into, and
// the pinned staging that host tensors and host-computed tables cross through. The model's state
// holds buffers only; this object holds everything else a kernel needs.
//
// Row math is the host's: each kernel calls the UNSHARD_HD row functions of kernels/thread/, so
// device and host differ only in summation order (GEMMs, attention, reductions).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "unshard/backend/cuda/check.cuh"
#include "unshard/core/dtype.hpp"
#include "unshard/core/error.hpp"
#include "unshard/kernels/cuda/attention.cuh"
#include "unshard/kernels/cuda/common.cuh"
#include "unshard/kernels/cuda/elementwise.cuh"
#include "unshard/kernels/cuda/fp8.cuh"
#include "unshard/kernels/cuda/gemm.cuh"
#include "unshard/kernels/cuda/norm.cuh"
#include "unshard/kernels/host/linear_params.hpp"
#include "unshard/kernels/host/typed_storage.hpp"
#include "unshard/kernels/thread/activation.hpp"
#include "unshard/kernels/thread/embedding.hpp"
#include "unshard/kernels/thread/norm.hpp"
#include "unshard/kernels/thread/patch.hpp"
#include "unshard/kernels/thread/residual.hpp"
#include "unshard/layer/param_source.hpp"
#include "unshard/ops/op_set.hpp"

namespace unshard {
namespace cuda_ops_detail {

#define UNSHARD_OPS_GRID_STRIDE(i, n) \
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)

inline constexpr unsigned threads = 256;
inline unsigned blocks(std::size_t n) { return cuda::blocks_for(n, threads); }

// A template: a header may define kernels in every TU (nvcc ignores `inline` on a __global__).
template <int = 0>
__global__ void layer_norm_silu_kernel(float* x, std::size_t rows, std::size_t d, double eps) {
  UNSHARD_OPS_GRID_STRIDE(r, rows) {
    float* xr = x + r * d;
    layer_norm_row(xr, d, eps, xr);
    for (std::size_t i = 0; i < d; ++i) xr[i] = unshard::silu(xr[i]);
  }
}

template <class TP>
__global__ void add_param_rows_kernel(float* out, const TP* param, const float* in, std::size_t rows, std::size_t n,
                                      std::size_t in_ld, std::size_t in_cols) {
  UNSHARD_OPS_GRID_STRIDE(i, rows * n) {
    const std::size_t r = i / n, c = i % n;
    out[i] = to_f32(param[c]) + in[r * in_ld + c % in_cols];
  }
}

template <class TP>
__global__ void add_rows_kernel(float* x, const float* y, std::size_t rows, std::size_t d, const TP* table_row) {
  UNSHARD_OPS_GRID_STRIDE(i, rows * d) {
    const float xi = y ? x[i] + y[i] : x[i];
    x[i] = xi + to_f32(table_row[i % d]);
  }
}

template <class TP>
__global__ void broadcast_row_kernel(float* dst, std::size_t ld, std::size_t rows, const TP* row, std::size_t d) {
  UNSHARD_OPS_GRID_STRIDE(i, rows * d) dst[(i / d) * ld + i % d] = to_f32(row[i % d]);
}

template <int = 0>
__global__ void causal_conv_inputs_kernel(const float* x, std::size_t streams, std::size_t t_in, std::size_t channels,
                                          std::size_t stride, std::size_t t_out, float* cols) {
  UNSHARD_OPS_GRID_STRIDE(r, streams * t_out)
  causal_conv_input_row(x + (r / t_out) * t_in * channels, channels, r % t_out, stride, cols + r * 3 * channels);
}

// The timesteps are read on the device: no host round trip, the forward stays capturable.
template <int = 0>
__global__ void sinusoid_rows_kernel(const float* t, std::size_t rows_with_t, std::size_t rows, std::size_t dim,
                                     float* out) {
  UNSHARD_OPS_GRID_STRIDE(i, rows * dim) {
    const std::size_t r = i / dim;
    const double tr = r < rows_with_t ? static_cast<double>(t[r]) : 0.0;
    out[i] = time_sinusoid(tr, i % dim, dim);
  }
}

// Every thread forms the layer weights in the host's order (the f32 sum of SiLU(w_l) in l order),
// so each output is bit for bit the host's sum in double.
template <class TW>
__global__ void mix_layers_kernel(const float* a, std::size_t layers, std::size_t channels, std::size_t columns,
                                  const TW* weights, std::size_t rows, std::size_t repeat_first, float* out) {
  UNSHARD_OPS_GRID_STRIDE(i, rows * channels) {
    const std::size_t t = i / channels, c = i % channels;
    float sum = 0.0f;
    for (std::size_t l = 0; l < layers; ++l) sum += unshard::silu(to_f32(weights[l]));
    const std::size_t col = t < repeat_first ? 0 : t - repeat_first;
    double acc = 0.0;
    for (std::size_t l = 0; l < layers; ++l)
      acc += static_cast<double>(a[(l * channels + c) * columns + col]) *
             static_cast<double>(unshard::silu(to_f32(weights[l]))) / sum;
    out[i] = static_cast<float>(acc);
  }
}

template <int = 0>
__global__ void scaled_add_kernel(float* x, const float* y, float a, std::size_t n) {
  UNSHARD_OPS_GRID_STRIDE(i, n) x[i] = add_scaled(x[i], y[i], a);
}

template <int = 0>
__global__ void fill_kernel(float* dst, std::size_t n, float value) {
  UNSHARD_OPS_GRID_STRIDE(i, n) dst[i] = value;
}

#undef UNSHARD_OPS_GRID_STRIDE

// The cond length the sink stores, shadowed on the host per buffer address (process-wide: a rank's
// lanes share the cond cache but not their ops contexts), so a streamed call never waits on the
// device to learn how many cond keys it attends.
struct count_shadow {
  std::mutex mutex;
  std::map<const float*, std::size_t> values;
  static count_shadow& instance() {
    static count_shadow s;
    return s;
  }
};

// Pinned host memory that host tensors and tables cross through: a ring of slots, each reused
// only after the copy that last read it has finished (its event). With a slot per upload of a call
// (a call uploads a handful of inputs and tables), the slot a call takes was last read by the
// previous call's copy, which ran before that call's forward: the host never waits for the
// device's forward, only for a copy already done.
class pinned_staging {
 public:
  static constexpr std::size_t slots = 8;

  pinned_staging() = default;
  pinned_staging(const pinned_staging&) = delete;
  pinned_staging& operator=(const pinned_staging&) = delete;
  ~pinned_staging() {
    for (slot& s : ring_) {
      if (s.done) cudaEventDestroy(s.done);
      if (s.data) cudaFreeHost(s.data);
    }
  }

  // The next slot, at least `floats` long (grown, pinned, when needed), free to write.
  float* acquire(std::size_t floats) {
    slot& s = ring_[next_];
    if (s.done) UNSHARD_CUDA_CHECK(cudaEventSynchronize(s.done));
    if (floats > s.capacity) {
      if (s.data) UNSHARD_CUDA_CHECK(cudaFreeHost(s.data));
      s.data = nullptr;
      UNSHARD_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&s.data), floats * sizeof(float)));
      s.capacity = floats;
    }
    return s.data;
  }
  // After the copies out of the slot acquire() gave were enqueued on `stream`.
  void release(cudaStream_t stream) {
    slot& s = ring_[next_];
    if (!s.done) UNSHARD_CUDA_CHECK(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
    UNSHARD_CUDA_CHECK(cudaEventRecord(s.done, stream));
    next_ = (next_ + 1) % slots;
  }

 private:
  struct slot {
    float* data = nullptr;
    std::size_t capacity = 0;
    cudaEvent_t done = nullptr;
  };
  slot ring_[slots];
  std::size_t next_ = 0;
};

}  // namespace cuda_ops_detail

enum class cuda_precision : std::uint8_t { f32, bf16 };

// bf16 attention of `groups` equal groups of queries over their groups of keys (one K and one V,
// rows of heads*head_dim): the engine the bf16 precision runs. Type-erased so that cuda_ops does
// not compile the cuDNN frontend (a few minutes of nvcc per translation unit): only the units
// that install ops/cudnn_attention.cuh's engine do. Without one: our segmented flash kernel.
class bf16_attention_engine {
 public:
  virtual ~bf16_attention_engine() = default;
  virtual void run(const bf16* q, std::size_t queries, const bf16* k, const bf16* v, std::size_t keys,
                   std::size_t heads, std::size_t head_dim, std::size_t groups, bf16* out, cudaStream_t stream) = 0;
  // Which implementation ran last ("cudnn", or the fallback's name).
  virtual const char* last_impl() const = 0;
  // The engine's device workspace: a buffer the model declared, so the ledger counts it; an engine
  // never allocates one of its own once given this.
  virtual void use_workspace(void* p, std::size_t bytes) = 0;
};

inline const char* name_of(cuda_precision p) noexcept { return p == cuda_precision::bf16 ? "bf16" : "f32"; }

class cuda_ops {
 public:
  using value_type = float;

  // stream: where every op enqueues; widen: device scratch of widen_floats floats that a bf16/f16
  // weight chunk and its bias slice are widened into (null when every weight is f32);
  // gemm_workspace: cuBLASLt's workspace (may be null).
  cuda_ops() = default;
  cuda_ops(cudaStream_t stream, float* widen, std::size_t widen_floats, void* gemm_workspace,
           std::size_t gemm_workspace_bytes)
      : stream_(stream),
        widen_(widen),
        widen_floats_(widen_floats),
        workspace_(gemm_workspace),
        workspace_bytes_(gemm_workspace_bytes) {}

  // The bf16 precision and its scratch: `elems` bf16 values for a GEMM's rounded input rows, or for
  // attention's rounded q, k, v and output (bf16_scratch_elems gives the size).
  void set_precision(cuda_precision p, bf16* scratch = nullptr, std::size_t elems = 0) {
    if (p == cuda_precision::bf16 && scratch == nullptr)
      throw_error("cuda_ops: the bf16 precision needs a bf16 scratch (bf16_scratch_elems)");
    precision_ = p;
    narrow_ = scratch;
    narrow_elems_ = elems;
  }
  cuda_precision precision() const noexcept { return precision_; }
  // bf16 scratch elements for GEMM inputs of at most `gemm_input` elements (rows x K) and attention
  // of at most `queries` query rows against `keys` key rows of width `width`.
  static std::size_t bf16_scratch_elems(std::size_t gemm_input, std::size_t queries, std::size_t keys,
                                        std::size_t width) {
    return std::max(gemm_input, (2 * queries + 2 * keys) * width);
  }
  // fp8 weights (f8e4m3 codes whose views carry their scales, in device memory) always run; this
  // chooses how (docs/design.md, fp8 weights):
  //  * none (default): weight-only fp8. Each weight chunk is dequantized (kernels/cuda/fp8.cuh) into
  //    the widening scratch, as bf16 for the bf16 precision, as f32 for the f32 one, and the usual
  //    GEMM runs: exactly the host's f32 dequantized weights, rounded to bf16 in the bf16 precision;
  //  * per_tensor: the official path. A GEMM's whole input is quantized to e4m3 with one scale
  //    (amax / 448, on the device) into `scratch` (fp8_scratch_bytes of it), and each chunk runs
  //    cuBLASLt's e4m3 x e4m3 GEMM (the weight's per-tensor scale as its A scale, the activations'
  //    as B), then fp8_epilogue applies per-channel weight scales, the bias and (bf16 precision)
  //    GELU. Where cuBLASLt cannot (device below sm_89, K not a multiple of 16, no algorithm), that
  //    chunk runs weight-only instead: blaslt_stats::fp8_fallback counts it, stderr says so once.
  void set_fp8_activations(cuda::fp8_activations a, void* scratch = nullptr, std::size_t bytes = 0) {
    if (a == cuda::fp8_activations::per_tensor && (scratch == nullptr || bytes <= fp8_scalar_bytes))
      throw_error("cuda_ops: fp8 activation quantization needs a scratch (fp8_scratch_bytes)");
    fp8_act_ = a;
    fp8_scratch_ = static_cast<std::byte*>(scratch);
    fp8_scratch_bytes_ = bytes;
  }
  cuda::fp8_activations fp8_activations() const noexcept { return fp8_act_; }
  // Bytes of the fp8 activation scratch for GEMM inputs of at most `gemm_input` elements (rows x K):
  // the amax word and the scale (256 bytes, keeping the codes 256-byte aligned), then one code each.
  static constexpr std::size_t fp8_scalar_bytes = 256;
  static std::size_t fp8_scratch_bytes(std::size_t gemm_input) { return fp8_scalar_bytes + (gemm_input + 15) / 16 * 16; }

  // The bf16 attention engine (null: our segmented flash kernel in bf16).
  void set_attention_engine(std::shared_ptr<bf16_attention_engine> e) { engine_ = std::move(e); }
  // Which attention implementation the last bf16 attention ran.
  const char* last_attention() const { return engine_ ? engine_->last_impl() : "flash (segmented)"; }

  cudaStream_t stream() const noexcept { return stream_; }
  void set_stream(cudaStream_t s) {
    stream_ = s;
    blas_.reset();  // re-created on the calling thread's device at first use
  }

  // cuDNN-free, SIMT attention keeps its scores in registers: no scratch.
  static constexpr std::size_t attention_scratch(std::size_t) noexcept { return 0; }

  template <param_source P>
  void linear(const float* x, std::size_t rows, std::size_t in, P& p, std::size_t w, std::size_t b, float* y,
              linear_act act = linear_act::none) {
    const shape& wd = p.dims(w);
    const std::size_t n = wd.rank() == 0 ? 0 : static_cast<std::size_t>(wd[0]);
    const tensor_view bias = b == no_param ? tensor_view{} : tensor_view(p.whole(b));  // 1-D: resident
    cuda::blaslt& blas = gemm();
    if (precision_ == cuda_precision::bf16) return linear_bf16(x, rows, in, p, w, bias, y, n, act);
    bool x_quantized = false;
    p.rows(w, [&](const tensor_view& w_rows, std::int64_t r0, std::int64_t r1) {
      const auto nr = static_cast<std::size_t>(r1 - r0);
      // GELU after all chunks (below), so not in the fp8 epilogue.
      if (linear_fp8_activations(x, rows, in, w_rows, static_cast<std::size_t>(r0), nr, bias, y, n, false, x_quantized))
        return;
      const float* wf = w_rows.type() == dtype::f8e4m3 ? dequantized_f32(w_rows, nr, in) : widened(w_rows, nr * in, 0);
      const float* bf = bias.empty() ? nullptr : widened_slice(bias, static_cast<std::size_t>(r0), nr);
      // GELU as a separate pass of the host's gelu_tanh: cuBLASLt's epilogue approximates tanh.
      blas.linear_rows(x, rows, in, wf, bf, nr, static_cast<std::size_t>(r0), y, n, cuda::activation::none, stream_);
    });
    if (act == linear_act::gelu_tanh) gelu_tanh(y, rows * n);
  }

  void layer_norm_modulate(const float* x, float* y, std::size_t rows, std::size_t d, double eps,
                           modulation_rows shift, modulation_rows scale) {
    for_each_modulation_group(rows, shift, [&](std::size_t r0, std::size_t r1, const float* sh) {
      const std::size_t off = sh - shift.first;  // the same row offset in the scale table
      cuda::layer_norm_modulate(x + r0 * d, r1 - r0, d, eps, sh, scale.first + off, y + r0 * d, stream_);
    });
  }

  void layer_norm(const float* x, float* y, std::size_t rows, std::size_t d, double eps, const tensor_view& weight,
                  const tensor_view& bias) {
    visit_storage(weight, [&](const auto* w) {
      using storage_type = std::remove_cv_t<std::remove_pointer_t<decltype(w)>>;
      cuda::layer_norm_affine(x, rows, d, eps, w, typed_data<storage_type>(bias), y, stream_);
    });
  }

  void layer_norm_silu(float* x, std::size_t rows, std::size_t d, double eps) {
    if (rows == 0 || d == 0) return;
    UNSHARD_LAUNCH(cuda_ops_detail::blocks(rows), cuda_ops_detail::threads, stream_,
                   cuda_ops_detail::layer_norm_silu_kernel<>)(x, rows, d, eps);
    cuda::check_launch("layer_norm_silu");
  }

  void rms_norm(float* x, std::size_t rows, std::size_t d, double eps, const tensor_view& weight) {
    visit_storage(weight, [&](const auto* w) {
      cuda::rms_norm_rope(x, rows, d, d, eps, w, static_cast<const float*>(nullptr), static_cast<const float*>(nullptr),
                          stream_);
    });
  }

  void rope(float* x, std::size_t rows, std::size_t heads, std::size_t head_dim, const float* cos, const float* sin) {
    cuda::rms_norm_rope(x, rows, heads * head_dim, head_dim, 0.0, static_cast<const float*>(nullptr), cos, sin, stream_);
  }

  void attention(const float* q, std::size_t n_queries, kv_segment first, kv_segment second, std::size_t heads,
                 std::size_t head_dim, float*, float* out) {
    if (uses_sdpa()) return attention_bf16(q, n_queries, first, second, heads, head_dim, 1, out);
    require_f32(first, "attention");
    require_f32(second, "attention");
    cuda::segmented_attention<float> a;
    a.q = q;
    a.out = out;
    a.queries = n_queries;
    a.seg[0] = {first.k.f32(), first.v.f32(), first.rows, 0};
    a.seg[1] = {second.rows ? second.k.f32() : first.k.f32(), second.rows ? second.v.f32() : first.v.f32(), second.rows, 0};
    a.heads = heads;
    a.d = head_dim;
    cuda::segmented_flash_attention(a, stream_);
  }

  void grouped_attention(const float* q, std::size_t n_queries, kv_segment keys, std::size_t heads,
                         std::size_t head_dim, std::size_t groups, float*, float* out) {
    if (groups == 0 || n_queries % groups != 0 || keys.rows % groups != 0)
      throw_error("grouped_attention: ", n_queries, " queries and ", keys.rows, " keys do not split into ", groups,
                  " equal groups");
    if (uses_sdpa()) return attention_bf16(q, n_queries, keys, {}, heads, head_dim, groups, out);
    require_f32(keys, "grouped_attention");
    const std::size_t nq = n_queries / groups, nk = keys.rows / groups;
    cuda::segmented_attention<float> a;
    a.q = q;
    a.out = out;
    a.queries = nq;
    a.groups = groups;
    a.q_group_rows = nq;
    a.seg[0] = {keys.k.f32(), keys.v.f32(), nk, nk};
    a.heads = heads;
    a.d = head_dim;
    cuda::segmented_flash_attention(a, stream_);
  }

  void gelu_tanh(float* x, std::size_t n) { cuda::bias_activation(x, 1, n, n, static_cast<const float*>(nullptr), true, stream_); }
  void silu(const float* x, float* y, std::size_t n) { cuda::silu(x, n, y, stream_); }

  void gated_residual(float* x, const float* y, modulation_rows gate, std::size_t rows, std::size_t d) {
    for_each_modulation_group(rows, gate, [&](std::size_t r0, std::size_t r1, const float* g) {
      cuda::gated_residual(x + r0 * d, y + r0 * d, g, r1 - r0, d, stream_);
    });
  }
  void residual(float* x, const float* y, std::size_t n) {
    cuda::gated_residual(x, y, static_cast<const float*>(nullptr), 1, n, stream_);
  }

  void scaled_add(float* x, const float* y, float a, std::size_t n) {
    if (n == 0) return;
    UNSHARD_LAUNCH(cuda_ops_detail::blocks(n), cuda_ops_detail::threads, stream_,
                   cuda_ops_detail::scaled_add_kernel<>)(x, y, a, n);
    cuda::check_launch("scaled_add");
  }

  void add_param_rows(float* out, const tensor_view& param, const float* in, std::size_t rows, std::size_t n,
                      std::size_t in_ld, std::size_t in_cols) {
    if (rows * n == 0) return;
    visit_storage(param, [&](const auto* p) {
      UNSHARD_LAUNCH(cuda_ops_detail::blocks(rows * n), cuda_ops_detail::threads, stream_,
                     cuda_ops_detail::add_param_rows_kernel)(out, p, in, rows, n, in_ld, in_cols);
    });
    cuda::check_launch("add_param_rows");
  }
  void add_rows(float* x, const float* y, std::size_t rows, std::size_t d, const tensor_view& table, std::size_t row) {
    if (rows * d == 0) return;
    visit_storage(table, [&](const auto* t) {
      UNSHARD_LAUNCH(cuda_ops_detail::blocks(rows * d), cuda_ops_detail::threads, stream_,
                     cuda_ops_detail::add_rows_kernel)(x, y, rows, d, t + row * d);
    });
    cuda::check_launch("add_rows");
  }
  void broadcast_row(float* dst, std::size_t ld, std::size_t rows, const tensor_view& param, std::size_t d) {
    if (rows * d == 0) return;
    visit_storage(param, [&](const auto* p) {
      UNSHARD_LAUNCH(cuda_ops_detail::blocks(rows * d), cuda_ops_detail::threads, stream_,
                     cuda_ops_detail::broadcast_row_kernel)(dst, ld, rows, p, d);
    });
    cuda::check_launch("broadcast_row");
  }

  void patchify(const float* src, std::size_t channels, std::size_t frames, std::size_t height, std::size_t width,
                const patch_grid& grid, std::size_t tokens, float* dst) {
    require_whole_grid("patchify", grid, tokens);
    cuda::patchify(src, channels, frames, height, width, grid, dst, stream_);
  }
  void unpatchify(const float* src, std::size_t channels, const patch_grid& grid, std::size_t tokens, float* dst) {
    require_whole_grid("unpatchify", grid, tokens);
    cuda::unpatchify(src, channels, grid, dst, stream_);
  }
  void causal_conv_inputs(const float* x, std::size_t streams, std::size_t t_in, std::size_t channels,
                          std::size_t stride, float* cols) {
    if (streams == 0 || channels == 0) return;
    if (t_in == 0 || stride == 0) throw_error("causal_conv_inputs: input length ", t_in, ", stride ", stride);
    const std::size_t t_out = causal_conv_out_len(t_in, stride);
    UNSHARD_LAUNCH(cuda_ops_detail::blocks(streams * t_out), cuda_ops_detail::threads, stream_,
                   cuda_ops_detail::causal_conv_inputs_kernel<>)(x, streams, t_in, channels, stride, t_out, cols);
    cuda::check_launch("causal_conv_inputs");
  }

  void sinusoid_rows(const float* t, std::size_t rows_with_t, std::size_t rows, std::size_t dim, float* out) {
    if (rows * dim == 0) return;
    UNSHARD_LAUNCH(cuda_ops_detail::blocks(rows * dim), cuda_ops_detail::threads, stream_,
                   cuda_ops_detail::sinusoid_rows_kernel<>)(t, rows_with_t, rows, dim, out);
    cuda::check_launch("sinusoid_rows");
  }

  void mix_layers(const float* a, std::size_t layers, std::size_t channels, std::size_t columns,
                  const tensor_view& weights, std::size_t rows, std::size_t repeat_first, float* out) {
    if (rows * channels == 0) return;
    visit_storage(weights, [&](const auto* w) {
      UNSHARD_LAUNCH(cuda_ops_detail::blocks(rows * channels), cuda_ops_detail::threads, stream_,
                     cuda_ops_detail::mix_layers_kernel)(a, layers, channels, columns, w, rows, repeat_first, out);
    });
    cuda::check_launch("mix_layers");
  }

  void copy(float* dst, const float* src, std::size_t n) {
    if (n) UNSHARD_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
  }
  void copy_rows(float* dst, std::size_t dst_ld, const float* src, std::size_t src_ld, std::size_t rows,
                 std::size_t cols) {
    if (rows * cols == 0) return;
    UNSHARD_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_ld * sizeof(float), src, src_ld * sizeof(float), cols * sizeof(float),
                                         rows, cudaMemcpyDeviceToDevice, stream_));
  }
  void fill(float* dst, std::size_t n, float value) {
    if (n == 0) return;
    UNSHARD_LAUNCH(cuda_ops_detail::blocks(n), cuda_ops_detail::threads, stream_,
                   cuda_ops_detail::fill_kernel<>)(dst, n, value);
    cuda::check_launch("fill");
  }
  // The cache's own type: f32 (the f32 precision), or bf16 (the bf16 precision, as the official
  // caches): each value rounded once, when written; the attention then reads it without a pass.
  void write_cache(kv_cache_ref cache, const float* src, std::size_t n) {
    if (cache.type == dtype::f32) return copy(static_cast<float*>(cache.data), src, n);
    require_cache_type(cache.type);
    if (n) cuda::convert(src, n, static_cast<bf16*>(cache.data), stream_);
  }
  void read_cache(float* dst, kv_cache_ref cache, std::size_t n) {
    if (cache.type == dtype::f32) return copy(dst, static_cast<const float*>(cache.data), n);
    require_cache_type(cache.type);
    if (n) cuda::convert(static_cast<const bf16*>(cache.data), n, dst, stream_);
  }

  // A host tensor of any storage dtype, widened to f32 in pinned staging and copied on the stream
  // (never a pageable cudaMemcpy racing the stream's kernels).
  void upload(float* dst, const tensor_view& src) {
    const auto n = static_cast<std::size_t>(src.numel());
    if (n == 0) return;
    float* h = staging_->acquire(n);
    for (std::size_t i = 0; i < n; ++i) h[i] = src.load(i);
    UNSHARD_CUDA_CHECK(cudaMemcpyAsync(dst, h, n * sizeof(float), cudaMemcpyHostToDevice, stream_));
    staging_->release(stream_);
  }
  void host_tables(float* a, float* b, std::size_t n, host_fill fill) {
    if (n == 0) return;
    float* h = staging_->acquire(2 * n);
    fill(h, h + n);
    UNSHARD_CUDA_CHECK(cudaMemcpyAsync(a, h, n * sizeof(float), cudaMemcpyHostToDevice, stream_));
    UNSHARD_CUDA_CHECK(cudaMemcpyAsync(b, h + n, n * sizeof(float), cudaMemcpyHostToDevice, stream_));
    staging_->release(stream_);
  }

  std::size_t load_count(const float* slot) {
    auto& shadow = cuda_ops_detail::count_shadow::instance();
    {
      const std::lock_guard<std::mutex> lock(shadow.mutex);
      const auto it = shadow.values.find(slot);
      if (it != shadow.values.end()) return it->second;
    }
    // Never stored through an ops context of this process: read the device (a fresh, zeroed cache).
    float v = 0.0f;
    UNSHARD_CUDA_CHECK(cudaMemcpyAsync(&v, slot, sizeof(float), cudaMemcpyDeviceToHost, stream_));
    UNSHARD_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return static_cast<std::size_t>(v);
  }
  // A fresh buffer at `slot` that the model just zeroed: its count is 0 (and a shadow left by an
  // earlier buffer at the same address must not answer for it), known without reading the device.
  static void reset_count(const float* slot) {
    auto& shadow = cuda_ops_detail::count_shadow::instance();
    const std::lock_guard<std::mutex> lock(shadow.mutex);
    shadow.values[slot] = 0;
  }
  void store_count(float* slot, std::size_t n) {
    fill(slot, 1, static_cast<float>(n));  // the device copy, exact below 2^24
    auto& shadow = cuda_ops_detail::count_shadow::instance();
    const std::lock_guard<std::mutex> lock(shadow.mutex);
    shadow.values[slot] = n;
  }

  // n floats of device memory at src, on the host once everything enqueued on the stream ran
  // (outputs and intermediates read back by the models and tests; not on a forward's path).
  std::vector<float> download(const float* src, std::size_t n) const {
    std::vector<float> out(n);
    if (n == 0) return out;
    UNSHARD_CUDA_CHECK(cudaMemcpyAsync(out.data(), src, n * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    UNSHARD_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return out;
  }

  // The cuBLASLt handle, created on first use on the calling thread's current device.
  cuda::blaslt& gemm() {
    if (!blas_) {
      blas_ = std::make_shared<cuda::blaslt>();
      blas_->set_workspace(workspace_, workspace_bytes_);
    }
    return *blas_;
  }

 private:
  // y = act(round_bf16(x)·Wᵀ + b) on tensor cores, f32 out; W bf16 as stored (f32 weights are
  // rounded into the widening scratch, which holds twice as many bf16 values as floats).
  template <param_source P>
  void linear_bf16(const float* x, std::size_t rows, std::size_t in, P& p, std::size_t w, const tensor_view& bias,
                   float* y, std::size_t n, linear_act act) {
    bf16* xb = nullptr;  // rounded at the first chunk that needs it (none if every chunk runs fp8 x fp8)
    bool x_quantized = false;
    cuda::blaslt& blas = gemm();
    const cuda::activation a = act == linear_act::gelu_tanh ? cuda::activation::gelu_tanh : cuda::activation::none;
    p.rows(w, [&](const tensor_view& w_rows, std::int64_t r0, std::int64_t r1) {
      const auto nr = static_cast<std::size_t>(r1 - r0);
      if (linear_fp8_activations(x, rows, in, w_rows, static_cast<std::size_t>(r0), nr, bias, y, n,
                                 act == linear_act::gelu_tanh, x_quantized))
        return;
      if (!xb) {
        xb = narrow(rows * in, "a GEMM's input rows");
        cuda::convert(x, rows * in, xb, stream_);
      }
      const bf16* wb = narrowed(w_rows, nr, in);
      const float* bf = bias.empty() ? nullptr : widened_slice(bias, static_cast<std::size_t>(r0), nr);
      blas.linear_rows(static_cast<const bf16*>(xb), rows, in, wb, bf, nr, static_cast<std::size_t>(r0), y, n, a, stream_);
    });
  }

  // The fp8 scales of a weight chunk of nr rows (device memory), checked for count.
  static std::pair<const float*, std::size_t> fp8_scales_of(const tensor_view& w_rows, std::size_t nr) {
    if (!w_rows.has_scales() || (w_rows.scale_count() != 1 && w_rows.scale_count() != nr))
      throw_error("cuda_ops: f8e4m3 weight of shape ", w_rows.dims().to_string(), " carries ", w_rows.scale_count(),
                  " scales; it needs 1 (per tensor) or ", nr,
                  " (one per row): the fp8 policy's parameter views carry them (quant/fp8.hpp)");
    return {w_rows.scales(), w_rows.scale_count()};
  }

  // The per-tensor activation path for one chunk of an f8e4m3 weight: true when it ran (GEMM and
  // epilogue enqueued), false when the chunk must take the weight-only path (not fp8, the option
  // off, or cuBLASLt unable: counted, and said once). x is quantized at the first chunk that runs.
  bool linear_fp8_activations(const float* x, std::size_t rows, std::size_t in, const tensor_view& w_rows,
                              std::size_t r0, std::size_t nr, const tensor_view& bias, float* y, std::size_t n,
                              bool gelu, bool& x_quantized) {
    if (w_rows.type() != dtype::f8e4m3 || fp8_act_ != cuda::fp8_activations::per_tensor || rows == 0 || nr == 0)
      return false;
    const auto [sw, count] = fp8_scales_of(w_rows, nr);
    cuda::blaslt& blas = gemm();
    auto* amax = reinterpret_cast<std::uint32_t*>(fp8_scratch_);
    auto* sx = reinterpret_cast<float*>(fp8_scratch_ + 16);
    auto* codes = reinterpret_cast<std::uint8_t*>(fp8_scratch_ + fp8_scalar_bytes);
    if (blas.compute_capability() >= 89 && in % 16 == 0 && !x_quantized) {
      if (fp8_scalar_bytes + rows * in > fp8_scratch_bytes_)
        throw_error("cuda_ops: fp8 activations of ", rows, " x ", in, " need ", fp8_scratch_bytes(rows * in),
                    " bytes of fp8 scratch, the state has ", fp8_scratch_bytes_);
      cuda::quantize_activations_fp8(x, rows * in, amax, sx, codes, stream_);
      x_quantized = true;
    }
    if (!x_quantized || !blas.linear_rows_fp8(codes, rows, in, reinterpret_cast<const std::uint8_t*>(w_rows.data()),
                                              nr, r0, y, n, count == 1 ? sw : nullptr, sx, stream_)) {
      ++blas.mutable_stats().fp8_fallback;
      if (!fp8_fallback_said_) {
        fp8_fallback_said_ = true;
        // Not quantized: the sm or K check above refused it, and no matmul was asked.
        const std::string why = x_quantized ? blas.fp8_unavailable_reason()
                                : blas.compute_capability() < 89 ? std::string("it needs sm_89 or newer")
                                                                 : std::string("K is not a multiple of 16");
        std::fprintf(stderr,
                     "unshard: fp8 activations: cuBLASLt's fp8 GEMM is unavailable for m=%zu n=%zu k=%zu on sm_%d: %s; "
                     "such GEMMs run weight-only fp8 (bf16/f32 GEMM over dequantized weights)\n",
                     rows, nr, in, blas.compute_capability(), why.c_str());
      }
      return false;
    }
    const float* bf = bias.empty() ? nullptr : widened_slice(bias, r0, nr);
    cuda::fp8_epilogue(y + r0, rows, nr, n, count == 1 ? nullptr : sw, count, bf, gelu, stream_);
    return true;
  }

  // An f8e4m3 chunk of nr rows x in dequantized to f32 into the widening scratch (f32 precision).
  const float* dequantized_f32(const tensor_view& w_rows, std::size_t nr, std::size_t in) {
    const auto [sw, count] = fp8_scales_of(w_rows, nr);
    if (widen_ == nullptr || nr * in > widen_floats_)
      throw_error("cuda_ops: an f8e4m3 weight chunk of ", nr * in, " elements needs ", nr * in,
                  " floats of widening scratch to dequantize it, the state has ", widen_floats_,
                  " (a model declares it with its cuda_options' fp8_weights)");
    cuda::dequantize_fp8_rows(reinterpret_cast<const std::uint8_t*>(w_rows.data()), nr, in, sw, count, widen_, stream_);
    ++gemm().mutable_stats().fp8_dequantized;
    return widen_;
  }

  bool uses_sdpa() const noexcept { return precision_ == cuda_precision::bf16; }

  // Attention with q, k, v rounded to bf16: the key segments are joined while they are rounded, so
  // the engine reads one K and one V; its bf16 output is widened into `out`.
  void attention_bf16(const float* q, std::size_t nq, kv_segment first, kv_segment second, std::size_t heads,
                      std::size_t head_dim, std::size_t groups, float* out) {
    const std::size_t w = heads * head_dim, nk = first.rows + second.rows;
    if (second.rows && groups != 1) throw_error("cuda_ops: grouped attention over two key segments");
    bf16* qb = narrow((2 * nq + 2 * nk) * w, "attention's q, k, v and output");
    bf16 *kb = qb + nq * w, *vb = kb + nk * w, *ob = vb + nk * w;
    cuda::convert(q, nq * w, qb, stream_);
    to_bf16(first.k, first.rows * w, kb);
    to_bf16(first.v, first.rows * w, vb);
    if (second.rows) {
      to_bf16(second.k, second.rows * w, kb + first.rows * w);
      to_bf16(second.v, second.rows * w, vb + first.rows * w);
    }
    if (engine_) {
      engine_->run(qb, nq, kb, vb, nk, heads, head_dim, groups, ob, stream_);
    } else {
      cuda::segmented_attention<bf16> a;
      a.q = qb;
      a.out = ob;
      a.queries = nq / groups;
      a.groups = groups;
      a.q_group_rows = nq / groups;
      a.seg[0] = {kb, vb, nk / groups, groups > 1 ? nk / groups : 0};
      a.heads = heads;
      a.d = head_dim;
      cuda::segmented_flash_attention(a, stream_);
    }
    cuda::convert(static_cast<const bf16*>(ob), nq * w, out, stream_);
  }

  // n values of r into bf16 dst: rounded from f32, or copied from a bf16 cache as they are.
  void to_bf16(kv_rows r, std::size_t n, bf16* dst) {
    if (n == 0) return;
    if (r.type == dtype::f32) return cuda::convert(r.f32(), n, dst, stream_);
    require_cache_type(r.type);
    UNSHARD_CUDA_CHECK(cudaMemcpyAsync(dst, r.data, n * sizeof(bf16), cudaMemcpyDeviceToDevice, stream_));
  }
  static void require_cache_type(dtype t) {
    if (t != dtype::bf16) throw_error("cuda_ops: a ", name_of(t), " KV cache is not supported (f32 or bf16)");
  }
  // Our f32 attention reads f32 rows: a bf16 cache goes with the bf16 precision (cuda_model pairs them).
  static void require_f32(const kv_segment& s, const char* op) {
    if (s.rows && (s.k.type != dtype::f32 || s.v.type != dtype::f32))
      throw_error("cuda_ops: ", op, " in f32 precision over a ", name_of(s.k.type == dtype::f32 ? s.v.type : s.k.type),
                  " KV cache (a bf16 cache needs the bf16 precision)");
  }

  bf16* narrow(std::size_t elems, const char* what) const {
    if (narrow_ == nullptr || elems > narrow_elems_)
      throw_error("cuda_ops: ", what, " need ", elems, " bf16 values of scratch, the state has ", narrow_elems_);
    return narrow_;
  }
  // A weight chunk of nr rows x in as bf16: in place when stored bf16, else rounded (f32, f16) or
  // dequantized (f8e4m3 codes with their scales) into the widening scratch.
  const bf16* narrowed(const tensor_view& t, std::size_t nr, std::size_t in) {
    const std::size_t n = nr * in;
    if (t.type() == dtype::bf16) return reinterpret_cast<const bf16*>(t.data());
    if (widen_ == nullptr || n > 2 * widen_floats_)
      throw_error("cuda_ops: a ", name_of(t.type()), " weight of ", n, " elements needs ", (n + 1) / 2,
                  " floats of scratch to round it to bf16, the state has ", widen_floats_,
                  t.type() == dtype::f8e4m3 ? " (a model declares it with its cuda_options' fp8_weights)" : "");
    bf16* dst = reinterpret_cast<bf16*>(widen_);
    if (t.type() == dtype::f8e4m3) {
      const auto [sw, count] = fp8_scales_of(t, nr);
      cuda::dequantize_fp8_rows(reinterpret_cast<const std::uint8_t*>(t.data()), nr, in, sw, count, dst, stream_);
      ++gemm().mutable_stats().fp8_dequantized;
      return dst;
    }
    visit_storage(t, [&](const auto* src) { cuda::convert(src, n, dst, stream_); });
    return dst;
  }

  // Calls f(r0, r1, row) for runs of tokens [r0, r1) that read the same modulation row.
  template <class F>
  static void for_each_modulation_group(std::size_t rows, modulation_rows m, F&& f) {
    const std::size_t per = m.tokens_per_row == 0 ? rows : m.tokens_per_row;
    for (std::size_t r0 = 0; r0 < rows; r0 += per) f(r0, std::min(rows, r0 + per), m.row_of(r0));
  }

  static void require_whole_grid(const char* op, const patch_grid& g, std::size_t tokens) {
    if (tokens != g.gf * g.gh * g.gw)
      throw_error(op, ": ", tokens, " tokens, the grid has ", g.gf * g.gh * g.gw, " (the device op covers whole grids)");
  }

  // The first n elements of t as f32 on the device: t itself when it is f32, else widened into the
  // scratch at `offset` floats.
  const float* widened(const tensor_view& t, std::size_t n, std::size_t offset) {
    if (t.type() == dtype::f32) return reinterpret_cast<const float*>(t.data());
    if (widen_ == nullptr || offset + n > widen_floats_)
      throw_error("cuda_ops: a ", name_of(t.type()), " weight of ", n, " elements needs ", offset + n,
                  " floats of widening scratch, the state has ", widen_floats_);
    visit_storage(t, [&](const auto* src) { cuda::convert(src, n, widen_ + offset, stream_); });
    return widen_ + offset;
  }
  // Entries [r0, r0 + n) of a 1-D parameter as f32: an f32 bias in place (blaslt copies a slice
  // that is not 16-byte aligned for its epilogue), a 16-bit one widened into the scratch's tail.
  const float* widened_slice(const tensor_view& t, std::size_t r0, std::size_t n) {
    const std::size_t tail = widen_floats_ >= n ? align_down(widen_floats_ - n) : 0;
    if (t.type() == dtype::f32) return reinterpret_cast<const float*>(t.data()) + r0;
    if (widen_ == nullptr || widen_floats_ < n)
      throw_error("cuda_ops: a ", name_of(t.type()), " bias of ", n, " entries needs widening scratch, the state has ",
                  widen_floats_);
    visit_storage(t, [&](const auto* src) { cuda::convert(src + r0, n, widen_ + tail, stream_); });
    return widen_ + tail;
  }
  static std::size_t align_down(std::size_t floats) { return floats / 4 * 4; }

  cudaStream_t stream_ = nullptr;
  float* widen_ = nullptr;
  std::size_t widen_floats_ = 0;
  void* workspace_ = nullptr;
  std::size_t workspace_bytes_ = 0;
  std::shared_ptr<cuda::blaslt> blas_;
  std::shared_ptr<bf16_attention_engine> engine_;
  cuda_precision precision_ = cuda_precision::f32;
  bf16* narrow_ = nullptr;
  std::size_t narrow_elems_ = 0;
  cuda::fp8_activations fp8_act_ = cuda::fp8_activations::none;
  std::byte* fp8_scratch_ = nullptr;
  std::size_t fp8_scratch_bytes_ = 0;
  bool fp8_fallback_said_ = false;
  std::shared_ptr<cuda_ops_detail::pinned_staging> staging_ = std::make_shared<cuda_ops_detail::pinned_staging>();
};

static_assert(op_set<cuda_ops>, "cuda_ops must implement every op of the op set");

}  // namespace unshard
