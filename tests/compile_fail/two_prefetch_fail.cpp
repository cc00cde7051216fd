// expected-error: two policies both set the prefetch depth
#include "unshard/policy/compose.hpp"
#include "unshard/policy/prefetch.hpp"
constexpr auto k = unshard::compose<unshard::prefetch<1>, unshard::prefetch<2>>::prefetch_depth;
int main() { return static_cast<int>(k); }
