#pragma once
#include <cstddef>

namespace unshard {

// A simulated interconnect: every collective takes latency + bytes_received / bandwidth on top of
// its memcpy. Zero means "as fast as memory". Used to test and measure prefetch overlap.
struct link_model {
  double latency_s = 0.0;
  double bytes_per_s = 0.0;  // 0: no bandwidth term

  double seconds_for(std::size_t bytes) const noexcept {
    return latency_s + (bytes_per_s > 0 ? static_cast<double>(bytes) / bytes_per_s : 0.0);
  }
};

}  // namespace unshard
