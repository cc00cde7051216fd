// expected-error: every argument must be a policy part
#include "unshard/policy/compose.hpp"
struct not_a_policy {};
constexpr auto k = unshard::compose<not_a_policy>::prefetch_depth;
int main() { return static_cast<int>(k); }
