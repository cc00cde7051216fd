// A policy written outside the library: keep the first M layers gathered for the whole run (they
// are small or hot), stream the rest one unit ahead. Nothing in runtime/ or plan/ changes: the
// policy fills the residency slot, compose<> merges it with prefetch<1>, and the ledger and the
// scheduler read the composed answers.
#include <cstdio>
#include <cstring>
#include <vector>

#include "toy_layer/toy_model.hpp"
#include "unshard/policy/compose.hpp"
#include "unshard/policy/prefetch.hpp"
#include "unshard/runtime/reference_forward.hpp"
#include "unshard/runtime/session.hpp"

template <std::size_t M>
struct keep_first_layers {
  static constexpr bool keeps_gathered(const unshard::unit_info& u) noexcept { return u.layer < M; }
};

using my_policy = unshard::compose<keep_first_layers<2>, unshard::prefetch<1>>;
static_assert(unshard::policy<my_policy>);
static_assert(my_policy::live_gathered_buffers == 2, "one unit computing, one in flight");

int main() {
  using namespace unshard;
  toy::toy_config c;
  c.layers = 6;
  c.dim = 160;
  const toy::toy_model m(c);
  const toy::toy_weights w(m);
  std::vector<float> x(c.tokens * c.dim, 0.25f), got, want;

  session_options opt;
  opt.world_size = 3;
  opt.policy = values_of<my_policy>();
  session<toy::toy_model> s(m, w, opt);
  for (int i = 0; i < 2; ++i)
    s.forward([&](std::size_t, toy::toy_state& st) { std::memcpy(st.x, x.data(), x.size() * 4); },
              [&](std::size_t r, const toy::toy_state& st) {
                if (r == 0) got.assign(st.x, st.x + x.size());
              });

  reference_runner<toy::toy_model> ref(m, w);
  std::memcpy(ref.state().x, x.data(), x.size() * 4);
  ref.forward();
  want.assign(ref.state().x, ref.state().x + x.size());

  std::size_t kept = 0;
  for (const auto& u : s.units()) kept += u.kept;
  const auto& terms = s.plan().ranks[0].terms;
  std::printf("policy %s: %zu of %zu units kept gathered; gathered=%zu bytes\n", opt.policy.name.c_str(), kept,
              s.units().size(), terms[memory_category::gathered]);
  for (std::size_t r = 0; r < opt.world_size; ++r)
    std::printf("rank %zu planned_peak_bytes=%zu measured_peak_bytes=%zu\n", r, s.plan().ranks[r].peak(),
                s.measured(r).peak_bytes);
  const bool same = std::memcmp(got.data(), want.data(), got.size() * 4) == 0;
  std::printf("sharded output %s the unsharded forward\n", same ? "equals" : "DIFFERS FROM");
  const bool peak_ok = s.measured(0).peak_bytes <= s.plan().ranks[0].peak();
  return same && peak_ok && kept == 2 ? 0 : 1;
}
