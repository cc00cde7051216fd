#pragma once
// The SIMT emulator: unshard's own CUDA kernels (kernels/cuda/*.cuh), compiled by the host compiler
// and run on the CPU, one fiber per GPU thread. It exists because the machines this library is
// developed and tested on have no GPU: it runs the kernels' real source (index arithmetic, grid-
// stride loops, vector loads, shared-memory tiles, warp shuffles, barriers) against the host
// reference in every CI run. It is not a GPU: no timing, no memory model beyond "one thread at a
// time", and cuBLASLt, cuDNN and NCCL do not run here.
//
// Compile a translation unit with UNSHARD_SIMT_EMULATION defined (g++, CUDA include path);
// kernels/cuda/common.cuh then includes this header, and UNSHARD_LAUNCH runs a kernel through
// simt::launch instead of <<<grid, block>>>. The CUDA runtime calls around the kernels (cudaMalloc,
// cudaMemcpy, streams, events) need a host implementation linked in: tests/support/ has the one the
// tests use.
//
// How a launch runs:
//
//   for each block (x fastest, then y, z; reversed under thread_order::reverse):
//     one fiber per thread, each with its own stack;
//     repeat: for each warp (in order, or reversed):
//               run its lanes until each has finished or waits at __syncthreads,
//               releasing the warp whenever all its lanes wait at a shuffle;
//             release the block (every thread waits at __syncthreads);
//     until every fiber has finished.
//
// What it catches, beyond wrong values: a barrier that only some threads reach (the GPU's undefined
// behaviour: a hang or silent corruption there, a named error here), a shuffle whose mask is not the
// whole warp, a launch over the device's limits, a kernel that throws. Running the same test in
// both thread orders (UNSHARD_SIMT_ORDER=reverse) exposes results that depend on which thread of a
// barrier interval runs first: a data race on the GPU. Out-of-bounds accesses are host memory
// accesses: AddressSanitizer sees them (the fibers tell it when they switch stacks).
#if !defined(UNSHARD_SIMT_EMULATION)
#error "simt_emulator.cuh is for translation units compiled with UNSHARD_SIMT_EMULATION"
#endif
#if defined(__CUDACC__)
#error "the SIMT emulator compiles kernels with the host compiler; nvcc builds them for the GPU"
#endif

#include <cuda_runtime.h>
#include <ucontext.h>

#include <csetjmp>

#include <bitset>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "unshard/core/error.hpp"

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNSHARD_SIMT_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define UNSHARD_SIMT_ASAN 1
#endif
#if defined(UNSHARD_SIMT_ASAN)
#include <sanitizer/common_interface_defs.h>
#endif

namespace unshard::simt {

// The order in which the ready threads of a barrier interval run, and the blocks of a grid.
enum class thread_order { forward, reverse };

// UNSHARD_SIMT_ORDER=forward|reverse (default forward); anything else is an error, not a default.
inline thread_order order_from_environment() {
  const char* v = std::getenv("UNSHARD_SIMT_ORDER");
  if (v == nullptr || std::string_view(v) == "forward") return thread_order::forward;
  if (std::string_view(v) == "reverse") return thread_order::reverse;
  throw_error("UNSHARD_SIMT_ORDER='", v, "': expected forward or reverse");
}

struct emulator_options {
  thread_order order = order_from_environment();
  std::size_t stack_bytes = std::size_t{256} << 10;  // per fiber; ample for the kernels' registers
};

inline emulator_options& options() {
  static emulator_options o;
  return o;
}

// The device limits a launch is held to (those of every GPU since Volta).
inline constexpr unsigned max_block_threads = 1024;
inline constexpr unsigned max_grid_yz = 65535;
inline constexpr unsigned warp_lanes = 32;

namespace detail {

enum class fiber_state { ready, at_syncthreads, at_shuffle, finished };

struct fiber {
  ucontext_t context{};   // the first entry only (makecontext/setcontext: its own stack)
  std::jmp_buf resume{};  // every later one (_setjmp/_longjmp: no signal-mask system call)
  bool started = false;
  uint3 index{};
  unsigned linear = 0;    // x + y*bx + z*bx*by: warps are 32 consecutive linear indices
  unsigned shuffles = 0;  // shuffles done: its parity picks the exchange buffer
  fiber_state state = fiber_state::ready;
  std::exception_ptr error;
};

// Everything about the block being run. One at a time: the emulator runs blocks in sequence on the
// calling thread, which is what makes `__shared__` (a function-local static here) block-shared.
struct block_run {
  dim3 grid{}, block{};
  uint3 block_index{};
  std::vector<fiber> fibers;
  fiber* current = nullptr;
  std::jmp_buf scheduler{};
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  // Shuffle exchange: [warp][parity][lane] 16-byte slots. Two buffers: a lane that has passed one
  // shuffle's barrier may write the next shuffle's value before a slower lane read this one's.
  std::vector<unsigned char> exchange;
  unsigned char* slot(unsigned warp, unsigned parity, unsigned lane) {
    return exchange.data() + ((std::size_t{warp} * 2 + parity) * warp_lanes + lane) * 16;
  }
#if defined(UNSHARD_SIMT_ASAN)
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  std::size_t scheduler_stack_size = 0;
#endif
};

inline block_run*& active() {
  static block_run* run = nullptr;
  return run;
}

inline block_run& active_run() {
  block_run* r = active();
  if (r == nullptr) throw_error("SIMT emulator: a device function ran outside a kernel launch");
  return *r;
}

inline fiber& current_fiber() { return *active_run().current; }

// Fiber stacks, kept across launches (a block of 1024 threads holds 256 MiB of address space, of
// which the kernels touch a few pages each).
inline std::vector<std::unique_ptr<char[]>>& stacks(std::size_t count) {
  static std::vector<std::unique_ptr<char[]>> s;
  static std::size_t bytes = 0;
  if (bytes != options().stack_bytes) {
    s.clear();
    bytes = options().stack_bytes;
  }
  while (s.size() < count) s.push_back(std::make_unique<char[]>(bytes));
  return s;
}

// Why two mechanisms: ucontext is the portable way onto a new stack, but swapcontext saves and
// restores the signal mask with a system call on every switch, and a kernel switches at every
// barrier and shuffle; _setjmp/_longjmp between stacks that are live is a few register moves.

// From the scheduler to fiber f until it waits or finishes, telling AddressSanitizer which stack runs.
inline void switch_to_fiber(block_run& r, fiber& f, char* stack) {
#if defined(UNSHARD_SIMT_ASAN)
  __sanitizer_start_switch_fiber(&r.scheduler_fake_stack, stack, options().stack_bytes);
#else
  (void)stack;
#endif
  r.current = &f;
  if (_setjmp(r.scheduler) == 0) {
    if (!f.started) {
      f.started = true;
      setcontext(&f.context);  // enters fiber_main; never returns here
    }
    _longjmp(f.resume, 1);
  }
#if defined(UNSHARD_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(r.scheduler_fake_stack, nullptr, nullptr);
#endif
}

// From the running fiber back to the scheduler (a barrier, or the end of the thread).
inline void yield_to_scheduler(block_run& r, fiber& f, bool finishing) {
#if defined(UNSHARD_SIMT_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(finishing ? nullptr : &fake, r.scheduler_stack_bottom, r.scheduler_stack_size);
  if (_setjmp(f.resume) == 0) _longjmp(r.scheduler, 1);
  __sanitizer_finish_switch_fiber(fake, &r.scheduler_stack_bottom, &r.scheduler_stack_size);
#else
  (void)finishing;
  if (_setjmp(f.resume) == 0) _longjmp(r.scheduler, 1);
#endif
}

inline void fiber_main() {
  block_run& r = *active();
#if defined(UNSHARD_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &r.scheduler_stack_bottom, &r.scheduler_stack_size);
#endif
  fiber& f = *r.current;
  try {
    r.body(r.body_arg);
  } catch (...) {
    f.error = std::current_exception();
  }
  f.state = fiber_state::finished;
  yield_to_scheduler(r, f, true);  // never resumed
}

inline std::string where(const block_run& r) {
  return "block (" + std::to_string(r.block_index.x) + "," + std::to_string(r.block_index.y) + "," +
         std::to_string(r.block_index.z) + ")";
}

// Lanes [w0, w0 + lanes) of one warp: if all wait at a shuffle, releases them (true). Some at a
// shuffle and others not is a shuffle the whole warp never reaches: an error.
inline bool release_warp(block_run& r, unsigned w0, unsigned lanes) {
  unsigned shuffling = 0, done = 0;
  for (unsigned l = 0; l < lanes; ++l) {
    shuffling += r.fibers[w0 + l].state == fiber_state::at_shuffle;
    done += r.fibers[w0 + l].state == fiber_state::finished;
  }
  if (shuffling == 0) return false;
  if (shuffling != lanes)
    throw_error("SIMT emulator: ", where(r), ", warp ", w0 / warp_lanes, ": ", shuffling, " of ", lanes,
                " lanes wait at a warp shuffle while ", done, " have exited and ", lanes - shuffling - done,
                " wait at __syncthreads (divergent shuffle: undefined behaviour on the GPU)");
  for (unsigned l = 0; l < lanes; ++l) r.fibers[w0 + l].state = fiber_state::ready;
  return true;
}

// Once no warp can move: releases the block if every thread waits at __syncthreads (true), or
// returns false when all have finished. Anything else is a barrier some threads never reach.
inline bool release_block(block_run& r) {
  const unsigned n = static_cast<unsigned>(r.fibers.size());
  unsigned finished = 0, at_sync = 0;
  for (const fiber& f : r.fibers) {
    finished += f.state == fiber_state::finished;
    at_sync += f.state == fiber_state::at_syncthreads;
  }
  if (finished == n) return false;
  if (at_sync + finished != n)
    throw_error("SIMT emulator: ", where(r), ": no thread can run (", at_sync, " at __syncthreads, ", finished,
                " exited, ", n - at_sync - finished, " at a warp shuffle)");
  if (finished != 0)
    throw_error("SIMT emulator: ", where(r), ": __syncthreads reached by ", at_sync, " of ", n, " threads; ", finished,
                " had exited (a barrier not every thread reaches: undefined behaviour on the GPU)");
  for (fiber& f : r.fibers) f.state = fiber_state::ready;
  return true;
}

// Runs one warp as far as it can go: its lanes (in order) until each waits at __syncthreads or has
// finished, its shuffles released as they complete.
inline void run_warp(block_run& r, unsigned w0, unsigned lanes, std::vector<std::unique_ptr<char[]>>& stack,
                     bool reverse) {
  do {
    for (unsigned i = 0; i < lanes; ++i) {
      const unsigned t = w0 + (reverse ? lanes - 1 - i : i);
      fiber& f = r.fibers[t];
      if (f.state != fiber_state::ready) continue;
      switch_to_fiber(r, f, stack[t].get());
      if (f.error) std::rethrow_exception(f.error);
    }
  } while (release_warp(r, w0, lanes));
}

// One warp at a time runs ahead as far as the next __syncthreads before the next warp starts: the
// widest skew between warps a barrier allows, so a missing barrier shows as a wrong value (one
// warp overwrites shared memory another has yet to read) in one order or the other.
inline void run_block(block_run& r) {
  const unsigned bx = r.block.x, by = r.block.y;
  const unsigned n = bx * by * r.block.z;
  auto& stack = stacks(n);
  r.fibers.assign(n, fiber{});
  for (unsigned t = 0; t < n; ++t) {
    fiber& f = r.fibers[t];
    f.index = uint3{t % bx, (t / bx) % by, t / (bx * by)};
    f.linear = t;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stack[t].get();
    f.context.uc_stack.ss_size = options().stack_bytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
  }
  const bool reverse = options().order == thread_order::reverse;
  const unsigned warps = (n + warp_lanes - 1) / warp_lanes;
  do {
    for (unsigned i = 0; i < warps; ++i) {
      const unsigned w = reverse ? warps - 1 - i : i;
      run_warp(r, w * warp_lanes, std::min(warp_lanes, n - w * warp_lanes), stack, reverse);
    }
  } while (release_block(r));
  r.current = nullptr;
}

inline void check_launch_shape(dim3 grid, dim3 block) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > max_block_threads || block.z > 64)
    throw_error("SIMT emulator: a block of ", block.x, "x", block.y, "x", block.z,
                " threads is not launchable (cudaErrorInvalidConfiguration on the GPU: 1 to ", max_block_threads,
                " threads)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > max_grid_yz ||
      grid.z > max_grid_yz)
    throw_error("SIMT emulator: a grid of ", grid.x, "x", grid.y, "x", grid.z,
                " blocks is not launchable (cudaErrorInvalidConfiguration on the GPU)");
}

// Runs body(arg) as every thread of every block of the grid.
inline void run_grid(dim3 grid, dim3 block, void (*body)(void*), void* arg) {
  check_launch_shape(grid, block);
  if (active() != nullptr) throw_error("SIMT emulator: a kernel launched from inside a kernel");
  block_run r;
  r.grid = grid;
  r.block = block;
  r.body = body;
  r.body_arg = arg;
  const unsigned threads = block.x * block.y * block.z;
  r.exchange.assign(((threads + warp_lanes - 1) / warp_lanes) * 2 * warp_lanes * 16, 0);
  active() = &r;
  struct reset {
    ~reset() { active() = nullptr; }
  } reset_active;
  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  const bool reverse = options().order == thread_order::reverse;
  for (unsigned long long i = 0; i < blocks; ++i) {
    const unsigned long long b = reverse ? blocks - 1 - i : i;
    r.block_index = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                          static_cast<unsigned>(b / (1ull * grid.x * grid.y))};
    run_block(r);
  }
}

// A kernel's arguments, copied once per launch as the GPU copies them to constant memory; every
// thread calls the kernel with them.
template <class Kernel, class... Args>
struct launch_call {
  Kernel kernel;
  std::tuple<Args...> args;
  static void run(void* self) {
    auto& c = *static_cast<launch_call*>(self);
    std::apply([&](auto&... a) { c.kernel(a...); }, c.args);
  }
};

}  // namespace detail

// Where a launch's work goes. Without a hook it runs at once, before the launch returns (a legal
// order for any stream). A host runtime that models streams installs one that queues the work on
// the stream until something waits for it (tests/support/simt_cuda_runtime.cpp does: work runs as
// late as the program's own synchronisation allows, so a missing wait reads stale memory).
using stream_work = std::function<void()>;
using stream_hook_fn = void (*)(cudaStream_t, stream_work&&);
inline stream_hook_fn& stream_hook() {
  static stream_hook_fn hook = nullptr;
  return hook;
}

// What UNSHARD_LAUNCH(grid, block, stream, kernel)(args...) becomes. The shape is checked at the
// launch, as cudaGetLastError would report it; the arguments are copied then, as the GPU copies
// them; the threads run when the stream gets to the work.
template <class Kernel>
struct launcher {
  dim3 grid, block;
  cudaStream_t stream;
  Kernel kernel;
  template <class... Args>
  void operator()(Args&&... args) const {
    detail::check_launch_shape(grid, block);
    using call_t = detail::launch_call<Kernel, std::decay_t<Args>...>;
    auto call = std::make_shared<call_t>(call_t{kernel, {std::forward<Args>(args)...}});
    stream_work work = [call, g = grid, b = block] { detail::run_grid(g, b, &call_t::run, call.get()); };
    if (stream_hook()) stream_hook()(stream, std::move(work));
    else work();
  }
};

template <class Kernel>
launcher<Kernel> launch(dim3 grid, dim3 block, cudaStream_t stream, Kernel kernel) {
  return {grid, block, stream, kernel};
}

}  // namespace unshard::simt

// ---- The device built-ins the kernels use, for the host compiler ----------------------------------

// The CUDA headers declare these as extern variables for host compilers; from here on they name the
// running fiber's values.
#define threadIdx (::unshard::simt::detail::current_fiber().index)
#define blockIdx (::unshard::simt::detail::active_run().block_index)
#define blockDim (::unshard::simt::detail::active_run().block)
#define gridDim (::unshard::simt::detail::active_run().grid)
#undef __shared__
#define __shared__ static  // blocks run one at a time: a function-local static is block-shared
#undef __launch_bounds__
#define __launch_bounds__(...)

inline void __syncthreads() {
  auto& r = ::unshard::simt::detail::active_run();
  auto& f = *r.current;
  f.state = ::unshard::simt::detail::fiber_state::at_syncthreads;
  ::unshard::simt::detail::yield_to_scheduler(r, f, false);
}

// The whole warp's lanes must take part (the kernels pass 0xffffffff): anything else is reported,
// not emulated.
template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "a shuffled value is at most 16 bytes");
  using namespace ::unshard::simt;
  auto& r = detail::active_run();
  auto& f = *r.current;
  const unsigned threads = r.block.x * r.block.y * r.block.z;
  const unsigned warp = f.linear / warp_lanes, lane = f.linear % warp_lanes;
  const unsigned lanes = std::min(warp_lanes, threads - warp * warp_lanes);
  const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if (mask != full)
    ::unshard::throw_error("SIMT emulator: __shfl_xor_sync with lane mask ", std::bitset<32>(mask).to_string(),
                           " in a warp of ", lanes, " lanes (only the whole warp is emulated)");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    ::unshard::throw_error("SIMT emulator: __shfl_xor_sync width ", width, " is not a power of two up to 32");
  const unsigned parity = f.shuffles % 2;
  std::memcpy(r.slot(warp, parity, lane), &value, sizeof(T));
  f.state = detail::fiber_state::at_shuffle;
  detail::yield_to_scheduler(r, f, false);
  unsigned src = lane ^ static_cast<unsigned>(lane_mask);
  if (src / static_cast<unsigned>(width) != lane / static_cast<unsigned>(width) || src >= lanes) src = lane;
  T out;
  std::memcpy(&out, r.slot(warp, parity, src), sizeof(T));
  ++f.shuffles;
  return out;
}

// One thread runs at a time: an atomic is a read-modify-write.
inline unsigned atomicMax(unsigned* address, unsigned value) {
  const unsigned old = *address;
  if (value > old) *address = value;
  return old;
}
inline int atomicMax(int* address, int value) {
  const int old = *address;
  if (value > old) *address = value;
  return old;
}

// Round-to-nearest f32 product and sum, never contracted into an FMA (the host build does not
// contract across statements, and these are statements of their own).
inline float __fmul_rn(float a, float b) {
  volatile float p = a * b;
  return p;
}
inline float __fadd_rn(float a, float b) {
  volatile float s = a + b;
  return s;
}
