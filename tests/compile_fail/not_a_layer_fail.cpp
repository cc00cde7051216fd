// expected-error: layer<typename std::remove_cvref<decltype (m.layer(i))>::type, typename M::state>
#include "unshard/layer/model.hpp"
#include "unshard/runtime/session.hpp"
// A "model" whose layer has no forward: the session refuses it at the concept check.
struct st {};
struct half_layer {
  std::string name() const { return "l"; }
  std::size_t subunit_count() const { return 1; }
  std::string subunit_name(std::size_t) const { return "s"; }
  std::vector<unshard::param_spec> parameters(std::size_t) const { return {}; }
};
struct bad_model {
  using state = st;
  std::size_t layer_count() const { return 1; }
  const half_layer& layer(std::size_t) const { return l_; }
  std::vector<unshard::buffer_spec> buffers() const { return {}; }
  st make_state(const unshard::buffer_set&) const { return {}; }
  half_layer l_;
};
static_assert(unshard::model<bad_model>, "bad_model must satisfy unshard::model");
int main() {}
