// expected-error: the model's state is read in a memory space this backend does not allocate in
#include "unshard/backend/host/host_backend.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/runtime/session.hpp"
// A model whose state lives in CUDA device memory (its forward runs kernels on it), run on the host
// backend, whose "device" is host memory: refused at compile time, not a crash at the first layer.
struct device_state {
  using memory_space = unshard::cuda_device_memory;
};
struct kernel_layer {
  std::string name() const { return "l"; }
  std::size_t subunit_count() const { return 1; }
  std::string subunit_name(std::size_t) const { return "s"; }
  std::vector<unshard::param_spec> parameters(std::size_t) const { return {}; }
  void forward(std::size_t, const unshard::param_views&, device_state&) const {}
};
struct device_model {
  using state = device_state;
  std::size_t layer_count() const { return 1; }
  const kernel_layer& layer(std::size_t) const { return l_; }
  std::vector<unshard::buffer_spec> buffers() const { return {}; }
  device_state make_state(const unshard::buffer_set&) const { return {}; }
  kernel_layer l_;
};
static_assert(unshard::model<device_model>);
int main() { return sizeof(unshard::rank_runtime<device_model, unshard::host_backend>) > 0 ? 0 : 1; }
