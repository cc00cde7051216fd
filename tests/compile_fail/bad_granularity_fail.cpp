// expected-error: G must be a granularity tag (per_block or per_subunit)
#include "unshard/policy/selective_unshard.hpp"
using p = unshard::selective_unshard<int>;
int main() { return static_cast<int>(p::resident_below_bytes); }
