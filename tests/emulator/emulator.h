// A CPU emulator for the CUDA kernels of csrc/cuda/dcnv4_cuda.cu, so that their indexing, lane
// logic, warp shuffles, vector paths and atomics run (and are checked against the float64 reference)
// on machines without a GPU. Included by kernels.cpp before the .cu file itself.
//
// Execution model: a launch of `grid` blocks of `block` threads runs `block` host threads; thread t
// plays threadIdx.x = t of every block in turn, block after block, with a block-wide barrier between
// blocks. __shfl_xor_sync is a real exchange among the 32 threads of a warp (two warp barriers), so
// lanes that skip a shuffle their partners reach deadlock as they would on a GPU: the emulator reports
// that after a timeout instead of hanging. __syncthreads is a block-wide barrier, and the block's
// dynamic shared memory one buffer, refilled with NaN bytes before every block. Every load through
// __ldg and every global atomic is checked to lie inside a buffer the caller registered (and 16-byte
// accesses to be 16-byte aligned); plain stores are checked by the caller with guard zones around the
// outputs. Shared-memory loads and stores are not checked: the kernels' region bounds are, by the
// results.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace emu {

struct Dim {
  unsigned int x = 1, y = 1, z = 1;
};

struct ThreadCtx {
  Dim thread_idx, block_idx, block_dim, grid_dim;
};

inline thread_local ThreadCtx ctx;

// First failure of the current launch; later ones are dropped.
struct Errors {
  std::mutex mu;
  std::string first;
  std::atomic<bool> failed{false};
  void report(const std::string& msg) {
    std::lock_guard<std::mutex> lock(mu);
    if (first.empty()) first = msg;
    failed = true;
  }
};
inline Errors errors;

// How long a barrier waits before it declares a deadlock.
inline std::chrono::milliseconds timeout{20000};

// What the kernels did, by kind, summed over a launch: lets a test check that a path was taken.
struct Counters {
  std::atomic<int64_t> loads16{0}, loads_scalar{0}, atomics16{0}, atomics_scalar{0}, atomics_shared{0},
      shuffles{0}, barriers{0};
  void clear() {
    loads16 = 0;
    loads_scalar = 0;
    atomics16 = 0;
    atomics_scalar = 0;
    atomics_shared = 0;
    shuffles = 0;
    barriers = 0;
  }
};
inline Counters counters;

struct Aborted {};  // unwinds a thread's kernel once the launch has failed

// A reusable barrier that gives up after `timeout` (a divergent shuffle or __syncthreads).
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void arrive_and_wait(const char* what) {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t gen = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    const bool done = cv_.wait_for(lock, timeout,
                                   [&] { return generation_ != gen || errors.failed.load(); });
    if (errors.failed.load() && generation_ == gen) throw Aborted{};
    if (!done) {
      errors.report(std::string("deadlock: not every thread reached ") + what +
                    " (lanes diverged at a warp-synchronous operation)");
      cv_.notify_all();
      throw Aborted{};
    }
  }
  void wake_all() {
    std::lock_guard<std::mutex> lock(mu_);
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int count_;
  int waiting_ = 0;
  uint64_t generation_ = 0;
};

// Buffers the kernels may read (__ldg) or accumulate into (atomics), registered per launch.
struct Range {
  uintptr_t begin, end;
};
inline std::vector<Range> readable, atomic_writable;
inline Range shared_range{0, 0};  // the dynamic shared memory of the block being run

inline bool in_shared(const void* p, size_t bytes) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  return a >= shared_range.begin && a + bytes <= shared_range.end;
}

inline void check_access(const void* p, size_t bytes, const std::vector<Range>& ranges, const char* what) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (bytes == 16 && a % 16 != 0) {
    errors.report(std::string(what) + ": 16-byte access at an address that is not 16-byte aligned");
    throw Aborted{};
  }
  for (const Range& r : ranges) {
    if (a >= r.begin && a + bytes <= r.end) return;
  }
  errors.report(std::string(what) + ": access outside every registered buffer");
  throw Aborted{};
}

struct Block {
  explicit Block(int threads) : block_barrier(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.emplace_back(new Warp());
  }
  struct Warp {
    Barrier barrier{32};
    uint64_t slots[32];
  };
  Barrier block_barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};
inline Block* current_block = nullptr;
inline void* shared_base = nullptr;

template <typename T>
T shfl_xor(T v, int off) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const int lane = static_cast<int>(ctx.thread_idx.x % 32);
  if (lane == 0) counters.shuffles++;
  Block::Warp& w = *current_block->warps[ctx.thread_idx.x / 32];
  std::memcpy(&w.slots[lane], &v, sizeof(T));
  w.barrier.arrive_and_wait("__shfl_xor_sync");
  T r;
  std::memcpy(&r, &w.slots[(lane ^ off) & 31], sizeof(T));
  w.barrier.arrive_and_wait("__shfl_xor_sync");
  return r;
}

// Runs kernel(args...) over grid x block threads with `shared_bytes` of dynamic shared memory per
// block (filled with NaN bytes before each block, as uninitialised shared memory would be garbage);
// returns the first error ("" when none).
template <typename Kernel, typename... Args>
std::string launch(unsigned int grid, unsigned int block, size_t shared_bytes, Kernel kernel, Args... args) {
  errors.first.clear();
  errors.failed = false;
  counters.clear();
  if (block == 0 || block % 32 != 0 || grid == 0) return "launch with an empty grid or a partial warp";
  if (shared_bytes > 48 * 1024) return "more than 48 KiB of dynamic shared memory without opting in";
  Block shared_state(static_cast<int>(block));
  current_block = &shared_state;
  std::vector<float4> shared_memory((shared_bytes + 15) / 16);
  shared_base = shared_memory.data();
  shared_range = {reinterpret_cast<uintptr_t>(shared_memory.data()),
                  reinterpret_cast<uintptr_t>(shared_memory.data()) + shared_bytes};
  std::vector<std::thread> threads;
  threads.reserve(block);
  for (unsigned int t = 0; t < block; ++t) {
    threads.emplace_back([&, t] {
      ctx.thread_idx.x = t;
      ctx.block_dim.x = block;
      ctx.grid_dim.x = grid;
      try {
        for (unsigned int b = 0; b < grid; ++b) {
          ctx.block_idx.x = b;
          if (t == 0 && shared_bytes > 0) std::memset(shared_memory.data(), 0xff, shared_bytes);
          shared_state.block_barrier.arrive_and_wait("the start of a block");
          kernel(args...);
          shared_state.block_barrier.arrive_and_wait("the end of a block");
        }
      } catch (const Aborted&) {
      }
      if (errors.failed.load()) {  // release threads still waiting at a barrier
        shared_state.block_barrier.wake_all();
        for (auto& w : shared_state.warps) w->barrier.wake_all();
      }
    });
  }
  for (auto& th : threads) th.join();
  current_block = nullptr;
  shared_base = nullptr;
  shared_range = {0, 0};
  return errors.first;
}

// The launch as the .cu writes it: DCNV4_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...).
struct Launcher {
  unsigned int grid, block;
  size_t shared_bytes;
  template <typename Kernel>
  struct Bound {
    unsigned int grid, block;
    size_t shared_bytes;
    Kernel kernel;
    template <typename... Args>
    void operator()(Args... args) const {
      last_error = launch(grid, block, shared_bytes, kernel, args...);
    }
  };
  template <typename Kernel>
  Bound<Kernel> bind(Kernel k) const {
    return {grid, block, shared_bytes, k};
  }
  static inline thread_local std::string last_error;
};

}  // namespace emu

// ---- the CUDA built-ins the kernels use -----------------------------------------------------------

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

#define threadIdx (::emu::ctx.thread_idx)
#define blockIdx (::emu::ctx.block_idx)
#define blockDim (::emu::ctx.block_dim)
#define gridDim (::emu::ctx.grid_dim)

template <typename T>
inline T __ldg(const T* p) {
  ::emu::check_access(p, sizeof(T), ::emu::readable, "__ldg");
  (sizeof(T) == 16 ? ::emu::counters.loads16 : ::emu::counters.loads_scalar)++;
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T v, int off) {
  if (mask != 0xffffffffu) {
    ::emu::errors.report("__shfl_xor_sync with a partial mask is not emulated");
    throw ::emu::Aborted{};
  }
  return ::emu::shfl_xor(v, off);
}

inline void __syncthreads() {
  if (::emu::ctx.thread_idx.x == 0) ::emu::counters.barriers++;
  ::emu::current_block->block_barrier.arrive_and_wait("__syncthreads");
}

template <typename T>
inline T atomicAdd(T* p, T v) {
  if (::emu::in_shared(p, sizeof(T))) {
    ::emu::counters.atomics_shared++;
  } else {
    ::emu::check_access(p, sizeof(T), ::emu::atomic_writable, "atomicAdd");
    ::emu::counters.atomics_scalar++;
  }
  return std::atomic_ref<T>(*p).fetch_add(v);
}

inline float4 atomicAdd(float4* p, float4 v) {
  ::emu::check_access(p, sizeof(float4), ::emu::atomic_writable, "atomicAdd(float4)");
  ::emu::counters.atomics16++;
  float* f = reinterpret_cast<float*>(p);
  float4 old;
  old.x = std::atomic_ref<float>(f[0]).fetch_add(v.x);
  old.y = std::atomic_ref<float>(f[1]).fetch_add(v.y);
  old.z = std::atomic_ref<float>(f[2]).fetch_add(v.z);
  old.w = std::atomic_ref<float>(f[3]).fetch_add(v.w);
  return old;
}

// 16-bit atomics (a 16-bit grad_value accumulator, -DDCNV4_BWD16_ACC16): the sum in float, rounded to the type
// to nearest, as the hardware's 16-bit reductions round; a compare-and-swap on the word's bits.
template <typename T, typename Word, typename Add>
inline T atomic_add_bits(T* p, T v, Add add) {
  ::emu::check_access(p, sizeof(T), ::emu::atomic_writable, "atomicAdd(16-bit)");
  ::emu::counters.atomics_scalar++;
  std::atomic_ref<Word> word(*reinterpret_cast<Word*>(p));
  Word old_bits = word.load();
  for (;;) {
    T old;
    std::memcpy(&old, &old_bits, sizeof(T));
    const T sum = add(old, v);
    Word new_bits;
    std::memcpy(&new_bits, &sum, sizeof(T));
    if (word.compare_exchange_weak(old_bits, new_bits)) return old;
  }
}
inline __half atomicAdd(__half* p, __half v) {
  return atomic_add_bits<__half, uint16_t>(p, v, [](__half a, __half b) {
    return __float2half_rn(__half2float(a) + __half2float(b));
  });
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* p, __nv_bfloat16 v) {
  return atomic_add_bits<__nv_bfloat16, uint16_t>(p, v, [](__nv_bfloat16 a, __nv_bfloat16 b) {
    return __float2bfloat16_rn(__bfloat162float(a) + __bfloat162float(b));
  });
}
inline __half2 atomicAdd(__half2* p, __half2 v) {
  return atomic_add_bits<__half2, uint32_t>(p, v, [](__half2 a, __half2 b) {
    return __halves2half2(__float2half_rn(__low2float(a) + __low2float(b)),
                          __float2half_rn(__high2float(a) + __high2float(b)));
  });
}
inline __nv_bfloat162 atomicAdd(__nv_bfloat162* p, __nv_bfloat162 v) {
  return atomic_add_bits<__nv_bfloat162, uint32_t>(p, v, [](__nv_bfloat162 a, __nv_bfloat162 b) {
    return __halves2bfloat162(__float2bfloat16_rn(__low2float(a) + __low2float(b)),
                              __float2bfloat16_rn(__high2float(a) + __high2float(b)));
  });
}

// Host versions of the device min/max the kernels call unqualified.
using std::max;
using std::min;

// The launch and shared-memory hooks of the .cu file, and its error query.
#define DCNV4_LAUNCH(grid, block, shared_bytes, stream, ...) \
  (::emu::Launcher{(grid), (block), (shared_bytes)}.bind(__VA_ARGS__))
#define DCNV4_SHARED_ARRAY(T, name) T* name = static_cast<T*>(::emu::shared_base)
#define cudaGetLastError() \
  (::emu::Launcher::last_error.empty() ? cudaSuccess : cudaErrorLaunchFailure)
