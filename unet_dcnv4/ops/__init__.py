"""The DCNv4 operator: `dcnv4(...)`, one entry point over the compiled kernels and the reference, and
`dcnv4_layer(...)`, the whole layer (projections, op, output projection) in one call.

The compiled ops live in the `unet_dcnv4` torch.library namespace (schemas in csrc/ops.cpp); their autograd
is C++ (csrc/autograd.cpp, csrc/layer.cpp) and this module adds their fake kernels and the layer's FLOP
formulas, so that torch.compile, torch.library.opcheck and torch.utils.flop_counter see normal ops.
Which implementation runs, and which CUDA backward kernel, are arguments of `dcnv4` (`impl`,
`cuda_backward`), so that a saved config says what ran.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .._checks import positive_int
from .reference import dcnv4_reference, output_size, pair

__all__ = ["dcnv4", "dcnv4_layer", "dcnv4_reference", "output_size", "load_extension", "check_impl", "IMPLS",
           "CUDA_BACKWARDS"]

# "auto": the compiled kernels on CPU and CUDA tensors, the reference on devices that have no kernels
# here (e.g. MPS); "kernel": the compiled kernels or an error; "reference": the pure-PyTorch reference.
IMPLS = ("auto", "kernel", "reference")
# The CUDA backward kernels (BackwardVariant in csrc/cuda/dcnv4_cuda.h): "atomic" sends every grad_value
# contribution to global memory with atomics; "tiled" sums a tile's contributions in shared memory first.
CUDA_BACKWARDS = ("atomic", "tiled")
_KERNEL_DEVICES = ("cpu", "cuda")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_loaded = False
# Whether the loaded kernels include CUDA ones, read once when they load: torch.compile cannot trace the
# dispatcher query, and a plain bool it can.
_has_cuda_kernels = False


def check_impl(impl: str, cuda_backward: str) -> None:
    """Raise ValueError unless `impl` is one of IMPLS and `cuda_backward` one of CUDA_BACKWARDS."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if cuda_backward not in CUDA_BACKWARDS:
        raise ValueError(f"cuda_backward must be one of {CUDA_BACKWARDS}, got {cuda_backward!r}")


def load_extension() -> None:
    """Build (first use, cached) and load the compiled kernels; registers the op's Python parts."""
    global _loaded, _has_cuda_kernels
    if _loaded:
        return
    from ._build import load

    load()
    _register_python_parts()
    _has_cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("unet_dcnv4::dcnv4_forward", "CUDA")
    _loaded = True


def preload_extension() -> None:
    """Load the kernels now if they can be built: torch.compile cannot build them while it traces, so the
    layers load them when made. A build failure is left for the first call of the op to report."""
    from ._build import BuildError

    try:
        load_extension()
    except BuildError:
        pass


def _cuda_kernels_available() -> bool:
    return _has_cuda_kernels


def _check_inputs(value, offset_mask, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center):
    """Validate the arguments; returns the normalised pairs. Raises ValueError/TypeError naming the argument."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"value must be a torch.Tensor, got {type(value).__name__}")
    if not isinstance(offset_mask, torch.Tensor):
        raise TypeError(f"offset_mask must be a torch.Tensor, got {type(offset_mask).__name__}")
    k, s, p, d = (pair(kernel_size, "kernel_size"), pair(stride, "stride"), pair(padding, "padding"),
                  pair(dilation, "dilation"))
    for name, v in (("kernel_size", k), ("stride", s), ("dilation", d)):
        if min(v) < 1:
            raise ValueError(f"{name} must be positive, got {v}")
    if min(p) < 0:
        raise ValueError(f"padding must be non-negative, got {p}")
    positive_int("groups", groups)
    if not isinstance(remove_center, bool):
        raise TypeError(f"remove_center must be a bool, got {remove_center!r}")
    if not isinstance(offset_scale, (int, float)) or isinstance(offset_scale, bool):
        raise TypeError(f"offset_scale must be a float, got {offset_scale!r}")
    if value.dim() != 4:
        raise ValueError(f"value must be 4-D (N, H, W, C), got shape {tuple(value.shape)}")
    if offset_mask.dim() != 4:
        raise ValueError(f"offset_mask must be 4-D (N, H_out, W_out, P), got shape {tuple(offset_mask.shape)}")
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"value must be float16, bfloat16, float32 or float64, got {value.dtype}")
    if offset_mask.dtype != value.dtype:
        raise TypeError(f"offset_mask must have value's dtype {value.dtype}, got {offset_mask.dtype}")
    if offset_mask.device != value.device:
        raise ValueError(f"offset_mask must be on value's device {value.device}, got {offset_mask.device}")
    N, H, W, C = value.shape
    if C % groups:
        raise ValueError(f"value's channels ({C}) must be divisible by groups ({groups})")
    if C == 0:
        raise ValueError("value must have at least one channel")
    if remove_center and k[0] * k[1] == 1:
        raise ValueError("remove_center needs a kernel with more than one tap, got kernel_size (1, 1)")
    Ho, Wo = output_size(H, W, k, s, p, d)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"value's spatial size ({H}, {W}) is too small for kernel_size {k}, padding {p}, "
                         f"dilation {d}: the output would be {Ho}x{Wo}")
    K = k[0] * k[1] - int(remove_center)
    if tuple(offset_mask.shape[:3]) != (N, Ho, Wo):
        raise ValueError(f"offset_mask must have shape (N, H_out, W_out, P) = ({N}, {Ho}, {Wo}, P), "
                         f"got {tuple(offset_mask.shape)}")
    if offset_mask.shape[3] < 3 * groups * K:
        raise ValueError(f"offset_mask must have at least 3 * groups * K = {3 * groups * K} channels "
                         f"(groups={groups}, K={K}), got {offset_mask.shape[3]}")
    return k, s, p, d


def dcnv4(
    value: torch.Tensor,
    offset_mask: torch.Tensor,
    kernel_size=3,
    stride=1,
    padding=1,
    dilation=1,
    groups: int = 1,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    *,
    impl: str = "auto",
    cuda_backward: str = "atomic",
) -> torch.Tensor:
    """Deformable convolution v4 (the sampling and aggregation core, no projections).

    Args:
        value: (N, H, W, C) channels-last features, C = groups * group_channels; float16, bfloat16,
            float32 or float64.
        offset_mask: (N, H_out, W_out, P), same dtype and device, P >= 3 * groups * K with
            K = k_h * k_w - remove_center. For group g, channels [3Kg, 3Kg + 2K) hold K (dx, dy)
            pairs (x first, points ordered with the kernel's x index outer), channels
            [3Kg + 2K, 3Kg + 3K) the K masks (used as given, no softmax). Extra channels are ignored.
        kernel_size, stride, padding, dilation: int or (h, w) pair, as for a convolution.
        groups: G, the number of groups sharing one set of offsets and masks.
        offset_scale: multiplies the kernel tap position plus the learned offset.
        remove_center: drop the centre tap (K = k_h * k_w - 1).
        impl: "auto" (the compiled kernels on CPU and CUDA tensors, built on first use; the reference on
            other devices), "kernel" (the compiled kernels, an error on devices without them) or
            "reference" (the pure-PyTorch reference, `dcnv4_reference`, on any device). A CUDA tensor with
            kernels built without CUDA is an error under "auto" and "kernel", not a slow fallback.
        cuda_backward: the CUDA backward kernel, "atomic" (the default) or "tiled" (sums a tile of output
            pixels' contributions to value's gradient in shared memory before the global atomics). Same
            gradients up to the order of float additions; the CPU and the reference ignore it.

    Returns:
        (N, H_out, W_out, C) in value's dtype, H_out = (H + 2 pad_h - dil_h (k_h - 1) - 1) // stride_h + 1.

    Determinism: the forward is deterministic everywhere, and so is the CPU backward. The CUDA backward
    accumulates value's gradient with atomics, so its last bits vary from run to run (offset_mask's
    gradient does not); under `torch.use_deterministic_algorithms(True)` it raises, as PyTorch's own
    atomics-based kernels do.
    """
    check_impl(impl, cuda_backward)
    k, s, p, d = _check_inputs(value, offset_mask, kernel_size, stride, padding, dilation, groups,
                               offset_scale, remove_center)
    if not _uses_kernels(value, impl):
        return dcnv4_reference(value, offset_mask, k, s, p, d, groups, offset_scale, remove_center)
    _load_for(value)
    return torch.ops.unet_dcnv4.dcnv4_forward(value.contiguous(), offset_mask.contiguous(), list(k), list(s),
                                               list(p), list(d), groups, float(offset_scale), remove_center,
                                               cuda_backward)


def _uses_kernels(t: torch.Tensor, impl: str) -> bool:
    """Whether `impl` runs the compiled kernels for tensors on t's device (raising where it cannot)."""
    if impl == "reference" or (impl == "auto" and t.device.type not in _KERNEL_DEVICES):
        return False
    if t.device.type not in _KERNEL_DEVICES:
        raise ValueError(f"impl='kernel' needs tensors on a CPU or CUDA device, got {t.device}; "
                         "use impl='auto' or 'reference' there")
    return True


def _load_for(t: torch.Tensor) -> None:
    """Load the kernels, and check that they cover t's device."""
    load_extension()
    if t.is_cuda and not _cuda_kernels_available():
        raise RuntimeError(f"unet_dcnv4: the input is on {t.device} but the kernels were built without CUDA, "
                           "which needs nvcc: install the CUDA toolkit (or set CUDA_HOME to one) and start a new "
                           "process to build them, or pass impl='reference' to run the slow PyTorch reference")


def dcnv4_layer(
    x: torch.Tensor,
    offset_input: torch.Tensor | None,
    value_weight: torch.Tensor,
    value_bias: torch.Tensor | None,
    offset_weight: torch.Tensor,
    offset_bias: torch.Tensor | None,
    output_weight: torch.Tensor,
    output_bias: torch.Tensor | None,
    kernel_size=3,
    stride=1,
    padding=1,
    dilation=1,
    groups: int = 1,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    *,
    impl: str = "auto",
    cuda_backward: str = "atomic",
    recompute_value: bool = False,
) -> torch.Tensor:
    """The DCNv4 layer: `F.linear(dcnv4(F.linear(x, value_weight, value_bias), F.linear(offset_input,
    offset_weight, offset_bias), ...), output_weight, output_bias)`, on channels-last tensors.

    With the compiled kernels this is one op with one autograd node and a hand-written backward
    (csrc/layer.cpp), which spares a small layer most of the per-call cost of three Linear modules around
    the op; under autocast every floating input is cast to the autocast dtype first, as the Linears would
    be. With the reference (`impl`, as for `dcnv4`) it is that composition of PyTorch ops.
    `torch.utils.flop_counter` counts the compiled op's matrix products by a formula registered when the
    kernels load (`load_extension()`): a `FlopCounterMode` made before that does not know it.

    Args:
        x: (N, H, W, C_in), contiguous or the NHWC view of an NCHW tensor (`x.permute(0, 2, 3, 1)`); the
            compiled op then reads it without a copy and writes the output in NCHW memory too.
        offset_input: (N, H_out, W_out, C_in) input of the offset/mask projection, or None to use x (needs
            H_out, W_out == H, W).
        value_weight, value_bias: (C, C_in), (C,) or None.
        offset_weight, offset_bias: (P, C_in), (P,) or None; P >= 3 * groups * K as for `dcnv4`.
        output_weight, output_bias: (C_out, C), (C_out,) or None.
        kernel_size, stride, padding, dilation, groups, offset_scale, remove_center, impl, cuda_backward:
            as for `dcnv4`.
        recompute_value: keep no copy of value for the backward, which recomputes it from x (compiled
            kernels only; the reference keeps what its autograd keeps).

    Returns:
        (N, H_out, W_out, C_out).
    """
    check_impl(impl, cuda_backward)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D (N, H, W, C_in) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(recompute_value, bool):
        raise TypeError(f"recompute_value must be a bool, got {recompute_value!r}")
    if not _uses_kernels(x, impl):
        offset_mask = F.linear(x if offset_input is None else offset_input, offset_weight, offset_bias)
        value = F.linear(x, value_weight, value_bias)
        return F.linear(dcnv4(value, offset_mask.to(value.dtype), kernel_size, stride, padding, dilation, groups,
                              offset_scale, remove_center, impl="reference"), output_weight, output_bias)
    k, s, p, d = (pair(kernel_size, "kernel_size"), pair(stride, "stride"), pair(padding, "padding"),
                  pair(dilation, "dilation"))
    if offset_input is None and output_size(x.shape[1], x.shape[2], k, s, p, d) != tuple(x.shape[1:3]):
        raise ValueError(f"offset_input is needed when the output size differs from x's ({tuple(x.shape[1:3])}: "
                         f"kernel_size {k}, stride {s}, padding {p}, dilation {d})")
    return _layer_op(x, offset_input, value_weight, value_bias, offset_weight, offset_bias, output_weight,
                     output_bias, k, s, p, d, groups, float(offset_scale), remove_center, cuda_backward,
                     recompute_value)


def _layer_op(x, offset_input, value_weight, value_bias, offset_weight, offset_bias, output_weight, output_bias,
              k, s, p, d, groups, offset_scale, remove_center, cuda_backward, recompute_value):
    """The compiled layer op on arguments already normalised (pairs as tuples, offset_scale a float), as
    `dcnv4_layer` leaves them and `DCNv4` keeps them, `impl` and `cuda_backward` checked by the caller:
    a small layer's call then costs little Python."""
    if not isinstance(recompute_value, bool):
        raise TypeError(f"recompute_value must be a bool, got {recompute_value!r}")
    _load_for(x)
    return torch.ops.unet_dcnv4.dcnv4_layer_forward(
        x, offset_input, value_weight, value_bias, offset_weight, offset_bias, output_weight, output_bias, list(k),
        list(s), list(p), list(d), groups, offset_scale, remove_center, cuda_backward, recompute_value)[0]


def _register_python_parts() -> None:
    """Fake kernels of the compiled ops and the layer's FLOP formulas (their schemas and autograd are in C++)."""

    @torch.library.register_fake("unet_dcnv4::dcnv4_forward")
    def _(value, offset_mask, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center,
          cuda_backward="atomic"):
        N, H, W, C = value.shape
        Ho, Wo = output_size(H, W, kernel_size, stride, padding, dilation)
        return value.new_empty((N, Ho, Wo, C))

    @torch.library.register_fake("unet_dcnv4::dcnv4_backward")
    def _(grad_output, value, offset_mask, kernel_size, stride, padding, dilation, groups, offset_scale,
          remove_center, cuda_backward="atomic"):
        return torch.empty_like(value), torch.empty_like(offset_mask)

    @torch.library.register_fake("unet_dcnv4::dcnv4_layer_forward")
    def _(x, offset_input, value_weight, value_bias, offset_weight, offset_bias, output_weight, output_bias,
          kernel_size, stride, padding, dilation, groups, offset_scale, remove_center, cuda_backward="atomic",
          recompute_value=False):
        N, H, W, _ = x.shape
        Ho, Wo = output_size(H, W, kernel_size, stride, padding, dilation)
        C, C_out = value_weight.shape[0], output_weight.shape[0]
        # The output is in x's layout: NCHW memory for the NHWC view of an NCHW tensor (csrc/layer.cpp).
        nchw = not x.is_contiguous() and x.permute(0, 3, 1, 2).is_contiguous()
        out = x.new_empty((N, C_out, Ho, Wo)).permute(0, 2, 3, 1) if nchw else x.new_empty((N, Ho, Wo, C_out))
        return (out, x.new_empty((N, H, W, C)),
                x.new_empty((N, Ho, Wo, offset_weight.shape[0])), x.new_empty((N, Ho, Wo, C)))

    @torch.library.register_fake("unet_dcnv4::dcnv4_layer_backward")
    def _(grad_output, x, offset_input, value, offset_mask, sampled, value_weight, value_bias, offset_weight,
          offset_bias, output_weight, output_bias, *args):
        like = [x, offset_input, value_weight, value_bias, offset_weight, offset_bias, output_weight, output_bias]
        return tuple(None if t is None else torch.empty_like(t) for t in like)

    # The counter sees the layer op where it used to see three Linears: their matrix products, counted as
    # it counts them (2 FLOPs a multiply-add; the backward twice the forward, plus the recomputed value).
    # The sampling itself is not counted, as for dcnv4_forward (see unet_dcnv4.unet.dcnv4_flops).
    def projection_flops(x_shape, offset_input_shape, value_weight_shape, offset_weight_shape, output_weight_shape):
        m_in, m_out = math.prod(x_shape[:3]), math.prod(offset_input_shape[:3])
        return 2 * (m_in * math.prod(value_weight_shape) + m_out * math.prod(offset_weight_shape)
                    + m_out * math.prod(output_weight_shape))

    @register_flop_formula(torch.ops.unet_dcnv4.dcnv4_layer_forward)
    def _(x, offset_input, value_weight, value_bias, offset_weight, offset_bias, output_weight, *args,
          out_shape=None, **kwargs):
        return projection_flops(x, out_shape[2], value_weight, offset_weight, output_weight)

    @register_flop_formula(torch.ops.unet_dcnv4.dcnv4_layer_backward)
    def _(grad_output, x, offset_input, value, offset_mask, sampled, value_weight, value_bias, offset_weight,
          offset_bias, output_weight, *args, out_shape=None, **kwargs):
        recomputed = 2 * math.prod(x[:3]) * math.prod(value_weight) if value is None else 0
        return 2 * projection_flops(x, offset_mask, value_weight, offset_weight, output_weight) + recomputed
