#pragma once
#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "unshard/core/dtype.hpp"
#include "unshard/core/error.hpp"
#include "unshard/core/shape.hpp"
#include "unshard/io/safetensors_header.hpp"

namespace unshard {

// Builds a safetensors file in memory and writes it in one go. Meant for tests, tools and
// exported results, not for streaming multi-gigabyte checkpoints.
class safetensors_writer {
 public:
  // Copies data; its size must be exactly numel * size_of(type).
  void add(std::string name, dtype type, const shape& dims, std::span<const std::byte> data) {
    const std::uint64_t numel = check_new(name, dims);
    const std::uint64_t want = numel * size_of(type);
    if (data.size() != want)
      throw_error("safetensors_writer: tensor '", name, "': got ", data.size(), " bytes, but shape ", dims.to_string(),
                  " of ", safetensors_name(type), " needs ", want);
    names_.insert(name);
    entries_.push_back(entry{std::move(name), type, dims, std::vector<std::byte>(data.begin(), data.end())});
  }

  // Converts f32 values to type (round to nearest even for bf16/f16/f8e4m3). For f8e4m3 the values
  // are stored as codes as they are (no scale is applied or written: quantize first, see
  // quant/fp8.hpp, or add the codes as bytes); a NaN, an Inf or a value beyond 448 after rounding
  // is an error naming the tensor and the element, never a clamp.
  void add(std::string name, const shape& dims, std::span<const float> data, dtype type = dtype::f32) {
    const std::uint64_t numel = check_new(name, dims);
    if (data.size() != numel)
      throw_error("safetensors_writer: tensor '", name, "': got ", data.size(), " values, but shape ", dims.to_string(),
                  " has ", numel, " elements");
    std::vector<std::byte> bytes(static_cast<std::size_t>(numel) * size_of(type));
    if (type == dtype::f8e4m3) {
      for (std::size_t i = 0; i < data.size(); ++i) {
        const e4m3_conversion c = float_to_e4m3(data[i]);
        if (c.status != e4m3_status::ok)
          throw_error("safetensors_writer: tensor '", name, "': element ", i, " is ", data[i], ", which F8_E4M3 cannot hold (",
                      c.status == e4m3_status::overflow ? "beyond 448 after rounding" : "not finite", ")");
        bytes[i] = static_cast<std::byte>(c.bits);
      }
    } else {
      for (std::size_t i = 0; i < data.size(); ++i) store_from_float(bytes.data(), type, i, data[i]);
    }
    names_.insert(name);
    entries_.push_back(entry{std::move(name), type, dims, std::move(bytes)});
  }

  void set_metadata(std::string key, std::string value) { metadata_[std::move(key)] = std::move(value); }

  void write(const std::string& path) const {
    // Wider elements first (then by name): with the header padded to 8 bytes, every tensor starts
    // aligned to its element size, so readers can view the mapping in place.
    std::vector<const entry*> order;
    order.reserve(entries_.size());
    for (const entry& e : entries_) order.push_back(&e);
    std::sort(order.begin(), order.end(), [](const entry* a, const entry* b) {
      if (size_of(a->type) != size_of(b->type)) return size_of(a->type) > size_of(b->type);
      return a->name < b->name;
    });

    nlohmann::json header = nlohmann::json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (const entry* e : order) {
      const std::uint64_t end = offset + e->data.size();
      header[e->name] = {{"dtype", std::string(safetensors_name(e->type))},
                         {"shape", std::vector<std::int64_t>(e->dims.dims().begin(), e->dims.dims().end())},
                         {"data_offsets", {offset, end}}};
      offset = end;
    }
    std::string text;
    try {
      text = header.dump();
    } catch (const nlohmann::json::exception& ex) {  // names or metadata that are not valid UTF-8
      throw_error("cannot write safetensors file '", path, "': header is not valid UTF-8 JSON: ", ex.what());
    }
    text.append((8 - text.size() % 8) % 8, ' ');

    std::byte len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<std::byte>((static_cast<std::uint64_t>(text.size()) >> (8 * i)) & 0xffu);

    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (!f) throw_error("cannot create safetensors file '", path, "': ", std::strerror(errno));
    int err = 0;  // the first failure's errno; later calls may clobber it
    const auto put = [&](const void* p, std::size_t n) {
      errno = 0;
      if (err == 0 && n != 0 && std::fwrite(p, 1, n, f) != n) err = errno ? errno : EIO;
    };
    put(len, 8);
    put(text.data(), text.size());
    for (const entry* e : order) put(e->data.data(), e->data.size());
    errno = 0;
    if (std::fclose(f) != 0 && err == 0) err = errno ? errno : EIO;
    if (err != 0) {
      std::remove(path.c_str());  // a truncated checkpoint would only fail later, further from the cause
      throw_error("cannot write safetensors file '", path, "': ", std::strerror(err));
    }
  }

 private:
  struct entry {
    std::string name;
    dtype type;
    shape dims;
    std::vector<std::byte> data;
  };

  // Validates a new tensor's name and dims; returns its element count.
  std::uint64_t check_new(const std::string& name, const shape& dims) const {
    if (name == "__metadata__") throw_error("safetensors_writer: '__metadata__' is reserved and cannot name a tensor");
    if (names_.count(name)) throw_error("safetensors_writer: duplicate tensor name '", name, "'");
    // Zero-element tensors are legal in the format, so shape::validate (which rejects 0) is not used.
    const auto numel = detail::checked_numel(dims.dims());
    if (!numel || *numel > (std::uint64_t{1} << 62))
      throw_error("safetensors_writer: tensor '", name, "': invalid shape ", dims.to_string());
    return *numel;
  }

  std::vector<entry> entries_;
  std::set<std::string> names_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace unshard
