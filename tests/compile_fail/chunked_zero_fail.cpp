// expected-error: chunked_unshard<Bytes>: the chunk size must be at least 1 byte
#include "unshard/policy/chunked_unshard.hpp"
#include "unshard/policy/compose.hpp"

int main() { return static_cast<int>(unshard::compose<unshard::chunked<0>>::prefetch_depth); }
