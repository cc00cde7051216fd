#pragma once
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "unshard/core/dtype.hpp"
#include "unshard/core/error.hpp"
#include "unshard/core/tensor_view.hpp"
#include "unshard/io/safetensors_header.hpp"

namespace unshard {

namespace detail {

// Owns a read-only private mapping of a whole file.
class file_mapping {
 public:
  file_mapping() = default;
  explicit file_mapping(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw_error("cannot open safetensors file '", path, "': ", std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int e = errno;
      ::close(fd);
      throw_error("cannot stat safetensors file '", path, "': ", std::strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      throw_error("safetensors file '", path, "' is not a regular file");
    }
    size_ = static_cast<std::size_t>(st.st_size);
    // mmap rejects length 0; an empty file is left unmapped and the header parser reports it.
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      const int e = errno;
      ::close(fd);  // the mapping keeps the file referenced
      if (p == MAP_FAILED) throw_error("cannot mmap safetensors file '", path, "' (", size_, " bytes): ", std::strerror(e));
      data_ = static_cast<const std::byte*>(p);
    } else {
      ::close(fd);
    }
  }
  file_mapping(const file_mapping&) = delete;
  file_mapping& operator=(const file_mapping&) = delete;
  file_mapping(file_mapping&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  file_mapping& operator=(file_mapping&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~file_mapping() { release(); }

  std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }

 private:
  void release() noexcept {
    if (data_) ::munmap(const_cast<std::byte*>(data_), size_);
    data_ = nullptr;
    size_ = 0;
  }
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// The message for a read_f32 of fp8 codes: they are not values until multiplied by their scales.
inline std::string fp8_not_widened(std::string_view tensor, std::string_view where) {
  return "tensor '" + std::string(tensor) + "' in " + std::string(where) +
         " has dtype F8_E4M3: its codes need their scales to become values, which read_f32 does not have "
         "(read the bytes and dequantize with unshard::quant, quant/fp8.hpp)";
}

// Widens a tensor's raw bytes (of a 16- or 32-bit compute dtype) to f32. f8e4m3 codes are refused:
// widened without their scales they would be wrong values, silently.
inline std::vector<float> bytes_to_f32(std::span<const std::byte> raw, dtype t) {
  if (t == dtype::f8e4m3)
    throw_error("f8e4m3 codes cannot be widened to f32 without their scales (see unshard/quant/fp8.hpp)");
  const std::size_t n = raw.size() / size_of(t);
  std::vector<float> out(n);
  if (t == dtype::f32) {
    if (n) std::memcpy(out.data(), raw.data(), n * 4);
    return out;
  }
  for (std::size_t i = 0; i < n; ++i) {
    std::uint16_t b;
    std::memcpy(&b, raw.data() + 2 * i, 2);  // the source need not be 2-byte aligned
    out[i] = t == dtype::bf16 ? bf16_bits_to_float(b) : f16_bits_to_float(b);
  }
  return out;
}

}  // namespace detail

// A read-only, memory-mapped safetensors file. The constructor validates the whole header, so
// every later access is in bounds by construction. Reads from many rank threads may run at once.
class safetensors_file {
 public:
  explicit safetensors_file(const std::string& path) : path_(path), map_(path) {
    header_ = detail::parse_safetensors_header(map_.bytes(), path_);
    for (std::size_t i = 0; i < header_.tensors.size(); ++i) by_name_.emplace(header_.tensors[i].name, i);
  }
  safetensors_file(const safetensors_file&) = delete;
  safetensors_file& operator=(const safetensors_file&) = delete;
  // Hand-written only because std::atomic does not move; the counter value travels along.
  safetensors_file(safetensors_file&& o) noexcept
      : path_(std::move(o.path_)),
        map_(std::move(o.map_)),
        header_(std::move(o.header_)),
        by_name_(std::move(o.by_name_)),
        bytes_read_(o.bytes_read_.load(std::memory_order_relaxed)) {}
  safetensors_file& operator=(safetensors_file&& o) noexcept {
    if (this != &o) {
      path_ = std::move(o.path_);
      map_ = std::move(o.map_);
      header_ = std::move(o.header_);
      by_name_ = std::move(o.by_name_);
      bytes_read_.store(o.bytes_read_.load(std::memory_order_relaxed), std::memory_order_relaxed);
    }
    return *this;
  }
  ~safetensors_file() = default;

  const std::string& path() const noexcept { return path_; }
  const std::vector<tensor_info>& tensors() const noexcept { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const noexcept { return header_.metadata; }

  const tensor_info* find(std::string_view name) const {
    const auto it = by_name_.find(name);
    return it == by_name_.end() ? nullptr : &header_.tensors[it->second];
  }
  const tensor_info& at(std::string_view name) const {
    if (const tensor_info* t = find(name)) return *t;
    throw_error("tensor '", name, "' not found in safetensors file '", path_, "'");
  }

  // Zero-copy view into the mapping. The mapping is read-only: writing through the view faults.
  // Not counted in bytes_read(): the pages are touched by whoever dereferences the view.
  tensor_view view(std::string_view name) const {
    const tensor_info& t = at(name);
    if (!t.type)
      throw_error("tensor '", t.name, "' in safetensors file '", path_, "' has dtype ", t.dtype_name,
                  ", which cannot be viewed (only F32, BF16, F16 and F8_E4M3 are supported)");
    const std::byte* p = map_.bytes().data() + t.offset;
    // Other writers may pack a 2-byte tensor before a 4-byte one; a misaligned typed view is UB.
    if (reinterpret_cast<std::uintptr_t>(p) % size_of(*t.type) != 0)
      throw_error("tensor '", t.name, "' in safetensors file '", path_, "' at byte offset ", t.offset,
                  " is not aligned to its ", size_of(*t.type), "-byte elements; use read() instead of view()");
    return tensor_view(const_cast<std::byte*>(p), *t.type, t.dims);
  }

  // Copies dst.size() bytes starting byte_offset bytes into t's data, and counts them.
  void read(const tensor_info& t, std::uint64_t byte_offset, std::span<std::byte> dst) const {
    const std::uint64_t file_size = map_.bytes().size();
    // t may be a copy or come from another file: check it against this mapping, not trust it.
    if (t.offset < header_.data_start || t.offset > file_size || t.bytes > file_size - t.offset)
      throw_error("tensor '", t.name, "' (byte offset ", t.offset, ", ", t.bytes,
                  " bytes) does not lie in the data of safetensors file '", path_, "'");
    if (byte_offset > t.bytes || dst.size() > t.bytes - byte_offset)
      throw_error("read of ", dst.size(), " bytes at byte offset ", byte_offset, " of tensor '", t.name, "' (",
                  t.bytes, " bytes) in safetensors file '", path_, "' is out of bounds");
    if (!dst.empty()) std::memcpy(dst.data(), map_.bytes().data() + t.offset + byte_offset, dst.size());
    bytes_read_.fetch_add(dst.size(), std::memory_order_relaxed);
  }

  std::uint64_t bytes_read() const noexcept { return bytes_read_.load(std::memory_order_relaxed); }

 private:
  std::string path_;
  detail::file_mapping map_;
  detail::safetensors_header header_;
  std::map<std::string, std::size_t, std::less<>> by_name_;
  mutable std::atomic<std::uint64_t> bytes_read_{0};
};

// The whole tensor widened to f32 (allocates; for tests and tools). Counts into bytes_read().
inline std::vector<float> read_f32(const safetensors_file& f, const tensor_info& t) {
  if (!t.type)
    throw_error("tensor '", t.name, "' in safetensors file '", f.path(), "' has dtype ", t.dtype_name,
                ", which cannot be converted to f32");
  if (*t.type == dtype::f8e4m3) throw error(detail::fp8_not_widened(t.name, "safetensors file '" + f.path() + "'"));
  std::vector<std::byte> raw(static_cast<std::size_t>(t.bytes));
  f.read(t, 0, raw);
  return detail::bytes_to_f32(raw, *t.type);
}

}  // namespace unshard
