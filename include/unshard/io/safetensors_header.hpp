#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include "unshard/core/dtype.hpp"
#include "unshard/core/error.hpp"
#include "unshard/core/shape.hpp"
#include "unshard/io/json_strict.hpp"

namespace unshard {

// One tensor entry of a safetensors header, validated against the file it came from.
struct tensor_info {
  std::string name;
  std::string dtype_name;     // as in the file: "F32", "BF16", "F16", "F8_E4M3", "I64", "F64", ...
  std::optional<dtype> type;  // set only for F32/BF16/F16/F8_E4M3 (the dtypes we store weights in)
  shape dims;
  std::uint64_t offset = 0;  // absolute byte offset of the data in the file
  std::uint64_t bytes = 0;
};

namespace detail {

// A header is a few hundred bytes per tensor; anything near this is not a checkpoint but an
// attempt to make us allocate (the reference implementation uses the same bound).
inline constexpr std::uint64_t max_safetensors_header_bytes = 100'000'000;

// Bits per element of every dtype the safetensors format defines (sub-byte float formats
// included, so their files validate too); 0 for an unknown name.
inline std::uint32_t safetensors_dtype_bits(std::string_view s) noexcept {
  struct entry {
    std::string_view name;
    std::uint32_t bits;
  };
  static constexpr entry table[] = {
      {"BOOL", 8},     {"U8", 8},       {"I8", 8},       {"F8_E5M2", 8},  {"F8_E4M3", 8},   {"F8_E8M0", 8},
      {"I16", 16},     {"U16", 16},     {"F16", 16},     {"BF16", 16},    {"I32", 32},      {"U32", 32},
      {"F32", 32},     {"F64", 64},     {"I64", 64},     {"U64", 64},     {"C64", 64},      {"F4", 4},
      {"F6_E2M3", 6},  {"F6_E3M2", 6},
  };
  for (const entry& e : table)
    if (e.name == s) return e.bits;
  return 0;
}

// F8_E4M3 is the OCP "FN" variant (torch's float8_e4m3fn), the one safetensors means by that name.
// Its tensors hold codes; their scales are separate tensors the loader pairs them with.
inline std::optional<dtype> compute_dtype(std::string_view s) noexcept {
  if (s == "F32") return dtype::f32;
  if (s == "BF16") return dtype::bf16;
  if (s == "F16") return dtype::f16;
  if (s == "F8_E4M3") return dtype::f8e4m3;
  return std::nullopt;
}

// Element count of untrusted dims, or nullopt if a dim is negative or overflows. shape::numel()
// multiplies left to right in int64, so every prefix product must fit, even when a later dim is
// 0 (which the format allows: a zero-element tensor).
inline std::optional<std::uint64_t> checked_numel(std::span<const std::int64_t> dims) noexcept {
  std::int64_t n = 1;
  for (const std::int64_t d : dims) {
    if (d < 0) return std::nullopt;
    if (d != 0 && n > std::numeric_limits<std::int64_t>::max() / d) return std::nullopt;
    n *= d;
  }
  return static_cast<std::uint64_t>(n);
}

// A non-negative JSON integer (nlohmann stores those as unsigned), or nullopt.
inline std::optional<std::uint64_t> json_index(const nlohmann::json& v) noexcept {
  if (!v.is_number_unsigned()) return std::nullopt;
  return v.get<std::uint64_t>();
}

struct safetensors_header {
  std::vector<tensor_info> tensors;  // sorted by data offset
  std::map<std::string, std::string> metadata;
  std::uint64_t data_start = 0;  // absolute offset of the data section (8 + header length)
};

inline std::uint64_t read_u64_le(const std::byte* p) noexcept {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<std::uint64_t>(p[i]);
  return v;
}

inline std::map<std::string, std::string> parse_safetensors_metadata(const nlohmann::json& m, const std::string& where) {
  if (!m.is_object()) throw_error(where, ": __metadata__ is not a JSON object but ", short_dump(m));
  std::map<std::string, std::string> out;
  for (const auto& [k, v] : m.items()) {
    if (!v.is_string()) throw_error(where, ": __metadata__ value of key '", k, "' is not a string but ", short_dump(v));
    out.emplace(k, v.get<std::string>());
  }
  return out;
}

// Validates one header entry; data_bytes is the size of the data section that follows the header.
inline tensor_info parse_safetensors_entry(const std::string& name, const nlohmann::json& e, const std::string& where,
                                           std::uint64_t data_start, std::uint64_t data_bytes) {
  const std::string culprit = where + ": tensor '" + name + "'";
  if (!e.is_object()) throw_error(culprit, ": entry is not a JSON object but ", short_dump(e));
  for (const char* key : {"dtype", "shape", "data_offsets"})
    if (!e.contains(key)) throw_error(culprit, ": entry has no \"", key, "\"");

  tensor_info t;
  t.name = name;
  const nlohmann::json& dt = e["dtype"];
  if (!dt.is_string()) throw_error(culprit, ": dtype is not a string but ", short_dump(dt));
  t.dtype_name = dt.get<std::string>();
  const std::uint32_t bits = safetensors_dtype_bits(t.dtype_name);
  if (bits == 0) throw_error(culprit, ": unknown dtype '", t.dtype_name, "'");
  t.type = compute_dtype(t.dtype_name);

  const nlohmann::json& sh = e["shape"];
  if (!sh.is_array()) throw_error(culprit, ": shape is not an array but ", short_dump(sh));
  if (sh.size() > shape::max_rank)
    throw_error(culprit, ": shape ", short_dump(sh), " has rank ", sh.size(), ", more than the supported ", shape::max_rank);
  std::int64_t dims[shape::max_rank] = {};
  for (std::size_t i = 0; i < sh.size(); ++i) {
    const auto d = json_index(sh[i]);
    if (!d || *d > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
      throw_error(culprit, ": shape ", short_dump(sh), " dimension ", i, " is not a non-negative integer");
    dims[i] = static_cast<std::int64_t>(*d);
  }
  const std::span<const std::int64_t> dim_span(dims, sh.size());
  const auto numel = checked_numel(dim_span);
  if (!numel || *numel > std::numeric_limits<std::uint64_t>::max() / bits)
    throw_error(culprit, ": shape ", short_dump(sh), " overflows the element count");
  t.dims = shape(dim_span);

  const nlohmann::json& off = e["data_offsets"];
  const auto begin = off.is_array() && off.size() == 2 ? json_index(off[0]) : std::nullopt;
  const auto end = off.is_array() && off.size() == 2 ? json_index(off[1]) : std::nullopt;
  if (!begin || !end) throw_error(culprit, ": data_offsets must be 2 non-negative integers, got ", short_dump(off));
  if (*begin > *end) throw_error(culprit, ": data_offsets [", *begin, ", ", *end, "] begin after end");
  if (*end > data_bytes)
    throw_error(culprit, ": data_offsets [", *begin, ", ", *end, "] end beyond the data section of ", data_bytes,
                " bytes (would end at file byte offset ", data_start + *end, ", file size ", data_start + data_bytes, ")");
  t.offset = data_start + *begin;
  t.bytes = *end - *begin;

  const std::uint64_t want_bits = *numel * bits;
  if (want_bits % 8 != 0 || t.bytes != want_bits / 8)
    throw_error(culprit, ": data_offsets [", *begin, ", ", *end, "] (file byte offset ", t.offset, ") hold ", t.bytes,
                " bytes, but shape ", t.dims.to_string(), " of ", t.dtype_name, " needs ", want_bits / 8,
                want_bits % 8 ? " and a fraction" : "", " bytes");
  return t;
}

// Parses and validates the header of a whole safetensors file held in memory. Every check the
// format implies happens here, so a file that passes can be read without further bounds checks:
// the fuzzer drives this function directly.
inline safetensors_header parse_safetensors_header(std::span<const std::byte> file, const std::string& name_for_errors) {
  const std::string where = "safetensors file '" + name_for_errors + "'";
  if (file.size() < 8)
    throw_error(where, ": file is ", file.size(), " bytes, shorter than the 8-byte header length field");
  const std::uint64_t header_len = read_u64_le(file.data());
  const std::uint64_t after_len = file.size() - 8;
  if (header_len > after_len)
    throw_error(where, ": header length ", header_len, " (at byte offset 0) reaches beyond the file size of ",
                file.size(), " bytes");
  if (header_len > max_safetensors_header_bytes)
    throw_error(where, ": header length ", header_len, " is absurd (limit ", max_safetensors_header_bytes, " bytes)");

  safetensors_header out;
  out.data_start = 8 + header_len;
  const std::uint64_t data_bytes = after_len - header_len;
  const std::string_view text(reinterpret_cast<const char*>(file.data() + 8), static_cast<std::size_t>(header_len));
  const nlohmann::json root = parse_json_strict(text, where + ": header", "tensor name", 8);
  if (!root.is_object()) throw_error(where, ": header is not a JSON object but ", short_dump(root));

  out.tensors.reserve(root.size());
  for (const auto& [key, value] : root.items()) {
    if (key == "__metadata__")
      out.metadata = parse_safetensors_metadata(value, where);
    else
      out.tensors.push_back(parse_safetensors_entry(key, value, where, out.data_start, data_bytes));
  }

  std::sort(out.tensors.begin(), out.tensors.end(), [](const tensor_info& a, const tensor_info& b) {
    return std::tie(a.offset, a.bytes, a.name) < std::tie(b.offset, b.bytes, b.name);
  });
  // The format forbids overlaps and holes: data must tile the data section exactly, so no byte
  // of the file can hide content (polyglot files) or be read as two tensors at once.
  std::uint64_t covered = out.data_start;
  const tensor_info* prev = nullptr;
  for (const tensor_info& t : out.tensors) {
    if (t.offset < covered)
      throw_error(where, ": tensor '", t.name, "' at file byte offset ", t.offset, " overlaps tensor '", prev->name,
                  "' which ends at byte offset ", covered);
    if (t.offset > covered)
      throw_error(where, ": hole of ", t.offset - covered, " bytes at file byte offset ", covered,
                  " before tensor '", t.name, "' (safetensors data must be contiguous)");
    covered = t.offset + t.bytes;
    prev = &t;
  }
  if (covered != file.size())
    throw_error(where, ": ", file.size() - covered, " trailing bytes at file byte offset ", covered,
                " not covered by any tensor");
  return out;
}

}  // namespace detail
}  // namespace unshard
