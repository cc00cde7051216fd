#pragma once
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

#include "unshard/core/error.hpp"
#include "unshard/policy/policy_values.hpp"
#include "unshard/policy/unit_info.hpp"

namespace unshard {

// "64MiB", "1.5GB", "4096" -> bytes. KiB/MiB/GiB are powers of 2, KB/MB/GB powers of 10, a bare
// number is bytes. Throws naming `what` and the text.
inline std::size_t parse_size(std::string_view text, std::string_view what = "size") {
  std::size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  const std::string number(text.substr(0, i));
  const std::string_view unit = text.substr(i);
  if (number.empty() || number.front() == '.' || number.back() == '.' ||
      number.find('.') != number.rfind('.'))
    throw_error("invalid ", what, " '", text, "': expected NUM[.FRAC](B|KiB|MiB|GiB|KB|MB|GB)");
  double scale = 0;
  if (unit.empty() || unit == "B") scale = 1;
  else if (unit == "KiB") scale = 1024.0;
  else if (unit == "MiB") scale = 1024.0 * 1024;
  else if (unit == "GiB") scale = 1024.0 * 1024 * 1024;
  else if (unit == "KB") scale = 1e3;
  else if (unit == "MB") scale = 1e6;
  else if (unit == "GB") scale = 1e9;
  else throw_error("invalid ", what, " '", text, "': unknown unit '", unit, "' (B, KiB, MiB, GiB, KB, MB, GB)");
  const double bytes = std::stod(number) * scale;
  if (!(bytes < 9.0e18)) throw_error("invalid ", what, " '", text, "': too large");
  return static_cast<std::size_t>(std::llround(bytes));
}

// The policy grammar of docs/conventions.md: term ('+' term)*, each kind at most once. The
// weight-format (fp8, fp8:tensor) and KV-placement (kv:device, kv:offload[:K]) terms say what is
// stored, not how it is gathered, so they combine with every other term, full and fsdp included.
// `auto` is the planner's and is not accepted here; `fsdp` is parsed here, and run by the tools
// that support it.
struct parsed_policy {
  policy_values values;
  bool fsdp = false;
  std::optional<std::size_t> chunk_bytes;  // chunked:SIZE
};

namespace detail {
// FSDP as Live Avatar wraps its DiT: one FSDP unit per block; everything outside the blocks
// (unit_info::root: embeddings, head, and in the S2V model the frame packer, encoders and audio
// injectors) is the root unit, gathered for the whole forward.
constexpr bool keeps_root_unit(const unit_info& u) noexcept { return u.root; }
}  // namespace detail

inline parsed_policy parse_policy(std::string_view text) {
  parsed_policy out;
  policy_values& v = out.values;
  bool seen_full = false, seen_selective = false, seen_prefetch = false, seen_offload = false, seen_chunked = false;
  bool seen_fp8 = false, seen_kv = false;
  std::size_t terms = 0;  // terms about gathering: `full` and `fsdp` admit none besides themselves
  if (text.empty()) throw_error("invalid policy '': expected e.g. full, selective, prefetch:1, offload+prefetch:2");
  std::size_t pos = 0;
  while (pos <= text.size()) {
    const std::size_t plus = text.find('+', pos);
    const std::string_view term = text.substr(pos, plus == std::string_view::npos ? std::string_view::npos : plus - pos);
    pos = plus == std::string_view::npos ? text.size() + 1 : plus + 1;
    auto once = [&](bool& seen, std::string_view kind) {
      if (seen) throw_error("invalid policy '", text, "': term '", term, "' repeats the ", kind, " kind");
      seen = true;
    };
    // K in `prefetch:K` and `kv:offload:K`: 1 <= K <= 64.
    auto depth_of = [&](std::string_view k) {
      std::size_t depth = 0;
      const auto [end, ec] = std::from_chars(k.data(), k.data() + k.size(), depth);
      if (ec != std::errc() || end != k.data() + k.size() || depth < 1 || depth > 64)
        throw_error("invalid policy '", text, "': term '", term, "' needs an integer K with 1 <= K <= 64");
      return depth;
    };
    // What is stored, not how it is gathered: combines with every other term.
    if (term == "fp8" || term.starts_with("fp8:")) {
      once(seen_fp8, "fp8");
      v.fp8 = true;
      if (term == "fp8" || term == "fp8:channel") v.fp8_scaling = quant::fp8_scaling::per_channel;
      else if (term == "fp8:tensor") v.fp8_scaling = quant::fp8_scaling::per_tensor;
      else
        throw_error("invalid policy '", text, "': unknown fp8 scaling in term '", term,
                    "' (fp8 or fp8:channel: one scale per output channel; fp8:tensor: one per tensor)");
      continue;
    }
    if (term == "kv" || term.starts_with("kv:")) {
      once(seen_kv, "kv");
      if (term == "kv:device") {
        v.kv_offload = false;
        v.kv_prefetch = 1;
      } else if (term == "kv:offload") {
        v.kv_offload = true;
        v.kv_prefetch = 1;
      } else if (term.starts_with("kv:offload:")) {
        v.kv_offload = true;
        v.kv_prefetch = depth_of(term.substr(11));
      } else {
        throw_error("invalid policy '", text, "': unknown KV placement in term '", term,
                    "' (kv:device, kv:offload or kv:offload:K)");
      }
      continue;
    }
    ++terms;
    if (term == "full") {
      once(seen_full, "full");
    } else if (term == "fsdp") {
      once(out.fsdp, "fsdp");
    } else if (term == "selective" || term == "selective:block" || term == "selective:subunit") {
      once(seen_selective, "selective");
      v.granularity = term == "selective:subunit" ? unshard_granularity::subunit : unshard_granularity::block;
    } else if (term.starts_with("prefetch:")) {
      once(seen_prefetch, "prefetch");
      v.prefetch_depth = depth_of(term.substr(9));
    } else if (term == "offload") {
      once(seen_offload, "offload");
      v.offload = true;
    } else if (term.starts_with("chunked:")) {
      once(seen_chunked, "chunked");
      out.chunk_bytes = parse_size(term.substr(8), "chunk size in policy term '" + std::string(term) + "'");
      if (*out.chunk_bytes == 0)
        throw_error("invalid policy '", text, "': term '", term, "' needs a chunk size of at least 1 byte");
      v.granularity = unshard_granularity::chunk;
      v.chunk_bytes = *out.chunk_bytes;
      v.resident_below_bytes = 0;  // small weights are grouped into chunks; 1-D parameters stay resident
    } else {
      throw_error("invalid policy '", text, "': unknown term '", term,
                  "' (terms: full, selective[:block|:subunit], prefetch:K, offload, chunked:SIZE, fsdp, fp8[:channel|:tensor], "
                  "kv:device, kv:offload[:K])");
    }
  }
  if (seen_chunked && seen_selective)
    throw_error("invalid policy '", text, "': 'chunked' and 'selective' both choose what is gathered at once; "
                "use one of them");
  if ((seen_full || out.fsdp) && terms > 1)
    throw_error("invalid policy '", text, "': '", seen_full ? "full" : "fsdp",
                "' combines with no other term (but fp8 and kv: terms)");
  v.full = seen_full;
  v.resident_below_bytes = v.full ? 0 : v.resident_below_bytes;
  if (out.fsdp) {  // FULL_SHARD: every parameter sharded; blocks gathered one ahead, freed after use
    v.resident_below_bytes = 0;
    v.prefetch_depth = 1;
    v.keeps_gathered = &detail::keeps_root_unit;
  }
  if (v.full) v.name = "full";
  else if (out.fsdp) v.name = "fsdp";
  else {
    v.name = v.granularity == unshard_granularity::subunit ? "selective:subunit" : "selective:block";
    if (out.chunk_bytes) v.name = "chunked:" + std::to_string(*out.chunk_bytes);
    if (v.prefetch_depth) v.name += "+prefetch:" + std::to_string(v.prefetch_depth);
    if (v.offload) v.name += "+offload";
  }
  v.name += v.storage_terms();
  return out;
}

}  // namespace unshard
