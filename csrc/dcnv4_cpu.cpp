// CPU kernels of DCNv4, forward and backward, for float32/float64/float16/bfloat16 (accumulating in
// float32, or float64 for float64).
//
// Both kernels walk output pixel -> group -> sampling point and, per point, read the offsets and the
// mask once and compute the bilinear footprint once (four corner weights, the mask folded in), then run
// over the group's channels, contiguous in memory. The channel loops have compile-time trip counts for
// the common group widths (4, 8, 16, 32, 64), so the accumulators stay in vector registers; other widths
// take a runtime loop. The forward is parallel over output pixels; the backward over (image, group)
// pairs, each of which owns its slice of grad_value, so it needs no atomics and is deterministic, and
// computes the value, offset and mask gradients in one pass. Neither allocates per call beyond its
// outputs (and, for 16-bit types, the float32 buffer grad_value is summed in).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>

#include "dcnv4.h"
#include "dcnv4_torch.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DCNV4_CPU_AVX2 1
#endif

namespace dcnv4 {
namespace {

// Widest channel block the runtime-width forward keeps in its stack accumulator.
constexpr int64_t kMaxBlock = 64;

// Calls f(std::integral_constant<int, kD>) with kD = D for the widths that get unrolled loops, kD = 0
// (runtime width) otherwise.
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

// The bilinear footprint of one sample. Corner c = (y0 + (c >> 1), x0 + (c & 1)) has weight w[c], zero
// when the corner lies outside the image, and element offset off[c] into the image's group; a corner
// outside is clamped onto the image, so that every corner is safe to read and its zero weight drops it
// (as the reference's clamped gather does). ix[e] / iy[e] are 1 when column x0 + e / row y0 + e lies
// inside the image, else 0; all_in says all four corners do.
template <typename acc_t>
struct Footprint {
  int64_t off[4];
  acc_t w[4];
  acc_t ix[2], iy[2];
  acc_t lx, ly;  // fractional parts of x and y
  bool all_in;
};

// Fills f for the sample at (x, y); returns false, leaving f unset, when no corner lies inside the image
// (or x or y is NaN): the sample is then zero.
template <typename acc_t>
inline bool footprint(acc_t x, acc_t y, int64_t H, int64_t W, int64_t C, Footprint<acc_t>& f) {
  const acc_t xf = std::floor(x), yf = std::floor(y);
  if (!(xf >= -1 && xf < static_cast<acc_t>(W) && yf >= -1 && yf < static_cast<acc_t>(H))) return false;
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
  f.lx = x - xf;
  f.ly = y - yf;
  const bool x_in0 = x0 >= 0, x_in1 = x0 + 1 < W, y_in0 = y0 >= 0, y_in1 = y0 + 1 < H;
  f.all_in = x_in0 && x_in1 && y_in0 && y_in1;
  f.ix[0] = x_in0 ? 1 : 0;
  f.ix[1] = x_in1 ? 1 : 0;
  f.iy[0] = y_in0 ? 1 : 0;
  f.iy[1] = y_in1 ? 1 : 0;
  const int64_t cx0 = x_in0 ? x0 : 0, cx1 = x_in1 ? x0 + 1 : W - 1;
  const int64_t row0 = (y_in0 ? y0 : 0) * W, row1 = (y_in1 ? y0 + 1 : H - 1) * W;
  f.off[0] = (row0 + cx0) * C;
  f.off[1] = (row0 + cx1) * C;
  f.off[2] = (row1 + cx0) * C;
  f.off[3] = (row1 + cx1) * C;
  const acc_t wx0 = (1 - f.lx) * f.ix[0], wx1 = f.lx * f.ix[1];
  const acc_t wy0 = (1 - f.ly) * f.iy[0], wy1 = f.ly * f.iy[1];
  f.w[0] = wy0 * wx0;
  f.w[1] = wy0 * wx1;
  f.w[2] = wy1 * wx0;
  f.w[3] = wy1 * wx1;
  return true;
}

// What every pixel shares: the channels C = G * D and the window centre's offset (c_w, c_h).
struct Geometry {
  int64_t C;
  int cw, ch;
};

inline Geometry geometry(const Params& p) {
  return {p.G * p.D, p.dw * (p.kw - 1) / 2, p.dh * (p.kh - 1) / 2};
}

// Advances (i, j) to the next point's kernel tap in the op's order: x index i outer, y index j inner,
// the centre skipped when remove_center. Start from (0, -1). Point k's sample at output (ho, wo) lies
// at x = x_base + s * (tap_x + dx), tap_x = i * dil_w - c_w, as the reference computes it.
inline void next_tap(const Params& p, int& i, int& j) {
  if (++j == p.kh) {
    j = 0;
    ++i;
  }
  if (p.remove_center && i == p.kw / 2 && j == p.kh / 2 && ++j == p.kh) {
    j = 0;
    ++i;
  }
}

// Forward of output pixels [begin, end), channels [c0, c0 + width) of every group (width == kD when
// kD > 0).
template <typename scalar_t, int kD>
void forward_pixels(const Params& p, const scalar_t* value, const scalar_t* offset_mask, scalar_t* output,
                    int64_t begin, int64_t end, int64_t c0, int64_t width_rt) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kAcc = kD > 0 ? kD : kMaxBlock;
  const int64_t width = kD > 0 ? kD : width_rt;
  const Geometry geo = geometry(p);
  const acc_t s = static_cast<acc_t>(p.offset_scale);
  const int K = p.K;
  for (int64_t pix = begin; pix < end; ++pix) {
    const int64_t n = pix / (p.Ho * p.Wo);
    const int64_t ho = (pix / p.Wo) % p.Ho;
    const int64_t wo = pix % p.Wo;
    const acc_t x_base = static_cast<acc_t>(wo * p.sw - p.pw + geo.cw);
    const acc_t y_base = static_cast<acc_t>(ho * p.sh - p.ph + geo.ch);
    const scalar_t* v_img = value + n * p.H * p.W * geo.C + c0;
    const scalar_t* om_pix = offset_mask + pix * p.P;
    scalar_t* out_pix = output + pix * geo.C + c0;
    for (int64_t g = 0; g < p.G; ++g) {
      const scalar_t* om = om_pix + g * 3 * K;
      const scalar_t* v_g = v_img + g * p.D;
      acc_t acc[kAcc];
      for (int64_t d = 0; d < width; ++d) acc[d] = 0;
      int i = 0, j = -1;
      for (int k = 0; k < K; ++k) {
        next_tap(p, i, j);
        const acc_t tap_x = static_cast<acc_t>(i * p.dw - geo.cw), tap_y = static_cast<acc_t>(j * p.dh - geo.ch);
        const acc_t x = x_base + s * (tap_x + static_cast<acc_t>(om[2 * k]));
        const acc_t y = y_base + s * (tap_y + static_cast<acc_t>(om[2 * k + 1]));
        Footprint<acc_t> f;
        if (!footprint(x, y, p.H, p.W, geo.C, f)) continue;
        const acc_t m = static_cast<acc_t>(om[2 * K + k]);
        const acc_t w0 = m * f.w[0], w1 = m * f.w[1], w2 = m * f.w[2], w3 = m * f.w[3];
        const scalar_t* __restrict__ v0 = v_g + f.off[0];
        const scalar_t* __restrict__ v1 = v_g + f.off[1];
        const scalar_t* __restrict__ v2 = v_g + f.off[2];
        const scalar_t* __restrict__ v3 = v_g + f.off[3];
#pragma omp simd
        for (int64_t d = 0; d < width; ++d) {
          acc[d] += w0 * static_cast<acc_t>(v0[d]) + w1 * static_cast<acc_t>(v1[d]) +
                    w2 * static_cast<acc_t>(v2[d]) + w3 * static_cast<acc_t>(v3[d]);
        }
      }
      scalar_t* __restrict__ out = out_pix + g * p.D;
#pragma omp simd
      for (int64_t d = 0; d < width; ++d) out[d] = static_cast<scalar_t>(acc[d]);
    }
  }
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
  const int64_t pixels = p.N * p.Ho * p.Wo;
  // About 40 us of work per chunk at the least: below that a second thread costs more than it saves.
  const int64_t work_per_pixel = std::max<int64_t>(1, p.G * p.K * (8 * p.D + 40));
  const int64_t grain = std::max<int64_t>(1, 200000 / work_per_pixel);
  dispatch_width(p.D, [&](auto kD_const) {
    constexpr int kD = decltype(kD_const)::value;
    parallel_chunks(pixels, grain, [&](int64_t begin, int64_t end) {
      if (kD > 0) {
        forward_pixels<scalar_t, kD>(p, value, offset_mask, output, begin, end, 0, kD);
      } else {
        for (int64_t c0 = 0; c0 < p.D; c0 += kMaxBlock) {
          forward_pixels<scalar_t, 0>(p, value, offset_mask, output, begin, end, c0,
                                      std::min<int64_t>(kMaxBlock, p.D - c0));
        }
      }
    });
  });
}

#ifdef DCNV4_CPU_AVX2
// The backward's channel loop for float32 groups of kD % 8 == 0 channels with AVX2: adds coef[c] *
// grad_out to corner c's grad_value row and returns the four dot products <grad_out, corner c>, their
// lanes summed once for all four corners (three horizontal adds) instead of once per corner. The corners
// are updated one after the other, so corners clamped onto the same pixel stay right.
template <int kD>
inline __m128 corner_dots_avx2(const float* go, const float* const v[4], float* const gv[4], const float coef[4]) {
  __m256 dot[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int d = 0; d < kD; d += 8) {
    const __m256 g = _mm256_loadu_ps(go + d);
    for (int c = 0; c < 4; ++c) {
      dot[c] = _mm256_fmadd_ps(g, _mm256_loadu_ps(v[c] + d), dot[c]);
      _mm256_storeu_ps(gv[c] + d, _mm256_fmadd_ps(_mm256_set1_ps(coef[c]), g, _mm256_loadu_ps(gv[c] + d)));
    }
  }
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(dot[0], dot[1]), _mm256_hadd_ps(dot[2], dot[3]));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}
#endif

// Backward of image n, group g: adds to grad_value's (n, g) slice (acc_t, zero on entry) and writes
// the offset and mask gradients of the group's K points at every output pixel of the image.
template <typename scalar_t, int kD>
void backward_image_group(const Params& p, const scalar_t* grad_output, const scalar_t* value,
                          const scalar_t* offset_mask, at::opmath_type<scalar_t>* grad_value_acc,
                          scalar_t* grad_offset_mask, int64_t n, int64_t g) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kGo = kD > 0 ? kD : 1;
  const int64_t D = kD > 0 ? kD : p.D;
  const Geometry geo = geometry(p);
  const acc_t s = static_cast<acc_t>(p.offset_scale);
  const int K = p.K;
  const scalar_t* v_g = value + n * p.H * p.W * geo.C + g * p.D;
  acc_t* gv_g = grad_value_acc + n * p.H * p.W * geo.C + g * p.D;
  for (int64_t ho = 0; ho < p.Ho; ++ho) {
    for (int64_t wo = 0; wo < p.Wo; ++wo) {
      const int64_t pix = (n * p.Ho + ho) * p.Wo + wo;
      const acc_t x_base = static_cast<acc_t>(wo * p.sw - p.pw + geo.cw);
      const acc_t y_base = static_cast<acc_t>(ho * p.sh - p.ph + geo.ch);
      const scalar_t* go_src = grad_output + pix * geo.C + g * p.D;
      // With a compile-time width the incoming gradient is held in registers; otherwise it is read
      // from grad_output where used.
      acc_t go_reg[kGo];
      if (kD > 0) {
        for (int64_t d = 0; d < kGo; ++d) go_reg[d] = static_cast<acc_t>(go_src[d]);
      }
      auto go = [&](int64_t d) { return kD > 0 ? go_reg[d] : static_cast<acc_t>(go_src[d]); };
      const scalar_t* om = offset_mask + pix * p.P + g * 3 * K;
      scalar_t* gom = grad_offset_mask + pix * p.P + g * 3 * K;
      int i = 0, j = -1;
      for (int k = 0; k < K; ++k) {
        next_tap(p, i, j);
        const acc_t tap_x = static_cast<acc_t>(i * p.dw - geo.cw), tap_y = static_cast<acc_t>(j * p.dh - geo.ch);
        const acc_t x = x_base + s * (tap_x + static_cast<acc_t>(om[2 * k]));
        const acc_t y = y_base + s * (tap_y + static_cast<acc_t>(om[2 * k + 1]));
        const acc_t m = static_cast<acc_t>(om[2 * K + k]);
        Footprint<acc_t> f;
        if (!footprint(x, y, p.H, p.W, geo.C, f)) {
          gom[2 * k] = gom[2 * k + 1] = gom[2 * K + k] = static_cast<scalar_t>(0);
          continue;
        }
        const acc_t c0 = m * f.w[0], c1 = m * f.w[1], c2 = m * f.w[2], c3 = m * f.w[3];
        const scalar_t* __restrict__ v0 = v_g + f.off[0];
        const scalar_t* __restrict__ v1 = v_g + f.off[1];
        const scalar_t* __restrict__ v2 = v_g + f.off[2];
        const scalar_t* __restrict__ v3 = v_g + f.off[3];
        acc_t dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;  // <grad_out, corner c>
#ifdef DCNV4_CPU_AVX2
        if constexpr (std::is_same_v<scalar_t, float> && kD > 0 && kD % 8 == 0) {
          // Corners outside are clamped onto the image with zero weight; their dot products are masked.
          const float* const v[4] = {v0, v1, v2, v3};
          float* const gv[4] = {gv_g + f.off[0], gv_g + f.off[1], gv_g + f.off[2], gv_g + f.off[3]};
          const float coef[4] = {c0, c1, c2, c3};
          alignas(16) float dots[4];
          _mm_store_ps(dots, corner_dots_avx2<kD>(go_reg, v, gv, coef));
          dot0 = dots[0] * f.ix[0] * f.iy[0];
          dot1 = dots[1] * f.ix[1] * f.iy[0];
          dot2 = dots[2] * f.ix[0] * f.iy[1];
          dot3 = dots[3] * f.ix[1] * f.iy[1];
        } else
#endif
        if (f.all_in) {
          acc_t* __restrict__ gv0 = gv_g + f.off[0];
          acc_t* __restrict__ gv1 = gv_g + f.off[1];
          acc_t* __restrict__ gv2 = gv_g + f.off[2];
          acc_t* __restrict__ gv3 = gv_g + f.off[3];
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
        } else {
          // Corners clamped onto the image can share a pixel: one corner after the other, each only
          // where it lies inside.
          const acc_t coef[4] = {c0, c1, c2, c3};
          acc_t* dot[4] = {&dot0, &dot1, &dot2, &dot3};
          for (int c = 0; c < 4; ++c) {
            if (f.ix[c & 1] * f.iy[c >> 1] == 0) continue;
            const scalar_t* __restrict__ v = v_g + f.off[c];
            acc_t* __restrict__ gv = gv_g + f.off[c];
            const acc_t cc = coef[c];
            acc_t dc = 0;
#pragma omp simd reduction(+ : dc)
            for (int64_t d = 0; d < D; ++d) {
              const acc_t gd = go(d);
              dc += gd * static_cast<acc_t>(v[d]);
              gv[d] += cc * gd;
            }
            *dot[c] = dc;
          }
        }
        // The weights' derivatives in x and y, zero for corners outside (their dot is 0).
        const acc_t hx = 1 - f.lx, hy = 1 - f.ly;
        const acc_t grad_mask = f.w[0] * dot0 + f.w[1] * dot1 + f.w[2] * dot2 + f.w[3] * dot3;
        const acc_t grad_x = hy * (dot1 - dot0) + f.ly * (dot3 - dot2);
        const acc_t grad_y = hx * (dot2 - dot0) + f.lx * (dot3 - dot1);
        gom[2 * k] = static_cast<scalar_t>(m * grad_x * s);
        gom[2 * k + 1] = static_cast<scalar_t>(m * grad_y * s);
        gom[2 * K + k] = static_cast<scalar_t>(grad_mask);
      }
    }
  }
}

// grad_value_acc is (N, H, W, C) in acc_t, zero on entry. Every used channel of grad_offset_mask is
// written; its padding channels are left as they are.
template <typename scalar_t>
void backward_cpu_kernel(const Params& p, const scalar_t* grad_output, const scalar_t* value,
                         const scalar_t* offset_mask, at::opmath_type<scalar_t>* grad_value_acc,
                         scalar_t* grad_offset_mask) {
  dispatch_width(p.D, [&](auto kD_const) {
    constexpr int kD = decltype(kD_const)::value;
    parallel_chunks(p.N * p.G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ng = begin; ng < end; ++ng) {
        backward_image_group<scalar_t, kD>(p, grad_output, value, offset_mask, grad_value_acc, grad_offset_mask,
                                           ng / p.G, ng % p.G);
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
  // The kernel writes every used channel; only the padding channels need zeros.
  at::Tensor grad_offset_mask = at::empty_like(offset_mask);
  const int64_t used = 3 * p.G * p.K;
  if (p.P > used) grad_offset_mask.narrow(3, used, p.P - used).zero_();
  const auto acc_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_type));
  if (grad_output.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "dcnv4_backward_cpu", [&] {
      backward_cpu_kernel<scalar_t>(p, grad_output.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
                                    offset_mask.const_data_ptr<scalar_t>(),
                                    grad_value_acc.mutable_data_ptr<at::opmath_type<scalar_t>>(),
                                    grad_offset_mask.mutable_data_ptr<scalar_t>());
    });
  }
  return {grad_value_acc.to(value.scalar_type()), grad_offset_mask};
}

}  // namespace
}  // namespace dcnv4

TORCH_LIBRARY_IMPL(unet_dcnv4, CPU, m) {
  m.impl("dcnv4_forward", &dcnv4::dcnv4_forward_cpu);
  m.impl("dcnv4_backward", &dcnv4::dcnv4_backward_cpu);
}
