"""VAEs for the latent models: load a diffusers `AutoencoderKL`, or build and train a small one with accelerate.

`train_vae` is the training loop behind the top-level `train_vae.py`; `builtin_vae` trains it once on the
built-in photographs and caches the result, giving the embedded default a VAE without any download.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL

from . import checkpoints, config
from ._checks import positive_int
from .common import PRECISIONS, derive_seed, hub_offline, transport_errors

__all__ = [
    "BUILTIN_VAE_CONFIG",
    "VAELoadError",
    "VAETrainConfig",
    "LOSSES",
    "validate_vae_config",
    "build_small_vae",
    "builtin_vae",
    "default_cache_root",
    "load_vae",
    "measure_scaling_factor",
    "small_vae_config",
    "train_vae",
    "vae_training_folder",
]


class VAELoadError(OSError):
    """A VAE name or folder that cannot be loaded; the message says why and what to pass instead."""


def load_vae(name_or_path: str, subfolder: str | None = None, torch_dtype=None) -> AutoencoderKL:
    """Load an `AutoencoderKL` from a local folder or the Hugging Face Hub.

    Args:
        name_or_path: a folder holding `config.json` and the weights (or a pipeline / `train_vae.py`
            output folder with them under `vae/`), or a hub id such as "stabilityai/sd-vae-ft-mse".
        subfolder: folder inside it that holds the VAE (e.g. "vae" of a pipeline repo).
        torch_dtype: dtype to load the weights in (default: as saved).

    Raises:
        VAELoadError (an OSError): the hub id is not cached and the hub cannot be reached (or HF_HUB_OFFLINE
            is set), or is no repository; the message says so and suggests a local folder.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"name_or_path must be a hub id or a folder, got {name_or_path!r}")
    if os.path.isdir(name_or_path):
        folder = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
        if subfolder is None and not os.path.isfile(os.path.join(folder, "config.json")):
            if os.path.isfile(os.path.join(name_or_path, "vae", "config.json")):
                subfolder = "vae"
            elif (found := vae_training_folder(name_or_path)) is not None:
                what, run = found
                raise ValueError(f"VAE {name_or_path!r} is {what}, not a saved VAE: "
                                 + _saved_vae_hint(run, "pass the vae/ folder of the run it belongs to"))
            else:
                raise ValueError(f"name_or_path {name_or_path!r} is a folder without config.json (nor vae/config.json)")
        return AutoencoderKL.from_pretrained(name_or_path, subfolder=subfolder, torch_dtype=torch_dtype)
    if os.path.exists(name_or_path) or name_or_path.startswith((".", os.sep, "~")):
        raise ValueError(f"name_or_path {name_or_path!r} is not a folder holding a VAE")

    from huggingface_hub.errors import RepositoryNotFoundError

    offline = hub_offline()
    try:
        return AutoencoderKL.from_pretrained(
            name_or_path, subfolder=subfolder, torch_dtype=torch_dtype, local_files_only=offline
        )
    except RepositoryNotFoundError as err:
        raise VAELoadError(f"VAE {name_or_path!r} is neither a local folder nor a Hugging Face Hub repository") from err
    except (OSError, TimeoutError, *transport_errors()) as err:
        if offline:
            reason = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
        else:
            reason = "it could not be fetched from the Hugging Face Hub (no connection, or no such VAE there)"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise VAELoadError(
            f"cannot load VAE {name_or_path!r}: {reason}. Download it where there is network "
            f"(hf download {name_or_path} --local-dir <folder>) and pass that local folder instead, "
            f"or a folder written by train_vae.py. ({type(err).__name__}: {detail})"
        ) from err


def _is_vae_training_config(path: str) -> bool:
    """Whether `path` is the config.yaml of a train_vae.py run or checkpoint (keys of `VAETrainConfig`)."""
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(values, dict) and "data" in values and "latent_channels" in values


def vae_training_folder(path: str | os.PathLike) -> tuple[str, str | None] | None:
    """Recognises the folders of a train_vae.py run that are not a saved VAE, for messages that say which folder
    to pass instead.

    Args:
        path: a folder.

    Returns:
        None, or (what it is, in words; the run's output folder, None for a checkpoint outside its run) for a
        train_vae.py run folder, its checkpoints/ folder or one of its checkpoints.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.isfile(os.path.join(path, checkpoints.STATE_FILE)) and \
            _is_vae_training_config(os.path.join(path, config.CONFIG_FILE)):
        run = os.path.dirname(parent)
        in_run = os.path.basename(parent) == "checkpoints" and \
            _is_vae_training_config(os.path.join(run, config.CONFIG_FILE))
        return "a checkpoint of train_vae.py (the training state of a VAE)", run if in_run else None
    if os.path.basename(path) == "checkpoints" and _is_vae_training_config(os.path.join(parent, config.CONFIG_FILE)):
        return "the checkpoints folder of a train_vae.py run", parent
    if _is_vae_training_config(os.path.join(path, config.CONFIG_FILE)):
        return "the output folder of a train_vae.py run", path
    return None


def _saved_vae_hint(run: str | None, otherwise: str) -> str:
    """Which folder holds the VAE of a train_vae.py run, or how to get it."""
    if run is None:
        return otherwise
    saved = os.path.join(run, "vae")
    if os.path.isfile(os.path.join(saved, "config.json")):
        return f"pass the run's vae/ folder, {saved!r}"
    return (f"the run {run!r} has not saved its VAE yet (no vae/ folder): finish it (train_vae.py --output_dir "
            f"{run} --resume_from_checkpoint latest), then pass {saved!r}")


def small_vae_config(
    resolution: int = 64,
    downsample_factor: int = 4,
    latent_channels: int = 4,
    base_channels: int = 32,
    layers_per_block: int = 1,
    mid_block_attention: bool = False,
) -> dict:
    """The config of a small `AutoencoderKL`.

    Args:
        resolution: image side it is trained at (recorded as `sample_size`).
        downsample_factor: image side / latent side, a power of two (4: 64x64 images -> 16x16 latents).
        latent_channels: channels of the latent.
        base_channels: width of the first block; deeper blocks double it, capped at 4x.
        layers_per_block: resnet layers per block.
        mid_block_attention: self-attention in the middle block (slower on CPU, little gain at 16x16).
    """
    if not isinstance(downsample_factor, int) or downsample_factor < 1 or downsample_factor & (downsample_factor - 1):
        raise ValueError(f"downsample_factor must be a power of two >= 1, got {downsample_factor!r}")
    if not isinstance(base_channels, int) or base_channels < 8 or base_channels % 8:
        raise ValueError(f"base_channels must be a positive multiple of 8, got {base_channels!r}")
    positive_int("latent_channels", latent_channels)
    blocks = int(math.log2(downsample_factor)) + 1
    channels = tuple(base_channels * min(2**i, 4) for i in range(blocks))
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "block_out_channels": list(channels),
        "layers_per_block": layers_per_block,
        "latent_channels": latent_channels,
        "norm_num_groups": 8,
        "sample_size": resolution,
        "mid_block_add_attention": mid_block_attention,
    }


def build_small_vae(**kwargs) -> AutoencoderKL:
    """A freshly initialised `AutoencoderKL` from `small_vae_config(**kwargs)`."""
    return AutoencoderKL(**small_vae_config(**kwargs))


@dataclass
class VAETrainConfig:
    """Options of `train_vae` (and the flags of train_vae.py, same names)."""

    output_dir: str = "outputs/vae"
    data: str = "builtin"
    resolution: int = 64
    builtin_size: int = 1024
    num_holdout: int = 64
    batch_size: int = 16
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 20
    max_train_steps: int = 400
    checkpointing_steps: int = 0
    resume_from_checkpoint: str | None = None
    mixed_precision: str = "no"
    seed: int = 0
    loss: str = "l1"
    kl_weight: float = 1e-6
    max_grad_norm: float = 1.0
    downsample_factor: int = 4
    latent_channels: int = 4
    base_channels: int = 32
    layers_per_block: int = 1
    log_every: int = 50
    skip_corrupt: bool = False


LOSSES = ("l1", "l2")


def validate_vae_config(cfg: VAETrainConfig) -> None:
    """Checks the types and ranges of every field; raises ValueError naming the key, the value and what was expected."""

    config.coerce_fields(cfg)
    config.choice(cfg, "loss", LOSSES)
    config.choice(cfg, "mixed_precision", PRECISIONS)
    for key in ("resolution", "builtin_size", "batch_size", "max_train_steps", "downsample_factor", "latent_channels",
                "base_channels", "layers_per_block", "log_every"):
        config.at_least(cfg, key, 1)
    for key in ("num_holdout", "lr_warmup_steps", "checkpointing_steps", "seed", "kl_weight", "max_grad_norm"):
        config.at_least(cfg, key, 0)
    if cfg.learning_rate <= 0:
        raise ValueError(f"config key 'learning_rate' must be > 0, got {cfg.learning_rate!r}")


class _Progress:
    """The step counter, saved with accelerate's checkpoints."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class _VAEWithPosterior(torch.nn.Module):
    """Runs encode, sample and decode in one forward, so DDP sees every parameter used."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)  # (B, c, h, w)
        return self.vae.decode(z).sample, posterior.kl()  # (B, 3, H, W), (B,)


def _step_generator(seed: int, purpose: str, step: int, rank: int) -> torch.Generator:
    # Randomness keyed by the step keeps a resumed run identical to an uninterrupted one.
    return torch.Generator().manual_seed(derive_seed(seed, purpose, step, rank))


def _batch_indices(seed: int, n: int, step: int, batch: int) -> list[int]:
    """Indices of a step's global batch: epochs of permutations seeded by (seed, "data", epoch), read in order."""
    out = []
    pos = step * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "data", epoch)))
        take = perm[offset : offset + batch - len(out)].tolist()
        out += take
        pos += len(take)
    return out


def _psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1], (B, 3, H, W) -> (B,)."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def measure_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> float:
    """1 / std of the sampled latents of `images` (B, 3, H, W) in [-1, 1], from the posterior moments."""
    from .data import latent_scaling_factor

    device = next(vae.parameters()).device
    s1 = s2 = count = 0.0
    with torch.no_grad():
        for chunk in images.split(batch_size):
            dist = vae.encode(chunk.to(device)).latent_dist
            m, s = dist.mean.double(), dist.std.double()
            s1 += m.sum().item()
            s2 += (m**2 + s**2).sum().item()
            count += m.numel()
    return latent_scaling_factor(s1, s2, count)


def train_vae(cfg: VAETrainConfig) -> dict:
    """Train a small `AutoencoderKL` with accelerate; writes into `cfg.output_dir`.

    Writes `config.yaml` (the resolved config), `vae/` (save_pretrained, with the measured `scaling_factor` in its
    config), `checkpoints/checkpoint-<step>/` (accelerate state, saved by `checkpoints.save_checkpoint`: a kill at
    any point leaves the newest complete checkpoint), `reconstructions.png` (held-out images over their
    reconstructions) and `metrics.json`.

    Returns:
        The metrics: held-out reconstruction PSNR (dB, from the posterior mean), scaling factor,
        steps, seconds, parameter count, the last learning rate and the unreadable images skipped.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from torchvision.utils import save_image

    from .data import build_image_dataset
    from .progress import progress as progress_bar

    validate_vae_config(cfg)
    start_time = time.time()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, project_dir=cfg.output_dir)
    accelerator.print(config.to_yaml(cfg), end="")
    if accelerator.is_main_process:
        config.save_config(cfg, cfg.output_dir)
    set_seed(cfg.seed)
    dataset = build_image_dataset(cfg.data, resolution=cfg.resolution, builtin_size=cfg.builtin_size,
                                  skip_corrupt=cfg.skip_corrupt)
    skipped = list(getattr(dataset, "skipped", []))
    if skipped:
        accelerator.print(f"skip_corrupt: skipped {len(skipped)} unreadable image(s): {', '.join(skipped)}")
    n = len(dataset)
    holdout = min(cfg.num_holdout, n // 10)
    if n - holdout < 1 or holdout < 1:
        raise ValueError(f"data must hold at least 10 images to hold some out, got {n} in {cfg.data!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "holdout"))).tolist()
    train_ids, holdout_ids = order[holdout:], order[:holdout]

    vae = build_small_vae(
        resolution=cfg.resolution, downsample_factor=cfg.downsample_factor,
        latent_channels=cfg.latent_channels, base_channels=cfg.base_channels,
        layers_per_block=cfg.layers_per_block,
    )
    model = _VAEWithPosterior(vae)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.lr_warmup_steps)
    # Not prepared: accelerate steps a prepared scheduler once per process per step (it assumes a data loader
    # sharded into fewer steps), which would warm up N times too fast on N processes. Every process reads its
    # share of each global batch here, so the scheduler steps once per optimisation step.
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = _Progress()
    accelerator.register_for_checkpointing(scheduler, progress)

    checkpoints_dir = os.path.join(cfg.output_dir, "checkpoints")
    resume = checkpoints.resolve_resume_checkpoint(cfg.resume_from_checkpoint, checkpoints_dir)
    if resume is None and cfg.resume_from_checkpoint == "latest":
        accelerator.print(f"no checkpoint under {checkpoints_dir}; starting from scratch")
    if resume is not None:
        accelerator.load_state(str(resume))
        accelerator.print(f"resumed from {resume} at step {progress.step}")

    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.batch_size * world
    pixels = 3 * cfg.resolution**2
    bar = progress_bar(total=cfg.max_train_steps, initial=progress.step, desc="train_vae",
                       disable=not accelerator.is_local_main_process)
    model.train()
    while progress.step < cfg.max_train_steps:
        step = progress.step
        ids = _batch_indices(cfg.seed, len(train_ids), step, global_batch)
        ids = ids[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
        x = torch.stack([dataset[train_ids[i]][0] for i in ids])  # (B, 3, R, R)
        flip = torch.rand(len(ids), generator=_step_generator(cfg.seed, "flip", step, rank)) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(accelerator.device)
        with accelerator.autocast():
            recon, kl = model(x, _step_generator(cfg.seed, "posterior", step, rank))
        recon = recon.float()
        rec = (recon - x).abs().mean() if cfg.loss == "l1" else (recon - x).pow(2).mean()
        # KL summed over the latent, per image pixel: the weighting of the latent-diffusion VAEs.
        loss = rec + cfg.kl_weight * kl.float().mean() / pixels
        accelerator.backward(loss)
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        bar.update(1)
        if progress.step % cfg.log_every == 0 or progress.step == cfg.max_train_steps:
            bar.set_postfix(loss=f"{loss.item():.4f}", rec=f"{rec.item():.4f}", kl=f"{kl.mean().item():.1f}")
        if cfg.checkpointing_steps > 0 and progress.step % cfg.checkpointing_steps == 0:
            checkpoints.save_checkpoint(accelerator, checkpoints_dir, progress.step, {"step": progress.step},
                                        {config.CONFIG_FILE: config.to_yaml(cfg)})
    bar.close()

    metrics = {}
    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(model).vae.float().eval()
        held = torch.stack([dataset[i][0] for i in holdout_ids])  # (K, 3, R, R)
        recon, psnrs = [], []
        with torch.no_grad():
            for chunk in held.split(64):
                chunk = chunk.to(accelerator.device)
                out = vae.decode(vae.encode(chunk).latent_dist.mode()).sample.clamp(-1, 1)
                recon.append(out.cpu())
                psnrs.append(_psnr(out, chunk).cpu())
        recon, psnr = torch.cat(recon), torch.cat(psnrs)
        train_sample = torch.stack([dataset[train_ids[i]][0] for i in range(min(512, len(train_ids)))])
        factor = measure_scaling_factor(vae, train_sample)
        vae.register_to_config(scaling_factor=factor)
        vae.save_pretrained(os.path.join(cfg.output_dir, "vae"))
        shown = min(8, len(held))
        grid = torch.cat([held[:shown], recon[:shown]])
        save_image(grid * 0.5 + 0.5, os.path.join(cfg.output_dir, "reconstructions.png"), nrow=shown)
        metrics = {
            "psnr_db": round(psnr.mean().item(), 3),
            "num_holdout": len(held),
            "scaling_factor": factor,
            "steps": progress.step,
            "seconds": round(time.time() - start_time, 1),
            "parameters": sum(p.numel() for p in vae.parameters()),
            "device": str(accelerator.device),
            "num_processes": world,
            "learning_rate": scheduler.get_last_lr()[0],
            "skipped_images": skipped,
            "num_skipped_images": len(skipped),
            "config": config.to_dict(cfg),
        }
        with open(os.path.join(cfg.output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        accelerator.print(
            f"held-out reconstruction PSNR {metrics['psnr_db']:.2f} dB on {len(held)} images; "
            f"scaling factor {factor:.4f}; {metrics['seconds']} s; VAE saved to {cfg.output_dir}/vae"
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def default_cache_root() -> str:
    """~/.cache/unet_dcnv4 (or $XDG_CACHE_HOME/unet_dcnv4)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "unet_dcnv4")


# Small enough to train in a couple of CPU minutes; fully convolutional, so it also encodes larger images.
BUILTIN_VAE_CONFIG = VAETrainConfig(
    output_dir="", data="builtin", resolution=32, builtin_size=512, base_channels=16, batch_size=16,
    max_train_steps=500, lr_warmup_steps=20,
)
# A distributed launch must not leak into the single-process training run of the built-in VAE.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def builtin_vae(cache_dir: str | None = None, config: VAETrainConfig | None = None) -> str:
    """The folder of the small VAE trained on the built-in photographs, training it once if needed.

    Training runs `train_vae` (the code of train_vae.py) in a separate single-process Python, under a
    file lock, so that it is safe to call from every process of an accelerate launch.

    Args:
        cache_dir: root of the cache (default `default_cache_root()`); the VAE lives in
            `<cache_dir>/vae-builtin-<hash of the training config>/vae`.
        config: training options (default `BUILTIN_VAE_CONFIG`); `output_dir` is ignored.

    Returns:
        A folder for `load_vae` / `AutoencoderKL.from_pretrained`.
    """
    import diffusers
    from filelock import FileLock

    config = dataclasses.replace(config or BUILTIN_VAE_CONFIG, output_dir="", resume_from_checkpoint=None)
    key_source = json.dumps({"config": dataclasses.asdict(config), "diffusers": diffusers.__version__}, sort_keys=True)
    key = hashlib.sha256(key_source.encode()).hexdigest()[:12]
    root = cache_dir or default_cache_root()
    final = os.path.join(root, f"vae-builtin-{key}")
    vae_dir = os.path.join(final, "vae")
    if os.path.isfile(os.path.join(vae_dir, "config.json")):
        return vae_dir
    os.makedirs(root, exist_ok=True)
    with FileLock(final + ".lock"):
        if os.path.isfile(os.path.join(vae_dir, "config.json")):
            return vae_dir
        work = tempfile.mkdtemp(prefix=f".vae-builtin-{key}-", dir=root)
        try:
            print(f"training the built-in VAE once (cached in {final})", flush=True)
            options = json.dumps(dataclasses.asdict(dataclasses.replace(config, output_dir=work)))
            code = (
                "import json, sys; from unet_dcnv4.vae import VAETrainConfig, train_vae; "
                "train_vae(VAETrainConfig(**json.loads(sys.argv[1])))"
            )
            env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("ACCELERATE_")}
            result = subprocess.run([sys.executable, "-c", code, options], env=env)
            if result.returncode != 0:
                raise RuntimeError(
                    f"training the built-in VAE failed (exit code {result.returncode}); see the output above"
                )
            shutil.rmtree(final, ignore_errors=True)
            os.replace(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return vae_dir
