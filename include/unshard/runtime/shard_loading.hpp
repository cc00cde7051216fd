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

// Allocates and loads a rank's weights, unit by unit (shard, resident parameters, kept buffer),
// then the ring: the same terms the ledger adds up (plan/ledger.hpp), in that order. Shards go to
// host memory under offload, everything else to the device.
template <backend B, weight_source S>
unit_buffers load_unit_buffers(typename B::world& world, std::size_t rank, const S& weights,
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

}  // namespace unshard
