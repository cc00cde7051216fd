#pragma once
// A rank's weight memory, allocated and loaded once before the first forward: its two arenas
// (device and host), each unit's shard and resident parameters, the buffers kept units are gathered
// into, and the ring of buffers the others take turns in. Nothing here runs during a forward.
#include <cstddef>
#include <string>
#include <vector>

#include "unshard/backend/backend.hpp"
#include "unshard/core/tracking_allocator.hpp"
#include "unshard/plan/ledger.hpp"
#include "unshard/plan/unit_layout.hpp"
#include "unshard/runtime/weight_source.hpp"

namespace unshard {

namespace detail {
inline std::string rank_owner(std::size_t rank) { return "rank " + std::to_string(rank) + " "; }
}  // namespace detail

// The rank's "device" memory: the backend's own where it has some (cudaMalloc), otherwise an arena
// over host memory, which is what the host backend's device is.
template <backend B>
tracking_allocator rank_device_memory(typename B::world& world, std::size_t rank, std::size_t bytes) {
  if constexpr (has_device_backing<B>)
    return tracking_allocator("device", bytes, detail::rank_owner(rank), B::device_backing(world, rank, bytes));
  else
    return tracking_allocator("device", bytes, detail::rank_owner(rank));
}

// The rank's host memory for offloaded shards: the backend's own where it has some (pinned, so
// copies to the device are asynchronous), otherwise plain host memory.
template <backend B>
tracking_allocator rank_host_memory(typename B::world& world, std::size_t rank, std::size_t bytes) {
  if constexpr (has_host_backing<B>)
    return tracking_allocator("host", bytes, detail::rank_owner(rank), B::host_backing(world, rank, bytes));
  else
    return tracking_allocator("host", bytes, detail::rank_owner(rank));
}

// Loads piece `piece` of `layout` into dst. A backend whose device memory the host cannot write
// (CUDA) gets the bytes through a host staging buffer and B::copy_to_device; `on_device` false
// (an offloaded shard, in host memory) and the host backends load in place.
template <backend B, weight_source S>
void load_piece(typename B::world& world, std::size_t rank, const S& weights, const flat_layout& layout,
                const std::vector<param_spec>& params, std::size_t piece, allocation& dst, bool on_device) {
  const std::size_t bytes = layout.shard_bytes();
  if constexpr (has_copy_to_device<B>) {
    if (on_device) {
      std::vector<std::byte> staging(bytes);
      load_shard(weights, layout, params, piece, staging.data());
      B::copy_to_device(world, rank, dst.data(), staging.data(), bytes);
      return;
    }
  }
  load_shard(weights, layout, params, piece, dst.data());
}

// Every weight buffer of a rank, per unit, fixed for the session. A unit always lands in the
// same gathered buffer: its own when kept, else ring slot ring_slot[u], given in forward order
// round-robin over the K+1 slots (chunked unshard uses the ring per chunk instead, and leaves
// ring_slot at -1).
struct unit_buffers {
  std::vector<allocation> shards, resident, gathered_own, ring;
  std::vector<int> ring_slot;

  std::byte* gathered(std::size_t u) const {
    return ring_slot[u] >= 0 ? ring[static_cast<std::size_t>(ring_slot[u])].data() : gathered_own[u].data();
  }
  bool in_ring(std::size_t u) const { return ring_slot[u] >= 0; }
  std::size_t slot_of(std::size_t u) const { return static_cast<std::size_t>(ring_slot[u]); }
};

// The fp8 policy's source over `weights`: every quantized weight of the layouts registered (the
// parameters with a scale, plan/unit_layout.hpp) with its scale parameter.
template <weight_source S>
void register_fp8_weights(fp8_weight_source<S>& q, const std::vector<unit_layout>& units) {
  for (const unit_layout& u : units) {
    const auto add = [&](const std::vector<param_spec>& params, const std::vector<std::size_t>& scales) {
      for (std::size_t i = 0; i < scales.size(); ++i)
        if (scales[i] != unit_layout::no_scale) q.add(params[i].name, params[i].dims, u.resident_params[scales[i]].name);
    };
    add(u.sharded_params, u.sharded_scale);
    add(u.resident_params, u.resident_scale);
  }
}

namespace detail {
template <backend B, weight_source S>
unit_buffers load_unit_buffers_from(typename B::world& world, std::size_t rank, const S& weights,
                                    const std::vector<unit_layout>& units, const policy_values& policy,
                                    tracking_allocator& device, tracking_allocator& host);
}  // namespace detail

// Allocates and loads a rank's weights, unit by unit (shard, resident parameters, kept buffer),
// then the ring: the same terms the ledger adds up (plan/ledger.hpp), in that order. Shards go to
// host memory under offload, everything else to the device. Under an fp8 policy the weights are
// read through an fp8_weight_source (quantized as each rank reads its shard), unless the caller
// passed one already (one source shared by the ranks of a process computes each weight's scales
// once instead of once per rank).
template <backend B, weight_source S>
unit_buffers load_unit_buffers(typename B::world& world, std::size_t rank, const S& weights,
                               const std::vector<unit_layout>& units, const policy_values& policy,
                               tracking_allocator& device, tracking_allocator& host) {
  if constexpr (!is_fp8_weight_source<S>) {
    if (policy.fp8) {
      fp8_weight_source<S> q(weights, policy.fp8_scaling);
      register_fp8_weights(q, units);
      return detail::load_unit_buffers_from<B>(world, rank, q, units, policy, device, host);
    }
  } else {
    if (policy.fp8 && weights.scaling() != policy.fp8_scaling)
      throw_error("policy ", policy.name, ": the fp8 weight source given scales per ", quant::name_of(weights.scaling()),
                  ", the policy per ", quant::name_of(policy.fp8_scaling));
    for (const unit_layout& u : units)
      for (std::size_t i = 0; i < u.sharded_scale.size() + u.resident_scale.size(); ++i) {
        const bool sharded = i < u.sharded_scale.size();
        const std::size_t k = sharded ? i : i - u.sharded_scale.size();
        const std::size_t scale = sharded ? u.sharded_scale[k] : u.resident_scale[k];
        const param_spec& p = sharded ? u.sharded_params[k] : u.resident_params[k];
        if (scale != unit_layout::no_scale && !weights.quantizes(p.name))
          throw_error("the fp8 weight source given does not quantize '", p.name,
                      "': register the policy's layouts with register_fp8_weights first");
      }
  }
  return detail::load_unit_buffers_from<B>(world, rank, weights, units, policy, device, host);
}

namespace detail {
template <backend B, weight_source S>
unit_buffers load_unit_buffers_from(typename B::world& world, std::size_t rank, const S& weights,
                                    const std::vector<unit_layout>& units, const policy_values& policy,
                                    tracking_allocator& device, tracking_allocator& host) {
  const std::size_t n = units.size();
  unit_buffers b;
  b.shards.resize(n);
  b.resident.resize(n);
  b.gathered_own.resize(n);
  for (std::size_t u = 0; u < n; ++u) {
    const unit_layout& ul = units[u];
    if (ul.sharded.shard_bytes()) {
      tracking_allocator& mem = policy.offload ? host : device;
      b.shards[u] = mem.allocate(ul.sharded.shard_bytes(), memory_category::shards);
      load_piece<B>(world, rank, weights, ul.sharded, ul.sharded_params, rank, b.shards[u], !policy.offload);
    }
    if (ul.resident.used_bytes()) {
      b.resident[u] = device.allocate(ul.resident.used_bytes(), memory_category::resident);
      load_piece<B>(world, rank, weights, ul.resident, ul.resident_params, 0, b.resident[u], true);
    }
    if (ul.kept && ul.gathered_bytes())
      b.gathered_own[u] = device.allocate(ul.gathered_bytes(), memory_category::gathered);
  }
  const ring_shape ring = ring_for(units, policy);
  for (std::size_t i = 0; i < ring.buffers; ++i) b.ring.push_back(device.allocate(ring.buffer_bytes, memory_category::gathered));
  b.ring_slot.assign(n, -1);
  if (!policy.chunked()) {
    std::size_t streamed = 0;
    for (std::size_t u = 0; u < n; ++u)
      if (!units[u].kept && units[u].gathered_bytes()) b.ring_slot[u] = static_cast<int>(streamed++ % ring.buffers);
  }
  return b;
}
}  // namespace detail

}  // namespace unshard
