// The op's schema, declared once; CPU and CUDA implementations register against it. The layer ops
// (dcnv4_layer_forward/backward, csrc/layer.cpp) are the whole DCNv4 layer in one autograd node: the
// value and offset/mask projections, the op and the output projection.
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
  m.def(
      "dcnv4_layer_forward(Tensor x, Tensor? offset_input, Tensor value_weight, Tensor? value_bias, "
      "Tensor offset_weight, Tensor? offset_bias, Tensor output_weight, Tensor? output_bias, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, float offset_scale, bool remove_center, "
      "str cuda_backward=\"atomic\", bool recompute_value=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dcnv4_layer_backward(Tensor grad_output, Tensor x, Tensor? offset_input, Tensor? value, Tensor offset_mask, "
      "Tensor sampled, Tensor value_weight, Tensor? value_bias, Tensor offset_weight, Tensor? offset_bias, "
      "Tensor output_weight, Tensor? output_bias, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, float offset_scale, bool remove_center, str cuda_backward=\"atomic\") -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
