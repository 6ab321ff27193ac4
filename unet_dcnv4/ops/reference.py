"""Pure-PyTorch DCNv4: the specification of the operator, the CPU fallback and the gradient oracle.

Runs in any floating dtype (float64 for tests); differentiable through autograd. Memory grows with
N * H_out * W_out * K * C, so it is meant for checking, not for speed.
"""

from __future__ import annotations

import torch


def pair(x, name: str) -> tuple[int, int]:
    """An int or an (h, w) pair as a tuple of two ints."""
    if type(x) is tuple and len(x) == 2 and type(x[0]) is int and type(x[1]) is int:
        return x  # already one (every layer call passes its own): no further checks
    if isinstance(x, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {x!r}")
    if isinstance(x, int):
        return x, x
    if isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in x):
        return int(x[0]), int(x[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {x!r}")


def output_size(H: int, W: int, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """(H_out, W_out) of a DCNv4 (the convolution formula)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    return (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1, (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1


def sampling_points(kernel_size: tuple[int, int], dilation: tuple[int, int], remove_center: bool) -> list[tuple[int, int]]:
    """The kernel taps (i, j) in the op's order: x index i outer, y index j inner, centre skipped if asked."""
    kh, kw = kernel_size
    return [
        (i, j)
        for i in range(kw)
        for j in range(kh)
        if not (remove_center and i == kw // 2 and j == kh // 2)
    ]


def dcnv4_reference(
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
    """DCNv4 in plain PyTorch, computed in the inputs' dtype (fp16/bf16 are upcast to float32).

    Args:
        value: (N, H, W, C) channels-last input, C = groups * group_channels.
        offset_mask: (N, H_out, W_out, P) with P >= 3 * groups * K, K = k_h * k_w - remove_center.
            For group g, channels [3Kg, 3Kg + 2K) are K (dx, dy) pairs, [3Kg + 2K, 3Kg + 3K) the K
            masks; channels past 3GK are ignored.
        kernel_size, stride, padding, dilation: int or (h, w) pair.
        groups: number of offset groups G.
        offset_scale: s in x = x0 + s * (i * dil - c + dx).
        remove_center: skip the centre tap.

    Returns:
        (N, H_out, W_out, C) in value's dtype.
    """
    (kh, kw), (sh, sw) = pair(kernel_size, "kernel_size"), pair(stride, "stride")
    (ph, pw), (dh, dw) = pair(padding, "padding"), pair(dilation, "dilation")
    N, H, W, C = value.shape
    G = groups
    D = C // G
    Ho, Wo = output_size(H, W, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    points = sampling_points((kh, kw), (dh, dw), remove_center)
    K = len(points)
    out_dtype = value.dtype
    compute = torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else value.dtype
    value = value.to(compute)
    om = offset_mask[..., : 3 * G * K].to(compute).reshape(N, Ho, Wo, G, 3 * K)
    offset = om[..., : 2 * K].reshape(N, Ho, Wo, G, K, 2)
    mask = om[..., 2 * K :]  # (N, Ho, Wo, G, K)

    s = float(offset_scale)
    cw, ch = dw * (kw - 1) // 2, dh * (kh - 1) // 2
    dev = value.device
    tap_x = torch.tensor([i * dw - cw for i, _ in points], dtype=compute, device=dev)  # (K,)
    tap_y = torch.tensor([j * dh - ch for _, j in points], dtype=compute, device=dev)
    base_x = (torch.arange(Wo, device=dev) * sw - pw + cw).to(compute)  # (Wo,)
    base_y = (torch.arange(Ho, device=dev) * sh - ph + ch).to(compute)  # (Ho,)
    x = base_x[None, None, :, None, None] + s * (tap_x + offset[..., 0])  # (N, Ho, Wo, G, K)
    y = base_y[None, :, None, None, None] + s * (tap_y + offset[..., 1])

    # (N*G, H*W, D): one image per (batch, group) to gather from.
    v = value.reshape(N, H * W, G, D).permute(0, 2, 1, 3).reshape(N * G, H * W, D)
    x0f, y0f = torch.floor(x), torch.floor(y)
    lx, ly = x - x0f, y - y0f
    x0, y0 = x0f.long(), y0f.long()
    out = torch.zeros(N, Ho, Wo, G, D, dtype=compute, device=dev)
    for cy, cx, wgt in (
        (y0, x0, (1 - ly) * (1 - lx)),
        (y0, x0 + 1, (1 - ly) * lx),
        (y0 + 1, x0, ly * (1 - lx)),
        (y0 + 1, x0 + 1, ly * lx),
    ):
        inside = (cy >= 0) & (cy < H) & (cx >= 0) & (cx < W)
        idx = (cy.clamp(0, H - 1) * W + cx.clamp(0, W - 1)).permute(0, 3, 1, 2, 4)  # (N, G, Ho, Wo, K)
        idx = idx.reshape(N * G, Ho * Wo * K, 1).expand(-1, -1, D)
        corner = torch.gather(v, 1, idx).reshape(N, G, Ho, Wo, K, D).permute(0, 2, 3, 1, 4, 5)
        coef = (wgt * mask * inside.to(compute)).unsqueeze(-1)  # (N, Ho, Wo, G, K, 1)
        out = out + (coef * corner).sum(dim=4)
    return out.reshape(N, Ho, Wo, C).to(out_dtype)
