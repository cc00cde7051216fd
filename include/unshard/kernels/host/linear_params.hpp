#pragma once
// y = x · Wᵀ + b with W and b read through a param_source: on whole views it is one GEMM; under
// chunked unshard each chunk of W's rows is multiplied as soon as it lands, its slice of the bias
// (resident) added in the same pass, and the chunk buffer goes back to the ring.
#include <cstddef>
#include <cstdint>
#include <limits>

#include "unshard/kernels/host/gemm.hpp"
#include "unshard/layer/param_source.hpp"

namespace unshard {

inline constexpr std::size_t no_param = std::numeric_limits<std::size_t>::max();

template <param_source P>
void linear_params(const float* x, std::size_t m, std::size_t k, P& params, std::size_t weight, std::size_t bias,
                   float* y, gemm_path path = gemm_path::portable) {
  const shape& wd = params.dims(weight);
  const std::size_t n = wd.rank() == 0 ? 0 : static_cast<std::size_t>(wd[0]);
  const tensor_view b = bias == no_param ? tensor_view{} : tensor_view(params.whole(bias));
  params.rows(weight, [&](const tensor_view& w_rows, std::int64_t r0, std::int64_t r1) {
    linear_rows(x, m, k, w_rows, b.empty() ? b : row_slice(b, r0, r1), static_cast<std::size_t>(r0), y, n, path);
  });
}

}  // namespace unshard
