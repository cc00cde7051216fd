#pragma once
#include <concepts>
#include <cstddef>
#include <cstdint>

#include "unshard/core/shape.hpp"
#include "unshard/core/tensor_view.hpp"
#include "unshard/layer/param_spec.hpp"

namespace unshard {

// How a layer's forward reads its parameters, so that one forward runs under every policy: on
// whole gathered views, and on weights that stream in chunks (chunked unshard).
//   p.dims(i)        the declared shape of parameter i
//   p.whole(i)       parameter i, whole; valid until the next call on p
//   p.rows(i, f)     calls f(view, r0, r1) for runs of whole rows [r0, r1) of parameter i, in order,
//                    covering every row once; each view is valid during its call only
// Under chunked unshard a sub-unit must read its streamed parameters in the order it declared
// them (the order their chunks arrive); 1-D parameters stay resident and may be read any time.
namespace detail {
// The callable a param_source's rows() is probed with. A named type, not a lambda: nvcc 13
// rejects lambdas inside a concept's requires-expression (the concept is then never satisfied).
struct rows_probe {
  void operator()(const tensor_view&, std::int64_t, std::int64_t) const {}
};
}  // namespace detail

template <class P>
concept param_source = requires(P& p, std::size_t i) {
  { p.dims(i) } -> std::convertible_to<shape>;
  { p.whole(i) } -> std::convertible_to<tensor_view>;
  p.rows(i, detail::rows_probe{});
};

// Every parameter gathered whole: rows() hands over all rows at once.
class whole_params {
 public:
  explicit whole_params(const param_views& v) noexcept : v_(v) {}
  const shape& dims(std::size_t i) const { return v_[i].dims(); }
  const tensor_view& whole(std::size_t i) const { return v_[i]; }
  template <class F>
  void rows(std::size_t i, F&& f) const {
    const tensor_view& t = v_[i];
    f(t, std::int64_t{0}, t.dims().rank() ? t.dims()[0] : std::int64_t{0});
  }
  const param_views& views() const noexcept { return v_; }

 private:
  const param_views& v_;
};
static_assert(param_source<whole_params>);

// A layer whose forward also runs over any param_source P (needed by chunked unshard).
template <class L, class State, class P>
concept streams_weights = param_source<P> && requires(const L& l, std::size_t sub, P& p, State& s) {
  l.forward(sub, p, s);
};

}  // namespace unshard
