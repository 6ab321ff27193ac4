// CUDA implementations of unet_dcnv4::dcnv4_forward / dcnv4_backward: argument checks, output
// allocation and the stream here (host compiler, ATen), the kernels in dcnv4_cuda.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../dcnv4_torch.h"
#include "dcnv4_cuda.h"

namespace dcnv4 {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      TORCH_CHECK(false, "value must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

at::Tensor dcnv4_forward_cuda(const at::Tensor& value_in, const at::Tensor& offset_mask_in,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups, double offset_scale, bool remove_center,
                              c10::string_view cuda_backward) {
  tiled_backward(cuda_backward);  // checked here too: the forward only carries it to the backward
  check_cuda(value_in, "value");
  const at::Tensor value = value_in.contiguous();
  const at::Tensor offset_mask = offset_mask_in.contiguous();
  const Params p =
      make_params(value, offset_mask, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center);
  const DType dtype = dtype_of(value);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor output = at::empty({p.N, p.Ho, p.Wo, p.G * p.D}, value.options());
  if (output.numel() == 0) return output;
  const cudaError_t err = forward_cuda(p, dtype, value.const_data_ptr(), offset_mask.const_data_ptr(),
                                       output.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "unet_dcnv4: the CUDA kernel dcnv4 forward_kernel failed to launch: ",
              cudaGetErrorString(err));
  return output;
}

// grad_value is accumulated with float atomics (double for float64) in a buffer of that type and
// converted to value's dtype afterwards, so half-precision gradients are summed in float32 (in their own
// type in a build with -DDCNV4_BWD16_ACC16: backward16_accumulates_in_16bit()). The
// atomics make the order of additions, hence the last bits of grad_value, vary from run to run;
// grad_offset_mask has no atomics and is deterministic. cuda_backward picks the kernel: "atomic" (the
// default) or "tiled" (see dcnv4_cuda.h).
std::tuple<at::Tensor, at::Tensor> dcnv4_backward_cuda(const at::Tensor& grad_output_in, const at::Tensor& value_in,
                                                       const at::Tensor& offset_mask_in, at::IntArrayRef kernel_size,
                                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                                       at::IntArrayRef dilation, int64_t groups, double offset_scale,
                                                       bool remove_center, c10::string_view cuda_backward) {
  const BackwardVariant variant = tiled_backward(cuda_backward) ? BackwardVariant::kTiled : BackwardVariant::kAtomic;
  check_cuda(value_in, "value");
  // Under torch.use_deterministic_algorithms(True) this raises (or warns, with warn_only=True), as
  // PyTorch's own atomics-based backward kernels do.
  at::globalContext().alertNotDeterministic("unet_dcnv4::dcnv4_backward on CUDA (grad_value uses atomics)");
  const at::Tensor value = value_in.contiguous();
  const at::Tensor offset_mask = offset_mask_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous();
  const Params p =
      make_params(value, offset_mask, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center);
  check_grad_output(grad_output, value, p);
  const DType dtype = dtype_of(value);
  const c10::cuda::CUDAGuard guard(value.device());
  const auto acc_type = grad_value_acc_type(value.scalar_type(), backward16_accumulates_in_16bit());
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_offset_mask = at::empty_like(offset_mask);
  const int64_t used = 3 * p.G * p.K;
  // The kernel writes channels [0, 3GK) of every pixel; the padding channels get no gradient.
  if (p.P > used) grad_offset_mask.narrow(3, used, p.P - used).zero_();
  if (grad_output.numel() > 0) {
    const cudaError_t err =
        backward_cuda(p, dtype, grad_output.const_data_ptr(), value.const_data_ptr(), offset_mask.const_data_ptr(),
                      grad_value_acc.mutable_data_ptr(), grad_offset_mask.mutable_data_ptr(),
                      c10::cuda::getCurrentCUDAStream(), variant);
    TORCH_CHECK(err == cudaSuccess, "unet_dcnv4: the CUDA kernel dcnv4 backward_kernel failed to launch: ",
                cudaGetErrorString(err));
  }
  if (acc_type == value.scalar_type()) return {grad_value_acc, grad_offset_mask};
  return {grad_value_acc.to(value.scalar_type()), grad_offset_mask};
}

}  // namespace
}  // namespace dcnv4

TORCH_LIBRARY_IMPL(unet_dcnv4, CUDA, m) {
  m.impl("dcnv4_forward", &dcnv4::dcnv4_forward_cuda);
  m.impl("dcnv4_backward", &dcnv4::dcnv4_backward_cuda);
}
