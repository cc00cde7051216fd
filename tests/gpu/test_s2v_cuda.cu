// Live Avatar's S2V DiT on the device (s2v::cuda_model: the host forward over cuda_ops) against the
// official references and the host model, call by call over every recorded stream of tests/data:
//  * f32 weights: every streamed call's output within the rule max|got - ref| <= 1e-5 max(1, max|ref|)
//    against ref.<call>.output, and the cond cache against the host's after the sink;
//  * bf16 weights (widened to f32 on the device, as the host widens them): within the same rule of
//    the host model run on the same bf16 weights. Both sides compute f32 GEMMs of identical operands;
//    they differ only in summation order (cuBLASLt, the flash kernel's online softmax), whose error
//    is ~K·2^-24 relative for K <= 5120 terms: 3e-4 relative at worst, and ~1e-6 in practice on
//    these sizes, well inside 1e-5 at |output| ~ 1.
// Needs a device: exits 77 (skipped) without one. Also built for the SIMT emulator (tests/simt.cmake).
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "unshard/backend/cuda/check.cuh"
#include "unshard/backend/cuda/memory.cuh"
#include "unshard/models/liveavatar/cuda/model.cuh"

#include "../support/liveavatar_case.hpp"
#include "device_checks.cuh"

using namespace unshard;
using namespace unshard::testing;

namespace {

using device_block = gpu_testing::device_vector<std::byte>;

// A parameter of the file (f32) as the model declares it (f32, or rounded to bf16), in `dst` memory.
std::vector<std::byte> staged_param(const checkpoint& f, const param_spec& spec) {
  const tensor_view src = f.view(spec.name);
  std::vector<std::byte> host(static_cast<std::size_t>(src.numel()) * size_of(spec.type));
  const tensor_view staged(host.data(), spec.type, src.dims());
  for (std::size_t i = 0; i < static_cast<std::size_t>(src.numel()); ++i) staged.store(i, src.load(i));
  return host;
}

// Every sub-unit's parameter views, in host or device memory (owned by `memory`).
template <class Model, class Own>
std::vector<std::vector<param_views>> load_params(const Model& m, const checkpoint& f, Own&& own) {
  std::vector<std::vector<param_views>> all;
  for (std::size_t l = 0; l < m.layer_count(); ++l) {
    std::vector<param_views> subs;
    for (std::size_t s = 0; s < m.layer(l).subunit_count(); ++s) {
      std::vector<tensor_view> views;
      for (const auto& spec : m.layer(l).parameters(s)) {
        const std::vector<std::byte> host = staged_param(f, spec);
        views.emplace_back(own(host), spec.type, spec.dims);
      }
      subs.emplace_back(std::move(views));
    }
    all.push_back(std::move(subs));
  }
  return all;
}

struct device_run {
  s2v::cuda_model model;
  std::vector<std::unique_ptr<device_block>> memory;
  buffer_set buffers;
  s2v::cuda_state state;
  std::vector<std::vector<param_views>> params;
  cudaStream_t stream = nullptr;

  device_run(const stream_case& c, dtype storage) : model(c.config, c.work, {storage, gemm_path::portable, false}) {
    for (const auto& b : model.buffers()) {
      memory.push_back(std::make_unique<device_block>(b.bytes));
      buffers.add(b.name, {memory.back()->p, b.bytes});
    }
    state = model.make_state(buffers);
    UNSHARD_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    state.attach_stream(stream);
    params = load_params(model, c.file, [&](const std::vector<std::byte>& host) {
      memory.push_back(std::make_unique<device_block>(host.size()));
      gpu_testing::upload(memory.back()->p, host.data(), host.size());  // landed before any stream reads
      return memory.back()->p;
    });
  }
  ~device_run() {
    if (stream) {
      cudaStreamSynchronize(stream);
      cudaStreamDestroy(stream);
    }
  }
  void forward() {
    for (std::size_t l = 0; l < model.layer_count(); ++l)
      for (std::size_t s = 0; s < model.layer(l).subunit_count(); ++s) model.layer(l).forward(s, params[l][s], state);
    UNSHARD_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
};

struct host_run {
  s2v::model model;
  test_buffers bufs;
  s2v::state state;
  std::vector<std::vector<std::byte>> memory;
  std::vector<std::vector<param_views>> params;

  host_run(const stream_case& c, dtype storage)
      : model(c.config, c.work, {storage, gemm_path::portable, false}), bufs(model.buffers()),
        state(model.make_state(bufs.set)) {
    params = load_params(model, c.file, [&](const std::vector<std::byte>& host) {
      memory.push_back(host);
      return memory.back().data();
    });
  }
  void forward() {
    for (std::size_t l = 0; l < model.layer_count(); ++l)
      for (std::size_t s = 0; s < model.layer(l).subunit_count(); ++s) model.layer(l).forward(s, params[l][s], state);
  }
};

// max|got - want| / (1e-5 max(1, max|want|)): <= 1 passes the rule.
double excess(const std::vector<float>& got, const float* want, std::size_t n) {
  REQUIRE(got.size() == n);
  double diff = 0, scale = 1;
  for (std::size_t i = 0; i < n; ++i) {
    diff = std::max(diff, static_cast<double>(std::fabs(got[i] - want[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(want[i])));
  }
  return diff / (1e-5 * scale);
}

}  // namespace

TEST_CASE("s2v on CUDA: every recorded stream against the references (f32) and the host (f32 and bf16)") {
  const auto files = liveavatar_files(/*denoise_loops=*/false);
  REQUIRE(!files.empty());
  for (const std::string& name : files)
    for (const dtype storage : {dtype::f32, dtype::bf16}) {
      CAPTURE(name);
      CAPTURE(std::string(name_of(storage)));
      const stream_case c = load_case(name);
      device_run dev(c, storage);
      host_run host(c, storage);
      const s2v::geometry& g = host.model.geometry();
      double worst_ref = 0, worst_host = 0;
      std::size_t streamed = 0;
      for (const s2v::call_spec& call : c.spec.calls) {
        CAPTURE(call.name);
        if (call.sink) {
          const s2v::sink_inputs in = s2v::sink_of(call, c.file);
          dev.model.begin_sink(dev.state, in);
          host.model.begin_sink(host.state, in);
        } else {
          const s2v::step_inputs in = s2v::step_of(host.model, call, c.file);
          dev.model.begin_step(dev.state, in);
          host.model.begin_step(host.state, in);
        }
        dev.forward();
        host.forward();
        if (call.sink) {
          // The cond cache the streamed calls will read, block 0 and the last block.
          for (const std::size_t b : {std::size_t{0}, g.num_layers - 1}) {
            const std::size_t off = b * g.cond_slots * g.dim, n = g.cond_tokens * g.dim;
            worst_host = std::max(worst_host, excess(dev.model.copy_buffer(dev.state, dev.state.cond_k + off, n),
                                                     host.state.cond_k + off, n));
          }
          continue;
        }
        ++streamed;
        const std::size_t n = static_cast<std::size_t>(host.model.output(host.state).numel());
        const std::vector<float> out = dev.model.copy_output(dev.state);
        worst_host = std::max(worst_host, excess(out, host.state.output, n));
        const std::string ref = "ref." + call.name + ".output";
        if (storage == dtype::f32 && c.file.find(ref)) {
          const std::vector<float> want = read_f32(c.file, ref);
          worst_ref = std::max(worst_ref, excess(out, want.data(), want.size()));
        }
      }
      MESSAGE(name, " ", std::string(name_of(storage)), ": ", streamed, " streamed calls on cuda_ops (f32 activations, ",
              "segmented flash attention, cuBLASLt f32 GEMMs); worst error / 1e-5 rule: vs references ", worst_ref,
              ", vs host ", worst_host);
      CHECK(streamed > 0);
      CHECK(worst_ref <= 1.0);
      CHECK(worst_host <= 1.0);
    }
}
