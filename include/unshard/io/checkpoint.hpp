#pragma once
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "unshard/core/error.hpp"
#include "unshard/core/tensor_view.hpp"
#include "unshard/io/json_strict.hpp"
#include "unshard/io/safetensors_file.hpp"

namespace unshard {

// A model's weights: one .safetensors file, or a sharded "*.safetensors.index.json" whose
// "weight_map" maps each tensor name to a file relative to the index's directory. Every file is
// opened (and validated) once, up front.
class checkpoint {
 public:
  static checkpoint open(const std::string& path) {
    checkpoint c;
    c.path_ = path;
    if (path.size() >= 5 && path.compare(path.size() - 5, 5, ".json") == 0) {
      c.open_index();
    } else {
      c.files_.push_back(std::make_unique<safetensors_file>(path));
      for (const tensor_info& t : c.files_.back()->tensors()) c.tensors_.emplace(t.name, located{0, &t});
    }
    return c;
  }

  const tensor_info* find(std::string_view name) const {
    const auto it = tensors_.find(name);
    return it == tensors_.end() ? nullptr : it->second.info;
  }
  const tensor_info& at(std::string_view name) const { return *locate(name).info; }

  tensor_view view(std::string_view name) const {
    const located& l = locate(name);
    return files_[l.file]->view(name);
  }
  void read(std::string_view name, std::uint64_t byte_offset, std::span<std::byte> dst) const {
    const located& l = locate(name);
    files_[l.file]->read(*l.info, byte_offset, dst);
  }

  // All tensor names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& [name, l] : tensors_) out.push_back(name);
    return out;
  }

  std::uint64_t bytes_read() const {
    std::uint64_t n = 0;
    for (const auto& f : files_) n += f->bytes_read();
    return n;
  }
  const std::string& path() const noexcept { return path_; }

  // The underlying files, for callers that need per-file metadata.
  std::size_t file_count() const noexcept { return files_.size(); }
  const safetensors_file& file(std::size_t i) const { return *files_.at(i); }

 private:
  struct located {
    std::size_t file;
    const tensor_info* info;  // stable: files are heap-held and never move
  };

  checkpoint() = default;

  const located& locate(std::string_view name) const {
    const auto it = tensors_.find(name);
    if (it == tensors_.end()) throw_error("tensor '", name, "' not found in checkpoint '", path_, "'");
    return it->second;
  }

  void open_index() {
    const std::string where = "checkpoint index '" + path_ + "'";
    std::ifstream in(path_, std::ios::binary);
    if (!in) throw_error("cannot open ", where);
    std::ostringstream buf;
    buf << in.rdbuf();
    if (in.bad()) throw_error("cannot read ", where);
    const std::string text = buf.str();
    const nlohmann::json root = detail::parse_json_strict(text, where);
    if (!root.is_object()) throw_error(where, ": not a JSON object");
    const auto wm = root.find("weight_map");
    if (wm == root.end() || !wm->is_object()) throw_error(where, ": missing \"weight_map\" object");

    const std::filesystem::path dir = std::filesystem::path(path_).parent_path();
    std::map<std::string, std::size_t> file_index;  // file name as written in the index -> files_ slot
    for (const auto& [name, value] : wm->items()) {
      if (!value.is_string())
        throw_error(where, ": weight_map entry for tensor '", name, "' is not a file name but ", detail::short_dump(value));
      const std::string& rel = value.get_ref<const std::string&>();
      auto slot = file_index.find(rel);
      if (slot == file_index.end()) {
        const std::string file_path = (dir / rel).string();
        std::error_code ec;
        if (!std::filesystem::exists(file_path, ec))
          throw_error(where, ": file '", file_path, "' (holding tensor '", name, "') does not exist");
        files_.push_back(std::make_unique<safetensors_file>(file_path));
        slot = file_index.emplace(rel, files_.size() - 1).first;
      }
      const safetensors_file& f = *files_[slot->second];
      const tensor_info* t = f.find(name);
      if (!t) throw_error(where, ": tensor '", name, "' is mapped to '", f.path(), "', but that file does not contain it");
      tensors_.emplace(name, located{slot->second, t});
    }
  }

  std::string path_;
  std::vector<std::unique_ptr<safetensors_file>> files_;
  std::map<std::string, located, std::less<>> tensors_;
};

// An input tensor's view (a latent, an embedding, a timestep), checked finite: a NaN or Inf in an
// input comes out as NaN in every output it reaches, a wrong answer without an error. The error
// names the file, the tensor, the element and its byte offset in the file.
inline tensor_view finite_input(const checkpoint& c, std::string_view name) {
  const tensor_view v = c.view(name);
  const tensor_info& t = c.at(name);
  if (!t.type) return v;
  const auto count = static_cast<std::size_t>(t.dims.numel());
  const std::size_t i = first_non_finite(v.data(), *t.type, count);
  if (i == count) return v;
  const float x = load_as_float(v.data(), *t.type, i);
  throw_error(c.path(), ": input tensor '", name, "' has ", x != x ? "NaN" : (x > 0 ? "+Inf" : "-Inf"), " at element ", i,
              " (byte offset ", t.offset + i * size_of(*t.type), " of its file); inputs must be finite");
}

// The whole tensor widened to f32 (allocates; for tests and tools). Counts into bytes_read().
inline std::vector<float> read_f32(const checkpoint& c, std::string_view name) {
  const tensor_info& t = c.at(name);
  if (!t.type)
    throw_error("tensor '", t.name, "' in checkpoint '", c.path(), "' has dtype ", t.dtype_name,
                ", which cannot be converted to f32");
  if (*t.type == dtype::f8e4m3) throw error(detail::fp8_not_widened(t.name, "checkpoint '" + c.path() + "'"));
  std::vector<std::byte> raw(static_cast<std::size_t>(t.bytes));
  c.read(name, 0, raw);
  return detail::bytes_to_f32(raw, *t.type);
}

}  // namespace unshard
