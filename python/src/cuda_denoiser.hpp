#pragma once
// The CUDA backend of unshard._unshard: Live Avatar's denoiser (s2v::denoiser) over s2v::cuda_model on
// the CUDA backend, one process driving the local GPUs (rank r on devices[r]). Defined in
// cuda_denoiser.cu, which nvcc compiles only when the module is built with UNSHARD_ENABLE_CUDA=ON
// (UNSHARD_PYTHON_CUDA is then defined for both translation units); this interface includes no CUDA
// header, so unshard_module.cpp stays plain C++. Without CUDA the functions below are inline stubs:
// cuda_built() is false and nothing else may be called.
//
// Tensors cross as tensor_views: host memory (the model uploads it through its pinned staging as a
// step begins) or device memory (f32, copied device to device into the model's buffers, on the
// reading rank's stream, after the caller's stream). Results are device buffers on devices[0] that
// the caller owns (free_device_buffer).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "unshard/io/checkpoint.hpp"
#include "unshard/models/liveavatar/config.hpp"
#include "unshard/models/liveavatar/denoiser.hpp"
#include "unshard/models/liveavatar/model.hpp"
#include "unshard/plan/ledger.hpp"
#include "unshard/runtime/session.hpp"
#include "unshard/schedule/schedule.hpp"

namespace unshard::python {

// A CUDA runtime failure on the calling thread (no device, a bad stream handle, out of device
// memory for a result): RuntimeError in Python, whereas unshard::error (a bad input) is ValueError.
class cuda_runtime_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

void free_device_buffer(int device, void* data) noexcept;

// floats f32 values of device memory on `device`, owned: freed on destruction unless release()d
// (then whoever took the pointer frees it with free_device_buffer).
class device_buffer {
 public:
  device_buffer() = default;
  device_buffer(float* data, int device, std::size_t floats) noexcept : data_(data), device_(device), floats_(floats) {}
  device_buffer(device_buffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), device_(o.device_), floats_(std::exchange(o.floats_, 0)) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
    if (this != &o) {
      reset();
      data_ = std::exchange(o.data_, nullptr);
      device_ = o.device_;
      floats_ = std::exchange(o.floats_, 0);
    }
    return *this;
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  ~device_buffer() { reset(); }

  float* data() const noexcept { return data_; }
  int device() const noexcept { return device_; }
  std::size_t floats() const noexcept { return floats_; }
  float* release() noexcept { return std::exchange(data_, nullptr); }
  void reset() noexcept {
    if (data_) free_device_buffer(device_, std::exchange(data_, nullptr));
  }

 private:
  float* data_ = nullptr;
  int device_ = 0;
  std::size_t floats_ = 0;
};

// One block's results in device memory ([C, F, H, W] each).
struct cuda_block_result {
  std::size_t clip = 0, block = 0;
  device_buffer latent;
  std::vector<device_buffer> noise_pred, step_latent;  // per step, with all_steps
};

// What the CUDA denoiser is built from (the host module has checked all of it).
struct cuda_job {
  s2v::config config;
  s2v::workload workload;
  s2v::options model_options;
  session_options options;            // world_size, policy, schedule, budget, steps
  std::vector<int> devices;           // rank r on devices[r] (size world_size, distinct, visible)
  bool bf16_compute = false;          // compute="bf16": tensor-core GEMMs, fused attention
  bool fp8_activations = false;       // fp8_activations="tensor": e4m3 x e4m3 GEMMs (an fp8 policy's weights)
  const checkpoint* weights = nullptr;
  const checkpoint* lora = nullptr;   // merged into each rank's slice while it loads
  std::optional<double> lora_alpha;
  s2v::denoise_options denoise;
};

// Per rank, as the host module's peaks() reports it.
struct cuda_rank_stats {
  std::size_t planned_peak_bytes = 0, measured_peak_bytes = 0, bytes_gathered = 0, forwards = 0;
};

// stream: the caller's cudaStream_t as an integer (0: the legacy default stream of devices[0]). Each
// call orders its reads of the caller's device tensors after the work already enqueued on it, and
// makes it wait for the end of those reads and for the results' writes (events, no host wait).
class cuda_denoiser {
 public:
  virtual ~cuda_denoiser() = default;
  virtual const memory_plan& plan() const = 0;
  virtual const unshard::schedule& schedule() const = 0;
  virtual std::size_t world_size() const = 0;
  virtual cuda_rank_stats stats(std::size_t rank) const = 0;
  virtual std::size_t ticks_run() const = 0;
  virtual const std::vector<int>& devices() const = 0;
  // `in.context` must stay valid (and unchanged) until the next sink: every step reads it.
  virtual void sink(const s2v::sink_inputs& in, std::uintptr_t stream) = 0;
  virtual std::vector<cuda_block_result> denoise(std::span<const s2v::block> blocks, bool all_steps,
                                                 std::uintptr_t stream) = 0;
};

#ifdef UNSHARD_PYTHON_CUDA
inline constexpr bool cuda_built = true;
// CUDA devices this process sees; 0 with `why` set when there is none (or no driver).
int cuda_device_count(std::string& why);
// Whether bf16 attention runs cuDNN's SDPA (the cudnn-frontend headers were found at configure).
bool cudnn_attention_built();
// The CUDA runtime's version (e.g. 13000), of the headers this was compiled against.
int cuda_runtime_version();
// Builds the model, loads each rank's shard on its device, and the denoiser. The GIL must not be held.
std::unique_ptr<cuda_denoiser> make_cuda_denoiser(const cuda_job& job);
// bytes of device memory on `device` into host memory, once everything queued on the device ran
// (unshard._to_numpy: reads a result without a framework; not a fast path).
void copy_device_to_host(int device, const void* src, void* dst, std::size_t bytes);
#else
inline constexpr bool cuda_built = false;
inline int cuda_device_count(std::string& why) {
  why = "this module was built without CUDA";
  return 0;
}
inline bool cudnn_attention_built() { return false; }
inline int cuda_runtime_version() { return 0; }
inline std::unique_ptr<cuda_denoiser> make_cuda_denoiser(const cuda_job&) {
  throw cuda_runtime_error("this unshard module was built without CUDA");
}
inline void copy_device_to_host(int, const void*, void*, std::size_t) {
  throw cuda_runtime_error("this unshard module was built without CUDA");
}
inline void free_device_buffer(int, void*) noexcept {}
#endif

}  // namespace unshard::python
