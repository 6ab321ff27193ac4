// Shared definitions of the DCNv4 operator for the CPU and CUDA kernels: the shape parameters and
// the sampling-point geometry. Plain C++ (no torch headers) so that .cu files stay cheap to compile.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DCNV4_HD __host__ __device__ __forceinline__
#else
#define DCNV4_HD inline
#endif

namespace dcnv4 {

// Shapes and hyper-parameters of one call. value is (N, H, W, C) with C = G * D; offset_mask is
// (N, Ho, Wo, P) with P >= 3 * G * K; output is (N, Ho, Wo, C). All tensors contiguous.
struct Params {
  int64_t N, H, W, G, D, Ho, Wo, P;
  int kh, kw, sh, sw, ph, pw, dh, dw;
  int K;  // points per group: kh * kw - remove_center
  bool remove_center;
  double offset_scale;  // cast to the accumulation type where used
};

// Kernel tap (i, j) of point k: x index i is the outer loop, y index j the inner one, the centre
// (kw / 2, kh / 2) skipped when remove_center.
DCNV4_HD void tap_of_point(const Params& p, int k, int& i, int& j) {
  int idx = k;
  if (p.remove_center && idx >= (p.kw / 2) * p.kh + p.kh / 2) idx += 1;
  i = idx / p.kh;
  j = idx % p.kh;
}

// Sampling position of point k at output (ho, wo) before adding the learned offset: the sample
// lies at x = x0 + offset_scale * dx, y = y0 + offset_scale * dy.
template <typename acc_t>
DCNV4_HD void point_base(const Params& p, int64_t ho, int64_t wo, int k, acc_t& x0, acc_t& y0) {
  int i, j;
  tap_of_point(p, k, i, j);
  const int cw = p.dw * (p.kw - 1) / 2;
  const int ch = p.dh * (p.kh - 1) / 2;
  const acc_t s = static_cast<acc_t>(p.offset_scale);
  x0 = static_cast<acc_t>(wo * p.sw - p.pw + cw) + s * static_cast<acc_t>(i * p.dw - cw);
  y0 = static_cast<acc_t>(ho * p.sh - p.ph + ch) + s * static_cast<acc_t>(j * p.dh - ch);
}

DCNV4_HD float floor_acc(float x) { return floorf(x); }
DCNV4_HD double floor_acc(double x) { return floor(x); }

// Bilinear footprint of (x, y) in pixel-index coordinates (pixel centres at integers). Corner c is
// (y0 + (c >> 1), x0 + (c & 1)); its weight is zero where it lies outside the H x W image (zero
// padding), and its pixel index is then 0 so that it is always safe to read.
template <typename acc_t, typename index_t = int64_t>
struct Bilinear {
  index_t idx[4];  // pixel index y * W + x of each corner
  acc_t w[4];      // interpolation weight of each corner, zero when outside
  bool inside[4];
  acc_t lx, ly;    // fractional parts of x and y
  index_t x0, y0;  // the top-left corner (clamped to within H + W + 2 of the image)
};

// index_t: int64_t, or int32_t where the caller knows that H * W and H + W + 2 fit it. `scale` multiplies
// every weight (a point's mask, folded into the two row weights: two multiplies instead of four).
template <typename acc_t, typename index_t = int64_t>
DCNV4_HD Bilinear<acc_t, index_t> bilinear(acc_t x, acc_t y, index_t H, index_t W, acc_t scale = 1) {
  Bilinear<acc_t, index_t> b;
  const acc_t xf = floor_acc(x), yf = floor_acc(y);
  b.lx = x - xf;
  b.ly = y - yf;
  // Positions beyond the image by more than a pixel have no corner inside; clamp before the
  // integer conversion so that huge offsets cannot overflow it.
  const acc_t big = static_cast<acc_t>(H + W + 2);
  const index_t x0 = static_cast<index_t>(xf < -big ? -big : (xf > big ? big : xf));
  const index_t y0 = static_cast<index_t>(yf < -big ? -big : (yf > big ? big : yf));
  b.x0 = x0;
  b.y0 = y0;
  const acc_t wx[2] = {1 - b.lx, b.lx};
  const acc_t wy[2] = {scale * (1 - b.ly), scale * b.ly};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const index_t cy = y0 + (c >> 1), cx = x0 + (c & 1);
    const bool in = cy >= 0 && cy < H && cx >= 0 && cx < W;
    b.inside[c] = in;
    b.idx[c] = in ? cy * W + cx : 0;
    b.w[c] = in ? wy[c >> 1] * wx[c & 1] : static_cast<acc_t>(0);
  }
  return b;
}

}  // namespace dcnv4
