"""One forward and one backward of the DCNv4 op per dtype at one shape, for a profiler to read.

    ncu --clock-control none -k regex:"forward_kernel|backward_kernel" --section SpeedOfLight \
        python benchmarks/profile_op.py --shape 64 32 32 256 16

Each kernel runs after a warm-up call, so the profiled launch is not the first of the process.
"""

from __future__ import annotations

import argparse

import torch

from unet_dcnv4.ops import load_extension

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=5, default=[64, 32, 32, 256, 16], metavar=("N", "H", "W", "C", "G"))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--cuda_backward", choices=["atomic", "tiled"], default="atomic")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("profile_op.py needs a CUDA device")
    N, H, W, C, G = args.shape
    if C % G:
        parser.error(f"--shape: C ({C}) must be a multiple of G ({G})")
    load_extension()
    ops = torch.ops.unet_dcnv4
    hyper = ([3, 3], [1, 1], [1, 1], [1, 1], G, 1.0, False, args.cuda_backward)
    P = -(-3 * G * 9 // 8) * 8  # 3GK rounded up to a multiple of 8, as the layers allocate it
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name in args.dtypes:
        dtype = DTYPES[name]
        value = torch.randn(N, H, W, C, device="cuda", generator=gen).to(dtype)
        offset_mask = (2 * torch.randn(N, H, W, P, device="cuda", generator=gen)).to(dtype)
        grad_out = torch.randn(N, H, W, C, device="cuda", generator=gen).to(dtype)
        for _ in range(2):  # a warm-up call, then the profiled one
            ops.dcnv4_forward(value, offset_mask, *hyper)
            ops.dcnv4_backward(grad_out, value, offset_mask, *hyper)
        torch.cuda.synchronize()
        print(f"{name}: N={N} H={H} W={W} C={C} G={G}, two forward and two backward calls", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
