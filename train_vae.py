"""Train a small AutoencoderKL with accelerate on the built-in photographs or an image folder.

Run with no arguments for a quick CPU run on the built-in data; `accelerate launch train_vae.py ...` for
several GPUs. Writes <output_dir>/config.yaml, vae (save_pretrained), reconstructions.png, metrics.json,
checkpoints/. Options: dataclass defaults, then `--config FILE`, then `--set key=value`, then the named flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from unet_dcnv4 import config
from unet_dcnv4.data import CorruptImageError
from unet_dcnv4.vae import VAETrainConfig, train_vae, validate_vae_config

# Every field is a named flag; these say what it means.
FLAGS = {
    "output_dir": "folder for config.yaml, vae/, checkpoints/, reconstructions.png and metrics.json",
    "data": "'builtin' (scikit-image photographs, no download) or a folder of images (searched recursively)",
    "resolution": "image side in pixels",
    "builtin_size": "number of crops of the built-in data",
    "num_holdout": "images held out for the reconstruction PSNR (at most a tenth of the data)",
    "batch_size": "images per process and step",
    "learning_rate": "AdamW learning rate",
    "lr_warmup_steps": "linear warm-up steps",
    "max_train_steps": "optimisation steps",
    "checkpointing_steps": "save the accelerate state every this many steps (0: never)",
    "resume_from_checkpoint": "'latest' or a checkpoint folder",
    "mixed_precision": "no, fp16 or bf16",
    "seed": "seed of the data order, held-out split, flips and posterior samples",
    "loss": "reconstruction loss: l1 or l2",
    "kl_weight": "weight of the KL term (summed over the latent, per image pixel)",
    "max_grad_norm": "gradient clipping norm (0: off)",
    "downsample_factor": "image side / latent side",
    "latent_channels": "latent channels",
    "base_channels": "width of the first block",
    "layers_per_block": "resnet layers per block",
    "log_every": "steps between loss updates on the progress bar",
    "skip_corrupt": "skip unreadable images (listed in the log and metrics.json) instead of stopping",
}
assert set(FLAGS) == {f.name for f in dataclasses.fields(VAETrainConfig)}


def parse_args(argv: list[str] | None = None) -> tuple[VAETrainConfig, bool]:
    """Resolves the config from the command line; returns (config, dry_run). Raises ValueError on bad keys/values."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    config.add_arguments(parser, VAETrainConfig, FLAGS)
    args = parser.parse_args(argv)
    cfg, dry_run = config.resolve_arguments(args, VAETrainConfig, FLAGS, validate_vae_config)
    if cfg.data != "builtin" and not os.path.isdir(cfg.data):
        parser.error(f"--data must be 'builtin' or a folder of images, got {cfg.data!r}")
    return cfg, dry_run


def main(argv: list[str] | None = None) -> dict:
    # A user's mistakes (a bad option, a missing checkpoint, an unreadable image): one line, exit 2.
    try:
        cfg, dry_run = parse_args(argv)
        if dry_run:
            print(config.to_yaml(cfg), end="")
            return {}
        return train_vae(cfg)
    except (ValueError, FileNotFoundError, CorruptImageError) as err:
        text = " ".join(str(err).split())
        if isinstance(err, CorruptImageError):
            text += " (--skip_corrupt)"
        print(f"train_vae.py: error: {text}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
