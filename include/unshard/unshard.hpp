#pragma once
// unshard in one include: the host-side library a user programs against.
//
//   #include <unshard/unshard.hpp>     and link unshard::unshard (or unshard::blas for BLAS GEMMs)
//
// It includes the entry headers of each part; what they need comes with them. Left out on purpose:
// the CUDA headers (backend/cuda/, kernels/cuda/, models/wan/cuda/: .cuh files for nvcc, linked with
// unshard::cuda) and the headers that only implement the ones below (kernels/thread/, the models'
// per-layer forwards, runtime/rank_runtime.hpp, ...); include those by name where needed.

// core: version, dtypes, errors, tensor views, memory categories, size literals (64_MiB).
#include "unshard/core/config.hpp"
#include "unshard/core/dtype.hpp"
#include "unshard/core/error.hpp"
#include "unshard/core/memory_category.hpp"
#include "unshard/core/size_literals.hpp"
#include "unshard/core/tensor_view.hpp"

// layer: the layer<L, State> and model<M> concepts a model is written against, and what a layer's
// forward reads its weights through (param_source, linear_params: one GEMM, or one per chunk).
#include "unshard/kernels/host/linear_params.hpp"
#include "unshard/layer/layer.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/layer/param_source.hpp"
#include "unshard/layer/param_spec.hpp"

// policy: the parts composed at compile time, compose<>/values_of<>, and the policy strings.
#include "unshard/policy/chunked_unshard.hpp"
#include "unshard/policy/compose.hpp"
#include "unshard/policy/fp8_weights.hpp"
#include "unshard/policy/full_unshard.hpp"
#include "unshard/policy/granularity.hpp"
#include "unshard/policy/kv_placement.hpp"
#include "unshard/policy/offload.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/policy/placement.hpp"
#include "unshard/policy/policy_values.hpp"
#include "unshard/policy/prefetch.hpp"
#include "unshard/policy/selective_unshard.hpp"
#include "unshard/policy/unit_info.hpp"

// schedule and plan: replicated / steps; the units, the ledger (plan_memory), the time model.
#include "unshard/plan/ledger.hpp"
#include "unshard/plan/profiles.hpp"
#include "unshard/plan/time_model.hpp"
#include "unshard/plan/unit_layout.hpp"
#include "unshard/schedule/schedule.hpp"

// io: safetensors files and checkpoints (one file or an index.json), config.json reading.
#include "unshard/io/checkpoint.hpp"
#include "unshard/io/json_config.hpp"
#include "unshard/io/safetensors_file.hpp"
#include "unshard/io/safetensors_writer.hpp"

// quant: fp8 (e4m3) weights with per-tensor or per-channel scales.
#include "unshard/quant/fp8.hpp"

// runtime: sessions (ranks as threads, or this process as one rank of a launched job), weight
// sources (checkpoint, synthetic, LoRA merged at load), the unsharded reference.
#include "unshard/backend/backend.hpp"
#include "unshard/backend/link_model.hpp"
#include "unshard/backend/net/launch_env.hpp"
#include "unshard/runtime/checkpoint_weights.hpp"
#include "unshard/runtime/lora_weights.hpp"
#include "unshard/runtime/process_session.hpp"
#include "unshard/runtime/reference_forward.hpp"
#include "unshard/runtime/session.hpp"
#include "unshard/runtime/synthetic_weights.hpp"
#include "unshard/runtime/weight_source.hpp"

// models: the Wan DiT; Live Avatar's streaming S2V DiT, its stream and its denoising loop.
#include "unshard/models/liveavatar/config.hpp"
#include "unshard/models/liveavatar/denoiser.hpp"
#include "unshard/models/liveavatar/loop_inputs.hpp"
#include "unshard/models/liveavatar/model.hpp"
#include "unshard/models/liveavatar/sampler.hpp"
#include "unshard/models/liveavatar/stream.hpp"
#include "unshard/models/wan/config.hpp"
#include "unshard/models/wan/model.hpp"

// The planner of the Live Avatar stack (unshard-plan): its ledger and --policy auto.
#include "unshard/plan/liveavatar/ledger.hpp"
#include "unshard/plan/liveavatar/search.hpp"
