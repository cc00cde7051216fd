// libFuzzer entry for the safetensors header parser. The parser must either accept a file, and
// then every tensor must tile the data section exactly, or throw unshard::error. Any other
// exception, a sanitizer report or a broken invariant is a bug.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "unshard/io/safetensors_header.hpp"

namespace {

void check_file(std::span<const std::byte> file) {
  unshard::detail::safetensors_header h;
  try {
    h = unshard::detail::parse_safetensors_header(file, "fuzz-input");
  } catch (const unshard::error&) {
    return;
  }
  std::uint64_t covered = h.data_start;
  for (const auto& t : h.tensors) {
    if (t.offset != covered || t.offset > file.size() || t.bytes > file.size() - t.offset) std::abort();
    const std::uint64_t elem_bits = unshard::detail::safetensors_dtype_bits(t.dtype_name);
    if (elem_bits == 0 || static_cast<std::uint64_t>(t.dims.numel()) * elem_bits != t.bytes * 8) std::abort();
    if (t.type && unshard::safetensors_name(*t.type) != t.dtype_name) std::abort();
    covered += t.bytes;
  }
  if (covered != file.size()) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // As a raw file: exercises the length field and the size checks.
  check_file({reinterpret_cast<const std::byte*>(data), size});

  // As header text behind a correct length field, first byte = data section size: most mutations
  // of a raw file break the length field, so this keeps the fuzzer inside the JSON validation.
  if (size == 0) return 0;
  const std::size_t text_len = size - 1, data_len = data[0];
  std::vector<std::byte> file(8 + text_len + data_len);
  for (int i = 0; i < 8; ++i) file[i] = static_cast<std::byte>((static_cast<std::uint64_t>(text_len) >> (8 * i)) & 0xff);
  if (text_len) std::memcpy(file.data() + 8, data + 1, text_len);
  check_file(file);
  return 0;
}
