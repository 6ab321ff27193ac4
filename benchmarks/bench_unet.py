"""Benchmark DCNv4Conv2d against a 3x3 nn.Conv2d at U-Net shapes (forward+backward) and one training step
of the DCNv4 U-Net against its conv baseline (images/s, peak memory), in float32 and bf16 autocast,
channels_last. Prints a table and writes JSON.

Memory is reported two ways: the CUDA allocator's peak (GPU only), and on every device the bytes of
the tensors autograd keeps for the backward ("saved", activations plus autocast's weight copies) and
the training state (parameters, gradients and AdamW's two moments, float32), whose sum is the step's
memory bar the allocator's transients.

    python benchmarks/bench_unet.py --device cuda --out bench_unet_h100.json
    python benchmarks/bench_unet.py --device cpu     # small batch, few iterations: about a minute
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from unet_dcnv4.modules import DCNv4Conv2d
from unet_dcnv4.unet import UNET_SIZES, build_unet

LAYER_SHAPES = [(64, 64, 128), (32, 32, 256), (16, 16, 512)]  # (H, W, C) of the U-Net levels
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, warmup: int, iters: int) -> tuple[float, float | None]:
    """Median milliseconds per call of fn and its peak memory in MiB (CUDA only)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], peak


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def saved_mib(fn, exclude=()) -> float:
    """MiB of distinct storages autograd saves for the backward while fn() runs (storages of the
    tensors in `exclude`, e.g. the parameters, not counted)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), warnings.catch_warnings():
        # Selective checkpointing (recompute_value) warns that hooks may see its saved tensors in future
        # releases; the tensors it keeps are kept by output_proj as well, so they are counted either way.
        warnings.simplefilter("ignore", FutureWarning)
        fn()
    return sum(seen.values()) / 2**20


def bench_layers(device, batch, dtypes, warmup, iters, group_channels) -> list[dict]:
    """Forward+backward of DCNv4Conv2d(C, C) and nn.Conv2d(C, C, 3, padding=1) at each (H, W, C)."""
    rows = []
    for H, W, C in LAYER_SHAPES:
        x = torch.randn(batch, C, H, W, device=device).to(memory_format=torch.channels_last).requires_grad_()
        layers = {
            "dcnv4": DCNv4Conv2d(C, C, group_channels=group_channels),
            "conv3x3": torch.nn.Conv2d(C, C, 3, padding=1),
        }
        for dname in dtypes:
            for lname, layer in layers.items():
                layer = layer.to(device, memory_format=torch.channels_last)

                def step():
                    with _autocast(device, DTYPES[dname]):
                        y = layer(x)
                    y.float().sum().backward()

                def forward():
                    with _autocast(device, DTYPES[dname]):
                        layer(x)

                ms, peak = _time(step, device, warmup, iters)
                rows.append(dict(kind="layer", layer=lname, N=batch, H=H, W=W, C=C, dtype=dname,
                                 fwd_bwd_ms=ms, peak_mib=peak,
                                 saved_mib=saved_mib(forward, exclude=[x, *layer.parameters()])))
    return rows


def bench_unets(device, size, sample_size, batch, dtypes, warmup, iters, group_channels) -> list[dict]:
    """One AdamW training step (noise-prediction MSE) of the DCNv4 U-Net (without and with
    recompute_value, and widened to the conv U-Net's parameters) and the conv U-Net."""
    rows = []
    # dcnv4_rv: the DCNv4 U-Net with recompute_value; dcnv4_mp: with match: params.
    for name in ("dcnv4", "dcnv4_rv", "dcnv4_mp", "conv"):
        torch.manual_seed(0)
        options = dict(match="params") if name == "dcnv4_mp" else {}
        model = build_unet(name.split("_")[0], size, sample_size, group_channels=group_channels, **options)
        if name == "dcnv4_rv":
            model.enable_value_recompute()
        model = model.to(device, memory_format=torch.channels_last).train()
        params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(batch, 4, sample_size, sample_size, device=device).to(memory_format=torch.channels_last)
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (batch,), device=device)
        for dname in dtypes:

            def step():
                with _autocast(device, DTYPES[dname]):
                    pred = model(x, t).sample
                loss = F.mse_loss(pred.float(), noise)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            def forward():
                with _autocast(device, DTYPES[dname]):
                    model(x, t)

            ms, peak = _time(step, device, warmup, iters)
            rows.append(dict(kind="unet", model=name, size=size, sample_size=sample_size, N=batch,
                             dtype=dname, parameters=params, step_ms=ms, images_per_s=batch / ms * 1e3,
                             peak_mib=peak, saved_mib=saved_mib(forward, exclude=[x, *model.parameters()]),
                             state_mib=4 * 4 * params / 2**20))
    return rows


def _table(rows: list[dict]) -> str:
    lines = []
    layer_rows = [r for r in rows if r["kind"] == "layer"]
    if layer_rows:
        lines.append(f"{'layer':8} {'N':>4} {'HxWxC':>12} {'dtype':5} {'fwd+bwd ms':>11} {'peak MiB':>9} "
                     f"{'saved MiB':>10}")
        for r in layer_rows:
            peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            lines.append(f"{r['layer']:8} {r['N']:>4} {r['H']}x{r['W']}x{r['C']:<5} {r['dtype']:5} "
                         f"{r['fwd_bwd_ms']:>11.2f} {peak:>9} {r['saved_mib']:>10.1f}")
    unet_rows = [r for r in rows if r["kind"] == "unet"]
    if unet_rows:
        lines.append(f"{'U-Net':8} {'size':5} {'N':>4} {'dtype':5} {'params M':>9} {'step ms':>9} "
                     f"{'img/s':>9} {'peak MiB':>9} {'saved MiB':>10} {'state MiB':>10}")
        for r in unet_rows:
            peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            lines.append(f"{r['model']:8} {r['size']:5} {r['N']:>4} {r['dtype']:5} {r['parameters'] / 1e6:>9.2f} "
                         f"{r['step_ms']:>9.1f} {r['images_per_s']:>9.1f} {peak:>9} {r['saved_mib']:>10.1f} "
                         f"{r['state_mib']:>10.1f}")
        for dname in dict.fromkeys(r["dtype"] for r in unet_rows):
            by_model = {r["model"]: r for r in unet_rows if r["dtype"] == dname}
            for dcn in ("dcnv4", "dcnv4_rv", "dcnv4_mp"):
                if dcn not in by_model or "conv" not in by_model:
                    continue
                d, c = by_model[dcn], by_model["conv"]
                ratios = [f"img/s {d['images_per_s'] / c['images_per_s']:.2f}",
                          f"saved {d['saved_mib'] / c['saved_mib']:.2f}",
                          f"saved+state {(d['saved_mib'] + d['state_mib']) / (c['saved_mib'] + c['state_mib']):.2f}"]
                if d["peak_mib"] is not None:
                    ratios.append(f"peak {d['peak_mib'] / c['peak_mib']:.2f}")
                lines.append(f"{dcn}/conv {dname}: " + ", ".join(ratios))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--layer_batch", type=int, default=None, help="N for the layers (64 on GPU, 1 on CPU)")
    parser.add_argument("--size", choices=list(UNET_SIZES), default=None, help="U-Net size (S on GPU, tiny on CPU)")
    parser.add_argument("--sample_size", type=int, default=None, help="latent size (32 on GPU, 16 on CPU)")
    parser.add_argument("--unet_batch", type=int, default=None, help="U-Net batch (64 on GPU, 4 on CPU)")
    parser.add_argument("--group_channels", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--skip", choices=["layers", "unet"], default=None)
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        print(f"error: --device must be a torch device such as cpu or cuda, got {args.device!r}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda asked for but no CUDA device is available", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    layer_batch = args.layer_batch or (64 if gpu else 1)
    size = args.size or ("S" if gpu else "tiny")
    sample_size = args.sample_size or (32 if gpu else 16)
    unet_batch = args.unet_batch or (64 if gpu else 4)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    iters = args.iters or (20 if gpu else 2)
    if gpu:
        torch.backends.cudnn.benchmark = True

    rows = []
    try:
        if args.skip != "layers":
            rows += bench_layers(device, layer_batch, args.dtypes, warmup, iters, args.group_channels)
        if args.skip != "unet":
            rows += bench_unets(device, size, sample_size, unet_batch, args.dtypes, warmup, iters,
                                args.group_channels)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = dict(device=torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu",
                torch=torch.__version__, op="compiled",
                threads=torch.get_num_threads(), warmup=warmup, iters=iters)
    print(f"{meta['device']}, torch {meta['torch']}, DCNv4 op: {meta['op']}, median of {iters}")
    print(_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
