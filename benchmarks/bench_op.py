"""Times the compiled DCNv4 op (forward, backward) against its memory floor, the PyTorch reference and
cuDNN 3x3 convolutions of the same width on a GPU (the anchor shapes), or on the CPU against a
grid_sample formulation of the same op and the PyTorch reference (the issue's shape and the tiny U-Net's
layer shapes), forward+backward through autograd, the candidates interleaved and the median ratio kept.

    python benchmarks/bench_op.py --device cuda --out bench.json
    python benchmarks/bench_op.py --device cpu            # float32 and bfloat16, a minute or two
    python benchmarks/bench_op.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from unet_dcnv4.ops import dcnv4, dcnv4_reference, load_extension
from unet_dcnv4.timing import time_interleaved

HERE = Path(__file__).resolve().parent
# (N, H, W, C, G), group_channels 16: the shapes of anchors_h100.json.
ANCHOR_SHAPES = [(64, 56, 56, 64, 4), (64, 28, 28, 128, 8), (64, 14, 14, 256, 16), (64, 7, 7, 512, 32),
                 (1, 200, 320, 128, 8), (64, 64, 64, 128, 8), (64, 32, 32, 256, 16), (64, 16, 16, 512, 32)]
# The shape, then the tiny U-Net's DCNv4 layers at batch 32 on 8x8 latents (8x8x32 and 4x4x64).
CPU_SHAPES = [(8, 32, 32, 64, 4), (32, 8, 8, 32, 2), (32, 4, 4, 64, 4), (2, 16, 16, 32, 2)]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
K = 9  # 3x3, the anchors' kernel


def padded_channels(G: int) -> int:
    """offset_mask channels as the official layer allocates them: 3GK rounded up to a multiple of 8."""
    return (3 * G * K + 7) // 8 * 8


def make_inputs(shape, dtype, device, seed=0, offset_std=2.0):
    """value (N, H, W, C) ~ randn, offsets offset_std * randn, masks randn, padded offset_mask: as the anchors
    with the default offset_std 2 (0: every sampling position on a pixel, as in a fresh layer)."""
    N, H, W, C, G = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    value = torch.randn(N, H, W, C, generator=gen, device=device).to(dtype)
    om = torch.randn(N, H, W, padded_channels(G), generator=gen, device=device)
    om_used = om[..., : 3 * G * K].view(N, H, W, G, 3 * K)
    om_used[..., : 2 * K] *= offset_std
    return value, om.to(dtype)


def floor_bytes(shape, dtype) -> tuple[int, int]:
    """Bytes the op must move: forward value + offset_mask + output; backward value + offset_mask +
    grad_output read, grad_value + grad_offset_mask written."""
    N, H, W, C, G = shape
    size = torch.empty((), dtype=dtype).element_size()
    v = N * H * W * C * size
    om = N * H * W * padded_channels(G) * size
    return 2 * v + om, 3 * v + 2 * om


def op_args(G):
    return ([3, 3], [1, 1], [1, 1], [1, 1], G, 1.0, False)


def bench_cuda(fn, warmup_ms=25, rep_ms=100) -> float:
    """Median ms of fn() with the L2 cache flushed before each call (triton's do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def grid_sample_dcnv4(value, offset_mask, G):
    """The op (3x3, stride 1, padding 1, offset_scale 1) written with grid_sample, as DCNv3's PyTorch
    core does it: one bilinear sample per (pixel, group, point), then the mask-weighted sum over points."""
    N, H, W, C = value.shape
    D = C // G
    om = offset_mask[..., : 3 * G * K].reshape(N, H, W, G, 3 * K)
    offset = om[..., : 2 * K].reshape(N, H, W, G, K, 2)
    mask = om[..., 2 * K:]  # (N, H, W, G, K)
    taps = torch.tensor([(i - 1, j - 1) for i in range(3) for j in range(3)], dtype=value.dtype)  # x outer
    x = torch.arange(W, dtype=value.dtype)[None, None, :, None, None] + taps[:, 0] + offset[..., 0]
    y = torch.arange(H, dtype=value.dtype)[None, :, None, None, None] + taps[:, 1] + offset[..., 1]
    grid = torch.stack([(2 * x + 1) / W - 1, (2 * y + 1) / H - 1], dim=-1)  # (N, H, W, G, K, 2)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(N * G, H * W, K, 2)
    v = value.reshape(N, H * W, G, D).permute(0, 2, 3, 1).reshape(N * G, D, H, W)
    sampled = torch.nn.functional.grid_sample(v, grid, mode="bilinear", padding_mode="zeros",
                                              align_corners=False)  # (N * G, D, H * W, K)
    out = (sampled * mask.permute(0, 3, 1, 2, 4).reshape(N * G, 1, H * W, K)).sum(-1)  # (N * G, D, H * W)
    return out.reshape(N, G, D, H, W).permute(0, 3, 4, 1, 2).reshape(N, H, W, C)


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy bandwidth counting bytes read plus bytes written, 1 GiB each way."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = bench_cuda(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def load_anchors(path: Path) -> dict:
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())
    return {(r["N"], r["H"], r["W"], r["C"], r["G"], r["dtype"]): r for r in doc["rows"]}


def run_cuda(dtypes, quick: bool, anchors: dict, offset_stds=(2.0,)) -> tuple[dict, list[dict]]:
    ops = torch.ops.unet_dcnv4
    gbps = copy_bandwidth_gbps()
    env = {"device": torch.cuda.get_device_name(), "sms": torch.cuda.get_device_properties(0).multi_processor_count,
           "torch": torch.__version__, "cuda": torch.version.cuda, "copy_GBps": gbps}
    print(f"# {env['device']}: device-to-device copy {gbps:.0f} GB/s", flush=True)
    rows = []
    shapes = ANCHOR_SHAPES[:4] if quick else ANCHOR_SHAPES
    for shape, name, offset_std in itertools.product(shapes, dtypes, offset_stds):
        N, H, W, C, G = shape
        dtype = DTYPES[name]
        value, om = make_inputs(shape, dtype, "cuda", offset_std=offset_std)
        args = op_args(G)
        grad_out = torch.randn_like(value)
        fwd_bytes, bwd_bytes = floor_bytes(shape, dtype)
        row = {"N": N, "H": H, "W": W, "C": C, "G": G, "dtype": name, "offset_std": offset_std,
               "floor_fwd_ms": fwd_bytes / (gbps * 1e9) * 1e3, "floor_bwd_ms": bwd_bytes / (gbps * 1e9) * 1e3}
        out = ops.dcnv4_forward(value, om, *args)
        ref = dcnv4_reference(value.float(), om.float(), 3, 1, 1, 1, G)
        row["err_fwd"] = rel_err(out, ref)
        row["fwd_ms"] = bench_cuda(lambda: ops.dcnv4_forward(value, om, *args))
        row["bwd_ms"] = bench_cuda(lambda: ops.dcnv4_backward(grad_out, value, om, *args))
        # The tiled backward (the op's cuda_backward="tiled"), same inputs, and how far its gradients
        # are from the atomic kernel's (float summation order only).
        grads = ops.dcnv4_backward(grad_out, value, om, *args)
        row["bwd_tiled_ms"] = bench_cuda(lambda: ops.dcnv4_backward(grad_out, value, om, *args, "tiled"))
        grads_tiled = ops.dcnv4_backward(grad_out, value, om, *args, "tiled")
        row["err_bwd_tiled"] = max(rel_err(a, b) for a, b in zip(grads_tiled, grads))
        del out, ref, grads, grads_tiled
        if not quick:
            v_ref = value.detach().requires_grad_()
            om_ref = om.detach().requires_grad_()
            row["ref_fwd_ms"] = bench_cuda(lambda: dcnv4_reference(value, om, 3, 1, 1, 1, G), rep_ms=50)

            def ref_fwd_bwd():
                dcnv4_reference(v_ref, om_ref, 3, 1, 1, 1, G).backward(grad_out)

            row["ref_fwdbwd_ms"] = bench_cuda(ref_fwd_bwd, rep_ms=50)
        # cuDNN 3x3 convolutions of the same width on channels-last NCHW views of the same data.
        x = value.permute(0, 3, 1, 2)
        dense = torch.nn.Conv2d(C, C, 3, padding=1, bias=False).to("cuda", dtype, memory_format=torch.channels_last)
        depthwise = torch.nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False).to(
            "cuda", dtype, memory_format=torch.channels_last)
        with torch.no_grad():
            row["conv3x3_fwd_ms"] = bench_cuda(lambda: dense(x))
            row["dwconv3x3_fwd_ms"] = bench_cuda(lambda: depthwise(x))
        anchor = anchors.get((N, H, W, C, G, name)) if offset_std == 2.0 else None  # the anchors' inputs
        if anchor:
            for d in ("fwd", "bwd"):
                if f"best_{d}_x_floor" in anchor:
                    row[f"anchor_{d}_x_floor"] = anchor[f"best_{d}_x_floor"]
                    row[f"anchor_{d}_impl"] = anchor[f"best_{d}_impl"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del value, om, grad_out, dense, depthwise, x
        torch.cuda.empty_cache()
    return env, rows


def run_cpu(dtypes, quick: bool, offset_stds=(2.0,)) -> tuple[dict, list[dict]]:
    ops = torch.ops.unet_dcnv4
    env = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__}
    rows = []
    shapes = CPU_SHAPES[:1] if quick else CPU_SHAPES
    for shape, offset_std in itertools.product(shapes, offset_stds):
        N, H, W, C, G = shape
        for name in dtypes:
            dtype = DTYPES[name]
            value, om = make_inputs(shape, dtype, "cpu", offset_std=offset_std)
            args = op_args(G)
            grad_out = torch.randn_like(value)
            row = {"N": N, "H": H, "W": W, "C": C, "G": G, "dtype": name, "offset_std": offset_std}
            ref64 = dcnv4_reference(value.double(), om.double(), 3, 1, 1, 1, G)
            row["err_fwd"] = rel_err(ops.dcnv4_forward(value, om, *args), ref64)
            row["err_grid_sample"] = rel_err(grid_sample_dcnv4(value, om, G), ref64)
            v_g, om_g = value.detach().requires_grad_(), om.detach().requires_grad_()

            def fwd_bwd(fn):
                def run():
                    v_g.grad = om_g.grad = None
                    fn(v_g, om_g).backward(grad_out)
                return run

            ms = time_interleaved({
                "fwd": lambda: ops.dcnv4_forward(value, om, *args),
                "bwd": lambda: ops.dcnv4_backward(grad_out, value, om, *args),
                "fwdbwd": fwd_bwd(lambda v, o: dcnv4(v, o, 3, 1, 1, 1, G)),
                "gs_fwdbwd": fwd_bwd(lambda v, o: grid_sample_dcnv4(v, o, G)),
                "ref_fwdbwd": fwd_bwd(lambda v, o: dcnv4_reference(v, o, 3, 1, 1, 1, G)),
            }, warmup=1, iters=3 if quick else 7, min_ms=20.0)
            row.update({f"{k}_ms": v for k, v in ms.items()})
            row["speedup_fwdbwd_vs_grid_sample"] = ms["gs_fwdbwd"] / ms["fwdbwd"]
            row["speedup_fwdbwd_vs_ref"] = ms["ref_fwdbwd"] / ms["fwdbwd"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return env, rows


def fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def shape_text(r: dict) -> str:
    """N,H,W,C,G, and the offsets' std where it is not the anchors' 2."""
    std = r.get("offset_std", 2.0)
    return f"{r['N']},{r['H']},{r['W']},{r['C']},{r['G']}" + ("" if std == 2.0 else f" s{std:g}")


def table(device: str, rows: list[dict]) -> str:
    lines = []
    if device == "cuda":
        lines.append(f"{'shape (N,H,W,C,G)':<22}{'dtype':<10}{'dir':<6}{'ms':>9}{'x floor':>9}{'anchor x':>10}"
                     f"{'ref ms':>9}{'conv3x3':>9}{'dw3x3':>9}")
        for r in rows:
            shape = shape_text(r)
            for d, key, ref_key in (("fwd", "fwd", "ref_fwd_ms"), ("bwd", "bwd", "ref_fwdbwd_ms"),
                                    ("bwd-t", "bwd_tiled", None)):
                ms = r[f"{key}_ms"]
                floor = r["floor_fwd_ms" if d == "fwd" else "floor_bwd_ms"]
                anchor = r.get(f"anchor_{d}_x_floor") if d != "bwd-t" else r.get("anchor_bwd_x_floor")
                lines.append(f"{shape:<22}{r['dtype']:<10}{d:<6}{ms:>9.4f}{ms / floor:>9.2f}"
                             f"{fmt(anchor, '.2f'):>10}{fmt(r.get(ref_key) if ref_key else None):>9}"
                             f"{fmt(r['conv3x3_fwd_ms'] if d == 'fwd' else None):>9}"
                             f"{fmt(r['dwconv3x3_fwd_ms'] if d == 'fwd' else None):>9}")
        lines.append("bwd: the atomic backward kernel (the default), bwd-t: the tiled one "
                     "(cuda_backward='tiled'); 'ref ms' of bwd is the reference's forward+backward.")
    else:
        lines.append(f"{'shape (N,H,W,C,G)':<22}{'dtype':<10}{'fwd ms':>9}{'bwd ms':>9}{'f+b ms':>9}"
                     f"{'gs f+b':>9}{'ref f+b':>9}{'speedup':>9}{'vs ref':>9}")
        for r in rows:
            shape = shape_text(r)
            lines.append(f"{shape:<22}{r['dtype']:<10}{r['fwd_ms']:>9.3f}{r['bwd_ms']:>9.3f}{r['fwdbwd_ms']:>9.3f}"
                         f"{r['gs_fwdbwd_ms']:>9.3f}{r['ref_fwdbwd_ms']:>9.3f}"
                         f"{r['speedup_fwdbwd_vs_grid_sample']:>8.1f}x{r['speedup_fwdbwd_vs_ref']:>8.1f}x")
        lines.append("f+b: forward+backward through autograd; gs: the grid_sample formulation, ref: the PyTorch "
                     "reference; speedup: gs f+b / f+b (median of interleaved rounds).")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated dtypes (default: float32,float16,bfloat16 on cuda, float32,bfloat16 on cpu, "
                             "float32 on cpu with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes, no reference timings on the GPU")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--offset_std", type=float, nargs="+", default=[2.0],
                        help="std of the random offsets, each a set of rows (default: 2, the anchors'; 0 puts "
                             "every sampling position on a pixel, as in a fresh layer)")
    parser.add_argument("--anchors", type=Path, default=HERE / "anchors_h100.json",
                        help="best earlier implementations per shape, as multiples of the floor")
    args = parser.parse_args(argv)
    default = "float32,float16,bfloat16" if args.device == "cuda" else "float32" if args.quick else "float32,bfloat16"
    dtypes = (args.dtypes or default).split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        print(f"bench_op.py: unknown dtype(s) {unknown}; choose from {sorted(DTYPES)}", file=sys.stderr)
        return 2
    if any(not s >= 0 for s in args.offset_std):
        print(f"bench_op.py: --offset_std must be >= 0, got {args.offset_std}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_op.py: --device cuda needs a CUDA GPU, and none is visible", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_extension()
    if not torch._C._dispatch_has_kernel_for_dispatch_key("unet_dcnv4::dcnv4_forward", args.device.upper()):
        print(f"bench_op.py: the extension has no {args.device} kernels (built without them)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if args.device == "cuda":
        env, rows = run_cuda(dtypes, args.quick, load_anchors(args.anchors), args.offset_std)
    else:
        env, rows = run_cpu(dtypes, args.quick, args.offset_std)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(table(args.device, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
