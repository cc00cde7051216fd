#include <unshard/models/toy/toy_model.hpp>
#include <unshard/policy/compose.hpp>
#include <unshard/policy/prefetch.hpp>
#include <unshard/runtime/session.hpp>

int main() {
  unshard::toy::toy_config c;
  const unshard::toy::toy_model m(c);
  const unshard::toy::toy_weights w(m);
  unshard::session_options opt;
  opt.world_size = 2;
  opt.policy = unshard::values_of<unshard::prefetch<1>>();
  unshard::session<unshard::toy::toy_model> s(m, w, opt);
  s.forward([](std::size_t, unshard::toy::toy_state&) {}, [](std::size_t, const unshard::toy::toy_state&) {});
  return s.measured(0).peak_bytes <= s.plan().peak_bytes() ? 0 : 1;
}
