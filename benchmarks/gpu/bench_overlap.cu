// How much of the gather time prefetch hides behind compute, on one GPU: pinned host-to-device
// copies stand in for the link (one "unit" = one gather) and a kernel that spins for a calibrated
// time on every SM stands in for a unit's compute. The loop is the runtime's (rank_runtime::
// forward): gathers on the communication stream up to K units ahead, a ring of K+1 buffers, and
// events only (no host synchronisation until the end).
//
//   hidden fraction = (T(no prefetch) - T(prefetch K)) / (units x copy time per unit)
//
// 1 means every copy ran entirely under compute; 0 means none did. Written to
// benchmarks/results/gpu_overlap.csv (or --out). Needs a GPU; exits 77 without one.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "unshard/backend/cuda/cuda_backend.cuh"

namespace {

__global__ void spin(long long cycles, const std::byte* unit, unsigned* sink) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
  // Read the gathered unit, as compute would: the dependency the events must respect.
  if (threadIdx.x == 0) atomicAdd(sink, static_cast<unsigned>(unit[blockIdx.x * 4096]));
}

struct timing_event {  // the benchmark's own events, with timing (the backend's have none)
  cudaEvent_t e{};
  timing_event() { UNSHARD_CUDA_CHECK(cudaEventCreate(&e)); }
  ~timing_event() { cudaEventDestroy(e); }
};

double elapsed_ms(cudaStream_t s, auto&& enqueue) {
  timing_event a, b;
  UNSHARD_CUDA_CHECK(cudaEventRecord(a.e, s));
  enqueue();
  UNSHARD_CUDA_CHECK(cudaEventRecord(b.e, s));
  UNSHARD_CUDA_CHECK(cudaEventSynchronize(b.e));
  float ms = 0;
  UNSHARD_CUDA_CHECK(cudaEventElapsedTime(&ms, a.e, b.e));
  return ms;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct setup {
  unshard::cuda_world& world;
  unshard::cuda_stream& compute;
  unshard::cuda_stream& comm;
  const std::byte* host_unit;
  std::size_t unit_bytes;
  std::size_t units;
  int blocks;
  unsigned* sink;
};

// One forward of `units` units with gathers `depth` units ahead (0: gather, then compute).
double forward_ms(const setup& s, std::size_t depth, long long cycles,
                  std::vector<unshard::cuda::region_buffer>& ring) {
  const std::size_t slots = depth + 1;
  std::vector<unshard::cuda_event> slot_free(slots), gathered(s.units);
  const auto t0 = std::chrono::steady_clock::now();
  std::size_t next = 0;
  auto issue = [&](std::size_t u) {
    s.comm.wait(slot_free[u % slots]);
    s.comm.copy(ring[u % slots].data(), s.host_unit, s.unit_bytes, static_cast<std::uint32_t>(u));
    s.comm.record(gathered[u]);
  };
  for (std::size_t u = 0; u < s.units; ++u) {
    while (next < s.units && next <= u + depth) issue(next++);
    s.compute.wait(gathered[u]);
    spin<<<s.blocks, 128, 0, s.compute.native()>>>(cycles, ring[u % slots].data(), s.sink);
    UNSHARD_CUDA_CHECK(cudaGetLastError());
    s.compute.record(slot_free[u % slots]);
  }
  s.compute.synchronize();
  s.comm.synchronize();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  std::string out = std::string(UNSHARD_BENCH_RESULTS_DIR) + "/gpu_overlap.csv";
  std::size_t unit_mib = 64, units = 12;
  int runs = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) out = argv[++i];
    else if (a == "--unit-mib" && i + 1 < argc) unit_mib = std::max(1, std::atoi(argv[++i]));
    else if (a == "--units" && i + 1 < argc) units = std::max(2, std::atoi(argv[++i]));
    else if (a == "--runs" && i + 1 < argc) runs = std::max(1, std::atoi(argv[++i]));
    else {
      std::fprintf(stderr, "usage: %s [--out FILE.csv] [--unit-mib N] [--units N] [--runs N]\n", argv[0]);
      return 2;
    }
  }
  if (unshard::cuda::device_count() == 0) {
    std::fprintf(stderr, "bench_gpu_overlap: no usable CUDA device; nothing measured\n");
    return 77;
  }
  try {
    unshard::cuda_world world(1);
    auto compute = unshard::cuda_backend::compute_stream(world, 0, nullptr);
    auto comm = unshard::cuda_backend::comm_stream(world, 0, nullptr);
    const int device = world.device_of(0);
    cudaDeviceProp prop{};
    UNSHARD_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    const std::size_t unit_bytes = unit_mib << 20;
    auto host = unshard::cuda::pinned_buffer(device, unit_bytes);
    std::fill(host.data(), host.data() + unit_bytes, std::byte{1});
    auto sink = unshard::cuda::device_buffer(device, sizeof(unsigned));
    std::vector<unshard::cuda::region_buffer> ring;
    for (int i = 0; i < 3; ++i) ring.push_back(unshard::cuda::device_buffer(device, unit_bytes));
    const int blocks = std::min<int>(prop.multiProcessorCount, static_cast<int>(unit_bytes / 4096));
    const setup s{world, *compute, *comm, host.data(), unit_bytes, units, blocks, sink.as<unsigned>()};

    // Calibration: one unit's copy, and the spin kernel's time per cycle count.
    std::vector<double> copy_samples;
    for (int i = 0; i < 5; ++i)
      copy_samples.push_back(elapsed_ms(compute->native(), [&] {
        UNSHARD_CUDA_CHECK(cudaMemcpyAsync(ring[0].data(), host.data(), unit_bytes, cudaMemcpyHostToDevice,
                                           compute->native()));
      }));
    const double copy_ms = median(copy_samples);
    const long long probe = 10'000'000;
    std::vector<double> spin_samples;
    for (int i = 0; i < 5; ++i)
      spin_samples.push_back(elapsed_ms(compute->native(), [&] {
        spin<<<blocks, 128, 0, compute->native()>>>(probe, ring[0].data(), s.sink);
      }));
    const double ms_per_cycle = median(spin_samples) / static_cast<double>(probe);

    std::ofstream csv(out);
    if (!csv) {
      std::fprintf(stderr, "bench_gpu_overlap: cannot write '%s'\n", out.c_str());
      return 1;
    }
    csv << "device,compute_to_copy,prefetch,unit_bytes,units,copy_ms_per_unit,compute_ms_per_unit,"
           "no_prefetch_ms,forward_ms,hidden_fraction\n";
    std::printf("%s: %zu MiB unit copy %.3f ms (%.1f GB/s pinned H2D)\n", prop.name, unit_mib, copy_ms,
                static_cast<double>(unit_bytes) / copy_ms / 1e6);
    for (double ratio : {0.5, 1.0, 2.0}) {
      const long long cycles = static_cast<long long>(ratio * copy_ms / ms_per_cycle);
      std::vector<double> serial_samples;
      forward_ms(s, 0, cycles, ring);  // warm-up
      for (int r = 0; r < runs; ++r) serial_samples.push_back(forward_ms(s, 0, cycles, ring));
      const double serial = median(serial_samples);
      for (std::size_t depth : {1u, 2u}) {
        std::vector<double> t;
        forward_ms(s, depth, cycles, ring);
        for (int r = 0; r < runs; ++r) t.push_back(forward_ms(s, depth, cycles, ring));
        const double overlapped = median(t);
        const double hidden = std::clamp((serial - overlapped) / (static_cast<double>(units) * copy_ms), 0.0, 1.0);
        csv << '"' << prop.name << "\"," << ratio << ',' << depth << ',' << unit_bytes << ',' << units << ','
            << copy_ms << ',' << ratio * copy_ms << ',' << serial << ',' << overlapped << ',' << hidden << '\n';
        std::printf("compute/copy %.1f prefetch %zu: %.2f ms vs %.2f ms without prefetch, %.0f%% of the copy time "
                    "hidden\n", ratio, depth, overlapped, serial, 100 * hidden);
      }
    }
    std::printf("written to %s\n", out.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gpu_overlap: %s\n", e.what());
    return 1;
  }
  return 0;
}
