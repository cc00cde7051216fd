// expected-error: chunked unshard streams every unit chunk by chunk; it does not combine with a policy that keeps whole units gathered
#include "unshard/policy/chunked_unshard.hpp"
#include "unshard/policy/compose.hpp"

struct keep_first_layer {
  static constexpr bool keeps_gathered(const unshard::unit_info& u) noexcept { return u.layer == 0; }
};

int main() { return static_cast<int>(unshard::compose<unshard::chunked<4096>, keep_first_layer>::prefetch_depth); }
