"""Training configuration and the reusable parts of `train_ldm.py`: the config dataclass and its validation (loaded
with the toolkit of `config.py`), the run's seeded random streams (data order, noise) that resume exactly,
checkpoints (`checkpoints.py`) with the config inside and the checks that a resume continues the same run, and a
pipeline from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoints, config
from .common import PRECISIONS, derive_seed

__all__ = [
    "TrainConfig", "load_config", "validate_config", "config_to_dict", "config_to_yaml", "parse_overrides",
    "list_checkpoints", "latest_checkpoint", "resolve_resume_checkpoint", "prune_checkpoints", "save_checkpoint",
    "read_checkpoint_state", "load_checkpoint", "resume_changes", "EpochSampler", "NoiseGenerator",
    "unet_options", "null_class_label", "class_embeddings", "CHECKPOINT_PREFIX",
    "ARCHITECTURE_KEYS", "EXACT_RESUME_KEYS", "RECORDED_RESUME_KEYS", "EXACT_RESUME_CHECKS", "RUN_OUTPUTS",
    "run_in_folder", "check_output_dir", "remove_run",
    "RANDOM_STREAMS", "FAULT_ENV", "FAULT_POINTS",
]

CHECKPOINT_STATE_FILE = checkpoints.STATE_FILE
CHECKPOINT_CONFIG_FILE = config.CONFIG_FILE
# One home each: the config toolkit and the checkpoint toolkit shared with train_vae.
config_to_dict, config_to_yaml, parse_overrides = config.to_dict, config.to_yaml, config.parse_overrides
CHECKPOINT_PREFIX, FAULT_ENV, FAULT_POINTS = checkpoints.CHECKPOINT_PREFIX, checkpoints.FAULT_ENV, checkpoints.FAULT_POINTS
list_checkpoints, latest_checkpoint = checkpoints.list_checkpoints, checkpoints.latest_checkpoint
resolve_resume_checkpoint, prune_checkpoints = checkpoints.resolve_resume_checkpoint, checkpoints.prune_checkpoints

PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
# What a resume may change, key by key. Every change a resume lets through is recorded with its step in the run's
# `resume_changes` (train_stats.json and each later checkpoint's training state), so that a run resumed with other
# settings can be told from an uninterrupted one. Only `resume_from_checkpoint` is left out (it always differs),
# and `output_dir` when it names the same folder.
#
# Refused always: fields that change the model or its checkpointed state (the checkpoint would not load, or
# would load into another model, or train on other latents).
ARCHITECTURE_KEYS = ("model_type", "model_size", "dcnv4_options", "class_conditional", "class_dropout_prob",
                     "use_ema", "data_source", "resolution", "vae", "vae_subfolder")
# Refused unless `allow_resume_changes` is set: they change the objective, the data (`latent_cache_dtype` rounds
# the cached latents), the data order or the random streams, or they are restored from the checkpoint (optimizer
# and EMA hyperparameters), so that a changed value would otherwise be ignored without a word. The number of
# processes and `RANDOM_STREAMS` are checked with them.
EXACT_RESUME_KEYS = ("seed", "flips", "skip_corrupt", "latent_cache_dtype", "train_batch_size",
                     "gradient_accumulation_steps", "prediction_type", "num_train_timesteps", "beta_schedule",
                     "beta_start", "beta_end", "learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay",
                     "adam_epsilon", "ema_max_decay", "ema_inv_gamma", "ema_power")
# Free (recorded): how the remaining steps run, each a legitimate reason to resume with another value. The
# length, LR schedule, clipping and non-finite policy take effect from the resume on (`max_train_steps` extends
# a run; with a decaying `lr_scheduler` it also reshapes the remaining schedule; `skip_nonfinite_steps` is what
# the non-finite loss stop says to resume with); precision and kernels follow the hardware the run resumes on
# and change rounding, not the objective; the rest is bookkeeping, caching or sampling during training. The
# keys that alter training (the schedule, clipping, precision, ...) make a run unfit as an arm of a comparison;
# compare.py reads them in `resume_changes`.
RECORDED_RESUME_KEYS = ("output_dir", "max_train_steps", "checkpointing_steps", "checkpoints_total_limit",
                        "log_every_steps", "allow_resume_changes", "latent_cache_dir", "encode_batch_size",
                        "dataloader_num_workers", "lr_scheduler", "lr_warmup_steps", "max_grad_norm",
                        "skip_nonfinite_steps", "mixed_precision", "allow_tf32", "channels_last", "torch_compile",
                        "recompute_value", "dcnv4_impl", "dcnv4_cuda_backward", "sample_every_steps", "num_samples",
                        "sample_inference_steps", "sample_scheduler")
# What a resume checks besides the config keys; refused like EXACT_RESUME_KEYS.
EXACT_RESUME_CHECKS = EXACT_RESUME_KEYS + ("num_processes", "random_streams")
# The version of the way a run derives its data order and noise from its seed, recorded in every checkpoint:
# checkpoints without it come from `seed + epoch` orders, which a resume cannot continue exactly.
RANDOM_STREAMS = 1


@dataclass
class TrainConfig:
    """Every option of a latent-diffusion training run. The defaults train the embedded CPU example."""

    # Output and run control.
    output_dir: str = "outputs/ldm_default"
    seed: int = 0
    max_train_steps: int = 1000
    checkpointing_steps: int = 250
    checkpoints_total_limit: int | None = 3
    resume_from_checkpoint: str | None = None
    log_every_steps: int = 10
    allow_resume_changes: bool = False  # resume even if EXACT_RESUME_KEYS or the process count changed

    # Data: images -> VAE -> cached latents (mean and std of the posterior, flips included).
    data_source: str = "builtin"
    resolution: int = 32
    class_conditional: bool = False
    # Label dropout: with class_conditional, each label becomes the null class (one more class embedding) with
    # this probability, which is what classifier-free guidance needs at sampling. 0: no null class.
    class_dropout_prob: float = 0.1
    flips: bool = True
    skip_corrupt: bool = False  # skip unreadable images (listed in the log and train_stats.json) instead of stopping
    vae: str | None = None  # path or hub id of an AutoencoderKL; None uses the built-in small VAE
    vae_subfolder: str | None = None
    latent_cache_dir: str | None = None  # None: <output_dir>/latent_cache
    latent_cache_dtype: str = "float32"  # how the cache stores the latents: float32, float16 or bfloat16 (rounded)
    encode_batch_size: int = 32
    dataloader_num_workers: int = 0

    # Model: the one switch between the DCNv4 U-Net and the conv baseline.
    model_type: str = "dcnv4"
    model_size: str = "tiny"  # a key of unet_dcnv4.unet.UNET_SIZES
    dcnv4_options: dict = field(default_factory=dict)  # DCNv4 fields (group_channels, ...), ignored for conv

    # Diffusion.
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012

    # Optimisation.
    train_batch_size: int = 32  # per process
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 20
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    skip_nonfinite_steps: bool = False

    # EMA of the weights (diffusers EMAModel with warmup: decay = 1 - (1 + step / inv_gamma) ** -power).
    use_ema: bool = True
    ema_max_decay: float = 0.9999
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.75

    # Hardware.
    mixed_precision: str = "no"
    allow_tf32: bool = True
    channels_last: bool = True
    torch_compile: bool = False
    recompute_value: bool = False  # DCNv4 only: recompute value_proj in the backward, less activation memory
    dcnv4_impl: str = "auto"  # DCNv4 only: the op's implementation, one of unet_dcnv4.ops.IMPLS
    dcnv4_cuda_backward: str = "atomic"  # DCNv4 only: the CUDA backward kernel, one of unet_dcnv4.ops.CUDA_BACKWARDS

    # Sample grids from the EMA weights during training.
    sample_every_steps: int = 250  # 0 disables
    num_samples: int = 16
    sample_inference_steps: int = 25
    sample_scheduler: str = "ddim"


def validate_config(cfg: TrainConfig) -> None:
    """Checks the types and ranges of every field; raises ValueError naming the key, the value and what was expected."""
    from pipelines import SAMPLERS

    from .data import LATENT_CACHE_DTYPES
    from .ops import CUDA_BACKWARDS, IMPLS
    from .unet import DCNV4_OPTIONS, MODEL_TYPES, UNET_SIZES

    config.coerce_fields(cfg)
    for key, options in (("model_type", MODEL_TYPES), ("model_size", UNET_SIZES), ("mixed_precision", PRECISIONS),
                         ("dcnv4_impl", IMPLS), ("dcnv4_cuda_backward", CUDA_BACKWARDS),
                         ("prediction_type", PREDICTION_TYPES), ("beta_schedule", BETA_SCHEDULES),
                         ("lr_scheduler", LR_SCHEDULERS), ("sample_scheduler", SAMPLERS),
                         ("latent_cache_dtype", LATENT_CACHE_DTYPES)):
        config.choice(cfg, key, options)
    unknown = sorted(set(cfg.dcnv4_options) - set(DCNV4_OPTIONS))
    if unknown:
        raise ValueError(f"config key 'dcnv4_options' has unknown keys {unknown}; valid: {', '.join(DCNV4_OPTIONS)}")
    for key in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "log_every_steps", "resolution",
                "num_train_timesteps", "train_batch_size", "gradient_accumulation_steps", "num_samples",
                "sample_inference_steps", "encode_batch_size"):
        config.at_least(cfg, key, 1)
    for key in ("seed", "lr_warmup_steps", "sample_every_steps", "dataloader_num_workers", "adam_weight_decay"):
        config.at_least(cfg, key, 0)
    for key in ("learning_rate", "max_grad_norm", "adam_epsilon", "ema_inv_gamma", "ema_power"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"config key '{key}' must be > 0, got {getattr(cfg, key)!r}")
    for key in ("adam_beta1", "adam_beta2", "ema_max_decay", "class_dropout_prob"):
        if not 0 <= getattr(cfg, key) < 1:
            raise ValueError(f"config key '{key}' must be in [0, 1), got {getattr(cfg, key)!r}")
    if not 0 < cfg.beta_start < cfg.beta_end < 1:
        raise ValueError(f"config keys 'beta_start' and 'beta_end' must satisfy 0 < beta_start < beta_end < 1, "
                         f"got {cfg.beta_start!r} and {cfg.beta_end!r}")
    if not cfg.output_dir:
        raise ValueError("config key 'output_dir' must be a non-empty path, got ''")


def load_config(path: str | os.PathLike | None = None, overrides: dict | typing.Iterable[str] = ()) -> TrainConfig:
    """Resolves a TrainConfig: dataclass defaults, then the YAML file, then the overrides (`config.resolve`).

    Args:
        path: a YAML file holding a mapping of config keys (a small diff over the defaults), or None.
        overrides: a dict of keys to values, or "key=value" strings (values read as YAML).

    Returns:
        The validated TrainConfig. Raises ValueError for unknown keys or invalid values, FileNotFoundError for a
        missing file.
    """
    return config.resolve(TrainConfig, path, overrides, validate_config)


def save_checkpoint(accelerator, checkpoints_dir: str | os.PathLike, step: int, cfg: TrainConfig, state: dict,
                    total_limit: int | None = None) -> Path:
    """`checkpoints.save_checkpoint` with the resolved config stored as config.yaml in the checkpoint; call on
    every process.

    Args:
        accelerator: the run's `accelerate.Accelerator` (models, optimizer and custom objects registered).
        checkpoints_dir: the run's checkpoints folder.
        step: the optimizer step the state belongs to.
        cfg: the resolved config.
        state: JSON-serialisable facts the run needs to resume or rebuild its pipeline (step, VAE, latents).
        total_limit: how many complete checkpoints to keep, None for all.

    Returns:
        The final checkpoint folder.
    """
    return checkpoints.save_checkpoint(accelerator, checkpoints_dir, step, state,
                                       {CHECKPOINT_CONFIG_FILE: config_to_yaml(cfg)}, total_limit)


def read_checkpoint_state(checkpoint_dir: str | os.PathLike) -> tuple[TrainConfig, dict]:
    """The resolved config and the training state stored in a checkpoint folder."""
    from .vae import vae_training_folder

    checkpoint_dir = Path(checkpoint_dir)
    state_file = checkpoint_dir / CHECKPOINT_STATE_FILE
    if not state_file.is_file():
        raise ValueError(f"checkpoint_dir {str(checkpoint_dir)!r} is not a complete checkpoint "
                         f"(no {CHECKPOINT_STATE_FILE})")
    found = vae_training_folder(checkpoint_dir)
    if found is not None:
        raise ValueError(f"checkpoint_dir {str(checkpoint_dir)!r} is {found[0]}, not of train_ldm.py (to train on "
                         "the VAE it trains, set vae to the vae/ folder of its run)")
    return load_config(checkpoint_dir / CHECKPOINT_CONFIG_FILE), json.loads(state_file.read_text())


def resume_changes(old_cfg: TrainConfig, cfg: TrainConfig, old_state: dict, num_processes: int) -> dict:
    """Everything a resume changes, as {key: (old, new)}: what the run records in its `resume_changes`.

    Raises ValueError for a change of `ARCHITECTURE_KEYS` (the checkpoint would not load, or would load into another
    model). Returns the other config keys whose values differ, in the config's order (not `resume_from_checkpoint`,
    nor `output_dir` when both name the same folder), then the process count and `RANDOM_STREAMS` when they
    differ. The caller refuses the changes of `EXACT_RESUME_CHECKS` unless `cfg.allow_resume_changes` is set.

    Args:
        old_cfg, old_state: the config and training state stored in the checkpoint (`read_checkpoint_state`).
        cfg: the config of the run that resumes.
        num_processes: the processes of the run that resumes.
    """
    changed = [k for k in ARCHITECTURE_KEYS if getattr(old_cfg, k) != getattr(cfg, k)]
    if changed:
        raise ValueError("resume_from_checkpoint was trained with different "
                         + ", ".join(f"{k} ({getattr(old_cfg, k)!r}, now {getattr(cfg, k)!r})" for k in changed))
    changes = {}
    for f in dataclasses.fields(TrainConfig):
        old, new = getattr(old_cfg, f.name), getattr(cfg, f.name)
        if f.name == "resume_from_checkpoint" or old == new:
            continue
        if f.name == "output_dir" and Path(old).resolve() == Path(new).resolve():
            continue
        changes[f.name] = (old, new)
    if old_state["num_processes"] != num_processes:
        changes["num_processes"] = (old_state["num_processes"], num_processes)
    if old_state.get("random_streams", 0) != RANDOM_STREAMS:
        changes["random_streams"] = (old_state.get("random_streams", 0), RANDOM_STREAMS)
    return changes


# What a run writes into its output_dir, removed by `--overwrite` (`remove_run`) with the leftovers of interrupted
# atomic writes; latent_cache/ stays, keyed by data, resolution and VAE and reusable by any run.
RUN_OUTPUTS = ("checkpoints", "pipeline", "train_stats.json", "samples", "logs", CHECKPOINT_CONFIG_FILE)


def run_in_folder(output_dir: str | os.PathLike) -> list[str]:
    """What in `output_dir` shows a run (empty if none): a finished run's train_stats.json and pipeline/ (or the
    previous pipeline a replacement left aside) and complete checkpoints, as paths relative to `output_dir`."""
    root = Path(output_dir)
    found = [name for name in ("train_stats.json", "pipeline", "pipeline.old") if (root / name).exists()]
    found += [f"checkpoints/{path.name}" for _, path in list_checkpoints(root / "checkpoints")]
    return found


def check_output_dir(output_dir: str | os.PathLike, resume_from_checkpoint: str | None, resume_dir: Path | None,
                     overwrite: bool) -> None:
    """Refuses a run that would mix with the run already in `output_dir`; raises ValueError saying what to pass.

    A new run (no `resume_from_checkpoint`, or 'latest' without a checkpoint) needs a folder without a run, or
    `overwrite`. 'latest' in a folder whose finished run has no checkpoint left is refused rather than starting
    over it. A resume from a checkpoint of another folder needs the same. `overwrite` replaces the folder's run, so
    it cannot be combined with a resume from its own checkpoints.

    Args:
        output_dir: the run's output folder.
        resume_from_checkpoint: the config's value (None, 'latest' or a path).
        resume_dir: the checkpoint it resolved to (`resolve_resume_checkpoint`), None for a new run.
        overwrite: the run replaces what `output_dir` holds.
    """
    checkpoints_dir = Path(output_dir) / "checkpoints"
    own = resume_dir is not None and resume_dir.resolve().parent == checkpoints_dir.resolve()
    if overwrite:
        if resume_from_checkpoint == "latest" or own:
            raise ValueError(f"--overwrite removes the checkpoints of output_dir {str(output_dir)!r}, so it cannot "
                             f"resume from them (resume_from_checkpoint {resume_from_checkpoint!r}): pass one or "
                             "the other")
        return
    found = run_in_folder(output_dir)
    if not found or own:
        return
    listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
    if resume_dir is not None:
        raise ValueError(f"output_dir {str(output_dir)!r} holds another run ({listed}), and resume_from_checkpoint "
                         f"{str(resume_dir)!r} is not one of its checkpoints: resume into an empty output_dir, or "
                         "pass --overwrite to replace that run")
    if resume_from_checkpoint == "latest":
        raise ValueError(f"resume_from_checkpoint 'latest' finds no complete checkpoint in {str(checkpoints_dir)!r}, "
                         f"but output_dir holds a finished run ({listed}) that a new run would replace: pass "
                         "--overwrite instead to replace it, or another --output_dir")
    raise ValueError(f"output_dir {str(output_dir)!r} holds a run already ({listed}): pass --resume_from_checkpoint "
                     "latest to continue it, --overwrite to replace it, or another --output_dir")


def remove_run(output_dir: str | os.PathLike) -> list[Path]:
    """Removes the `RUN_OUTPUTS` of a previous run from `output_dir` (and the leftovers of interrupted atomic
    writes); returns what was removed. The latent cache stays."""
    root = Path(output_dir)
    removed = []
    # The suffixes of `checkpoints.replace_folder` and `replace_file`.
    for path in (root / (name + suffix) for name in RUN_OUTPUTS for suffix in ("", ".tmp", ".old")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed


def load_checkpoint(accelerator, checkpoint_dir: str | os.PathLike, device: torch.device, ema=None) -> dict:
    """Restores a checkpoint into the run's registered objects, each on `device`; returns its training state.

    Accelerate restores custom objects from CPU tensors, and diffusers' `EMAModel.load_state_dict` keeps them
    there: the EMA is moved to the model's device, or its next `step` would mix devices. The optimizer state
    follows its parameters (torch's `Optimizer.load_state_dict`) and `NoiseGenerator` keeps its generator's
    device, so neither needs moving.

    Args:
        accelerator: the run's `accelerate.Accelerator`, with everything to restore prepared or registered.
        checkpoint_dir: a complete `checkpoint-<step>` folder.
        device: the model's device.
        ema: the run's diffusers `EMAModel`, or None.
    """
    accelerator.load_state(str(checkpoint_dir))
    if ema is not None:
        ema.to(device)
    return read_checkpoint_state(checkpoint_dir)[1]


class EpochSampler(torch.utils.data.Sampler):
    """Indices 0..n-1 in a random order per epoch, drawn from `derive_seed(seed, "data", epoch)`.

    The order is a function of (seed, epoch) alone, the same on every process (accelerate's prepared data loader
    shards its batches and passes `set_epoch` on to it), so a resumed run reads what an uninterrupted one would.

    Args:
        num_items: the dataset's length n.
        seed: the run's seed.
    """

    def __init__(self, num_items: int, seed: int):
        self.num_items, self.seed, self.epoch = num_items, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self):
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "data", self.epoch))
        yield from torch.randperm(self.num_items, generator=generator).tolist()


class NoiseGenerator:
    """A torch.Generator per process whose state travels with `accelerator.save_state`.

    Accelerate saves registered objects from the main process only, so `state_dict` gathers the state of
    every process and `load_state_dict` hands each process its own back: a resumed multi-process run draws
    the same latent and diffusion noise as an uninterrupted one.

    Args:
        seed: the run's seed; process `rank` seeds its generator with `derive_seed(seed, "noise", rank, *keys)`.
        device: where the generator draws (the accelerator's device).
        rank: this process's index; world_size: the number of processes.
        keys: ints >= 0 that start another stream (a resume onto a different number of processes passes its step).
        strict: False lets `load_state_dict` ignore a state saved by another number of processes, whose streams
            do not map onto this run's; the generator keeps its own seed.
    """

    def __init__(self, seed: int, device: torch.device, rank: int = 0, world_size: int = 1, keys: tuple = (),
                 strict: bool = True):
        self.rank, self.world_size, self.strict = rank, world_size, strict
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(derive_seed(seed, "noise", rank, *keys))

    def state_dict(self) -> dict:
        state = self.generator.get_state()
        if self.world_size > 1:
            states = [None] * self.world_size
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        return {"world_size": self.world_size, "states": states}

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size:
            if not self.strict:
                return
            raise ValueError(f"checkpoint was written by {state['world_size']} processes, this run has "
                             f"{self.world_size}: exact resume needs the same number of processes")
        self.generator.set_state(state["states"][self.rank])


def null_class_label(cfg: TrainConfig, num_classes: int) -> int | None:
    """The class embedding trained as "no class" by label dropout (the one after the data's classes), or None."""
    return num_classes if cfg.class_conditional and cfg.class_dropout_prob > 0 else None


def class_embeddings(cfg: TrainConfig, num_classes: int) -> int | None:
    """`num_class_embeds` of the U-Net: the data's classes plus the null class of label dropout, None if unconditional."""
    if not cfg.class_conditional:
        return None
    return num_classes + int(null_class_label(cfg, num_classes) is not None)


def unet_options(cfg: TrainConfig) -> dict:
    """Keyword arguments for `build_unet` beyond the shape: the DCNv4 options and the op's implementation and CUDA
    backward kernel (the conv baseline takes none)."""
    if cfg.model_type != "dcnv4":
        return {}
    return dict(cfg.dcnv4_options, impl=cfg.dcnv4_impl, cuda_backward=cfg.dcnv4_cuda_backward)
