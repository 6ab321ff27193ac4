// Torch-side helpers shared by the CPU and CUDA bindings: argument checks and Params.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include "dcnv4.h"

namespace dcnv4 {

inline void check_pair(at::IntArrayRef v, const char* name, int64_t min_value) {
  TORCH_CHECK(v.size() == 2, name, " must have 2 entries (h, w), got ", v.size());
  TORCH_CHECK(v[0] >= min_value && v[1] >= min_value, name, " must be >= ", min_value, ", got (", v[0], ", ",
              v[1], ")");
}

// Checks value (N, H, W, C) and offset_mask (N, Ho, Wo, P) against the hyper-parameters; both
// must already be contiguous.
inline Params make_params(const at::Tensor& value, const at::Tensor& offset_mask, at::IntArrayRef kernel_size,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                          int64_t groups, double offset_scale, bool remove_center) {
  check_pair(kernel_size, "kernel_size", 1);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK(value.dim() == 4, "value must be 4-D (N, H, W, C), got ", value.dim(), "-D");
  TORCH_CHECK(offset_mask.dim() == 4, "offset_mask must be 4-D (N, H_out, W_out, P), got ", offset_mask.dim(),
              "-D");
  TORCH_CHECK(offset_mask.scalar_type() == value.scalar_type(), "offset_mask must have value's dtype ",
              value.scalar_type(), ", got ", offset_mask.scalar_type());
  TORCH_CHECK(offset_mask.device() == value.device(), "offset_mask must be on value's device ", value.device(),
              ", got ", offset_mask.device());
  TORCH_CHECK(value.is_contiguous() && offset_mask.is_contiguous(), "value and offset_mask must be contiguous");
  TORCH_CHECK(groups >= 1, "groups must be positive, got ", groups);
  Params p;
  p.N = value.size(0);
  p.H = value.size(1);
  p.W = value.size(2);
  const int64_t C = value.size(3);
  TORCH_CHECK(C >= 1 && C % groups == 0, "value's channels (", C, ") must be a positive multiple of groups (",
              groups, ")");
  p.G = groups;
  p.D = C / groups;
  p.kh = static_cast<int>(kernel_size[0]);
  p.kw = static_cast<int>(kernel_size[1]);
  p.sh = static_cast<int>(stride[0]);
  p.sw = static_cast<int>(stride[1]);
  p.ph = static_cast<int>(padding[0]);
  p.pw = static_cast<int>(padding[1]);
  p.dh = static_cast<int>(dilation[0]);
  p.dw = static_cast<int>(dilation[1]);
  p.remove_center = remove_center;
  TORCH_CHECK(!(remove_center && p.kh * p.kw == 1), "remove_center needs a kernel with more than one tap");
  p.K = p.kh * p.kw - (remove_center ? 1 : 0);
  p.offset_scale = offset_scale;
  p.Ho = (p.H + 2 * p.ph - (p.dh * (p.kh - 1) + 1)) / p.sh + 1;
  p.Wo = (p.W + 2 * p.pw - (p.dw * (p.kw - 1) + 1)) / p.sw + 1;
  TORCH_CHECK(p.Ho >= 1 && p.Wo >= 1, "value's spatial size (", p.H, ", ", p.W,
              ") is too small for the kernel: the output would be ", p.Ho, "x", p.Wo);
  TORCH_CHECK(offset_mask.size(0) == p.N && offset_mask.size(1) == p.Ho && offset_mask.size(2) == p.Wo,
              "offset_mask must have shape (", p.N, ", ", p.Ho, ", ", p.Wo, ", P), got ", offset_mask.sizes());
  p.P = offset_mask.size(3);
  TORCH_CHECK(p.P >= 3 * p.G * p.K, "offset_mask must have at least 3 * groups * K = ", 3 * p.G * p.K,
              " channels, got ", p.P);
  return p;
}

// The CUDA backward kernel named by the op's cuda_backward argument: "atomic" or "tiled". Checked on
// every device, so that a name that would fail on a GPU fails on the CPU too.
inline bool tiled_backward(c10::string_view cuda_backward) {
  TORCH_CHECK(cuda_backward == "atomic" || cuda_backward == "tiled",
              "cuda_backward must be 'atomic' or 'tiled', got '", cuda_backward, "'");
  return cuda_backward == "tiled";
}

// Checks the backward's incoming gradient against the forward's output shape and value's dtype/device.
inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value, const Params& p) {
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({p.N, p.Ho, p.Wo, p.G * p.D}),
              "grad_output must have the output's shape (", p.N, ", ", p.Ho, ", ", p.Wo, ", ", p.G * p.D, "), got ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), "grad_output must have value's dtype ",
              value.scalar_type(), ", got ", grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == value.device(), "grad_output must be on value's device ", value.device(),
              ", got ", grad_output.device());
}

// The dtype of the CUDA backward's grad_value accumulator for a value of dtype `t`: double for double, the
// 16-bit type itself where the build accumulates in it (`acc16`: backward16_accumulates_in_16bit()), else float.
inline at::ScalarType grad_value_acc_type(at::ScalarType t, bool acc16) {
  if (t == at::kDouble) return at::kDouble;
  if ((t == at::kHalf || t == at::kBFloat16) && acc16) return t;
  return at::kFloat;
}

}  // namespace dcnv4
