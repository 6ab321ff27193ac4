"""Train a small AutoencoderKL with accelerate on the built-in photographs or an image folder.

Run with no arguments for a quick CPU run on the built-in data; `accelerate launch train_vae.py ...` for
several GPUs. Writes <output_dir>/vae (save_pretrained), reconstructions.png, metrics.json, checkpoints/.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from unet_dcnv4.data import CorruptImageError
from unet_dcnv4.vae import VAETrainConfig, train_vae

_HELP = {
    "output_dir": "folder for vae/, checkpoints/, reconstructions.png and metrics.json",
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


def parse_args(argv: list[str] | None = None) -> VAETrainConfig:
    """Flags named after `VAETrainConfig`'s fields, same defaults."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(VAETrainConfig):
        default = field.default
        if isinstance(default, bool):
            # `type=bool` would read "--flag false" as True.
            parser.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=default,
                                help=_HELP[field.name])
            continue
        kind = type(default) if default is not None else str
        choices = {"mixed_precision": ["no", "fp16", "bf16"], "loss": ["l1", "l2"]}.get(field.name)
        parser.add_argument(f"--{field.name}", type=kind, default=default, choices=choices, help=_HELP[field.name])
    args = parser.parse_args(argv)
    if args.data != "builtin" and not os.path.isdir(args.data):
        parser.error(f"--data must be 'builtin' or a folder of images, got {args.data!r}")
    return VAETrainConfig(**vars(args))


def main(argv: list[str] | None = None) -> dict:
    config = parse_args(argv)
    try:
        return train_vae(config)
    # A user's mistakes (a bad option, a missing checkpoint, an unreadable image): one line, exit 2.
    except (ValueError, FileNotFoundError, CorruptImageError) as err:
        text = " ".join(str(err).split())
        if isinstance(err, CorruptImageError):
            text += " (--skip_corrupt)"
        print(f"train_vae.py: error: {text}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
