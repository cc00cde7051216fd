#pragma once
// A parameter's declaration and the views of a sub-unit's parameters: plain data over core types,
// here so that core/flat_layout.hpp (which lays parameters out) includes nothing above core/.
// layer/param_spec.hpp forwards here for the layer-side includers.
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "unshard/core/dtype.hpp"
#include "unshard/core/shape.hpp"
#include "unshard/core/tensor_view.hpp"

namespace unshard {

// One parameter as a layer declares it: its checkpoint name, shape and storage dtype, and whether
// the layer consumes it row by row (a GEMM weight: output rows are independent) or only whole (a
// modulation table, a mask). Chunked unshard cuts only the former into runs of rows; the latter
// stay resident under it, like 1-D parameters.
struct param_spec {
  std::string name;
  shape dims;
  dtype type = dtype::f32;
  bool by_rows = true;

  std::size_t bytes() const { return static_cast<std::size_t>(dims.numel()) * size_of(type); }
};

// Whether a view holds a parameter declared with storage dtype `declared`: that dtype, or, for a GEMM
// weight the layer consumes by rows (by_rows), f8e4m3 codes that carry their scales (the `fp8`
// policy stores such weights quantized; docs/design.md, fp8 weights). What a layer's parameter
// check accepts.
inline bool holds_declared_type(const tensor_view& v, dtype declared, bool by_rows) noexcept {
  return v.type() == declared || (by_rows && v.type() == dtype::f8e4m3 && v.has_scales());
}

// Views of one sub-unit's parameters, in the order the layer declared them. They point into the
// gathered flat buffer or the resident buffer: the layer never sees where the bytes came from.
class param_views {
 public:
  param_views() = default;
  explicit param_views(std::vector<tensor_view> views) : views_(std::move(views)) {}

  const tensor_view& operator[](std::size_t i) const { return views_[i]; }
  std::size_t size() const noexcept { return views_.size(); }
  auto begin() const noexcept { return views_.begin(); }
  auto end() const noexcept { return views_.end(); }

 private:
  std::vector<tensor_view> views_;
};

}  // namespace unshard
