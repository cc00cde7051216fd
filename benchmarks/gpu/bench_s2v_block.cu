// One Live Avatar 14B block on one GPU, timed forward: the S2V model's own block (self-attention over
// the noisy cache + cond keys, text cross-attention, FFN) and its audio injector, run by
// s2v::cuda_model (the host forward over cuda_ops) at Live Avatar's 704x384 geometry: dim 5120, 40
// heads, ffn 13824, 3,168 query tokens of a block attending to a full noisy cache of 4 blocks
// (12,672 slots) plus the cond tokens (15,312 keys in all), bf16 weights with synthetic values,
// --compute bf16 (default: tensor-core GEMMs, cuDNN SDPA) or f32.
//
// The sink fills the cond cache and four streamed calls fill the noisy cache; then the block's
// three sub-units and the injector are timed (CUDA events, median of --reps runs after a warm-up).
// FLOPs count the GEMMs and the attention's two matmuls; the fraction is of the card's dense bf16
// peak (--peak-tflops, default 989 for H100/H200 SXM). Writes benchmarks/results/gpu_s2v_block.csv
// (or --out). Needs a GPU; exits 77 without one.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "unshard/backend/cuda/check.cuh"
#include "unshard/backend/cuda/memory.cuh"
#include "unshard/models/liveavatar/cuda/model.cuh"
#include "unshard/ops/cudnn_attention.cuh"
#include "unshard/runtime/synthetic_weights.hpp"

namespace {
using namespace unshard;

struct device_block {
  std::byte* p = nullptr;
  explicit device_block(std::size_t bytes) { UNSHARD_CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(bytes, 1))); }
  ~device_block() { cudaFree(p); }
  device_block(const device_block&) = delete;
  device_block& operator=(const device_block&) = delete;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::string arg(int argc, char** argv, const char* key, const char* fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], key) == 0) return argv[i + 1];
  return fallback;
}

// The model's parameters: synthetic f32 values, stored as the model declares (bf16), on the device.
struct device_params {
  std::vector<std::unique_ptr<device_block>> memory;
  std::vector<std::vector<param_views>> views;  // [layer][sub-unit]

  explicit device_params(const s2v::cuda_model& m) {
    const synthetic_weights w(m, 7, 0.02f);
    for (std::size_t l = 0; l < m.layer_count(); ++l) {
      views.emplace_back();
      for (std::size_t s = 0; s < m.layer(l).subunit_count(); ++s) {
        std::vector<tensor_view> v;
        for (const param_spec& p : m.layer(l).parameters(s)) {
          const auto n = static_cast<std::size_t>(p.dims.numel());
          std::vector<std::byte> f32(n * 4), stored(n * size_of(p.type));
          w.read(p.name, 0, f32);
          const tensor_view src(f32.data(), dtype::f32, p.dims), dst(stored.data(), p.type, p.dims);
          for (std::size_t i = 0; i < n; ++i) dst.store(i, src.load(i));
          memory.push_back(std::make_unique<device_block>(stored.size()));
          int device = 0;
          UNSHARD_CUDA_CHECK(cudaGetDevice(&device));
          cuda::upload_to_device(device, memory.back()->p, stored.data(), stored.size());
          v.emplace_back(memory.back()->p, p.type, p.dims);
        }
        views.back().emplace_back(std::move(v));
      }
    }
  }
};

std::vector<float> wave(std::size_t n, float f, float a) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = a * std::sin(f * static_cast<float>(i));
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("bench_gpu_s2v_block: no CUDA device: skipped\n");
    return 77;
  }
  const int reps = std::max(1, std::atoi(arg(argc, argv, "--reps", "10").c_str()));
  const double peak = std::atof(arg(argc, argv, "--peak-tflops", "989").c_str());
  const std::string out_path = arg(argc, argv, "--out", UNSHARD_BENCH_RESULTS_DIR "/gpu_s2v_block.csv");
  try {
    s2v::config cfg = s2v::liveavatar_14b_config();
    cfg.num_layers = 1;
    cfg.audio_inject_layers = {0};
    s2v::workload work;
    work.latent_hw = {48, 88};  // 704x384 / 8
    work.context_len = 512;
    work.denoising_steps = 1;
    const bool bf16_compute = arg(argc, argv, "--compute", "bf16") == "bf16";
    s2v::cuda_options cuda_options;
    cuda_options.precision = bf16_compute ? cuda_precision::bf16 : cuda_precision::f32;
    cuda_options.attention_engine = make_cudnn_attention;
    const s2v::cuda_model m(cfg, work, {dtype::bf16, gemm_path::portable, false}, cuda_options);
    const s2v::geometry& g = m.geometry();
    std::vector<std::unique_ptr<device_block>> memory;
    buffer_set buffers;
    for (const auto& b : m.buffers()) {
      memory.push_back(std::make_unique<device_block>(b.bytes));
      buffers.add(b.name, {memory.back()->p, b.bytes});
    }
    s2v::cuda_state st = m.make_state(buffers);
    cudaStream_t stream = nullptr;
    UNSHARD_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    st.attach_stream(stream);
    const device_params params(m);
    const auto run_layer = [&](std::size_t l) {
      for (std::size_t s = 0; s < m.layer(l).subunit_count(); ++s) m.layer(l).forward(s, params.views[l][s], st);
    };
    const auto run_all = [&] {
      for (std::size_t l = 0; l < m.layer_count(); ++l) run_layer(l);
    };

    const auto i64 = [](std::size_t v) { return static_cast<std::int64_t>(v); };
    const std::size_t HW = g.height * g.width;
    std::vector<float> ref = wave(g.in_dim * HW, 0.011f, 1.f), motion = wave(16 * g.motion_latent_frames * HW, 0.007f, 1.f),
                       ctx = wave(512 * g.text_dim, 0.05f, 0.5f), cond = wave(g.cond_dim * g.frames * HW, 0.013f, 0.3f),
                       audio = wave(s2v::audio_layers * g.audio_dim * g.audio_frames, 0.021f, 1.f),
                       x = wave(g.in_dim * g.frames * HW, 0.017f, 1.f), t(g.frames, 500.f);
    const auto view = [](std::vector<float>& v, shape d) { return tensor_view(v.data(), dtype::f32, d); };
    const tensor_view context = view(ctx, {512, i64(g.text_dim)});
    m.begin_sink(st, {view(ref, {i64(g.in_dim), 1, i64(g.height), i64(g.width)}),
                      view(motion, {16, i64(g.motion_latent_frames), i64(g.height), i64(g.width)}), context});
    run_all();
    // Four streamed calls: the noisy cache then holds 4 blocks, every slot attended.
    const std::size_t blocks = g.noisy_slots / g.block_tokens;
    for (std::size_t b = 0; b < blocks; ++b) {
      m.begin_step(st, {view(x, {i64(g.in_dim), i64(g.frames), i64(g.height), i64(g.width)}), view(t, {i64(g.frames)}),
                        view(cond, {i64(g.cond_dim), i64(g.frames), i64(g.height), i64(g.width)}),
                        view(audio, {i64(s2v::audio_layers), i64(g.audio_dim), i64(g.audio_frames)}), context, b, 0, 30});
      run_all();
    }
    UNSHARD_CUDA_CHECK(cudaStreamSynchronize(stream));
    const std::size_t S = g.block_tokens, D = g.dim, keys = st.call.active_slots + g.cond_tokens, Lt = g.text_len;
    std::printf("s2v 14B block: dim %zu, %zu heads, ffn %zu; %zu query tokens, %zu keys (%zu cache + %zu cond), "
                "text %zu\n", D, g.heads, g.ffn_dim, S, keys, st.call.active_slots, g.cond_tokens, Lt);

    // Layer 4 is blocks.0, layer 5 its audio injector (embeddings, packer, cond, audio encoder first).
    std::size_t block_layer = 0, injector_layer = 0;
    for (std::size_t l = 0; l < m.layer_count(); ++l) {
      if (m.layer(l).kind() == s2v::layer_kind::block) block_layer = l;
      if (m.layer(l).kind() == s2v::layer_kind::injector) injector_layer = l;
    }
    cudaEvent_t a, b;
    UNSHARD_CUDA_CHECK(cudaEventCreate(&a));
    UNSHARD_CUDA_CHECK(cudaEventCreate(&b));
    const auto time_ms = [&](auto&& enqueue) {
      std::vector<double> v;
      enqueue();  // warm-up: algorithms chosen, caches warm
      for (int r = 0; r < reps; ++r) {
        UNSHARD_CUDA_CHECK(cudaEventRecord(a, stream));
        enqueue();
        UNSHARD_CUDA_CHECK(cudaEventRecord(b, stream));
        UNSHARD_CUDA_CHECK(cudaEventSynchronize(b));
        float ms = 0;
        UNSHARD_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
        v.push_back(ms);
      }
      return median(v);
    };
    const double block_ms = time_ms([&] { run_layer(block_layer); });
    const double injector_ms = time_ms([&] { run_layer(injector_layer); });
    const auto d = [](std::size_t v) { return static_cast<double>(v); };
    const double gemm_flops = 2 * d(S) * d(D) * d(D) * 4          // self-attention q, k, v, o
                              + 2 * d(S) * d(D) * d(D) * 2 + 2 * d(Lt) * d(D) * d(D) * 2  // cross q, o; k, v
                              + 2 * d(S) * d(D) * d(g.ffn_dim) * 2;                       // FFN
    const double attn_flops = 4 * d(S) * d(keys) * d(D) + 4 * d(S) * d(Lt) * d(D);
    const double tflops = (gemm_flops + attn_flops) / (block_ms * 1e-3) / 1e12;
    std::printf("block forward (%s compute, attention: %s): %.3f ms median of %d (%.1f TFLOP/s, %.1f%% of %.0f TFLOP/s "
                "bf16 peak); audio injector %.3f ms\n", name_of(cuda_options.precision), st.ops.last_attention(), block_ms,
                reps, tflops, 100 * tflops / peak, peak, injector_ms);
    std::ofstream out(out_path);
    out << "what,value\nblock_ms," << block_ms << "\ninjector_ms," << injector_ms << "\nblock_tflops," << tflops
        << "\nfraction_of_bf16_peak," << tflops / peak << "\nquery_tokens," << S << "\nkeys," << keys
        << "\ncompute," << name_of(cuda_options.precision) << "\nattention," << st.ops.last_attention() << "\nreps," << reps
        << "\n";
    std::printf("wrote %s\n", out_path.c_str());
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    cudaStreamDestroy(stream);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gpu_s2v_block: %s\n", e.what());
    return 1;
  }
  return 0;
}
