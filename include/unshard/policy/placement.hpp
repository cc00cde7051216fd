#pragma once
namespace unshard {

// Placement: where a rank's shards live between uses. Empty tags.
struct on_device {  // shards in device memory (the default, as FSDP)
  static constexpr bool offloaded = false;
  static constexpr const char* name = "device";
};
struct pinned_host {  // shards in page-locked host memory, copied to the device before their gather
  static constexpr bool offloaded = true;
  static constexpr const char* name = "pinned_host";
};

template <class W>
inline constexpr bool is_placement = false;
template <>
inline constexpr bool is_placement<on_device> = true;
template <>
inline constexpr bool is_placement<pinned_host> = true;

}  // namespace unshard
