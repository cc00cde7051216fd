#pragma once
#include <algorithm>
#include <string>
#include <string_view>
#include <vector>

#include "unshard/io/checkpoint.hpp"
#include "unshard/layer/model.hpp"
#include "unshard/runtime/weight_source.hpp"

namespace unshard {

// A safetensors checkpoint (one file or an index.json) as a weight_source: ranks read their shard's
// byte ranges straight from the mapped files.
class checkpoint_weights {
 public:
  explicit checkpoint_weights(const checkpoint& c) : c_(c) {}

  stored_tensor describe(std::string_view name) const {
    const tensor_info* t = c_.find(name);
    if (!t) throw_error(c_.path(), ": missing tensor '", name, "' (the model needs it)");
    if (!t->type)
      throw_error(c_.path(), ": tensor '", name, "' has dtype ", t->dtype_name, "; weights must be F32, BF16, F16 or F8_E4M3");
    return {*t->type, t->dims};
  }
  void read(std::string_view name, std::uint64_t offset, std::span<std::byte> dst) const { c_.read(name, offset, dst); }
  std::string origin() const { return c_.path(); }

 private:
  const checkpoint& c_;
};

// Tensors of the checkpoint that the model does not declare, skipping the names a caller ignores
// (the public vectors keep inputs and references in the weights file under "input." and "ref.").
// An fp8 checkpoint's scale tensors ("<weight>.scale", "<weight>_scale" of a 2-D GEMM weight the
// model declares) belong to their weights and are not unknown.
template <model M>
std::vector<std::string> unknown_tensors(const M& m, const checkpoint& c, const std::vector<std::string>& ignore_prefixes) {
  std::vector<std::string> declared;
  for (std::size_t l = 0; l < m.layer_count(); ++l)
    for (std::size_t s = 0; s < m.layer(l).subunit_count(); ++s)
      for (const param_spec& p : m.layer(l).parameters(s)) {
        declared.push_back(p.name);
        if (p.by_rows && p.dims.rank() == 2) {
          declared.push_back(p.name + ".scale");
          declared.push_back(p.name + "_scale");
        }
      }
  std::sort(declared.begin(), declared.end());
  std::vector<std::string> unknown;
  for (const std::string& n : c.names()) {
    bool ignored = false;
    for (const auto& pre : ignore_prefixes) ignored = ignored || n.starts_with(pre);
    if (!ignored && !std::binary_search(declared.begin(), declared.end(), n)) unknown.push_back(n);
  }
  return unknown;
}

}  // namespace unshard
