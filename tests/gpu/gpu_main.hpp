#pragma once
// Shared by the GPU tests: how many devices a test executable needs. gpu_main.cpp skips the whole
// executable (exit 77, "Skipped" in ctest) when fewer are usable, so a test never passes by not
// running. A multi-GPU test file declares its need at namespace scope:
//   static const bool needs_two = unshard::test::require_devices(2);

namespace unshard::test {

inline int& required_devices() {
  static int n = 1;
  return n;
}
inline bool require_devices(int n) {
  if (n > required_devices()) required_devices() = n;
  return true;
}

}  // namespace unshard::test
