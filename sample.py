"""Write N samples of a latent diffusion model as PNG files, one per index, plus a grid and an optional .npz.

Image i depends only on (seed, i), so runs resume (existing files are skipped) and split freely across processes:
`accelerate launch --multi_gpu --num_processes 2 sample.py ...` gives each process the indices i with
i % world_size == rank (on CPUs, with ACCELERATE_USE_CPU=true set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.utils.logging import disable_progress_bar
from PIL import Image

from pipelines import SAMPLERS, LatentDiffusionPipeline, make_scheduler

PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGES_DIR = "images"


def index_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for image `index` of a run seeded with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def image_path(output_dir: str, index: int) -> str:
    """Where image `index` is written: `<output_dir>/images/000123.png`."""
    return os.path.join(output_dir, IMAGES_DIR, f"{index:06d}.png")


def class_label_for(index: int, class_labels: list[int] | None, num_classes: int | None) -> int | None:
    """The class of image `index`: cycles through `class_labels`, or through all classes when none are given."""
    if num_classes is None:
        return None
    if class_labels:
        return class_labels[index % len(class_labels)]
    return index % num_classes


def load_pipeline(source: str, use_ema: bool = True) -> LatentDiffusionPipeline:
    """Load a pipeline folder (with `model_index.json`) or rebuild one from a training checkpoint folder.

    Args:
        source: a pipeline folder, or a `checkpoint-<step>` folder written by train_ldm.py.
        use_ema: for a checkpoint, take the EMA weights of the unet.
    """
    if os.path.isfile(os.path.join(source, "model_index.json")):
        return LatentDiffusionPipeline.from_pretrained(source)
    if not os.path.isdir(source):
        raise ValueError(f"source {source!r} is neither a pipeline folder nor a training checkpoint folder")
    from unet_dcnv4.training import pipeline_from_checkpoint

    return pipeline_from_checkpoint(source, use_ema=use_ema)


def generate_samples(
    pipe: LatentDiffusionPipeline,
    output_dir: str,
    num_images: int,
    seed: int = 0,
    batch_size: int = 16,
    num_inference_steps: int = 50,
    class_labels: list[int] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Write this process's share of images 0..num_images-1 to `<output_dir>/images/`, skipping existing files.

    Args:
        pipe: the pipeline, already on its device and dtype, with the scheduler to sample with.
        output_dir: run folder; images go to `<output_dir>/images/<index:06d>.png`.
        num_images: total number of images N over all processes.
        seed: run seed; image i draws all its noise from a CPU generator seeded with `index_seed(seed, i)`.
        batch_size: images per pipeline call.
        num_inference_steps: sampler steps.
        class_labels: classes to cycle through for a class-conditional model (default: all classes).
        rank, world_size: this process writes the indices i with i % world_size == rank.

    Returns:
        {"written": images written now, "skipped": images found already written, "seconds": sampling time}.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be non-negative, got {num_images}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    num_classes = pipe.unet.config.num_class_embeds
    if class_labels and num_classes is None:
        raise ValueError(f"class_labels {class_labels} were given, but the model is unconditional")
    if class_labels and not all(0 <= c < num_classes for c in class_labels):
        raise ValueError(f"class_labels must lie in [0, {num_classes}), got {class_labels}")
    os.makedirs(os.path.join(output_dir, IMAGES_DIR), exist_ok=True)
    mine = range(rank, num_images, world_size)
    todo = [i for i in mine if not os.path.isfile(image_path(output_dir, i))]
    start = time.perf_counter()
    for first in range(0, len(todo), batch_size):
        indices = todo[first : first + batch_size]
        generators = [torch.Generator("cpu").manual_seed(index_seed(seed, i)) for i in indices]
        labels = [class_label_for(i, class_labels, num_classes) for i in indices]
        images = pipe(
            batch_size=len(indices),
            generator=generators,
            num_inference_steps=num_inference_steps,
            class_labels=None if num_classes is None else labels,
            output_type="np",
        ).images
        for index, image in zip(indices, images):
            path = image_path(output_dir, index)
            # Written under a temporary name first so that an interrupted run never leaves a truncated image behind.
            tmp = f"{path}.{os.getpid()}.tmp.png"
            Image.fromarray((image * 255).round().astype(np.uint8)).save(tmp)
            os.replace(tmp, path)
    return {"written": len(todo), "skipped": len(mine) - len(todo), "seconds": time.perf_counter() - start}


def write_grid(output_dir: str, num_images: int, max_images: int = 64) -> str:
    """Tile the first min(num_images, max_images) images into `<output_dir>/grid.png`; returns its path."""
    count = min(num_images, max_images)
    images = [np.asarray(Image.open(image_path(output_dir, i)).convert("RGB")) for i in range(count)]
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    h, w, _ = images[0].shape
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    path = os.path.join(output_dir, "grid.png")
    Image.fromarray(grid).save(path)
    return path


def write_npz(output_dir: str, num_images: int) -> str:
    """All images in index order as uint8 (N, H, W, 3) under the key `arr_0` in `<output_dir>/samples.npz`."""
    array = np.stack([np.asarray(Image.open(image_path(output_dir, i)).convert("RGB")) for i in range(num_images)])
    path = os.path.join(output_dir, "samples.npz")
    np.savez(path, arr_0=array)
    return path


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
    parser.add_argument("--output_dir", required=True, help="run folder: images/, grid.png, samples.npz")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--mixed_precision", choices=sorted(PRECISIONS), default="no", help="dtype of unet and VAE")
    parser.add_argument("--class_labels", default=None,
                        help="classes to cycle through, e.g. '3' or '1,4' (default: all classes)")
    parser.add_argument("--npz", action="store_true", help="also write samples.npz (uint8 (N, H, W, 3), key arr_0)")
    parser.add_argument("--no_ema", action="store_true", help="for a checkpoint, use the raw (not EMA) unet weights")
    parser.add_argument("--grid_images", type=int, default=64, help="images in grid.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    accelerator = Accelerator()
    # Loading bars from every process would bury the one-line messages this script prints.
    disable_progress_bar()
    try:
        if args.num_inference_steps < 1:
            raise ValueError(f"--num_inference_steps must be at least 1, got {args.num_inference_steps}")
        if args.grid_images < 1:
            raise ValueError(f"--grid_images must be at least 1, got {args.grid_images}")
        class_labels = parse_class_labels(args.class_labels)
        pipe = load_pipeline(args.source, use_ema=not args.no_ema)
        pipe.scheduler = make_scheduler(args.sampler, pipe.scheduler.config)
        pipe.to(accelerator.device)
        if args.mixed_precision != "no":
            pipe.to(PRECISIONS[args.mixed_precision])
        pipe.set_progress_bar_config(disable=True)
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
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
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
            "source": os.path.abspath(args.source),
            "num_images": args.num_images,
            "seed": args.seed,
            "sampler": args.sampler,
            "num_inference_steps": args.num_inference_steps,
            "mixed_precision": args.mixed_precision,
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
