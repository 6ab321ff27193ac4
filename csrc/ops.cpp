// The op's schema, declared once; CPU and CUDA implementations register against it.
//
// cuda_backward names the CUDA backward kernel, "atomic" or "tiled" (BackwardVariant in
// cuda/dcnv4_cuda.h); the forward carries it so that its autograd can hand it to the backward, and the
// CPU kernels check it and otherwise ignore it.
#include <torch/library.h>

TORCH_LIBRARY(unet_dcnv4, m) {
  m.def(
      "dcnv4_forward(Tensor value, Tensor offset_mask, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, float offset_scale, bool remove_center, str cuda_backward=\"atomic\") -> Tensor");
  m.def(
      "dcnv4_backward(Tensor grad_output, Tensor value, Tensor offset_mask, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, float offset_scale, bool remove_center, "
      "str cuda_backward=\"atomic\") -> (Tensor, Tensor)");
}
