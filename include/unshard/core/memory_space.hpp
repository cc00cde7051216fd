#pragma once
// Memory spaces: who can read a byte. A model's state says which space its forward reads its
// buffers in (host code, or CUDA kernels); a backend says which spaces the memory it gives a rank
// (its "device" arena, where the runtime puts the state) can be read from. The runtime checks the
// two at compile time (backend/backend.hpp, reaches_state), because a mismatch is otherwise a
// crash or a silent garbage read at the first layer: host code dereferencing a cudaMalloc pointer,
// or a kernel reading pageable host memory.
#include <concepts>

namespace unshard {

// Memory the CPU reads and writes: plain allocations, pinned host memory, the host backend's arena.
struct host_memory {
  static constexpr const char* name = "host memory";
};
// Memory only CUDA kernels and copies read: cudaMalloc regions.
struct cuda_device_memory {
  static constexpr const char* name = "CUDA device memory";
};

// A list of spaces; contains<S> is whether S is one of them.
template <class... Spaces>
struct memory_spaces {
  template <class S>
  static constexpr bool contains = (std::same_as<S, Spaces> || ...);
};

// The space a model state's forward reads its buffers in: State::memory_space if declared, else
// host memory (the state of every host model, which declares nothing).
template <class State>
struct state_memory_space {
  using type = host_memory;
};
template <class State>
  requires requires { typename State::memory_space; }
struct state_memory_space<State> {
  using type = typename State::memory_space;
};
template <class State>
using state_memory_space_t = typename state_memory_space<State>::type;

// Whether a state declares its space (the runtime otherwise infers it, see backend.hpp).
template <class State>
concept declares_memory_space = requires { typename State::memory_space; };

}  // namespace unshard
