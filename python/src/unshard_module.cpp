// unshard._unshard: Live Avatar's denoiser (models/liveavatar/denoiser.hpp) for Python.
//
// One LiveAvatarDenoiser owns its model, its session (one thread per rank, each holding its shard
// of the weights and the KV caches of its steps) and the denoiser over them; several may live at
// once. Tensors come in through nanobind's ndarray (DLPack or the buffer protocol: numpy, torch,
// CuPy, ...): an F32 C-contiguous host array is read in place (a tensor_view over its memory; the
// model copies it into its own buffers), anything else is converted once to F32. Results are numpy
// arrays. Library errors (unshard::error) become ValueError with the library's message; a failed
// rank becomes RuntimeError and leaves the denoiser unusable. The GIL is released while ranks run.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/filesystem.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "unshard/core/config.hpp"
#include "unshard/core/dtype.hpp"
#include "unshard/core/error.hpp"
#include "unshard/io/checkpoint.hpp"
#include "unshard/io/json_config.hpp"
#include "unshard/kernels/host/gemm.hpp"
#include "unshard/models/liveavatar/config.hpp"
#include "unshard/models/liveavatar/denoiser.hpp"
#include "unshard/models/liveavatar/loop_inputs.hpp"
#include "unshard/models/liveavatar/model.hpp"
#include "unshard/policy/parse_policy.hpp"
#include "unshard/runtime/checkpoint_weights.hpp"
#include "unshard/runtime/lora_weights.hpp"
#include "unshard/runtime/session.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

namespace s2v = unshard::s2v;
using session_t = unshard::session<s2v::model>;
using denoiser_t = s2v::denoiser<session_t>;

[[noreturn]] void raise(PyObject* type, const std::string& message) {
  PyErr_SetString(type, message.c_str());
  throw nb::python_error();
}

[[noreturn]] void raise_file_not_found(const std::filesystem::path& p, const char* what) {
  nb::object exc = nb::module_::import_("builtins")
                       .attr("FileNotFoundError")(ENOENT, std::string(what) + ": no such file", p.string());
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  throw nb::python_error();
}

std::string dims_string(std::span<const std::int64_t> d) {
  std::string s = "(";
  for (std::size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + (d.size() == 1 ? ",)" : ")");
}

std::string py_type_name(nb::handle h) { return Py_TYPE(h.ptr())->tp_name; }

// ---- tensors in -----------------------------------------------------------------------------

// One input as the library reads it: a view of the caller's memory (F32, C-contiguous, on the
// host) or of a converted copy. Holds whatever keeps that memory alive.
struct host_input {
  unshard::tensor_view view;
  std::vector<std::int64_t> dims;
  nb::ndarray<nb::ro> array;  // the caller's array (the source of `view` when not copied)
  std::vector<float> copy;    // the F32 values when the input had to be converted
  bool copied = false;

  host_input() = default;
  host_input(host_input&&) = default;
  host_input& operator=(host_input&&) = default;
  host_input(const host_input&) = delete;
  host_input& operator=(const host_input&) = delete;
};

const char* device_name(int type) {
  switch (type) {
    case 1: return "CPU";
    case 2: return "CUDA";
    case 3: return "CUDA host";
    case 4: return "OpenCL";
    case 7: return "Vulkan";
    case 8: return "Metal";
    case 10: return "ROCm";
    case 13: return "CUDA managed";
    case 14: return "oneAPI";
    default: return "non-host";
  }
}

// Host-accessible DLPack devices: CPU, CUDA pinned host memory, ROCm pinned host memory, CUDA managed.
bool host_readable(int type) { return type == 1 || type == 3 || type == 11 || type == 13; }

std::string dtype_string(nb::dlpack::dtype dt) {
  std::string base;
  switch (static_cast<nb::dlpack::dtype_code>(dt.code)) {
    case nb::dlpack::dtype_code::Int: base = "int"; break;
    case nb::dlpack::dtype_code::UInt: base = "uint"; break;
    case nb::dlpack::dtype_code::Float: base = "float"; break;
    case nb::dlpack::dtype_code::Bfloat: base = "bfloat"; break;
    case nb::dlpack::dtype_code::Complex: base = "complex"; break;
    case nb::dlpack::dtype_code::Bool: return "bool";
    default: base = "dtype code " + std::to_string(dt.code) + " of "; break;
  }
  std::string s = base + std::to_string(dt.bits);
  if (dt.lanes != 1) s += "x" + std::to_string(dt.lanes);
  return s;
}

// Element i of a strided array as float, or nullopt for a dtype that is not a real number.
using element_reader = float (*)(const std::byte*);
element_reader reader_of(nb::dlpack::dtype dt) {
  if (dt.lanes != 1) return nullptr;
  using code = nb::dlpack::dtype_code;
  const auto c = static_cast<code>(dt.code);
  if (c == code::Float && dt.bits == 32) return [](const std::byte* p) { float v; std::memcpy(&v, p, 4); return v; };
  if (c == code::Float && dt.bits == 64) return [](const std::byte* p) { double v; std::memcpy(&v, p, 8); return static_cast<float>(v); };
  if (c == code::Float && dt.bits == 16)
    return [](const std::byte* p) { std::uint16_t v; std::memcpy(&v, p, 2); return unshard::f16_bits_to_float(v); };
  if (c == code::Bfloat && dt.bits == 16)
    return [](const std::byte* p) { std::uint16_t v; std::memcpy(&v, p, 2); return unshard::bf16_bits_to_float(v); };
  if (c == code::Int) {
    switch (dt.bits) {
      case 8: return [](const std::byte* p) { std::int8_t v; std::memcpy(&v, p, 1); return static_cast<float>(v); };
      case 16: return [](const std::byte* p) { std::int16_t v; std::memcpy(&v, p, 2); return static_cast<float>(v); };
      case 32: return [](const std::byte* p) { std::int32_t v; std::memcpy(&v, p, 4); return static_cast<float>(v); };
      case 64: return [](const std::byte* p) { std::int64_t v; std::memcpy(&v, p, 8); return static_cast<float>(v); };
      default: return nullptr;
    }
  }
  if (c == code::UInt) {
    switch (dt.bits) {
      case 8: return [](const std::byte* p) { std::uint8_t v; std::memcpy(&v, p, 1); return static_cast<float>(v); };
      case 16: return [](const std::byte* p) { std::uint16_t v; std::memcpy(&v, p, 2); return static_cast<float>(v); };
      case 32: return [](const std::byte* p) { std::uint32_t v; std::memcpy(&v, p, 4); return static_cast<float>(v); };
      case 64: return [](const std::byte* p) { std::uint64_t v; std::memcpy(&v, p, 8); return static_cast<float>(v); };
      default: return nullptr;
    }
  }
  return nullptr;
}

// `obj` as an F32 host tensor named `name` in every error.
host_input host_f32(nb::handle obj, const std::string& name) {
  if (!obj.is_valid() || obj.is_none()) raise(PyExc_TypeError, name + " is None; expected an array");
  host_input in;
  if (!nb::try_cast(obj, in.array, false)) {
    // Not a DLPack or buffer-protocol object (a list, a negative-strided view numpy cannot
    // export, ...): numpy makes it an F32 C-contiguous array, once.
    nb::object converted;
    try {
      nb::module_ np = nb::module_::import_("numpy");
      converted = np.attr("ascontiguousarray")(obj, "dtype"_a = np.attr("float32"));
    } catch (nb::python_error& e) {
      raise(PyExc_TypeError, name + " is a " + py_type_name(obj) +
                                 ", not an array (expected a DLPack or buffer-protocol tensor, e.g. numpy or torch): " + e.what());
    }
    if (!nb::try_cast(converted, in.array, false))
      raise(PyExc_TypeError, name + " is a " + py_type_name(obj) + " that could not be converted to a float32 array");
    in.copied = true;  // numpy made the copy
  }
  const nb::ndarray<nb::ro>& a = in.array;
  if (!host_readable(a.device_type()))
    raise(PyExc_TypeError, name + " is on a " + device_name(a.device_type()) + " device (id " + std::to_string(a.device_id()) +
                               "); the host backend reads host memory (the CUDA backend of the S2V model is not built yet): "
                               "pass a host array");
  if (a.ndim() > unshard::shape::max_rank)
    raise(PyExc_ValueError, name + " has " + std::to_string(a.ndim()) + " dimensions (at most " +
                                std::to_string(unshard::shape::max_rank) + ")");
  in.dims.resize(a.ndim());
  std::int64_t numel = 1;
  for (std::size_t i = 0; i < a.ndim(); ++i) {
    in.dims[i] = static_cast<std::int64_t>(a.shape(i));
    numel *= in.dims[i];
  }
  const nb::dlpack::dtype dt = a.dtype();
  const element_reader read = reader_of(dt);
  if (!read)
    raise(PyExc_TypeError, name + " has dtype " + dtype_string(dt) + "; expected a real number array (float32, or float16/"
                               "bfloat16/float64/integers, converted to float32)");
  const bool f32 = dt.code == static_cast<std::uint8_t>(nb::dlpack::dtype_code::Float) && dt.bits == 32 && dt.lanes == 1;
  bool contiguous = true;
  std::int64_t expect = 1;
  for (std::size_t i = a.ndim(); i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != expect) contiguous = false;
    expect *= static_cast<std::int64_t>(a.shape(i));
  }
  const bool aligned = reinterpret_cast<std::uintptr_t>(a.data()) % alignof(float) == 0;
  const unshard::shape s{std::span<const std::int64_t>(in.dims)};
  if (f32 && contiguous && aligned) {
    in.view = unshard::tensor_view(const_cast<void*>(a.data()), unshard::dtype::f32, s);
    return in;
  }
  // Converted once, in C order, whatever the strides (negative ones included).
  in.copy.resize(static_cast<std::size_t>(numel));
  const std::size_t item = (dt.bits + 7) / 8;
  const auto* base = static_cast<const std::byte*>(a.data());
  std::vector<std::int64_t> idx(a.ndim(), 0);
  std::int64_t offset = 0;  // elements
  for (std::int64_t k = 0; k < numel; ++k) {
    in.copy[static_cast<std::size_t>(k)] = read(base + offset * static_cast<std::int64_t>(item));
    for (std::size_t d = a.ndim(); d-- > 0;) {
      ++idx[d];
      offset += a.stride(d);
      if (idx[d] < in.dims[d]) break;
      offset -= a.stride(d) * in.dims[d];
      idx[d] = 0;
    }
  }
  in.copied = true;
  in.view = unshard::tensor_view(in.copy.empty() ? nullptr : in.copy.data(), unshard::dtype::f32, s);
  return in;
}

std::span<const std::int64_t> strip_ones(std::span<const std::int64_t> d) {
  while (d.size() > 1 && d.front() == 1) d = d.subspan(1);
  return d;
}

// Raises ValueError naming `name` unless its shape is `want` once leading 1s are dropped.
void expect_shape(const host_input& t, std::initializer_list<std::int64_t> want, const char* layout, const std::string& name) {
  const std::vector<std::int64_t> w(want);
  const auto got = strip_ones(t.dims), expected = strip_ones(w);
  if (!std::equal(got.begin(), got.end(), expected.begin(), expected.end()))
    raise(PyExc_ValueError, name + " has shape " + dims_string(t.dims) + ", expected " + dims_string(w) + " " + layout +
                                " (leading 1s allowed)");
}

// ---- results out ----------------------------------------------------------------------------

using array4 = nb::ndarray<nb::numpy, float, nb::ndim<4>>;

nb::object to_numpy(std::vector<float>&& v, const std::array<std::int64_t, 4>& d) {
  auto* heap = new std::vector<float>(std::move(v));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
  const std::size_t dims[4] = {static_cast<std::size_t>(d[0]), static_cast<std::size_t>(d[1]), static_cast<std::size_t>(d[2]),
                               static_cast<std::size_t>(d[3])};
  return nb::cast(array4(heap->data(), 4, dims, owner));
}

// ---- the denoiser ---------------------------------------------------------------------------

unshard::dtype parse_dtype(const std::string& s) {
  if (s == "f32" || s == "float32") return unshard::dtype::f32;
  if (s == "bf16" || s == "bfloat16") return unshard::dtype::bf16;
  raise(PyExc_ValueError, "dtype must be 'f32' or 'bf16', got '" + s + "'");
}

// size: "WxH" / "W*H" or (W, H): Live Avatar's --size.
std::pair<std::int64_t, std::int64_t> parse_size_arg(nb::handle size) {
  if (nb::isinstance<nb::str>(size)) {
    const std::string v = nb::cast<std::string>(size);
    const auto x = v.find_first_of("x*");
    char* e1 = nullptr;
    char* e2 = nullptr;
    std::int64_t w = 0, h = 0;
    if (x != std::string::npos) {
      w = std::strtoll(v.substr(0, x).c_str(), &e1, 10);
      h = std::strtoll(v.substr(x + 1).c_str(), &e2, 10);
    }
    if (x == std::string::npos || x == 0 || x + 1 == v.size() || *e1 || *e2 || w <= 0 || h <= 0)
      raise(PyExc_ValueError, "size must be 'WxH' (e.g. '720x400') or (W, H), got '" + v + "'");
    return {w, h};
  }
  try {
    const auto p = nb::cast<std::pair<std::int64_t, std::int64_t>>(size);
    if (p.first <= 0 || p.second <= 0) raise(PyExc_ValueError, "size must be positive, got (" + std::to_string(p.first) + ", " + std::to_string(p.second) + ")");
    return p;
  } catch (const nb::cast_error&) {
    raise(PyExc_TypeError, "size must be 'WxH' or a (W, H) pair, got a " + py_type_name(size));
  }
}

std::size_t positive_count(std::optional<std::size_t> v, std::size_t fallback, const char* what) {
  if (!v) return fallback;
  if (*v == 0) raise(PyExc_ValueError, std::string(what) + " must be at least 1 (got 0)");
  return *v;
}

// One value per step: ints, or floats holding integers (a float32 draws tensor).
std::vector<std::int64_t> parse_draws(nb::handle rd, std::size_t steps, const std::string& name) {
  std::vector<std::int64_t> out;
  nb::object it;
  try {
    it = nb::iter(rd);
  } catch (nb::python_error&) {
    raise(PyExc_TypeError, name + " must be a sequence of one integer per step (" + std::to_string(steps) + "), got a " + py_type_name(rd));
  }
  std::size_t i = 0;
  for (nb::handle v : rd) {
    const std::string at = name + "[" + std::to_string(i++) + "]";
    if (PyBool_Check(v.ptr())) raise(PyExc_TypeError, at + " is a bool, not an integer");
    if (PyIndex_Check(v.ptr())) {  // int, numpy integers, integer tensors
      nb::object n = nb::steal(PyNumber_Index(v.ptr()));
      if (n.is_valid()) {
        int overflow = 0;
        const long long x = PyLong_AsLongLongAndOverflow(n.ptr(), &overflow);
        if (overflow) raise(PyExc_ValueError, at + " does not fit in 64 bits");
        out.push_back(x);
        continue;
      }
      PyErr_Clear();  // a float tensor has __index__ but refuses it: read it as a float below
    }
    const double d = PyFloat_AsDouble(v.ptr());
    if (d == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      raise(PyExc_TypeError, at + " is a " + py_type_name(v) + ", not a number");
    }
    if (!std::isfinite(d) || std::floor(d) != d || std::fabs(d) > 9.0e15)
      raise(PyExc_ValueError, at + " is " + nb::cast<std::string>(nb::repr(v)) + ", not an integer");
    out.push_back(static_cast<std::int64_t>(d));
  }
  if (out.size() != steps)
    raise(PyExc_ValueError, name + " has " + std::to_string(out.size()) + " values, expected one per denoising step (" +
                                std::to_string(steps) + ")");
  return out;
}

class live_avatar_denoiser {
 public:
  live_avatar_denoiser(const std::filesystem::path& config, const std::filesystem::path& weights,
                       std::optional<std::filesystem::path> lora, std::optional<double> lora_alpha, std::size_t world_size,
                       const std::string& policy, const std::string& schedule, const std::string& backend, nb::handle devices,
                       const std::string& gemm, const std::string& dtype, nb::handle size, std::optional<std::size_t> clips,
                       std::optional<std::size_t> blocks_per_clip, std::optional<std::size_t> steps,
                       std::optional<double> shift, std::uint64_t seed, nb::handle budget, bool strict,
                       std::optional<std::size_t> audio_frames, std::optional<std::pair<std::int64_t, std::int64_t>> motion_frames)
      : seed_(seed), draws_(seed) {
    using namespace unshard;
    if (backend == "cuda")
      raise(PyExc_NotImplementedError,
            "LiveAvatarDenoiser: the CUDA backend of the S2V model is not built yet (backend='cuda'); use backend='host'");
    if (backend != "host") raise(PyExc_ValueError, "backend must be 'host' or 'cuda', got '" + backend + "'");
    if (devices.is_valid() && !devices.is_none())
      raise(PyExc_ValueError, "devices applies to backend='cuda' only (the host backend's ranks are threads)");
    if (world_size == 0) raise(PyExc_ValueError, "world_size must be at least 1 (got 0)");
    if (lora_alpha && !lora) raise(PyExc_ValueError, "lora_alpha needs lora");
    if (lora_alpha && !std::isfinite(*lora_alpha)) raise(PyExc_ValueError, "lora_alpha must be a finite number");

    session_options opt;
    opt.world_size = world_size;
    opt.policy = parse_policy(policy).values;  // an unshard::error naming the term -> ValueError
    opt.schedule = parse_schedule(schedule);
    if (budget.is_valid() && !budget.is_none()) {
      if (nb::isinstance<nb::str>(budget)) opt.budget_bytes = parse_size(nb::cast<std::string>(budget), "budget");
      else {
        try {
          opt.budget_bytes = nb::cast<std::size_t>(budget);
        } catch (const nb::cast_error&) {
          raise(PyExc_TypeError, "budget must be a byte count or a size string such as '22GiB'");
        }
      }
    }
    s2v::options mo;
    mo.storage = parse_dtype(dtype);
    if (gemm != "blas" && gemm != "portable") raise(PyExc_ValueError, "gemm must be 'blas' or 'portable', got '" + gemm + "'");
    mo.gemm = gemm == "blas" ? gemm_path::blas : gemm_path::portable;
    mo.record_block_outputs = false;

    if (!std::filesystem::exists(config)) raise_file_not_found(config, "config");
    if (!std::filesystem::exists(weights)) raise_file_not_found(weights, "weights");
    if (lora && !std::filesystem::exists(*lora)) raise_file_not_found(*lora, "lora");

    // The loop: the config's streaming/scheduler sections, else Live Avatar's defaults at `size`;
    // the keywords given explicitly on top (as unshard-avatar --denoise's options).
    const nlohmann::json root = load_json_config(config, "liveavatar config");
    const s2v::config cfg = s2v::config::from_json(root, config.string());
    std::int64_t w = 720, h = 400;
    const bool size_given = size.is_valid() && !size.is_none();
    if (size_given) std::tie(w, h) = parse_size_arg(size);
    s2v::loop_spec fallback = s2v::default_loop(w, h);
    fallback.clips = positive_count(clips, fallback.clips, "clips");
    fallback.blocks_per_clip = positive_count(blocks_per_clip, fallback.blocks_per_clip, "blocks_per_clip");
    fallback.sampler.steps = positive_count(steps, fallback.sampler.steps, "steps");
    if (shift) {
      if (!(*shift > 0) || !std::isfinite(*shift)) raise(PyExc_ValueError, "shift must be a positive number");
      fallback.sampler.shift = *shift;
    }
    loop_ = s2v::parse_loop(root, config.string(), fallback);
    if (size_given) loop_.latent_hw = fallback.latent_hw;
    if (clips) loop_.clips = fallback.clips;
    if (blocks_per_clip) loop_.blocks_per_clip = fallback.blocks_per_clip;
    if (steps) loop_.sampler.steps = fallback.sampler.steps;
    if (shift) loop_.sampler.shift = fallback.sampler.shift;
    opt.steps = loop_.sampler.steps;

    // The workload is known up front: the latent size from the loop, the context zero-padded to
    // text_len (any L <= text_len rows are accepted at sink()), 4 audio columns per latent frame
    // and Live Avatar's 73/19 motion frames unless given, a noisy cache of one clip unless the
    // config sizes it.
    s2v::workload work;
    work.latent_hw = loop_.latent_hw;
    work.frames_per_block = loop_.frames_per_block;
    work.context_len = cfg.text_len;
    if (audio_frames) {
      if (*audio_frames == 0) raise(PyExc_ValueError, "audio_frames must be at least 1 (got 0)");
      work.audio_frames = static_cast<std::int64_t>(*audio_frames);
    }
    if (motion_frames) work.motion_frames = {motion_frames->first, motion_frames->second};
    const std::int64_t block_tokens = loop_.frames_per_block * (loop_.latent_hw[0] / 2) * (loop_.latent_hw[1] / 2);
    work.noisy_cache_tokens =
        loop_.noisy_cache_tokens ? loop_.noisy_cache_tokens : static_cast<std::int64_t>(loop_.blocks_per_clip) * block_tokens;
    work.cond_cache_tokens = loop_.cond_cache_tokens;
    work.denoising_steps = static_cast<std::int64_t>(loop_.sampler.steps);
    model_ = std::make_unique<s2v::model>(cfg, work, mo);
    const s2v::flow_match_euler check_sampler(loop_.sampler);  // refuses a bad sampler before any rank starts
    (void)check_sampler;

    const checkpoint ck = checkpoint::open(weights.string());
    for (const auto& n : unknown_tensors(*model_, ck, {"input.", "ref."})) {
      const std::string msg = weights.string() + ": unknown tensor '" + n + "'";
      if (strict) raise(PyExc_ValueError, msg + " (strict=True)");
      if (PyErr_WarnEx(PyExc_UserWarning, (msg + " ignored").c_str(), 1) < 0) throw nb::python_error();
    }
    use_one_blas_thread_per_rank();
    const checkpoint_weights base(ck);
    std::optional<checkpoint> lora_file;
    if (lora) lora_file.emplace(checkpoint::open(lora->string()));
    // Every tensor the model needs, with its shape, before any rank starts (a rank failing to load
    // would leave nothing usable): a missing or misshapen tensor is a ValueError naming it.
    const auto start = [&](const auto& w) {
      for (std::size_t l = 0; l < model_->layer_count(); ++l)
        for (std::size_t u = 0; u < model_->layer(l).subunit_count(); ++u)
          for (const param_spec& p : model_->layer(l).parameters(u)) {
            const stored_tensor st = w.describe(p.name);
            if (!(st.dims == p.dims))
              throw_error(w.origin(), ": tensor '", p.name, "' has shape ", st.dims.to_string(), ", the model expects ",
                          p.dims.to_string());
          }
      session_ = std::make_unique<session_t>(*model_, w, opt);
    };
    {
      nb::gil_scoped_release release;  // each rank loads its shard
      if (lora_file) {
        const lora_weights<checkpoint_weights> merged(base, *lora_file, lora_alpha);
        start(merged);
      } else {
        start(base);
      }
    }
    denoiser_ = std::make_unique<denoiser_t>(*model_, *session_, s2v::denoise_options{loop_.sampler, loop_.blocks_per_clip, false});
  }

  // ---- calls ----

  void sink(nb::handle ref_latents, nb::handle motion_latents, nb::handle context, nb::handle audio, nb::handle cond_states) {
    std::unique_lock lock = enter();
    const s2v::geometry& g = model_->geometry();
    std::vector<std::string> converted;
    host_input ref = input(ref_latents, "ref_latents", converted), motion = input(motion_latents, "motion_latents", converted),
               ctx = input(context, "context", converted);
    expect_shape(ref, {i64(g.in_dim), 1, i64(g.height), i64(g.width)}, "[C, 1, H, W]", "ref_latents");
    expect_shape(motion, {i64(s2v::pack_channels), i64(g.motion_latent_frames), i64(g.height), i64(g.width)},
                 "[16, motion latent frames, H, W]", "motion_latents");
    check_context(ctx);
    // The official _forward_sink is passed them but reads only x's spatial size: checked, not used.
    if (audio.is_valid() && !audio.is_none()) {
      host_input a = input(audio, "audio", converted);
      expect_shape(a, {i64(s2v::audio_layers), i64(g.audio_dim), i64(g.audio_frames)}, "[25, audio_dim, audio frames]", "audio");
    }
    if (cond_states.is_valid() && !cond_states.is_none()) {
      host_input c = input(cond_states, "cond_states", converted);
      expect_shape(c, {i64(g.cond_dim), i64(g.frames), i64(g.height), i64(g.width)}, "[cond_dim, F, H, W]", "cond_states");
    }
    const s2v::sink_inputs in{ref.view, motion.view, ctx.view};
    run([&] { denoiser_->sink(in); });
    context_ = std::move(ctx);  // every step reads it: held (not copied) until the next sink
    sunk_ = true;
    last_converted_ = std::move(converted);
  }

  nb::object denoise_block(nb::handle noise, nb::handle audio, nb::handle cond_states, nb::handle relative_dist,
                           std::optional<std::size_t> clip, std::optional<std::size_t> block, bool all_steps) {
    std::unique_lock lock = enter();
    std::vector<std::string> converted;
    std::size_t next = next_;
    block_inputs b = block_of(noise, audio, cond_states, relative_dist, clip, block, "", next, converted);
    require_sink();
    std::vector<s2v::block_result> results = run_blocks(std::span<const s2v::block>(&b.block, 1), all_steps);
    next_ = next;
    last_converted_ = std::move(converted);
    return result_object(std::move(results.front()), all_steps);
  }

  // Several blocks in flight under `steps`: one denoise over all of them; results in order.
  nb::list denoise_many(nb::handle blocks, bool all_steps) {
    std::unique_lock lock = enter();
    std::vector<std::string> converted;
    std::size_t next = next_;
    std::vector<block_inputs> inputs;
    std::size_t k = 0;
    for (nb::handle item : blocks) {
      const std::string at = "blocks[" + std::to_string(k++) + "]";
      if (!nb::isinstance<nb::dict>(item))
        raise(PyExc_TypeError, at + " is a " + py_type_name(item) + "; expected a dict with noise, audio, cond_states "
                                    "(and optionally relative_dist, clip, block)");
      nb::dict d = nb::borrow<nb::dict>(item);
      for (auto [key, value] : d) {
        const std::string name = nb::isinstance<nb::str>(key) ? nb::cast<std::string>(key) : std::string("?");
        if (name != "noise" && name != "audio" && name != "cond_states" && name != "relative_dist" && name != "clip" &&
            name != "block")
          raise(PyExc_ValueError, at + " has an unknown key " + nb::cast<std::string>(nb::repr(key)) +
                                      " (expected noise, audio, cond_states, relative_dist, clip, block)");
      }
      const auto get = [&](const char* key) { return nb::handle(PyDict_GetItemString(d.ptr(), key)); };  // borrowed or null
      const auto count = [&](const char* key) -> std::optional<std::size_t> {
        nb::handle v = get(key);
        if (!v.is_valid() || v.is_none()) return std::nullopt;
        try {
          return nb::cast<std::size_t>(v);
        } catch (const nb::cast_error&) {
          raise(PyExc_TypeError, at + "['" + key + "'] must be a non-negative integer");
        }
      };
      for (const char* key : {"noise", "audio", "cond_states"})
        if (!get(key).is_valid()) raise(PyExc_ValueError, at + " has no '" + key + "'");
      inputs.push_back(block_of(get("noise"), get("audio"), get("cond_states"), get("relative_dist"), count("clip"),
                                count("block"), at, next, converted));
    }
    nb::list out;
    if (inputs.empty()) return out;
    require_sink();
    std::vector<s2v::block> list;
    for (const block_inputs& b : inputs) list.push_back(b.block);
    std::vector<s2v::block_result> results = run_blocks(list, all_steps);
    next_ = next;
    last_converted_ = std::move(converted);
    for (auto& r : results) out.append(result_object(std::move(r), all_steps));
    return out;
  }

  // ---- what it planned and measured ----

  nb::dict plan() const {
    const unshard::memory_plan& p = session_->plan();
    nb::dict d;
    d["world_size"] = p.world_size;
    d["policy"] = p.policy;
    d["schedule"] = p.schedule;
    d["budget_bytes"] = p.budget_bytes;
    d["peak_bytes"] = p.peak_bytes();
    if (p.effective_chunk_bytes) d["effective_chunk_bytes"] = p.effective_chunk_bytes;
    nb::list ranks;
    for (const auto& r : p.ranks) {
      nb::dict rd, terms;
      rd["rank"] = r.rank;
      rd["peak_bytes"] = r.peak();
      for (auto c : unshard::all_memory_categories) terms[nb::str(std::string(unshard::name_of(c)).c_str())] = r.terms[c];
      rd["terms"] = terms;
      rd["host_bytes"] = r.host_bytes;
      ranks.append(rd);
    }
    d["ranks"] = ranks;
    return d;
  }

  nb::list peaks() const {
    nb::list out;
    for (std::size_t r = 0; r < session_->world_size(); ++r) {
      nb::dict d;
      d["rank"] = r;
      d["planned_peak_bytes"] = session_->plan().ranks[r].peak();
      d["measured_peak_bytes"] = session_->measured(r).peak_bytes;
      d["bytes_gathered"] = session_->runtime(r).bytes_gathered();
      d["forwards"] = session_->runtime(r).forwards();
      out.append(d);
    }
    return out;
  }

  nb::dict input_shapes() const {
    const s2v::geometry& g = model_->geometry();
    nb::dict d;
    d["noise"] = nb::make_tuple(g.in_dim, g.frames, g.height, g.width);
    d["cond_states"] = nb::make_tuple(g.cond_dim, g.frames, g.height, g.width);
    d["audio"] = nb::make_tuple(s2v::audio_layers, g.audio_dim, g.audio_frames);
    d["ref_latents"] = nb::make_tuple(g.in_dim, 1, g.height, g.width);
    d["motion_latents"] = nb::make_tuple(s2v::pack_channels, g.motion_latent_frames, g.height, g.width);
    d["context"] = nb::make_tuple(g.text_len, g.text_dim);
    return d;
  }

  nb::dict loop() const {
    const s2v::geometry& g = model_->geometry();
    nb::dict d;
    d["clips"] = loop_.clips;
    d["blocks_per_clip"] = loop_.blocks_per_clip;
    d["frames_per_block"] = loop_.frames_per_block;
    d["latent_hw"] = nb::make_tuple(loop_.latent_hw[0], loop_.latent_hw[1]);
    d["steps"] = loop_.sampler.steps;
    d["shift"] = loop_.sampler.shift;
    d["num_train_timesteps"] = loop_.sampler.num_train_timesteps;
    d["noisy_cache_tokens"] = g.noisy_slots;
    d["cond_cache_tokens"] = g.cond_slots;
    d["block_tokens"] = g.block_tokens;
    d["cond_tokens"] = g.cond_tokens;
    d["audio_frames"] = g.audio_frames;
    d["motion_frames"] = nb::make_tuple(g.motion_video_frames, g.motion_latent_frames);
    d["text_len"] = g.text_len;
    d["seed"] = seed_;
    return d;
  }

  std::vector<float> timesteps() const {
    const auto t = denoiser_->sampler().timesteps();
    return {t.begin(), t.end()};
  }
  std::vector<float> sigmas() const {
    const auto s = denoiser_->sampler().sigmas();
    return {s.begin(), s.end()};
  }
  std::size_t steps() const { return model_->geometry().steps; }
  std::size_t world_size() const { return session_->world_size(); }
  std::size_t blocks_per_clip() const { return loop_.blocks_per_clip; }
  std::string schedule() const { return unshard::name_of(session_->schedule().kind); }
  std::size_t ticks_run() const { return denoiser_->ticks_run(); }
  std::pair<std::size_t, std::size_t> next_block() const { return {next_ / loop_.blocks_per_clip, next_ % loop_.blocks_per_clip}; }
  bool sunk() const { return sunk_; }
  nb::tuple latent_shape() const {
    const auto d = model_->geometry().output_shape();
    return nb::make_tuple(d[0], d[1], d[2], d[3]);
  }
  const std::vector<std::string>& last_converted() const { return last_converted_; }
  std::string repr() const {
    const s2v::geometry& g = model_->geometry();
    return "LiveAvatarDenoiser(world_size=" + std::to_string(session_->world_size()) + ", policy='" + session_->plan().policy +
           "', schedule='" + schedule() + "', steps=" + std::to_string(g.steps) + ", latent=(" + std::to_string(g.in_dim) + ", " +
           std::to_string(g.frames) + ", " + std::to_string(g.height) + ", " + std::to_string(g.width) + "), next clip " +
           std::to_string(next_ / loop_.blocks_per_clip) + " block " + std::to_string(next_ % loop_.blocks_per_clip) + ")";
  }

 private:
  struct block_inputs {
    host_input noise, audio, cond;
    s2v::block block;
  };

  static std::int64_t i64(std::size_t v) { return static_cast<std::int64_t>(v); }

  std::unique_lock<std::mutex> enter() {
    std::unique_lock lock(busy_, std::try_to_lock);
    if (!lock.owns_lock())
      raise(PyExc_RuntimeError, "LiveAvatarDenoiser: a call is already running on this denoiser (in another thread)");
    if (failed_)
      raise(PyExc_RuntimeError, "LiveAvatarDenoiser: a rank failed in an earlier call (" + failure_ +
                                    "); this denoiser cannot run again: make a new one");
    return lock;
  }

  host_input input(nb::handle obj, const std::string& name, std::vector<std::string>& converted) const {
    host_input in = host_f32(obj, name);
    if (in.copied) converted.push_back(name);
    return in;
  }

  void check_context(const host_input& ctx) const {
    const s2v::geometry& g = model_->geometry();
    const auto d = strip_ones(ctx.dims);
    if (d.size() != 2 || d[1] != i64(g.text_dim) || d[0] > i64(g.text_len) || d[0] < 1)
      raise(PyExc_ValueError, "context has shape " + dims_string(ctx.dims) + ", expected (L, " + std::to_string(g.text_dim) +
                                  ") with 1 <= L <= text_len = " + std::to_string(g.text_len) + " (zero-padded to text_len)");
  }

  void require_sink() const {
    if (!sunk_)
      raise(PyExc_RuntimeError,
            "liveavatar denoiser: denoise before sink (the cond KV cache is empty; run the prefill first: call sink())");
  }

  // One block's inputs, checked; `next` is the stream position the block takes (advanced past it).
  block_inputs block_of(nb::handle noise, nb::handle audio, nb::handle cond_states, nb::handle relative_dist,
                        std::optional<std::size_t> clip, std::optional<std::size_t> block, const std::string& at,
                        std::size_t& next, std::vector<std::string>& converted) const {
    const s2v::geometry& g = model_->geometry();
    const std::size_t bpc = loop_.blocks_per_clip;
    const auto name = [&](const char* key) { return at.empty() ? std::string(key) : at + "['" + key + "']"; };
    block_inputs b;
    b.noise = input(noise, name("noise"), converted);
    b.audio = input(audio, name("audio"), converted);
    b.cond = input(cond_states, name("cond_states"), converted);
    expect_shape(b.noise, {i64(g.in_dim), i64(g.frames), i64(g.height), i64(g.width)}, "[C, F, H, W]", name("noise"));
    expect_shape(b.audio, {i64(s2v::audio_layers), i64(g.audio_dim), i64(g.audio_frames)}, "[25, audio_dim, audio frames]",
                 name("audio"));
    expect_shape(b.cond, {i64(g.cond_dim), i64(g.frames), i64(g.height), i64(g.width)}, "[cond_dim, F, H, W]", name("cond_states"));
    // Either counter defaults to the stream's next block: block b of clip r = next // bpc; a clip
    // given alone starts at its block 0 unless it is the clip the stream is in.
    const std::size_t r = clip ? *clip : next / bpc;
    const std::size_t k = block ? *block : (r == next / bpc ? next % bpc : 0);
    if (k >= bpc)
      raise(PyExc_ValueError, name("block") + " is " + std::to_string(k) + ", past the clip's " + std::to_string(bpc) +
                                  " blocks (blocks_per_clip)");
    b.block.noise = b.noise.view;
    b.block.audio = b.audio.view;
    b.block.cond_states = b.cond.view;
    b.block.clip = r;
    b.block.block = k;
    if (relative_dist.is_valid() && !relative_dist.is_none()) {
      b.block.relative_dist = parse_draws(relative_dist, g.steps, name("relative_dist"));
    } else {
      for (std::size_t s = 0; s < g.steps; ++s) b.block.relative_dist.push_back(draws_(r, k, s));
    }
    next = r * bpc + k + 1;
    return b;
  }

  std::vector<s2v::block_result> run_blocks(std::span<const s2v::block> blocks, bool all_steps) {
    std::vector<s2v::block_result> results;
    results.reserve(blocks.size());
    denoiser_->set_all_steps(all_steps);
    run([&] { denoiser_->denoise(blocks, [&](s2v::block_result&& r) { results.push_back(std::move(r)); }); });
    if (results.size() != blocks.size())
      raise(PyExc_RuntimeError, "LiveAvatarDenoiser: " + std::to_string(results.size()) + " results for " +
                                    std::to_string(blocks.size()) + " blocks");
    return results;
  }

  // Runs f with the GIL released; a failed rank leaves the session (and this object) unusable.
  template <class F>
  void run(F&& f) {
    try {
      nb::gil_scoped_release release;
      f();
    } catch (const unshard::rank_failure& e) {
      failed_ = true;
      failure_ = e.what();
      throw;
    }
  }

  nb::object result_object(s2v::block_result&& r, bool all_steps) const {
    const auto d = model_->geometry().output_shape();
    nb::object latent = to_numpy(std::move(r.latent), d);
    if (!all_steps) return latent;
    nb::dict out;
    out["clip"] = r.clip;
    out["block"] = r.block;
    out["latent"] = latent;
    nb::list noise_pred, step_latent;
    for (auto& v : r.noise_pred) noise_pred.append(to_numpy(std::move(v), d));
    for (auto& v : r.step_latent) step_latent.append(to_numpy(std::move(v), d));
    out["noise_pred"] = noise_pred;
    out["step_latent"] = step_latent;
    return out;
  }

  // Destroyed in reverse: the denoiser, then the session (joins the rank threads), then the model.
  std::unique_ptr<s2v::model> model_;
  std::unique_ptr<session_t> session_;
  std::unique_ptr<denoiser_t> denoiser_;
  s2v::loop_spec loop_;
  std::uint64_t seed_;
  s2v::relative_dist_draws draws_;
  host_input context_;  // the sink's context: every step reads it
  std::size_t next_ = 0;  // the next block's position in the stream: clip next_ / bpc, block next_ % bpc
  bool sunk_ = false;
  bool failed_ = false;
  std::string failure_;
  std::vector<std::string> last_converted_;
  std::mutex busy_;
};

}  // namespace

NB_MODULE(_unshard, m) {
  m.doc() = "unshard: Live Avatar's S2V denoiser over sharded weights (host backend)";
  m.attr("__version__") = std::to_string(UNSHARD_VERSION_MAJOR) + "." + std::to_string(UNSHARD_VERSION_MINOR) + "." +
                          std::to_string(UNSHARD_VERSION_PATCH);
  m.attr("blas_available") = unshard::blas_available();

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const unshard::rank_failure& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    } catch (const unshard::out_of_memory& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    } catch (const unshard::error& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def(
      "_debug_view_pointer",
      [](nb::handle array) {
        host_input in = host_f32(array, "array");
        return reinterpret_cast<std::uintptr_t>(in.view.data());
      },
      "array"_a.none(),
      "The address the library reads for `array`: its own data pointer for an F32 C-contiguous host array "
      "(read in place), that of a converted copy otherwise.");

  nb::class_<live_avatar_denoiser>(m, "LiveAvatarDenoiser")
      .def(
          "__init__",
          [](live_avatar_denoiser* self, const std::filesystem::path& config, const std::filesystem::path& weights,
             std::optional<std::filesystem::path> lora, std::optional<double> lora_alpha, std::size_t world_size,
             const std::string& policy, const std::string& schedule, const std::string& backend, nb::handle devices,
             const std::string& gemm, const std::string& dtype, nb::handle size, std::optional<std::size_t> clips,
             std::optional<std::size_t> blocks_per_clip, std::optional<std::size_t> steps, std::optional<double> shift,
             std::uint64_t seed, nb::handle budget, bool strict, std::optional<std::size_t> audio_frames,
             std::optional<std::pair<std::int64_t, std::int64_t>> motion_frames) {
            new (self) live_avatar_denoiser(config, weights, std::move(lora), lora_alpha, world_size, policy, schedule, backend,
                                            devices, gemm, dtype, size, clips, blocks_per_clip, steps, shift, seed, budget,
                                            strict, audio_frames, motion_frames);
          },
          "config"_a, "weights"_a, "lora"_a = nb::none(), "lora_alpha"_a = nb::none(), "world_size"_a = 1,
          "policy"_a = "prefetch:1", "schedule"_a = "steps", "backend"_a = "host", "devices"_a = nb::none(),
          "gemm"_a = "blas", "dtype"_a = "f32", "size"_a = nb::none(), "clips"_a = nb::none(),
          "blocks_per_clip"_a = nb::none(), "steps"_a = nb::none(), "shift"_a = nb::none(), "seed"_a = 0,
          "budget"_a = nb::none(), "strict"_a = false, "audio_frames"_a = nb::none(), "motion_frames"_a = nb::none())
      .def("sink", &live_avatar_denoiser::sink, "ref_latents"_a.none(), "motion_latents"_a.none(), "context"_a.none(), "audio"_a = nb::none(),
           "cond_states"_a = nb::none(),
           "The cond prefill: reference and motion latents into every step's cond cache. `context` [L <= text_len, "
           "text_dim] is held (not copied) and read by every later step.")
      .def("denoise_block", &live_avatar_denoiser::denoise_block, "noise"_a.none(), "audio"_a.none(), "cond_states"_a.none(),
           "relative_dist"_a = nb::none(), "clip"_a = nb::none(), "block"_a = nb::none(), "all_steps"_a = false,
           "All the steps of the next block; returns its latent [C, F, H, W] (a dict with every step's noise_pred and "
           "latent as well when all_steps=True).")
      .def("_denoise_many", &live_avatar_denoiser::denoise_many, "blocks"_a, "all_steps"_a = false)
      .def("plan", &live_avatar_denoiser::plan, "The ledger: each rank's planned peak, term by term (bytes).")
      .def("peaks", &live_avatar_denoiser::peaks,
           "Per rank: planned and measured peak bytes, bytes gathered and forwards run so far.")
      .def_prop_ro("input_shapes", &live_avatar_denoiser::input_shapes)
      .def_prop_ro("loop", &live_avatar_denoiser::loop)
      .def_prop_ro("timesteps", &live_avatar_denoiser::timesteps)
      .def_prop_ro("sigmas", &live_avatar_denoiser::sigmas)
      .def_prop_ro("steps", &live_avatar_denoiser::steps)
      .def_prop_ro("world_size", &live_avatar_denoiser::world_size)
      .def_prop_ro("blocks_per_clip", &live_avatar_denoiser::blocks_per_clip)
      .def_prop_ro("schedule", &live_avatar_denoiser::schedule)
      .def_prop_ro("ticks_run", &live_avatar_denoiser::ticks_run)
      .def_prop_ro("next_block", &live_avatar_denoiser::next_block, "(clip, block) the next denoise_block call takes")
      .def_prop_ro("sunk", &live_avatar_denoiser::sunk)
      .def_prop_ro("latent_shape", &live_avatar_denoiser::latent_shape)
      .def_prop_ro("_last_converted", &live_avatar_denoiser::last_converted,
                   "Names of the inputs of the last call that were converted (copied) instead of read in place.")
      .def("__repr__", &live_avatar_denoiser::repr);
}
