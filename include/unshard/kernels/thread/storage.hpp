#pragma once
// Widening one stored element to the f32 that every kernel computes in.
//
// Kernels take parameters in their storage type (f32, bf16, f16) as typed pointers and call
// to_f32 per element: an overload, not a dtype switch, so a kernel instantiated for bf16 weights
// carries no per-element branch, on the host or in a CUDA kernel.
#include "unshard/core/config.hpp"
#include "unshard/core/dtype.hpp"

namespace unshard {

UNSHARD_HD float to_f32(float v) { return v; }
UNSHARD_HD float to_f32(bf16 v) { return v.to_float(); }
UNSHARD_HD float to_f32(f16 v) { return v.to_float(); }

}  // namespace unshard
