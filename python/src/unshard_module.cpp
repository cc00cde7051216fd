// unshard._unshard: Live Avatar's denoiser (models/liveavatar/denoiser.hpp) for Python.
//
// One LiveAvatarDenoiser owns its model, its session (one thread per rank, each holding its shard
// of the weights and the KV caches of its steps) and the denoiser over them; several may live at
// once. Tensors come in through nanobind's ndarray (DLPack or the buffer protocol: numpy, torch,
// CuPy, ...): an F32 C-contiguous host array is read in place (a tensor_view over its memory; the
// model copies it into its own buffers), anything else is converted once to F32. Results are numpy
// arrays. Library errors (unshard::error) become ValueError with the library's message; a failed
// rank becomes RuntimeError and leaves the denoiser unusable. The GIL is released while ranks run.
//
// backend="cuda" (when the module is built with CUDA: cuda_denoiser.hpp/.cu, UNSHARD_PYTHON_CUDA)
// runs the same denoiser over s2v::cuda_model, rank r on GPU devices[r]; a float32 C-contiguous
// CUDA tensor on devices[0] is read in place (device to device into the model's buffers), a host
// one as above; results are DLPack tensors on devices[0] that the caller owns. This unit includes
// no CUDA header: it sees the CUDA backend only through cuda_denoiser.hpp.
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
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "unshard/core/config.hpp"
#include "unshard/core/dtype.hpp"
#include "unshard/core/error.hpp"
#include "unshard/core/world_size.hpp"
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

#include "cuda_denoiser.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

namespace s2v = unshard::s2v;
namespace upy = unshard::python;
using session_t = unshard::session<s2v::model>;
using denoiser_t = s2v::denoiser<session_t>;

// Sets a Python exception from a message that need not be valid UTF-8 (a message quoting the bytes
// of a binary file): invalid bytes become \xNN escapes instead of a UnicodeDecodeError.
void set_error(PyObject* type, const char* message) {
  PyObject* s = PyUnicode_DecodeUTF8(message, static_cast<Py_ssize_t>(std::strlen(message)), "backslashreplace");
  if (!s) {
    PyErr_Clear();
    PyErr_SetString(type, "(an error whose message could not be decoded)");
    return;
  }
  PyErr_SetObject(type, s);
  Py_DECREF(s);
}

[[noreturn]] void raise(PyObject* type, const std::string& message) {
  set_error(type, message.c_str());
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

// An integer argument in [lo, hi], named `name` in its errors: a Python int (or anything with
// __index__, such as a numpy integer), not a bool. A bool or a non-integer is a TypeError, an
// integer outside the range a ValueError; both name the argument (nanobind's own conversion would
// give a generic TypeError for a negative value and take True as 1).
std::uint64_t int_arg(nb::handle v, const std::string& name, std::uint64_t lo, std::uint64_t hi) {
  if (PyBool_Check(v.ptr())) raise(PyExc_TypeError, name + " must be an integer, not a bool");
  if (!PyIndex_Check(v.ptr())) raise(PyExc_TypeError, name + " must be an integer, got a " + py_type_name(v));
  nb::object n = nb::steal(PyNumber_Index(v.ptr()));
  if (!n.is_valid()) {
    PyErr_Clear();
    raise(PyExc_TypeError, name + " must be an integer, got a " + py_type_name(v));
  }
  const std::string shown = nb::cast<std::string>(nb::repr(n));
  const auto below = [&] {
    if (lo == 0) raise(PyExc_ValueError, name + " must be a non-negative integer (got " + shown + ")");
    raise(PyExc_ValueError, name + " must be at least " + std::to_string(lo) + " (got " + shown + ")");
  };
  const auto above = [&] {
    raise(PyExc_ValueError, name + " is " + shown + ", beyond the supported " + std::to_string(hi));
  };
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(n.ptr(), &overflow);
  if (overflow < 0 || (!overflow && x < 0)) below();
  if (!overflow) {
    if (static_cast<std::uint64_t>(x) < lo) below();
    if (static_cast<std::uint64_t>(x) > hi) above();
    return static_cast<std::uint64_t>(x);
  }
  const unsigned long long u = PyLong_AsUnsignedLongLong(n.ptr());
  if (u == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {  // 2**64 or more
    PyErr_Clear();
    if (hi == std::numeric_limits<std::uint64_t>::max())
      raise(PyExc_ValueError, name + " is " + shown + ", beyond the largest 64-bit value (2**64 - 1)");
    above();
  }
  if (u > hi) above();
  return u;
}

// The same, None allowed (None: the default).
std::optional<std::size_t> optional_int_arg(nb::handle v, const std::string& name, std::uint64_t lo, std::uint64_t hi) {
  if (!v.is_valid() || v.is_none()) return std::nullopt;
  return static_cast<std::size_t>(int_arg(v, name, lo, hi));
}

constexpr std::uint64_t no_limit = std::numeric_limits<std::size_t>::max();

// The official pipeline's draws: relative_dist = random.randint(4, 30), both ends included (the
// rule the C++ loader applies to input.relative_dist in loop_inputs.hpp, stored_draws, and the range
// of s2v::relative_dist_draws in stream.hpp; neither names the bounds as constants).
constexpr std::int64_t relative_dist_min = 4;
constexpr std::int64_t relative_dist_max = 30;

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

// A NaN or Inf in an input comes out as NaN in every output it reaches: a ValueError naming the
// argument and the element's index instead (host memory only; a CUDA tensor is not read here).
void require_finite(const host_input& in, const std::string& name) {
  const auto count = static_cast<std::size_t>(in.view.dims().numel());
  const std::size_t i = unshard::first_non_finite(in.view.data(), unshard::dtype::f32, count);
  if (i == count) return;
  std::string index;
  std::size_t rest = i;
  for (std::size_t d = in.dims.size(); d-- > 0;) {
    const auto n = static_cast<std::size_t>(in.dims[d]);
    index = std::to_string(rest % n) + (index.empty() ? "" : ", ") + index;
    rest /= n;
  }
  const float v = unshard::load_as_float(in.view.data(), unshard::dtype::f32, i);
  raise(PyExc_ValueError, name + " has " + (v != v ? "NaN" : v > 0 ? "+Inf" : "-Inf") + " at index (" + index +
                              (in.dims.size() == 1 ? ",)" : ")") + (in.copied ? " (after conversion to float32)" : "") +
                              "; inputs must be finite");
}

host_input host_f32_unchecked(nb::handle obj, const std::string& name, bool cuda_backend);

// `obj` as an F32 host tensor named `name` in every error, every element finite. `cuda_backend`:
// only the message of a tensor on an unsupported device changes (CUDA tensors never get here then:
// device_or_host_f32).
host_input host_f32(nb::handle obj, const std::string& name, bool cuda_backend = false) {
  host_input in = host_f32_unchecked(obj, name, cuda_backend);
  require_finite(in, name);
  return in;
}

host_input host_f32_unchecked(nb::handle obj, const std::string& name, bool cuda_backend) {
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
                               (cuda_backend ? "); the CUDA backend reads CUDA tensors on its rank-0 device and host memory: "
                                               "pass one of those"
                                             : "); the host backend reads host memory: pass a host array (or use "
                                               "backend='cuda' for CUDA tensors)"));
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

constexpr int dlpack_cuda = nb::device::cuda::value;  // kDLCUDA: device memory of one GPU

// `obj` for the CUDA backend, named `name` in every error: a CUDA tensor on `device` (devices[0],
// where rank 0 runs) that is float32 and C-contiguous is used in place, a view of its memory that
// the ranks copy device to device into the model's buffers; a CUDA tensor otherwise (another GPU,
// another dtype, strided) is refused, as converting it would need work on the caller's device; a
// host tensor is read as the host backend reads it (host_f32), and the model uploads it.
host_input device_or_host_f32(nb::handle obj, const std::string& name, int device) {
  if (!obj.is_valid() || obj.is_none()) raise(PyExc_TypeError, name + " is None; expected an array");
  nb::ndarray<nb::ro> a;
  if (!nb::try_cast(obj, a, false) || a.device_type() != dlpack_cuda) return host_f32(obj, name, true);
  const std::string what = name + " is a CUDA tensor on device " + std::to_string(a.device_id());
  if (a.device_id() != device)
    raise(PyExc_TypeError, what + "; this denoiser's rank 0 runs on device " + std::to_string(device) +
                               " (devices[0]): move it there (e.g. x.to('cuda:" + std::to_string(device) +
                               "')) or pass a host array");
  const nb::dlpack::dtype dt = a.dtype();
  if (!(dt.code == static_cast<std::uint8_t>(nb::dlpack::dtype_code::Float) && dt.bits == 32 && dt.lanes == 1))
    raise(PyExc_TypeError, what + " of dtype " + dtype_string(dt) + "; the CUDA backend reads float32 CUDA tensors (in "
                               "place): convert it on the device (x.float()) or pass a host array (converted once)");
  if (a.ndim() > unshard::shape::max_rank)
    raise(PyExc_ValueError, name + " has " + std::to_string(a.ndim()) + " dimensions (at most " +
                                std::to_string(unshard::shape::max_rank) + ")");
  host_input in;
  in.dims.resize(a.ndim());
  bool contiguous = true;
  std::int64_t expect = 1;
  for (std::size_t i = a.ndim(); i-- > 0;) {
    in.dims[i] = static_cast<std::int64_t>(a.shape(i));
    if (a.shape(i) != 1 && a.stride(i) != expect) contiguous = false;
    expect *= static_cast<std::int64_t>(a.shape(i));
  }
  if (!contiguous || reinterpret_cast<std::uintptr_t>(a.data()) % alignof(float) != 0)
    raise(PyExc_TypeError, what + " that is not C-contiguous (or not 4-byte aligned); the CUDA backend reads CUDA "
                               "tensors in place: pass x.contiguous()");
  in.view = unshard::tensor_view(const_cast<void*>(a.data()), unshard::dtype::f32,
                                 unshard::shape{std::span<const std::int64_t>(in.dims)});
  in.array = std::move(a);
  return in;
}

// stream=: the caller's CUDA stream as a cudaStream_t handle. None: 0, the legacy default stream
// (of devices[0]); an int handle; an object with __cuda_stream__ (the CUDA stream protocol: a
// method, or an attribute, giving (version, handle): cuda.core, CuPy >= 13) or with cuda_stream
// (torch.cuda.Stream, e.g. torch.cuda.current_stream()).
std::uintptr_t parse_stream(nb::handle stream) {
  if (!stream.is_valid() || stream.is_none()) return 0;
  nb::object handle;
  const char* from = "stream";
  if (PyLong_Check(stream.ptr()) && !PyBool_Check(stream.ptr())) {
    handle = nb::borrow(stream);
  } else if (nb::hasattr(stream, "__cuda_stream__")) {
    nb::object p = stream.attr("__cuda_stream__");
    if (PyCallable_Check(p.ptr())) p = p();
    if (!nb::isinstance<nb::tuple>(p) || nb::len(p) != 2)
      raise(PyExc_TypeError, "stream.__cuda_stream__ gave " + nb::cast<std::string>(nb::repr(p)) + ", not a (version, handle) pair");
    handle = nb::borrow(p[1]);
    from = "stream.__cuda_stream__()[1]";
  } else if (nb::hasattr(stream, "cuda_stream")) {
    handle = stream.attr("cuda_stream");
    from = "stream.cuda_stream";
  } else {
    raise(PyExc_TypeError, "stream is a " + py_type_name(stream) + "; expected a cudaStream_t handle (an int) or a stream "
                               "object with __cuda_stream__ or cuda_stream (e.g. torch.cuda.current_stream())");
  }
  if (!PyLong_Check(handle.ptr()) || PyBool_Check(handle.ptr()))
    raise(PyExc_TypeError, std::string(from) + " is a " + py_type_name(handle) + ", not an integer handle");
  const unsigned long long v = PyLong_AsUnsignedLongLong(handle.ptr());
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    raise(PyExc_ValueError, std::string(from) + " is " + nb::cast<std::string>(nb::repr(handle)) +
                                ", not a cudaStream_t handle (a non-negative integer of at most 64 bits)");
  }
  return static_cast<std::uintptr_t>(v);
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

// A result buffer in device memory as a DLPack tensor (nanobind's ndarray, device cuda) that owns
// it: the capsule frees it when the last consumer (torch.from_dlpack, cupy.from_dlpack, ...) drops it.
nb::object to_device_array(upy::device_buffer&& b, const std::array<std::int64_t, 4>& d) {
  struct owned {
    float* data;
    int device;
  };
  auto* o = new owned{nullptr, b.device()};
  nb::capsule owner(o, [](void* p) noexcept {
    auto* q = static_cast<owned*>(p);
    upy::free_device_buffer(q->device, q->data);
    delete q;
  });
  o->data = b.release();
  const std::size_t dims[4] = {static_cast<std::size_t>(d[0]), static_cast<std::size_t>(d[1]), static_cast<std::size_t>(d[2]),
                               static_cast<std::size_t>(d[3])};
  using device_array4 = nb::ndarray<float, nb::ndim<4>, nb::c_contig, nb::device::cuda>;
  return nb::cast(device_array4(o->data, 4, dims, owner, nullptr, nb::dtype<float>(), dlpack_cuda, o->device));
}

// One name for both, so a block's result converts the same way on either backend.
nb::object as_array(std::vector<float>&& v, const std::array<std::int64_t, 4>& d) { return to_numpy(std::move(v), d); }
nb::object as_array(upy::device_buffer&& b, const std::array<std::int64_t, 4>& d) {
  return to_device_array(std::move(b), d);
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
  // The official draws' range, as the C++ loader checks stored draws: a value outside it is no
  // draw of the pipeline (and one near +-2**63 would overflow the roll-out's int64 positions).
  for (std::size_t k = 0; k < out.size(); ++k)
    if (out[k] < relative_dist_min || out[k] > relative_dist_max)
      raise(PyExc_ValueError, name + "[" + std::to_string(k) + "] = " + std::to_string(out[k]) + " is outside [" +
                                  std::to_string(relative_dist_min) + ", " + std::to_string(relative_dist_max) +
                                  "] (the official random.randint(" + std::to_string(relative_dist_min) + ", " +
                                  std::to_string(relative_dist_max) + "))");
  return out;
}

// compute=: the CUDA backend's arithmetic (unshard-avatar --compute).
bool parse_compute_bf16(const std::string& s) {
  if (s == "f32" || s == "float32") return false;
  if (s == "bf16" || s == "bfloat16") return true;
  raise(PyExc_ValueError, "compute must be 'f32' or 'bf16', got '" + s + "'");
}

// fp8_activations=: how the CUDA backend's GEMMs over fp8 weights treat their inputs
// (unshard-avatar --fp8-activations): "none" (weight-only fp8) or "tensor" (the official per-tensor e4m3
// quantization, cuBLASLt's fp8 GEMM).
bool parse_fp8_activations_tensor(const std::string& s) {
  if (s == "none") return false;
  if (s == "tensor") return true;
  raise(PyExc_ValueError, "fp8_activations must be 'none' or 'tensor', got '" + s + "'");
}

// devices=: one distinct visible GPU per rank (rank r on devices[r]); None: GPUs 0..world_size-1.
std::vector<int> parse_devices(nb::handle devices, std::size_t world_size, int visible) {
  std::vector<int> out;
  if (!devices.is_valid() || devices.is_none()) {
    if (world_size > static_cast<std::size_t>(visible))
      raise(PyExc_ValueError, "world_size=" + std::to_string(world_size) + " puts rank r on GPU r, but this process sees " +
                                  std::to_string(visible) + " CUDA device(s); lower world_size or pass devices");
    for (std::size_t r = 0; r < world_size; ++r) out.push_back(static_cast<int>(r));
    return out;
  }
  const auto device_of = [&](nb::handle v, const std::string& at) {
    if (PyBool_Check(v.ptr()) || !PyIndex_Check(v.ptr()))
      raise(PyExc_TypeError, at + " is a " + py_type_name(v) + ", not a device index (an int)");
    nb::object n = nb::steal(PyNumber_Index(v.ptr()));
    if (!n.is_valid()) throw nb::python_error();
    const long long d = PyLong_AsLongLong(n.ptr());
    if (d == -1 && PyErr_Occurred()) throw nb::python_error();
    if (d < 0 || d >= visible)
      raise(PyExc_ValueError, at + " is " + std::to_string(d) + ", but this process sees " + std::to_string(visible) +
                                  " CUDA device(s) (0.." + std::to_string(visible - 1) + ")");
    return static_cast<int>(d);
  };
  if (PyIndex_Check(devices.ptr()) && !PyBool_Check(devices.ptr())) {
    out.push_back(device_of(devices, "devices"));
  } else {
    nb::object it;
    try {
      it = nb::iter(devices);
    } catch (nb::python_error&) {
      raise(PyExc_TypeError, "devices must be a sequence of device indices (one per rank), got a " + py_type_name(devices));
    }
    std::size_t i = 0;
    for (nb::handle v : devices) out.push_back(device_of(v, "devices[" + std::to_string(i++) + "]"));
  }
  if (out.size() != world_size)
    raise(PyExc_ValueError, "devices has " + std::to_string(out.size()) + " entr" + (out.size() == 1 ? "y" : "ies") +
                                " but world_size is " + std::to_string(world_size) + " (one device per rank)");
  for (std::size_t i = 0; i < out.size(); ++i)
    for (std::size_t j = 0; j < i; ++j)
      if (out[i] == out[j])
        raise(PyExc_ValueError, "devices[" + std::to_string(j) + "] and devices[" + std::to_string(i) + "] are both GPU " +
                                    std::to_string(out[i]) + " (one rank per GPU)");
  return out;
}

class live_avatar_denoiser {
 public:
  live_avatar_denoiser(const std::filesystem::path& config, const std::filesystem::path& weights,
                       std::optional<std::filesystem::path> lora, std::optional<double> lora_alpha, std::size_t world_size,
                       const std::string& policy, const std::string& schedule, const std::string& backend, nb::handle devices,
                       std::optional<std::string> gemm, const std::string& dtype, nb::handle size, std::optional<std::size_t> clips,
                       std::optional<std::size_t> blocks_per_clip, std::optional<std::size_t> steps,
                       std::optional<double> shift, std::uint64_t seed, nb::handle budget, bool strict,
                       std::optional<std::size_t> audio_frames, std::optional<std::pair<std::int64_t, std::int64_t>> motion_frames,
                       const std::string& compute, const std::string& fp8_activations)
      : seed_(seed), draws_(seed) {
    using namespace unshard;
    const bool on_cuda = backend == "cuda";
    if (backend != "host" && !on_cuda) raise(PyExc_ValueError, "backend must be 'host' or 'cuda', got '" + backend + "'");
    if (on_cuda && !upy::cuda_built)
      raise(PyExc_NotImplementedError,
            "LiveAvatarDenoiser: backend='cuda', but this unshard module was built without CUDA: the CUDA backend of the "
            "S2V model is not built yet in it. Rebuild it with CUDA (needs nvcc, NCCL and cuBLASLt): pip install . "
            "--config-settings=cmake.define.UNSHARD_ENABLE_CUDA=ON (python/README.md, 'The CUDA backend'); or use "
            "backend='host'");
    if (!on_cuda && devices.is_valid() && !devices.is_none())
      raise(PyExc_ValueError, "devices applies to backend='cuda' only (the host backend's ranks are threads)");
    if (world_size == 0) raise(PyExc_ValueError, "world_size must be at least 1 (got 0)");
    const bool bf16_compute = parse_compute_bf16(compute);
    if (!on_cuda && bf16_compute)
      raise(PyExc_ValueError, "compute='bf16' needs backend='cuda' (the host backend computes in f32)");
    if (on_cuda && gemm)
      raise(PyExc_ValueError, "gemm applies to backend='host' only (the CUDA backend's GEMMs are cuBLASLt's)");
    if (lora_alpha && !lora) raise(PyExc_ValueError, "lora_alpha needs lora");
    if (lora_alpha && !std::isfinite(*lora_alpha)) raise(PyExc_ValueError, "lora_alpha must be a finite number");

    session_options opt;
    opt.world_size = world_size;
    opt.policy = parse_policy(policy).values;  // an unshard::error naming the term -> ValueError
    const bool fp8_act_tensor = parse_fp8_activations_tensor(fp8_activations);
    if (fp8_act_tensor && !on_cuda)
      raise(PyExc_ValueError, "fp8_activations='tensor' needs backend='cuda' (the host backend runs fp8 weights "
                              "weight-only: codes dequantized per chunk)");
    if (fp8_act_tensor && !opt.policy.fp8)
      raise(PyExc_ValueError, "fp8_activations='tensor' needs an fp8 policy (a term fp8 or fp8:tensor), policy is '" +
                                  policy + "'");
    opt.schedule = parse_schedule(schedule);
    if (budget.is_valid() && !budget.is_none()) {
      if (nb::isinstance<nb::str>(budget)) opt.budget_bytes = parse_size(nb::cast<std::string>(budget), "budget");
      else if (PyBool_Check(budget.ptr()) || !PyIndex_Check(budget.ptr()))
        raise(PyExc_TypeError, "budget must be a byte count or a size string such as '22GiB', got a " + py_type_name(budget));
      else
        opt.budget_bytes = static_cast<std::size_t>(int_arg(budget, "budget", 0, no_limit));  // 0: no budget
    }
    s2v::options mo;
    mo.storage = parse_dtype(dtype);
    const std::string gemm_name = gemm.value_or("blas");
    if (gemm_name != "blas" && gemm_name != "portable")
      raise(PyExc_ValueError, "gemm must be 'blas' or 'portable', got '" + gemm_name + "'");
    mo.gemm = gemm_name == "blas" ? gemm_path::blas : gemm_path::portable;
    mo.record_block_outputs = false;

    // The GPUs, before any file is read: no device is a RuntimeError saying so.
    std::vector<int> device_list;
    if (on_cuda) {
      std::string why;
      const int visible = upy::cuda_device_count(why);
      if (visible <= 0)
        raise(PyExc_RuntimeError, "LiveAvatarDenoiser: backend='cuda', but no CUDA device is visible to this process (" +
                                      why + ")");
      device_list = parse_devices(devices, world_size, visible);
    }

    if (!std::filesystem::exists(config)) raise_file_not_found(config, "config");
    if (std::filesystem::is_directory(config)) {
      nb::object exc = nb::module_::import_("builtins")
                           .attr("IsADirectoryError")(EISDIR, "config: is a directory, not a JSON config file", config.string());
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
      throw nb::python_error();
    }
    if (!std::filesystem::exists(weights)) raise_file_not_found(weights, "weights");
    if (lora && !std::filesystem::exists(*lora)) raise_file_not_found(*lora, "lora");

    // The loop: the config's streaming/scheduler sections, else Live Avatar's defaults at `size`;
    // the keywords given explicitly on top (as unshard-avatar --denoise's options).
    nlohmann::json root;
    try {
      root = load_json_config(config, "liveavatar config");
    } catch (const unshard::error& e) {  // names the path; a binary file's bytes are escaped by raise()
      raise(PyExc_ValueError, std::string("config: ") + e.what());
    }
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
    sampler_.emplace(loop_.sampler);  // refuses a bad sampler before any rank starts

    const checkpoint ck = checkpoint::open(weights.string());
    for (const auto& n : unknown_tensors(*model_, ck, {"input.", "ref."})) {
      const std::string msg = weights.string() + ": unknown tensor '" + n + "'";
      if (strict) raise(PyExc_ValueError, msg + " (strict=True)");
      if (PyErr_WarnEx(PyExc_UserWarning, (msg + " ignored").c_str(), 1) < 0) throw nb::python_error();
    }
    if (!on_cuda) use_one_blas_thread_per_rank();
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
      if (!on_cuda) {
        session_ = std::make_unique<session_t>(*model_, w, opt);
        return;
      }
      // The CUDA backend builds its own model (s2v::cuda_model: these layers over cuda_ops) and
      // weight source (the same tensors) on its side.
      upy::cuda_job job;
      job.config = cfg;
      job.workload = work;
      job.model_options = mo;
      job.options = opt;
      job.devices = device_list;
      job.bf16_compute = bf16_compute;
      job.fp8_activations = fp8_act_tensor;
      job.weights = &ck;
      job.lora = lora_file ? &*lora_file : nullptr;
      job.lora_alpha = lora_alpha;
      job.denoise = s2v::denoise_options{loop_.sampler, loop_.blocks_per_clip, false};
      cuda_ = upy::make_cuda_denoiser(job);
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
    if (!on_cuda)
      denoiser_ = std::make_unique<denoiser_t>(*model_, *session_, s2v::denoise_options{loop_.sampler, loop_.blocks_per_clip, false});
    compute_ = on_cuda ? (bf16_compute ? "bf16" : "f32") : "f32";
    fp8_activations_ = fp8_act_tensor ? "tensor" : "none";
  }

  // ---- calls ----

  void sink(nb::handle ref_latents, nb::handle motion_latents, nb::handle context, nb::handle audio, nb::handle cond_states,
            nb::handle stream) {
    std::unique_lock lock = enter();
    const std::uintptr_t st = stream_arg(stream);
    const s2v::geometry& g = model_->geometry();
    call_record converted;
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
    run([&] {
      if (cuda_) cuda_->sink(in, st);
      else denoiser_->sink(in);
    });
    context_ = std::move(ctx);  // every step reads it: held (not copied) until the next sink
    sunk_ = true;
    record(std::move(converted));
  }

  nb::object denoise_block(nb::handle noise, nb::handle audio, nb::handle cond_states, nb::handle relative_dist,
                           nb::handle clip_arg, nb::handle block_arg, bool all_steps, nb::handle stream) {
    const std::optional<std::size_t> clip = optional_int_arg(clip_arg, "clip", 0, no_limit);
    const std::optional<std::size_t> block = optional_int_arg(block_arg, "block", 0, no_limit);
    std::unique_lock lock = enter();
    const std::uintptr_t st = stream_arg(stream);
    call_record converted;
    std::size_t next = next_;
    block_inputs b = block_of(noise, audio, cond_states, relative_dist, clip, block, "", next, converted);
    require_sink();
    nb::list results = run_blocks(std::span<const s2v::block>(&b.block, 1), all_steps, st);
    next_ = next;
    record(std::move(converted));
    return results[0];
  }

  // Several blocks in flight under `steps`: one denoise over all of them; results in order.
  nb::list denoise_many(nb::handle blocks, bool all_steps, nb::handle stream) {
    std::unique_lock lock = enter();
    const std::uintptr_t st = stream_arg(stream);
    call_record converted;
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
        return optional_int_arg(get(key), at + "['" + key + "']", 0, no_limit);
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
    out = run_blocks(list, all_steps, st);
    next_ = next;
    record(std::move(converted));
    return out;
  }

  // ---- what it planned and measured ----

  nb::dict plan() const {
    const unshard::memory_plan& p = cuda_ ? cuda_->plan() : session_->plan();
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
      if (cuda_) rd["device"] = cuda_->devices().at(r.rank);
      ranks.append(rd);
    }
    d["ranks"] = ranks;
    return d;
  }

  nb::list peaks() const {
    nb::list out;
    for (std::size_t r = 0; r < world_size(); ++r) {
      nb::dict d;
      d["rank"] = r;
      if (cuda_) {
        const upy::cuda_rank_stats st = cuda_->stats(r);
        d["device"] = cuda_->devices().at(r);
        d["planned_peak_bytes"] = st.planned_peak_bytes;
        d["measured_peak_bytes"] = st.measured_peak_bytes;
        d["bytes_gathered"] = st.bytes_gathered;
        d["forwards"] = st.forwards;
      } else {
        d["planned_peak_bytes"] = session_->plan().ranks[r].peak();
        d["measured_peak_bytes"] = session_->measured(r).peak_bytes;
        d["bytes_gathered"] = session_->runtime(r).bytes_gathered();
        d["forwards"] = session_->runtime(r).forwards();
      }
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
    const auto t = sampler_->timesteps();
    return {t.begin(), t.end()};
  }
  std::vector<float> sigmas() const {
    const auto s = sampler_->sigmas();
    return {s.begin(), s.end()};
  }
  std::size_t steps() const { return model_->geometry().steps; }
  std::size_t world_size() const { return cuda_ ? cuda_->world_size() : session_->world_size(); }
  std::size_t blocks_per_clip() const { return loop_.blocks_per_clip; }
  std::string schedule() const { return unshard::name_of((cuda_ ? cuda_->schedule() : session_->schedule()).kind); }
  std::size_t ticks_run() const { return cuda_ ? cuda_->ticks_run() : denoiser_->ticks_run(); }
  std::string backend() const { return cuda_ ? "cuda" : "host"; }
  const std::string& compute() const { return compute_; }
  const std::string& fp8_activations() const { return fp8_activations_; }
  nb::object devices() const {
    if (!cuda_) return nb::none();
    nb::list l;
    for (int d : cuda_->devices()) l.append(d);
    return nb::tuple(l);
  }
  nb::dict last_pointers() const {
    nb::dict d;
    for (const auto& [name, p] : last_pointers_) d[nb::str(name.c_str())] = p;
    return d;
  }
  std::pair<std::size_t, std::size_t> next_block() const { return {next_ / loop_.blocks_per_clip, next_ % loop_.blocks_per_clip}; }
  bool sunk() const { return sunk_; }
  nb::tuple latent_shape() const {
    const auto d = model_->geometry().output_shape();
    return nb::make_tuple(d[0], d[1], d[2], d[3]);
  }
  const std::vector<std::string>& last_converted() const { return last_converted_; }
  std::string repr() const {
    const s2v::geometry& g = model_->geometry();
    const unshard::memory_plan& p = cuda_ ? cuda_->plan() : session_->plan();
    return "LiveAvatarDenoiser(backend='" + backend() + "', world_size=" + std::to_string(world_size()) + ", policy='" +
           p.policy + "', schedule='" + schedule() + "', steps=" + std::to_string(g.steps) + ", latent=(" + std::to_string(g.in_dim) + ", " +
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

  // What a call read, for _last_converted and _last_input_pointers.
  struct call_record {
    std::vector<std::string> converted;
    std::vector<std::pair<std::string, std::uintptr_t>> pointers;
  };
  void record(call_record&& r) {
    last_converted_ = std::move(r.converted);
    last_pointers_ = std::move(r.pointers);
  }

  host_input input(nb::handle obj, const std::string& name, call_record& rec) const {
    host_input in = cuda_ ? device_or_host_f32(obj, name, cuda_->devices().front()) : host_f32(obj, name);
    if (in.copied) rec.converted.push_back(name);
    rec.pointers.emplace_back(name, reinterpret_cast<std::uintptr_t>(in.view.data()));
    return in;
  }

  // stream= applies to the CUDA backend; the host backend refuses one.
  std::uintptr_t stream_arg(nb::handle stream) const {
    if (!cuda_) {
      if (stream.is_valid() && !stream.is_none())
        raise(PyExc_ValueError, "stream applies to backend='cuda' only (the host backend runs on the host)");
      return 0;
    }
    return parse_stream(stream);
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
                        std::size_t& next, call_record& converted) const {
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

  // The blocks through all their steps (one pipeline); their results as Python objects, in order.
  nb::list run_blocks(std::span<const s2v::block> blocks, bool all_steps, std::uintptr_t stream) {
    nb::list out;
    std::size_t got = 0;
    if (cuda_) {
      std::vector<upy::cuda_block_result> results;
      run([&] { results = cuda_->denoise(blocks, all_steps, stream); });
      got = results.size();
      if (got == blocks.size())
        for (auto& r : results) out.append(result_object(std::move(r), all_steps));
    } else {
      std::vector<s2v::block_result> results;
      results.reserve(blocks.size());
      denoiser_->set_all_steps(all_steps);
      run([&] { denoiser_->denoise(blocks, [&](s2v::block_result&& r) { results.push_back(std::move(r)); }); });
      got = results.size();
      if (got == blocks.size())
        for (auto& r : results) out.append(result_object(std::move(r), all_steps));
    }
    if (got != blocks.size())
      raise(PyExc_RuntimeError, "LiveAvatarDenoiser: " + std::to_string(got) + " results for " +
                                    std::to_string(blocks.size()) + " blocks");
    return out;
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
    } catch (const upy::cuda_runtime_error& e) {
      failed_ = true;  // a CUDA call of the calling thread failed while the ranks' state was changing
      failure_ = e.what();
      throw;
    }
  }

  // A block's result as Python objects: numpy arrays (host backend) or device tensors (CUDA).
  template <class Result>
  nb::object result_object(Result&& r, bool all_steps) const {
    const auto d = model_->geometry().output_shape();
    nb::object latent = as_array(std::move(r.latent), d);
    if (!all_steps) return latent;
    nb::dict out;
    out["clip"] = r.clip;
    out["block"] = r.block;
    out["latent"] = latent;
    nb::list noise_pred, step_latent;
    for (auto& v : r.noise_pred) noise_pred.append(as_array(std::move(v), d));
    for (auto& v : r.step_latent) step_latent.append(as_array(std::move(v), d));
    out["noise_pred"] = noise_pred;
    out["step_latent"] = step_latent;
    return out;
  }

  // Destroyed in reverse: the denoiser, then the session (joins the rank threads), then the model.
  // The host backend uses all three; the CUDA backend only model_ (the geometry and the checks:
  // cuda_model's layers are these) and cuda_, which holds its own model, session and denoiser.
  std::unique_ptr<s2v::model> model_;
  std::unique_ptr<session_t> session_;
  std::unique_ptr<denoiser_t> denoiser_;
  std::unique_ptr<upy::cuda_denoiser> cuda_;
  std::optional<s2v::flow_match_euler> sampler_;
  std::string compute_ = "f32";
  std::string fp8_activations_ = "none";
  s2v::loop_spec loop_;
  std::uint64_t seed_;
  s2v::relative_dist_draws draws_;
  host_input context_;  // the sink's context: every step reads it
  std::size_t next_ = 0;  // the next block's position in the stream: clip next_ / bpc, block next_ % bpc
  bool sunk_ = false;
  bool failed_ = false;
  std::string failure_;
  std::vector<std::string> last_converted_;
  std::vector<std::pair<std::string, std::uintptr_t>> last_pointers_;
  std::mutex busy_;
};

}  // namespace

NB_MODULE(_unshard, m) {
  m.doc() = upy::cuda_built ? "unshard: Live Avatar's S2V denoiser over sharded weights (host and CUDA backends)"
                            : "unshard: Live Avatar's S2V denoiser over sharded weights (host backend; built without CUDA)";
  m.attr("__version__") = std::to_string(UNSHARD_VERSION_MAJOR) + "." + std::to_string(UNSHARD_VERSION_MINOR) + "." +
                          std::to_string(UNSHARD_VERSION_PATCH);
  m.attr("blas_available") = unshard::blas_available();
  // What this build has: ("host",) or ("host", "cuda").
  m.attr("backends") = upy::cuda_built ? nb::make_tuple("host", "cuda") : nb::make_tuple("host");
  m.attr("cudnn_attention") = upy::cudnn_attention_built();
  m.attr("cuda_runtime_version") = upy::cuda_runtime_version();
  m.def(
      "cuda_device_count",
      [] {
        std::string why;
        return upy::cuda_device_count(why);
      },
      "CUDA devices this process sees (0 without a GPU or driver, or in a build without CUDA).");
  m.def(
      "cuda_available",
      [] {
        std::string why;
        return upy::cuda_built && upy::cuda_device_count(why) > 0;
      },
      "Whether backend='cuda' can run here: the module was built with CUDA and a CUDA device is visible.");

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const unshard::rank_failure& e) {
      set_error(PyExc_RuntimeError, e.what());
    } catch (const unshard::out_of_memory& e) {
      set_error(PyExc_RuntimeError, e.what());
    } catch (const unshard::error& e) {
      set_error(PyExc_ValueError, e.what());
    } catch (const upy::cuda_runtime_error& e) {
      set_error(PyExc_RuntimeError, e.what());
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

  m.def(
      "_to_numpy",
      [](nb::handle array) -> nb::object {
        nb::ndarray<nb::ro> a;
        if (!nb::try_cast(array, a, false)) raise(PyExc_TypeError, "array is a " + py_type_name(array) + ", not a DLPack tensor");
        if (a.device_type() != dlpack_cuda) return nb::module_::import_("numpy").attr("array")(array, "dtype"_a = "float32");
        const nb::dlpack::dtype dt = a.dtype();
        if (!(dt.code == static_cast<std::uint8_t>(nb::dlpack::dtype_code::Float) && dt.bits == 32 && dt.lanes == 1))
          raise(PyExc_TypeError, "array has dtype " + dtype_string(dt) + "; _to_numpy reads float32 CUDA tensors");
        std::vector<std::size_t> dims(a.ndim());
        std::int64_t expect = 1;
        for (std::size_t i = a.ndim(); i-- > 0;) {
          dims[i] = a.shape(i);
          if (a.shape(i) != 1 && a.stride(i) != expect) raise(PyExc_TypeError, "array is not C-contiguous");
          expect *= static_cast<std::int64_t>(a.shape(i));
        }
        auto* heap = new std::vector<float>(a.size());
        nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
        {
          nb::gil_scoped_release release;
          upy::copy_device_to_host(a.device_id(), a.data(), heap->data(), heap->size() * sizeof(float));
        }
        return nb::cast(nb::ndarray<nb::numpy, float>(heap->data(), a.ndim(), dims.data(), owner));
      },
      "array"_a,
      "A float32 CUDA tensor (a backend='cuda' result, or any DLPack one) copied into a new numpy array, after "
      "everything queued on its device ran; a host array as numpy.array(array, dtype=float32). For tests and "
      "inspection without a framework: torch.from_dlpack / cupy.from_dlpack keep results on the device.");

  nb::class_<live_avatar_denoiser>(m, "LiveAvatarDenoiser")
      .def(
          "__init__",
          [](live_avatar_denoiser* self, const std::filesystem::path& config, const std::filesystem::path& weights,
             std::optional<std::filesystem::path> lora, std::optional<double> lora_alpha, nb::handle world_size_arg,
             const std::string& policy, const std::string& schedule, const std::string& backend, nb::handle devices,
             std::optional<std::string> gemm, const std::string& dtype, nb::handle size, nb::handle clips_arg,
             nb::handle blocks_per_clip_arg, nb::handle steps_arg, std::optional<double> shift, nb::handle seed_arg,
             nb::handle budget, bool strict, nb::handle audio_frames_arg,
             std::optional<std::pair<std::int64_t, std::int64_t>> motion_frames, const std::string& compute,
             const std::string& fp8_activations) {
            // The integer keywords, checked before anything else: a bool, a negative value or a world
            // size over the supported maximum (planning for 2**31 ranks would run for minutes before
            // host_world refused it) is an error naming the keyword.
            const std::size_t world_size =
                static_cast<std::size_t>(int_arg(world_size_arg, "world_size", 1, unshard::max_world_size));
            const std::optional<std::size_t> clips = optional_int_arg(clips_arg, "clips", 1, no_limit);
            const std::optional<std::size_t> blocks_per_clip = optional_int_arg(blocks_per_clip_arg, "blocks_per_clip", 1, no_limit);
            const std::optional<std::size_t> steps = optional_int_arg(steps_arg, "steps", 1, no_limit);
            const std::uint64_t seed = int_arg(seed_arg, "seed", 0, std::numeric_limits<std::uint64_t>::max());
            const std::optional<std::size_t> audio_frames = optional_int_arg(audio_frames_arg, "audio_frames", 1, no_limit);
            new (self) live_avatar_denoiser(config, weights, std::move(lora), lora_alpha, world_size, policy, schedule, backend,
                                            devices, std::move(gemm), dtype, size, clips, blocks_per_clip, steps, shift, seed,
                                            budget, strict, audio_frames, motion_frames, compute,
                                            fp8_activations);
          },
          "config"_a, "weights"_a, "lora"_a = nb::none(), "lora_alpha"_a = nb::none(), "world_size"_a = 1,
          "policy"_a = "prefetch:1", "schedule"_a = "steps", "backend"_a = "host", "devices"_a = nb::none(),
          "gemm"_a = nb::none(), "dtype"_a = "f32", "size"_a = nb::none(), "clips"_a = nb::none(),
          "blocks_per_clip"_a = nb::none(), "steps"_a = nb::none(), "shift"_a = nb::none(), "seed"_a = 0,
          "budget"_a = nb::none(), "strict"_a = false, "audio_frames"_a = nb::none(), "motion_frames"_a = nb::none(),
          "compute"_a = "f32", "fp8_activations"_a = "none")
      .def("sink", &live_avatar_denoiser::sink, "ref_latents"_a.none(), "motion_latents"_a.none(), "context"_a.none(), "audio"_a = nb::none(),
           "cond_states"_a = nb::none(), "stream"_a = nb::none(),
           "The cond prefill: reference and motion latents into every step's cond cache. `context` [L <= text_len, "
           "text_dim] is held (not copied) and read by every later step. stream (backend='cuda'): the caller's CUDA "
           "stream, which the reads of its device tensors follow and which then waits for them.")
      .def("denoise_block", &live_avatar_denoiser::denoise_block, "noise"_a.none(), "audio"_a.none(), "cond_states"_a.none(),
           "relative_dist"_a = nb::none(), "clip"_a = nb::none(), "block"_a = nb::none(), "all_steps"_a = false,
           "stream"_a = nb::none(),
           "All the steps of the next block; returns its latent [C, F, H, W] (a dict with every step's noise_pred and "
           "latent as well when all_steps=True): a numpy array on the host backend, a DLPack tensor on devices[0] that "
           "the caller owns on the CUDA backend (torch.from_dlpack / cupy.from_dlpack), ordered before later work on "
           "`stream`.")
      .def("_denoise_many", &live_avatar_denoiser::denoise_many, "blocks"_a, "all_steps"_a = false, "stream"_a = nb::none())
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
      .def_prop_ro("_last_input_pointers", &live_avatar_denoiser::last_pointers,
                   "{name: address} the library read each input of the last call at (the caller's own data pointer "
                   "when read in place, host or device).")
      .def_prop_ro("backend", &live_avatar_denoiser::backend)
      .def_prop_ro("compute", &live_avatar_denoiser::compute)
      .def_prop_ro("fp8_activations", &live_avatar_denoiser::fp8_activations)
      .def_prop_ro("devices", &live_avatar_denoiser::devices, "(backend='cuda') the GPU of each rank; None on the host")
      .def("__repr__", &live_avatar_denoiser::repr);
}
