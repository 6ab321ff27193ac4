"""Compare two training runs (e.g. the DCNv4 U-Net and the conv baseline) by FID/KID, cost and throughput.

Both runs are sampled with the same sampler, steps, seeds and number of images and measured against one reference
(the training data), then `comparison.json`, `comparison.md` and `comparison.png` are written to --output_dir.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from pipelines import SAMPLERS, LatentDiffusionPipeline, make_scheduler

ROOT = Path(__file__).resolve().parent
PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _sample_module():
    """sample.py, a script beside this one, as a module."""
    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_run(run_dir: str) -> dict:
    """A training run's config, statistics, pipeline folder and intermediate checkpoints.

    Args:
        run_dir: an --output_dir of train_ldm.py (config.yaml, train_stats.json, pipeline/, checkpoints/).
    """
    from unet_dcnv4.training import load_config

    run = Path(run_dir)
    for needed in ("config.yaml", "train_stats.json", "pipeline/model_index.json"):
        if not (run / needed).is_file():
            raise ValueError(f"run folder {run_dir!r} has no {needed}; "
                             "pass an --output_dir of a finished train_ldm.py run")
    checkpoints = []
    for path in (run / "checkpoints").glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            checkpoints.append((int(match.group(1)), str(path)))
    return {
        "dir": str(run),
        "config": load_config(run / "config.yaml"),
        "train_stats": json.loads((run / "train_stats.json").read_text()),
        "pipeline": str(run / "pipeline"),
        "checkpoints": sorted(checkpoints),
    }


def check_comparable(runs: list[dict]) -> None:
    """Raise ValueError when the runs were trained on different data, resolution or conditioning."""
    keys = ("data_source", "resolution", "class_conditional")
    first = runs[0]["config"]
    for run in runs[1:]:
        for key in keys:
            a, b = getattr(first, key), getattr(run["config"], key)
            if a != b:
                raise ValueError(f"runs differ in {key}: {a!r} ({runs[0]['dir']}) vs {b!r} ({run['dir']}); "
                                 "FID is only comparable against one reference")


def _sample_and_measure(pipe, out_dir, args, reference, resolution, sample) -> dict:
    """Sample args.num_images images into out_dir/images (resuming) and measure them against the reference."""
    from unet_dcnv4.metrics import compute_fid_kid

    pipe.scheduler = make_scheduler(args.sampler, pipe.scheduler.config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    if args.mixed_precision != "no":
        pipe.to(PRECISIONS[args.mixed_precision])
    pipe.set_progress_bar_config(disable=True)
    labels = 0 if pipe.unet.config.num_class_embeds else None
    # One untimed call absorbs one-time costs (kernel builds, allocator warm-up) before the timed sampling.
    pipe(batch_size=1, num_inference_steps=1, class_labels=labels, output_type="latent")
    stats_path = Path(out_dir) / "sample_stats.json"
    stats = sample.generate_samples(pipe, out_dir, args.num_images, seed=args.seed, batch_size=args.batch_size,
                                    num_inference_steps=args.num_inference_steps)
    if stats["written"]:
        images_per_s = stats["written"] / stats["seconds"]
        stats_path.write_text(json.dumps({"images_per_s": images_per_s, "images": stats["written"]}))
    elif stats_path.is_file():
        images_per_s = json.loads(stats_path.read_text())["images_per_s"]
    else:
        images_per_s = None
    metrics = compute_fid_kid(os.path.join(out_dir, sample.IMAGES_DIR), reference, resolution=resolution,
                              cache_dir=args.cache_dir, device=device)
    return {**metrics, "sampling_images_per_s": images_per_s}


def _label(run: dict, index: int, taken: set) -> str:
    label = run["config"].model_type
    return label if label not in taken else f"{label}_{index}"


def compare(args) -> dict:
    """Run the comparison described by the parsed CLI arguments; returns what comparison.json holds."""
    from unet_dcnv4.data import build_image_dataset
    from unet_dcnv4.metrics import list_images
    from unet_dcnv4.training import pipeline_from_checkpoint
    from unet_dcnv4.unet import model_report

    sample = _sample_module()
    runs = [read_run(d) for d in args.runs]
    check_comparable(runs)
    cfg = runs[0]["config"]
    reference = args.reference or build_image_dataset(cfg.data_source, resolution=cfg.resolution)
    if args.num_images is None:
        # FID on at least as many samples as the reference holds, so that sample noise does not dominate.
        args.num_images = len(list_images(reference)) if isinstance(reference, str) else len(reference)
    os.makedirs(args.output_dir, exist_ok=True)

    results, taken = [], set()
    for index, run in enumerate(runs):
        label = _label(run, index, taken)
        taken.add(label)
        print(f"[{label}] sampling {args.num_images} images from {run['pipeline']}", flush=True)
        pipe = LatentDiffusionPipeline.from_pretrained(run["pipeline"])
        report = model_report(pipe.unet)
        measured = _sample_and_measure(pipe, os.path.join(args.output_dir, label), args, reference, cfg.resolution,
                                       sample)
        curve = []
        if not args.no_fid_curve:
            final_step = run["train_stats"]["steps"]
            for step, path in run["checkpoints"]:
                if step == final_step:
                    continue
                print(f"[{label}] FID at step {step}", flush=True)
                point = _sample_and_measure(pipeline_from_checkpoint(path), os.path.join(args.output_dir, label,
                                            f"step-{step}"), args, reference, cfg.resolution, sample)
                curve.append({"step": step, "fid": point["fid"], "kid_mean": point["kid_mean"]})
            curve.append({"step": final_step, "fid": measured["fid"], "kid_mean": measured["kid_mean"]})
        results.append({
            "label": label,
            "run_dir": run["dir"],
            "model_type": run["config"].model_type,
            "model_size": run["config"].model_size,
            "fid": measured["fid"],
            "kid_mean": measured["kid_mean"],
            "kid_std": measured["kid_std"],
            "parameters": report["parameters"],
            "gflops": report["gflops"],
            "train_images_per_s": run["train_stats"].get("images_per_s"),
            "sampling_images_per_s": measured["sampling_images_per_s"],
            "train_steps": run["train_stats"]["steps"],
            "train_wall_time_s": run["train_stats"].get("wall_time_s"),
            "peak_memory_mb": run["train_stats"].get("peak_memory_mb"),
            "fid_curve": curve,
            "grid": sample.write_grid(os.path.join(args.output_dir, label), args.num_images, args.grid_images),
        })
    summary = {
        "runs": results,
        "sampler": args.sampler,
        "num_inference_steps": args.num_inference_steps,
        "num_images": args.num_images,
        "seed": args.seed,
        "mixed_precision": args.mixed_precision,
        "reference": reference if isinstance(reference, str) else f"{cfg.data_source} at {cfg.resolution}px",
        "num_reference": measured["num_reference"],
        "resolution": measured["resolution"],
        "inception_weights": measured["inception_weights"],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    with open(os.path.join(args.output_dir, "comparison.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = markdown_table(summary)
    Path(args.output_dir, "comparison.md").write_text(table)
    write_figure(summary, os.path.join(args.output_dir, "comparison.png"))
    print(table)
    return summary


def _fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def markdown_table(summary: dict) -> str:
    """The comparison as a markdown table with a line saying how it was measured."""
    precision = "fp32" if summary["mixed_precision"] == "no" else summary["mixed_precision"]
    lines = [
        "| model | FID | KID (x1000) | parameters (M) | GFLOPs | train img/s | sample img/s | train steps |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in summary["runs"]:
        lines.append(
            f"| {r['label']} | {_fmt(r['fid'], '.2f')} | {_fmt(r['kid_mean'] * 1000, '.2f')} +- "
            f"{_fmt(r['kid_std'] * 1000, '.2f')} | {_fmt(r['parameters'] / 1e6, '.2f')} | {_fmt(r['gflops'], '.3f')} | "
            f"{_fmt(r['train_images_per_s'], '.1f')} | {_fmt(r['sampling_images_per_s'], '.2f')} | {r['train_steps']} |"
        )
    lines += [
        "",
        f"{summary['num_images']} samples per model ({summary['sampler']}, {summary['num_inference_steps']} steps, "
        f"seed {summary['seed']}, {precision}) against {summary['num_reference']} reference "
        f"images ({summary['reference']}) at {summary['resolution']}px on {summary['device']}; "
        f"{summary['inception_weights']}.",
        "",
    ]
    return "\n".join(lines)


def write_figure(summary: dict, path: str) -> None:
    """The sample grids side by side, and FID against training step where a run has intermediate checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    runs = summary["runs"]
    with_curve = any(len(r["fid_curve"]) > 1 for r in runs)
    panels = len(runs) + int(with_curve)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4.8), squeeze=False)
    for ax, r in zip(axes[0], runs):
        ax.imshow(Image.open(r["grid"]))
        ax.set_title(f"{r['label']}: FID {r['fid']:.2f}")
        ax.axis("off")
    if with_curve:
        ax = axes[0][-1]
        for r in runs:
            steps, fids = [p["step"] for p in r["fid_curve"]], [p["fid"] for p in r["fid_curve"]]
            ax.plot(steps, fids, marker="o", label=r["label"])
        ax.set_xlabel("training step")
        ax.set_ylabel("FID")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs=2, help="two train_ldm.py output folders, e.g. the DCNv4 run and the conv run")
    parser.add_argument("--output_dir", required=True, help="where samples and comparison.{json,md,png} go")
    parser.add_argument("--reference", default=None,
                        help="image folder to measure against (default: the training data)")
    parser.add_argument("--num_images", type=int, default=None, help="samples per model (default: reference size)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed_precision", choices=sorted(PRECISIONS), default="no")
    parser.add_argument("--cache_dir", default=None, help="FID reference statistics cache (default: torch-fidelity's)")
    parser.add_argument("--no_fid_curve", action="store_true", help="skip FID at the intermediate checkpoints")
    parser.add_argument("--grid_images", type=int, default=36, help="images per grid in the figure")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from diffusers.utils.logging import disable_progress_bar

    disable_progress_bar()
    start = time.perf_counter()
    try:
        for name in ("num_images", "num_inference_steps", "batch_size", "grid_images"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1, got {value}")
        compare(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"comparison written to {args.output_dir} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
