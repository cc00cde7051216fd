#pragma once
// cuDNN's fused SDPA as the bf16 attention engine of cuda_ops (kernels/cuda/sdpa.cuh: one graph per
// shape, cached). Include it only in the translation units that install it (the tools, the block
// benchmark): the cuDNN frontend headers cost minutes of nvcc each. Without the frontend
// (UNSHARD_HAVE_CUDNN_FRONTEND unset at configure time) sdpa.cuh runs our own kernel instead.
#include <cuda_runtime.h>

#include <cstddef>
#include <memory>

#include "unshard/kernels/cuda/sdpa.cuh"
#include "unshard/ops/cuda_ops.cuh"

namespace unshard {

class cudnn_attention final : public bf16_attention_engine {
 public:
  void run(const bf16* q, std::size_t queries, const bf16* k, const bf16* v, std::size_t keys, std::size_t heads,
           std::size_t head_dim, std::size_t groups, bf16* out, cudaStream_t stream) override {
    cuda::sdpa_bf16(cache_, q, queries, {k, v, keys}, {nullptr, nullptr, 0}, heads, head_dim, groups, out, 0.0f,
                    stream);
  }
  const char* last_impl() const override { return cache_.last_impl_name(); }
  void use_workspace(void* p, std::size_t bytes) override { cache_.use_planned_workspace(p, bytes); }
  const cuda::sdpa_plan_cache& cache() const noexcept { return cache_; }

 private:
  cuda::sdpa_plan_cache cache_;
};

// One engine per lane (its cuDNN handle is created on the lane's device at first use).
inline std::shared_ptr<bf16_attention_engine> make_cudnn_attention() { return std::make_shared<cudnn_attention>(); }

}  // namespace unshard
