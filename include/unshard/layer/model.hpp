#pragma once
#include <concepts>
#include <cstdint>
#include <cstddef>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "unshard/core/error.hpp"
#include "unshard/core/memory_category.hpp"
#include "unshard/layer/layer.hpp"

namespace unshard {

// Which of a rank's lanes hold a buffer. A rank runs one *lane* per forward it may compute in a
// tick (runtime/schedule.hpp): one under the `replicated` schedule, one per denoising step it owns
// under `steps`. Activations and workspace belong to each lane; a cache that one call writes and
// every lane then reads (Live Avatar's cond cache) is held once per rank; a per-step cache only
// by the lane that runs that step, so a rank holds the caches of its own steps and no others.
enum class buffer_scope : std::uint8_t {
  per_lane,  // every lane its own
  per_rank,  // one, shared by the rank's lanes (none on a rank without lanes)
  per_step,  // only in the lane that runs buffer_spec::step
};

// A buffer of non-weight state the model needs during a forward (activations, scratch, a KV
// cache). Declared before anything is allocated, so the ledger can plan it; the runtime
// allocates each one from the tracking allocator under its category.
struct buffer_spec {
  std::string name;
  std::size_t bytes = 0;
  memory_category category = memory_category::activations;
  buffer_scope scope = buffer_scope::per_lane;
  std::size_t step = 0;  // per_step: the denoising step whose lane holds it
};

// The allocated buffers, looked up by the names the model declared.
class buffer_set {
 public:
  void add(const std::string& name, std::span<std::byte> bytes) { buffers_[name] = bytes; }
  bool has(const std::string& name) const { return buffers_.contains(name); }
  std::span<std::byte> bytes(const std::string& name) const {
    const auto it = buffers_.find(name);
    if (it == buffers_.end()) throw_error("buffer_set: no buffer named '", name, "' was declared by the model");
    return it->second;
  }
  template <class T>
  T* as(const std::string& name) const {
    return reinterpret_cast<T*>(bytes(name).data());
  }
  // The buffer `name` holding `count` elements of T; throws, naming `owner` and the buffer, if it
  // is smaller than that or not aligned for T.
  template <class T>
  T* checked_as(const std::string& name, std::size_t count, std::string_view owner) const {
    const std::span<std::byte> b = bytes(name);
    if (b.size() < count * sizeof(T))
      throw_error(owner, ": buffer '", name, "' has ", b.size(), " bytes, needs ", count * sizeof(T));
    if (reinterpret_cast<std::uintptr_t>(b.data()) % alignof(T) != 0)
      throw_error(owner, ": buffer '", name, "' is not aligned for ", alignof(T), "-byte elements");
    return reinterpret_cast<T*>(b.data());
  }

 private:
  std::map<std::string, std::span<std::byte>> buffers_;
};

// A model: a sequence of layers over one activation state.
//   M::state                 the activation state its layers read and write
//   m.layer_count(), m.layer(i)   the layers, in forward order (i-th models `layer<_, M::state>`)
//   m.buffers()              every non-weight buffer of a forward, with its category
//   m.make_state(buffers)    builds the state as views into the allocated buffers
template <class M>
concept model = requires(const M& m, std::size_t i, const buffer_set& bufs) {
  typename M::state;
  { m.layer_count() } -> std::convertible_to<std::size_t>;
  requires layer<std::remove_cvref_t<decltype(m.layer(i))>, typename M::state>;
  { m.buffers() } -> std::convertible_to<std::vector<buffer_spec>>;
  { m.make_state(bufs) } -> std::same_as<typename M::state>;
};

}  // namespace unshard
