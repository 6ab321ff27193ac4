"""Op cases, dtype tolerances and a recorder of the op's calls shared by the op tests (test_ops.py, test_cuda.py on a
GPU, test_cuda_emulated.py on the CPU through the emulator, test_modules.py): each is written once here."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from unet_dcnv4.ops import output_size
from unet_dcnv4.ops.reference import pair


# ||out - ref|| / ||ref|| allowed per dtype: fp32 arithmetic, then the rounding of the result.
FWD_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
BWD_TOL = {torch.float64: 1e-11, torch.float32: 5e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def make_case(N, H, W, G, D, kernel_size=3, stride=1, padding=1, dilation=1, remove_center=False, offset_scale=1.0,
              extra_channels=0, far=False, on_grid=True, seed=0):
    """Random inputs (float64, CPU) and the op's keyword arguments.

    With on_grid, offsets sit on a 1/1024 grid so that every sampling position is exact in float32 as
    in float64: the floor of a position then agrees between kernel and reference, and the offset
    gradient (which jumps where a position crosses an integer) is compared at the same side of every
    jump. Finite differences (gradcheck) need the opposite: positions off the integers.
    """
    gen = torch.Generator().manual_seed(seed)
    k, s, p, d = (pair(kernel_size, "k"), pair(stride, "s"), pair(padding, "p"), pair(dilation, "d"))
    Ho, Wo = output_size(H, W, k, s, p, d)
    K = k[0] * k[1] - int(remove_center)
    value = torch.randn(N, H, W, G * D, generator=gen, dtype=torch.float64)
    om = torch.randn(N, Ho, Wo, 3 * G * K + extra_channels, generator=gen, dtype=torch.float64)
    used = om[..., : 3 * G * K].reshape(N, Ho, Wo, G, 3 * K)
    offsets = used[..., : 2 * K] * (2.0 if not far else 40.0) + (0.0 if not far else 60.0)
    used[..., : 2 * K] = torch.round(offsets * 1024) / 1024 if on_grid else offsets
    om[..., : 3 * G * K] = used.reshape(N, Ho, Wo, 3 * G * K)
    kwargs = dict(kernel_size=list(k), stride=list(s), padding=list(p), dilation=list(d), groups=G,
                  offset_scale=offset_scale, remove_center=remove_center)
    return value, om, kwargs


def call_args(kwargs):
    return (kwargs["kernel_size"], kwargs["stride"], kwargs["padding"], kwargs["dilation"], kwargs["groups"],
            float(kwargs["offset_scale"]), kwargs["remove_center"])


def rel_err(got, ref):
    got, ref = got.double().cpu(), ref.double().cpu()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def poison_allocator(like: torch.Tensor, copies: int = 2) -> None:
    """Leave NaN-filled blocks of like's size as the only free memory of the caching allocator, so a
    kernel that misses an element of its freshly allocated output leaves a NaN there."""
    torch.cuda.empty_cache()
    blocks = [torch.full_like(like, float("nan"), device="cuda") for _ in range(copies)]
    del blocks


CASES = {
    "13x9": dict(N=2, H=13, W=9, G=2, D=16),
    "7x7_D4": dict(N=2, H=7, W=7, G=4, D=4),
    "1x1": dict(N=3, H=1, W=1, G=2, D=8),
    "batch0": dict(N=0, H=5, W=6, G=2, D=8),
    "k1_D24": dict(N=2, H=9, W=11, G=2, D=24, kernel_size=1, padding=0),
    "k5_D32": dict(N=1, H=10, W=8, G=1, D=32, kernel_size=5, padding=2),
    "k3x5": dict(N=1, H=9, W=12, G=2, D=16, kernel_size=(3, 5), padding=(1, 2)),
    "stride2": dict(N=2, H=12, W=11, G=2, D=8, stride=2),
    "dilation2": dict(N=1, H=11, W=10, G=2, D=16, dilation=2, padding=2, offset_scale=1.5),
    "remove_center": dict(N=1, H=8, W=9, G=2, D=16, remove_center=True),
    "scale_D1": dict(N=2, H=8, W=9, G=3, D=1, offset_scale=0.5),
    "D64": dict(N=1, H=6, W=7, G=2, D=64),
    "D36_scalar_half": dict(N=1, H=5, W=6, G=1, D=36),
    "D264_many_chunks": dict(N=1, H=4, W=5, G=1, D=264),
    "far_offsets": dict(N=2, H=7, W=7, G=2, D=16, far=True),
    # An even, non-square kernel with unequal strides, dilations and paddings.
    "k2x4_mixed": dict(N=1, H=5, W=6, G=1, D=16, kernel_size=(2, 4), stride=(2, 1), padding=(0, 1), dilation=(1, 2),
                       extra_channels=8, offset_scale=0.25),
    "padded_P": dict(N=2, H=6, W=5, G=2, D=16, extra_channels=5),
    # Shapes where the official kernels straddle images (batch cut from 64, shape kept).
    "14x14x256_G16": dict(N=6, H=14, W=14, G=16, D=16),
    "7x7x512_G32": dict(N=6, H=7, W=7, G=32, D=16),
    # Larger than the tiled backward's shared region: interior tiles whose regions the image does not
    # clip, and corners past the region's margin.
    "28x28_tiles": dict(N=2, H=28, W=28, G=1, D=16),
}


class OpLog(TorchDispatchMode):
    """Records the calls of the compiled ops (the op's and the layer's, forward and backward) as (name,
    arguments from kernel_size on: the hyper-parameters after the tensors)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "unet_dcnv4":
            tensors = next(i for i, a in enumerate(args) if isinstance(a, (list, tuple)))
            self.calls.append((func.name().split("::")[-1], args[tensors:]))
        return func(*args, **(kwargs or {}))
