"""Benchmark DCNv4Conv2d against a 3x3 nn.Conv2d at U-Net shapes (forward+backward, and forward without
gradient) and one training step and one no-grad evaluation of the DCNv4 U-Net against its conv baseline
(images/s, peak memory), in float32 and bf16 autocast, in the memory format train_ldm.py trains in
(channels_last on a GPU, NCHW on the CPU; `--memory_format` picks). The candidates of each comparison are
timed in interleaved rounds (medians), so that load from other processes falls on all of them alike.
Prints a table with the ratios and writes JSON.

Memory is reported two ways: the CUDA allocator's peak above what was held before the call (GPU
only), and on every device the bytes of the tensors autograd keeps for the backward ("saved",
activations plus autocast's weight copies) and the training state (parameters, gradients and AdamW's
two moments, float32), whose sum is the step's memory bar the allocator's transients.

    python benchmarks/bench_unet.py --device cuda --out bench_unet_h100.json
    python benchmarks/bench_unet.py --device cpu     # small batch, few iterations: about a minute
    python benchmarks/bench_unet.py --device cpu --size tiny --sample_size 8 --unet_batch 32   # the CPU ratios

`--profile STEPS` (CPU) adds where each U-Net's training step spends its time: the DCNv4 op's kernels, the
DCNv4 layers' projections (matrix products) and their other work (copies, bias sums), convolutions, the
optimizer and everything else, and what the DCNv4 U-Net's step costs more than the conv U-Net's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys

import torch
import torch.nn.functional as F

from unet_dcnv4.modules import DCNv4Conv2d
from unet_dcnv4.timing import synchronize, time_interleaved
from unet_dcnv4.unet import UNET_SIZES, build_unet

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}

LAYER_SHAPES = [(64, 64, 128), (32, 32, 256), (16, 16, 512)]  # (H, W, C) of the U-Net levels (GPU, N = 64)
# CPU: (U-Net, N, H, W, C_in, C_out) of the tiny U-Net's layers (batch 32, 8x8 latents: a level's convs and
# the widening conv1 of the first up block) and of the S U-Net's levels (32x32 latents, batch 8).
CPU_LAYER_SHAPES = [("tiny", 32, 8, 8, 32, 32), ("tiny", 32, 4, 4, 64, 64), ("tiny", 32, 4, 4, 128, 64),
                    ("S", 8, 32, 32, 64, 64), ("S", 8, 16, 16, 128, 128), ("S", 8, 8, 8, 256, 256)]
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _peak_mib(fn, device: torch.device) -> float | None:
    """Peak CUDA memory of one call of fn above what was allocated before it (activations, gradients,
    workspaces: not the inputs, weights and optimizer state already held), in MiB; None on other devices.
    Measured from the memory in use before the call, so that the other candidates' tensors, resident
    while they are timed in the same rounds, do not count."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


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

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


# What --profile sorts a training step's time into. An event belongs to the group of the innermost event
# around it (itself included) that names one: within the DCNv4 layer op, the op's own kernels, the
# projections' matrix products (with their bias copies) and the rest (copies to pixel rows, bias-gradient
# sums, the autograd node).
PROFILE_GROUPS = ("DCNv4 op kernels", "DCNv4 projections", "DCNv4 layers, other", "convolutions", "optimizer",
                  "everything else")
_OP_KERNELS = ("unet_dcnv4::dcnv4_forward", "unet_dcnv4::dcnv4_backward")
_MATRIX_PRODUCTS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::baddbmm_")
_CONVOLUTIONS = ("aten::convolution", "aten::convolution_backward", "ConvolutionBackward0")


def _in_layer(event) -> bool:
    return event.name.startswith("unet_dcnv4::dcnv4_layer") or "LayerFunction" in event.name


def _profile_group(event) -> str:
    chain = []
    while event is not None:
        chain.append(event)
        event = event.cpu_parent
    for i, e in enumerate(chain):
        if e.name in _OP_KERNELS:
            return "DCNv4 op kernels"
        if e.name in _MATRIX_PRODUCTS and any(_in_layer(outer) for outer in chain[i + 1:]):
            return "DCNv4 projections"
        if _in_layer(e):
            return "DCNv4 layers, other"
        if e.name in _CONVOLUTIONS:
            return "convolutions"
        if e.name.startswith("Optimizer."):  # torch.optim's step and zero_grad
            return "optimizer"
    return "everything else"


def profile_groups(fn, steps: int) -> dict[str, float]:
    """CPU self time per call of fn (ms) by PROFILE_GROUPS, from torch.profiler over `steps` calls after
    one unprofiled call. Their sum leaves out the Python between ops and adds the profiler's own cost per
    op, so it is not the timed step: compare the groups of two models, not a group with the timings."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    groups = dict.fromkeys(PROFILE_GROUPS, 0.0)
    for event in prof.events():
        groups[_profile_group(event)] += event.self_cpu_time_total / 1e3 / steps
    return groups


def bench_layers(device, batch, dtypes, warmup, iters, group_channels, min_ms=0.0,
                 memory_format=torch.channels_last) -> list[dict]:
    """Forward+backward and no-grad forward of DCNv4Conv2d(C_in, C_out) and nn.Conv2d(C_in, C_out, 3,
    padding=1), interleaved, at each shape: LAYER_SHAPES (N = batch) on a GPU, CPU_LAYER_SHAPES on the CPU
    (N = batch when given)."""
    if device.type == "cuda":
        shapes = [("-", batch or 64, H, W, C, C) for H, W, C in LAYER_SHAPES]
    else:
        shapes = [(u, batch or n, H, W, ci, co) for u, n, H, W, ci, co in CPU_LAYER_SHAPES]
    rows = []
    for unet, N, H, W, C_in, C_out in shapes:
        x = torch.randn(N, C_in, H, W, device=device).to(memory_format=memory_format).requires_grad_()
        layers = {
            "dcnv4": DCNv4Conv2d(C_in, C_out, group_channels=group_channels),
            "conv3x3": torch.nn.Conv2d(C_in, C_out, 3, padding=1),
        }
        layers = {name: layer.to(device, memory_format=memory_format) for name, layer in layers.items()}
        for dname in dtypes:

            def step(layer):
                def run():
                    with _autocast(device, DTYPES[dname]):
                        y = layer(x)
                    y.float().sum().backward()
                return run

            def forward(layer):
                def run():
                    with _autocast(device, DTYPES[dname]):
                        layer(x)
                return run

            def no_grad_forward(layer):
                def run():
                    with torch.no_grad():
                        forward(layer)()
                return run

            fns = {}
            for lname, layer in layers.items():
                fns[(lname, "step")] = step(layer)
                fns[(lname, "fwd")] = no_grad_forward(layer)
            ms = time_interleaved(fns, warmup, iters, min_ms, device)
            for lname, layer in layers.items():
                rows.append(dict(kind="layer", layer=lname, unet=unet, N=N, H=H, W=W, C=C_out, C_in=C_in, dtype=dname,
                                 fwd_bwd_ms=ms[(lname, "step")], fwd_ms=ms[(lname, "fwd")],
                                 peak_mib=_peak_mib(step(layer), device),
                                 saved_mib=saved_mib(forward(layer), exclude=[x, *layer.parameters()])))
    return rows


def bench_unets(device, size, sample_size, batch, dtypes, warmup, iters, group_channels, min_ms=0.0,
                memory_format=torch.channels_last, profile_steps=0) -> list[dict]:
    """One training step (noise-prediction MSE, the fused AdamW as train_ldm.py uses) and one no-grad
    evaluation of the DCNv4 U-Net (without and with recompute_value, and widened to the conv U-Net's
    parameters) and the conv U-Net, all four timed in interleaved rounds; with profile_steps, also each
    training step's CPU time by PROFILE_GROUPS (rows of kind "profile")."""
    models = {}
    # dcnv4_rv: the DCNv4 U-Net with recompute_value; dcnv4_mp: with match: params.
    for name in ("dcnv4", "dcnv4_rv", "dcnv4_mp", "conv"):
        torch.manual_seed(0)
        options = dict(match="params") if name == "dcnv4_mp" else {}
        model = build_unet(name.split("_")[0], size, sample_size, group_channels=group_channels, **options)
        if name == "dcnv4_rv":
            model.enable_value_recompute()
        model = model.to(device, memory_format=memory_format).train()
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))
    x = torch.randn(batch, 4, sample_size, sample_size, device=device).to(memory_format=memory_format)
    noise = torch.randn_like(x)
    t = torch.randint(0, 1000, (batch,), device=device)
    rows = []
    for dname in dtypes:

        def step(model, opt):
            def run():
                with _autocast(device, DTYPES[dname]):
                    pred = model(x, t).sample
                loss = F.mse_loss(pred.float(), noise)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return run

        def forward(model):
            def run():
                with _autocast(device, DTYPES[dname]):
                    model(x, t)
            return run

        def evaluate(model):
            def run():
                with torch.no_grad():
                    forward(model)()
            return run

        fns = {}
        for name, (model, opt) in models.items():
            fns[(name, "step")] = step(model, opt)
            fns[(name, "eval")] = evaluate(model)
        ms = time_interleaved(fns, warmup, iters, min_ms, device)
        for name, (model, opt) in models.items():
            params = sum(p.numel() for p in model.parameters())
            rows.append(dict(kind="unet", model=name, size=size, sample_size=sample_size, N=batch,
                             dtype=dname, parameters=params, step_ms=ms[(name, "step")],
                             images_per_s=batch / ms[(name, "step")] * 1e3, eval_ms=ms[(name, "eval")],
                             peak_mib=_peak_mib(step(model, opt), device),
                             saved_mib=saved_mib(forward(model), exclude=[x, *model.parameters()]),
                             state_mib=4 * 4 * params / 2**20))
        if profile_steps:
            for name, (model, opt) in models.items():
                rows.append(dict(kind="profile", model=name, dtype=dname, steps=profile_steps,
                                 ms=profile_groups(step(model, opt), profile_steps)))
    return rows


def _table(rows: list[dict]) -> str:
    lines = []
    layer_rows = [r for r in rows if r["kind"] == "layer"]
    if layer_rows:
        lines.append(f"{'layer':8} {'U-Net':5} {'N':>4} {'HxW Cin->Cout':>16} {'dtype':5} {'fwd+bwd ms':>11} "
                     f"{'fwd ms':>8} {'peak MiB':>9} {'saved MiB':>10}")
        for r in layer_rows:
            peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            shape = f"{r['H']}x{r['W']} {r['C_in']}->{r['C']}"
            lines.append(f"{r['layer']:8} {r['unet']:5} {r['N']:>4} {shape:>16} {r['dtype']:5} "
                         f"{r['fwd_bwd_ms']:>11.2f} {r['fwd_ms']:>8.2f} {peak:>9} {r['saved_mib']:>10.1f}")
        for dcn in [r for r in layer_rows if r["layer"] == "dcnv4"]:
            conv = next(r for r in layer_rows if r["layer"] == "conv3x3" and r["dtype"] == dcn["dtype"] and
                        (r["N"], r["H"], r["W"], r["C_in"], r["C"]) == (dcn["N"], dcn["H"], dcn["W"], dcn["C_in"],
                                                                         dcn["C"]))
            lines.append(f"dcnv4 speed / conv3x3 {dcn['unet']} N{dcn['N']} {dcn['H']}x{dcn['W']} "
                         f"{dcn['C_in']}->{dcn['C']} {dcn['dtype']}: fwd+bwd "
                         f"{conv['fwd_bwd_ms'] / dcn['fwd_bwd_ms']:.2f}, fwd {conv['fwd_ms'] / dcn['fwd_ms']:.2f}")
    unet_rows = [r for r in rows if r["kind"] == "unet"]
    if unet_rows:
        lines.append(f"{'U-Net':8} {'size':5} {'N':>4} {'dtype':5} {'params M':>9} {'step ms':>9} "
                     f"{'img/s':>9} {'eval ms':>8} {'peak MiB':>9} {'saved MiB':>10} {'state MiB':>10}")
        for r in unet_rows:
            peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            lines.append(f"{r['model']:8} {r['size']:5} {r['N']:>4} {r['dtype']:5} {r['parameters'] / 1e6:>9.2f} "
                         f"{r['step_ms']:>9.1f} {r['images_per_s']:>9.1f} {r['eval_ms']:>8.1f} {peak:>9} "
                         f"{r['saved_mib']:>10.1f} "
                         f"{r['state_mib']:>10.1f}")
        for dname in dict.fromkeys(r["dtype"] for r in unet_rows):
            by_model = {r["model"]: r for r in unet_rows if r["dtype"] == dname}
            for dcn in ("dcnv4", "dcnv4_rv", "dcnv4_mp"):
                if dcn not in by_model or "conv" not in by_model:
                    continue
                d, c = by_model[dcn], by_model["conv"]
                ratios = [f"img/s {d['images_per_s'] / c['images_per_s']:.2f}",
                          f"eval speed {c['eval_ms'] / d['eval_ms']:.2f}",
                          f"saved {d['saved_mib'] / c['saved_mib']:.2f}",
                          f"saved+state {(d['saved_mib'] + d['state_mib']) / (c['saved_mib'] + c['state_mib']):.2f}"]
                if d["peak_mib"] is not None:
                    ratios.append(f"peak {d['peak_mib'] / c['peak_mib']:.2f}")
                lines.append(f"{dcn}/conv {dname}: " + ", ".join(ratios))
    profile_rows = [r for r in rows if r["kind"] == "profile"]
    if profile_rows:
        models = list(dict.fromkeys(r["model"] for r in profile_rows))
        lines.append(f"profile: CPU self time of a training step, ms ({profile_rows[0]['steps']} profiled steps)")
        lines.append(f"{'dtype':5} {'group':20} " + " ".join(f"{m:>9}" for m in models))
        for dname in dict.fromkeys(r["dtype"] for r in profile_rows):
            by_model = {r["model"]: r["ms"] for r in profile_rows if r["dtype"] == dname}
            for group in (*PROFILE_GROUPS, "total"):
                cells = [sum(by_model[m].values()) if group == "total" else by_model[m][group] for m in models]
                lines.append(f"{dname:5} {group:20} " + " ".join(f"{c:>9.2f}" for c in cells))
            if "conv" not in by_model:
                continue
            conv = by_model["conv"]
            for dcn in (m for m in models if m != "conv"):
                d = by_model[dcn]
                gap = sum(d.values()) - sum(conv.values())
                layers = sum(d[g] for g in PROFILE_GROUPS[:3])
                lines.append(f"{dcn}-conv {dname}: {gap:+.2f} ms a step; the DCNv4 layers take {layers:.2f} ms "
                             f"(op kernels {d['DCNv4 op kernels']:.2f}, projections {d['DCNv4 projections']:.2f}, "
                             f"other {d['DCNv4 layers, other']:.2f}) where conv's convolutions take "
                             f"{conv['convolutions'] - d['convolutions']:.2f} ms more; optimizer "
                             f"{d['optimizer'] - conv['optimizer']:+.2f}, everything else "
                             f"{d['everything else'] - conv['everything else']:+.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--layer_batch", type=int, default=None,
                        help="N for the layers (64 on GPU; on CPU each U-Net's own, 32 tiny and 8 S)")
    parser.add_argument("--size", choices=list(UNET_SIZES), default=None, help="U-Net size (S on GPU, tiny on CPU)")
    parser.add_argument("--sample_size", type=int, default=None, help="latent size (32 on GPU, 16 on CPU)")
    parser.add_argument("--unet_batch", type=int, default=None, help="U-Net batch (64 on GPU, 4 on CPU)")
    parser.add_argument("--group_channels", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--skip", choices=["layers", "unet"], default=None)
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile STEPS training steps of each U-Net (CPU only) and print where the "
                             "time goes: the DCNv4 op kernels, projections and other layer work, "
                             "convolutions, the optimizer, everything else")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--memory_format", choices=list(MEMORY_FORMATS), default=None,
                        help="layout of the inputs and models (default as train_ldm.py trains: channels_last on "
                             "a GPU, contiguous (NCHW) on the CPU)")
    parser.add_argument("--min_ms", type=float, default=None,
                        help="each round times at least this long a batch of calls (30 on CPU, 0 on GPU)")
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
    if args.profile < 0:
        print(f"error: --profile must be a number of steps >= 0, got {args.profile}", file=sys.stderr)
        return 2
    if args.profile and device.type != "cpu":
        print("error: --profile times the CPU (on a GPU, benchmarks/gpu_check.sh profiles the kernels with "
              "Nsight Compute)", file=sys.stderr)
        return 2
    if args.profile and args.skip == "unet":
        print("error: --profile profiles the U-Nets' training steps, which --skip unet leaves out", file=sys.stderr)
        return 2
    layer_batch = args.layer_batch
    size = args.size or ("S" if gpu else "tiny")
    sample_size = args.sample_size or (32 if gpu else 16)
    unet_batch = args.unet_batch or (64 if gpu else 4)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    iters = args.iters or (20 if gpu else 5)
    min_ms = args.min_ms if args.min_ms is not None else (0.0 if gpu else 30.0)
    memory_format = args.memory_format or ("channels_last" if gpu else "contiguous")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True

    rows = []
    try:
        if args.skip != "layers":
            rows += bench_layers(device, layer_batch, args.dtypes, warmup, iters, args.group_channels, min_ms,
                                 MEMORY_FORMATS[memory_format])
        if args.skip != "unet":
            rows += bench_unets(device, size, sample_size, unet_batch, args.dtypes, warmup, iters,
                                args.group_channels, min_ms, MEMORY_FORMATS[memory_format], args.profile)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = dict(device=torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu",
                torch=torch.__version__, op="compiled",
                threads=torch.get_num_threads(), warmup=warmup, iters=iters, memory_format=memory_format)
    print(f"{meta['device']}, torch {meta['torch']}, {meta['threads']} threads, DCNv4 op: {meta['op']}, "
          f"{memory_format}, median of {iters} interleaved rounds")
    print(_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
