// The op's schema, declared once; CPU and CUDA implementations register against it.
#include <torch/library.h>

TORCH_LIBRARY(unet_dcnv4, m) {
  m.def(
      "dcnv4_forward(Tensor value, Tensor offset_mask, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, float offset_scale, bool remove_center) -> Tensor");
  m.def(
      "dcnv4_backward(Tensor grad_output, Tensor value, Tensor offset_mask, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, float offset_scale, bool remove_center) -> (Tensor, Tensor)");
}
