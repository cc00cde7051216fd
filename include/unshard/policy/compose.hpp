#pragma once
#include <concepts>
#include <cstddef>
#include <string>
#include <type_traits>

#include "unshard/policy/granularity.hpp"
#include "unshard/policy/placement.hpp"
#include "unshard/policy/policy_values.hpp"
#include "unshard/policy/unit_info.hpp"
#include "unshard/quant/fp8_scaling.hpp"

namespace unshard {

// A policy part fills one or more of seven slots, each with static members. Five say how weights
// are gathered:
//   granularity           `using granularity = per_block | per_subunit;`
//   prefetch              `static constexpr std::size_t prefetch_depth = K;`
//   placement             `using placement = on_device | pinned_host;`
//   residency             `static constexpr bool keeps_gathered(const unit_info&);`
//   resident threshold    `static constexpr std::size_t resident_below_bytes = N;`
// and two what is stored, independent of the gathering (they compose with full_unshard too):
//   weight format         `static constexpr quant::fp8_scaling weight_scaling = S;` (fp8_weights)
//   KV placement          `static constexpr bool kv_offloaded = B;` and
//                         `static constexpr std::size_t kv_prefetch_depth = K;` (kv_on_device, kv_offload)
// compose<Ps...> takes each slot from the one part that fills it and defaults the rest
// (per_block, no prefetch, on_device, nothing kept, parameters under 64 KiB resident, weights as the
// model declares them, KV caches on the device).
namespace detail {
template <class P> concept fills_granularity = requires { typename P::granularity; };
template <class P> concept fills_prefetch = requires { { P::prefetch_depth } -> std::convertible_to<std::size_t>; };
template <class P> concept fills_placement = requires { typename P::placement; };
template <class P> concept fills_residency = requires(const unit_info& u) { { P::keeps_gathered(u) } -> std::convertible_to<bool>; };
template <class P> concept fills_threshold = requires { { P::resident_below_bytes } -> std::convertible_to<std::size_t>; };
template <class P> concept fills_weight_format = requires { { P::weight_scaling } -> std::convertible_to<quant::fp8_scaling>; };
template <class P> concept fills_kv_placement = requires {
  { P::kv_offloaded } -> std::convertible_to<bool>;
  { P::kv_prefetch_depth } -> std::convertible_to<std::size_t>;
};
template <class P> concept is_exclusive = requires { requires P::exclusive; };

// Slots about gathering (full_unshard excludes every other part that fills one of these).
template <class P>
inline constexpr int gathering_slots_filled = int(fills_granularity<P>) + int(fills_prefetch<P>) +
                                              int(fills_placement<P>) + int(fills_residency<P>) +
                                              int(fills_threshold<P>);
template <class P>
inline constexpr int slots_filled = gathering_slots_filled<P> + int(fills_weight_format<P>) + int(fills_kv_placement<P>);

template <class P> struct granularity_of { using type = void; };
template <fills_granularity P> struct granularity_of<P> { using type = typename P::granularity; };
template <class P> struct placement_of { using type = void; };
template <fills_placement P> struct placement_of<P> { using type = typename P::placement; };

template <class Default, class... Ts> struct first_non_void { using type = Default; };
template <class Default, class T, class... Ts> struct first_non_void<Default, T, Ts...> {
  using type = std::conditional_t<std::is_void_v<T>, typename first_non_void<Default, Ts...>::type, T>;
};

template <class P> constexpr std::size_t prefetch_of() { if constexpr (fills_prefetch<P>) return P::prefetch_depth; else return 0; }
template <class P> constexpr std::size_t threshold_of() { if constexpr (fills_threshold<P>) return P::resident_below_bytes; else return 0; }
template <class P> constexpr int fp8_scaling_of() { if constexpr (fills_weight_format<P>) return int(P::weight_scaling) + 1; else return 0; }
template <class P> constexpr std::size_t kv_offload_of() { if constexpr (fills_kv_placement<P>) return P::kv_offloaded ? P::kv_prefetch_depth : 0; else return 0; }

template <class... Ps> struct residency_of { static constexpr bool (*fn)(const unit_info&) = nullptr; };
template <class P, class... Ps> struct residency_of<P, Ps...> {
  static constexpr bool (*fn)(const unit_info&) = [] {
    if constexpr (fills_residency<P>) return static_cast<bool (*)(const unit_info&)>(&P::keeps_gathered);
    else return residency_of<Ps...>::fn;
  }();
};
}  // namespace detail

// Satisfied by a type that fills at least one slot.
template <class P>
concept policy_part = detail::slots_filled<P> > 0;

template <class... Ps>
struct compose {
  static_assert(sizeof...(Ps) > 0, "compose<>: name at least one policy");
  static_assert((policy_part<Ps> && ...),
                "compose<...>: every argument must be a policy part: it sets granularity, prefetch_depth, "
                "placement, keeps_gathered or resident_below_bytes");
  static_assert((int(detail::fills_weight_format<Ps>) + ... + 0) <= 1,
                "compose<...>: two policies both set the weight format (fp8_weights twice?)");
  static_assert((int(detail::fills_kv_placement<Ps>) + ... + 0) <= 1,
                "compose<...>: two policies both set where the KV caches live");
  static_assert((int(detail::fills_granularity<Ps>) + ... + 0) <= 1,
                "compose<...>: two policies both set the granularity (e.g. two selective_unshard)");
  static_assert((int(detail::fills_prefetch<Ps>) + ... + 0) <= 1, "compose<...>: two policies both set the prefetch depth");
  static_assert((int(detail::fills_placement<Ps>) + ... + 0) <= 1, "compose<...>: two policies both set the placement (offload twice?)");
  static_assert((int(detail::fills_residency<Ps>) + ... + 0) <= 1,
                "compose<...>: two policies both decide which units stay gathered");
  static_assert((int(detail::fills_threshold<Ps>) + ... + 0) <= 1,
                "compose<...>: two policies both set the resident-parameter threshold");
  static_assert(!(detail::is_exclusive<Ps> || ...) || (int(detail::gathering_slots_filled<Ps> > 0) + ... + 0) == 1,
                "compose<...>: full_unshard keeps every unit gathered for the whole run; it combines with no other "
                "gathering policy (there is nothing to prefetch, offload or select; fp8_weights and the KV "
                "placement do combine with it)");

  using granularity = typename detail::first_non_void<per_block, typename detail::granularity_of<Ps>::type...>::type;
  static_assert(!is_chunk_granularity<granularity> || (int(detail::fills_residency<Ps>) + ... + 0) == 0,
                "compose<...>: chunked unshard streams every unit chunk by chunk; it does not combine with a policy "
                "that keeps whole units gathered");
  using placement = typename detail::first_non_void<on_device, typename detail::placement_of<Ps>::type...>::type;
  static constexpr std::size_t prefetch_depth = (detail::prefetch_of<Ps>() + ... + 0);
  static constexpr bool full = (detail::is_exclusive<Ps> || ...);
  static constexpr std::size_t resident_below_bytes =
      (int(detail::fills_threshold<Ps>) + ... + 0) ? (detail::threshold_of<Ps>() + ... + 0) : (full ? 0 : 64 * 1024);
  static constexpr bool (*keeps_gathered_fn)(const unit_info&) = detail::residency_of<Ps...>::fn;
  static constexpr bool keeps_gathered(const unit_info& u) { return full || (keeps_gathered_fn && keeps_gathered_fn(u)); }

  // What is stored: fp8 weights (and their scaling), the KV caches' placement.
  static constexpr bool fp8 = (int(detail::fills_weight_format<Ps>) + ... + 0) == 1;
  static constexpr quant::fp8_scaling weight_scaling =
      fp8 ? quant::fp8_scaling((detail::fp8_scaling_of<Ps>() + ... + 0) - 1) : quant::fp8_scaling::per_channel;
  static constexpr bool kv_offloaded = (detail::kv_offload_of<Ps>() + ... + 0) > 0;
  static constexpr std::size_t kv_prefetch_depth = kv_offloaded ? (detail::kv_offload_of<Ps>() + ... + 0) : 1;

  // Gathered buffers that rotate among the units not kept: the current one plus those in flight.
  static constexpr std::size_t live_gathered_buffers = full ? 0 : prefetch_depth + 1;
};

// A composed policy: what the scheduler and ledger accept.
template <class P>
concept policy = requires(const unit_info& u) {
  typename P::granularity;
  typename P::placement;
  { P::prefetch_depth } -> std::convertible_to<std::size_t>;
  { P::resident_below_bytes } -> std::convertible_to<std::size_t>;
  { P::live_gathered_buffers } -> std::convertible_to<std::size_t>;
  { P::keeps_gathered(u) } -> std::convertible_to<bool>;
} && is_granularity<typename P::granularity> && is_placement<typename P::placement>;

// A single policy part used alone is composed with the defaults.
template <class P>
using as_policy = std::conditional_t<policy<P>, P, compose<P>>;

// Lowers a composed policy to the values the scheduler reads (see policy_values.hpp for why).
template <class P>
policy_values values_of() {
  using C = as_policy<P>;
  static_assert(policy<C>, "values_of<P>: P is not a policy (see the policy concept in policy/compose.hpp)");
  policy_values v;
  v.full = C::full;
  v.granularity = std::is_same_v<typename C::granularity, per_subunit> ? unshard_granularity::subunit
                                                                        : unshard_granularity::block;
  if constexpr (is_chunk_granularity<typename C::granularity>) {
    v.granularity = unshard_granularity::chunk;
    v.chunk_bytes = C::granularity::chunk_bytes;
  }
  v.prefetch_depth = C::prefetch_depth;
  v.offload = C::placement::offloaded;
  v.resident_below_bytes = C::resident_below_bytes;
  v.keeps_gathered = C::full ? nullptr : C::keeps_gathered_fn;
  if constexpr (requires { C::fp8; C::weight_scaling; }) {
    v.fp8 = C::fp8;
    v.fp8_scaling = C::weight_scaling;
  }
  if constexpr (requires { C::kv_offloaded; C::kv_prefetch_depth; }) {
    v.kv_offload = C::kv_offloaded;
    v.kv_prefetch = C::kv_prefetch_depth;
  }
  if (v.full) {
    v.name = "full";
  } else {
    v.name = v.chunked() ? "chunked:" + std::to_string(v.chunk_bytes) : std::string("selective:") + C::granularity::name;
    if (v.prefetch_depth) v.name += "+prefetch:" + std::to_string(v.prefetch_depth);
    if (v.offload) v.name += "+offload";
    if (v.keeps_gathered) v.name += "+custom";
  }
  v.name += v.storage_terms();
  return v;
}

}  // namespace unshard
