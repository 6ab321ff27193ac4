// The whole DCNv4 layer as one op with one autograd node: value = x Wv^T + bv, offset_mask =
// offset_input Wom^T + bom (offset_input is x unless the layer's offset branch has its own input: a
// depthwise conv, a strided layer's centre pixels), sampled = dcnv4(value, offset_mask), out = sampled
// Wo^T + bo, all (N, H, W, C): x and out either contiguous or, both, the NHWC views of NCHW memory (see
// nchw_view); value, offset_mask and sampled always contiguous. The backward is written out: the three
// weight gradients are matrix products and the bias gradients sums over the pixels, the op's gradients
// come from dcnv4_backward, and x's gradient is one accumulated pair of products.
//
// Why: as three nn.Linear modules around the op, a layer's training step made about 120 more ATen calls
// and eight more autograd nodes than a conv's; at the small layers of a CPU U-Net that per-call cost was a
// measurable part of the step (benchmarks/NOTES.md, "CPU speed").
//
// dcnv4_layer_forward returns (out, value, offset_mask, sampled): the intermediates are outputs so that
// torch.compile's traced graph holds what the backward needs (its autograd marks them non-differentiable).
// recompute_value only tells the autograd not to keep value: the backward then recomputes it from x.
// Under autocast every floating input is cast to the autocast dtype first, as nn.Linear would be.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "op_calls.h"

namespace dcnv4 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using LayerOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LayerGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor>;

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// Whether t (N, H, W, C) is the channels-last view of an NCHW-contiguous tensor: a network that runs in
// NCHW (the U-Nets do) hands its layers such views. The layer then reads x and writes its output and x's
// gradient in that layout with batched matrix products (one per image, the pixels of an image being a
// strided matrix there), so that nothing is copied to another layout and the ops around the layer (group
// norms, activations, 1x1 convs) see the layout they were given: with a channels-last output among NCHW
// tensors they took mixed-layout paths, which cost a CPU U-Net's training step more than the copies would.
bool nchw_view(const at::Tensor& t) {
  if (t.dim() != 4 || t.is_contiguous()) return false;
  // The strides of a contiguous (N, C, H, W), read from the innermost dimension out (W, H, C, N); a
  // dimension of size 1 may have any stride. (Read from the strides: a permuted tensor is an allocation.)
  int64_t expected = 1;
  for (const int64_t d : {2, 1, 3, 0}) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

void check_weight(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4, "dcnv4_layer: inputs must be 4-D (N, H, W, C), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(3), "dcnv4_layer: a projection weight of shape ",
              weight.sizes(), " does not take ", x.size(3), " input channels");
}

at::Tensor rows_of(const at::Tensor& t) { return t.reshape({-1, t.size(-1)}); }

// The pixels of each image of an NCHW view t (N, H, W, C) as a (N, H * W, C) strided view (no copy).
at::Tensor image_rows(const at::Tensor& t) {
  return t.permute({0, 3, 1, 2}).view({t.size(0), t.size(3), t.size(1) * t.size(2)}).transpose(1, 2);
}

// (N, H, W, C_in) -> (N, H, W, C_out) contiguous: x W^T + b, one matrix product on the pixel rows, or one
// per image when x is an NCHW view.
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias) {
  check_weight(x, weight);
  const auto shape = {x.size(0), x.size(1), x.size(2), weight.size(0)};
  if (nchw_view(x)) {
    const at::Tensor wt = weight.t().expand({x.size(0), weight.size(1), weight.size(0)});
    const at::Tensor rows = image_rows(x);
    return (present(bias) ? at::baddbmm(*bias, rows, wt) : at::bmm(rows, wt)).view(shape);
  }
  const at::Tensor rows = rows_of(x.contiguous());
  return (present(bias) ? at::addmm(*bias, rows, weight.t()) : at::mm(rows, weight.t())).view(shape);
}

// The output projection: contiguous rows (N, H, W, C) -> (N, H, W, C_out), written in NCHW memory (and
// returned as its channels-last view) when `nchw`.
at::Tensor linear_out(const at::Tensor& rows, const at::Tensor& weight, const OptTensor& bias, bool nchw) {
  if (!nchw) return linear_rows(rows, weight, bias);
  check_weight(rows, weight);
  const int64_t N = rows.size(0), C_out = weight.size(0);
  const at::Tensor cols = rows.view({N, -1, rows.size(3)}).transpose(1, 2);  // (N, C, H * W)
  const at::Tensor w = weight.expand({N, C_out, weight.size(1)});
  const at::Tensor y = present(bias) ? at::baddbmm(bias->view({1, C_out, 1}), w, cols) : at::bmm(w, cols);
  return y.view({N, C_out, rows.size(1), rows.size(2)}).permute({0, 2, 3, 1});
}

// sum over pixels of grad^T input: the gradient of a projection's weight, (C_out, C_in), from its output's
// gradient (N, H, W, C_out) contiguous and its input (N, H, W, C_in) in either layout.
at::Tensor weight_grad(const at::Tensor& grad, const at::Tensor& input) {
  if (nchw_view(input)) {
    return at::bmm(grad.view({grad.size(0), -1, grad.size(3)}).transpose(1, 2), image_rows(input)).sum(0);
  }
  return rows_of(grad).t().mm(rows_of(input.contiguous()));
}

// t, or for the NCHW view of small images its NHWC copy, for the backward's sums over pixels. Per image,
// those sums are matrix products as long as the image, which at 4x4 ran at half the speed of one product
// over all pixel rows; the copy is cheap there (2 threads, 32x64x4x4: 13 us, against 31 us more for the
// batched product). For larger images the batched product is as fast as one, and the copy is not cheap
// (ATen's NCHW -> NHWC copy of 8x64x32x32 took 720 us, longer than the product).
at::Tensor pixel_major(const at::Tensor& t) {
  constexpr int64_t kSmallImage = 64;  // pixels
  return nchw_view(t) && t.size(1) * t.size(2) <= kSmallImage ? t.contiguous() : t;
}

// grad W: the gradient of a projection's input from its output's gradient (N, H, W, C_out) contiguous, in
// the layout of `like` (the input), added to `acc` when that is given (same layout).
at::Tensor input_grad(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& like,
                      const at::Tensor& acc = at::Tensor()) {
  if (nchw_view(like)) {
    const int64_t N = grad.size(0), C_in = weight.size(1);
    const at::Tensor wt = weight.t().expand({N, C_in, weight.size(0)});
    const at::Tensor g = grad.view({N, -1, grad.size(3)}).transpose(1, 2);  // (N, C_out, H * W)
    if (acc.defined()) {
      at::Tensor a = acc.permute({0, 3, 1, 2}).view({N, C_in, -1});
      a.baddbmm_(wt, g);
      return acc;
    }
    return at::bmm(wt, g).view({N, C_in, like.size(1), like.size(2)}).permute({0, 2, 3, 1});
  }
  if (acc.defined()) {
    rows_of(acc).addmm_(rows_of(grad), weight);
    return acc;
  }
  return rows_of(grad).mm(weight).view(like.sizes());
}

// The input projections' operand: x itself, or for 16-bit small NCHW images their pixel rows. The 16-bit
// batched products ran at about half the speed of one product on the copied rows there (bfloat16, 2
// threads: 8x256x8x8 -> 256, 372 against 211 us with the copy; 32x64x4x4 -> 112, 99 against 59 us), while
// in float32 they were as fast as or faster than the copy and one product.
at::Tensor input_rows(const at::Tensor& t) {
  return at::isReducedFloatingType(t.scalar_type()) ? pixel_major(t) : t;
}

LayerOutputs layer_forward(const at::Tensor& x, const OptTensor& offset_input, const at::Tensor& value_weight,
                           const OptTensor& value_bias, const at::Tensor& offset_weight, const OptTensor& offset_bias,
                           const at::Tensor& output_weight, const OptTensor& output_bias, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           double offset_scale, bool remove_center, c10::string_view cuda_backward,
                           bool /*recompute_value: read by the autograd only*/) {
  const at::Tensor x_rows = input_rows(x);
  const at::Tensor value = linear_rows(x_rows, value_weight, value_bias);
  const at::Tensor offset_mask =
      linear_rows(present(offset_input) ? input_rows(*offset_input) : x_rows, offset_weight, offset_bias);
  const at::Tensor sampled = forward_op(value, offset_mask, kernel_size, stride, padding, dilation, groups,
                                        offset_scale, remove_center, cuda_backward);
  return {linear_out(sampled, output_weight, output_bias, nchw_view(x)), value, offset_mask, sampled};
}

LayerGrads layer_backward(const at::Tensor& grad_output, const at::Tensor& x, const OptTensor& offset_input,
                          const OptTensor& value_in, const at::Tensor& offset_mask, const at::Tensor& sampled,
                          const at::Tensor& value_weight, const OptTensor& value_bias, const at::Tensor& offset_weight,
                          const OptTensor& offset_bias, const at::Tensor& output_weight, const OptTensor& output_bias,
                          at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups, double offset_scale, bool remove_center,
                          c10::string_view cuda_backward) {
  const at::Tensor x_pixels = pixel_major(x);
  const at::Tensor value = present(value_in) ? *value_in : linear_rows(input_rows(x), value_weight, value_bias);
  // Output projection. The output's gradient comes in the layout the output had (x's).
  const at::Tensor go = pixel_major(grad_output);
  at::Tensor grad_output_weight, grad_output_bias, grad_sampled;
  if (nchw_view(go)) {
    const int64_t N = go.size(0), C_out = go.size(3);
    const at::Tensor g = go.permute({0, 3, 1, 2}).view({N, C_out, -1});  // (N, C_out, H * W)
    grad_output_weight = at::bmm(g, sampled.view({N, -1, sampled.size(3)})).sum(0);
    if (present(output_bias)) grad_output_bias = g.sum({0, 2});
    grad_sampled = at::bmm(g.transpose(1, 2), output_weight.expand({N, C_out, output_weight.size(1)}))
                       .view(sampled.sizes());
  } else {
    const at::Tensor grad_rows = rows_of(go.contiguous());
    grad_output_weight = grad_rows.t().mm(rows_of(sampled));
    if (present(output_bias)) grad_output_bias = grad_rows.sum(0);
    grad_sampled = grad_rows.mm(output_weight).view(sampled.sizes());
  }
  // The op.
  auto [grad_value, grad_offset_mask] = backward_op(grad_sampled, value, offset_mask, kernel_size, stride, padding,
                                                    dilation, groups, offset_scale, remove_center, cuda_backward);
  // The two input projections; x's gradient gathers both when the offset branch reads x itself.
  const bool own_input = present(offset_input);
  const at::Tensor& offset_in = own_input ? *offset_input : x;
  const at::Tensor grad_value_weight = weight_grad(grad_value, x_pixels);
  const at::Tensor grad_value_bias = present(value_bias) ? rows_of(grad_value).sum(0) : at::Tensor();
  const at::Tensor grad_offset_weight = weight_grad(grad_offset_mask, own_input ? pixel_major(offset_in) : x_pixels);
  const at::Tensor grad_offset_bias = present(offset_bias) ? rows_of(grad_offset_mask).sum(0) : at::Tensor();
  at::Tensor grad_x = input_grad(grad_value, value_weight, x);
  at::Tensor grad_offset_input;
  if (own_input) {
    grad_offset_input = input_grad(grad_offset_mask, offset_weight, offset_in);
  } else {
    grad_x = input_grad(grad_offset_mask, offset_weight, x, grad_x);
  }
  return {grad_x, grad_offset_input, grad_value_weight, grad_value_bias, grad_offset_weight, grad_offset_bias,
          grad_output_weight, grad_output_bias};
}

// Calls of the layer ops through the dispatcher (from the autograd kernels, below autograd; from the autocast
// kernels, below autocast).
LayerOutputs layer_forward_op(const at::Tensor& x, const OptTensor& offset_input, const at::Tensor& value_weight,
                              const OptTensor& value_bias, const at::Tensor& offset_weight,
                              const OptTensor& offset_bias, const at::Tensor& output_weight,
                              const OptTensor& output_bias, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double offset_scale,
                              bool remove_center, c10::string_view cuda_backward, bool recompute_value) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("unet_dcnv4::dcnv4_layer_forward", "")
                       .typed<decltype(layer_forward)>();
  return op.call(x, offset_input, value_weight, value_bias, offset_weight, offset_bias, output_weight, output_bias,
                 kernel_size, stride, padding, dilation, groups, offset_scale, remove_center, cuda_backward,
                 recompute_value);
}

LayerGrads layer_backward_op(const at::Tensor& grad_output, const at::Tensor& x, const OptTensor& offset_input,
                             const OptTensor& value, const at::Tensor& offset_mask, const at::Tensor& sampled,
                             const at::Tensor& value_weight, const OptTensor& value_bias,
                             const at::Tensor& offset_weight, const OptTensor& offset_bias,
                             const at::Tensor& output_weight, const OptTensor& output_bias,
                             at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, double offset_scale, bool remove_center,
                             c10::string_view cuda_backward) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("unet_dcnv4::dcnv4_layer_backward", "")
                       .typed<decltype(layer_backward)>();
  return op.call(grad_output, x, offset_input, value, offset_mask, sampled, value_weight, value_bias, offset_weight,
                 offset_bias, output_weight, output_bias, kernel_size, stride, padding, dilation, groups,
                 offset_scale, remove_center, cuda_backward);
}

// The hyper-parameters, kept by the forward's node for the backward.
struct Hyper {
  std::vector<int64_t> kernel_size, stride, padding, dilation;
  int64_t groups;
  double offset_scale;
  bool remove_center;
  std::string cuda_backward;
};

struct HyperHolder : torch::CustomClassHolder {
  explicit HyperHolder(Hyper h) : hyper(std::move(h)) {}
  Hyper hyper;
};

at::Tensor or_undefined(const OptTensor& t) { return present(t) ? *t : at::Tensor(); }
OptTensor or_none(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class LayerFunction : public torch::autograd::Function<LayerFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& offset_input,
                               const at::Tensor& value_weight, const OptTensor& value_bias,
                               const at::Tensor& offset_weight, const OptTensor& offset_bias,
                               const at::Tensor& output_weight, const OptTensor& output_bias,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, double offset_scale, bool remove_center,
                               c10::string_view cuda_backward, bool recompute_value) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, value, offset_mask, sampled] =
        layer_forward_op(x, offset_input, value_weight, value_bias, offset_weight, offset_bias, output_weight,
                         output_bias, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center,
                         cuda_backward, recompute_value);
    ctx->save_for_backward({x, or_undefined(offset_input), recompute_value ? at::Tensor() : value, offset_mask,
                            sampled, value_weight, or_undefined(value_bias), offset_weight, or_undefined(offset_bias),
                            output_weight, or_undefined(output_bias)});
    ctx->saved_data["hyper"] = c10::IValue::make_capsule(c10::make_intrusive<HyperHolder>(
        Hyper{kernel_size.vec(), stride.vec(), padding.vec(), dilation.vec(), groups, offset_scale, remove_center,
              std::string(cuda_backward)}));
    ctx->mark_non_differentiable({value, offset_mask, sampled});
    ctx->set_materialize_grads(false);  // no zero gradients made for those three
    return {out, value, offset_mask, sampled};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    if (!grad_outputs[0].defined()) return variable_list(17);  // out's gradient: none, so none for the inputs
    const variable_list s = ctx->get_saved_variables();
    const auto holder = ctx->saved_data.at("hyper").toCapsule();
    const Hyper& h = static_cast<const HyperHolder*>(holder.get())->hyper;
    auto [grad_x, grad_offset_input, grad_vw, grad_vb, grad_ow, grad_ob, grad_pw, grad_pb] = layer_backward_op(
        grad_outputs[0], s[0], or_none(s[1]), or_none(s[2]), s[3], s[4], s[5], or_none(s[6]), s[7], or_none(s[8]),
        s[9], or_none(s[10]), h.kernel_size, h.stride, h.padding, h.dilation, h.groups, h.offset_scale,
        h.remove_center, h.cuda_backward);
    // One gradient per forward argument: none for the hyper-parameters.
    return {grad_x, grad_offset_input, grad_vw, grad_vb, grad_ow, grad_ob, grad_pw, grad_pb,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

// The backward op under autograd: runs the computation and raises if a second derivative reaches it.
class LayerBackwardFunction : public torch::autograd::Function<LayerBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_output, const at::Tensor& x,
                               const OptTensor& offset_input, const OptTensor& value, const at::Tensor& offset_mask,
                               const at::Tensor& sampled, const at::Tensor& value_weight, const OptTensor& value_bias,
                               const at::Tensor& offset_weight, const OptTensor& offset_bias,
                               const at::Tensor& output_weight, const OptTensor& output_bias,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, double offset_scale, bool remove_center,
                               c10::string_view cuda_backward) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [a, b, c, d, e, f, g, i] =
        layer_backward_op(grad_output, x, offset_input, value, offset_mask, sampled, value_weight, value_bias,
                          offset_weight, offset_bias, output_weight, output_bias, kernel_size, stride, padding,
                          dilation, groups, offset_scale, remove_center, cuda_backward);
    // The gradients of absent inputs are undefined, and a custom Function's outputs must be defined: only
    // the defined ones are returned (layer_backward_autograd puts them back in place).
    variable_list defined;
    for (const at::Tensor& t : {a, b, c, d, e, f, g, i}) {
      if (t.defined()) defined.push_back(t);
    }
    return defined;
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "unet_dcnv4: the second derivative of the DCNv4 layer is not implemented (the backward was "
                       "run with create_graph=True and its result differentiated again)");
  }
};

LayerOutputs layer_forward_autograd(const at::Tensor& x, const OptTensor& offset_input,
                                    const at::Tensor& value_weight, const OptTensor& value_bias,
                                    const at::Tensor& offset_weight, const OptTensor& offset_bias,
                                    const at::Tensor& output_weight, const OptTensor& output_bias,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups, double offset_scale,
                                    bool remove_center, c10::string_view cuda_backward, bool recompute_value) {
  if (!at::GradMode::is_enabled()) {  // no graph to record (sampling, evaluation): no node, nothing kept
    at::AutoDispatchBelowADInplaceOrView guard;
    return layer_forward_op(x, offset_input, value_weight, value_bias, offset_weight, offset_bias, output_weight,
                            output_bias, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center,
                            cuda_backward, recompute_value);
  }
  const variable_list out =
      LayerFunction::apply(x, offset_input, value_weight, value_bias, offset_weight, offset_bias, output_weight,
                           output_bias, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center,
                           cuda_backward, recompute_value);
  return {out[0], out[1], out[2], out[3]};
}

LayerGrads layer_backward_autograd(const at::Tensor& grad_output, const at::Tensor& x, const OptTensor& offset_input,
                                   const OptTensor& value, const at::Tensor& offset_mask, const at::Tensor& sampled,
                                   const at::Tensor& value_weight, const OptTensor& value_bias,
                                   const at::Tensor& offset_weight, const OptTensor& offset_bias,
                                   const at::Tensor& output_weight, const OptTensor& output_bias,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups, double offset_scale, bool remove_center,
                                   c10::string_view cuda_backward) {
  const variable_list g = LayerBackwardFunction::apply(
      grad_output, x, offset_input, value, offset_mask, sampled, value_weight, value_bias, offset_weight, offset_bias,
      output_weight, output_bias, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center,
      cuda_backward);
  // Back in place: the gradients of absent inputs (offset_input, the biases) are undefined.
  const bool has[8] = {true, present(offset_input), true, present(value_bias), true, present(offset_bias), true,
                       present(output_bias)};
  at::Tensor out[8];
  size_t next = 0;
  for (int i = 0; i < 8; ++i) {
    if (has[i]) out[i] = g.at(next++);
  }
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7]};
}

// Autocast: every floating input in the autocast dtype (float64 stays), then the op below autocast.
template <c10::DeviceType device_type>
LayerOutputs layer_forward_autocast(const at::Tensor& x, const OptTensor& offset_input,
                                    const at::Tensor& value_weight, const OptTensor& value_bias,
                                    const at::Tensor& offset_weight, const OptTensor& offset_bias,
                                    const at::Tensor& output_weight, const OptTensor& output_bias,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups, double offset_scale,
                                    bool remove_center, c10::string_view cuda_backward, bool recompute_value) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  auto cast = [&](const auto& t) { return at::autocast::cached_cast(dtype, t, device_type); };
  return layer_forward_op(cast(x), cast(offset_input), cast(value_weight), cast(value_bias), cast(offset_weight),
                          cast(offset_bias), cast(output_weight), cast(output_bias), kernel_size, stride, padding,
                          dilation, groups, offset_scale, remove_center, cuda_backward, recompute_value);
}

}  // namespace
}  // namespace dcnv4

// The computation is written with ATen ops and the op's own dispatcher calls, so one kernel serves every
// device the op has kernels for.
TORCH_LIBRARY_IMPL(unet_dcnv4, CompositeExplicitAutograd, m) {
  m.impl("dcnv4_layer_forward", &dcnv4::layer_forward);
  m.impl("dcnv4_layer_backward", &dcnv4::layer_backward);
}

TORCH_LIBRARY_IMPL(unet_dcnv4, Autograd, m) {
  m.impl("dcnv4_layer_forward", &dcnv4::layer_forward_autograd);
  m.impl("dcnv4_layer_backward", &dcnv4::layer_backward_autograd);
}

TORCH_LIBRARY_IMPL(unet_dcnv4, AutocastCPU, m) {
  m.impl("dcnv4_layer_forward", &dcnv4::layer_forward_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(unet_dcnv4, AutocastCUDA, m) {
  m.impl("dcnv4_layer_forward", &dcnv4::layer_forward_autocast<c10::DeviceType::CUDA>);
}
