#pragma once
// Time model of one DiT forward: per unit, compute time from FLOPs at a device's sustained rate and
// gather time from bytes at the link's bus bandwidth, overlapped when the policy prefetches.
// Profiles mirror data/profiles.json (users extend that file; these are its built-in defaults).
#include <algorithm>
#include <string>
#include <vector>

#include "unshard/core/error.hpp"

namespace unshard {

struct device_profile {
  std::string name;
  double sustained_flops = 0;  // dense bf16 FLOP/s reached by large GEMMs
  double link_bus_bytes_s = 0; // all-gather bus bandwidth between ranks
  double h2d_bytes_s = 0;      // pinned host-to-device copies (offload)
};

inline std::vector<device_profile> builtin_profiles() {
  // rtx4090: ~165 TFLOP/s dense bf16 peak, ~60% sustained; PCIe 4.0 x16 without P2P (through host
  // memory) ~ 12 GB/s bus bandwidth for NCCL all-gather. h100/h800: ~990 TFLOP/s peak, ~60%;
  // NVLink 4 (450 GB/s per direction; H800 400 -> bus ~ 200 GB/s after NVLink-C2C cut).
  return {{"rtx4090", 100e12, 12e9, 25e9}, {"h100", 600e12, 360e9, 25e9}, {"h800", 600e12, 160e9, 25e9}};
}

inline device_profile find_profile(const std::string& name) {
  for (const auto& p : builtin_profiles())
    if (p.name == name) return p;
  throw_error("unknown device profile '", name, "' (known: rtx4090, h100, h800)");
}

// One unit of the forward: what it computes and what must arrive before it can.
struct unit_cost {
  double flops = 0;
  double gather_bytes = 0;  // bytes each rank receives (full unit x (N-1)/N), 0 when kept
  double h2d_bytes = 0;     // shard bytes copied from host first (offload)
};

// prefetch 0: gather then compute, serially. prefetch K >= 1: the gather of unit i+1..i+K runs
// under the compute of unit i, so a unit costs max(compute, transfer) after the first transfer.
inline double forward_seconds(const std::vector<unit_cost>& units, const device_profile& d, std::size_t prefetch) {
  double t = 0;
  for (std::size_t i = 0; i < units.size(); ++i) {
    const double compute = units[i].flops / d.sustained_flops;
    const double transfer = units[i].gather_bytes / d.link_bus_bytes_s + units[i].h2d_bytes / d.h2d_bytes_s;
    t += (prefetch == 0 || i == 0) ? compute + transfer : std::max(compute, transfer);
  }
  return t;
}

}  // namespace unshard
