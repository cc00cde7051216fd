// The Wan block's CUDA kernels at Wan 14B widths (D = 5120, 40 heads of 128, FFN 13824):
//  * row and elementwise kernels: achieved DRAM bandwidth (bytes each must move / time) against
//    the card's peak, 2 x memory clock x bus width, queried from the device;
//  * attention and GEMMs: TFLOP/s against a stated peak -- the FP32 CUDA-core peak
//    (SMs x 128 lanes x 2 x boost clock) for the f32 kernels (f32 GEMMs use CUBLAS_COMPUTE_32F, no
//    TF32), the dense BF16 tensor-core peak with f32 accumulation for the bf16 GEMMs and the bf16
//    attention (the target the issue sets: a bf16 attention at 50 % of it, whatever kernel runs).
//    That peak comes from NVIDIA's datasheets for the cards in bf16_peak_table (dense, no
//    sparsity, f32 accumulate: RTX 4090 165.2 TFLOP/s -- GeForce Ada halves f32-accumulate
//    throughput against f16 accumulate, 330.3, but not to 82.6, which the earlier per-SM figure of
//    256 flop/clock gave -- H100 SXM and H200 989.4, ...); other cards: SMs x flop per SM and clock
//    (sm_80 2048, sm_89 512, sm_90 4096) x the reported boost clock, marked "estimate" in the CSV.
// Every figure is the median of 9 timed runs (one warm-up first), each timed with CUDA events on
// one stream. Results go to benchmarks/results/gpu_kernels.csv (or the path in argv[1]).
//
// Usage: bench_gpu_kernels [OUT.csv] [--tokens S]   (S defaults to 32760: 21x30x52, Wan 14B at 832x480)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "unshard/backend/cuda/check.cuh"
#include "unshard/kernels/cuda/attention.cuh"
#include "unshard/kernels/cuda/elementwise.cuh"
#include "unshard/kernels/cuda/gemm.cuh"
#include "unshard/kernels/cuda/norm.cuh"

#ifndef UNSHARD_BENCH_RESULTS_DIR
#define UNSHARD_BENCH_RESULTS_DIR "benchmarks/results"
#endif

using namespace unshard;

namespace {

struct device_info {
  std::string name;
  int sm_major = 0, sm_minor = 0, sms = 0;
  double clock_ghz = 0;    // peak SM clock
  double peak_gbs = 0;     // DRAM
  double fp32_tflops = 0;  // CUDA cores
  double bf16_tflops = 0;  // dense tensor cores, f32 accumulate; 0 if not known for this card
  std::string bf16_source;  // "datasheet (NAME)" or "estimate ..."
};

// Dense BF16 tensor-core TFLOP/s with f32 accumulation, from NVIDIA's datasheets, by a substring
// of cudaDeviceProp::name (first match wins: the longer names first).
struct bf16_peak {
  const char* name_part;
  double tflops;
};
constexpr bf16_peak bf16_peak_table[] = {
    {"H200 NVL", 835.6},  // (1671 with sparsity)
    {"H200", 989.4},      // SXM; GH200's Hopper too
    {"H100 NVL", 835.6},
    {"H100 PCIe", 756.5},
    {"H100", 989.4},      // SXM ("NVIDIA H100 80GB HBM3")
    {"H800", 989.4},
    {"A100", 312.0},
    {"A800", 312.0},
    {"L40S", 362.1},
    {"L40", 181.0},
    {"L4", 121.0},
    {"RTX 6000 Ada", 364.2},
    {"RTX 4090", 165.2},  // f32 accumulate (330.3 with f16 accumulate)
    {"RTX 4080", 97.5},
    {"RTX 3090", 71.0},
};

device_info query_device(int dev) {
  cudaDeviceProp p{};
  UNSHARD_CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
  int mem_khz = 0, bus_bits = 0, sm_khz = 0;
  UNSHARD_CUDA_CHECK(cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, dev));
  UNSHARD_CUDA_CHECK(cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, dev));
  UNSHARD_CUDA_CHECK(cudaDeviceGetAttribute(&sm_khz, cudaDevAttrClockRate, dev));
  device_info d;
  d.name = p.name;
  d.sm_major = p.major;
  d.sm_minor = p.minor;
  d.sms = p.multiProcessorCount;
  d.clock_ghz = sm_khz * 1e-6;
  d.peak_gbs = 2.0 * mem_khz * 1e3 * (bus_bits / 8.0) * 1e-9;  // double data rate
  d.fp32_tflops = d.sms * 128.0 * 2.0 * d.clock_ghz * 1e-3;
  const int sm = p.major * 10 + p.minor;
  for (const bf16_peak& e : bf16_peak_table)
    if (d.name.find(e.name_part) != std::string::npos) {
      d.bf16_tflops = e.tflops;
      d.bf16_source = std::string("datasheet (") + e.name_part + ")";
      return d;
    }
  const double bf16_per_sm_clock = sm == 90 ? 4096.0 : sm == 89 ? 512.0 : sm == 80 ? 2048.0 : 0.0;
  d.bf16_tflops = d.sms * bf16_per_sm_clock * d.clock_ghz * 1e-3;
  d.bf16_source = d.bf16_tflops > 0 ? "estimate (SMs x flop/SM/clock x boost clock)" : "unknown";
  return d;
}

// Median of `runs` timings (ms) of f() on `stream`, after one warm-up.
double median_ms(cudaStream_t stream, const std::function<void()>& f, int runs = 9) {
  cudaEvent_t a, b;
  UNSHARD_CUDA_CHECK(cudaEventCreate(&a));
  UNSHARD_CUDA_CHECK(cudaEventCreate(&b));
  f();
  UNSHARD_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<float> ms(runs);
  for (int i = 0; i < runs; ++i) {
    UNSHARD_CUDA_CHECK(cudaEventRecord(a, stream));
    f();
    UNSHARD_CUDA_CHECK(cudaEventRecord(b, stream));
    UNSHARD_CUDA_CHECK(cudaEventSynchronize(b));
    UNSHARD_CUDA_CHECK(cudaEventElapsedTime(&ms[i], a, b));
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[runs / 2];
}

template <class T>
struct device_vector {
  T* p = nullptr;
  explicit device_vector(std::size_t n, cudaStream_t s) {
    UNSHARD_CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(T)));
    // Deterministic finite values (the kernels' time does not depend on the data, short of
    // NaN/inf): bytes 0x3c make 0.0115 in both bf16 and f32.
    UNSHARD_CUDA_CHECK(cudaMemsetAsync(p, 0x3c, std::max<std::size_t>(n, 1) * sizeof(T), s));
  }
  ~device_vector() { cudaFree(p); }
  device_vector(const device_vector&) = delete;
  device_vector& operator=(const device_vector&) = delete;
};

struct result_row {
  std::string kernel, dtype, shape, metric;
  double ms, achieved, peak;
  std::string peak_of;  // dram, fp32_simt, bf16_tensor
};

class recorder {
 public:
  explicit recorder(const device_info& d) : d_(d) {}

  void bandwidth(const std::string& kernel, const std::string& dtype, const std::string& shape, double bytes, double ms) {
    add({kernel, dtype, shape, "GB/s", ms, bytes / (ms * 1e-3) * 1e-9, d_.peak_gbs, "dram"});
  }
  // Against the bf16 tensor-core peak for bf16 data, the f32 CUDA-core peak for f32.
  void flops(const std::string& kernel, const std::string& dtype, const std::string& shape, double flop, double ms) {
    const bool bf16 = dtype == "bf16";
    add({kernel, dtype, shape, "TFLOP/s", ms, flop / (ms * 1e-3) * 1e-12, bf16 ? d_.bf16_tflops : d_.fp32_tflops,
         bf16 ? "bf16_tensor" : "fp32_simt"});
  }

  void write(const std::string& path) const {
    std::ofstream out(path);
    if (!out) {
      std::fprintf(stderr, "bench_gpu_kernels: cannot write %s\n", path.c_str());
      return;
    }
    out << "device,sm,kernel,dtype,shape,metric,median_ms,achieved,peak,peak_of,peak_source,fraction_of_peak\n";
    for (const auto& r : rows_) {
      out << '"' << d_.name << "\",sm_" << d_.sm_major << d_.sm_minor << ',' << r.kernel << ',' << r.dtype << ",\""
          << r.shape << "\"," << r.metric << ',' << r.ms << ',' << r.achieved << ',' << r.peak << ',' << r.peak_of
          << ",\"" << (r.peak_of == "bf16_tensor" ? d_.bf16_source : "device attributes") << "\",";
      if (r.peak > 0) out << r.achieved / r.peak;
      out << '\n';
    }
    std::printf("wrote %s (%zu rows)\n", path.c_str(), rows_.size());
  }

 private:
  void add(result_row r) {
    std::printf("%-22s %-5s %-34s %9.4f ms  %9.1f %-7s of %8.1f %-11s (%5.1f%%)\n", r.kernel.c_str(),
                r.dtype.c_str(), r.shape.c_str(), r.ms, r.achieved, r.metric.c_str(), r.peak, r.peak_of.c_str(),
                r.peak > 0 ? 100 * r.achieved / r.peak : 0.0);
    rows_.push_back(std::move(r));
  }
  const device_info& d_;
  std::vector<result_row> rows_;
};

template <class T>
const char* dtype_name() {
  return std::is_same_v<T, float> ? "f32" : "bf16";
}

// Row and elementwise kernels over [S, D] activations stored as T (f32 or bf16).
template <class T>
void bench_row_kernels(recorder& rec, cudaStream_t s, std::size_t S, std::size_t D, std::size_t heads) {
  const std::size_t n = S * D, hd = D / heads, pairs = hd / 2;
  const double e = sizeof(T);
  device_vector<T> x(n, s), y(n, s), w(D, s), b(D, s);
  device_vector<float> shift(D, s), scale(D, s), cos(S * pairs, s), sin(S * pairs, s), gate(D, s), mod(6 * D, s);
  const std::string shape = std::to_string(S) + "x" + std::to_string(D);
  const char* dt = dtype_name<T>();

  rec.bandwidth("layer_norm_modulate", dt, shape, n * 2 * e + 2 * D * 4.0,
                median_ms(s, [&] { cuda::layer_norm_modulate(x.p, S, D, 1e-6, shift.p, scale.p, y.p, s); }));
  rec.bandwidth("layer_norm_affine", dt, shape, n * 2 * e + 2 * D * e,
                median_ms(s, [&] { cuda::layer_norm_affine(x.p, S, D, 1e-6, w.p, b.p, y.p, s); }));
  rec.bandwidth("rms_norm_rope", dt, shape + " d=" + std::to_string(hd), n * 2 * e + D * e + S * pairs * 8.0,
                median_ms(s, [&] { cuda::rms_norm_rope(x.p, S, D, hd, 1e-6, w.p, cos.p, sin.p, s); }));
  rec.bandwidth("bias_gelu", dt, shape, n * 2 * e + D * e, median_ms(s, [&] { cuda::bias_gelu(y.p, S, D, b.p, s); }));
  rec.bandwidth("gated_residual", dt, shape, n * 3 * e + D * 4.0,
                median_ms(s, [&] { cuda::gated_residual(x.p, y.p, gate.p, S, D, s); }));
  device_vector<float> wide(n, s);
  rec.bandwidth("convert_to_f32", dt, shape, n * (e + 4.0), median_ms(s, [&] { cuda::convert(x.p, n, wide.p, s); }));
  const std::size_t gh = S / (21 * 52);  // a 21 x gh x 52 grid within the S tokens
  if (gh > 0)
    rec.bandwidth("rope_table", "f32", std::to_string(21 * gh * 52) + "x" + std::to_string(pairs),
                  21 * gh * 52 * pairs * 8.0, median_ms(s, [&] { cuda::rope_table(21, gh, 52, pairs, cos.p, sin.p, s); }));
}

template <class T>
void bench_attention(recorder& rec, cudaStream_t s, std::size_t S, std::size_t L,
                     std::size_t heads, std::size_t hd) {
  const std::size_t ld = heads * hd;
  device_vector<T> q(S * ld, s), k(std::max(S, L) * ld, s), v(std::max(S, L) * ld, s), out(S * ld, s);
  for (const std::size_t keys : {S, L}) {
    const double flop = 4.0 * S * keys * hd * heads;  // QKᵀ and PV, 2 flop per multiply-add
    const std::string shape = "q=" + std::to_string(S) + " k=" + std::to_string(keys) + " h=" + std::to_string(heads) +
                              " d=" + std::to_string(hd);
    rec.flops(keys == S ? "flash_attention_self" : "flash_attention_cross", dtype_name<T>(), shape, flop,
              median_ms(s, [&] { cuda::flash_attention(q.p, S, k.p, v.p, keys, heads, hd, out.p, s); }));
  }
}

// x [M, K] (TX) times W [N, K] (TX) + b into y [M, N] (f32).
template <class TX>
void bench_gemm(recorder& rec, cudaStream_t s, cuda::blaslt& blas, const std::string& kernel,
                std::size_t M, std::size_t K, std::size_t N, cuda::activation act) {
  device_vector<TX> x(M * K, s), w(N * K, s), b(N, s);
  device_vector<float> y(M * N, s);
  device_vector<float> bf(N, s);
  const std::string shape = std::to_string(M) + "x" + std::to_string(K) + "x" + std::to_string(N);
  const double ms = median_ms(s, [&] {
    if constexpr (std::is_same_v<TX, float>) {
      blas.linear(x.p, M, K, w.p, b.p, N, y.p, act, s);
    } else {
      blas.linear(x.p, M, K, w.p, bf.p, N, y.p, act, s);  // f32 output, f32 bias
    }
  });
  rec.flops(kernel, dtype_name<TX>(), shape, 2.0 * M * N * K, ms);
}

}  // namespace

int main(int argc, char** argv) {
  std::string out_path = std::string(UNSHARD_BENCH_RESULTS_DIR) + "/gpu_kernels.csv";
  std::size_t S = 32760;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--tokens") == 0 && i + 1 < argc) S = std::strtoull(argv[++i], nullptr, 10);
    else out_path = argv[i];
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "bench_gpu_kernels: no CUDA device; nothing measured\n");
    return 77;
  }
  try {
    const device_info d = query_device(0);
    std::printf("%s (sm_%d%d, %d SMs, %.2f GHz): DRAM %.0f GB/s, FP32 %.1f TFLOP/s, BF16 dense (f32 acc) %.1f TFLOP/s [%s]\n",
                d.name.c_str(), d.sm_major, d.sm_minor, d.sms, d.clock_ghz, d.peak_gbs, d.fp32_tflops, d.bf16_tflops,
                d.bf16_source.c_str());
    cudaStream_t s;
    UNSHARD_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    recorder rec(d);
    const std::size_t D = 5120, heads = 40, hd = 128, ffn = 13824, L = 512;
    bench_row_kernels<float>(rec, s, S, D, heads);
    bench_row_kernels<bf16>(rec, s, S, D, heads);
    const std::size_t S_attn = std::min<std::size_t>(S, 8192);  // attention is quadratic: a slice of the tokens
    bench_attention<float>(rec, s, S_attn, L, heads, hd);
    bench_attention<bf16>(rec, s, S_attn, L, heads, hd);
    {
      device_vector<std::byte> workspace(std::size_t{32} << 20, s);
      cuda::blaslt blas;
      blas.set_workspace(workspace.p, std::size_t{32} << 20);
      const std::size_t M = std::min<std::size_t>(S, 8192);
      bench_gemm<float>(rec, s, blas, "gemm_qkvo", M, D, D, cuda::activation::none);
      bench_gemm<float>(rec, s, blas, "gemm_ffn0_gelu", M, D, ffn, cuda::activation::gelu_tanh);
      bench_gemm<bf16>(rec, s, blas, "gemm_qkvo", M, D, D, cuda::activation::none);
      bench_gemm<bf16>(rec, s, blas, "gemm_ffn0_gelu", M, D, ffn, cuda::activation::gelu_tanh);
      bench_gemm<bf16>(rec, s, blas, "gemm_ffn2", M, ffn, D, cuda::activation::none);
    }
    UNSHARD_CUDA_CHECK(cudaStreamSynchronize(s));
    cudaStreamDestroy(s);
    rec.write(out_path);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gpu_kernels: %s\n", e.what());
    return 1;
  }
  return 0;
}
