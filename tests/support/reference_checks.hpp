#pragma once
// Helpers shared by the tests that check models against the official references in tests/data:
// finding the reference files, docs/conventions.md's tolerance, aligned model buffers and bf16-rounded
// copies of a checkpoint's weights.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "unshard/core/memory_category.hpp"
#include "unshard/io/checkpoint.hpp"
#include "unshard/io/safetensors_writer.hpp"
#include "unshard/layer/model.hpp"

namespace unshard::testing {

inline const std::string data_dir = UNSHARD_TEST_DATA_DIR;

// The reference files of one model: tests/data/<prefix>*.safetensors, named without the
// extension and sorted, so a new file placed there is checked too.
inline std::vector<std::string> vector_files(std::string_view prefix) {
  const std::string ext = ".safetensors";
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(data_dir)) {
    const std::string file = e.path().filename().string();
    if (file.starts_with(prefix) && file.ends_with(ext)) names.push_back(file.substr(0, file.size() - ext.size()));
  }
  std::sort(names.begin(), names.end());
  return names;
}

// docs/conventions.md's rule max|got - ref| <= 1e-5 * max(1, max|ref|), as a ratio: <= 1 passes.
inline double excess(std::span<const float> got, std::span<const float> ref) {
  REQUIRE(got.size() == ref.size());
  double diff = 0, scale = 1;
  for (std::size_t i = 0; i < got.size(); ++i) {
    diff = std::max(diff, static_cast<double>(std::fabs(got[i] - ref[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(ref[i])));
  }
  return diff / (1e-5 * scale);
}

// The model's buffers as plain vectors, each aligned to the allocator's 256 bytes.
struct test_buffers {
  std::vector<std::vector<std::byte>> storage;
  buffer_set set;

  explicit test_buffers(const std::vector<buffer_spec>& specs) {
    for (const auto& s : specs) {
      storage.emplace_back(s.bytes + allocation_alignment);
      auto* p = storage.back().data();
      const auto misalign = reinterpret_cast<std::uintptr_t>(p) % allocation_alignment;
      p += misalign ? allocation_alignment - misalign : 0;
      set.add(s.name, {p, s.bytes});
    }
  }
};

// Writes the weights of `file` (every tensor but input.* and ref.*) rounded to bf16 and stored as
// f32 to <temp dir>/<file_name>, and returns that path: an f32-compute model over them is what a
// bf16-weight run must equal.
inline std::string write_bf16_rounded(const checkpoint& file, const std::string& file_name) {
  const std::string path = (std::filesystem::temp_directory_path() / file_name).string();
  safetensors_writer wr;
  for (const auto& name : file.names()) {
    if (name.starts_with("input.") || name.starts_with("ref.")) continue;
    auto v = read_f32(file, name);
    for (auto& f : v) f = bf16_bits_to_float(float_to_bf16_bits(f));
    wr.add(name, file.at(name).dims, v);
  }
  wr.write(path);
  return path;
}

}  // namespace unshard::testing
