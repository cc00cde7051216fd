#pragma once
// A peft LoRA merged into a base weight source while each rank loads its shard.
//
// Live Avatar ships its LoRA in peft format: for a module M of the base model (a linear layer
// with weight [out, in]) the file holds `base_model.model.M.lora_A.weight` [r, in] and
// `base_model.model.M.lora_B.weight` [out, r], and the merged weight is
//     W' = W + s · (B · A),   s = alpha / r   (alpha / sqrt(r) with use_rslora).
// lora_weights wraps the base source: a targeted weight is described as f32, and read() returns
// W' for exactly the requested element range, computed from the rows of B that range covers and
// never from a materialised full W'. The loader (detail::load_elements) therefore rounds once,
// from f32 to the storage dtype, and each rank merges only its own slice.
//
// The f32 expression, fixed so that every rank and world size gets the same bits:
//     W'[i, j] = W[i, j] + Σ_k (s · B[i, k]) · A[k, j]
// with s · B[i, k] rounded to f32, the sum taken by the portable GEMM (kernels/host/gemm.hpp),
// whose summation order depends on r alone, not on which rows or columns a call asks for, and
// one f32 addition of the base value last. A base weight stored as f8e4m3 (an fp8 checkpoint) is
// dequantized first, W = code x its stored scale; under an fp8 policy the merged f32 weight is then
// quantized afresh.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "unshard/core/dtype.hpp"
#include "unshard/core/error.hpp"
#include "unshard/io/checkpoint.hpp"
#include "unshard/io/json_strict.hpp"
#include "unshard/kernels/host/gemm.hpp"
#include "unshard/runtime/weight_source.hpp"

namespace unshard {

// What adapter_config.json says about the merge (peft's keys).
struct lora_adapter_config {
  std::string path;
  double alpha = 0;
  std::optional<std::int64_t> rank;  // "r", checked against every lora_A
  bool rslora = false;               // "use_rslora": s = alpha / sqrt(r)
};

// Reads a peft adapter_config.json. Refuses what this merge does not implement (DoRA,
// fan_in_fan_out, per-module rank or alpha patterns) instead of merging it wrongly.
inline lora_adapter_config read_lora_adapter_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_error("cannot open LoRA adapter config '", path, "'");
  std::ostringstream buf;
  buf << in.rdbuf();
  const std::string where = "LoRA adapter config '" + path + "'";
  const nlohmann::json j = detail::parse_json_strict(buf.str(), where);
  if (!j.is_object()) throw_error(where, ": not a JSON object");
  lora_adapter_config c;
  c.path = path;
  if (const auto t = j.find("peft_type"); t != j.end() && !(t->is_string() && *t == "LORA"))
    throw_error(where, ": peft_type is ", detail::short_dump(*t), ", only \"LORA\" can be merged");
  const auto a = j.find("lora_alpha");
  if (a == j.end()) throw_error(where, ": missing \"lora_alpha\" (give the alpha explicitly instead)");
  if (!a->is_number() || !std::isfinite(a->get<double>()))
    throw_error(where, ": \"lora_alpha\" is ", detail::short_dump(*a), ", not a finite number");
  c.alpha = a->get<double>();
  if (const auto r = j.find("r"); r != j.end()) {
    if (!r->is_number_integer() || r->get<std::int64_t>() < 1)
      throw_error(where, ": \"r\" is ", detail::short_dump(*r), ", not a positive integer");
    c.rank = r->get<std::int64_t>();
  }
  const auto flag = [&](const char* key) {
    const auto f = j.find(key);
    if (f == j.end() || f->is_null()) return false;
    if (!f->is_boolean()) throw_error(where, ": \"", key, "\" is ", detail::short_dump(*f), ", not a boolean");
    return f->get<bool>();
  };
  c.rslora = flag("use_rslora");
  if (flag("use_dora")) throw_error(where, ": use_dora is true; DoRA adapters cannot be merged as plain LoRA");
  if (flag("fan_in_fan_out")) throw_error(where, ": fan_in_fan_out is true; only [out, in] linear weights are supported");
  for (const char* key : {"rank_pattern", "alpha_pattern"})
    if (const auto p = j.find(key); p != j.end() && !p->is_null() && !(p->is_object() && p->empty()))
      throw_error(where, ": \"", key, "\" is not empty; per-module ranks or alphas are not supported");
  return c;
}

template <weight_source Base>
class lora_weights {
 public:
  static constexpr std::string_view prefix = "base_model.model.";
  static constexpr std::string_view suffix_a = ".lora_A.weight";
  static constexpr std::string_view suffix_b = ".lora_B.weight";

  // alpha: explicit (a --lora-alpha option); otherwise adapter_config.json beside the LoRA file.
  lora_weights(const Base& base, const checkpoint& lora, std::optional<double> alpha = std::nullopt)
      : base_(base), lora_(lora) {
    std::optional<lora_adapter_config> config;
    if (alpha) {
      if (!std::isfinite(*alpha)) throw_error("LoRA alpha for '", lora.path(), "' is ", *alpha, ", not a finite number");
    } else {
      const std::filesystem::path cfg = std::filesystem::path(lora.path()).parent_path() / "adapter_config.json";
      std::error_code ec;
      if (!std::filesystem::exists(cfg, ec))
        throw_error("no LoRA alpha for '", lora.path(), "': give it explicitly (--lora-alpha) or put an adapter_config.json "
                    "with \"lora_alpha\" beside the file (looked for '", cfg.string(), "')");
      config = read_lora_adapter_config(cfg.string());
    }
    collect_targets(alpha ? *alpha : config->alpha, config);
  }

  stored_tensor describe(std::string_view name) const {
    const auto it = targets_.find(name);
    if (it == targets_.end()) return base_.describe(name);
    return {dtype::f32, it->second.dims};
  }

  void read(std::string_view name, std::uint64_t offset, std::span<std::byte> dst) const {
    const auto it = targets_.find(name);
    if (it == targets_.end()) {
      base_.read(name, offset, dst);
      return;
    }
    merge_range(name, it->second, offset, dst);
  }

  std::string origin() const { return base_.origin() + " (with LoRA '" + lora_.path() + "')"; }

  // The base weights the LoRA changes, sorted; and each one's rank and scale s.
  std::vector<std::string> targets() const {
    std::vector<std::string> out;
    for (const auto& [name, t] : targets_) out.push_back(name);
    return out;
  }
  std::int64_t rank_of(std::string_view name) const { return target_of(name).rank; }
  float scale_of(std::string_view name) const { return target_of(name).scale; }

 private:
  struct target {
    std::string a_name, b_name;
    shape dims;         // [out, in], the base weight's
    dtype base_type;    // the base weight's stored dtype
    std::int64_t rank;  // r
    float scale;        // s, rounded to f32 once
    std::vector<float> fp8_scales;  // an f8e4m3 base weight's stored scales (1, or one per row)
  };

  // Rows merged at once (at least; more when rows are short): bounds the scratch memory per rank
  // thread to about 2 x max(64 rows, 256 Ki elements) floats, whatever the shard size.
  static constexpr std::size_t block_rows = 64;
  static constexpr std::size_t piece_elems = std::size_t{1} << 18;
  // Transposed lora_A matrices kept for the next reads (all ranks load the same weight at about
  // the same time, so a few entries serve them all).
  static constexpr std::size_t a_cache_entries = 4;

  const target& target_of(std::string_view name) const {
    const auto it = targets_.find(name);
    if (it == targets_.end()) throw_error("'", name, "' is not a weight the LoRA '", lora_.path(), "' changes");
    return it->second;
  }

  static std::optional<std::string> module_of(const std::string& n, std::string_view suffix) {
    if (!n.starts_with(prefix) || !n.ends_with(suffix) || n.size() <= prefix.size() + suffix.size()) return std::nullopt;
    return n.substr(prefix.size(), n.size() - prefix.size() - suffix.size());
  }

  const tensor_info& lora_tensor(const std::string& name) const {
    const tensor_info& t = lora_.at(name);
    if (!t.type || *t.type == dtype::f8e4m3)
      throw_error(lora_.path(), ": LoRA tensor '", name, "' has dtype ", t.dtype_name, "; it must be F32, BF16 or F16");
    if (t.dims.rank() != 2) throw_error(lora_.path(), ": LoRA tensor '", name, "' has shape ", t.dims.to_string(), ", not 2-D");
    return t;
  }

  void collect_targets(double alpha, const std::optional<lora_adapter_config>& config) {
    std::map<std::string, std::pair<std::string, std::string>> modules;  // module -> (A name, B name)
    for (const std::string& n : lora_.names()) {
      if (const auto m = module_of(n, suffix_a)) {
        modules[*m].first = n;
      } else if (const auto m2 = module_of(n, suffix_b)) {
        modules[*m2].second = n;
      } else {
        throw_error(lora_.path(), ": tensor '", n, "' is not a peft LoRA weight (expected ", prefix, "<module>", suffix_a,
                    " or ", prefix, "<module>", suffix_b, ")");
      }
    }
    for (const auto& [module, names] : modules) {
      const auto& [a_name, b_name] = names;
      if (a_name.empty() || b_name.empty()) {
        const std::string& have = a_name.empty() ? b_name : a_name;
        throw_error(lora_.path(), ": LoRA tensor '", have, "' has no partner '", prefix, module,
                    a_name.empty() ? suffix_a : suffix_b, "'");
      }
      const tensor_info& a = lora_tensor(a_name);
      const tensor_info& b = lora_tensor(b_name);
      const std::int64_t r = a.dims[0];
      if (b.dims[1] != r)
        throw_error(lora_.path(), ": LoRA rank mismatch for '", module, "': '", a_name, "' has shape ", a.dims.to_string(),
                    " (rank ", r, ") but '", b_name, "' has shape ", b.dims.to_string(), " (rank ", b.dims[1], ")");
      if (config && config->rank && *config->rank != r)
        throw_error(lora_.path(), ": '", a_name, "' has rank ", r, " but '", config->path, "' says r = ", *config->rank);
      const std::string weight = module + ".weight";
      stored_tensor base;
      try {
        base = base_.describe(weight);
      } catch (const error& e) {
        throw_error(lora_.path(), ": LoRA tensor '", a_name, "' targets no base weight: '", weight,
                    "' is not in the base weights (", e.what(), ")");
      }
      const shape update{b.dims[0], a.dims[1]};
      if (!(base.dims == update))
        throw_error(lora_.path(), ": LoRA for '", weight, "' is a ", update.to_string(), " update ('", b_name, "' ",
                    b.dims.to_string(), " x '", a_name, "' ", a.dims.to_string(), ") but the base weight in ",
                    base_.origin(), " has shape ", base.dims.to_string());
      // An fp8 checkpoint's weight merges from its dequantized values (codes x stored scales); an
      // fp8 policy then quantizes the merged f32 weight afresh (fp8_weight_source), as it would a
      // bf16 checkpoint's: the LoRA's update is far finer than an e4m3 step, so it cannot be added
      // to the codes.
      std::vector<float> fp8_scales;
      if (base.type == dtype::f8e4m3) fp8_scales = read_fp8_scales(base_, weight, static_cast<std::size_t>(base.dims[0])).values;
      const double s = config && config->rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
      targets_.emplace(weight, target{a_name, b_name, base.dims, base.type, r, static_cast<float>(s), std::move(fp8_scales)});
    }
  }

  // lora_A transposed to [in, r] in f32: the GEMM's "weight rows" are then A's columns, so any
  // column range of the update is a contiguous slice.
  std::shared_ptr<const std::vector<float>> a_transposed(const target& t) const {
    std::lock_guard lock(cache_mutex_);
    for (auto it = a_cache_.begin(); it != a_cache_.end(); ++it)
      if (it->first == t.a_name) {
        auto hit = *it;
        a_cache_.erase(it);
        a_cache_.insert(a_cache_.begin(), hit);
        return hit.second;
      }
    const std::vector<float> a = read_f32(lora_, t.a_name);
    const auto r = static_cast<std::size_t>(t.rank), in = static_cast<std::size_t>(t.dims[1]);
    auto at = std::make_shared<std::vector<float>>(a.size());
    for (std::size_t k = 0; k < r; ++k)
      for (std::size_t j = 0; j < in; ++j) (*at)[j * r + k] = a[k * in + j];
    a_cache_.insert(a_cache_.begin(), {t.a_name, at});
    if (a_cache_.size() > a_cache_entries) a_cache_.pop_back();
    return at;
  }

  // s · B[row0 .. row0+rows), in f32.
  std::vector<float> scaled_b_rows(const target& t, std::size_t row0, std::size_t rows) const {
    const auto r = static_cast<std::size_t>(t.rank);
    const dtype bt = *lora_.at(t.b_name).type;
    std::vector<std::byte> raw(rows * r * size_of(bt));
    lora_.read(t.b_name, row0 * r * size_of(bt), raw);
    std::vector<float> out(rows * r);
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = t.scale * load_as_float(raw.data(), bt, i);
    return out;
  }

  // Base elements [first, first + n) widened to f32 into out (whole rows: merge_block's); f8e4m3
  // codes checked for the NaN code and dequantized with their stored scales, as the host GEMM would.
  void base_values(std::string_view name, const target& t, std::size_t first, std::size_t n, float* out) const {
    const std::size_t es = size_of(t.base_type);
    if (t.base_type == dtype::f32) {
      base_.read(name, first * es, {reinterpret_cast<std::byte*>(out), n * es});
      return;
    }
    std::vector<std::byte> raw(n * es);
    base_.read(name, first * es, raw);
    if (t.base_type == dtype::f8e4m3) {
      const auto cols = static_cast<std::size_t>(t.dims[1]);
      const auto* codes = reinterpret_cast<const f8e4m3*>(raw.data());
      quant::check_codes(name, codes, first, n, cols);
      quant::dequantize_rows(codes, first / cols, (first + n) / cols, cols,
                             t.fp8_scales.size() == 1 ? quant::fp8_scaling::per_tensor : quant::fp8_scaling::per_channel,
                             t.fp8_scales, out);
      return;
    }
    for (std::size_t i = 0; i < n; ++i) out[i] = load_as_float(raw.data(), t.base_type, i);
  }

  // A block of whole merged rows of one weight, kept per rank thread: the loader reads a shard in
  // consecutive pieces (16 Ki elements when it converts to bf16), and merging 64 rows at once lets
  // the GEMM reuse each column of A across them instead of streaming A again for every piece.
  struct merged_block {
    const target* t = nullptr;
    std::size_t row0 = 0, rows = 0;
    std::vector<float> values;  // rows x in
  };

  merged_block& my_block() const {
    std::lock_guard lock(cache_mutex_);
    return blocks_[std::this_thread::get_id()];  // std::map: the node stays put; only this thread uses it
  }

  void merge_block(std::string_view name, const target& t, std::size_t row, merged_block& b) const {
    const auto out_rows = static_cast<std::size_t>(t.dims[0]), in = static_cast<std::size_t>(t.dims[1]);
    const auto r = static_cast<std::size_t>(t.rank);
    const std::size_t rows = std::min(out_rows - row, std::max<std::size_t>(block_rows, piece_elems / in));
    const auto at = a_transposed(t);
    const std::vector<float> bs = scaled_b_rows(t, row, rows);
    std::vector<float> delta(rows * in);
    const tensor_view a_cols(const_cast<float*>(at->data()), dtype::f32,
                             shape{static_cast<std::int64_t>(in), static_cast<std::int64_t>(r)});
    linear_rows(bs.data(), rows, r, a_cols, tensor_view{}, 0, delta.data(), in, gemm_path::portable);
    b.values.resize(rows * in);
    base_values(name, t, row * in, rows * in, b.values.data());
    for (std::size_t i = 0; i < delta.size(); ++i) b.values[i] += delta[i];
    b.t = &t;
    b.row0 = row;
    b.rows = rows;
  }

  void merge_range(std::string_view name, const target& t, std::uint64_t offset, std::span<std::byte> dst) const {
    const auto out_rows = static_cast<std::size_t>(t.dims[0]), in = static_cast<std::size_t>(t.dims[1]);
    if (offset % 4 != 0 || dst.size() % 4 != 0)
      throw_error(origin(), ": read of LoRA-merged f32 tensor '", name, "' at byte offset ", offset, " (", dst.size(),
                  " bytes) is not aligned to whole elements");
    const std::size_t first = static_cast<std::size_t>(offset / 4), count = dst.size() / 4;
    if (first + count > out_rows * in)
      throw_error(origin(), ": read of tensor '", name, "' at byte offset ", offset, " (", dst.size(),
                  " bytes) runs past its ", out_rows * in * 4, " bytes");
    merged_block& b = my_block();
    for (std::size_t pos = first, end = first + count; pos < end;) {
      const std::size_t row = pos / in;
      if (b.t != &t || row < b.row0 || row >= b.row0 + b.rows) merge_block(name, t, row, b);
      const std::size_t n = std::min(end, (b.row0 + b.rows) * in) - pos;
      std::memcpy(dst.data() + (pos - first) * 4, b.values.data() + (pos - b.row0 * in), n * 4);
      pos += n;
    }
  }

  const Base& base_;
  const checkpoint& lora_;
  std::map<std::string, target, std::less<>> targets_;
  mutable std::mutex cache_mutex_;
  mutable std::vector<std::pair<std::string, std::shared_ptr<const std::vector<float>>>> a_cache_;
  mutable std::map<std::thread::id, merged_block> blocks_;
};

}  // namespace unshard
