#pragma once
#include <cstddef>

namespace unshard {

// Where the KV caches live (issue 15 item 2). Lowered into policy_values (kv_offload, kv_prefetch);
// the runtime does not act on it yet. Fills the KV-placement slot: it composes with every other part.
struct kv_on_device {  // `kv:device`, the default: every cache a rank holds is in device memory
  static constexpr bool kv_offloaded = false;
  static constexpr std::size_t kv_prefetch_depth = 1;
  static constexpr const char* policy_name = "kv:device";
};

// `kv:offload:K`: the caches live in host memory and each layer's cache is brought in K layers
// ahead of the layer that attends to it.
template <std::size_t K = 1>
struct kv_offload {
  static_assert(K >= 1, "kv_offload<K>: K is the number of layers whose caches are prefetched ahead; it must be >= 1");
  static constexpr bool kv_offloaded = true;
  static constexpr std::size_t kv_prefetch_depth = K;
  static constexpr const char* policy_name = "kv:offload";
};

}  // namespace unshard
