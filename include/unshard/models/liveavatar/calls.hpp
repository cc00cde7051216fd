#pragma once
// A recorded stream: the calls a vectors config lists under `streaming.calls` (sink first, then
// the streamed blocks), with the input tensors each call names, resolved against an inputs file.
//
// Per call: `method` "_forward_sink" (or forward_kwargs.sink_flag true) makes a sink; the
// forward_kwargs name the tensors ("[input.x_a]" -- a list of one -- or "input.t_a"). The integer
// arguments come from the inputs file when it has them (input.current_start / input.current_end: one
// entry per call; input.relative_dist: one per streamed call), else from the call's JSON. An
// optional `step` (default 0) picks the noisy cache of a streamed call.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "unshard/core/error.hpp"
#include "unshard/io/checkpoint.hpp"
#include "unshard/models/liveavatar/geometry.hpp"
#include "unshard/models/liveavatar/model.hpp"

namespace unshard::s2v {

struct call_spec {
  std::string name;
  bool sink = false;
  std::string x, t, context, ref_latents, motion_latents, cond_states, audio;  // tensor names
  std::int64_t current_start = 0;
  std::int64_t relative_dist = 30;
  std::size_t step = 0;
  std::array<std::int64_t, 2> motion_frames{73, 19};
};

struct stream_spec {
  std::vector<s2v::call_spec> calls;
  std::vector<std::int64_t> kv_cache_sizes;  // [noisy, cond] when the inputs give them
};

namespace detail {

inline std::string tensor_name(const nlohmann::json& kw, const char* key, const std::string& call,
                                   const std::string& source) {
  const auto it = kw.find(key);
  if (it == kw.end()) throw_error(source, ": call '", call, "' has no forward_kwargs.", key);
  if (!it->is_string()) throw_error(source, ": call '", call, "': forward_kwargs.", key, " must be a tensor name, got ", it->dump());
  std::string n = it->get<std::string>();
  if (n.size() >= 2 && n.front() == '[' && n.back() == ']') n = n.substr(1, n.size() - 2);  // a list of one tensor
  return n;
}

inline std::int64_t exact_integer(float v, const std::string& what) {
  if (!std::isfinite(v) || std::floor(v) != v) throw_error(what, " holds ", v, ", not an integer");
  return static_cast<std::int64_t>(v);
}

}  // namespace detail

// Parses `streaming.calls` of a vectors config and resolves the integer arguments against `inputs`.
inline s2v::stream_spec parse_stream(const nlohmann::json& root, const std::string& source, const checkpoint& inputs) {
  const auto st = root.find("streaming");
  if (st == root.end() || !st->is_object() || !st->contains("calls") || !(*st)["calls"].is_array())
    throw_error(source, ": no streaming.calls list (the calls to run)");
  s2v::stream_spec spec;
  std::size_t streamed = 0;
  const auto& calls = (*st)["calls"];
  const std::vector<float> starts = inputs.find("input.current_start") ? read_f32(inputs, "input.current_start") : std::vector<float>{};
  const std::vector<float> dists = inputs.find("input.relative_dist") ? read_f32(inputs, "input.relative_dist") : std::vector<float>{};
  for (std::size_t i = 0; i < calls.size(); ++i) {
    const auto& c = calls[i];
    if (!c.is_object() || !c.contains("name") || !c["name"].is_string() || !c.contains("forward_kwargs") ||
        !c["forward_kwargs"].is_object())
      throw_error(source, ": streaming.calls[", i, "] needs a name and forward_kwargs");
    s2v::call_spec s;
    s.name = c["name"].get<std::string>();
    const auto& kw = c["forward_kwargs"];
    s.sink = (c.contains("method") && c["method"] == "_forward_sink") ||
             (kw.contains("sink_flag") && kw["sink_flag"].is_boolean() && kw["sink_flag"].get<bool>());
    s.context = detail::tensor_name(kw, "context", s.name, source);
    if (s.sink) {
      s.ref_latents = detail::tensor_name(kw, "ref_latents", s.name, source);
      s.motion_latents = detail::tensor_name(kw, "motion_latents", s.name, source);
    } else {
      s.x = detail::tensor_name(kw, "x", s.name, source);
      s.t = detail::tensor_name(kw, "t", s.name, source);
      s.cond_states = detail::tensor_name(kw, "cond_states", s.name, source);
      s.audio = detail::tensor_name(kw, "audio_input", s.name, source);
    }
    if (kw.contains("motion_frames")) {
      const auto& mf = kw["motion_frames"];
      if (!mf.is_array() || mf.size() != 2 || !mf[0].is_number_integer() || !mf[1].is_number_integer())
        throw_error(source, ": call '", s.name, "': forward_kwargs.motion_frames must be [video, latent] frames");
      s.motion_frames = {mf[0].get<std::int64_t>(), mf[1].get<std::int64_t>()};
    }
    if (i < starts.size()) s.current_start = detail::exact_integer(starts[i], "input.current_start[" + std::to_string(i) + "]");
    else if (kw.contains("current_start") && kw["current_start"].is_number_integer()) s.current_start = kw["current_start"].get<std::int64_t>();
    if (!s.sink) {
      if (streamed < dists.size())
        s.relative_dist = detail::exact_integer(dists[streamed], "input.relative_dist[" + std::to_string(streamed) + "]");
      else if (c.contains("relative_dist") && c["relative_dist"].is_number_integer()) s.relative_dist = c["relative_dist"].get<std::int64_t>();
      else throw_error(source, ": streamed call '", s.name, "' has no relative_dist (input.relative_dist or the call's JSON)");
      ++streamed;
    }
    if (c.contains("step")) {
      if (!c["step"].is_number_unsigned()) throw_error(source, ": call '", s.name, "': step must be a non-negative integer");
      s.step = c["step"].get<std::size_t>();
    }
    if (s.current_start < 0) throw_error(source, ": call '", s.name, "': current_start ", s.current_start, " is negative");
    spec.calls.push_back(std::move(s));
  }
  if (spec.calls.empty()) throw_error(source, ": streaming.calls is empty");
  if (inputs.find("input.kv_cache_sizes"))
    for (float v : read_f32(inputs, "input.kv_cache_sizes")) spec.kv_cache_sizes.push_back(detail::exact_integer(v, "input.kv_cache_sizes"));
  return spec;
}

// The workload of a recorded stream: sizes from the first streamed call's tensors (or the sink's
// reference latent), the caches from input.kv_cache_sizes, one noisy cache per step used.
inline s2v::workload workload_of(const s2v::stream_spec& spec, const checkpoint& inputs) {
  s2v::workload w;
  const auto named = [&](const std::string& n) -> const tensor_info& {
    const tensor_info* t = inputs.find(n);
    if (!t) throw_error(inputs.path(), ": missing input tensor '", n, "' (named by streaming.calls)");
    return *t;
  };
  const auto last = [](const shape& d, std::size_t from_end) { return d[d.rank() - 1 - from_end]; };
  bool have_block = false;
  std::size_t steps = 1;
  for (const auto& c : spec.calls) {
    w.motion_frames = c.motion_frames;
    const shape ctx = named(c.context).dims;
    if (ctx.rank() < 2) throw_error(inputs.path(), ": input '", c.context, "' has shape ", ctx.to_string(), ", expected [L, text_dim]");
    w.context_len = std::max(w.context_len, last(ctx, 1));
    if (c.sink) {
      const shape r = named(c.ref_latents).dims;
      if (r.rank() < 2) throw_error(inputs.path(), ": input '", c.ref_latents, "' has shape ", r.to_string());
      if (!have_block) w.latent_hw = {last(r, 1), last(r, 0)};
      continue;
    }
    steps = std::max(steps, c.step + 1);
    if (have_block) continue;
    const shape x = named(c.x).dims, a = named(c.audio).dims;
    if (x.rank() < 4) throw_error(inputs.path(), ": input '", c.x, "' has shape ", x.to_string(), ", expected [C, F, H, W]");
    w.latent_hw = {last(x, 1), last(x, 0)};
    w.frames_per_block = last(x, 2);
    w.audio_frames = last(a, 0);
    have_block = true;
  }
  if (spec.kv_cache_sizes.size() == 2) {
    w.noisy_cache_tokens = spec.kv_cache_sizes[0];
    w.cond_cache_tokens = spec.kv_cache_sizes[1];
  }
  w.denoising_steps = static_cast<std::int64_t>(steps);
  return w;
}

// An input tensor a call names (checked finite), or an error naming it, the call and the file.
inline tensor_view input(const checkpoint& inputs, const std::string& name, const s2v::call_spec& c) {
  if (!inputs.find(name)) throw_error(inputs.path(), ": missing input tensor '", name, "' (named by call '", c.name, "')");
  return finite_input(inputs, name);
}

// The model-side arguments of a streamed call (tensor views into `inputs`).
inline s2v::step_inputs step_of(const s2v::model& m, const s2v::call_spec& c, const checkpoint& inputs) {
  const std::size_t L = m.geometry().block_tokens;
  if (c.current_start % static_cast<std::int64_t>(L) != 0)
    throw_error("call '", c.name, "': current_start ", c.current_start, " is not a multiple of the block's ", L, " tokens");
  s2v::step_inputs in;
  in.x = s2v::input(inputs, c.x, c);
  in.t = s2v::input(inputs, c.t, c);
  in.cond_states = s2v::input(inputs, c.cond_states, c);
  in.audio = s2v::input(inputs, c.audio, c);
  in.context = s2v::input(inputs, c.context, c);
  in.block = static_cast<std::size_t>(c.current_start) / L;
  in.step = c.step;
  in.relative_dist = c.relative_dist;
  return in;
}

inline s2v::sink_inputs sink_of(const s2v::call_spec& c, const checkpoint& inputs) {
  return {s2v::input(inputs, c.ref_latents, c), s2v::input(inputs, c.motion_latents, c), s2v::input(inputs, c.context, c)};
}

// Checks every call's tensors (presence, shapes) and arguments before anything runs.
inline void check_calls(const s2v::model& m, const s2v::stream_spec& spec, const checkpoint& inputs) {
  for (const s2v::call_spec& c : spec.calls) {
    try {
      if (c.sink) m.check_sink(s2v::sink_of(c, inputs));
      else m.check_step(s2v::step_of(m, c, inputs));
    } catch (const error& e) {
      const std::string what = e.what();
      if (what.starts_with(inputs.path())) throw;
      const std::string call = "call '" + c.name + "': ";
      if (what.starts_with(call)) throw_error(inputs.path(), ": ", what);  // step_of named the call already
      throw_error(inputs.path(), ": ", call, what);
    }
  }
}

}  // namespace unshard::s2v
