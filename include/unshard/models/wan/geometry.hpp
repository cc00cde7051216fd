#pragma once
// What one Wan forward computes on (the workload), how (the options), and every size derived from
// them and the config -- computed and validated once, so layers and buffers share the same numbers.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>

#include "unshard/core/dtype.hpp"
#include "unshard/core/error.hpp"
#include "unshard/kernels/host/gemm.hpp"
#include "unshard/kernels/thread/patch.hpp"
#include "unshard/models/wan/config.hpp"

namespace unshard::wan {

struct workload {
  std::array<std::int64_t, 4> latent_shape{};  // [C, F, H, W] of the input latent
  std::int64_t context_len = 0;                // L rows of text context; zero-padded to text_len
};

struct options {
  // dtype of every parameter, norms and modulations included (f32 or bf16), as FSDP's
  // param_dtype casts them all; activations stay f32 (the host computes in f32; the CUDA model's
  // bf16 precision rounds GEMM and attention inputs only), so no parameter needs to stay f32.
  dtype storage = dtype::f32;
  gemm_path gemm = gemm_path::portable;
  bool record_block_outputs = false;  // keep each block's output [S, D] (tests, debugging)
};

// The official rope tables (rope_params(1024, ...)) cover grid positions below 1024.
inline constexpr std::int64_t rope_positions = 1024;

// The sizes and numerics every Wan-family DiT shares (the plain Wan model, Live Avatar's S2V),
// filled from the backbone config and the options by fill_backbone().
struct backbone_geometry {
  std::size_t dim, ffn_dim, freq_dim, text_dim, text_len, in_dim, out_dim;
  std::size_t heads, head_dim, rope_pairs, num_layers;
  double eps;
  bool qk_norm, cross_attn_norm;
  dtype storage;
  gemm_path gemm;
  bool record_block_outputs;
};

inline void fill_backbone(wan::backbone_geometry& g, const wan::backbone_config& c, const wan::options& o) {
  const auto z = [](std::int64_t v) { return static_cast<std::size_t>(v); };
  g.dim = z(c.dim);
  g.ffn_dim = z(c.ffn_dim);
  g.freq_dim = z(c.freq_dim);
  g.text_dim = z(c.text_dim);
  g.text_len = z(c.text_len);
  g.in_dim = z(c.in_dim);
  g.out_dim = z(c.out_dim);
  g.heads = z(c.num_heads);
  g.head_dim = z(c.head_dim());
  g.rope_pairs = g.head_dim / 2;
  g.num_layers = z(c.num_layers);
  g.eps = c.eps;
  g.qk_norm = c.qk_norm;
  g.cross_attn_norm = c.cross_attn_norm;
  g.storage = o.storage;
  g.gemm = o.gemm;
  g.record_block_outputs = o.record_block_outputs;
}

struct geometry : wan::backbone_geometry {
  std::array<std::size_t, 4> latent;  // [C, F, H, W]
  std::size_t context_len;
  patch_grid grid;
  std::size_t tokens;     // S = gf * gh * gw (Wan's seq_len: no padding tokens)
  std::size_t patch_in;   // in_dim * pt * ph * pw: one patch vector
  std::size_t patch_out;  // out_dim * pt * ph * pw: one head output vector

  // Rows of the k/v scratch: self-attention keys are tokens, cross-attention keys text rows.
  std::size_t max_keys() const noexcept { return std::max(tokens, text_len); }
  // [C_out, gf*pt, gh*ph, gw*pw]: the latent cropped to whole patches.
  std::array<std::int64_t, 4> output_shape() const noexcept {
    return {static_cast<std::int64_t>(out_dim), static_cast<std::int64_t>(grid.gf * grid.pt),
            static_cast<std::int64_t>(grid.gh * grid.ph), static_cast<std::int64_t>(grid.gw * grid.pw)};
  }
};

inline wan::geometry make_geometry(const wan::config& c, const wan::workload& w, const wan::options& o) {
  c.validate("wan::model");
  const auto& l = w.latent_shape;
  const char* axes[4] = {"C", "F", "H", "W"};
  for (std::size_t i = 0; i < 4; ++i)
    if (l[i] <= 0) throw_error("wan workload: latent shape dimension ", axes[i], " is ", l[i], " (must be >= 1)");
  if (l[0] != c.in_dim)
    throw_error("wan workload: latent has ", l[0], " channels but the config's in_dim is ", c.in_dim);
  for (std::size_t i = 0; i < 3; ++i) {
    const std::int64_t cells = l[i + 1] / c.patch_size[i];
    if (cells < 1)
      throw_error("wan workload: latent ", axes[i + 1], "=", l[i + 1], " is smaller than the patch size ",
                  c.patch_size[i]);
    if (cells > wan::rope_positions)
      throw_error("wan workload: ", cells, " patches along ", axes[i + 1], " exceed the ", wan::rope_positions,
                  " rope positions of Wan");
  }
  if (w.context_len < 0 || w.context_len > c.text_len)
    throw_error("wan workload: context length ", w.context_len, " is outside [0, text_len = ", c.text_len, "]");
  if (o.storage != dtype::f32 && o.storage != dtype::bf16)
    throw_error("wan::model: storage dtype ", name_of(o.storage), " is not supported (f32 or bf16)");

  const auto z = [](std::int64_t v) { return static_cast<std::size_t>(v); };
  wan::geometry g{};
  fill_backbone(g, c, o);
  g.latent = {z(l[0]), z(l[1]), z(l[2]), z(l[3])};
  g.context_len = z(w.context_len);
  g.grid = {z(c.patch_size[0]), z(c.patch_size[1]), z(c.patch_size[2]),
            z(l[1] / c.patch_size[0]), z(l[2] / c.patch_size[1]), z(l[3] / c.patch_size[2])};
  g.tokens = g.grid.gf * g.grid.gh * g.grid.gw;
  const std::size_t patch_volume = g.grid.pt * g.grid.ph * g.grid.pw;
  g.patch_in = g.in_dim * patch_volume;
  g.patch_out = g.out_dim * patch_volume;
  return g;
}

}  // namespace unshard::wan
