"""Write N samples of a latent diffusion model as PNG files, one per index, plus a grid and an optional .npz.

Image i depends only on (seed, i), so runs resume (existing files are reused when the folder's manifest matches
the model and settings) and split freely across processes: `accelerate launch --multi_gpu --num_processes 2
sample.py ...` gives each process the indices i with i % world_size == rank (on CPUs, with ACCELERATE_USE_CPU=true
set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from accelerate import Accelerator
from diffusers.utils.logging import disable_progress_bar

from pipelines import SAMPLERS, make_scheduler
from unet_dcnv4._checks import positive_int
from unet_dcnv4.sampling import (
    CLASS_MIXES, IMAGES_DIR, PRECISIONS, generate_samples, load_pipeline, prepare_sample_folder, sample_manifest, to_precision,
    write_grid, write_npz,
)


def parse_class_labels(text: str | None) -> list[int] | None:
    """'3' or '1,4,7' -> [3] or [1, 4, 7]; None or '' -> None."""
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--class_labels must be comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", help="pipeline folder (with model_index.json) or training checkpoint folder")
    parser.add_argument("--output_dir", required=True, help="run folder: images/, manifest.json, grid.png, samples.npz")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--mixed_precision", choices=sorted(PRECISIONS), default="no",
                        help="dtype of the unet and VAE (an fp16 VAE whose config sets force_upcast stays fp32)")
    parser.add_argument("--class_labels", default=None,
                        help="classes to cycle through, e.g. '3' or '1,4' (default: the --class_mix)")
    parser.add_argument("--class_mix", choices=CLASS_MIXES, default="data",
                        help="without --class_labels: the training set's class frequencies (data) or every class "
                             "equally often (uniform)")
    parser.add_argument("--guidance_scale", type=float, default=1.0,
                        help="classifier-free guidance scale (1: none; needs a model trained with label dropout)")
    parser.add_argument("--npz", action="store_true", help="also write samples.npz (uint8 (N, H, W, 3), key arr_0)")
    parser.add_argument("--no_ema", action="store_true", help="for a checkpoint, use the raw (not EMA) unet weights")
    parser.add_argument("--grid_images", type=int, default=64, help="images in grid.png")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete images in --output_dir that another model or other settings made")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    accelerator = Accelerator()
    # Loading bars from every process would bury the one-line messages this script prints.
    disable_progress_bar()
    try:
        if args.num_images < 0:
            raise ValueError(f"--num_images must be non-negative, got {args.num_images}")
        for name in ("num_inference_steps", "batch_size", "grid_images"):
            positive_int(f"--{name}", getattr(args, name))
        class_labels = parse_class_labels(args.class_labels)
        pipe = load_pipeline(args.source, use_ema=not args.no_ema)
        pipe.scheduler = make_scheduler(args.sampler, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        is_checkpoint = not os.path.isfile(os.path.join(args.source, "model_index.json"))
        manifest = sample_manifest(pipe, args.source, args.sampler, args.num_inference_steps, args.seed,
                                   args.mixed_precision, use_ema=(not args.no_ema) if is_checkpoint else None,
                                   class_labels=class_labels, guidance_scale=args.guidance_scale,
                                   class_mix=args.class_mix)
        to_precision(pipe, accelerator.device, args.mixed_precision)
        if accelerator.is_main_process:
            prepare_sample_folder(args.output_dir, manifest, overwrite=args.overwrite)
        accelerator.wait_for_everyone()
        stats = generate_samples(
            pipe,
            args.output_dir,
            args.num_images,
            seed=args.seed,
            batch_size=args.batch_size,
            num_inference_steps=args.num_inference_steps,
            class_labels=class_labels,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            guidance_scale=args.guidance_scale,
            class_mix=args.class_mix,
        )
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"process {accelerator.process_index}: wrote {stats['written']} images, skipped {stats['skipped']} "
        f"already there, {stats['seconds']:.1f} s",
        flush=True,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and args.num_images > 0:
        summary = {
            **manifest,
            "num_images": args.num_images,
            "batch_size": args.batch_size,
            "num_processes": accelerator.num_processes,
            "written_by_main_process": stats["written"],
            "seconds_main_process": stats["seconds"],
            # Throughput of the main process times the number of processes, comparable across runs that wrote all
            # their images (a resumed run measures only what it wrote).
            "images_per_s": stats["written"] * accelerator.num_processes / stats["seconds"] if stats["written"] else None,
        }
        summary["grid"] = write_grid(args.output_dir, args.num_images, args.grid_images)
        if args.npz:
            summary["npz"] = write_npz(args.output_dir, args.num_images)
        with open(os.path.join(args.output_dir, "sample_stats.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"images in {os.path.join(args.output_dir, IMAGES_DIR)}, grid {summary['grid']}")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
