#pragma once
// fp8 (f8e4m3) weights on the device: the kernels around the GEMMs of ops/cuda_ops.cuh's fp8 paths.
//
//  * dequantize_fp8_rows: weight codes [rows, cols] with their scales (1, or one per row; device
//    memory) to bf16 or f32, value = f32(e4m3(code) * scale), rounded once to bf16 (RNE) for a bf16
//    target: exactly quant::dequantize_rows' values (f32), or those values rounded to bf16. 16 codes
//    per thread (one 16-byte load, 2 or 4 16-byte stores) when the rows are a multiple of 16 wide and
//    the pointers 16-byte aligned; element by element otherwise. This is weight-only fp8: the GEMM
//    then runs on bf16 (or f32) tensor-core/SIMT paths, the codes having halved the bytes gathered.
//  * quantize_activations_fp8: per-tensor activation quantization (the official path): the amax of
//    x (a grid-wide max over f32 bit patterns, atomicMax: exact and order-free), then every code from
//    that amax; kernels/thread/fp8_activation.hpp's functions, the host reference's (bit-identical).
//    The scale lands in a device f32, the fp8 GEMM's B scale pointer: no host round trip.
//  * fp8_epilogue: y[:, j] = act(y[:, j] * col_scale[j] + b[j]) over output columns of the fp8 GEMM:
//    the per-channel weight scale (it factors out of the sum over k), the bias and the host's exact
//    GELU-tanh in one pass.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "unshard/kernels/cuda/common.cuh"
#include "unshard/kernels/thread/activation.hpp"
#include "unshard/kernels/thread/fp8_activation.hpp"

namespace unshard::cuda {

// How a GEMM over fp8 weights treats its input activations (cuda_ops::set_fp8_activations).
enum class fp8_activations : std::uint8_t {
  none,        // weight-only fp8: codes dequantized to bf16/f32, the bf16/f32 GEMM (the default)
  per_tensor,  // the official path: x quantized to e4m3 with one scale, e4m3 x e4m3 on fp8 tensor cores
};

inline const char* name_of(fp8_activations a) noexcept { return a == fp8_activations::per_tensor ? "tensor" : "none"; }

namespace fp8_detail {

inline constexpr unsigned threads = 256;

template <class T, bool Vec>
__global__ void dequantize_kernel(const std::uint8_t* codes, std::size_t n, std::size_t cols, const float* scales,
                                  bool per_row, T* out) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  const std::size_t first = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if constexpr (Vec) {
    for (std::size_t v = first; v < n / 16; v += stride) {
      const std::size_t i = v * 16;  // 16 codes of one row (cols is a multiple of 16)
      const float s = scales[per_row ? i / cols : 0];
      alignas(16) std::uint8_t c[16];
      *reinterpret_cast<uint4*>(c) = *reinterpret_cast<const uint4*>(codes + i);
      float f[16];
#pragma unroll
      for (int j = 0; j < 16; ++j) f[j] = e4m3_bits_to_float(c[j]) * s;
#pragma unroll
      for (unsigned h = 0; h < 16 / vec_elems<T>; ++h) store_vec<T>(out + i + h * vec_elems<T>, f + h * vec_elems<T>);
    }
  } else {
    for (std::size_t i = first; i < n; i += stride)
      out[i] = from_f32<T>(e4m3_bits_to_float(codes[i]) * scales[per_row ? i / cols : 0]);
  }
}

template <int = 0>
__global__ void amax_kernel(const float* x, std::size_t n, std::uint32_t* amax_bits) {
  std::uint32_t m = 0;
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const std::uint32_t b = fp8_abs_bits(x[i]);
    m = b > m ? b : m;
  }
  for (int o = warp_size / 2; o > 0; o /= 2) {
    const std::uint32_t other = __shfl_xor_sync(0xffffffffu, m, o);
    m = other > m ? other : m;
  }
  if (threadIdx.x % warp_size == 0 && m != 0) atomicMax(amax_bits, m);
}

template <bool Vec>
__global__ void quantize_kernel(const float* x, std::size_t n, const std::uint32_t* amax_bits, std::uint8_t* codes,
                                float* scale_out) {
  const float s = fp8_activation_scale(*amax_bits);
  const std::size_t first = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (first == 0) *scale_out = s;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  if constexpr (Vec) {
    for (std::size_t v = first; v < n / 16; v += stride) {
      alignas(16) std::uint8_t c[16];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float4 f = *reinterpret_cast<const float4*>(x + v * 16 + 4 * q);
        c[4 * q + 0] = fp8_activation_code(f.x, s);
        c[4 * q + 1] = fp8_activation_code(f.y, s);
        c[4 * q + 2] = fp8_activation_code(f.z, s);
        c[4 * q + 3] = fp8_activation_code(f.w, s);
      }
      *reinterpret_cast<uint4*>(codes + v * 16) = *reinterpret_cast<const uint4*>(c);
    }
  } else {
    for (std::size_t i = first; i < n; i += stride) codes[i] = fp8_activation_code(x[i], s);
  }
}

// Rows over blockIdx.y, columns over x: no 64-bit division per element.
template <int = 0>
__global__ void epilogue_kernel(float* y, std::size_t m, std::size_t n, std::size_t ldy, const float* col_scale,
                                bool per_column, const float* bias, bool gelu) {
  for (std::size_t r = blockIdx.y; r < m; r += gridDim.y) {
    float* row = y + r * ldy;
    for (std::size_t j = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; j < n;
         j += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
      float v = row[j];
      // Two roundings (the product, then the sum), as the host computes the same epilogue: no FMA
      // contraction (nvcc would otherwise fuse them into one fmaf).
      if (col_scale) v = __fmul_rn(v, col_scale[per_column ? j : 0]);
      if (bias) v = __fadd_rn(v, bias[j]);
      row[j] = gelu ? unshard::gelu_tanh(v) : v;
    }
  }
}

}  // namespace fp8_detail

// out[rows * cols] (bf16 or f32) = the codes [rows, cols] dequantized with `scales` (device memory:
// `scale_count` = 1 for one scale, or `rows`, one per row, for the rows given).
template <storage_type T>
void dequantize_fp8_rows(const std::uint8_t* codes, std::size_t rows, std::size_t cols, const float* scales,
                         std::size_t scale_count, T* out, cudaStream_t stream) {
  static_assert(!std::is_same_v<T, f16>, "fp8 weights dequantize to bf16 or f32");
  const std::size_t n = rows * cols;
  if (n == 0) return;
  if (scales == nullptr || (scale_count != 1 && scale_count != rows))
    throw_error("dequantize_fp8_rows: ", rows, " rows need 1 or ", rows, " scales, got ", scale_count);
  const bool per_row = scale_count != 1;
  if (cols % 16 == 0 && aligned16(codes) && aligned16(out)) {
    UNSHARD_LAUNCH(blocks_for(n / 16, fp8_detail::threads), fp8_detail::threads, stream,
                   fp8_detail::dequantize_kernel<T, true>)(codes, n, cols, scales, per_row, out);
  } else {
    UNSHARD_LAUNCH(blocks_for(n, fp8_detail::threads), fp8_detail::threads, stream,
                   fp8_detail::dequantize_kernel<T, false>)(codes, n, cols, scales, per_row, out);
  }
  check_launch("dequantize_fp8_rows");
}

// Per-tensor e4m3 codes of x[n] into `codes`, the scale into *scale (device), using *amax_bits
// (device, one word) as scratch. Enqueued on `stream`; nothing read back.
inline void quantize_activations_fp8(const float* x, std::size_t n, std::uint32_t* amax_bits, float* scale,
                                     std::uint8_t* codes, cudaStream_t stream) {
  if (n == 0) return;
  UNSHARD_CUDA_CHECK(cudaMemsetAsync(amax_bits, 0, sizeof(std::uint32_t), stream));
  UNSHARD_LAUNCH(blocks_for(n, fp8_detail::threads, 1024), fp8_detail::threads, stream,
                 fp8_detail::amax_kernel<>)(x, n, amax_bits);
  check_launch("fp8 activation amax");
  if (n % 16 == 0 && aligned16(x) && aligned16(codes)) {
    UNSHARD_LAUNCH(blocks_for(n / 16, fp8_detail::threads), fp8_detail::threads, stream,
                   fp8_detail::quantize_kernel<true>)(x, n, amax_bits, codes, scale);
  } else {
    UNSHARD_LAUNCH(blocks_for(n, fp8_detail::threads), fp8_detail::threads, stream,
                   fp8_detail::quantize_kernel<false>)(x, n, amax_bits, codes, scale);
  }
  check_launch("fp8 activation quantize");
}

// Columns [0, n) of y [m, ldy] (y points at the first column): y = act(y * col_scale + bias);
// col_scale null (none), one value, or n values (scale_count); bias null or n f32 values.
inline void fp8_epilogue(float* y, std::size_t m, std::size_t n, std::size_t ldy, const float* col_scale,
                         std::size_t scale_count, const float* bias, bool gelu, cudaStream_t stream) {
  if (m * n == 0 || (!col_scale && !bias && !gelu)) return;
  const dim3 grid(blocks_for(n, fp8_detail::threads), static_cast<unsigned>(m < 65535 ? m : 65535));
  UNSHARD_LAUNCH(grid, fp8_detail::threads, stream,
                 fp8_detail::epilogue_kernel<>)(y, m, n, ldy, col_scale, scale_count != 1, bias, gelu);
  check_launch("fp8 epilogue");
}

}  // namespace unshard::cuda
