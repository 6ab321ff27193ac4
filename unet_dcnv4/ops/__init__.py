"""The DCNv4 operator: `dcnv4(...)`, one entry point over the compiled kernels and the reference.

The compiled op lives in the `unet_dcnv4` torch.library namespace (schema in csrc/ops.cpp); this module
adds its fake kernel and autograd so that torch.compile and torch.library.opcheck see a normal op.
Set UNET_DCNV4_REFERENCE=1 to run the pure-PyTorch reference instead of the kernels.
"""

from __future__ import annotations

import os
import warnings

import torch

from .reference import dcnv4_reference, output_size, pair

__all__ = ["dcnv4", "dcnv4_reference", "output_size", "use_reference", "load_extension"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_loaded = False


def use_reference() -> bool:
    """True when UNET_DCNV4_REFERENCE asks for the pure-PyTorch path."""
    return os.environ.get("UNET_DCNV4_REFERENCE", "0").lower() not in ("", "0", "false", "no")


def load_extension() -> None:
    """Build (first use, cached) and load the compiled kernels; registers the op's Python parts."""
    global _loaded
    if _loaded:
        return
    from ._build import load

    load()
    _register_python_parts()
    _loaded = True


def _cuda_kernels_available() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("unet_dcnv4::dcnv4_forward", "CUDA")


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
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
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

    Returns:
        (N, H_out, W_out, C) in value's dtype, H_out = (H + 2 pad_h - dil_h (k_h - 1) - 1) // stride_h + 1.

    Determinism: the forward is deterministic everywhere, and so is the CPU backward. The CUDA backward
    accumulates value's gradient with atomics, so its last bits vary from run to run (offset_mask's
    gradient does not); under `torch.use_deterministic_algorithms(True)` it raises, as PyTorch's own
    atomics-based kernels do.
    """
    k, s, p, d = _check_inputs(value, offset_mask, kernel_size, stride, padding, dilation, groups,
                               offset_scale, remove_center)
    if use_reference():
        return dcnv4_reference(value, offset_mask, k, s, p, d, groups, offset_scale, remove_center)
    load_extension()
    if value.is_cuda and not _cuda_kernels_available():
        warnings.warn("unet_dcnv4: the CUDA kernels were not built (no nvcc or no GPU at build time); "
                      "running the slow PyTorch reference on the GPU", stacklevel=2)
        return dcnv4_reference(value, offset_mask, k, s, p, d, groups, offset_scale, remove_center)
    return torch.ops.unet_dcnv4.dcnv4_forward(value.contiguous(), offset_mask.contiguous(), list(k), list(s),
                                               list(p), list(d), groups, float(offset_scale), remove_center)


def _register_python_parts() -> None:
    """Fake kernels and autograd for the compiled op (the schema is declared in C++)."""

    @torch.library.register_fake("unet_dcnv4::dcnv4_forward")
    def _(value, offset_mask, kernel_size, stride, padding, dilation, groups, offset_scale, remove_center):
        N, H, W, C = value.shape
        Ho, Wo = output_size(H, W, kernel_size, stride, padding, dilation)
        return value.new_empty((N, Ho, Wo, C))

    @torch.library.register_fake("unet_dcnv4::dcnv4_backward")
    def _(grad_output, value, offset_mask, kernel_size, stride, padding, dilation, groups, offset_scale,
          remove_center):
        return torch.empty_like(value), torch.empty_like(offset_mask)

    def setup_context(ctx, inputs, output):
        value, offset_mask, *args = inputs
        ctx.save_for_backward(value, offset_mask)
        ctx.args = args

    def backward(ctx, grad_output):
        value, offset_mask = ctx.saved_tensors
        grad_value, grad_offset_mask = torch.ops.unet_dcnv4.dcnv4_backward(
            grad_output.contiguous(), value, offset_mask, *ctx.args)
        return grad_value, grad_offset_mask, None, None, None, None, None, None, None

    torch.library.register_autograd("unet_dcnv4::dcnv4_forward", backward, setup_context=setup_context)
