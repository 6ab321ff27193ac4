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

#include "dcnv4_cuda.h"

// Kernel launches go through this macro so that tests/emulator can run the kernels on a CPU.
#ifndef DCNV4_LAUNCH
#define DCNV4_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
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
// V = 1 is the scalar path (any D, any alignment); the other widths move 16 bytes at once and need
// 16-byte aligned addresses, which the launcher guarantees before choosing them.
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

// 8 half-precision channels travel as one uint4; each 32-bit word is a pair converted at once.
template <>
struct VecIO<__half, 8> {
  static __device__ __forceinline__ void load(const __half* p, float (&o)[8]) {
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
    const unsigned int w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      *reinterpret_cast<unsigned int*>(&h) = w[i];
      const float2 f = __half22float2(h);
      o[2 * i] = f.x;
      o[2 * i + 1] = f.y;
    }
  }
  static __device__ __forceinline__ void store(__half* p, const float (&o)[8]) {
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half2 h = __floats2half2_rn(o[2 * i], o[2 * i + 1]);
      w[i] = *reinterpret_cast<const unsigned int*>(&h);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct VecIO<__nv_bfloat16, 8> {
  static __device__ __forceinline__ void load(const __nv_bfloat16* p, float (&o)[8]) {
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
    const unsigned int w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __nv_bfloat162 h;
      *reinterpret_cast<unsigned int*>(&h) = w[i];
      const float2 f = __bfloat1622float2(h);
      o[2 * i] = f.x;
      o[2 * i + 1] = f.y;
    }
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, const float (&o)[8]) {
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(o[2 * i], o[2 * i + 1]);
      w[i] = *reinterpret_cast<const unsigned int*>(&h);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};

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

// Where one task's data lives: the task's offset/mask triplets, its image in value (already moved
// to the group's first channel) and its output pixel.
struct Task {
  int64_t n, ho, wo, g, pix;
};

__device__ __forceinline__ Task task_of(const Params& p, int64_t q) {
  Task t;
  t.g = q % p.G;
  t.pix = q / p.G;  // (n * Ho + ho) * Wo + wo
  t.wo = t.pix % p.Wo;
  const int64_t r = t.pix / p.Wo;
  t.ho = r % p.Ho;
  t.n = r / p.Ho;
  return t;
}

// Sampling position and mask of point k of a task; `om` points at the task's 3K channels.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Bilinear<acc_t> sample_point(const Params& p, const Task& t, const scalar_t* om, int k,
                                                        acc_t& mask) {
  acc_t x, y;
  point_base(p, t.ho, t.wo, k, x, y);
  const acc_t s = static_cast<acc_t>(p.offset_scale);
  x += s * load1(om + 2 * k);
  y += s * load1(om + 2 * k + 1);
  mask = load1(om + 2 * p.K + k);
  return bilinear(x, y, p.H, p.W);
}

// out[task, chunk] = sum_k mask_k * bilinear sample of point k. Each lane keeps V accumulators; the
// point loop is unrolled so that the four corner loads of several points are in flight together.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads) forward_kernel(const Params p, const scalar_t* __restrict__ value,
                                                           const scalar_t* __restrict__ offset_mask,
                                                           scalar_t* __restrict__ output, int log2_lanes, int chunks,
                                                           int64_t tasks) {
  using acc_t = typename Acc<scalar_t>::type;
  const int lanes = 1 << log2_lanes;
  const int64_t C = p.G * p.D;
  const int64_t total = tasks << log2_lanes;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; tid < total; tid += step) {
    const int64_t q = tid >> log2_lanes;
    const int lane = static_cast<int>(tid & (lanes - 1));
    const Task t = task_of(p, q);
    const scalar_t* om = offset_mask + t.pix * p.P + t.g * 3 * p.K;
    const scalar_t* img = value + t.n * p.H * p.W * C + t.g * p.D;
    scalar_t* out = output + t.pix * C + t.g * p.D;
    for (int c = lane; c < chunks; c += lanes) {
      acc_t acc[V];
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = 0;
#pragma unroll 2
      for (int k = 0; k < p.K; ++k) {
        acc_t m;
        const Bilinear<acc_t> b = sample_point(p, t, om, k, m);
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (!b.inside[corner]) continue;
          acc_t v[V];
          VecIO<scalar_t, V>::load(img + b.idx[corner] * C + c * V, v);
          const acc_t w = m * b.w[corner];
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

// Backward of one task. Per point: grad_value at the four corners gets mask * weight * grad_out
// (atomics: points of neighbouring tasks hit the same pixels); the mask's gradient is
// <grad_out, sample> and the offsets' gradients are mask * offset_scale * <grad_out, d sample / d x>,
// dot products over D that each lane computes for its chunks and the task's lanes then sum with
// shuffles, so grad_offset_mask is written once, without atomics, by the task's first lane.
// Warps walk the grid together (the loop bound is the warp's first thread) so that every lane reaches
// every shuffle; lanes past the end compute on task 0 and write nothing.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const Params p, const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                    const scalar_t* __restrict__ offset_mask, typename Acc<scalar_t>::type* __restrict__ grad_value,
                    scalar_t* __restrict__ grad_offset_mask, int log2_lanes, int chunks, int64_t tasks) {
  using acc_t = typename Acc<scalar_t>::type;
  const int lanes = 1 << log2_lanes;
  const int per_lane = (chunks + lanes - 1) >> log2_lanes;
  const int64_t C = p.G * p.D;
  const int64_t total = tasks << log2_lanes;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const acc_t s = static_cast<acc_t>(p.offset_scale);
  for (int64_t warp0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31); warp0 < total;
       warp0 += step) {
    const int64_t tid = warp0 + (threadIdx.x & 31);
    const bool active = tid < total;
    const int64_t q = active ? tid >> log2_lanes : 0;
    const int lane = static_cast<int>(tid & (lanes - 1));
    const Task t = task_of(p, q);
    const scalar_t* om = offset_mask + t.pix * p.P + t.g * 3 * p.K;
    scalar_t* gom = grad_offset_mask + t.pix * p.P + t.g * 3 * p.K;
    const scalar_t* img = value + t.n * p.H * p.W * C + t.g * p.D;
    acc_t* gimg = grad_value + t.n * p.H * p.W * C + t.g * p.D;
    const scalar_t* gout = grad_output + t.pix * C + t.g * p.D;
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
      for (int k = 0; k < p.K; ++k) {
        acc_t m;
        const Bilinear<acc_t> b = sample_point(p, t, om, k, m);
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
              acc_t add[V];
#pragma unroll
              for (int i = 0; i < V; ++i) add[i] = w * go[i];
              atomic_add_vec<V>(gimg + b.idx[corner] * C + c * V, add);
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
            gm += to_acc(gom[2 * p.K + k]);
          }
          gom[2 * k] = narrow<scalar_t>(gdx);
          gom[2 * k + 1] = narrow<scalar_t>(gdy);
          gom[2 * p.K + k] = narrow<scalar_t>(gm);
        }
      }
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

template <typename scalar_t, int V>
cudaError_t launch_forward(const Params& p, const void* value, const void* offset_mask, void* output,
                           cudaStream_t stream) {
  const Launch l = plan(p, V);
  DCNV4_LAUNCH(l.blocks, kThreads, stream, forward_kernel<scalar_t, V>)(
      p, static_cast<const scalar_t*>(value), static_cast<const scalar_t*>(offset_mask),
      static_cast<scalar_t*>(output), l.log2_lanes, l.chunks, l.tasks);
  return cudaGetLastError();
}

template <typename scalar_t, int V>
cudaError_t launch_backward(const Params& p, const void* grad_output, const void* value, const void* offset_mask,
                            void* grad_value_acc, void* grad_offset_mask, cudaStream_t stream) {
  using acc_t = typename Acc<scalar_t>::type;
  const Launch l = plan(p, V);
  DCNV4_LAUNCH(l.blocks, kThreads, stream, backward_kernel<scalar_t, V>)(
      p, static_cast<const scalar_t*>(grad_output), static_cast<const scalar_t*>(value),
      static_cast<const scalar_t*>(offset_mask), static_cast<acc_t*>(grad_value_acc),
      static_cast<scalar_t*>(grad_offset_mask), l.log2_lanes, l.chunks, l.tasks);
  return cudaGetLastError();
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
cudaError_t backward_typed(const Params& p, const void* grad_output, const void* value, const void* offset_mask,
                           void* grad_value_acc, void* grad_offset_mask, cudaStream_t stream) {
  if (p.D % V == 0 && aligned16(grad_output) && aligned16(value) && aligned16(grad_value_acc)) {
    return launch_backward<scalar_t, V>(p, grad_output, value, offset_mask, grad_value_acc, grad_offset_mask,
                                        stream);
  }
  return launch_backward<scalar_t, 1>(p, grad_output, value, offset_mask, grad_value_acc, grad_offset_mask,
                                      stream);
}

}  // namespace

cudaError_t forward_cuda(const Params& p, DType dtype, const void* value, const void* offset_mask, void* output,
                         cudaStream_t stream) {
  if (p.N * p.Ho * p.Wo * p.G * p.D == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return forward_typed<float, 4>(p, value, offset_mask, output, stream);
    case DType::kFloat16:
      return forward_typed<__half, 8>(p, value, offset_mask, output, stream);
    case DType::kBFloat16:
      return forward_typed<__nv_bfloat16, 8>(p, value, offset_mask, output, stream);
    case DType::kFloat64:
      return launch_forward<double, 1>(p, value, offset_mask, output, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t backward_cuda(const Params& p, DType dtype, const void* grad_output, const void* value,
                          const void* offset_mask, void* grad_value_acc, void* grad_offset_mask,
                          cudaStream_t stream) {
  if (p.N * p.Ho * p.Wo * p.G * p.D == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed<float, 4>(p, grad_output, value, offset_mask, grad_value_acc, grad_offset_mask, stream);
    case DType::kFloat16:
      return backward_typed<__half, 8>(p, grad_output, value, offset_mask, grad_value_acc, grad_offset_mask, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16, 8>(p, grad_output, value, offset_mask, grad_value_acc, grad_offset_mask,
                                              stream);
    case DType::kFloat64:
      return launch_backward<double, 1>(p, grad_output, value, offset_mask, grad_value_acc, grad_offset_mask,
                                        stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dcnv4
