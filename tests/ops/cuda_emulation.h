// CPU emulation of the CUDA execution model, written for this project: just enough to compile the kernels
// of ops/kernels/*.cu UNCHANGED with g++ and run them from tests/ops/test_emulated_kernels.py.
//
// Model
//   * A launch runs every block of the grid. Blocks are independent: a few worker OS threads take them in
//     turn, concurrently and in no fixed order, as on a GPU.
//   * Within a block, every CUDA thread is a fiber (ucontext) with its own stack, run by the block's
//     worker. __syncthreads() suspends the calling fiber; once every thread of the block has arrived, all
//     resume. Threads only switch at barriers, in the order set by emu_set_schedule (forward, reverse or
//     shuffled per phase): code missing a barrier computes a different result under some order.
//     A barrier reached by some threads of a block while the others have returned is reported as an
//     error (it is undefined behaviour in CUDA).
//   * __shared__ is `thread_local`: one copy per worker OS thread, i.e. per executing block, shared by
//     all the block's fibers. This is why threads are fibers and not OS threads: with one OS thread per
//     CUDA thread, __shared__ would have to be `static`, and `extern __shared__ T x[];` would read
//     `extern static`, which C++ rejects; `thread_local` is the one storage class that is valid both on
//     its own and after `extern`. Static __shared__ arrays start zeroed per worker and then keep what the
//     previous block on that worker left (only the dynamic buffer below is poisoned).
//   * Dynamic shared memory (`extern __shared__ T name[];`): C++ resolves a block-scope extern
//     declaration by name to a variable at namespace scope, so the file that includes a kernel defines
//     that variable once, before the kernel, with EMU_DYNAMIC_SHARED(T, name). It holds
//     kDynamicSharedBytes (48 KiB, the default CUDA limit) per block and is filled with 0xA5 at the start
//     of every block, since CUDA leaves shared memory uninitialised. (CUDA lays every extern __shared__
//     array over the same bytes; here each name gets its own buffer, which differs only for kernels that
//     use two names for the dynamic shared memory.)
//   * Launch limits are checked as on the device: grid.x <= 2^31 - 1, grid.y, grid.z <= 65535, at most
//     1024 threads per block (z <= 64), dynamic shared memory <= 48 KiB, no dimension 0.
//   * Float intrinsics (__fadd_rn, ...) are the plain IEEE float32 operations: build with
//     -ffp-contract=off so that no multiply-add is fused (x86-64 SSE has no excess precision).
//
// Exporting: EMU_EXPORT_KERNEL(k) defines, with C linkage,
//   int emu_launch_k(const unsigned geometry[6] /* grid xyz, block xyz */, size_t shared_mem, void** params)
//     params[i] points to the value of argument i, as in cuLaunchKernel; returns 0, or non-zero with the
//     reason in emu_last_error();
//   const char* emu_signature_k(): the argument types as numpy-style codes separated by spaces
//     ("*f4 *f4 i4 i4 *f4" for box_iou_2d), so that callers can check what they pass.
// EMU_EXPORT_RUNTIME(), once per shared library: emu_last_error(), emu_set_schedule(mode, seed) (emu::Schedule),
// emu_set_workers(n) (0: one per core) and emu_check_launch(geometry, shared_mem) (the limits only).
#pragma once

#include <math.h>
#include <stddef.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- CUDA language ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ thread_local
#define __launch_bounds__(...)
// __restrict__ is a g++ keyword already; `#pragma unroll` is ignored (build with -Wno-unknown-pragmas).

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Per OS thread; the scheduler sets threadIdx before it resumes each fiber.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }

// CUDA's overloads of min/max (same-type arguments only here: a mixed call does not compile).
#define EMU_MIN_MAX(T)                                 \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
EMU_MIN_MAX(int)
EMU_MIN_MAX(unsigned int)
EMU_MIN_MAX(long long)
EMU_MIN_MAX(unsigned long long)
#undef EMU_MIN_MAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

namespace emu {

constexpr size_t kDynamicSharedBytes = 48 * 1024;
constexpr size_t kFiberStackBytes = 64 * 1024;
enum Schedule : int { kForward = 0, kReverse = 1, kShuffle = 2 };

namespace detail {

inline std::atomic<int> schedule_mode{kForward};
inline std::atomic<unsigned> schedule_seed{0};
inline std::atomic<int> worker_count{0};  // 0: std::thread::hardware_concurrency()
inline std::mutex error_mutex;
inline std::string last_error;

inline void set_error(const std::string& msg) {
  std::lock_guard<std::mutex> lock(error_mutex);
  last_error = msg;
}

// Dynamic shared buffers (EMU_DYNAMIC_SHARED): functions returning the calling OS thread's copy.
inline std::vector<void* (*)()>& dynamic_shared_buffers() {
  static std::vector<void* (*)()> buffers;
  return buffers;
}
inline bool register_dynamic_shared(void* (*buffer)()) {
  dynamic_shared_buffers().push_back(buffer);
  return true;
}

enum FiberState { kRunning, kArrived, kDone };
struct Fiber {
  ucontext_t ctx;
  FiberState state;
};

// The block currently executing on this worker OS thread.
struct BlockRunner {
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::unique_ptr<char[]> stacks;
  ucontext_t sched;
  Fiber* current = nullptr;
};
inline thread_local BlockRunner* runner = nullptr;

inline void fiber_entry() {
  BlockRunner* r = runner;
  (*r->body)();
  r->current->state = kDone;  // returning resumes r->sched (uc_link)
}

inline void sync_block() {
  BlockRunner* r = runner;
  Fiber* f = r->current;
  f->state = kArrived;
  swapcontext(&f->ctx, &r->sched);
}

inline std::string check_launch(dim3 g, dim3 b, size_t shared_mem) {
  if (g.x < 1 || g.y < 1 || g.z < 1 || g.x > 2147483647u || g.y > 65535u || g.z > 65535u)
    return "invalid grid (" + std::to_string(g.x) + ", " + std::to_string(g.y) + ", " + std::to_string(g.z) +
           ")";
  const unsigned long long nt = 1ULL * b.x * b.y * b.z;
  if (b.x < 1 || b.y < 1 || b.z < 1 || b.x > 1024u || b.y > 1024u || b.z > 64u || nt > 1024u)
    return "invalid block (" + std::to_string(b.x) + ", " + std::to_string(b.y) + ", " + std::to_string(b.z) +
           ")";
  if (shared_mem > kDynamicSharedBytes)
    return "dynamic shared memory " + std::to_string(shared_mem) + " bytes > " +
           std::to_string(kDynamicSharedBytes);
  return "";
}

// Runs one block on this worker: every thread to completion, barrier phase by barrier phase.
inline std::string run_block(BlockRunner& r, uint3 bidx, unsigned long long linear) {
  const dim3 b = blockDim;
  const unsigned nt = b.x * b.y * b.z;
  blockIdx = bidx;
  for (auto buffer : dynamic_shared_buffers()) std::memset(buffer(), 0xA5, kDynamicSharedBytes);
  for (unsigned t = 0; t < nt; ++t) {
    Fiber& f = r.fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = r.stacks.get() + size_t(t) * kFiberStackBytes;
    f.ctx.uc_stack.ss_size = kFiberStackBytes;
    f.ctx.uc_link = &r.sched;
    makecontext(&f.ctx, fiber_entry, 0);
    f.state = kRunning;
  }
  std::vector<unsigned> order(nt);
  std::iota(order.begin(), order.end(), 0u);
  const int mode = schedule_mode.load();
  if (mode == kReverse) std::reverse(order.begin(), order.end());
  for (unsigned phase = 0;; ++phase) {
    if (mode == kShuffle) {
      std::seed_seq seq{schedule_seed.load(), unsigned(linear), unsigned(linear >> 32), phase};
      std::mt19937 rng(seq);
      std::shuffle(order.begin(), order.end(), rng);
    }
    for (unsigned t : order) {
      Fiber& f = r.fibers[t];
      if (f.state != kRunning) continue;
      threadIdx = uint3{t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
      r.current = &f;
      swapcontext(&r.sched, &f.ctx);
    }
    unsigned arrived = 0, done = 0;
    for (unsigned t = 0; t < nt; ++t) (r.fibers[t].state == kArrived ? arrived : done) += 1;
    if (arrived == 0) return "";
    if (done != 0)
      return "block (" + std::to_string(bidx.x) + ", " + std::to_string(bidx.y) + ", " +
             std::to_string(bidx.z) + "): __syncthreads() reached by " + std::to_string(arrived) + " of " +
             std::to_string(nt) + " threads, the others returned";
    for (unsigned t = 0; t < nt; ++t) r.fibers[t].state = kRunning;
  }
}

}  // namespace detail

// Runs `body` (one CUDA thread's work) for every thread of every block. Returns 0 or 1 (error message
// in detail::last_error).
inline int launch(dim3 grid, dim3 block, size_t shared_mem, const std::function<void()>& body) {
  const std::string bad = detail::check_launch(grid, block, shared_mem);
  if (!bad.empty()) {
    detail::set_error(bad);
    return 1;
  }
  const unsigned long long nblocks = 1ULL * grid.x * grid.y * grid.z;
  const unsigned nt = block.x * block.y * block.z;
  unsigned nw = unsigned(detail::worker_count.load());
  if (nw == 0) nw = std::max(1u, std::thread::hardware_concurrency());
  nw = unsigned(std::min<unsigned long long>(nw, nblocks));
  std::atomic<unsigned long long> next{0};
  std::atomic<bool> failed{false};
  std::string error;
  std::mutex error_mutex;
  auto work = [&] {
    detail::BlockRunner r;
    r.body = &body;
    r.fibers.resize(nt);
    r.stacks.reset(new char[size_t(nt) * kFiberStackBytes]);  // pages are touched only as used
    detail::runner = &r;
    gridDim = grid;
    blockDim = block;
    for (;;) {
      const unsigned long long i = next.fetch_add(1);
      if (i >= nblocks || failed.load()) break;
      const uint3 bidx{unsigned(i % grid.x), unsigned(i / grid.x % grid.y),
                       unsigned(i / (1ULL * grid.x * grid.y))};
      std::string msg = detail::run_block(r, bidx, i);
      if (!msg.empty()) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!failed.exchange(true)) error = msg;
        break;
      }
    }
    detail::runner = nullptr;
  };
  std::vector<std::thread> workers;
  for (unsigned w = 0; w < nw; ++w) workers.emplace_back(work);
  for (auto& w : workers) w.join();
  if (failed.load()) {
    detail::set_error(error);
    return 1;
  }
  return 0;
}

template <class T>
std::string type_code() {
  if constexpr (std::is_pointer_v<T>) {
    return "*" + type_code<std::remove_cv_t<std::remove_pointer_t<T>>>();
  } else {
    static_assert(std::is_arithmetic_v<T>, "kernel arguments must be arithmetic values or pointers to them");
    const char kind = std::is_same_v<T, bool>             ? 'b'
                      : std::is_floating_point_v<T> ? 'f'
                      : std::is_signed_v<T>         ? 'i'
                                                    : 'u';
    return kind + std::to_string(sizeof(T));
  }
}

template <class... A>
std::string signature(void (*)(A...)) {
  std::string s;
  ((s += (s.empty() ? "" : " ") + type_code<A>()), ...);
  return s;
}

template <class... A, size_t... I>
std::tuple<A...> unpack(void** params, std::index_sequence<I...>) {
  return std::tuple<A...>(*static_cast<A*>(params[I])...);
}

template <class... A>
int launch_kernel(void (*kernel)(A...), const unsigned* geometry, size_t shared_mem, void** params) {
  const std::tuple<A...> args = unpack<A...>(params, std::index_sequence_for<A...>{});
  const std::function<void()> body = [kernel, &args] { std::apply(kernel, args); };
  return launch(dim3(geometry[0], geometry[1], geometry[2]), dim3(geometry[3], geometry[4], geometry[5]),
                shared_mem, body);
}

}  // namespace emu

inline void __syncthreads() { emu::detail::sync_block(); }

#define EMU_API __attribute__((visibility("default")))

#define EMU_DYNAMIC_SHARED(type, name)                                       \
  alignas(16) thread_local type name[::emu::kDynamicSharedBytes / sizeof(type)]; \
  static const bool emu_dynamic_shared_##name =                              \
      ::emu::detail::register_dynamic_shared([]() -> void* { return name; })

#define EMU_EXPORT_KERNEL(kernel)                                                                      \
  extern "C" EMU_API int emu_launch_##kernel(const unsigned* geometry, size_t shared_mem, void** params) { \
    return ::emu::launch_kernel(&kernel, geometry, shared_mem, params);                               \
  }                                                                                                    \
  extern "C" EMU_API const char* emu_signature_##kernel() {                                            \
    static const std::string s = ::emu::signature(&kernel);                                            \
    return s.c_str();                                                                                  \
  }

// Runtime settings and errors, exported once per shared library (the file that includes the kernel).
#define EMU_EXPORT_RUNTIME()                                                                               \
  extern "C" EMU_API const char* emu_last_error() { return ::emu::detail::last_error.c_str(); }           \
  extern "C" EMU_API void emu_set_schedule(int mode, unsigned seed) {                                      \
    ::emu::detail::schedule_mode = mode;                                                                   \
    ::emu::detail::schedule_seed = seed;                                                                   \
  }                                                                                                        \
  extern "C" EMU_API void emu_set_workers(int n) { ::emu::detail::worker_count = n; }                     \
  extern "C" EMU_API int emu_check_launch(const unsigned* geometry, size_t shared_mem) {                   \
    const dim3 grid(geometry[0], geometry[1], geometry[2]), block(geometry[3], geometry[4], geometry[5]);   \
    const std::string bad = ::emu::detail::check_launch(grid, block, shared_mem);                          \
    if (!bad.empty()) ::emu::detail::set_error(bad);                                                       \
    return bad.empty() ? 0 : 1;                                                                            \
  }
