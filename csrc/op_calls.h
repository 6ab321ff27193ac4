// Calls of the op through the dispatcher (below the caller's dispatch key when a guard says so), for the
// autograd kernels: the op's own (autograd.cpp) and the layer's (layer.cpp).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

namespace dcnv4 {

inline at::Tensor forward_op(const at::Tensor& value, const at::Tensor& offset_mask, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             double offset_scale, bool remove_center, c10::string_view cuda_backward) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("unet_dcnv4::dcnv4_forward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                         at::IntArrayRef, at::IntArrayRef, int64_t, double, bool,
                                         c10::string_view)>();
  return op.call(value, offset_mask, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center,
                 cuda_backward);
}

inline std::tuple<at::Tensor, at::Tensor> backward_op(const at::Tensor& grad_output, const at::Tensor& value,
                                                      const at::Tensor& offset_mask, at::IntArrayRef kernel_size,
                                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, int64_t groups, double offset_scale,
                                                      bool remove_center, c10::string_view cuda_backward) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("unet_dcnv4::dcnv4_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                           at::IntArrayRef, at::IntArrayRef, int64_t, double, bool, c10::string_view)>();
  return op.call(grad_output, value, offset_mask, kernel_size, stride, padding, dilation, groups, offset_scale,
                 remove_center, cuda_backward);
}

}  // namespace dcnv4
