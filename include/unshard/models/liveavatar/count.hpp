#pragma once
// Sizes of the S2V model for the planner, counted from the same module definitions the forward
// runs (s2v::model's layers and buffers), for any config and workload: parameters per unit, and the
// KV cache (cond cache + one noisy cache per denoising step) in bytes. No separate table.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/core/memory_category.hpp"
#include "unshard/models/liveavatar/model.hpp"

namespace unshard::s2v {

struct unit_count {
  std::string name;      // embeddings, frame_packer, cond_encoder, audio_encoder, blocks.i, audio_injector.j, head
  std::int64_t params = 0;
};

struct counts {
  std::vector<s2v::unit_count> units;  // forward order
  std::int64_t total = 0, blocks = 0, injectors = 0, outside_blocks = 0;
  std::size_t cond_cache_bytes = 0;        // cond K + V, all layers
  std::size_t noisy_cache_bytes = 0;       // one denoising step's noisy K + V, all layers
  std::size_t kv_cache_bytes = 0;          // cond + steps * noisy: one full set
};

// The pipeline's workload for a video of `width` x `height` pixels (divisible by 16: VAE stride 8,
// patch 2): latents height/8 x width/8, 3 frames per block, 4 blocks per clip in the cache, 4
// denoising steps, a full text context.
inline s2v::workload pipeline_workload(const s2v::config& c, std::int64_t width, std::int64_t height) {
  if (width <= 0 || height <= 0 || width % 16 != 0 || height % 16 != 0)
    throw_error("resolution ", width, "x", height, " must be positive and divisible by 16 (VAE stride 8 x patch 2)");
  s2v::workload w;
  w.latent_hw = {height / 8, width / 8};
  w.context_len = c.text_len;
  return w;
}

// A video size in pixels.
struct pixel_size {
  std::int64_t width = 0, height = 0;
  friend bool operator==(const pixel_size&, const pixel_size&) = default;
};

// Wan2.2-S2V's get_size_less_than_area (speech2video.py; Live Avatar keeps it): scale an image of
// width x height down until, padded to multiples of 64, it fits target_area; the same arithmetic in
// doubles (100 scales tried from the largest down, then an aspect-ratio fallback). The pad is
// always to 64 whatever `divisor` is; `divisor` only enters the scale bounds and the fallback.
inline pixel_size size_less_than_area(std::int64_t width, std::int64_t height, std::int64_t target_area,
                                      std::int64_t divisor = 64) {
  if (width <= 0 || height <= 0) throw_error("size ", width, "x", height, " must be positive");
  const double h = static_cast<double>(height), w = static_cast<double>(width), area = static_cast<double>(target_area);
  double min_scale = 0.1, max_scale = 1.0;
  if (height * width > target_area) {  // the smallest scale that can still need the largest pad
    const double d = static_cast<double>(divisor - 1), b = d * (h + w), a = h * w, c = d * d - area;
    min_scale = (-b + std::sqrt(b * b - 2 * a * c)) / (2 * a);
    max_scale = std::sqrt(area / (h * w));
  }
  const auto pad64 = [](std::int64_t v) { return v + (64 - v % 64) % 64; };
  for (int i = 0; i < 100; ++i) {
    const double scale = max_scale - (max_scale - min_scale) * i / 100;
    const auto padded_h = pad64(static_cast<std::int64_t>(h * scale)), padded_w = pad64(static_cast<std::int64_t>(w * scale));
    if (padded_h * padded_w <= target_area) return {padded_w, padded_h};
  }
  const double ratio = w / h, step = static_cast<double>(divisor);
  auto tw = static_cast<std::int64_t>(std::floor(std::sqrt(area * ratio) / step) * step);
  auto th = static_cast<std::int64_t>(std::floor(std::sqrt(area / ratio) / step) * step);
  if (tw >= width || th >= height) {  // never larger than the image itself
    tw = width / divisor * divisor;
    th = height / divisor * divisor;
  }
  return {tw, th};
}

// The size Live Avatar renders at for `--size W*H` and a reference image of that size (what
// unshard-plan's --resolution means): 720x400 renders at 704x384. Zero sides are possible for tiny
// or very thin sizes; the caller refuses them.
inline pixel_size render_size(std::int64_t width, std::int64_t height) {
  return size_less_than_area(width, height, width * height);
}

// Counts from the module definitions. `kv_element_bytes` is the cache dtype's size (this host
// implementation keeps f32 caches: 4; the official bf16 caches: 2).
inline s2v::counts counts_of(const s2v::config& c, const s2v::workload& w, std::size_t kv_element_bytes = 4) {
  const s2v::model m(c, w);
  s2v::counts out;
  for (std::size_t l = 0; l < m.layer_count(); ++l) {
    const s2v::layer& layer = m.layer(l);
    s2v::unit_count u{layer.name(), 0};
    for (std::size_t s = 0; s < layer.subunit_count(); ++s)
      for (const param_spec& p : layer.parameters(s)) u.params += p.dims.numel();
    out.total += u.params;
    if (layer.kind() == s2v::layer_kind::block) out.blocks += u.params;
    else out.outside_blocks += u.params;
    if (layer.kind() == s2v::layer_kind::injector) out.injectors += u.params;
    out.units.push_back(std::move(u));
  }
  // The cache buffers the model declares are f32; scale to the requested element size.
  std::size_t cond = 0, noisy = 0;
  for (const buffer_spec& b : m.buffers()) {
    if (b.category != memory_category::kv_cache || b.name == "kv.cond.end") continue;  // cache bookkeeping, not keys
    (b.name.starts_with("kv.cond.") ? cond : noisy) += b.bytes / sizeof(float) * kv_element_bytes;
  }
  out.cond_cache_bytes = cond;
  out.noisy_cache_bytes = noisy / m.geometry().steps;
  out.kv_cache_bytes = cond + noisy;
  return out;
}

}  // namespace unshard::s2v
