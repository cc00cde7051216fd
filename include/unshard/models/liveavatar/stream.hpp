#pragma once
// The streaming API of Live Avatar on top of unshard::session: one prefill ("sink") per clip, then
// one call per block and denoising step. Every call is one sharded forward on every rank; the KV
// caches are model buffers (category kv_cache) that the runtime allocated once from the tracking
// allocator, so they persist across calls and the ledger plans them.
//
//   s2v::stream<> st(model, weights, {world_size, parse_policy("prefetch:1").values});
//   st.sink({ref_latents, motion_latents, context});
//   for block b, step i: st.step({x, t, cond, audio, context, b, i, rng_relative_dist()},
//                                [&](std::size_t rank, const s2v::state& s) { read model.output(s) });
//
// The official pipeline draws relative_dist with an unseeded random.randint(4, 30) per call;
// s2v::relative_dist_generator is the seeded stand-in, so a run is reproducible.
#include <cstddef>
#include <cstdint>
#include <concepts>
#include <random>
#include <utility>

#include "unshard/backend/host/host_backend.hpp"
#include "unshard/models/liveavatar/model.hpp"
#include "unshard/runtime/session.hpp"

namespace unshard::s2v {

// random.randint(4, 30), seeded.
class relative_dist_generator {
 public:
  explicit relative_dist_generator(std::uint64_t seed) : rng_(seed) {}
  std::int64_t operator()() { return std::uniform_int_distribution<std::int64_t>(4, 30)(rng_); }

 private:
  std::mt19937_64 rng_;
};

// Session: any runtime with forward(prepare, finish) over s2v::model: session<s2v::model, B> (every
// rank in this process: threads or GPUs), or process_session<s2v::model> (this process's rank of a
// launched job; its constructor takes the world before the options). The stream's arguments after
// the model go to the session's constructor.
template <class Session = session<s2v::model, host_backend>>
class stream {
 public:
  // A session in this process: the options may be a braced list, {world_size, policy}.
  template <weight_source S>
    requires std::constructible_from<Session, const s2v::model&, const S&, session_options>
  stream(const s2v::model& m, const S& weights, session_options options)
      : model_(m), session_(m, weights, std::move(options)) {}
  // Any other session's constructor arguments (process_session: the world, then the options).
  template <weight_source S, class... Rest>
  stream(const s2v::model& m, const S& weights, Rest&&... rest)
      : model_(m), session_(m, weights, std::forward<Rest>(rest)...) {}

  // The cond prefill; finish(rank, const s2v::state&) runs on each rank after it.
  template <class Finish>
  void sink(const s2v::sink_inputs& in, Finish&& finish) {
    model_.check_sink(in);
    session_.forward([&](std::size_t, s2v::state& s) { model_.begin_sink(s, in); }, std::forward<Finish>(finish));
    sunk_ = true;
  }
  void sink(const s2v::sink_inputs& in) {
    sink(in, [](std::size_t, const s2v::state&) {});
  }

  // One block at one denoising step. A call before any sink is refused: the cond cache is empty.
  template <class Finish>
  void step(const s2v::step_inputs& in, Finish&& finish) {
    if (!sunk_) throw_error("liveavatar stream: step before sink (the cond KV cache is empty; run the prefill first)");
    model_.check_step(in);
    session_.forward([&](std::size_t, s2v::state& s) { model_.begin_step(s, in); }, std::forward<Finish>(finish));
  }
  void step(const s2v::step_inputs& in) {
    step(in, [](std::size_t, const s2v::state&) {});
  }

  const s2v::model& model() const noexcept { return model_; }
  Session& runtime() noexcept { return session_; }
  const Session& runtime() const noexcept { return session_; }

 private:
  const s2v::model& model_;
  Session session_;
  bool sunk_ = false;
};

}  // namespace unshard::s2v
