// expected-error: full_unshard keeps every unit gathered for the whole run; it combines with no other
#include "unshard/policy/compose.hpp"
#include "unshard/policy/full_unshard.hpp"
#include "unshard/policy/prefetch.hpp"
constexpr auto k = unshard::compose<unshard::full_unshard, unshard::prefetch<1>>::live_gathered_buffers;
int main() { return static_cast<int>(k); }
