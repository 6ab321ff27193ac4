"""DCNv4 layers: `DCNv4`, the paper's layer on channels-last input, and `DCNv4Conv2d`, a drop-in for a
3x3 `nn.Conv2d` on NCHW tensors.

Parameter names follow the official DCNv4 module (OpenGVLab/DCNv4, `DCNv4_op/DCNv4/modules/dcnv4.py`),
so an official state dict loads with `load_state_dict` unchanged:

    official                      here
    value_proj   Linear(C, C)     value_proj   Linear(in_channels, C)
    offset_mask_dw  Conv2d dw     offset_mask_dw  Conv2d(in_channels, in_channels, k_dw, groups=in_channels)
    offset_mask  Linear(C, P)     offset_mask  Linear(in_channels, P),  P = ceil(3 * G * K / 8) * 8
    output_proj  Linear(C, C)     output_proj  Linear(C, out_channels)

With in_channels == out_channels == C (the default) the shapes are the official ones too. The official
`center_feature_scale` option is not implemented.

Initialisation. The official layer zeroes the offset/mask projection, so every mask is 0, the layer's
output is 0 and the value path gets no gradient on the first steps: trained from scratch it starts dead
and only comes alive once the masks have moved. Here the offsets still start at 0 (sampling on the
regular grid) but the mask bias starts at 1/K with zero mask weights, so at initialisation each group
computes the average of its K taps: the layer starts as a normalised box-filter convolution sandwiched
between the two xavier-initialised projections, and every parameter gets a gradient from the first step
(except the optional depthwise conv, which feeds the zero offset/mask weights and learns from the second).
`official_init=True` restores the official initialisation (loading official weights overwrites either).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import positive_int
from .ops import _layer_op, _uses_kernels, check_impl, dcnv4, preload_extension
from .ops.reference import output_size, pair

__all__ = ["DCNv4", "DCNv4Conv2d", "resolve_groups"]


def resolve_groups(channels: int, groups: int | None, group_channels: int | None) -> int:
    """The number of groups G for `channels` given either `groups` or `group_channels` (16 if neither).

    Raises ValueError when the channels do not split evenly or the two arguments disagree.
    """
    positive_int("channels", channels)
    if groups is None and group_channels is None:
        group_channels = 16
    if group_channels is not None:
        positive_int("group_channels", group_channels)
        if channels % group_channels:
            raise ValueError(f"channels ({channels}) must be divisible by group_channels ({group_channels}); "
                             f"allowed group_channels for {channels} channels: "
                             f"{[d for d in range(1, channels + 1) if channels % d == 0]}")
        resolved = channels // group_channels
        if groups is not None and groups != resolved:
            raise ValueError(f"groups ({groups}) and group_channels ({group_channels}) disagree: "
                             f"groups * group_channels must equal channels ({channels})")
        return resolved
    positive_int("groups", groups)
    if channels % groups:
        raise ValueError(f"channels ({channels}) must be divisible by groups ({groups})")
    return groups


# The three projections a layer op takes the weights of (see DCNv4._plain_projections).
PROJECTIONS = ("value_proj", "offset_mask", "output_proj")


class DCNv4(nn.Module):
    """Deformable convolution v4 on channels-last input: value projection, offset/mask projection (an
    optional depthwise conv, then a Linear), the `dcnv4` sampling op and an output projection.

    Args:
        channels: C, the width at which the op samples (groups * group_channels).
        kernel_size, stride, padding, dilation: int or (h, w) pair, as for a convolution.
        groups: G, the number of offset groups; give this or `group_channels` (default 16 channels a group).
        group_channels: channels per group, C / G.
        offset_scale: scales the kernel tap positions plus learned offsets.
        remove_center: drop the centre tap (K = k_h * k_w - 1).
        dw_kernel_size: kernel of the depthwise conv before the offset/mask Linear; None for no conv.
        output_bias: whether `output_proj` has a bias.
        without_pointwise: no value/output projection (needs in_channels == out_channels == channels).
        in_channels: input width (default C); `value_proj` and `offset_mask` read this many channels.
        out_channels: output width (default C); `output_proj` writes this many channels.
        official_init: use the official initialisation (all masks zero) instead of the box-filter start.
        recompute_value: keep no copy of `value_proj`'s output for the backward; recompute it there (one
            more matrix multiply per backward, C values less per pixel of activation memory; on the layer
            op, see below). Also settable later through the `recompute_value` attribute.
        impl: which implementation of the op runs: "auto", "kernel" or "reference" (see `dcnv4`).
        cuda_backward: the CUDA backward kernel, "atomic" or "tiled" (see `dcnv4`).
        Both are kept as attributes of the same names and can be changed later.
        time_channels: the width of a time embedding the offset branch sees (`set_time`): SiLU(embedding) through
            `offset_time_proj` (zero at the start) is added to the branch's input per channel. None: no time.
        time_rank: the rank of `offset_time_proj`: None for one Linear(time_channels, in_channels); r for
            Linear(time_channels, r, no bias) then Linear(r, in_channels), (time_channels + in_channels) * r +
            in_channels parameters instead of (time_channels + 1) * in_channels (the second Linear starts at zero).

    With the compiled kernels the layer runs as one op (`dcnv4_layer`), which takes the three projections'
    weights instead of calling the `nn.Linear`s. A projection with a forward hook, or replaced by another
    module (an adapter, a quantised layer), makes the layer call the modules one by one instead, so
    neither is skipped; `recompute_value` then has no effect.
    """

    def __init__(
        self,
        channels: int,
        kernel_size=3,
        stride=1,
        padding=1,
        dilation=1,
        groups: int | None = None,
        group_channels: int | None = None,
        offset_scale: float = 1.0,
        remove_center: bool = False,
        dw_kernel_size: int | None = None,
        output_bias: bool = True,
        without_pointwise: bool = False,
        in_channels: int | None = None,
        out_channels: int | None = None,
        official_init: bool = False,
        recompute_value: bool = False,
        impl: str = "auto",
        cuda_backward: str = "atomic",
        time_channels: int | None = None,
        time_rank: int | None = None,
    ):
        super().__init__()
        self.channels = channels
        self.group = resolve_groups(channels, groups, group_channels)
        self.group_channels = channels // self.group
        self.in_channels = channels if in_channels is None else in_channels
        self.out_channels = channels if out_channels is None else out_channels
        positive_int("in_channels", self.in_channels)
        positive_int("out_channels", self.out_channels)
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        self.dilation = pair(dilation, "dilation")
        if not isinstance(remove_center, bool):
            raise TypeError(f"remove_center must be a bool, got {remove_center!r}")
        if remove_center and self.kernel_size[0] * self.kernel_size[1] == 1:
            raise ValueError("remove_center needs a kernel with more than one tap, got kernel_size (1, 1)")
        self.offset_scale = float(offset_scale)
        self.remove_center = remove_center
        self.K = self.kernel_size[0] * self.kernel_size[1] - int(remove_center)
        self.without_pointwise = without_pointwise
        self.dw_kernel_size = dw_kernel_size
        if not isinstance(recompute_value, bool):
            raise TypeError(f"recompute_value must be a bool, got {recompute_value!r}")
        self.recompute_value = recompute_value
        check_impl(impl, cuda_backward)
        self.impl = impl
        self.cuda_backward = cuda_backward
        if impl != "reference":
            preload_extension()  # so that torch.compile finds the ops: it cannot build them while it traces

        if without_pointwise and (self.in_channels != channels or self.out_channels != channels):
            raise ValueError(f"without_pointwise needs in_channels == out_channels == channels ({channels}), "
                             f"got in_channels={self.in_channels}, out_channels={self.out_channels}")
        if dw_kernel_size is not None:
            if isinstance(dw_kernel_size, bool) or not isinstance(dw_kernel_size, int) or dw_kernel_size < 1 \
                    or dw_kernel_size % 2 == 0:
                raise ValueError(f"dw_kernel_size must be a positive odd int or None, got {dw_kernel_size!r}")
            self.offset_mask_dw = nn.Conv2d(self.in_channels, self.in_channels, dw_kernel_size, 1,
                                            (dw_kernel_size - 1) // 2, groups=self.in_channels)
        # Padded to a multiple of 8 like the official layer (aligned rows for the kernels; extra ignored).
        self.offset_mask = nn.Linear(self.in_channels, int(math.ceil(self.group * self.K * 3 / 8) * 8))
        # Offsets and masks that see the diffusion time: SiLU(time embedding) projected to a per-channel bias of
        # the offset branch's input, zero at the start. The embedding of each call is given by `set_time`.
        self.time_channels = time_channels
        self.time_rank = time_rank
        self._time: torch.Tensor | None = None
        if time_rank is not None:
            positive_int("time_rank", time_rank)
            if time_channels is None:
                raise ValueError(f"time_rank ({time_rank}) needs time_channels: it is the rank of the time projection")
        if time_channels is not None:
            positive_int("time_channels", time_channels)
            self.offset_time_proj = nn.Linear(time_channels, self.in_channels) if time_rank is None else \
                nn.Sequential(nn.Linear(time_channels, time_rank, bias=False), nn.Linear(time_rank, self.in_channels))
        if not without_pointwise:
            self.value_proj = nn.Linear(self.in_channels, channels)
            self.output_proj = nn.Linear(channels, self.out_channels, bias=output_bias)
        self.reset_parameters(official_init)

    def reset_parameters(self, official_init: bool = False) -> None:
        """Zero offsets; masks 1/K (a box filter) or, with `official_init`, 0; xavier projections; no time
        dependence."""
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        if self.time_channels is not None:
            last = self.offset_time_proj
            if self.time_rank is not None:
                last[0].reset_parameters()  # random, so that the zero second Linear learns
                last = last[1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        if not official_init:
            G, K = self.group, self.K
            with torch.no_grad():
                mask_bias = self.offset_mask.bias[: 3 * G * K].view(G, 3 * K)[:, 2 * K:]  # (G, K)
                mask_bias.fill_(1.0 / K)
        if not self.without_pointwise:
            nn.init.xavier_uniform_(self.value_proj.weight)
            nn.init.zeros_(self.value_proj.bias)
            nn.init.xavier_uniform_(self.output_proj.weight)
            if self.output_proj.bias is not None:
                nn.init.zeros_(self.output_proj.bias)

    def set_time(self, temb: torch.Tensor | None) -> None:
        """The time embedding (N, time_channels) of the next calls, for a layer made with `time_channels` (its
        U-Net block sets it before each call and clears it after)."""
        self._time = temb

    def _offset_input(self, x: torch.Tensor, H_out: int, W_out: int) -> torch.Tensor:
        """The offset branch's input at output resolution: (N, H, W, C_in) -> (N, H_out, W_out, C_in)."""
        if self.time_channels is not None:
            if self._time is None:
                raise ValueError("this DCNv4 layer's offsets see the time (time_channels set): call set_time(temb) "
                                 "before it, as its U-Net block does")
            bias = self.offset_time_proj(nn.functional.silu(self._time))  # (N, C_in)
            x = x + bias.to(x.dtype)[:, None, None, :]
        if self.dw_kernel_size is not None:
            # channels_last NCHW view: the depthwise conv reads and writes NHWC memory without copies.
            x = self.offset_mask_dw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        H, W = x.shape[1:3]
        if (H_out, W_out) == (H, W):
            return x
        # Strided/unpadded layers: each output reads the input pixel at the centre of its sampling window.
        (sh, sw), (ph, pw), (dh, dw), (kh, kw) = self.stride, self.padding, self.dilation, self.kernel_size
        rows = (torch.arange(H_out, device=x.device) * sh - ph + dh * (kh - 1) // 2).clamp(0, H - 1)
        cols = (torch.arange(W_out, device=x.device) * sw - pw + dw * (kw - 1) // 2).clamp(0, W - 1)
        return x.index_select(1, rows).index_select(2, cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, in_channels) -> (N, H_out, W_out, out_channels), H_out as for a convolution."""
        if x.dim() != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must have shape (N, H, W, {self.in_channels}), got {tuple(x.shape)}")
        check_impl(self.impl, self.cuda_backward)  # attributes a user may have changed
        N, H, W, _ = x.shape
        H_out, W_out = output_size(H, W, self.kernel_size, self.stride, self.padding, self.dilation)
        own_offset_input = self.dw_kernel_size is not None or (H_out, W_out) != (H, W) or self.time_channels is not None
        # (The submodules and parameters are read from their dicts: nn.Module.__getattr__ costs about half a
        # microsecond a lookup, and a small layer's call is a few tens of them.)
        modules = self._modules
        if not self.without_pointwise and self._plain_projections() and _uses_kernels(x, self.impl):
            # The projections, the op and the output projection: one op with one autograd node. It reads x as
            # it lies (NHWC, or the NHWC view of NCHW memory, whose output it writes in NCHW memory too).
            offset_input = self._offset_input(x, H_out, W_out) if own_offset_input else None
            value_proj, offset_mask, output_proj = (modules[n]._parameters for n in PROJECTIONS)
            return _layer_op(x, offset_input, value_proj["weight"], value_proj["bias"], offset_mask["weight"],
                             offset_mask["bias"], output_proj["weight"], output_proj["bias"], self.kernel_size,
                             self.stride, self.padding, self.dilation, self.group, self.offset_scale,
                             self.remove_center, self.cuda_backward, self.recompute_value and torch.is_grad_enabled())
        if not self.without_pointwise:
            device_type = x.device.type
            if torch.is_autocast_enabled(device_type) and x.is_floating_point():
                # Cast once for both projections, which autocast would cast x for each, keeping both copies
                # for the backward. (The layer op casts in C++, once; without the projections the op
                # samples x itself, in x's dtype.)
                x = x.to(torch.get_autocast_dtype(device_type))
        x = x.contiguous()  # one contiguous copy for all readers
        offset_input = self._offset_input(x, H_out, W_out) if own_offset_input else None
        # The modules called one by one: the reference, or projections with hooks or replaced by wrappers.
        offset_mask = self.offset_mask(x if offset_input is None else offset_input)
        value = x if self.without_pointwise else self.value_proj(x)
        out = dcnv4(value, offset_mask.to(value.dtype), self.kernel_size, self.stride, self.padding, self.dilation,
                    self.group, self.offset_scale, self.remove_center, impl=self.impl,
                    cuda_backward=self.cuda_backward)
        return out if self.without_pointwise else self.output_proj(out)

    def _plain_projections(self) -> bool:
        """Whether the three projections are plain `nn.Linear`s without hooks, whose weights the layer op can
        take in their place. Otherwise they are called, so that hooks and wrappers (adapters, quantised
        layers) run as they would in any module."""
        modules = self._modules
        for name in PROJECTIONS:
            m = modules[name]
            if type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks:
                return False
        return True

    def extra_repr(self) -> str:
        return (f"{self.in_channels}->{self.channels}->{self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.group}, "
                f"offset_scale={self.offset_scale}, remove_center={self.remove_center}, impl={self.impl}, "
                f"cuda_backward={self.cuda_backward}")


class DCNv4Conv2d(DCNv4):
    """A drop-in for `nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)` on NCHW tensors.

    Like a convolution, whose cost scales with its output channels, the op samples at width
    C = out_channels and `value_proj` (in_channels -> C) doubles as the channel-changing projection
    where a conv widens or narrows (a U-Net's `ResnetBlock2D.conv1`): no extra layer. When out_channels
    does not split into groups of `group_channels` (a U-Net's `conv_out` to 4 latent channels) the op
    samples at C = in_channels instead and `output_proj` (C -> out_channels) narrows. The state dict is
    that of `DCNv4` (official names). The output has the input's memory format, as a convolution's does:
    NCHW input (a U-Net run in NCHW) is read and written by the layer op's batched matrix products without
    a copy to NHWC, and `torch.channels_last` input is read as NHWC as it lies.

    Args:
        in_channels, out_channels: as for `nn.Conv2d`.
        kernel_size, stride, padding, dilation: as for `nn.Conv2d` (keyword-only after kernel_size).
        group_channels: channels per DCNv4 group at width C (C must be divisible by it).
        channels: the width C at which the op samples, overriding the choice above.
        offset_scale, dw_kernel_size, remove_center, official_init, recompute_value, impl, cuda_backward,
            time_channels, time_rank: see `DCNv4`.
        bias: whether the output projection has a bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=3,
        *,
        stride=1,
        padding=1,
        dilation=1,
        group_channels: int = 16,
        offset_scale: float = 1.0,
        dw_kernel_size: int | None = None,
        remove_center: bool = False,
        bias: bool = True,
        official_init: bool = False,
        channels: int | None = None,
        recompute_value: bool = False,
        impl: str = "auto",
        cuda_backward: str = "atomic",
        time_channels: int | None = None,
        time_rank: int | None = None,
    ):
        positive_int("in_channels", in_channels)
        positive_int("out_channels", out_channels)
        if channels is None:
            fits = isinstance(group_channels, int) and group_channels > 0 and out_channels % group_channels == 0
            channels = out_channels if fits else in_channels
        super().__init__(
            channels, kernel_size, stride, padding, dilation,
            group_channels=group_channels, offset_scale=offset_scale, remove_center=remove_center,
            dw_kernel_size=dw_kernel_size, output_bias=bias, in_channels=in_channels,
            out_channels=out_channels, official_init=official_init, recompute_value=recompute_value,
            impl=impl, cuda_backward=cuda_backward, time_channels=time_channels, time_rank=time_rank,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, out_channels, H_out, W_out), in x's memory format."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        out = super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        # The layer op already wrote an NCHW input's output in NCHW memory; the modules called one by one
        # return channels_last, copied here so that the format never depends on the path.
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

