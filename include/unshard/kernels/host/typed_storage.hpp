#pragma once
// From a tensor_view of parameters to the typed pointer a thread kernel takes.
#include <type_traits>

#include "unshard/core/dtype.hpp"
#include "unshard/core/error.hpp"
#include "unshard/core/tensor_view.hpp"

namespace unshard {

// The view's data as const T*; throws if the view does not hold T (never reinterprets bf16 as f32).
template <class T>
const T* typed_data(const tensor_view& v) {
  if (v.type() != dtype_of<T>::value)
    throw_error("tensor of shape ", v.dims().to_string(), " holds ", name_of(v.type()), ", expected ",
                name_of(dtype_of<T>::value));
  return reinterpret_cast<const T*>(v.data());
}

// Calls f(const T*) with T = float, bf16 or f16 as the view's dtype says: one switch per tensor,
// then a kernel instantiated for that storage type. f8e4m3 is not one of them (its codes need the
// tensor's scales, which a view does not carry): an f8e4m3 view throws, naming the dtype.
template <class F>
decltype(auto) visit_storage(const tensor_view& v, F&& f) {
  switch (v.type()) {
    case dtype::bf16: return f(reinterpret_cast<const bf16*>(v.data()));
    case dtype::f16: return f(reinterpret_cast<const f16*>(v.data()));
    case dtype::f8e4m3:
      throw_error("tensor of shape ", v.dims().to_string(),
                  " holds f8e4m3 codes: f8e4m3 weights are not supported by this kernel yet (it widens f32, bf16 "
                  "or f16 storage; fp8 codes need their scales, see unshard/quant/fp8.hpp)");
    case dtype::f32: break;
  }
  return f(reinterpret_cast<const float*>(v.data()));
}

}  // namespace unshard
