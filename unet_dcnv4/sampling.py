"""Writing samples for evaluation: seeds per image, a manifest that ties a sample folder to what made it,
the images themselves (atomically), grids and `.npz` files. `sample.py` and `compare.py` are thin layers over it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ._checks import positive_int
from .common import PRECISIONS

__all__ = [
    "CLASS_MIXES", "IMAGES_DIR", "MANIFEST_FILE", "PRECISIONS", "SampleFolderMismatch", "class_counts_for",
    "class_label_for", "image_path",
    "index_seed", "load_pipeline", "pipeline_fingerprint", "pipeline_from_checkpoint", "prepare_sample_folder", "sample_manifest",
    "sample_paths", "generate_samples", "to_precision", "write_grid", "write_npz",
]

IMAGES_DIR = "images"
MANIFEST_FILE = "manifest.json"


class SampleFolderMismatch(ValueError):
    """A sample folder holds images that a different model or sampling setting wrote."""


def index_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for image `index` of a run seeded with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def image_path(output_dir: str, index: int) -> str:
    """Where image `index` is written: `<output_dir>/images/000123.png`."""
    return os.path.join(output_dir, IMAGES_DIR, f"{index:06d}.png")


CLASS_MIXES = ("data", "uniform")


def class_label_for(index: int, class_labels: list[int] | None, num_classes: int | None, seed: int = 0,
                    class_counts: list[int] | None = None) -> int | None:
    """The class of image `index`, a function of (seed, index) alone.

    Args:
        index: the image's index.
        class_labels: classes to cycle through; when given, they decide.
        num_classes: the classes of the model (None: unconditional, no class).
        seed: the sampling seed.
        class_counts: images per class in the training data: the class is drawn with these frequencies from a
            stream of (seed, index). None cycles through all classes (a uniform mix).
    """
    if num_classes is None:
        return None
    if class_labels:
        return class_labels[index % len(class_labels)]
    if class_counts is None:
        return index % num_classes
    u = np.random.default_rng(np.random.SeedSequence([seed, index, 0xC1A55])).random()
    cumulative = np.cumsum(class_counts, dtype=np.float64)
    return int(np.searchsorted(cumulative / cumulative[-1], u, side="right"))


def class_counts_for(pipe, class_mix: str) -> list[int] | None:
    """The class frequencies samples follow: the training set's ("data", when the pipeline records them) or
    none ("uniform")."""
    if class_mix not in CLASS_MIXES:
        raise ValueError(f"class_mix must be one of {CLASS_MIXES}, got {class_mix!r}")
    return getattr(pipe.config, "class_counts", None) if class_mix == "data" else None


def _strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Removes the key prefixes that DDP ("module.") and torch.compile ("_orig_mod.") add."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def pipeline_from_checkpoint(checkpoint_dir: str | os.PathLike, use_ema: bool = True):
    """Rebuilds the latent diffusion pipeline from a checkpoint folder alone (its config and training state).

    Args:
        checkpoint_dir: a `checkpoint-<step>` folder written by train_ldm.py.
        use_ema: take the EMA weights (the default, what samples and metrics use) instead of the raw ones.

    Returns:
        A `pipelines.LatentDiffusionPipeline` on the CPU, in eval mode, with the sampling scheduler of the config.
    """
    from safetensors.torch import load_file

    from pipelines import LatentDiffusionPipeline, make_scheduler

    from .training import class_embeddings, null_class_label, read_checkpoint_state, unet_options
    from .unet import build_unet
    from .vae import load_vae

    checkpoint_dir = Path(checkpoint_dir)
    cfg, state = read_checkpoint_state(checkpoint_dir)
    unet = build_unet(cfg.model_type, cfg.model_size, sample_size=state["latent_shape"][1],
                      in_channels=state["latent_shape"][0],
                      num_class_embeds=class_embeddings(cfg, state["num_classes"]), **unet_options(cfg))
    unet.load_state_dict(_strip_wrapper_prefixes(load_file(checkpoint_dir / "model.safetensors")))
    if use_ema:
        if "ema" not in state["custom_objects"]:
            raise ValueError(f"checkpoint_dir {str(checkpoint_dir)!r} holds no EMA weights (use_ema was false)")
        from diffusers.training_utils import EMAModel

        index = state["custom_objects"].index("ema")
        ema_state = torch.load(checkpoint_dir / f"custom_checkpoint_{index}.pkl", map_location="cpu",
                               weights_only=False)
        ema = EMAModel(unet.parameters())
        ema.load_state_dict(ema_state)
        ema.copy_to(unet.parameters())
    vae = load_vae(state["vae"], subfolder=state.get("vae_subfolder"))
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    scheduler = make_scheduler(cfg.sample_scheduler, state["train_scheduler_config"])
    pipe = LatentDiffusionPipeline(unet=unet.eval(), vae=vae.eval(), scheduler=scheduler,
                                   null_class_label=null_class_label(cfg, state["num_classes"]),
                                   class_counts=state.get("class_counts"))
    return pipe


def load_pipeline(source: str, use_ema: bool = True):
    """Load a pipeline folder (with `model_index.json`) or rebuild one from a training checkpoint folder.

    Args:
        source: a pipeline folder, or a `checkpoint-<step>` folder written by train_ldm.py.
        use_ema: for a checkpoint, take the EMA weights of the unet (a pipeline folder holds what it holds).
    """
    from pipelines import LatentDiffusionPipeline

    if os.path.isfile(os.path.join(source, "model_index.json")):
        return LatentDiffusionPipeline.from_pretrained(source)
    if not os.path.isdir(source):
        raise ValueError(f"source {source!r} is neither a pipeline folder nor a training checkpoint folder")
    return pipeline_from_checkpoint(source, use_ema=use_ema)


def to_precision(pipe, device: str | torch.device, precision: str):
    """Move a pipeline to `device` and cast it for sampling in `precision` ("no", "fp16" or "bf16").

    The U-Net takes the precision. So does the VAE, except in fp16 when its config asks for `force_upcast`
    (the Stable Diffusion VAEs overflow fp16 and decode NaN): it then stays in fp32 and the pipeline hands it
    fp32 latents.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    pipe.to(device)
    if precision == "no":
        return pipe
    dtype = PRECISIONS[precision]
    pipe.unet.to(dtype)
    upcast = precision == "fp16" and getattr(pipe.vae.config, "force_upcast", False)
    pipe.vae.to(torch.float32 if upcast else dtype)
    return pipe


def pipeline_fingerprint(pipe) -> str:
    """Hash of the weights and configs of a pipeline's U-Net and VAE: equal hashes sample alike."""
    from .data import module_fingerprint

    return f"unet:{module_fingerprint(pipe.unet)} vae:{module_fingerprint(pipe.vae)}"


def sample_manifest(pipe, source: str, sampler: str, num_inference_steps: int, seed: int, precision: str,
                    use_ema: bool | None, class_labels: list[int] | None = None,
                    guidance_scale: float = 1.0, class_mix: str = "data") -> dict:
    """What identifies a folder of samples: the model (source and weights) and every sampling setting.

    Raises ValueError when the pipeline cannot sample with `guidance_scale`, before any folder is touched.

    Args:
        pipe: the pipeline that samples (its weights are hashed).
        source: the pipeline or checkpoint folder it came from (recorded as an absolute path).
        sampler, num_inference_steps, seed, precision: the sampling settings.
        use_ema: EMA weights (a checkpoint source), or None for a pipeline folder (whose weights are what
            training saved there, EMA by default).
        class_labels: the classes cycled through (None: all, or an unconditional model).
        guidance_scale: classifier-free guidance scale (1.0: none).
        class_mix: "data" or "uniform" (see `class_label_for`); recorded as what it resolves to for this pipeline.
    """
    pipe.check_guidance_scale(guidance_scale)
    return {
        "source": os.path.abspath(source),
        "weights": pipeline_fingerprint(pipe),
        "use_ema": use_ema,
        "sampler": sampler,
        "num_inference_steps": int(num_inference_steps),
        "seed": int(seed),
        "precision": precision,
        "class_labels": class_labels,
        "class_mix": None if pipe.num_classes is None or class_labels else
        ("data" if class_counts_for(pipe, class_mix) is not None else "uniform"),
        "guidance_scale": float(guidance_scale),
    }


def prepare_sample_folder(output_dir: str, manifest: dict, overwrite: bool = False) -> None:
    """Make `output_dir` a folder of samples of `manifest`; call once (on the main process) before sampling.

    Images already there are reused only when the folder's manifest equals `manifest`. Otherwise, with
    `overwrite` the old images and manifest are deleted; without it a `SampleFolderMismatch` names each
    setting that differs.
    """
    path = os.path.join(output_dir, MANIFEST_FILE)
    images = os.path.join(output_dir, IMAGES_DIR)
    existing = sorted(f for f in os.listdir(images) if f.endswith(".png")) if os.path.isdir(images) else []
    old = None
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    if old is not None and old != manifest or old is None and existing:
        if not overwrite:
            if old is None:
                why = f"it holds {len(existing)} images but no {MANIFEST_FILE} saying what made them"
            else:
                keys = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
                why = "its images were made with different " + "; ".join(
                    f"{k} ({old.get(k)!r}, now {manifest.get(k)!r})" for k in keys)
            raise SampleFolderMismatch(f"sample folder {output_dir!r} cannot be reused: {why}; pass --overwrite to "
                                       "delete its images, or choose another --output_dir")
        shutil.rmtree(images, ignore_errors=True)
        if os.path.isfile(path):
            os.remove(path)
    os.makedirs(images, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, path)


def sample_paths(output_dir: str, num_images: int) -> list[str]:
    """The files of images 0..num_images-1, exactly those; raises ValueError when one is missing."""
    paths = [image_path(output_dir, i) for i in range(num_images)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"sample folder {output_dir!r} lacks {len(missing)} of the {num_images} images asked for, "
                         f"e.g. {missing[0]}")
    return paths


def is_sample_folder(folder: str) -> bool:
    """True for a folder that sample.py or compare.py wrote: a manifest and an images/ subfolder."""
    return os.path.isfile(os.path.join(folder, MANIFEST_FILE)) and os.path.isdir(os.path.join(folder, IMAGES_DIR))


def read_sample_folder(folder: str) -> tuple[list[str], dict]:
    """The images of a sample folder and its manifest, by the one rule for what a sample folder holds.

    The images are `images/000000.png`, `000001.png`, ... up to the first index missing, in index order; nothing
    else counts (no grid, no partial write, no image past a gap). Raises ValueError for a folder that is no sample
    folder (no manifest saying what made the images) or that holds no image 0.

    Args:
        folder: a folder written by sample.py or compare.py (its `images/` subfolder is accepted too).
    """
    if os.path.basename(os.path.normpath(folder)) == IMAGES_DIR and not is_sample_folder(folder):
        folder = os.path.dirname(os.path.normpath(folder))
    if not os.path.isdir(folder):
        raise ValueError(f"sample folder {folder!r} does not exist")
    if not is_sample_folder(folder):
        raise ValueError(f"{folder!r} is not a sample folder: it has no {MANIFEST_FILE} and {IMAGES_DIR}/ saying what "
                         "made its images (write samples with sample.py or compare.py)")
    with open(os.path.join(folder, MANIFEST_FILE)) as f:
        manifest = json.load(f)
    paths = []
    while os.path.isfile(image_path(folder, len(paths))):
        paths.append(image_path(folder, len(paths)))
    if not paths:
        raise ValueError(f"sample folder {folder!r} holds no {image_path('', 0).lstrip(os.sep)}")
    return paths, manifest


def generate_samples(
    pipe,
    output_dir: str,
    num_images: int,
    seed: int = 0,
    batch_size: int = 16,
    num_inference_steps: int = 50,
    class_labels: list[int] | None = None,
    rank: int = 0,
    world_size: int = 1,
    guidance_scale: float = 1.0,
    class_mix: str = "data",
) -> dict:
    """Write this process's share of images 0..num_images-1 to `<output_dir>/images/`, skipping existing files.

    Call `prepare_sample_folder` first: it is what makes skipping safe.

    Args:
        pipe: the pipeline, already on its device and dtype, with the scheduler to sample with.
        output_dir: run folder; images go to `<output_dir>/images/<index:06d>.png`.
        num_images: total number of images N over all processes.
        seed: run seed; image i draws all its noise from a CPU generator seeded with `index_seed(seed, i)`.
        batch_size: images per pipeline call.
        num_inference_steps: sampler steps.
        class_labels: classes to cycle through for a class-conditional model (default: the class mix).
        rank, world_size: this process writes the indices i with i % world_size == rank.
        guidance_scale: classifier-free guidance scale (1.0: none).
        class_mix: without class_labels, "data" follows the training set's class frequencies (when the pipeline
            records them), "uniform" cycles through the classes.

    Returns:
        {"written": images written now, "skipped": images found already written, "seconds": sampling time}.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be non-negative, got {num_images}")
    positive_int("batch_size", batch_size)
    num_classes = pipe.num_classes
    class_counts = class_counts_for(pipe, class_mix)
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
        labels = [class_label_for(i, class_labels, num_classes, seed, class_counts) for i in indices]
        images = pipe(
            batch_size=len(indices),
            generator=generators,
            num_inference_steps=num_inference_steps,
            class_labels=None if num_classes is None else labels,
            guidance_scale=guidance_scale,
            output_type="np",
        ).images
        for index, image in zip(indices, images):
            path = image_path(output_dir, index)
            # Written under a hidden temporary name first (never listed as an image), then renamed: an
            # interrupted run never leaves a truncated image behind.
            folder, name = os.path.split(path)
            tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
            Image.fromarray((image * 255).round().astype(np.uint8)).save(tmp, format="PNG")
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
