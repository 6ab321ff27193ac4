// The op's autograd, in C++ for every device: the forward runs the device kernel (redispatched below
// autograd) and keeps value and offset_mask; the backward calls dcnv4_backward with the forward's
// arguments, cuda_backward included. Written here rather than with torch.library.register_autograd so
// that a training step pays no Python for the op's graph node: at the small layers of a CPU U-Net that
// was a fifth of the op's time.
//
// A second derivative is not implemented: the backward op's own autograd raises when reached (instead of
// the dispatcher's fallback, which warns and leaves the gradients None). The
// forward still goes through the dispatcher, so torch.compile, opcheck and dispatch modes (selective
// checkpointing, the tests' op log) see unet_dcnv4::dcnv4_forward and dcnv4_backward as before.
#include <torch/autograd.h>
#include <torch/library.h>

#include "op_calls.h"

#include <string>
#include <tuple>
#include <vector>

namespace dcnv4 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class DCNv4Function : public torch::autograd::Function<DCNv4Function> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& value, const at::Tensor& offset_mask,
                            at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, double offset_scale, bool remove_center,
                            c10::string_view cuda_backward) {
    ctx->save_for_backward({value, offset_mask});
    ctx->saved_data["kernel_size"] = kernel_size.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["offset_scale"] = offset_scale;
    ctx->saved_data["remove_center"] = remove_center;
    ctx->saved_data["cuda_backward"] = std::string(cuda_backward);
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op(value, offset_mask, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center,
                      cuda_backward);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const auto& d = ctx->saved_data;
    const std::vector<int64_t> kernel_size = d.at("kernel_size").toIntVector(), stride = d.at("stride").toIntVector(),
                               padding = d.at("padding").toIntVector(), dilation = d.at("dilation").toIntVector();
    const std::string cuda_backward = d.at("cuda_backward").toStringRef();
    auto [grad_value, grad_offset_mask] =
        backward_op(grad_outputs[0].contiguous(), saved[0], saved[1], kernel_size, stride, padding, dilation,
                    d.at("groups").toInt(), d.at("offset_scale").toDouble(), d.at("remove_center").toBool(),
                    cuda_backward);
    // One gradient per forward argument: none for the hyper-parameters.
    return {grad_value, grad_offset_mask, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(),  at::Tensor(),       at::Tensor(), at::Tensor()};
  }
};

// The backward op under autograd: runs the kernel and raises if a second derivative reaches it.
class DCNv4BackwardFunction : public torch::autograd::Function<DCNv4BackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& value,
                               const at::Tensor& offset_mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double offset_scale,
                               bool remove_center, c10::string_view cuda_backward) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_value, grad_offset_mask] = backward_op(grad_output, value, offset_mask, kernel_size, stride, padding,
                                                      dilation, groups, offset_scale, remove_center, cuda_backward);
    return {grad_value, grad_offset_mask};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "unet_dcnv4: the second derivative of dcnv4 is not implemented (the backward was run with "
                       "create_graph=True and its result differentiated again)");
  }
};

std::tuple<at::Tensor, at::Tensor> dcnv4_backward_autograd(const at::Tensor& grad_output, const at::Tensor& value,
                                                           const at::Tensor& offset_mask, at::IntArrayRef kernel_size,
                                                           at::IntArrayRef stride, at::IntArrayRef padding,
                                                           at::IntArrayRef dilation, int64_t groups,
                                                           double offset_scale, bool remove_center,
                                                           c10::string_view cuda_backward) {
  const variable_list grads = DCNv4BackwardFunction::apply(grad_output, value, offset_mask, kernel_size, stride,
                                                           padding, dilation, groups, offset_scale, remove_center,
                                                           cuda_backward);
  return {grads[0], grads[1]};
}

at::Tensor dcnv4_forward_autograd(const at::Tensor& value, const at::Tensor& offset_mask,
                                  at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, int64_t groups, double offset_scale, bool remove_center,
                                  c10::string_view cuda_backward) {
  return DCNv4Function::apply(value, offset_mask, kernel_size, stride, padding, dilation, groups, offset_scale,
                              remove_center, cuda_backward);
}

}  // namespace
}  // namespace dcnv4

TORCH_LIBRARY_IMPL(unet_dcnv4, Autograd, m) {
  m.impl("dcnv4_forward", &dcnv4::dcnv4_forward_autograd);
  m.impl("dcnv4_backward", &dcnv4::dcnv4_backward_autograd);
}
