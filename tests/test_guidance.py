"""Class-conditional latent diffusion with label dropout and classifier-free guidance, end to end on the CPU: the
Stable Diffusion VAE's architecture at 64x64, and a small labelled folder of coloured shapes on which guidance
is shown to pull samples towards their class."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_ldm  # noqa: E402  (a top-level script, importable once the repository root is on the path)

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 30), "blue": (30, 30, 220)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shapes(root: Path, size: int, per_class: int, seed: int = 0) -> Path:
    """One sub-folder per colour class, each image a filled square or disc of that colour on white."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = Image.new("RGB", (size, size), (255, 255, 255))
            draw = ImageDraw.Draw(image)
            side = int(rng.integers(size // 2, size))
            x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
            (draw.ellipse if i % 2 else draw.rectangle)((x, y, x + side - 1, y + side - 1), fill=colour)
            image.save(root / name / f"{i}.png")
    return root


def run_args(output_dir: Path, data: Path, vae: Path, resolution: int, steps: int, **sets) -> list[str]:
    values = dict(vae=str(vae), data_source=str(data), resolution=resolution, class_conditional=True,
                  model_type="conv", train_batch_size=8, lr_warmup_steps=5, log_every_steps=50,
                  sample_every_steps=0, checkpoints_total_limit=1, learning_rate=1e-3, ema_max_decay=0.95)
    values.update(sets)
    out = ["--output_dir", str(output_dir), "--max_train_steps", str(steps), "--checkpointing_steps", str(steps)]
    for key, value in values.items():
        out += ["--set", f"{key}={value}"]
    return out


def test_the_stable_diffusion_vae_architecture_end_to_end(tmp_path):
    """Factor 8, 4 latent channels, random weights: caching, training with label dropout, guided sampling, reload."""
    from diffusers import AutoencoderKL, DiffusionPipeline

    torch.manual_seed(0)
    # The block layout of stabilityai/sd-vae-ft-ema (four encoder blocks: factor 8; 4 latent channels; its
    # scaling factor), narrower so that it runs on a CPU in seconds.
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
                        scaling_factor=0.18215)
    vae.save_pretrained(tmp_path / "vae")
    data = shapes(tmp_path / "data", 64, per_class=4)
    out = tmp_path / "run"
    assert train_ldm.main(run_args(out, data, tmp_path / "vae", 64, 4, class_dropout_prob=0.5)) == 0
    cache = json.loads((out / "latent_cache" / "cache.json").read_text())
    assert cache["latent_shape"] == [4, 8, 8] and cache["scaling_factor"] == 0.18215
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline", trust_remote_code=True)
    assert pipe.unet.config.num_class_embeds == 4 and pipe.config.null_class_label == 3
    assert list(pipe.config.class_counts) == [4, 4, 4]
    pipe.set_progress_bar_config(disable=True)
    images = {s: pipe(batch_size=3, class_labels=[0, 1, 2], guidance_scale=s, num_inference_steps=2,
                      generator=torch.Generator().manual_seed(0), output_type="np").images for s in (1.0, 4.0)}
    assert images[1.0].shape == (3, 64, 64, 3) and np.isfinite(images[4.0]).all()
    assert np.abs(images[1.0] - images[4.0]).max() > 1e-3


@pytest.mark.slow
def test_guidance_pulls_samples_towards_their_class(tmp_path):
    from train_vae import main as train_vae

    from pipelines import LatentDiffusionPipeline

    data = shapes(tmp_path / "data", 16, per_class=16)
    train_vae(["--data", str(data), "--resolution", "16", "--output_dir", str(tmp_path / "vae"), "--base_channels", "16",
               "--batch_size", "16", "--max_train_steps", "300", "--learning_rate", "2e-3"])
    out = tmp_path / "run"
    assert train_ldm.main(run_args(out, data, tmp_path / "vae" / "vae", 16, 600, class_dropout_prob=0.2,
                                   train_batch_size=16)) == 0
    pipe = LatentDiffusionPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    labels = [0, 1, 2] * 8
    targets = np.array([COLOURS[name] for name in sorted(COLOURS)], dtype=np.float64)[labels] / 255

    def colour_error(scale: float) -> float:
        images = pipe(batch_size=len(labels), class_labels=labels, guidance_scale=scale, num_inference_steps=20,
                      generator=[torch.Generator().manual_seed(i) for i in range(len(labels))],
                      output_type="np").images  # (B, H, W, 3)
        # The colour of a sample: the mean of its pixels that are not near-white background.
        errors = []
        for image, target in zip(images, targets):
            ink = image[image.min(-1) < 0.8]
            errors.append(np.abs(ink.mean(0) - target).mean() if len(ink) else 1.0)
        return float(np.mean(errors))

    unguided, guided = colour_error(1.0), colour_error(4.0)
    assert guided < unguided, (guided, unguided)


def test_the_imagenet256_configs_resolve():
    from unet_dcnv4.training import load_config

    dcnv4, conv = (load_config(REPO / "configs" / f"imagenet256_{m}.yaml") for m in ("dcnv4", "conv"))
    assert (dcnv4.resolution, dcnv4.class_conditional, dcnv4.class_dropout_prob) == (256, True, 0.1)
    assert dcnv4.vae == "stabilityai/sd-vae-ft-ema" and dcnv4.mixed_precision == "bf16"
    assert {k: v for k, v in vars(dcnv4).items() if k not in ("model_type", "output_dir")} == \
           {k: v for k, v in vars(conv).items() if k not in ("model_type", "output_dir")}
    assert train_ldm.main(["--config", str(REPO / "configs" / "imagenet256_dcnv4.yaml"), "--dry_run"]) == 0
