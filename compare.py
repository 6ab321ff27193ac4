"""Compare two arms of training runs (e.g. DCNv4 U-Nets and their conv baselines, several seeds each) by FID/KID,
with the interval of the FID difference (Welch's t on the per-run FIDs with several runs an arm; image noise
only with one), cost and throughput.

Every run is sampled with the same sampler, steps, seeds and number of images and measured against one reference
(the training data, another image folder, or a .npz of Inception statistics such as ADM's reference batches), then
`comparison.json`, `comparison.md` and `comparison.png` are written to --output_dir (with --isc and --prc, the
Inception Score, precision and recall of every run and their mean per arm too).
`compare.py RUN_A RUN_B` compares one run per arm; `compare.py --a RUN... --b RUN...` several;
`compare.py --pool A/comparison.json B/comparison.json --output_dir C` pools comparisons of other seeds of the
same two arms, measured the same way (say on two machines), into one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipelines import SAMPLERS
from unet_dcnv4._checks import positive_int
from unet_dcnv4.comparison import compare_arms, pool_comparisons
from unet_dcnv4.sampling import CLASS_MIXES, PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="two train_ldm.py output folders, arm a then arm b (one run each)")
    parser.add_argument("--a", nargs="+", default=None, metavar="RUN", help="the runs of arm a (e.g. DCNv4 seeds)")
    parser.add_argument("--b", nargs="+", default=None, metavar="RUN", help="the runs of arm b (e.g. conv seeds)")
    parser.add_argument("--pool", nargs="+", default=None, metavar="COMPARISON_JSON",
                        help="instead of runs: comparison.json files of other runs (other seeds) of the same two arms, "
                             "measured the same way (say on other machines), pooled into one comparison in "
                             "--output_dir; nothing is sampled")
    parser.add_argument("--output_dir", required=True, help="where samples and comparison.{json,md,png} go")
    parser.add_argument("--samples_dir", default=None,
                        help="where each run's samples go, reused when their manifest matches (default: "
                             "OUTPUT_DIR/samples; comparisons that share runs can share it)")
    parser.add_argument("--reference", default=None,
                        help="image folder, or .npz of its Inception statistics (ADM's reference batches, e.g. "
                             "VIRTUAL_imagenet256_labeled.npz, or a `python -m unet_dcnv4.metrics --save_stats` file), "
                             "to measure against (default: the training data)")
    parser.add_argument("--num_images", type=int, default=None,
                        help="samples per run (default: as many as reference images or activations; required with "
                             "an .npz of statistics only)")
    parser.add_argument("--isc", action="store_true", help="also measure each run's Inception Score")
    parser.add_argument("--prc", action="store_true",
                        help="also measure each run's precision and recall (needs reference images or activations)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every run")
    parser.add_argument("--mixed_precision", choices=sorted(PRECISIONS), default="no")
    parser.add_argument("--guidance_scale", type=float, default=1.0,
                        help="classifier-free guidance scale of class-conditional runs (1: none)")
    parser.add_argument("--class_mix", choices=CLASS_MIXES, default="data",
                        help="class mix of the samples: the training set's frequencies (data) or uniform")
    parser.add_argument("--cache_dir", default=None, help="FID reference features cache (default: torch-fidelity's)")
    parser.add_argument("--no_fid_curve", action="store_true", help="skip FID at the intermediate checkpoints")
    parser.add_argument("--curve_steps", type=int, nargs="+", default=None, metavar="STEP",
                        help="measure the FID curve at these checkpoint steps only (default: every checkpoint)")
    parser.add_argument("--grid_images", type=int, default=36, help="images per grid in the figure")
    parser.add_argument("--jackknife_groups", type=int, default=50,
                        help="groups of the jackknife that measures the image noise of an arm of one run")
    parser.add_argument("--allow_mismatch", action="append", default=[], metavar="KEY",
                        help="compare runs that differ in this experiment key anyway (repeatable; 'all' for any)")
    parser.add_argument("--overwrite", action="store_true",
                        help="regenerate sample folders that another model or other settings wrote")
    parser.add_argument("--skip_corrupt", action="store_true", help="leave unreadable reference images out")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from diffusers.utils.logging import disable_progress_bar

    disable_progress_bar()
    start = time.perf_counter()
    try:
        if args.pool is not None:
            if args.runs or args.a or args.b:
                raise ValueError("--pool pools comparisons already measured: give no runs with it")
            summaries = [json.loads(Path(path).read_text()) for path in args.pool]
            pool_comparisons(summaries, sources=args.pool, output_dir=args.output_dir)
            print(f"pooled comparison written to {args.output_dir} in {time.perf_counter() - start:.0f} s")
            return 0
        if args.runs and (args.a or args.b):
            raise ValueError("give the runs either as two positional folders or with --a and --b, not both")
        if args.runs and len(args.runs) != 2:
            raise ValueError(f"give exactly two positional run folders (arm a, arm b), got {len(args.runs)}")
        arms = [[args.runs[0]], [args.runs[1]]] if args.runs else [args.a, args.b]
        if not all(arms):
            raise ValueError("give two positional run folders, or both --a RUN... and --b RUN...")
        for name in ("num_images", "num_inference_steps", "batch_size", "grid_images", "jackknife_groups"):
            if getattr(args, name) is not None:
                positive_int(f"--{name}", getattr(args, name))
        if args.jackknife_groups < 2:
            raise ValueError(f"--jackknife_groups must be >= 2, got {args.jackknife_groups}")
        compare_arms(arms, args.output_dir, samples_dir=args.samples_dir, reference=args.reference, num_images=args.num_images,
                     sampler=args.sampler, num_inference_steps=args.num_inference_steps, batch_size=args.batch_size,
                     seed=args.seed, mixed_precision=args.mixed_precision, cache_dir=args.cache_dir,
                     fid_curve=not args.no_fid_curve, curve_steps=args.curve_steps, grid_images=args.grid_images, jackknife_groups=args.jackknife_groups,
                     allow_mismatch=tuple(args.allow_mismatch), overwrite=args.overwrite,
                     skip_corrupt=args.skip_corrupt, guidance_scale=args.guidance_scale, class_mix=args.class_mix,
                     isc=args.isc, prc=args.prc)
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"comparison written to {args.output_dir} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
