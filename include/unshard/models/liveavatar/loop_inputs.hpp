#pragma once
// The denoising loop a file describes: its geometry (clips, blocks per clip, frames per block, the
// latent size, the caches) and sampler from a config's `streaming` and `scheduler` sections, or
// from Live Avatar's defaults for a plain Wan2.2-S2V config.json, and its inputs from a
// safetensors file:
//
//   input.context, input.ref_latents, input.motion_latents          the stream's (sink) inputs
//   input.clip{r}.block{b}.{noise, cond_states, audio}               each block's
//   input.relative_dist [n], input.call_clip_block_step [n, 3]       the draws, per (clip, block, step)
//
// Where the file has no draws, a seeded generator gives them from (seed, clip, block, step).
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include "unshard/core/error.hpp"
#include "unshard/io/checkpoint.hpp"
#include "unshard/models/liveavatar/count.hpp"
#include "unshard/models/liveavatar/denoiser.hpp"
#include "unshard/models/liveavatar/geometry.hpp"

namespace unshard::s2v {

struct loop_spec {
  std::size_t clips = 1;
  std::size_t blocks_per_clip = 4;
  std::int64_t frames_per_block = 3;
  std::array<std::int64_t, 2> latent_hw{};  // 0: from the inputs' first noise tensor
  std::int64_t noisy_cache_tokens = 0;      // 0: one clip (blocks_per_clip blocks)
  std::int64_t cond_cache_tokens = 0;       // 0: exactly the cond tokens
  flow_match_config sampler{};

  std::size_t blocks() const noexcept { return clips * blocks_per_clip; }
};

// Live Avatar's defaults at --size WxH: the latent of the size it renders at (720x400 -> 704x384
// -> 48x88), 4 blocks of 3 latent frames per clip, 4 steps, shift 3.
inline s2v::loop_spec default_loop(std::int64_t width, std::int64_t height) {
  const pixel_size r = s2v::render_size(width, height);
  if (r.width < 64 || r.height < 64)
    throw_error("--size ", width, "x", height, " renders at ", r.width, "x", r.height,
                ", smaller than the frame packer's 64x64 pixels (8x8 latent)");
  s2v::loop_spec s;
  s.latent_hw = {r.height / 8, r.width / 8};
  return s;
}

namespace detail {

inline std::int64_t loop_int(const nlohmann::json& obj, const char* key, const std::string& where, std::int64_t min) {
  const auto it = obj.find(key);
  if (it == obj.end()) throw_error(where, ": missing key '", key, "'");
  if (!it->is_number_integer() || it->get<std::int64_t>() < min)
    throw_error(where, ": '", key, "' must be an integer >= ", min, ", got ", it->dump());
  return it->get<std::int64_t>();
}

// kv_cache."k/v" or kv_cache."cond_k/cond_v": [1, slots, N, d]
inline std::int64_t cache_slots(const nlohmann::json& kv, const char* key, const std::string& where) {
  const auto it = kv.find(key);
  if (it == kv.end()) return 0;
  if (!it->is_array() || it->size() != 4 || !(*it)[1].is_number_integer() || (*it)[1].get<std::int64_t>() < 1)
    throw_error(where, ": streaming.kv_cache.", key, " must be [1, slots, heads, head_dim], got ", it->dump());
  return (*it)[1].get<std::int64_t>();
}

}  // namespace detail

// The loop of a config JSON: `streaming` and `scheduler` when present, else `fallback` (the CLI's
// --size/--clips/... on Live Avatar's defaults). Keys present but invalid are errors naming them.
inline s2v::loop_spec parse_loop(const nlohmann::json& root, const std::string& source, s2v::loop_spec fallback) {
  s2v::loop_spec s = fallback;
  if (const auto st = root.find("streaming"); st != root.end() && st->is_object()) {
    const std::string where = source + ": streaming";
    s.clips = static_cast<std::size_t>(detail::loop_int(*st, "clips", where, 1));
    s.blocks_per_clip = static_cast<std::size_t>(detail::loop_int(*st, "blocks_per_clip", where, 1));
    s.frames_per_block = detail::loop_int(*st, "num_frames_per_block", where, 1);
    const auto hw = st->find("latent_hw");
    if (hw == st->end() || !hw->is_array() || hw->size() != 2 || !(*hw)[0].is_number_integer() || !(*hw)[1].is_number_integer())
      throw_error(where, ": latent_hw must be [H, W]");
    s.latent_hw = {(*hw)[0].get<std::int64_t>(), (*hw)[1].get<std::int64_t>()};
    if (const auto kv = st->find("kv_cache"); kv != st->end()) {
      if (!kv->is_object()) throw_error(where, ": kv_cache must be an object");
      s.noisy_cache_tokens = detail::cache_slots(*kv, "k/v", source);
      s.cond_cache_tokens = detail::cache_slots(*kv, "cond_k/cond_v", source);
    }
  }
  if (const auto sc = root.find("scheduler"); sc != root.end() && sc->is_object()) {
    const std::string where = source + ": scheduler";
    s.sampler.num_train_timesteps = detail::loop_int(*sc, "num_train_timesteps", where, 1);
    s.sampler.steps = static_cast<std::size_t>(detail::loop_int(*sc, "steps", where, 1));
    const auto sh = sc->find("shift");
    if (sh == sc->end() || !sh->is_number() || !(sh->get<double>() > 0)) throw_error(where, ": 'shift' must be a positive number");
    s.sampler.shift = sh->get<double>();
  }
  if (s.clips == 0 || s.blocks_per_clip == 0 || s.frames_per_block < 1 || s.sampler.steps == 0)
    throw_error(source, ": the loop needs at least one clip, block, frame and step (clips ", s.clips, ", blocks per clip ",
                s.blocks_per_clip, ", frames per block ", s.frames_per_block, ", steps ", s.sampler.steps, ")");
  return s;
}

inline std::string block_input(std::size_t clip, std::size_t block, const char* what) {
  return "input.clip" + std::to_string(clip) + ".block" + std::to_string(block) + "." + what;
}

// The workload the loop runs: sizes from the spec and the inputs (context length, audio columns).
inline s2v::workload loop_workload(const s2v::loop_spec& s, const checkpoint& inputs) {
  const auto need = [&](const std::string& n) -> const tensor_info& {
    const tensor_info* t = inputs.find(n);
    if (!t) throw_error(inputs.path(), ": missing input tensor '", n, "'");
    return *t;
  };
  s2v::workload w;
  const shape noise = need(s2v::block_input(0, 0, "noise")).dims;
  if (noise.rank() < 4) throw_error(inputs.path(), ": input.clip0.block0.noise has shape ", noise.to_string(), ", expected [C, F, H, W]");
  w.latent_hw = s.latent_hw[0] ? s.latent_hw : std::array<std::int64_t, 2>{noise[noise.rank() - 2], noise[noise.rank() - 1]};
  w.frames_per_block = s.frames_per_block;
  const shape ctx = need("input.context").dims;
  if (ctx.rank() < 2) throw_error(inputs.path(), ": input.context has shape ", ctx.to_string(), ", expected [L, text_dim]");
  w.context_len = ctx[ctx.rank() - 2];
  const shape audio = need(s2v::block_input(0, 0, "audio")).dims;
  w.audio_frames = audio[audio.rank() - 1];
  const shape motion = need("input.motion_latents").dims;
  if (motion.rank() < 4) throw_error(inputs.path(), ": input.motion_latents has shape ", motion.to_string());
  w.motion_frames = {(motion[motion.rank() - 3] - 1) * 4 + 1, motion[motion.rank() - 3]};
  if (inputs.find("input.motion_frames")) {
    const std::vector<float> mf = read_f32(inputs, "input.motion_frames");
    if (mf.size() == 2) w.motion_frames = {static_cast<std::int64_t>(mf[0]), static_cast<std::int64_t>(mf[1])};
  }
  // A step's noisy cache holds one clip (docs/conventions.md) unless the config sizes it.
  w.noisy_cache_tokens = s.noisy_cache_tokens ? s.noisy_cache_tokens
                                              : static_cast<std::int64_t>(s.blocks_per_clip) * s.frames_per_block *
                                                    (w.latent_hw[0] / 2) * (w.latent_hw[1] / 2);
  w.cond_cache_tokens = s.cond_cache_tokens;
  w.denoising_steps = static_cast<std::int64_t>(s.sampler.steps);
  return w;
}

inline s2v::sink_inputs loop_sink(const checkpoint& inputs) {
  const auto view = [&](const char* n) {
    if (!inputs.find(n)) throw_error(inputs.path(), ": missing input tensor '", n, "'");
    return finite_input(inputs, n);
  };
  return {view("input.ref_latents"), view("input.motion_latents"), view("input.context")};
}

// (clip, block, step) -> draw, from input.relative_dist and input.call_clip_block_step.
inline std::map<std::tuple<std::size_t, std::size_t, std::size_t>, std::int64_t> stored_draws(const checkpoint& inputs) {
  std::map<std::tuple<std::size_t, std::size_t, std::size_t>, std::int64_t> out;
  if (!inputs.find("input.relative_dist") && !inputs.find("input.call_clip_block_step")) return out;
  if (!inputs.find("input.relative_dist") || !inputs.find("input.call_clip_block_step"))
    throw_error(inputs.path(), ": input.relative_dist and input.call_clip_block_step come together (one names the other's calls)");
  const std::vector<float> d = read_f32(inputs, "input.relative_dist"), c = read_f32(inputs, "input.call_clip_block_step");
  if (c.size() != 3 * d.size())
    throw_error(inputs.path(), ": input.call_clip_block_step has ", c.size(), " values for ", d.size(),
                " draws (expected [n, 3])");
  const auto integer = [&](float v, const std::string& what) {
    if (!std::isfinite(v) || std::floor(v) != v || v < 0) throw_error(inputs.path(), ": ", what, " holds ", v, ", not a non-negative integer");
    return static_cast<std::size_t>(v);
  };
  for (std::size_t k = 0; k < d.size(); ++k) {
    const std::string at = "[" + std::to_string(k) + "]";
    const auto key = std::make_tuple(integer(c[3 * k], "input.call_clip_block_step" + at),
                                     integer(c[3 * k + 1], "input.call_clip_block_step" + at),
                                     integer(c[3 * k + 2], "input.call_clip_block_step" + at));
    const auto draw = static_cast<std::int64_t>(integer(d[k], "input.relative_dist" + at));
    if (draw < 4 || draw > 30) throw_error(inputs.path(), ": input.relative_dist", at, " = ", draw, " is outside randint(4, 30)");
    if (!out.emplace(key, draw).second)
      throw_error(inputs.path(), ": input.call_clip_block_step", at, " names a (clip, block, step) a second time");
  }
  return out;
}

// Every block of the loop, in stream order, with its draws: stored ones, or the seeded generator's.
inline std::vector<s2v::block> loop_blocks(const s2v::loop_spec& s, const checkpoint& inputs, std::uint64_t seed) {
  const auto stored = s2v::stored_draws(inputs);
  const s2v::relative_dist_draws generated(seed);
  std::vector<s2v::block> blocks;
  for (std::size_t r = 0; r < s.clips; ++r)
    for (std::size_t b = 0; b < s.blocks_per_clip; ++b) {
      s2v::block blk;
      blk.clip = r;
      blk.block = b;
      for (const char* what : {"noise", "cond_states", "audio"})
        if (!inputs.find(s2v::block_input(r, b, what)))
          throw_error(inputs.path(), ": missing input tensor '", s2v::block_input(r, b, what), "' (the loop has ", s.clips,
                      " clip(s) of ", s.blocks_per_clip, " blocks)");
      blk.noise = finite_input(inputs, s2v::block_input(r, b, "noise"));
      blk.cond_states = finite_input(inputs, s2v::block_input(r, b, "cond_states"));
      blk.audio = finite_input(inputs, s2v::block_input(r, b, "audio"));
      for (std::size_t i = 0; i < s.sampler.steps; ++i) {
        if (stored.empty()) {
          blk.relative_dist.push_back(generated(r, b, i));
          continue;
        }
        const auto it = stored.find({r, b, i});
        if (it == stored.end())
          throw_error(inputs.path(), ": input.call_clip_block_step has no draw for clip ", r, " block ", b, " step ", i);
        blk.relative_dist.push_back(it->second);
      }
      blocks.push_back(std::move(blk));
    }
  return blocks;
}

}  // namespace unshard::s2v
