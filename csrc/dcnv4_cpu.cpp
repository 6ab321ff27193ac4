// CPU kernels of DCNv4, forward and backward, for float32/float64/float16/bfloat16 (accumulating in
// float32, or float64 for float64). The forward is parallel over output pixels; the backward is
// parallel over (image, group) pairs, each of which owns its slice of grad_value, so it needs no
// atomics and is deterministic. Inner loops run over the group's channels, contiguous in memory.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "dcnv4.h"
#include "dcnv4_torch.h"

namespace dcnv4 {
namespace {

// One sampling point of output pixel (ho, wo), group g: its bilinear footprint and mask.
template <typename acc_t, typename scalar_t>
inline Bilinear<acc_t> sample_point(const Params& p, const scalar_t* om_group, int64_t ho, int64_t wo, int k,
                                    acc_t& mask) {
  acc_t x0, y0;
  point_base<acc_t>(p, ho, wo, k, x0, y0);
  const acc_t s = static_cast<acc_t>(p.offset_scale);
  const acc_t x = x0 + s * static_cast<acc_t>(om_group[2 * k]);
  const acc_t y = y0 + s * static_cast<acc_t>(om_group[2 * k + 1]);
  mask = static_cast<acc_t>(om_group[2 * p.K + k]);
  return bilinear<acc_t>(x, y, p.H, p.W);
}

template <typename scalar_t>
void forward_cpu_kernel(const Params& p, const scalar_t* value, const scalar_t* offset_mask, scalar_t* output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = p.G * p.D;
  const int64_t pixels = p.N * p.Ho * p.Wo;
  const int64_t work_per_pixel = std::max<int64_t>(1, p.G * p.K * (4 * p.D + 16));
  const int64_t grain = std::max<int64_t>(1, 32768 / work_per_pixel);
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(p.D);
    acc_t* __restrict__ a = acc.data();
    for (int64_t pix = begin; pix < end; ++pix) {
      const int64_t n = pix / (p.Ho * p.Wo);
      const int64_t ho = (pix / p.Wo) % p.Ho;
      const int64_t wo = pix % p.Wo;
      const scalar_t* v_img = value + n * p.H * p.W * C;
      for (int64_t g = 0; g < p.G; ++g) {
        const scalar_t* om_group = offset_mask + pix * p.P + g * 3 * p.K;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int k = 0; k < p.K; ++k) {
          acc_t mask;
          const Bilinear<acc_t> b = sample_point<acc_t>(p, om_group, ho, wo, k, mask);
          for (int c = 0; c < 4; ++c) {
            if (!b.inside[c]) continue;
            const acc_t coef = mask * b.w[c];
            const scalar_t* __restrict__ v = v_img + b.idx[c] * C + g * p.D;
#pragma omp simd
            for (int64_t d = 0; d < p.D; ++d) a[d] += coef * static_cast<acc_t>(v[d]);
          }
        }
        scalar_t* __restrict__ out = output + pix * C + g * p.D;
#pragma omp simd
        for (int64_t d = 0; d < p.D; ++d) out[d] = static_cast<scalar_t>(a[d]);
      }
    }
  });
}

// grad_value_acc is (N, H, W, C) in acc_t, zero on entry; grad_offset_mask is zero on entry (its
// padding channels stay zero).
template <typename scalar_t>
void backward_cpu_kernel(const Params& p, const scalar_t* grad_output, const scalar_t* value,
                         const scalar_t* offset_mask, at::opmath_type<scalar_t>* grad_value_acc,
                         scalar_t* grad_offset_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = p.G * p.D;
  const acc_t s = static_cast<acc_t>(p.offset_scale);
  at::parallel_for(0, p.N * p.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> go_buf(p.D);
    acc_t* __restrict__ go = go_buf.data();
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / p.G;
      const int64_t g = ng % p.G;
      const scalar_t* v_img = value + n * p.H * p.W * C + g * p.D;
      acc_t* gv_img = grad_value_acc + n * p.H * p.W * C + g * p.D;
      for (int64_t ho = 0; ho < p.Ho; ++ho) {
        for (int64_t wo = 0; wo < p.Wo; ++wo) {
          const int64_t pix = (n * p.Ho + ho) * p.Wo + wo;
          const scalar_t* go_src = grad_output + pix * C + g * p.D;
#pragma omp simd
          for (int64_t d = 0; d < p.D; ++d) go[d] = static_cast<acc_t>(go_src[d]);
          const scalar_t* om_group = offset_mask + pix * p.P + g * 3 * p.K;
          scalar_t* gom_group = grad_offset_mask + pix * p.P + g * 3 * p.K;
          for (int k = 0; k < p.K; ++k) {
            acc_t mask;
            const Bilinear<acc_t> b = sample_point<acc_t>(p, om_group, ho, wo, k, mask);
            acc_t grad_mask = 0, grad_x = 0, grad_y = 0;
            for (int c = 0; c < 4; ++c) {
              if (!b.inside[c]) continue;
              const scalar_t* __restrict__ v = v_img + b.idx[c] * C;
              acc_t* __restrict__ gv = gv_img + b.idx[c] * C;
              const acc_t coef = mask * b.w[c];
              acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
              for (int64_t d = 0; d < p.D; ++d) {
                dot += go[d] * static_cast<acc_t>(v[d]);
                gv[d] += coef * go[d];
              }
              // d w_c / d x and d w_c / d y of the corner weights (1 - ly or ly) * (1 - lx or lx).
              const acc_t wy = (c >> 1) ? b.ly : 1 - b.ly;
              const acc_t wx = (c & 1) ? b.lx : 1 - b.lx;
              grad_mask += b.w[c] * dot;
              grad_x += ((c & 1) ? wy : -wy) * dot;
              grad_y += ((c >> 1) ? wx : -wx) * dot;
            }
            gom_group[2 * k] = static_cast<scalar_t>(mask * grad_x * s);
            gom_group[2 * k + 1] = static_cast<scalar_t>(mask * grad_y * s);
            gom_group[2 * p.K + k] = static_cast<scalar_t>(grad_mask);
          }
        }
      }
    }
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
  at::Tensor grad_offset_mask = at::zeros_like(offset_mask);
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
