"""The DCNv4 U-Net (a diffusers `UNet2DModel` whose 3x3 convs are DCNv4), its conv baseline, the named
model sizes they share, and a parameter/GFLOPs report (`python -m unet_dcnv4.unet --size tiny --report`).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

# diffusers resolves a custom pipeline component's base classes by name in the module that defines it:
# without ModelMixin in this namespace, a pipeline folder holding a DCNv4UNet2DModel would not load.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from ._checks import positive_int
from .modules import DCNv4, DCNv4Conv2d
from .ops import _uses_kernels, check_impl, load_extension

__all__ = ["DCNv4UNet2DModel", "UNET_SIZES", "REPLACEABLE", "DCNV4_OPTIONS", "MODEL_TYPES", "BUDGETS",
           "build_unet", "matched_widths", "resolve_levels", "sampled_levels", "COARSE", "model_report", "dcnv4_flops"]

REPLACEABLE = ("resnet", "conv_in", "conv_out", "downsample", "upsample")
MODEL_TYPES = ("dcnv4", "conv")
# `match` is not a model field: build_unet resolves it into block_out_channels, which the saved config records.
DCNV4_OPTIONS = ("replace", "group_channels", "offset_scale", "dw_kernel_size", "remove_center", "official_init",
                 "offset_lr_scale", "time_offsets", "time_rank", "levels", "match")
# The default `levels`: every resolution level but the full one (`resolve_levels`).
COARSE = "coarse"
# What a matched-budget DCNv4 U-Net is widened to equal: the conv baseline's parameter count or its GFLOPs.
BUDGETS = ("params", "flops")
BUDGET_TOLERANCE = 0.05

# UNet2DModel keyword arguments shared by the DCNv4 model and its conv baseline. `tiny` is for CPU
# tests and the quickstart (8x8 or 16x16 latents); S, M, B are for GPU runs on 32x32x4 latents.
UNET_SIZES: dict[str, dict] = {
    "tiny": dict(
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32, norm_num_groups=8,
    ),
    "S": dict(
        block_out_channels=(64, 128, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32, norm_num_groups=32,
    ),
    "M": dict(
        block_out_channels=(96, 192, 384), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32, norm_num_groups=32,
    ),
    "B": dict(
        block_out_channels=(128, 256, 512), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=64, norm_num_groups=32,
    ),
}


def _check_replace(replace) -> tuple[str, ...]:
    if isinstance(replace, str) or not isinstance(replace, (list, tuple)):
        raise ValueError(f"replace must be a list of conv names from {list(REPLACEABLE)}, got {replace!r}")
    unknown = [r for r in replace if r not in REPLACEABLE]
    if unknown:
        raise ValueError(f"replace got unknown conv names {unknown}; allowed: {list(REPLACEABLE)}")
    return tuple(replace)


def resolve_levels(levels, depth: int) -> tuple[int, ...]:
    """The resolution levels a `levels` value swaps in a U-Net of `depth` levels: "coarse" every level but the full
    resolution (1, ..., depth - 1), None every level, else the list itself; raises ValueError on anything else."""
    if levels == COARSE:
        return tuple(range(1, depth))
    if levels is None:
        return tuple(range(depth))
    if isinstance(levels, (str, int)) or not isinstance(levels, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < depth for v in levels):
        raise ValueError(f"levels must be {COARSE!r}, null or a list of resolution levels in [0, {depth}), "
                         f"got {levels!r}")
    return tuple(sorted(set(levels)))


def sampled_levels(depth: int, replace=REPLACEABLE, levels=COARSE) -> tuple[int, ...]:
    """The resolution levels whose block width some DCNv4 layer samples at, for a U-Net of `depth` levels whose
    convs `replace` names are swapped at `levels` (`resolve_levels`): group_channels must divide these widths only.

    A swapped conv samples at its output width (`DCNv4Conv2d`): the ResnetBlock2D convs, downsampling convs,
    conv_in and conv_out (which narrows from level 0's width) at their own level's width; an upsampling conv,
    which runs on the finer level's map, at the coarser block's width it upsamples.
    """
    swapped = set(resolve_levels(levels, depth))
    used = set()
    if "resnet" in replace:
        used |= swapped
    if "downsample" in replace:
        used |= swapped - {depth - 1}  # the last down block does not downsample
    if ("conv_in" in replace or "conv_out" in replace) and 0 in swapped:
        used.add(0)
    if "upsample" in replace:
        used |= {level + 1 for level in swapped if level + 1 < depth}
    return tuple(sorted(used))


def _check_group_channels(group_channels, block_out_channels, replace=REPLACEABLE, levels=COARSE) -> None:
    positive_int("group_channels", group_channels)
    widths = tuple(block_out_channels)
    used = [widths[i] for i in sampled_levels(len(widths), replace, levels)]
    if used and any(w % group_channels for w in used):
        common = [d for d in range(1, min(used) + 1) if all(w % d == 0 for w in used)]
        raise ValueError(f"group_channels ({group_channels}) must divide every entry of block_out_channels "
                         f"{widths} at a level with DCNv4 layers ({used}); allowed: {common}")


def _give_time(block: ResnetBlock2D, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a ResnetBlock2D whose conv1 sees the time: hands it the block's time embedding."""
    block.conv1.set_time(kwargs["temb"] if "temb" in kwargs else args[1])


def _take_time(block: ResnetBlock2D, args: tuple, output) -> None:
    block.conv1.set_time(None)  # no reference to the embedding outlives the call


class DCNv4UNet2DModel(UNet2DModel):
    """`UNet2DModel` with its 3x3 convs replaced by `DCNv4Conv2d`.

    The constructor writes out the parent's whole signature so that diffusers' config records every
    argument and `from_pretrained` rebuilds the DCNv4 layers before loading their weights (a `**kwargs`
    pass-through does not reload, and swapping convs on a plain `UNet2DModel` reloads with random DCNv4
    weights). The parent's arguments are documented by `UNet2DModel`; the DCNv4 ones are:

    Args:
        replace: which 3x3 convs become DCNv4, from "resnet" (both convs of every ResnetBlock2D),
            "conv_in", "conv_out", "downsample", "upsample" (the resampling convs); all of them by default,
            the choice the design study found best (benchmarks/NOTES.md). Folders saved with another default
            load as saved: the config names the list.
        group_channels: channels per DCNv4 group; must divide the block_out_channels of every level with DCNv4
            layers (`sampled_levels`).
        offset_scale: DCNv4's offset scale.
        dw_kernel_size: depthwise conv kernel in the offset/mask branch, None for none.
        remove_center: drop the centre tap of each DCNv4.
        official_init: initialise every DCNv4 layer as the official code does (all masks zero) instead of
            the box-filter start (masks 1/K); see `DCNv4`.
        offset_lr_scale: the learning rate of the offset/mask projections (and their depthwise convs) as a multiple
            of the rest's; deformable networks commonly train them at 0.1x. A training setting, kept in the config
            so that a saved model says how it was trained; `parameter_groups` applies it.
        levels: the resolution levels whose 3x3 convs (those `replace` names) are swapped, 0 the latent's full
            resolution, 1 half of it, ...; "coarse" (the default) for every level but the full resolution, None for
            every level. A conv's level is that of the map it reads: conv_in and conv_out 0, the blocks' convs
            their block's, a downsampling conv its block's, an upsampling conv the finer level it convolves after
            upsampling. The saved config names the levels as a list. The default was every level until the plateau
            study (benchmarks/NOTES.md): keeping the full-resolution convs plain was the best DCNv4 design there.
            Configs saved before `levels` existed load with every level, as they were trained (`from_config`).
        time_offsets: let the offsets and masks of every ResnetBlock2D's first conv see the diffusion time (its
            input is taken before the block adds the time embedding; the second conv's input has it): the block's
            time embedding, through a zero-initialised projection, is added to the offset branch's input.
        time_rank: the rank of those time projections (`DCNv4`): None for a full Linear per layer, (time embedding
            width + 1) x its input width parameters; r for a rank-r factorisation, a few times cheaper.
        impl: which implementation of the op every DCNv4 layer runs, one of `unet_dcnv4.ops.IMPLS` (see `dcnv4`).
        cuda_backward: the CUDA backward kernel of every DCNv4 layer, one of `unet_dcnv4.ops.CUDA_BACKWARDS`.
            Both are recorded in the saved config, so it says what ran; configs saved without them load with the
            defaults.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
        replace: tuple[str, ...] = REPLACEABLE,
        group_channels: int = 16,
        offset_scale: float = 1.0,
        dw_kernel_size: int | None = None,
        remove_center: bool = False,
        official_init: bool = False,
        offset_lr_scale: float = 1.0,
        time_offsets: bool = False,
        time_rank: int | None = None,
        levels: tuple[int, ...] | str | None = COARSE,
        impl: str = "auto",
        cuda_backward: str = "atomic",
    ):
        replace = _check_replace(replace)
        if isinstance(offset_lr_scale, bool) or not isinstance(offset_lr_scale, (int, float)) or offset_lr_scale < 0:
            raise ValueError(f"offset_lr_scale must be a number >= 0, got {offset_lr_scale!r}")
        check_impl(impl, cuda_backward)
        if not isinstance(time_offsets, bool):
            raise ValueError(f"time_offsets must be a bool, got {time_offsets!r}")
        if time_rank is not None:
            positive_int("time_rank", time_rank)
            if not time_offsets:
                raise ValueError(f"time_rank ({time_rank}) is the rank of the time projections of time_offsets: "
                                 "set time_offsets: true with it")
        depth, chosen = len(block_out_channels), levels
        levels = resolve_levels(levels, depth)
        _check_group_channels(group_channels, block_out_channels, replace, levels)
        super().__init__(
            sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
            center_input_sample=center_input_sample, time_embedding_type=time_embedding_type,
            time_embedding_dim=time_embedding_dim, freq_shift=freq_shift, flip_sin_to_cos=flip_sin_to_cos,
            down_block_types=down_block_types, mid_block_type=mid_block_type, up_block_types=up_block_types,
            block_out_channels=block_out_channels, layers_per_block=layers_per_block,
            mid_block_scale_factor=mid_block_scale_factor, downsample_padding=downsample_padding,
            downsample_type=downsample_type, upsample_type=upsample_type, dropout=dropout, act_fn=act_fn,
            attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
            attn_norm_num_groups=attn_norm_num_groups, norm_eps=norm_eps,
            resnet_time_scale_shift=resnet_time_scale_shift, add_attention=add_attention,
            class_embed_type=class_embed_type, num_class_embeds=num_class_embeds,
            num_train_timesteps=num_train_timesteps,
        )
        options = dict(group_channels=group_channels, offset_scale=offset_scale, dw_kernel_size=dw_kernel_size,
                       remove_center=remove_center, official_init=official_init, impl=impl,
                       cuda_backward=cuda_backward)

        # The level each block's convs read (up block j runs at level depth - 1 - j); see `levels`.
        level_of = {id(m): i for i, block in enumerate(self.down_blocks) for m in block.modules()}
        if self.mid_block is not None:
            level_of.update({id(m): depth - 1 for m in self.mid_block.modules()})
        level_of.update({id(m): depth - 1 - j for j, block in enumerate(self.up_blocks) for m in block.modules()})

        def swap(conv: nn.Module, level: int, time_channels: int | None = None) -> nn.Module:
            if not isinstance(conv, nn.Conv2d) or conv.kernel_size == (1, 1) or \
                    level not in levels:
                return conv
            return DCNv4Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                               padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                               time_channels=time_channels, time_rank=time_rank if time_channels else None,
                               **options)

        if "conv_in" in replace:
            self.conv_in = swap(self.conv_in, 0)
        if "conv_out" in replace:
            self.conv_out = swap(self.conv_out, 0)
        for module in list(self.modules()):
            level = level_of.get(id(module))
            if isinstance(module, ResnetBlock2D) and "resnet" in replace:
                timed = time_offsets and module.time_emb_proj is not None
                module.conv1 = swap(module.conv1, level, module.time_emb_proj.in_features if timed else None)
                module.conv2 = swap(module.conv2, level)
                if timed and isinstance(module.conv1, DCNv4):
                    module.register_forward_pre_hook(_give_time, with_kwargs=True)
                    module.register_forward_hook(_take_time)
            elif (isinstance(module, Downsample2D) and "downsample" in replace) or \
                    (isinstance(module, Upsample2D) and "upsample" in replace):
                # Downsample2D registers one conv under two names (conv and Conv2d_0); keep them one module.
                if isinstance(module, Upsample2D):
                    level -= 1  # its conv runs on the upsampled, finer map
                for attr in ("conv", "Conv2d_0"):
                    if isinstance(getattr(module, attr, None), nn.Conv2d):
                        new = swap(getattr(module, attr), level)
                        for alias in ("conv", "Conv2d_0"):
                            if getattr(module, alias, None) is getattr(module, attr):
                                setattr(module, alias, new)
        if not any(isinstance(m, DCNv4Conv2d) for m in self.modules()):
            raise ValueError(f"replace {list(replace)} at levels {list(levels)} swaps no 3x3 conv of this "
                             f"{depth}-level U-Net: name levels that hold some (levels: null for every level)")
        if chosen == COARSE:
            self.register_to_config(levels=list(levels))  # a saved config names the levels the default chose

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' `from_config`, with one rule of this model's: a config without `levels`, saved before the
        option existed, loads with every level (what it was trained with), not today's default. Like an option
        diffusers fills in, the key is listed in `_use_default_values`, so the model's fingerprint stays the one
        it had when saved (`unet_dcnv4.data.module_fingerprint`)."""
        # Missing from the file, or filled in so by this rule before (a model built with the default has the list
        # it chose there, never None).
        filled = isinstance(config, dict) and "levels" not in kwargs and ("levels" not in config or (
            config["levels"] is None and "levels" in (config.get("_use_default_values") or ())))
        if filled:
            config = {**config, "levels": None,
                      "_use_default_values": [k for k in config.get("_use_default_values") or () if k != "levels"]}
        out = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        if filled:
            model = out[0] if return_unused_kwargs else out
            model.register_to_config(_use_default_values=[*(model.config.get("_use_default_values") or ()),
                                                          "levels"])
        return out

    def offset_mask_parameters(self) -> list[nn.Parameter]:
        """The parameters of every DCNv4 layer's offset/mask branch (its Linear, optional depthwise conv and time
        projection)."""
        return [p for m in self.modules() if isinstance(m, DCNv4) for name, p in m.named_parameters()
                if name.split(".")[0] in ("offset_mask", "offset_mask_dw", "offset_time_proj")]

    def parameter_groups(self, learning_rate: float) -> list[dict]:
        """Optimizer parameter groups: the offset/mask branches at `offset_lr_scale` times `learning_rate` (a
        group of its own only when the scale is not 1), everything else at `learning_rate`. Each group names
        its scale as "lr_scale", so that a schedule or a resume can rebuild its rate."""
        scale = float(self.config.offset_lr_scale)
        offset = {id(p) for p in self.offset_mask_parameters()}
        if scale == 1.0 or not offset:
            return [{"params": list(self.parameters()), "lr": learning_rate, "lr_scale": 1.0}]
        return [{"params": [p for p in self.parameters() if id(p) not in offset], "lr": learning_rate, "lr_scale": 1.0},
                {"params": [p for p in self.parameters() if id(p) in offset], "lr": learning_rate * scale,
                 "lr_scale": scale}]

    def enable_value_recompute(self, enabled: bool = True) -> None:
        """Make every DCNv4 layer recompute its value projection in the backward instead of keeping it
        (`DCNv4.recompute_value`): less activation memory for one more matrix multiply per layer. A
        runtime setting like gradient checkpointing, not saved in the config."""
        for module in self.modules():
            if isinstance(module, DCNv4):
                module.recompute_value = bool(enabled)


def build_unet(
    model_type: str,
    size: str,
    sample_size: int,
    in_channels: int = 4,
    out_channels: int | None = None,
    num_class_embeds: int | None = None,
    impl: str = "auto",
    cuda_backward: str = "atomic",
    **dcnv4_options,
) -> UNet2DModel:
    """A U-Net of a named size: the DCNv4 model or its conv baseline with the identical configuration.

    Args:
        model_type: "dcnv4" (`DCNv4UNet2DModel`) or "conv" (plain `UNet2DModel`).
        size: a key of `UNET_SIZES`.
        sample_size: the latent height/width.
        in_channels: latent channels in; out_channels defaults to it.
        num_class_embeds: number of classes for a class-conditional model, None for unconditional.
        impl, cuda_backward: which implementation of the op and which CUDA backward kernel the DCNv4 layers run
            (`DCNv4UNet2DModel`); they change what runs, not the model, so `match` ignores them.
        **dcnv4_options: DCNv4 fields (`DCNV4_OPTIONS`: replace, group_channels, offset_scale,
            dw_kernel_size, remove_center, official_init, match). Accepted and ignored for "conv", so that one call site
            builds both models of a comparison.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {list(MODEL_TYPES)}, got {model_type!r}")
    if size not in UNET_SIZES:
        raise ValueError(f"size must be one of {list(UNET_SIZES)}, got {size!r}")
    unknown = sorted(set(dcnv4_options) - set(DCNV4_OPTIONS))
    if unknown:
        raise ValueError(f"unknown DCNv4 options {unknown}; allowed: {list(DCNV4_OPTIONS)}")
    dcnv4_options = dict(dcnv4_options)
    match = dcnv4_options.pop("match", None)
    kwargs = dict(UNET_SIZES[size], sample_size=sample_size, in_channels=in_channels,
                  out_channels=in_channels if out_channels is None else out_channels,
                  num_class_embeds=num_class_embeds)
    check_impl(impl, cuda_backward)
    if model_type == "conv":
        return UNet2DModel(**kwargs)
    if match is not None:
        kwargs["block_out_channels"] = matched_widths(size, sample_size, in_channels, out_channels, num_class_embeds,
                                                      match=match, **dcnv4_options)
    return DCNv4UNet2DModel(**kwargs, **dcnv4_options, impl=impl, cuda_backward=cuda_backward)


def _budget(model_type: str, kwargs: dict, options: dict, match: str) -> float:
    """Parameters (counted on the meta device, no memory) or GFLOPs of one model configuration."""
    if match == "params":
        with torch.device("meta"):
            model = UNet2DModel(**kwargs) if model_type == "conv" else DCNv4UNet2DModel(**kwargs, **options)
        return float(sum(p.numel() for p in model.parameters()))
    model = UNet2DModel(**kwargs) if model_type == "conv" else DCNv4UNet2DModel(**kwargs, **options)
    return model_report(model)["gflops"]


def matched_widths(
    size: str,
    sample_size: int,
    in_channels: int = 4,
    out_channels: int | None = None,
    num_class_embeds: int | None = None,
    match: str = "params",
    tolerance: float = BUDGET_TOLERANCE,
    **dcnv4_options,
) -> tuple[int, ...]:
    """`block_out_channels` that give the DCNv4 U-Net the conv baseline's budget, within `tolerance`.

    Every width of the size's `block_out_channels` is scaled by one factor and rounded to a multiple of the
    GroupNorm group count, and of `group_channels` too at the levels with DCNv4 layers (`sampled_levels`), so
    the layers stay valid; the factor is found by bisection (the budget grows with it) and the closest of the
    candidates around the crossing wins.

    Args:
        size, sample_size, in_channels, out_channels, num_class_embeds: the models' shape, as for `build_unet`.
        match: "params" (parameter count) or "flops" (GFLOPs of one forward pass at `sample_size`, as
            `model_report` counts them).
        tolerance: the largest accepted relative difference to the conv baseline's budget.
        **dcnv4_options: the DCNv4 fields of the model being widened (group_channels, replace, ...).

    Returns:
        The widths, one per level. Raises ValueError when no width within `tolerance` exists on the grid.
    """
    if match not in BUDGETS:
        raise ValueError(f"match must be one of {list(BUDGETS)} or None, got {match!r}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")
    if size not in UNET_SIZES:
        raise ValueError(f"size must be one of {list(UNET_SIZES)}, got {size!r}")
    allowed = [o for o in DCNV4_OPTIONS if o != "match"]  # the options of the model being widened
    unknown = sorted(set(dcnv4_options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown DCNv4 options {unknown}; allowed: {allowed}")
    key = json.dumps([size, sample_size, in_channels, out_channels, num_class_embeds, match, tolerance,
                      sorted((k, list(v) if isinstance(v, tuple) else v) for k, v in dcnv4_options.items())])
    return _matched_widths(key)


@functools.lru_cache(maxsize=64)
def _matched_widths(key: str) -> tuple[int, ...]:
    size, sample_size, in_channels, out_channels, num_class_embeds, match, tolerance, options = json.loads(key)
    options = dict(options)
    base = dict(UNET_SIZES[size], sample_size=sample_size, in_channels=in_channels,
                out_channels=in_channels if out_channels is None else out_channels, num_class_embeds=num_class_embeds)
    target = _budget("conv", base, {}, match)
    # Each level's grid: multiples of the GroupNorm group count, and of group_channels where DCNv4 layers sample.
    groups, widths0 = int(base["norm_num_groups"]), base["block_out_channels"]
    dcnv4_levels = sampled_levels(len(widths0), options.get("replace", REPLACEABLE), options.get("levels", COARSE))
    steps = tuple(math.lcm(int(options.get("group_channels", 16)), groups) if level in dcnv4_levels else groups
                  for level in range(len(widths0)))

    def widths(factor: float) -> tuple[int, ...]:
        return tuple(max(step, round(w * factor / step) * step) for w, step in zip(widths0, steps))

    measured: dict[tuple[int, ...], float] = {}

    def measure(w: tuple[int, ...]) -> float:
        if w not in measured:
            measured[w] = _budget("dcnv4", dict(base, block_out_channels=w), options, match) / target
        return measured[w]

    def ratio(factor: float) -> float:
        return measure(widths(factor))

    low, high = 0.25, 1.0
    while ratio(high) < 1:
        low, high = high, high * 2
        if high > 64:
            raise ValueError(f"no width reaches the conv baseline's {match}: the DCNv4 options {options} keep it "
                             "below at 64x the widths")
    for _ in range(12):
        mid = (low + high) / 2
        low, high = (mid, high) if ratio(mid) < 1 else (low, mid)
    best = min(measured, key=lambda w: abs(measured[w] - 1))
    # One common factor moves every level at once; where its grid steps over the target, move the levels
    # independently by one step around the closest candidate.
    for _ in range(4):
        if abs(measured[best] - 1) <= tolerance:
            break
        for deltas in itertools.product((-1, 0, 1), repeat=len(best)):
            w = tuple(a + d * step for a, d, step in zip(best, deltas, steps))
            if all(a >= step for a, step in zip(w, steps)):
                measure(w)
        previous, best = best, min(measured, key=lambda w: abs(measured[w] - 1))
        if best == previous:
            break
    if abs(measured[best] - 1) > tolerance:
        raise ValueError(
            f"no block_out_channels on the grid of multiples of {steps} (one a level) give the conv baseline's "
            f"{match} within {tolerance:.0%} (closest {best}: {measured[best]:.3f}x); use a smaller group_channels "
            "for a finer grid")
    return best


def dcnv4_flops(module: DCNv4, output: torch.Tensor) -> int:
    """FLOPs of one DCNv4 op call (projections excluded) given the layer and its (N, H_out, W_out, C) op output.

    Each output element sums K taps; a tap costs 4 multiply-adds of bilinear interpolation and one of
    mask weighting, 2 FLOPs per multiply-add (the convention of torch.utils.flop_counter). The per-tap
    coordinate arithmetic (shared by a group's channels) is not counted.
    """
    N, H_out, W_out = output.shape[:3]
    return 2 * 5 * N * H_out * W_out * module.channels * module.K


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # torch's flop counter has formulas for the CUDA attention kernels but not for the CPU one, which it would
    # count as zero: the same two matrix products, counted the same way. (The counter passes shapes.)
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


@torch.no_grad()
def model_report(
    model_type_or_model: str | UNet2DModel,
    size: str | None = None,
    sample_size: int = 32,
    in_channels: int = 4,
    num_class_embeds: int | None = None,
    **dcnv4_options,
) -> dict:
    """Parameters and GFLOPs of one forward pass on one sample.

    GFLOPs count the matrix products (convs, linears, attention; 2 FLOPs per multiply-add) through
    `torch.utils.flop_counter.FlopCounterMode`, plus each DCNv4 op counted analytically (`dcnv4_flops`).
    Normalisations, activations and other elementwise work are not counted, for either model.

    Args:
        model_type_or_model: "dcnv4" or "conv" (then `size` is required), or a built model.
        size: a key of `UNET_SIZES`, when building.
        sample_size: latent height/width when building (a given model uses its config's sample_size).
        in_channels: latent channels when building.
        num_class_embeds: classes of a class-conditional model when building.
        **dcnv4_options: passed to `build_unet`.

    Returns:
        dict with model_type, size, sample_size, block_out_channels, parameters, gflops and dcnv4_gflops (the op's
        share).
    """
    if isinstance(model_type_or_model, str):
        if size is None:
            raise ValueError("size is required when model_report is given a model type, got None")
        model = build_unet(model_type_or_model, size, sample_size, in_channels,
                           num_class_embeds=num_class_embeds, **dcnv4_options)
        model_type = model_type_or_model
    elif isinstance(model_type_or_model, UNet2DModel):
        model = model_type_or_model
        model_type = "dcnv4" if isinstance(model, DCNv4UNet2DModel) else "conv"
        sample_size = model.config.sample_size or sample_size
    else:
        raise TypeError(f"model_type_or_model must be a str or a UNet2DModel, got {type(model_type_or_model).__name__}")
    cfg = model.config
    hw = tuple(sample_size) if isinstance(sample_size, (list, tuple)) else (sample_size, sample_size)
    device = next(model.parameters()).device
    x = torch.zeros(1, cfg.in_channels, *hw, device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device) if model.class_embedding is not None else None

    if any(isinstance(m, DCNv4) and not m.without_pointwise and _uses_kernels(x, m.impl) for m in model.modules()):
        # The layer op's FLOP formula is registered when the kernels load, and the counter copies the
        # registry when it is made: load them first, or a fresh process would count no projection.
        load_extension()
    op_flops = []
    hooks = [m.register_forward_hook(lambda m, args, out: op_flops.append(
        dcnv4_flops(m, out.permute(0, 2, 3, 1) if isinstance(m, DCNv4Conv2d) else out)))
        for m in model.modules() if isinstance(m, DCNv4)]
    try:
        with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
            model(x, torch.tensor([1], device=device), class_labels=labels)
    finally:
        for h in hooks:
            h.remove()
    dcnv4_total = sum(op_flops)
    return {
        "model_type": model_type,
        "size": size,
        "sample_size": list(hw),
        "block_out_channels": list(model.config.block_out_channels),
        "parameters": sum(p.numel() for p in model.parameters()),
        "gflops": (counter.get_total_flops() + dcnv4_total) / 1e9,
        "dcnv4_gflops": dcnv4_total / 1e9,
    }


def _format_report(reports: list[dict]) -> str:
    rows = [("", *[r["model_type"] for r in reports]),
            ("widths", *[str(tuple(r["block_out_channels"])) for r in reports]),
            ("parameters (M)", *[f"{r['parameters'] / 1e6:.3f}" for r in reports]),
            ("GFLOPs / sample", *[f"{r['gflops']:.3f}" for r in reports]),
            ("  of which DCNv4 op", *[f"{r['dcnv4_gflops']:.3f}" for r in reports])]
    width = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, width)))
                     for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Describe a DCNv4 U-Net and its conv baseline.")
    parser.add_argument("--size", choices=list(UNET_SIZES), default="tiny")
    parser.add_argument("--sample_size", type=int, default=32, help="latent height/width")
    parser.add_argument("--in_channels", type=int, default=4)
    parser.add_argument("--num_class_embeds", type=int, default=None)
    parser.add_argument("--replace", nargs="+", default=list(REPLACEABLE), help=f"from {list(REPLACEABLE)}")
    parser.add_argument("--group_channels", type=int, default=16)
    parser.add_argument("--offset_scale", type=float, default=1.0)
    parser.add_argument("--dw_kernel_size", type=int, default=None)
    parser.add_argument("--remove_center", action="store_true")
    parser.add_argument("--official_init", action="store_true", help="all masks zero at initialisation")
    parser.add_argument("--time_offsets", action="store_true",
                        help="the offsets of each ResnetBlock2D's first conv see the diffusion time")
    parser.add_argument("--time_rank", type=int, default=None, help="rank of those time projections (default: full)")
    parser.add_argument("--levels", nargs="+", default=[COARSE],
                        help="the resolution levels whose convs are swapped, 0 the full resolution; 'coarse' (the "
                             "default) every level but 0, 'all' every level")
    parser.add_argument("--match", choices=list(BUDGETS), default=None,
                        help="widen the DCNv4 U-Net to the conv baseline's parameters or GFLOPs")
    parser.add_argument("--report", action="store_true",
                        help="print parameters and GFLOPs of the DCNv4 model and the conv baseline side by side")
    parser.add_argument("--json", action="store_true", help="print the report (or the config) as JSON")
    args = parser.parse_args(argv)
    if args.levels == [COARSE] or args.levels == ["all"]:
        levels = None if args.levels == ["all"] else COARSE
    elif all(v.isdigit() for v in args.levels):
        levels = [int(v) for v in args.levels]
    else:
        parser.error(f"--levels takes level numbers, 'coarse' or 'all', got {' '.join(args.levels)}")
    options = dict(replace=args.replace, group_channels=args.group_channels, offset_scale=args.offset_scale,
                   dw_kernel_size=args.dw_kernel_size, remove_center=args.remove_center,
                   official_init=args.official_init, time_offsets=args.time_offsets, time_rank=args.time_rank,
                   levels=levels, match=args.match)
    try:
        if args.sample_size < 1:
            raise ValueError(f"--sample_size must be positive, got {args.sample_size}")
        if args.report:
            reports = [model_report(t, args.size, args.sample_size, args.in_channels, args.num_class_embeds,
                                    **options) for t in MODEL_TYPES]
            print(json.dumps(reports, indent=2) if args.json else
                  f"size {args.size}, {args.in_channels}x{args.sample_size}x{args.sample_size} latents\n"
                  + _format_report(reports))
        else:
            model = build_unet("dcnv4", args.size, args.sample_size, args.in_channels,
                               num_class_embeds=args.num_class_embeds, **options)
            print(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}, indent=2))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
