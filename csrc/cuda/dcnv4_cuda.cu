// CUDA kernels of the DCNv4 operator (forward and backward) and their launchers. No torch headers here:
// the binding in dcnv4_cuda.cpp passes plain pointers, which keeps nvcc's time on this file short.
//
// Work decomposition, shared by both directions: one "task" is one (n, ho, wo, g) output pixel and
// group, i.e. D = group_channels channels. A task's channels are cut into chunks of V channels (16
// bytes when vectorised, 1 channel on the scalar path) spread over L lanes of one warp, L a power of
// two <= 32, each lane taking chunks lane, lane + L, ... Threads are numbered globally over
// tasks x L lanes, so a block may hold tasks of several images: every index is computed from the
// global number, never from the block, and the result is the same for every shape and block size.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "dcnv4_cuda.h"

// Kernel launches and dynamic shared memory go through these macros so that tests/emulator can run the
// kernels on a CPU.
#ifndef DCNV4_LAUNCH
#define DCNV4_LAUNCH(grid, block, shared_bytes, stream, ...) \
  __VA_ARGS__<<<(grid), (block), (shared_bytes), (stream)>>>
#endif
#ifndef DCNV4_SHARED_ARRAY
#define DCNV4_SHARED_ARRAY(T, name)                                  \
  extern __shared__ __align__(16) unsigned char dcnv4_shared_raw[]; \
  T* name = reinterpret_cast<T*>(dcnv4_shared_raw)
#endif

namespace dcnv4 {
namespace {

constexpr int kThreads = 256;  // a multiple of 32: the backward's shuffles need whole warps

template <typename scalar_t>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Narrowing from the accumulation type, rounding to nearest.
template <typename scalar_t>
__device__ __forceinline__ scalar_t narrow(typename Acc<scalar_t>::type x);
template <>
__device__ __forceinline__ float narrow<float>(float x) { return x; }
template <>
__device__ __forceinline__ double narrow<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half narrow<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Read-only scalar load through the non-coherent cache, widened to the accumulation type.
template <typename scalar_t>
__device__ __forceinline__ typename Acc<scalar_t>::type load1(const scalar_t* p) {
  return to_acc(__ldg(p));
}

// Loads and stores of V consecutive channels, widened to / narrowed from the accumulation type.
// V = 1 is the scalar path (any D, any alignment); the other widths move 16 bytes at once (8 for the
// 16-bit types at V = 4) and need 16-byte aligned addresses, which the launcher guarantees before
// choosing them.
template <typename scalar_t, int V>
struct VecIO;

template <typename scalar_t>
struct VecIO<scalar_t, 1> {
  using acc_t = typename Acc<scalar_t>::type;
  static __device__ __forceinline__ void load(const scalar_t* p, acc_t (&o)[1]) { o[0] = load1(p); }
  static __device__ __forceinline__ void store(scalar_t* p, const acc_t (&o)[1]) { p[0] = narrow<scalar_t>(o[0]); }
};

template <>
struct VecIO<float, 4> {
  static __device__ __forceinline__ void load(const float* p, float (&o)[4]) {
    const float4 r = __ldg(reinterpret_cast<const float4*>(p));
    o[0] = r.x;
    o[1] = r.y;
    o[2] = r.z;
    o[3] = r.w;
  }
  static __device__ __forceinline__ void store(float* p, const float (&o)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(o[0], o[1], o[2], o[3]);
  }
};

// Eight float channels as two 16-byte words: the fp32 forward's lane width when built with
// DCNV4_FWD32_V=8 (see forward_cuda).
template <>
struct VecIO<float, 8> {
  static __device__ __forceinline__ void load(const float* p, float (&o)[8]) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p + 4));
    o[0] = a.x;
    o[1] = a.y;
    o[2] = a.z;
    o[3] = a.w;
    o[4] = b.x;
    o[5] = b.y;
    o[6] = b.z;
    o[7] = b.w;
  }
  static __device__ __forceinline__ void store(float* p, const float (&o)[8]) {
    *reinterpret_cast<float4*>(p) = make_float4(o[0], o[1], o[2], o[3]);
    *reinterpret_cast<float4*>(p + 4) = make_float4(o[4], o[5], o[6], o[7]);
  }
};

// A 16-bit type's two-channel word and its conversions to and from a float pair.
template <typename scalar_t>
struct Pair16;
template <>
struct Pair16<__half> {
  using type = __half2;
  static __device__ __forceinline__ float2 to_float2(type h) { return __half22float2(h); }
  static __device__ __forceinline__ type from_floats(float a, float b) { return __floats2half2_rn(a, b); }
};
template <>
struct Pair16<__nv_bfloat16> {
  using type = __nv_bfloat162;
  // A bfloat16 is the top half of the float it widens to: one shift or one mask a value (the library's
  // conversion spends a byte permute and a multiply on each).
  static __device__ __forceinline__ float2 to_float2(type h) {
    unsigned int w;
    memcpy(&w, &h, sizeof(w));
    const unsigned int lo = w << 16, hi = w & 0xffff0000u;
    float2 f;
    memcpy(&f.x, &lo, sizeof(lo));
    memcpy(&f.y, &hi, sizeof(hi));
    return f;
  }
  static __device__ __forceinline__ type from_floats(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

// V half-precision channels travel as one word: 8 as a uint4 (16 bytes), or 4 as a uint2 (8 bytes,
// the 16-bit backward's lane width when built with DCNV4_BWD16_V=4, see backward_cuda). Each 32-bit
// part of the word is a pair converted at once.
template <typename scalar_t, int V>
struct VecIO16 {
  static_assert(V == 8 || V == 4, "16-bit vectors are 8 or 4 channels");
  using pair_t = typename Pair16<scalar_t>::type;
  using word_t = std::conditional_t<V == 8, uint4, uint2>;
  static __device__ __forceinline__ void load(const scalar_t* p, float (&o)[V]) {
    const word_t r = __ldg(reinterpret_cast<const word_t*>(p));
    unsigned int w[V / 2];
    memcpy(w, &r, sizeof(r));
#pragma unroll
    for (int i = 0; i < V / 2; ++i) {
      pair_t h;
      memcpy(&h, &w[i], sizeof(h));
      const float2 f = Pair16<scalar_t>::to_float2(h);
      o[2 * i] = f.x;
      o[2 * i + 1] = f.y;
    }
  }
  static __device__ __forceinline__ void store(scalar_t* p, const float (&o)[V]) {
    unsigned int w[V / 2];
#pragma unroll
    for (int i = 0; i < V / 2; ++i) {
      const pair_t h = Pair16<scalar_t>::from_floats(o[2 * i], o[2 * i + 1]);
      memcpy(&w[i], &h, sizeof(h));
    }
    word_t r;
    memcpy(&r, w, sizeof(r));
    *reinterpret_cast<word_t*>(p) = r;
  }
};
// 16 half-precision channels as two 16-byte words: the 16-bit forward's lane width when built with
// DCNV4_FWD16_V=16 (see forward_cuda).
template <typename scalar_t>
struct VecIO16x2 {
  static __device__ __forceinline__ void load(const scalar_t* p, float (&o)[16]) {
    float a[8], b[8];
    VecIO16<scalar_t, 8>::load(p, a);
    VecIO16<scalar_t, 8>::load(p + 8, b);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      o[i] = a[i];
      o[8 + i] = b[i];
    }
  }
  static __device__ __forceinline__ void store(scalar_t* p, const float (&o)[16]) {
    float a[8], b[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      a[i] = o[i];
      b[i] = o[8 + i];
    }
    VecIO16<scalar_t, 8>::store(p, a);
    VecIO16<scalar_t, 8>::store(p + 8, b);
  }
};
template <>
struct VecIO<__half, 16> : VecIO16x2<__half> {};
template <>
struct VecIO<__nv_bfloat16, 16> : VecIO16x2<__nv_bfloat16> {};
template <>
struct VecIO<__half, 8> : VecIO16<__half, 8> {};
template <>
struct VecIO<__nv_bfloat16, 8> : VecIO16<__nv_bfloat16, 8> {};
template <>
struct VecIO<__half, 4> : VecIO16<__half, 4> {};
template <>
struct VecIO<__nv_bfloat16, 4> : VecIO16<__nv_bfloat16, 4> {};

// grad_value += v over V consecutive channels. Hopper has 16-byte float atomics (one instruction for
// four channels); older targets fall back to one atomic per channel.
template <int V>
__device__ __forceinline__ void atomic_add_vec(float* p, const float (&v)[V]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVector = V % 4 == 0;
#else
  constexpr bool kVector = false;
#endif
  if constexpr (kVector) {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(p + i), make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]));
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) atomicAdd(p + i, v[i]);
  }
}
template <int V>
__device__ __forceinline__ void atomic_add_vec(double* p, const double (&v)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) atomicAdd(p + i, v[i]);
}

// Where the 16-bit backward accumulates grad_value: in float (the default), or, built with
// -DDCNV4_BWD16_ACC16, in the 16-bit type itself (half the bytes of every atomic, each contribution rounded to
// 16 bits and summed in 16 bits: less precise, see benchmarks/NOTES.md). GradAcc<scalar_t>::type is the
// global accumulator's type.
#ifdef DCNV4_BWD16_ACC16
constexpr bool kAcc16 = true;
#else
constexpr bool kAcc16 = false;
#endif
template <typename scalar_t>
struct GradAcc {
  using type = typename Acc<scalar_t>::type;
};
template <>
struct GradAcc<__half> {
  using type = std::conditional_t<kAcc16, __half, float>;
};
template <>
struct GradAcc<__nv_bfloat16> {
  using type = std::conditional_t<kAcc16, __nv_bfloat16, float>;
};

// p[0..N) += v as 16-bit pair reductions: on Hopper one vector reduction (red.global.add.noftz.v4 or v2 on
// f16x2 / bf16x2) for 4 or 2 pairs, elsewhere (and under tests/emulator) one pair atomic each.
template <typename pair_t, int N>
__device__ __forceinline__ void red_add_pairs(pair_t* p, const pair_t (&v)[N]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(DCNV4_EMULATED)
  unsigned int w[N];
  memcpy(w, v, sizeof(w));
  if constexpr (N == 4 && std::is_same_v<pair_t, __nv_bfloat162>) {
    asm volatile("red.global.add.noftz.v4.bf16x2 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]),
                 "r"(w[2]), "r"(w[3]) : "memory");
  } else if constexpr (N == 4) {
    asm volatile("red.global.add.noftz.v4.f16x2 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]),
                 "r"(w[2]), "r"(w[3]) : "memory");
  } else if constexpr (N == 2 && std::is_same_v<pair_t, __nv_bfloat162>) {
    asm volatile("red.global.add.noftz.v2.bf16x2 [%0], {%1, %2};" ::"l"(p), "r"(w[0]), "r"(w[1]) : "memory");
  } else if constexpr (N == 2) {
    asm volatile("red.global.add.noftz.v2.f16x2 [%0], {%1, %2};" ::"l"(p), "r"(w[0]), "r"(w[1]) : "memory");
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) atomicAdd(p + i, v[i]);
  }
#else
#pragma unroll
  for (int i = 0; i < N; ++i) atomicAdd(p + i, v[i]);
#endif
}

// grad_value += v into a 16-bit accumulator (DCNV4_BWD16_ACC16): pairs of channels rounded to the type and
// reduced together; one channel at a time on the scalar path (V = 1).
template <int V, typename T>
__device__ __forceinline__ std::enable_if_t<std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>>
atomic_add_vec(T* p, const float (&v)[V]) {
  using pair_t = typename Pair16<T>::type;
  if constexpr (V % 2 == 0) {
    pair_t pairs[V / 2];
#pragma unroll
    for (int i = 0; i < V / 2; ++i) pairs[i] = Pair16<T>::from_floats(v[2 * i], v[2 * i + 1]);
    red_add_pairs(reinterpret_cast<pair_t*>(p), pairs);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) atomicAdd(p + i, narrow<T>(v[i]));
  }
}

// Where one task's data lives: the task's offset/mask triplets, its image in value (already moved
// to the group's first channel) and its output pixel. index_t is int64_t, or int32_t in a forward whose
// every index fits it (`fits_int32`).
template <typename index_t>
struct TaskT {
  index_t n, ho, wo, g, pix;
};
using Task = TaskT<int64_t>;

template <typename index_t>
__device__ __forceinline__ TaskT<index_t> task_of(const Params& p, index_t q) {
  const index_t G = static_cast<index_t>(p.G), Wo = static_cast<index_t>(p.Wo), Ho = static_cast<index_t>(p.Ho);
  TaskT<index_t> t;
  t.g = q % G;
  t.pix = q / G;  // (n * Ho + ho) * Wo + wo
  t.wo = t.pix % Wo;
  const index_t r = t.pix / Wo;
  t.ho = r % Ho;
  t.n = r / Ho;
  return t;
}

// Sampling position of point k of a task before its offset, as point_base gives it, for a kernel of KH x KW
// taps known at compile time without remove_center: once the point loop is unrolled, the tap of each point
// is a constant.
template <int KH, int KW, typename acc_t, typename index_t>
__device__ __forceinline__ void point_base_fixed(const Params& p, index_t ho, index_t wo, int k, acc_t& x0,
                                                 acc_t& y0) {
  const int i = k / KH, j = k % KH;  // tap_of_point
  const int cw = p.dw * (KW - 1) / 2;
  const int ch = p.dh * (KH - 1) / 2;
  const acc_t s = static_cast<acc_t>(p.offset_scale);
  x0 = static_cast<acc_t>(wo * p.sw - p.pw + cw) + s * static_cast<acc_t>(i * p.dw - cw);
  y0 = static_cast<acc_t>(ho * p.sh - p.ph + ch) + s * static_cast<acc_t>(j * p.dh - ch);
}

// Sampling position and mask of point k of a task; `om` points at the task's 3K channels. KC: K known at
// compile time (9: a 3x3 kernel without remove_center), or 0 for any kernel. kMasked: the footprint's weights
// include the mask (what the forward needs; the backward needs them without).
template <int KC = 0, bool kMasked = false, typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ Bilinear<acc_t, index_t> sample_point(const Params& p, const TaskT<index_t>& t,
                                                                 const scalar_t* om, int k, acc_t& mask) {
  static_assert(KC == 0 || KC == 9, "K is a compile-time 9 (3x3) or a runtime value");
  acc_t x, y;
  if constexpr (KC == 9) {
    point_base_fixed<3, 3>(p, t.ho, t.wo, k, x, y);
  } else {
    point_base(p, t.ho, t.wo, k, x, y);
  }
  const acc_t s = static_cast<acc_t>(p.offset_scale);
  x += s * load1(om + 2 * k);
  y += s * load1(om + 2 * k + 1);
  mask = load1(om + 2 * (KC > 0 ? KC : p.K) + k);
  return bilinear<acc_t, index_t>(x, y, static_cast<index_t>(p.H), static_cast<index_t>(p.W),
                                  kMasked ? mask : static_cast<acc_t>(1));
}

// Points per iteration of the forward's point loop when K is a compile-time 9: 3 (a row of taps: each
// point's tap column is a constant) or 9 (the whole loop, more registers); -DDCNV4_FWD_K9_UNROLL=9 builds it.
#ifndef DCNV4_FWD_K9_UNROLL
#define DCNV4_FWD_K9_UNROLL 3
#endif
static_assert(DCNV4_FWD_K9_UNROLL == 3 || DCNV4_FWD_K9_UNROLL == 9, "DCNV4_FWD_K9_UNROLL must be 3 or 9");

// out[task, chunk] = sum_k mask_k * bilinear sample of point k. Each lane keeps V accumulators; the
// point loop is unrolled (DCNV4_FWD_K9_UNROLL points at a time when K is a compile-time 9, else two) so that
// the corner loads of several points are in flight together. Indices are index_t (see TaskT).
template <typename scalar_t, int V, typename index_t, int KC>
__global__ void __launch_bounds__(kThreads) forward_kernel(const Params p, const scalar_t* __restrict__ value,
                                                           const scalar_t* __restrict__ offset_mask,
                                                           scalar_t* __restrict__ output, int log2_lanes, int chunks,
                                                           index_t tasks) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr int kUnroll = KC > 0 ? DCNV4_FWD_K9_UNROLL : 2;
  const int lanes = 1 << log2_lanes;
  const int K = KC > 0 ? KC : p.K;
  const index_t C = static_cast<index_t>(p.G * p.D), P = static_cast<index_t>(p.P);
  const index_t HW = static_cast<index_t>(p.H * p.W), D = static_cast<index_t>(p.D);
  const index_t total = tasks << log2_lanes;
  const index_t step = static_cast<index_t>(gridDim.x) * static_cast<index_t>(blockDim.x);
  for (index_t tid = static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) + threadIdx.x;
       tid < total; tid += step) {
    const index_t q = tid >> log2_lanes;
    const int lane = static_cast<int>(tid & (lanes - 1));
    const TaskT<index_t> t = task_of(p, q);
    const scalar_t* om = offset_mask + t.pix * P + t.g * 3 * K;
    const scalar_t* img = value + t.n * HW * C + t.g * D;
    scalar_t* out = output + t.pix * C + t.g * D;
    for (int c = lane; c < chunks; c += lanes) {
      acc_t acc[V];
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = 0;
#pragma unroll kUnroll
      for (int k = 0; k < K; ++k) {
        acc_t m;
        const Bilinear<acc_t, index_t> b = sample_point<KC, true>(p, t, om, k, m);
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (!b.inside[corner]) continue;
          acc_t v[V];
          VecIO<scalar_t, V>::load(img + b.idx[corner] * C + c * V, v);
          const acc_t w = b.w[corner];  // mask x bilinear weight
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] += w * v[i];
        }
      }
      VecIO<scalar_t, V>::store(out + c * V, acc);
    }
  }
}

// Sum over the `lanes` lanes of each task (aligned groups of a power-of-two size inside the warp).
template <typename acc_t>
__device__ __forceinline__ acc_t lane_sum(acc_t v, int lanes) {
  for (int off = lanes >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Where a task's grad_value contributions go: `add` (mask * weight * grad_out over the V channels of
// chunk c) for corner `corner` of footprint b.
template <typename G, typename acc_t, int V, typename index_t = int64_t>
struct GlobalScatter {  // the atomic kernel: straight to global memory
  G* gimg;              // grad_value at the task's image and group (G: GradAcc's type)
  index_t C;
  __device__ __forceinline__ void operator()(const Bilinear<acc_t, index_t>& b, int corner, int c,
                                             const acc_t (&add)[V]) const {
    atomic_add_vec<V>(gimg + b.idx[corner] * C + c * V, add);
  }
};

// Corners whose weight is exactly zero (mask zero, or a sampling position on a pixel row or column: at zero
// offsets, a fresh layer, three corners of four) send nothing to grad_value when built with
// -DDCNV4_BWD_SKIP_ZERO: an atomic saved for a comparison. Their values still enter the offsets' gradients.
#ifdef DCNV4_BWD_SKIP_ZERO
constexpr bool kSkipZeroWeight = true;
#else
constexpr bool kSkipZeroWeight = false;
#endif

// Backward of one task. Per point: grad_value at the four corners gets mask * weight * grad_out
// (handed to `scatter`: points of neighbouring tasks hit the same pixels); the mask's gradient is
// <grad_out, sample> and the offsets' gradients are mask * offset_scale * <grad_out, d sample / d x>,
// dot products over D that each lane computes for its chunks and the task's lanes then sum with
// shuffles, so grad_offset_mask is written once, without atomics, by the task's first lane. Every
// lane of the warp must call this (the shuffles); lanes with `active` false compute on a valid task
// and write nothing. index_t and KC as in the forward (TaskT, sample_point).
template <typename scalar_t, int V, int KC, typename index_t, typename Scatter>
__device__ __forceinline__ void backward_task(const Params& p, const TaskT<index_t>& t, int lane, int log2_lanes,
                                              int chunks, bool active, const scalar_t* __restrict__ grad_output,
                                              const scalar_t* __restrict__ value,
                                              const scalar_t* __restrict__ offset_mask,
                                              scalar_t* __restrict__ grad_offset_mask, const Scatter& scatter) {
  using acc_t = typename Acc<scalar_t>::type;
  const int lanes = 1 << log2_lanes;
  const int per_lane = (chunks + lanes - 1) >> log2_lanes;
  const int K = KC > 0 ? KC : p.K;
  const index_t C = static_cast<index_t>(p.G * p.D), D = static_cast<index_t>(p.D);
  const index_t P = static_cast<index_t>(p.P), HW = static_cast<index_t>(p.H * p.W);
  const acc_t s = static_cast<acc_t>(p.offset_scale);
  const scalar_t* om = offset_mask + t.pix * P + t.g * 3 * K;
  scalar_t* gom = grad_offset_mask + t.pix * P + t.g * 3 * K;
  const scalar_t* img = value + t.n * HW * C + t.g * D;
  const scalar_t* gout = grad_output + t.pix * C + t.g * D;
  for (int r = 0; r < per_lane; ++r) {
    const int c = lane + (r << log2_lanes);
    const bool has = c < chunks;
    acc_t go[V];
    if (has) {
      VecIO<scalar_t, V>::load(gout + c * V, go);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) go[i] = 0;
    }
#pragma unroll 1
    for (int k = 0; k < K; ++k) {
      acc_t m;
      const Bilinear<acc_t, index_t> b = sample_point<KC>(p, t, om, k, m);
      acc_t gm = 0, gx = 0, gy = 0;
      if (has) {
        acc_t v[4][V];
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (b.inside[corner]) {
            VecIO<scalar_t, V>::load(img + b.idx[corner] * C + c * V, v[corner]);
          } else {
#pragma unroll
            for (int i = 0; i < V; ++i) v[corner][i] = 0;
          }
        }
        const acc_t lx = b.lx, ly = b.ly;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const acc_t sample = b.w[0] * v[0][i] + b.w[1] * v[1][i] + b.w[2] * v[2][i] + b.w[3] * v[3][i];
          const acc_t dsdx = (1 - ly) * (v[1][i] - v[0][i]) + ly * (v[3][i] - v[2][i]);
          const acc_t dsdy = (1 - lx) * (v[2][i] - v[0][i]) + lx * (v[3][i] - v[1][i]);
          gm += go[i] * sample;
          gx += go[i] * dsdx;
          gy += go[i] * dsdy;
        }
        if (active) {
#pragma unroll
          for (int corner = 0; corner < 4; ++corner) {
            if (!b.inside[corner]) continue;
            const acc_t w = m * b.w[corner];
            if (kSkipZeroWeight && w == 0) continue;
            acc_t add[V];
#pragma unroll
            for (int i = 0; i < V; ++i) add[i] = w * go[i];
            scatter(b, corner, c, add);
          }
        }
      }
      gm = lane_sum(gm, lanes);
      gx = lane_sum(gx, lanes);
      gy = lane_sum(gy, lanes);
      if (active && lane == 0) {
        // With more chunks than lanes the first lane adds up the rounds itself: no race.
        acc_t gdx = m * s * gx, gdy = m * s * gy;
        if (r > 0) {
          gdx += to_acc(gom[2 * k]);
          gdy += to_acc(gom[2 * k + 1]);
          gm += to_acc(gom[2 * K + k]);
        }
        gom[2 * k] = narrow<scalar_t>(gdx);
        gom[2 * k + 1] = narrow<scalar_t>(gdy);
        gom[2 * K + k] = narrow<scalar_t>(gm);
      }
    }
  }
}

// The atomic backward: tasks numbered globally as in the forward. Warps walk the grid together (the
// loop bound is the warp's first thread) so that every lane reaches every shuffle; lanes past the end
// compute on task 0 and write nothing. Indices are index_t and K is KC as in the forward.
template <typename scalar_t, int V, typename index_t, int KC>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const Params p, const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                    const scalar_t* __restrict__ offset_mask,
                    typename GradAcc<scalar_t>::type* __restrict__ grad_value, scalar_t* __restrict__ grad_offset_mask,
                    int log2_lanes, int chunks, index_t tasks) {
  using acc_t = typename Acc<scalar_t>::type;
  const index_t C = static_cast<index_t>(p.G * p.D), HW = static_cast<index_t>(p.H * p.W);
  const index_t total = tasks << log2_lanes;
  const index_t step = static_cast<index_t>(gridDim.x) * static_cast<index_t>(blockDim.x);
  for (index_t warp0 = static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) +
                       static_cast<index_t>(threadIdx.x & ~31u);
       warp0 < total; warp0 += step) {
    const index_t tid = warp0 + static_cast<index_t>(threadIdx.x & 31);
    const bool active = tid < total;
    const TaskT<index_t> t = task_of(p, active ? tid >> log2_lanes : index_t{0});
    const int lane = static_cast<int>(tid & ((1 << log2_lanes) - 1));
    const GlobalScatter<typename GradAcc<scalar_t>::type, acc_t, V, index_t> scatter{
        grad_value + t.n * HW * C + t.g * static_cast<index_t>(p.D), C};
    backward_task<scalar_t, V, KC>(p, t, lane, log2_lanes, chunks, active, grad_output, value, offset_mask,
                                   grad_offset_mask, scatter);
  }
}

// ---- The tiled backward ----------------------------------------------------------------------------
//
// The atomic backward above sends every grad_value contribution to global memory: 4 corners x K points
// x D/V vector atomics per task, each input pixel receiving about 4K of them. The tiled variant gives a
// block one image n, one group g and a tile of output pixels, and accumulates the tile's contributions
// in shared memory over a region of input pixels: the bounding box of the tile's regular sampling grid
// (offsets zero) widened by kTileMargin pixels on each side, clipped to the image. Corners inside the
// region go to shared memory, the others (offsets beyond the margin) straight to global memory as in
// the atomic kernel; at the end the block adds its region to grad_value, one vector atomic per pixel
// and chunk that received anything. Any offsets give the right result; the margin only decides how
// much goes through shared memory. grad_offset_mask is computed exactly as in the atomic kernel.

constexpr int kTileMargin = 4;                      // pixels of offset absorbed by the shared region
constexpr int kTileSharedBytes = 48 * 1024;         // the region must fit the default dynamic limit

struct Tiling {
  int tw, th;                  // output pixels of a tile along x and y (tw * th * lanes = kThreads)
  int64_t tiles_x, tiles_y;    // tiles per image
  int rw_cap, rh_cap;          // largest region, in input pixels (the shared array's shape)
};

// The region of block (ho0, wo0): input pixels [rx0, rx0 + rw) x [ry0, ry0 + rh), possibly empty.
template <typename acc_t>
__device__ __forceinline__ void tile_region(const Params& p, const Tiling& tl, int64_t ho0, int64_t wo0,
                                            int64_t& rx0, int64_t& ry0, int& rw, int& rh) {
  const acc_t s = static_cast<acc_t>(p.offset_scale);
  const int cw = p.dw * (p.kw - 1) / 2, ch = p.dh * (p.kh - 1) / 2;
  // Tap terms of point_base at the first and last tap along each axis; the others lie between.
  const acc_t tx_a = s * static_cast<acc_t>(-cw), tx_b = s * static_cast<acc_t>((p.kw - 1) * p.dw - cw);
  const acc_t ty_a = s * static_cast<acc_t>(-ch), ty_b = s * static_cast<acc_t>((p.kh - 1) * p.dh - ch);
  const int64_t wo1 = min(wo0 + tl.tw - 1, p.Wo - 1), ho1 = min(ho0 + tl.th - 1, p.Ho - 1);
  const acc_t xmin = static_cast<acc_t>(wo0 * p.sw - p.pw + cw) + min(tx_a, tx_b);
  const acc_t xmax = static_cast<acc_t>(wo1 * p.sw - p.pw + cw) + max(tx_a, tx_b);
  const acc_t ymin = static_cast<acc_t>(ho0 * p.sh - p.ph + ch) + min(ty_a, ty_b);
  const acc_t ymax = static_cast<acc_t>(ho1 * p.sh - p.ph + ch) + max(ty_a, ty_b);
  // Clamped as in bilinear() so that huge offset scales cannot overflow the integer conversion.
  const acc_t big = static_cast<acc_t>(p.H + p.W + 2);
  const auto pixel = [big](acc_t v) { return static_cast<int64_t>(floor_acc(v < -big ? -big : (v > big ? big : v))); };
  rx0 = max(pixel(xmin) - kTileMargin, int64_t{0});
  ry0 = max(pixel(ymin) - kTileMargin, int64_t{0});
  const int64_t rx1 = min(pixel(xmax) + 1 + kTileMargin, p.W - 1);
  const int64_t ry1 = min(pixel(ymax) + 1 + kTileMargin, p.H - 1);
  rw = static_cast<int>(max(min(rx1 - rx0 + 1, static_cast<int64_t>(tl.rw_cap)), int64_t{0}));
  rh = static_cast<int>(max(min(ry1 - ry0 + 1, static_cast<int64_t>(tl.rh_cap)), int64_t{0}));
}

// The tiled kernel's scatter: corners inside the block's region go to shared memory, the others to
// global memory.
template <typename G, typename acc_t, int V>
struct RegionScatter {
  acc_t* region;  // (rh, rw, D) in shared memory
  int64_t rx0, ry0;
  int rw, rh;
  int64_t D;
  GlobalScatter<G, acc_t, V> global;
  __device__ __forceinline__ void operator()(const Bilinear<acc_t>& b, int corner, int c,
                                             const acc_t (&add)[V]) const {
    const int64_t ry = b.y0 + (corner >> 1) - ry0, rx = b.x0 + (corner & 1) - rx0;
    if (ry >= 0 && ry < rh && rx >= 0 && rx < rw) {
      acc_t* dst = region + (ry * rw + rx) * D + c * V;
#pragma unroll
      for (int i = 0; i < V; ++i) atomicAdd(dst + i, add[i]);
    } else {
      global(b, corner, c, add);
    }
  }
};

template <typename scalar_t, int V, int KC>
__global__ void __launch_bounds__(kThreads, 3)
    backward_tiled_kernel(const Params p, const scalar_t* __restrict__ grad_output,
                          const scalar_t* __restrict__ value, const scalar_t* __restrict__ offset_mask,
                          typename GradAcc<scalar_t>::type* __restrict__ grad_value,
                          scalar_t* __restrict__ grad_offset_mask, int log2_lanes, int chunks, const Tiling tl) {
  using acc_t = typename Acc<scalar_t>::type;
  DCNV4_SHARED_ARRAY(acc_t, region);
  const int64_t C = p.G * p.D;

  // Block -> (n, g, tile); blocks of one image and group are consecutive.
  int64_t b = blockIdx.x;
  const int64_t tile_x = b % tl.tiles_x;
  b /= tl.tiles_x;
  const int64_t tile_y = b % tl.tiles_y;
  b /= tl.tiles_y;
  const int64_t g = b % p.G;
  const int64_t n = b / p.G;
  const int64_t ho0 = tile_y * tl.th, wo0 = tile_x * tl.tw;
  int64_t rx0, ry0;
  int rw, rh;
  tile_region<acc_t>(p, tl, ho0, wo0, rx0, ry0, rw, rh);
  const int region_size = rw * rh * static_cast<int>(p.D);
  for (int i = threadIdx.x; i < region_size; i += blockDim.x) region[i] = 0;
  __syncthreads();

  // Thread -> (task in the tile, lane). Tasks past the map's edge compute on the tile's first pixel
  // (so that their lanes reach every shuffle) and write nothing.
  const int local = static_cast<int>(threadIdx.x) >> log2_lanes;
  const int lane = static_cast<int>(threadIdx.x) & ((1 << log2_lanes) - 1);
  const int64_t ho_own = ho0 + local / tl.tw, wo_own = wo0 + local % tl.tw;
  const bool active = ho_own < p.Ho && wo_own < p.Wo;
  Task t;
  t.n = n;
  t.g = g;
  t.ho = active ? ho_own : ho0;
  t.wo = active ? wo_own : wo0;
  t.pix = (n * p.Ho + t.ho) * p.Wo + t.wo;
  using G = typename GradAcc<scalar_t>::type;
  G* gimg = grad_value + n * p.H * p.W * C + g * p.D;
  const RegionScatter<G, acc_t, V> scatter{region, rx0, ry0, rw, rh, p.D, GlobalScatter<G, acc_t, V>{gimg, C}};
  backward_task<scalar_t, V, KC>(p, t, lane, log2_lanes, chunks, active, grad_output, value, offset_mask,
                                 grad_offset_mask, scatter);
  __syncthreads();

  // The region into grad_value: one vector atomic per pixel and chunk that received something.
  const int region_chunks = rw * rh * chunks;
  for (int e = threadIdx.x; e < region_chunks; e += blockDim.x) {
    const int px = e / chunks, c = e - px * chunks;
    const acc_t* src = region + static_cast<int64_t>(px) * p.D + c * V;
    acc_t add[V];
    bool any = false;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      add[i] = src[i];
      any = any || add[i] != 0;
    }
    if (any) {
      const int64_t pixel = (ry0 + px / rw) * p.W + rx0 + px % rw;
      atomic_add_vec<V>(gimg + pixel * C + c * V, add);
    }
  }
}

int log2_ceil(int64_t x) {
  int l = 0;
  while ((int64_t{1} << l) < x) ++l;
  return l;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// The launch rule, the same for every shape: lanes per task = the chunk count rounded up to a power of
// two, at most a warp (wider tasks loop over their chunks); 256-thread blocks over all tasks x lanes,
// the grid capped so that huge inputs loop instead of overflowing the grid size.
struct Launch {
  int log2_lanes;
  int chunks;
  int64_t tasks;
  unsigned int blocks;
};

Launch plan(const Params& p, int V) {
  Launch l;
  l.chunks = static_cast<int>(p.D / V);
  l.log2_lanes = log2_ceil(l.chunks) < 5 ? log2_ceil(l.chunks) : 5;
  l.tasks = p.N * p.Ho * p.Wo * p.G;
  const int64_t blocks = ((l.tasks << l.log2_lanes) + kThreads - 1) / kThreads;
  const int64_t max_blocks = int64_t{1} << 30;
  l.blocks = static_cast<unsigned int>(blocks < max_blocks ? blocks : max_blocks);
  return l;
}

// Whether every index of a kernel fits int32_t with room for the grid-stride loop's last step: the
// elements of value (and grad_value), offset_mask (and its gradient) and output (and its gradient), and
// the threads over tasks x lanes, each under 2^30. -DDCNV4_FWD_INDEX64 builds the forward with int64_t
// indices always and -DDCNV4_BWD_INDEX64 the backward (the emulator tests those paths); with
// -DDCNV4_FWD_K_RUNTIME and -DDCNV4_BWD_K_RUNTIME too they are the kernels as they were before both
// (benchmarks/gpu_check.sh times them).
bool fits_int32(const Params& p, const Launch& l) {
  const int64_t limit = int64_t{1} << 30;
  const int64_t C = p.G * p.D;
  return p.N * p.H * p.W * C < limit && p.N * p.Ho * p.Wo * p.P < limit && p.N * p.Ho * p.Wo * C < limit &&
         (l.tasks << l.log2_lanes) + kThreads < limit;
}

// Whether K is 9, taps of a 3x3 kernel without remove_center, which both directions take at compile time.
bool is_k9(const Params& p) { return p.kh == 3 && p.kw == 3 && !p.remove_center; }

#ifdef DCNV4_FWD_INDEX64
constexpr bool kForwardInt32 = false;
#else
constexpr bool kForwardInt32 = true;
#endif
#ifdef DCNV4_FWD_K_RUNTIME
constexpr bool kForwardK9 = false;
#else
constexpr bool kForwardK9 = true;
#endif
#ifdef DCNV4_BWD_INDEX64
constexpr bool kBackwardInt32 = false;
#else
constexpr bool kBackwardInt32 = true;
#endif
#ifdef DCNV4_BWD_K_RUNTIME
constexpr bool kBackwardK9 = false;
#else
constexpr bool kBackwardK9 = true;
#endif

// The launch of one of a kernel's four builds: `launch(index, kc)` gets an index_t value (int32_t where
// `int32`, else int64_t) and std::integral_constant<int, 9> where `k9` (else 0) to instantiate the kernel with.
template <typename Launcher>
cudaError_t launch_build(bool int32, bool k9, Launcher&& launch) {
  using K9 = std::integral_constant<int, 9>;
  using KAny = std::integral_constant<int, 0>;
  if (int32) return k9 ? launch(int32_t{}, K9{}) : launch(int32_t{}, KAny{});
  return k9 ? launch(int64_t{}, K9{}) : launch(int64_t{}, KAny{});
}

// The forward's four builds: int32_t or int64_t indices, K a compile-time 9 (3x3, no remove_center) or any.
template <typename scalar_t, int V>
cudaError_t launch_forward(const Params& p, const void* value, const void* offset_mask, void* output,
                           cudaStream_t stream) {
  const Launch l = plan(p, V);
  return launch_build(kForwardInt32 && fits_int32(p, l), kForwardK9 && is_k9(p), [&](auto index, auto kc) {
    using index_t = decltype(index);
    DCNV4_LAUNCH(l.blocks, kThreads, 0, stream, forward_kernel<scalar_t, V, index_t, decltype(kc)::value>)(
        p, static_cast<const scalar_t*>(value), static_cast<const scalar_t*>(offset_mask),
        static_cast<scalar_t*>(output), l.log2_lanes, l.chunks, static_cast<index_t>(l.tasks));
    return cudaGetLastError();
  });
}

// The atomic backward's four builds, chosen as the forward's.
template <typename scalar_t, int V>
cudaError_t launch_backward(const Params& p, const void* grad_output, const void* value, const void* offset_mask,
                            void* grad_value_acc, void* grad_offset_mask, cudaStream_t stream) {
  const Launch l = plan(p, V);
  return launch_build(kBackwardInt32 && fits_int32(p, l), kBackwardK9 && is_k9(p), [&](auto index, auto kc) {
    using index_t = decltype(index);
    DCNV4_LAUNCH(l.blocks, kThreads, 0, stream, backward_kernel<scalar_t, V, index_t, decltype(kc)::value>)(
        p, static_cast<const scalar_t*>(grad_output), static_cast<const scalar_t*>(value),
        static_cast<const scalar_t*>(offset_mask), static_cast<typename GradAcc<scalar_t>::type*>(grad_value_acc),
        static_cast<scalar_t*>(grad_offset_mask), l.log2_lanes, l.chunks, static_cast<index_t>(l.tasks));
    return cudaGetLastError();
  });
}

// The tiled backward's launch: tiles of kThreads / lanes output pixels, as square as powers of two
// allow (16x16 with one lane per task down to 4x2 with 32); the shared region as large as the widest
// tile footprint plus the margins. False when the region does not fit kTileSharedBytes (wide groups,
// big kernels or offset scales) or the grid would be too large: the caller then uses the atomic kernel.
static_assert(kThreads == 256, "the tile shapes below assume 256 threads per block");

bool plan_tiles(const Params& p, int V, int acc_bytes, Launch& l, Tiling& tl, unsigned int& blocks,
                size_t& shared_bytes) {
  l = plan(p, V);
  if (!std::isfinite(p.offset_scale)) return false;
  const int log2_tasks = 8 - l.log2_lanes;
  tl.tw = 1 << ((log2_tasks + 1) / 2);
  tl.th = (1 << log2_tasks) / tl.tw;
  tl.tiles_x = (p.Wo + tl.tw - 1) / tl.tw;
  tl.tiles_y = (p.Ho + tl.th - 1) / tl.th;
  const double s = std::fabs(p.offset_scale);
  const double span_x = (tl.tw - 1) * static_cast<double>(p.sw) + s * (p.kw - 1) * p.dw;
  const double span_y = (tl.th - 1) * static_cast<double>(p.sh) + s * (p.kh - 1) * p.dh;
  const double rw = std::min(std::ceil(span_x) + 2 * kTileMargin + 3, static_cast<double>(p.W));
  const double rh = std::min(std::ceil(span_y) + 2 * kTileMargin + 3, static_cast<double>(p.H));
  const double bytes = rw * rh * static_cast<double>(p.D) * acc_bytes;
  const double grid = static_cast<double>(p.N) * p.G * tl.tiles_x * tl.tiles_y;
  if (bytes > kTileSharedBytes || grid >= 2147483647.0 || grid < 1) return false;
  tl.rw_cap = static_cast<int>(rw);
  tl.rh_cap = static_cast<int>(rh);
  blocks = static_cast<unsigned int>(grid);
  shared_bytes = static_cast<size_t>(bytes);
  return true;
}

template <typename scalar_t, int V>
cudaError_t launch_backward_variant(BackwardVariant variant, const Params& p, const void* grad_output,
                                    const void* value, const void* offset_mask, void* grad_value_acc,
                                    void* grad_offset_mask, cudaStream_t stream) {
  using acc_t = typename Acc<scalar_t>::type;
  Launch l;
  Tiling tl;
  unsigned int blocks;
  size_t shared_bytes;
  if (variant == BackwardVariant::kTiled &&
      plan_tiles(p, V, static_cast<int>(sizeof(acc_t)), l, tl, blocks, shared_bytes)) {
    const auto tiled = kBackwardK9 && is_k9(p) ? backward_tiled_kernel<scalar_t, V, 9>
                                                : backward_tiled_kernel<scalar_t, V, 0>;
    DCNV4_LAUNCH(blocks, kThreads, shared_bytes, stream, tiled)(
        p, static_cast<const scalar_t*>(grad_output), static_cast<const scalar_t*>(value),
        static_cast<const scalar_t*>(offset_mask), static_cast<typename GradAcc<scalar_t>::type*>(grad_value_acc),
        static_cast<scalar_t*>(grad_offset_mask), l.log2_lanes, l.chunks, tl);
    return cudaGetLastError();
  }
  return launch_backward<scalar_t, V>(p, grad_output, value, offset_mask, grad_value_acc, grad_offset_mask,
                                      stream);
}

// The 16-byte path needs whole vectors per group (D % V == 0) and 16-byte aligned bases; channel
// offsets are then multiples of V, so every vector access is aligned.
template <typename scalar_t, int V>
cudaError_t forward_typed(const Params& p, const void* value, const void* offset_mask, void* output,
                          cudaStream_t stream) {
  if (p.D % V == 0 && aligned16(value) && aligned16(output)) {
    return launch_forward<scalar_t, V>(p, value, offset_mask, output, stream);
  }
  return launch_forward<scalar_t, 1>(p, value, offset_mask, output, stream);
}

template <typename scalar_t, int V>
cudaError_t backward_typed(BackwardVariant variant, const Params& p, const void* grad_output, const void* value,
                           const void* offset_mask, void* grad_value_acc, void* grad_offset_mask,
                           cudaStream_t stream) {
  if (p.D % V == 0 && aligned16(grad_output) && aligned16(value) && aligned16(grad_value_acc)) {
    return launch_backward_variant<scalar_t, V>(variant, p, grad_output, value, offset_mask, grad_value_acc,
                                                grad_offset_mask, stream);
  }
  return launch_backward_variant<scalar_t, 1>(variant, p, grad_output, value, offset_mask, grad_value_acc,
                                              grad_offset_mask, stream);
}

}  // namespace

// Channels per lane of the fp32 forward: 4 (one 16-byte load a corner) unless built with DCNV4_FWD32_V=8
// (two, for groups of a multiple of 8 channels): a lane's point geometry then serves 8 channels.
#ifndef DCNV4_FWD32_V
#define DCNV4_FWD32_V 4
#endif
static_assert(DCNV4_FWD32_V == 4 || DCNV4_FWD32_V == 8, "DCNV4_FWD32_V must be 4 or 8");
// Channels per lane of the 16-bit forward: 8 (one 16-byte load a corner) unless built with DCNV4_FWD16_V=16
// (two, for groups of a multiple of 16 channels).
#ifndef DCNV4_FWD16_V
#define DCNV4_FWD16_V 8
#endif
static_assert(DCNV4_FWD16_V == 8 || DCNV4_FWD16_V == 16, "DCNV4_FWD16_V must be 8 or 16");

template <typename scalar_t>
cudaError_t forward16(const Params& p, const void* value, const void* offset_mask, void* output, cudaStream_t stream) {
  if (DCNV4_FWD16_V == 16 && p.D % 16 == 0 && aligned16(value) && aligned16(output)) {
    return launch_forward<scalar_t, DCNV4_FWD16_V>(p, value, offset_mask, output, stream);
  }
  return forward_typed<scalar_t, 8>(p, value, offset_mask, output, stream);
}

cudaError_t forward_cuda(const Params& p, DType dtype, const void* value, const void* offset_mask, void* output,
                         cudaStream_t stream) {
  if (p.N * p.Ho * p.Wo * p.G * p.D == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      if (DCNV4_FWD32_V == 8 && p.D % 8 == 0 && aligned16(value) && aligned16(output)) {
        return launch_forward<float, DCNV4_FWD32_V>(p, value, offset_mask, output, stream);
      }
      return forward_typed<float, 4>(p, value, offset_mask, output, stream);
    case DType::kFloat16:
      return forward16<__half>(p, value, offset_mask, output, stream);
    case DType::kBFloat16:
      return forward16<__nv_bfloat16>(p, value, offset_mask, output, stream);
    case DType::kFloat64:
      return launch_forward<double, 1>(p, value, offset_mask, output, stream);
  }
  return cudaErrorInvalidValue;
}

// Channels per lane of the 16-bit backward: 8 (one 16-byte load per lane) unless built with
// DCNV4_BWD16_V=4 (one 8-byte load per lane; UNET_DCNV4_NVCC_FLAGS=-DDCNV4_BWD16_V=4 builds it). At 16
// channels a group, 8 gives a task 2 lanes, whose float4 atomics each fill half of two 32-byte sectors;
// 4 gives it 4 lanes filling whole sectors, as the fp32 backward does. The first H100 run found the
// 16-bit backward 1.7x slower than the fp32 one; which width is faster is for a GPU run to measure
// (benchmarks/NOTES.md, "First GPU run").
#ifndef DCNV4_BWD16_V
#define DCNV4_BWD16_V 8
#endif
static_assert(DCNV4_BWD16_V == 4 || DCNV4_BWD16_V == 8, "DCNV4_BWD16_V must be 4 or 8");
// Channels per lane of the fp32 backward: 4 (one 16-byte load a corner, one float4 atomic) unless built with
// DCNV4_BWD32_V=8 (two of each, for groups of a multiple of 8 channels): a lane's point geometry then serves
// 8 channels, as the forward's DCNV4_FWD32_V=8.
#ifndef DCNV4_BWD32_V
#define DCNV4_BWD32_V 4
#endif
static_assert(DCNV4_BWD32_V == 4 || DCNV4_BWD32_V == 8, "DCNV4_BWD32_V must be 4 or 8");

bool backward16_accumulates_in_16bit() { return kAcc16; }

cudaError_t backward_cuda(const Params& p, DType dtype, const void* grad_output, const void* value,
                          const void* offset_mask, void* grad_value_acc, void* grad_offset_mask,
                          cudaStream_t stream, BackwardVariant variant) {
  if (p.N * p.Ho * p.Wo * p.G * p.D == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      if (DCNV4_BWD32_V == 8 && p.D % 8 == 0 && aligned16(grad_output) && aligned16(value) &&
          aligned16(grad_value_acc)) {
        return launch_backward_variant<float, DCNV4_BWD32_V>(variant, p, grad_output, value, offset_mask,
                                                             grad_value_acc, grad_offset_mask, stream);
      }
      return backward_typed<float, 4>(variant, p, grad_output, value, offset_mask, grad_value_acc, grad_offset_mask,
                                      stream);
    case DType::kFloat16:
      return backward_typed<__half, DCNV4_BWD16_V>(variant, p, grad_output, value, offset_mask, grad_value_acc,
                                                   grad_offset_mask, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16, DCNV4_BWD16_V>(variant, p, grad_output, value, offset_mask,
                                                          grad_value_acc, grad_offset_mask, stream);
    case DType::kFloat64:
      return launch_backward_variant<double, 1>(variant, p, grad_output, value, offset_mask, grad_value_acc,
                                                grad_offset_mask, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dcnv4
