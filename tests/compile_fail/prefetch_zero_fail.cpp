// expected-error: prefetch<K>: K is the number of units in flight ahead of compute and must be >= 1
#include "unshard/policy/prefetch.hpp"
constexpr auto k = unshard::prefetch<0>::prefetch_depth;
int main() { return static_cast<int>(k); }
