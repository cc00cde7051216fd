#pragma once
#include <concepts>
#include <cstdint>
#include <cstddef>
#include <map>
#include <optional>
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
  // 0: a plain buffer. n: n equal pages along its leading axis (a KV cache's layers), page p read
  // and written only by the units of the layer the model maps to p (paged_model below), so a
  // runtime may keep the whole buffer elsewhere and bring each page in while its layer runs
  // (the `kv:offload` policy term). bytes must be a multiple of pages.
  std::size_t pages = 0;

  std::size_t page_bytes() const noexcept { return pages ? bytes / pages : bytes; }
};

// Where each page of a paged buffer is while a runtime places its pages (`kv:offload`): entry p
// is the address of page p while the units of its layer run, null otherwise. The runtime owns the
// table and rewrites it; a state reads it. Without one (no placement, or a buffer_set built by
// hand) page p is at base + p * page_bytes.
using page_table = std::vector<std::byte*>;

// A byte range [offset, offset + bytes) of one page.
struct page_window {
  std::size_t offset = 0, bytes = 0;
  std::size_t end() const noexcept { return offset + bytes; }
  bool empty() const noexcept { return bytes == 0; }
  bool operator==(const page_window&) const = default;
};

// What the call set up in a state does with its layer's page of one paged buffer: the bytes it may
// read before writing them (a runtime copies them in) and the bytes it writes (copied back out).
// Both empty: the call does not touch the buffer, and no page of it need be present.
struct page_access {
  page_window read, write;
  bool touches() const noexcept { return !read.empty() || !write.empty(); }
};

// The allocated buffers, looked up by the names the model declared.
class buffer_set {
 public:
  // `pages`: the page table of a paged buffer whose pages a runtime places (it outlives the state).
  void add(const std::string& name, std::span<std::byte> bytes, const page_table* pages = nullptr) {
    buffers_[name] = bytes;
    if (pages) pages_[name] = pages;
  }
  bool has(const std::string& name) const { return buffers_.contains(name); }
  // The page table a runtime keeps for `name`, or null: its pages are at base + p * page_bytes.
  // (Under placement, bytes(name) is the whole buffer where it is kept: host memory.)
  const page_table* pages(const std::string& name) const {
    const auto it = pages_.find(name);
    return it == pages_.end() ? nullptr : it->second;
  }
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
  std::map<std::string, const page_table*> pages_;
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

// A model whose buffers include paged ones (buffer_spec::pages) says which page each layer
// touches and, for the call set up in a state, which bytes of that page it reads and writes:
//   m.page_of_layer(i)          the page layer i reads and writes (the same index in every paged
//                               buffer), or none
//   m.page_access_of(s, b)      what the call in state s does with its layer's page of buffer b
// A runtime that places pages (kv:offload) needs both; a model without paged buffers needs neither.
template <class M>
concept paged_model = model<M> && requires(const M& m, std::size_t i, const typename M::state& s, const buffer_spec& b) {
  { m.page_of_layer(i) } -> std::convertible_to<std::optional<std::size_t>>;
  { m.page_access_of(s, b) } -> std::convertible_to<page_access>;
};

}  // namespace unshard
