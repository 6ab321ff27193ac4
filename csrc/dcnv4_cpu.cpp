// CPU kernels of DCNv4, forward and backward, for float32/float64/float16/bfloat16 (accumulating in
// float32, or float64 for float64).
//
// Both kernels walk output pixel -> group, and per (pixel, group) work in two stages: the K points'
// offsets and masks are read once and their bilinear footprints (four corner pixels and weights each)
// computed in one loop without branches, which the compiler vectorises over the points; then each point's
// four corners are combined over the group's channels, contiguous in memory. The channel loops have
// compile-time trip counts for the common group widths (4, 8, 16, 32, 64), so the accumulators stay in
// vector registers; other widths take a runtime loop. A corner outside the image reads a row of zeros
// (zero padding without a branch); in the backward it sends its gradient to a scratch row. With AVX2,
// the backward reduces the four corners' dot products together, and the 16-bit types' channel loops
// convert eight values at a time. The forward is parallel over output pixels; the backward over (image,
// group) pairs, each of which owns its slice of grad_value, so it needs no atomics and is deterministic,
// and it computes the value, offset and mask gradients in one pass. It works on a compact copy of the
// slice (value in, gradient summed in the accumulation type, then written out): a group's channels of
// neighbouring pixels lie C apart in memory, and at C >= 64 that layout made the 3x3 windows' rows evict
// each other from L1. Beyond their outputs the kernels allocate only that per-thread slice (backward) and
// stack scratch up to 64 points and 64 channels a group.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "dcnv4.h"
#include "dcnv4_torch.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DCNV4_CPU_AVX2 1
#endif

namespace dcnv4 {
namespace {

#ifdef DCNV4_CPU_AVX2
// Eight channels as float32, from float32, bfloat16 (the upper half of a float32's bits: widen and shift)
// or float16 (F16C). The compiler does not vectorise c10's scalar conversions of the 16-bit types, which
// left their channel loops at one element a step.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// The types whose channel loops take the AVX2 paths (those that accumulate in float32), at widths kD % 8 == 0.
template <typename scalar_t, int kD>
constexpr bool kAvx2Path = kD > 0 && kD % 8 == 0 &&
                           (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16> ||
                            std::is_same_v<scalar_t, c10::Half>);
#endif

// Calls f(std::integral_constant<int, kD>) with kD = D for the group widths that get loops of compile-time
// length (the accumulators then stay in registers), kD = 0 (runtime width) otherwise.
template <typename F>
void dispatch_width(int64_t D, F&& f) {
  switch (D) {
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

// The bilinear footprints of K points from their offsets `om` (the (dx, dy) pairs): one loop without
// branches over the points, which the compiler vectorises (its arrays are restrict parameters, which GCC
// trusts, unlike restrict locals). A point samples x = x_base + s * (tap_x + dx), as the reference
// computes it.
template <typename acc_t, typename scalar_t>
void fill_footprints(const scalar_t* __restrict__ om, int K, int32_t H, int32_t W, acc_t s, acc_t x_base, acc_t y_base,
                     const acc_t* __restrict__ tx, const acc_t* __restrict__ ty, acc_t* __restrict__ lx_,
                     acc_t* __restrict__ ly_, acc_t* __restrict__ w0, acc_t* __restrict__ w1, acc_t* __restrict__ w2,
                     acc_t* __restrict__ w3, int32_t* __restrict__ i0, int32_t* __restrict__ i1,
                     int32_t* __restrict__ i2, int32_t* __restrict__ i3) {
  const acc_t Hf = static_cast<acc_t>(H), Wf = static_cast<acc_t>(W);
  for (int k = 0; k < K; ++k) {
    const acc_t x = x_base + s * (tx[k] + static_cast<acc_t>(om[2 * k]));
    const acc_t y = y_base + s * (ty[k] + static_cast<acc_t>(om[2 * k + 1]));
    const acc_t xf = std::floor(x), yf = std::floor(y);
    const acc_t fx = x - xf, fy = y - yf;
    // Clamped before the integer conversion so that far-off positions cannot overflow it; NaN lands
    // outside. Written with selects and integer masks (no && or fmin) so that GCC vectorises the loop.
    const int32_t x0 = static_cast<int32_t>(xf > acc_t(-2) ? (xf < Wf ? xf : Wf) : acc_t(-2));
    const int32_t y0 = static_cast<int32_t>(yf > acc_t(-2) ? (yf < Hf ? yf : Hf) : acc_t(-2));
    // -1 (all bits) where the column or row lies outside the image, else 0.
    const int32_t out_x0 = -static_cast<int32_t>(x0 < 0) | -static_cast<int32_t>(x0 >= W);
    const int32_t out_x1 = -static_cast<int32_t>(x0 + 1 < 0) | -static_cast<int32_t>(x0 + 1 >= W);
    const int32_t out_y0 = -static_cast<int32_t>(y0 < 0) | -static_cast<int32_t>(y0 >= H);
    const int32_t out_y1 = -static_cast<int32_t>(y0 + 1 < 0) | -static_cast<int32_t>(y0 + 1 >= H);
    const int32_t top = y0 * W + x0;
    i0[k] = top | out_x0 | out_y0;
    i1[k] = (top + 1) | out_x1 | out_y0;
    i2[k] = (top + W) | out_x0 | out_y1;
    i3[k] = (top + W + 1) | out_x1 | out_y1;
    lx_[k] = fx;
    ly_[k] = fy;
    w0[k] = (1 - fy) * (1 - fx);
    w1[k] = (1 - fy) * fx;
    w2[k] = fy * (1 - fx);
    w3[k] = fy * fx;
  }
}

// Per-thread scratch of one kernel call, sized once per parallel chunk (on the stack up to 64 points
// and 64 channels): the K points' tap offsets from the window centre, and the footprints of the current
// (pixel, group)'s K points as fill_footprints leaves them. Corner c of point k = (y0 + (c >> 1),
// x0 + (c & 1)) is pixel idx[c][k] (y * W + x) of the image, or -1 when it lies outside; its bilinear
// weight is w[c][k]; lx, ly are the fractional parts of the sample's position.
template <typename acc_t, typename scalar_t>
struct PointTable {
  c10::SmallVector<acc_t, 8 * 64> f;
  c10::SmallVector<int32_t, 4 * 64> i;
  c10::SmallVector<scalar_t, 64> zero;  // D zeros: what a corner outside the image reads
  c10::SmallVector<acc_t, 4 * 64> dump;  // 4 x D: where the backward sends a corner outside's gradient
  acc_t *tap_x, *tap_y, *lx, *ly, *w[4];
  int32_t* idx[4];

  PointTable(const Params& p, bool backward) : f(8 * p.K), i(4 * p.K), zero(p.D, scalar_t(0)) {
    if (backward) dump.resize(4 * p.D);
    acc_t* rows[8];
    for (int r = 0; r < 8; ++r) rows[r] = f.data() + r * p.K;
    tap_x = rows[0], tap_y = rows[1], lx = rows[2], ly = rows[3];
    for (int c = 0; c < 4; ++c) {
      w[c] = rows[4 + c];
      idx[c] = i.data() + c * p.K;
    }
    // The points in the op's order: kernel x index outer, y index inner, centre skipped if asked.
    const int cw = p.dw * (p.kw - 1) / 2, ch = p.dh * (p.kh - 1) / 2;
    int k = 0;
    for (int ti = 0; ti < p.kw; ++ti) {
      for (int tj = 0; tj < p.kh; ++tj) {
        if (p.remove_center && ti == p.kw / 2 && tj == p.kh / 2) continue;
        tap_x[k] = static_cast<acc_t>(ti * p.dw - cw);
        tap_y[k] = static_cast<acc_t>(tj * p.dh - ch);
        ++k;
      }
    }
  }

  // The footprints of the K points of output pixel (ho, wo) from the group's offsets `om`.
  void fill(const Params& p, const scalar_t* om, int64_t ho, int64_t wo) {
    fill_footprints<acc_t, scalar_t>(
        om, p.K, static_cast<int32_t>(p.H), static_cast<int32_t>(p.W), static_cast<acc_t>(p.offset_scale),
        static_cast<acc_t>(wo * p.sw - p.pw + p.dw * (p.kw - 1) / 2),
        static_cast<acc_t>(ho * p.sh - p.ph + p.dh * (p.kh - 1) / 2), tap_x, tap_y, lx, ly, w[0], w[1], w[2], w[3],
        idx[0], idx[1], idx[2], idx[3]);
  }
};

// Forward of output pixels [begin, end), channels [c0, c0 + width) of every group (width == kD when
// kD > 0; at most kMaxBlock otherwise).
constexpr int64_t kMaxBlock = 64;

template <typename scalar_t, int kD>
void forward_pixels(const Params& p, const scalar_t* value, const scalar_t* offset_mask, scalar_t* output,
                    int64_t begin, int64_t end, int64_t c0, int64_t width_rt, PointTable<at::opmath_type<scalar_t>, scalar_t>& t) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kAcc = kD > 0 ? kD : kMaxBlock;
  const int64_t width = kD > 0 ? kD : width_rt;
  const int64_t C = p.G * p.D;
  const int K = p.K;
  const scalar_t* zero = t.zero.data();
  for (int64_t pix = begin; pix < end; ++pix) {
    const int64_t n = pix / (p.Ho * p.Wo);
    const int64_t ho = (pix / p.Wo) % p.Ho;
    const int64_t wo = pix % p.Wo;
    const scalar_t* v_img = value + n * p.H * p.W * C + c0;
    for (int64_t g = 0; g < p.G; ++g) {
      const scalar_t* om = offset_mask + pix * p.P + g * 3 * K;
      t.fill(p, om, ho, wo);
      const scalar_t* v_g = v_img + g * p.D;
      acc_t acc[kAcc];
      for (int64_t d = 0; d < width; ++d) acc[d] = 0;
      for (int k = 0; k < K; ++k) {
        const acc_t m = static_cast<acc_t>(om[2 * K + k]);
        const acc_t w0 = m * t.w[0][k], w1 = m * t.w[1][k], w2 = m * t.w[2][k], w3 = m * t.w[3][k];
        const int32_t i0 = t.idx[0][k], i1 = t.idx[1][k], i2 = t.idx[2][k], i3 = t.idx[3][k];
        const scalar_t* __restrict__ v0 = i0 >= 0 ? v_g + i0 * C : zero;
        const scalar_t* __restrict__ v1 = i1 >= 0 ? v_g + i1 * C : zero;
        const scalar_t* __restrict__ v2 = i2 >= 0 ? v_g + i2 * C : zero;
        const scalar_t* __restrict__ v3 = i3 >= 0 ? v_g + i3 * C : zero;
#ifdef DCNV4_CPU_AVX2
        if constexpr (kAvx2Path<scalar_t, kD> && !std::is_same_v<scalar_t, float>) {
          for (int64_t d = 0; d < kD; d += 8) {
            __m256 a = _mm256_loadu_ps(acc + d);
            a = _mm256_fmadd_ps(_mm256_set1_ps(w0), load8(v0 + d), a);
            a = _mm256_fmadd_ps(_mm256_set1_ps(w1), load8(v1 + d), a);
            a = _mm256_fmadd_ps(_mm256_set1_ps(w2), load8(v2 + d), a);
            a = _mm256_fmadd_ps(_mm256_set1_ps(w3), load8(v3 + d), a);
            _mm256_storeu_ps(acc + d, a);
          }
          continue;
        }
#endif
        // No `omp simd` here: it makes GCC emit a scalar loop for the compile-time widths, which it
        // otherwise unrolls and vectorises completely (float32 and float64).
        for (int64_t d = 0; d < width; ++d) {
          acc[d] += w0 * static_cast<acc_t>(v0[d]) + w1 * static_cast<acc_t>(v1[d]) +
                    w2 * static_cast<acc_t>(v2[d]) + w3 * static_cast<acc_t>(v3[d]);
        }
      }
      scalar_t* __restrict__ out = output + pix * C + c0 + g * p.D;
#pragma omp simd
      for (int64_t d = 0; d < width; ++d) out[d] = static_cast<scalar_t>(acc[d]);
    }
  }
}

// The kernels index an image's pixels with 32-bit integers.
inline void check_pixel_count(const Params& p) {
  TORCH_CHECK((p.H + 1) * (p.W + 1) < (int64_t(1) << 31), "value's images must have fewer than 2^31 pixels, got ",
              p.H, "x", p.W);
}

// Splits [0, n) over the threads in chunks of at least `grain`, each thread one contiguous chunk (the
// work per item is uniform, so equal chunks balance).
template <typename F>
void parallel_chunks(int64_t n, int64_t grain, F&& fn) {
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(grain, (n + threads - 1) / threads);
  at::parallel_for(0, n, chunk, fn);
}

template <typename scalar_t>
void forward_cpu_kernel(const Params& p, const scalar_t* value, const scalar_t* offset_mask, scalar_t* output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pixels = p.N * p.Ho * p.Wo;
  // About 40 us of work per chunk at the least: below that a second thread costs more than it saves.
  const int64_t work_per_pixel = std::max<int64_t>(1, p.G * p.K * (8 * p.D + 40));
  const int64_t grain = std::max<int64_t>(1, 200000 / work_per_pixel);
  dispatch_width(p.D, [&](auto kD_const) {
    constexpr int kD = decltype(kD_const)::value;
    parallel_chunks(pixels, grain, [&](int64_t begin, int64_t end) {
      PointTable<acc_t, scalar_t> table(p, /*backward=*/false);
      if (kD > 0) {
        forward_pixels<scalar_t, kD>(p, value, offset_mask, output, begin, end, 0, kD, table);
      } else {
        for (int64_t c0 = 0; c0 < p.D; c0 += kMaxBlock) {
          forward_pixels<scalar_t, 0>(p, value, offset_mask, output, begin, end, c0,
                                      std::min<int64_t>(kMaxBlock, p.D - c0), table);
        }
      }
    });
  });
}

#ifdef DCNV4_CPU_AVX2
// The backward's channel loop for groups of kD % 8 == 0 channels with AVX2 (kAvx2Path: value in float32,
// bfloat16 or float16; grad_out and grad_value rows in float32): adds coef[c] * grad_out to corner c's
// grad_value row and returns the four dot products <grad_out, corner c>, their lanes summed once for all
// four corners (three horizontal adds) instead of once per corner. The corners are updated one after the
// other, so corners clamped onto the same pixel stay right.
template <int kD, typename scalar_t>
inline __m128 corner_dots_avx2(const float* go, const scalar_t* const v[4], float* const gv[4], const float coef[4]) {
  __m256 dot[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int d = 0; d < kD; d += 8) {
    const __m256 g = _mm256_loadu_ps(go + d);
    for (int c = 0; c < 4; ++c) {
      dot[c] = _mm256_fmadd_ps(g, load8(v[c] + d), dot[c]);
      _mm256_storeu_ps(gv[c] + d, _mm256_fmadd_ps(_mm256_set1_ps(coef[c]), g, _mm256_loadu_ps(gv[c] + d)));
    }
  }
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(dot[0], dot[1]), _mm256_hadd_ps(dot[2], dot[3]));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}
#endif

// Per-thread scratch of the backward: the (image, group) slice being worked on, compact (D channels a
// pixel, not C). In (N, H, W, C) memory a group's pixels lie C channels apart, which for G >= 4 maps the
// corners of a 3x3 window onto a few L1 sets that the value and gradient rows then keep evicting from
// each other (measured: the same work took 1.6x as long at G = 4 as at G = 1, 2.3x at G = 8).
template <typename acc_t, typename scalar_t>
struct SliceScratch {
  std::vector<scalar_t> value;  // the slice of value (G > 1 only; with G = 1 value is read in place)
  std::vector<acc_t> grad;      // the slice's gradient, summed in acc_t

  explicit SliceScratch(const Params& p) : value(p.G > 1 ? p.H * p.W * p.D : 0), grad(p.H * p.W * p.D) {}
};

// Backward of image n, group g: writes grad_value's (n, g) slice and the offset and mask gradients of the
// group's K points at every output pixel of the image.
template <typename scalar_t, int kD>
void backward_image_group(const Params& p, const scalar_t* grad_output, const scalar_t* value,
                          const scalar_t* offset_mask, scalar_t* grad_value, scalar_t* grad_offset_mask, int64_t n,
                          int64_t g, PointTable<at::opmath_type<scalar_t>, scalar_t>& t,
                          SliceScratch<at::opmath_type<scalar_t>, scalar_t>& slice) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kGo = kD > 0 ? kD : 1;
  const int64_t D = kD > 0 ? kD : p.D;  // also the row stride of the compact slices
  const int64_t C = p.G * p.D;
  const int64_t pixels = p.H * p.W;
  const acc_t s = static_cast<acc_t>(p.offset_scale);
  const int K = p.K;
  const scalar_t* v_g = value + n * pixels * C;
  if (p.G > 1) {
    const scalar_t* src = v_g + g * D;
    scalar_t* dst = slice.value.data();
    for (int64_t i = 0; i < pixels; ++i) std::copy(src + i * C, src + i * C + D, dst + i * D);
    v_g = dst;
  }
  acc_t* gv_g = slice.grad.data();
  std::fill(gv_g, gv_g + pixels * D, acc_t(0));
  const scalar_t* zero = t.zero.data();
  for (int64_t ho = 0; ho < p.Ho; ++ho) {
    for (int64_t wo = 0; wo < p.Wo; ++wo) {
      const int64_t pix = (n * p.Ho + ho) * p.Wo + wo;
      const scalar_t* go_src = grad_output + pix * C + g * p.D;
      // With a compile-time width the incoming gradient is held in registers; otherwise it is read
      // from grad_output where used.
      acc_t go_reg[kGo];
      if (kD > 0) {
        for (int64_t d = 0; d < kGo; ++d) go_reg[d] = static_cast<acc_t>(go_src[d]);
      }
      auto go = [&](int64_t d) { return kD > 0 ? go_reg[d] : static_cast<acc_t>(go_src[d]); };
      const scalar_t* om = offset_mask + pix * p.P + g * 3 * K;
      t.fill(p, om, ho, wo);
      scalar_t* gom = grad_offset_mask + pix * p.P + g * 3 * K;
      for (int k = 0; k < K; ++k) {
        const acc_t m = static_cast<acc_t>(om[2 * K + k]);
        const int32_t i0 = t.idx[0][k], i1 = t.idx[1][k], i2 = t.idx[2][k], i3 = t.idx[3][k];
        // A corner outside the image reads zeros and sends its gradient to a scratch row of its own, so
        // the four corners never share memory.
        const scalar_t* __restrict__ v0 = i0 >= 0 ? v_g + i0 * D : zero;
        const scalar_t* __restrict__ v1 = i1 >= 0 ? v_g + i1 * D : zero;
        const scalar_t* __restrict__ v2 = i2 >= 0 ? v_g + i2 * D : zero;
        const scalar_t* __restrict__ v3 = i3 >= 0 ? v_g + i3 * D : zero;
        acc_t* __restrict__ gv0 = i0 >= 0 ? gv_g + i0 * D : t.dump.data();
        acc_t* __restrict__ gv1 = i1 >= 0 ? gv_g + i1 * D : t.dump.data() + D;
        acc_t* __restrict__ gv2 = i2 >= 0 ? gv_g + i2 * D : t.dump.data() + 2 * D;
        acc_t* __restrict__ gv3 = i3 >= 0 ? gv_g + i3 * D : t.dump.data() + 3 * D;
        const acc_t c0 = m * t.w[0][k], c1 = m * t.w[1][k], c2 = m * t.w[2][k], c3 = m * t.w[3][k];
        acc_t dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;  // <grad_out, corner c>, 0 outside
#ifdef DCNV4_CPU_AVX2
        if constexpr (kAvx2Path<scalar_t, kD>) {
          const scalar_t* const v[4] = {v0, v1, v2, v3};
          float* const gv[4] = {gv0, gv1, gv2, gv3};
          const float coef[4] = {c0, c1, c2, c3};
          alignas(16) float dots[4];
          _mm_store_ps(dots, corner_dots_avx2<kD, scalar_t>(go_reg, v, gv, coef));
          dot0 = dots[0], dot1 = dots[1], dot2 = dots[2], dot3 = dots[3];
        } else
#endif
        {
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
        for (int64_t d = 0; d < D; ++d) {
          const acc_t gd = go(d);
          dot0 += gd * static_cast<acc_t>(v0[d]);
          dot1 += gd * static_cast<acc_t>(v1[d]);
          dot2 += gd * static_cast<acc_t>(v2[d]);
          dot3 += gd * static_cast<acc_t>(v3[d]);
          gv0[d] += c0 * gd;
          gv1[d] += c1 * gd;
          gv2[d] += c2 * gd;
          gv3[d] += c3 * gd;
        }
        }
        // The derivatives of the weights (1 - ly or ly) * (1 - lx or lx) in x and y.
        const acc_t lx = t.lx[k], ly = t.ly[k];
        const acc_t grad_mask = t.w[0][k] * dot0 + t.w[1][k] * dot1 + t.w[2][k] * dot2 + t.w[3][k] * dot3;
        const acc_t grad_x = (1 - ly) * (dot1 - dot0) + ly * (dot3 - dot2);
        const acc_t grad_y = (1 - lx) * (dot2 - dot0) + lx * (dot3 - dot1);
        gom[2 * k] = static_cast<scalar_t>(m * grad_x * s);
        gom[2 * k + 1] = static_cast<scalar_t>(m * grad_y * s);
        gom[2 * K + k] = static_cast<scalar_t>(grad_mask);
      }
    }
  }
  scalar_t* out = grad_value + n * pixels * C + g * D;
  for (int64_t i = 0; i < pixels; ++i) {
    for (int64_t d = 0; d < D; ++d) out[i * C + d] = static_cast<scalar_t>(gv_g[i * D + d]);
  }
  // The last group also zeroes the image's padding channels of grad_offset_mask (past 3 * G * K), here
  // where its rows are in cache rather than by a strided fill of the whole tensor afterwards.
  const int64_t used = 3 * p.G * K;
  if (g == p.G - 1 && p.P > used) {
    scalar_t* row = grad_offset_mask + n * p.Ho * p.Wo * p.P;
    for (int64_t i = 0; i < p.Ho * p.Wo; ++i) std::fill(row + i * p.P + used, row + (i + 1) * p.P, scalar_t(0));
  }
}

// Writes every element of grad_value (N, H, W, C) and of grad_offset_mask (zeros in its padding channels).
template <typename scalar_t>
void backward_cpu_kernel(const Params& p, const scalar_t* grad_output, const scalar_t* value,
                         const scalar_t* offset_mask, scalar_t* grad_value, scalar_t* grad_offset_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  dispatch_width(p.D, [&](auto kD_const) {
    constexpr int kD = decltype(kD_const)::value;
    parallel_chunks(p.N * p.G, 1, [&](int64_t begin, int64_t end) {
      PointTable<acc_t, scalar_t> table(p, /*backward=*/true);
      SliceScratch<acc_t, scalar_t> slice(p);
      for (int64_t ng = begin; ng < end; ++ng) {
        backward_image_group<scalar_t, kD>(p, grad_output, value, offset_mask, grad_value, grad_offset_mask,
                                           ng / p.G, ng % p.G, table, slice);
      }
    });
  });
}

at::Tensor dcnv4_forward_cpu(const at::Tensor& value_in, const at::Tensor& offset_mask_in,
                             at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, double offset_scale, bool remove_center,
                             c10::string_view cuda_backward) {
  tiled_backward(cuda_backward);  // checked only: the CPU has one backward
  const at::Tensor value = value_in.contiguous();
  const at::Tensor offset_mask = offset_mask_in.contiguous();
  const Params p =
      make_params(value, offset_mask, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center);
  check_pixel_count(p);
  at::Tensor output = at::empty({p.N, p.Ho, p.Wo, p.G * p.D}, value.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "dcnv4_forward_cpu", [&] {
    forward_cpu_kernel<scalar_t>(p, value.const_data_ptr<scalar_t>(), offset_mask.const_data_ptr<scalar_t>(),
                                 output.mutable_data_ptr<scalar_t>());
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> dcnv4_backward_cpu(const at::Tensor& grad_output_in, const at::Tensor& value_in,
                                                      const at::Tensor& offset_mask_in, at::IntArrayRef kernel_size,
                                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, int64_t groups, double offset_scale,
                                                      bool remove_center, c10::string_view cuda_backward) {
  tiled_backward(cuda_backward);  // checked only: the CPU has one backward
  const at::Tensor value = value_in.contiguous();
  const at::Tensor offset_mask = offset_mask_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous();
  const Params p =
      make_params(value, offset_mask, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center);
  check_grad_output(grad_output, value, p);
  check_pixel_count(p);
  // The kernel writes every element of both (zeros where no sample reaches, and in grad_offset_mask's
  // padding channels), so no zero fill first.
  at::Tensor grad_offset_mask = at::empty_like(offset_mask);
  at::Tensor grad_value = at::empty_like(value);
  if (grad_output.numel() == 0) {
    grad_value.zero_();  // no output pixels: nothing samples value (and grad_offset_mask is empty)
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "dcnv4_backward_cpu", [&] {
      backward_cpu_kernel<scalar_t>(p, grad_output.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
                                    offset_mask.const_data_ptr<scalar_t>(),
                                    grad_value.mutable_data_ptr<scalar_t>(),
                                    grad_offset_mask.mutable_data_ptr<scalar_t>());
    });
  }
  return {grad_value, grad_offset_mask};
}

}  // namespace
}  // namespace dcnv4

TORCH_LIBRARY_IMPL(unet_dcnv4, CPU, m) {
  m.impl("dcnv4_forward", &dcnv4::dcnv4_forward_cpu);
  m.impl("dcnv4_backward", &dcnv4::dcnv4_backward_cpu);
}
