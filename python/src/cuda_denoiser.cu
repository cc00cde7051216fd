// unshard._unshard's CUDA backend (cuda_denoiser.hpp): s2v::denoiser over s2v::cuda_model on the
// CUDA backend, the module's only CUDA translation unit (nvcc; built when UNSHARD_ENABLE_CUDA=ON).
// It includes the cuDNN frontend (ops/cudnn_attention.cuh, minutes of nvcc): no other unit may.
//
// What it adds to the library, all of it here (see the notes at each piece):
//   py_world / py_backend   cuda_world on a chosen device list (session builds B::world(n, link),
//                           which is ranks 0..n-1 on GPUs 0..n-1)
//   input_ops / py_model    device inputs: s2v::model's begin_sink/begin_step upload every input
//                           through cuda_ops::upload, which reads host memory; a device tensor is
//                           copied device to device instead, after the caller's stream
//   py_model::landing       rank 0's results copied device to device into buffers the caller owns,
//                           instead of s2v::cuda_model::landing's copy to the host
#include "cuda_denoiser.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <numeric>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "unshard/backend/cuda/cuda_backend.cuh"
#include "unshard/backend/cuda/device.cuh"
#include "unshard/models/liveavatar/cuda/model.cuh"
#include "unshard/ops/cudnn_attention.cuh"
#include "unshard/runtime/checkpoint_weights.hpp"
#include "unshard/runtime/lora_weights.hpp"
#include "unshard/runtime/session.hpp"

namespace unshard::python {

namespace {

// A CUDA call on the calling (Python) thread: failures are cuda_runtime_error (RuntimeError).
void check_call(cudaError_t e, const char* call) {
  if (e == cudaSuccess) return;
  cudaGetLastError();  // a non-sticky error must not be reported again by the next call
  throw cuda_runtime_error(std::string("CUDA call `") + call + "` failed: " + cudaGetErrorName(e) + " (" +
                           cudaGetErrorString(e) + ")");
}
#define UNSHARD_PY_CUDA(...) ::unshard::python::check_call((__VA_ARGS__), #__VA_ARGS__)

// A library error raised by the CUDA runtime, NCCL or cuBLAS (check.cuh's messages), or by the
// world's set-up, is a runtime failure, not a bad argument: RuntimeError rather than ValueError.
bool is_runtime_failure(const char* what) {
  const std::string_view w(what);
  for (const std::string_view p : {"CUDA call", "NCCL call", "cuBLAS call", "cuda_world:"})
    if (w.substr(0, p.size()) == p) return true;
  return false;
}

// ---- the world on a chosen device list ----------------------------------------------------------

// session<M, B> builds its world as B::world(world_size, link); a cuda_world so built puts rank r
// on GPU r. py_world takes the device list of the thread that is constructing a session instead
// (set by device_list_scope around the construction, on that thread).
thread_local const std::vector<int>* constructing_devices = nullptr;

class device_list_scope {
 public:
  explicit device_list_scope(const std::vector<int>& d) { constructing_devices = &d; }
  ~device_list_scope() { constructing_devices = nullptr; }
  device_list_scope(const device_list_scope&) = delete;
  device_list_scope& operator=(const device_list_scope&) = delete;
};

class py_world : public cuda_world {
 public:
  py_world(std::size_t world_size, link_model) : cuda_world(devices_for(world_size)) {}

 private:
  static std::vector<int> devices_for(std::size_t n) {
    if (constructing_devices && constructing_devices->size() == n) return *constructing_devices;
    std::vector<int> d(n);
    std::iota(d.begin(), d.end(), 0);
    return d;
  }
};

// cuda_backend with that world (its static members take cuda_world&, which py_world is).
struct py_backend : cuda_backend {
  using world = py_world;
};
static_assert(backend<py_backend> && has_local_world<py_backend> && has_device_backing<py_backend> &&
              has_host_backing<py_backend> && has_copy_to_device<py_backend> && has_local_copy<py_backend> &&
              has_device_spans<py_backend>);

// ---- device inputs ------------------------------------------------------------------------------

bool device_memory(const void* p) {
  if (!p) return false;
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();
    return false;  // not known to CUDA: pageable host memory
  }
  return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

// The inputs of the call in flight, seen from the ranks' streams: each stream waits for `ready`
// (recorded on the caller's stream when the call began) before it reads a device input, and records
// its `read` event once the inputs of a step are in the model's buffers.
class call_inputs {
 public:
  call_inputs() = default;
  call_inputs(const call_inputs&) = delete;
  call_inputs& operator=(const call_inputs&) = delete;
  ~call_inputs() {
    for (auto& [stream, ev] : read_) cudaEventDestroy(ev.event);
  }

  void arm(cudaEvent_t ready) { ready_ = ready; }
  void disarm() { ready_ = nullptr; }

  // On a rank's thread (its device current), before and after a step's inputs are copied in.
  void before_read(cudaStream_t s) const {
    if (ready_) UNSHARD_CUDA_CHECK(cudaStreamWaitEvent(s, ready_, 0));
  }
  void after_read(cudaStream_t s) {
    std::lock_guard lock(mutex_);
    read_event& e = read_[s];
    if (!e.event) UNSHARD_CUDA_CHECK(cudaEventCreateWithFlags(&e.event, cudaEventDisableTiming));
    UNSHARD_CUDA_CHECK(cudaEventRecord(e.event, s));
    e.pending = true;
  }

  // On the calling thread, once the call's ticks returned: `caller` waits for every read.
  void order_after_reads(cudaStream_t caller) {
    std::lock_guard lock(mutex_);
    for (auto& [stream, e] : read_)
      if (e.pending) {
        UNSHARD_PY_CUDA(cudaStreamWaitEvent(caller, e.event, 0));
        e.pending = false;
      }
  }

 private:
  struct read_event {
    cudaEvent_t event = nullptr;
    bool pending = false;
  };
  cudaEvent_t ready_ = nullptr;
  std::mutex mutex_;
  std::map<cudaStream_t, read_event> read_;
};

// cuda_ops whose upload also takes device memory (f32): s2v::model's begin_sink/begin_step place
// every input with ops.upload, and cuda_ops::upload widens host memory through pinned staging.
// Only begin_sink/begin_step run on it (a copy of the lane's ops: same stream, staging and handles).
class input_ops : public cuda_ops {
 public:
  explicit input_ops(const cuda_ops& lane) : cuda_ops(lane) {}

  void upload(float* dst, const tensor_view& src) {
    if (!device_memory(src.data())) return cuda_ops::upload(dst, src);
    if (src.type() != dtype::f32)
      throw_error("unshard python: a device input of dtype ", name_of(src.type()), " reached the model (f32 expected)");
    const auto n = static_cast<std::size_t>(src.numel());
    // cudaMemcpyDefault: the source may be on another GPU than this rank's (the caller's tensors live
    // on devices[0]; every step's rank reads the block's audio and cond_states).
    if (n) UNSHARD_CUDA_CHECK(cudaMemcpyAsync(dst, src.data(), n * sizeof(float), cudaMemcpyDefault, stream()));
  }
};
static_assert(op_set<input_ops>);

// ---- results in buffers the caller owns ---------------------------------------------------------

// Rank 0's results, copied out of the denoiser's landing areas into fresh device buffers on
// devices[0], keyed by the result vector the denoiser reads them for (s2v::block_result's latent,
// noise_pred[s], step_latent[s]: the addresses on_result then receives).
class result_buffers {
 public:
  result_buffers() = default;
  result_buffers(const result_buffers&) = delete;
  result_buffers& operator=(const result_buffers&) = delete;
  ~result_buffers() {
    taken_.clear();
    if (stream_) cudaStreamDestroy(stream_);
    if (done_) cudaEventDestroy(done_);
  }

  // On devices[0], current.
  void init(int device) {
    device_ = device;
    UNSHARD_PY_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    UNSHARD_PY_CUDA(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  }

  // The landing's floats, complete (the runtime synchronised the transfers that wrote them before
  // the tick returned), into a new buffer. Waits for the copy: the next tick's transfer may write
  // the landing again.
  void take(const std::vector<float>* key, const float* src, std::size_t floats) {
    float* p = nullptr;
    UNSHARD_PY_CUDA(cudaMalloc(reinterpret_cast<void**>(&p), std::max<std::size_t>(floats, 1) * sizeof(float)));
    device_buffer b(p, device_, floats);
    UNSHARD_PY_CUDA(cudaMemcpyAsync(p, src, floats * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
    UNSHARD_PY_CUDA(cudaStreamSynchronize(stream_));
    taken_[key] = std::move(b);
  }
  device_buffer claim(const std::vector<float>* key) {
    const auto it = taken_.find(key);
    if (it == taken_.end()) throw cuda_runtime_error("unshard python: a result was not delivered to device memory");
    device_buffer b = std::move(it->second);
    taken_.erase(it);
    return b;
  }
  void clear() { taken_.clear(); }

  // `caller` waits for every result written so far (they are complete already: take() waited; the
  // event keeps the contract if that wait goes).
  void order_after_writes(cudaStream_t caller) {
    UNSHARD_PY_CUDA(cudaEventRecord(done_, stream_));
    UNSHARD_PY_CUDA(cudaStreamWaitEvent(caller, done_, 0));
  }

 private:
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t done_ = nullptr;
  std::unordered_map<const std::vector<float>*, device_buffer> taken_;
};

// s2v::cuda_model with device inputs and device results (the two notes above); everything else,
// layers, buffers, state, the ledger, is the base's.
class py_model : public s2v::cuda_model {
 public:
  py_model(const s2v::config& c, const s2v::workload& w, const s2v::options& o, const s2v::cuda_options& co,
           call_inputs& inputs, result_buffers& results)
      : s2v::cuda_model(c, w, o, co), inputs_(inputs), results_(results) {}

  void begin_sink(state& s, const s2v::sink_inputs& in) const {
    inputs_.before_read(s.ops.stream());
    input_ops ops(s.ops);
    host_model().begin_sink(ops, s, in);
    inputs_.after_read(s.ops.stream());
  }
  void begin_step(state& s, const s2v::step_inputs& in) const {
    inputs_.before_read(s.ops.stream());
    input_ops ops(s.ops);
    host_model().begin_step(ops, s, in);
    inputs_.after_read(s.ops.stream());
  }

  // Device memory on the current device (devices[0]: the denoiser is built there) that rank 0's
  // results land in; read() hands a copy to the result buffers instead of the host vector.
  class landing {
   public:
    landing(std::size_t floats, result_buffers* results) : floats_(floats), results_(results) {
      UNSHARD_PY_CUDA(cudaMalloc(reinterpret_cast<void**>(&p_), std::max<std::size_t>(floats, 1) * sizeof(float)));
    }
    landing(landing&& o) noexcept
        : p_(std::exchange(o.p_, nullptr)), floats_(o.floats_), results_(o.results_) {}
    landing& operator=(landing&&) = delete;
    ~landing() {
      if (p_) cudaFree(p_);
    }
    float* data() noexcept { return p_; }
    void read(std::vector<float>& out) const {
      out.clear();
      results_->take(&out, p_, floats_);
    }

   private:
    float* p_ = nullptr;
    std::size_t floats_;
    result_buffers* results_;
  };
  landing make_landing(std::size_t floats) const { return landing(floats, &results_); }

 private:
  call_inputs& inputs_;
  result_buffers& results_;
};
static_assert(unshard::model<py_model>);

using session_t = session<py_model, py_backend>;
using denoiser_t = s2v::denoiser<session_t, py_model>;

// ---- the caller's stream ------------------------------------------------------------------------

struct caller_stream {
  cudaStream_t stream = nullptr;
  int device = 0;
};

caller_stream caller_of(std::uintptr_t handle, int fallback_device) {
  caller_stream c{reinterpret_cast<cudaStream_t>(handle), fallback_device};
#if CUDART_VERSION >= 12080
  if (c.stream != nullptr && c.stream != cudaStreamLegacy && c.stream != cudaStreamPerThread) {
    int d = 0;
    const cudaError_t e = cudaStreamGetDevice(c.stream, &d);
    if (e != cudaSuccess) {
      cudaGetLastError();
      throw_error("stream ", handle, " is not a CUDA stream of this process (", cudaGetErrorName(e), ": ",
                  cudaGetErrorString(e), ")");
    }
    c.device = d;
  }
#endif
  return c;
}

// ---- the denoiser -------------------------------------------------------------------------------

class engine final : public cuda_denoiser {
 public:
  explicit engine(const cuda_job& job) : devices_(job.devices), ready_(devices_.size(), nullptr) {
    if (devices_.size() != job.options.world_size)
      throw cuda_runtime_error("unshard python: " + std::to_string(devices_.size()) + " devices for world size " +
                               std::to_string(job.options.world_size));
    cuda::device_guard on(devices_[0]);
    results_.init(devices_[0]);
    s2v::cuda_options co;
    co.precision = job.bf16_compute ? cuda_precision::bf16 : cuda_precision::f32;
    co.fp8_weights = job.options.policy.fp8;  // fp8 policies: weight-only fp8 by default (dequantized per chunk)
    co.fp8_activations = job.fp8_activations ? cuda::fp8_activations::per_tensor : cuda::fp8_activations::none;
    co.attention_engine = make_cudnn_attention;  // cuDNN SDPA where built, else unshard's kernel (sdpa.cuh)
    model_ = std::make_unique<py_model>(job.config, job.workload, job.model_options, co, inputs_, results_);
    const checkpoint_weights base(*job.weights);
    const device_list_scope scope(devices_);
    if (job.lora) {
      const lora_weights<checkpoint_weights> merged(base, *job.lora, job.lora_alpha);
      session_ = std::make_unique<session_t>(*model_, merged, job.options);
    } else {
      session_ = std::make_unique<session_t>(*model_, base, job.options);
    }
    denoiser_ = std::make_unique<denoiser_t>(*model_, *session_, job.denoise);
  }

  ~engine() override {
    cuda::device_guard on(devices_[0]);
    denoiser_.reset();  // its landings (devices[0])
    session_.reset();   // joins the rank threads, frees every rank's memory
    model_.reset();
    for (std::size_t i = 0; i < ready_.size(); ++i)
      if (ready_[i]) cudaEventDestroy(ready_[i]);
  }

  const memory_plan& plan() const override { return session_->plan(); }
  const unshard::schedule& schedule() const override { return session_->schedule(); }
  std::size_t world_size() const override { return session_->world_size(); }
  cuda_rank_stats stats(std::size_t r) const override {
    return {session_->plan().ranks.at(r).peak(), session_->measured(r).peak_bytes, session_->runtime(r).bytes_gathered(),
            session_->runtime(r).forwards()};
  }
  std::size_t ticks_run() const override { return denoiser_->ticks_run(); }
  const std::vector<int>& devices() const override { return devices_; }

  void sink(const s2v::sink_inputs& in, std::uintptr_t stream) override {
    cuda::device_guard on(devices_[0]);
    const caller_stream c = begin_call(stream);
    try {
      denoiser_->sink(in);
    } catch (...) {
      end_call(c, false);
      throw;
    }
    end_call(c, true);
  }

  std::vector<cuda_block_result> denoise(std::span<const s2v::block> blocks, bool all_steps,
                                         std::uintptr_t stream) override {
    cuda::device_guard on(devices_[0]);
    const caller_stream c = begin_call(stream);
    std::vector<cuda_block_result> out;
    out.reserve(blocks.size());
    try {
      denoiser_->set_all_steps(all_steps);
      denoiser_->denoise(blocks, [&](s2v::block_result&& r) {
        cuda_block_result d;
        d.clip = r.clip;
        d.block = r.block;
        d.latent = results_.claim(&r.latent);
        for (const auto& v : r.noise_pred) d.noise_pred.push_back(results_.claim(&v));
        for (const auto& v : r.step_latent) d.step_latent.push_back(results_.claim(&v));
        out.push_back(std::move(d));
      });
    } catch (...) {
      end_call(c, false);
      throw;
    }
    end_call(c, true);
    return out;
  }

 private:
  // The ranks' reads of this call's device inputs start after what the caller's stream holds now.
  // Nothing has run yet: a failure here is the stream argument's (unshard::error, ValueError).
  caller_stream begin_call(std::uintptr_t handle) {
    const caller_stream c = caller_of(handle, devices_[0]);
    const std::size_t slot = slot_of(c.device);
    try {
      cuda::device_guard on(c.device);
      if (!ready_[slot]) UNSHARD_PY_CUDA(cudaEventCreateWithFlags(&ready_[slot], cudaEventDisableTiming));
      UNSHARD_PY_CUDA(cudaEventRecord(ready_[slot], c.stream));
    } catch (const std::exception& e) {
      throw_error("stream ", handle, " (device ", c.device, "): cannot record an event on it: ", e.what());
    }
    inputs_.arm(ready_[slot]);
    return c;
  }
  // The caller's stream then waits for those reads and for the results (no host wait).
  void end_call(const caller_stream& c, bool ok) {
    inputs_.disarm();
    results_.clear();  // a failed call's undelivered results
    try {
      cuda::device_guard on(c.device);
      inputs_.order_after_reads(c.stream);
      results_.order_after_writes(c.stream);
    } catch (...) {
      if (ok) throw;
    }
  }
  std::size_t slot_of(int device) {
    for (std::size_t i = 0; i < devices_.size(); ++i)
      if (devices_[i] == device) return i;
    for (std::size_t i = 0; i < devices_extra_.size(); ++i)
      if (devices_extra_[i] == device) return devices_.size() + i;
    devices_extra_.push_back(device);  // a caller stream on a GPU that runs no rank
    ready_.push_back(nullptr);
    return ready_.size() - 1;
  }

  std::vector<int> devices_;
  std::vector<int> devices_extra_;
  std::vector<cudaEvent_t> ready_;  // per device of a caller stream (devices_, then devices_extra_)
  call_inputs inputs_;
  result_buffers results_;
  // Destroyed first (explicitly, in ~engine): the denoiser, the session, the model.
  std::unique_ptr<py_model> model_;
  std::unique_ptr<session_t> session_;
  std::unique_ptr<denoiser_t> denoiser_;
};

}  // namespace

int cuda_device_count(std::string& why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    why = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
    return 0;
  }
  if (n == 0) why = "cudaGetDeviceCount found no device";
  return n;
}

bool cudnn_attention_built() {
#ifdef UNSHARD_HAVE_CUDNN_FRONTEND
  return true;
#else
  return false;
#endif
}

int cuda_runtime_version() { return CUDART_VERSION; }

void free_device_buffer(int device, void* data) noexcept {
  if (!data) return;
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
  if (previous != device) cudaSetDevice(device);
  cudaFree(data);
  if (previous >= 0 && previous != device) cudaSetDevice(previous);
  cudaGetLastError();  // a deleter reports nothing
}

void copy_device_to_host(int device, const void* src, void* dst, std::size_t bytes) {
  cuda::device_guard on(device);
  UNSHARD_PY_CUDA(cudaDeviceSynchronize());
  if (bytes) UNSHARD_PY_CUDA(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}

std::unique_ptr<cuda_denoiser> make_cuda_denoiser(const cuda_job& job) {
  try {
    return std::make_unique<engine>(job);
  } catch (const rank_failure&) {
    throw;  // RuntimeError already
  } catch (const out_of_memory&) {
    throw;
  } catch (const error& e) {
    if (is_runtime_failure(e.what())) throw cuda_runtime_error(e.what());
    throw;
  }
}

}  // namespace unshard::python
