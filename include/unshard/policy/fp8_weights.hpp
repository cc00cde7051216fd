#pragma once
#include "unshard/quant/fp8_scaling.hpp"

namespace unshard {

// Store every 2-D GEMM weight (a layer's by_rows parameters of rank 2: nn.Linear weights) as f8e4m3
// codes plus f32 scales, converted while each rank loads its shard (LoRA merged first); shards,
// gathers and offloads then move 1 byte per weight element, half of bf16's. 1-D parameters (biases,
// norms), tables and convolution weights keep their storage dtype. Scales are one per output
// channel (the default, finer) or one per tensor (as Live Avatar's official --fp8).
// Fills the weight-format slot: it composes with every other part, full_unshard included.
template <quant::fp8_scaling Scaling = quant::fp8_scaling::per_channel>
struct fp8_weights {
  static constexpr quant::fp8_scaling weight_scaling = Scaling;
  static constexpr const char* policy_name = "fp8";
};

}  // namespace unshard
