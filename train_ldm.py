#!/usr/bin/env python
"""Train a DCNv4 U-Net or its conv baseline on cached VAE latents with accelerate, resumably.

Run with no arguments to train the embedded CPU example; `accelerate launch train_ldm.py --config ...` for real runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time
import typing
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unet_dcnv4 import config
from unet_dcnv4.checkpoints import replace_file, replace_folder
from unet_dcnv4.data import CorruptImageError
from unet_dcnv4.progress import progress as progress_bar
from unet_dcnv4.training import (
    EXACT_RESUME_CHECKS, RANDOM_STREAMS, EpochSampler, NoiseGenerator, TrainConfig, check_output_dir, config_to_dict,
    config_to_yaml, load_checkpoint, read_checkpoint_state, remove_run, resolve_resume_checkpoint, resume_changes,
    save_checkpoint, unet_options, validate_config,
)
from unet_dcnv4.training import class_embeddings, null_class_label
from unet_dcnv4.vae import VAELoadError

# The flags with the names the diffusers training scripts use; any other key goes through --set key=value.
NAMED_FLAGS = {"output_dir": None, "max_train_steps": None, "checkpointing_steps": None,
               "checkpoints_total_limit": None, "resume_from_checkpoint": "'latest' or a checkpoint folder",
               "seed": None, "mixed_precision": "no, fp16 or bf16", "gradient_accumulation_steps": None}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite and the config does not allow skipping such steps."""


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, bool, bool]:
    """Resolves the config from the command line; returns (config, dry_run, overwrite). Raises ValueError on bad
    keys/values."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    config.add_arguments(parser, TrainConfig, NAMED_FLAGS)
    # A command-line flag, not a config key: it says what to do with the folder, not what the run is.
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in output_dir (its checkpoints, pipeline, stats, samples, logs and "
                             "config; the latent cache stays) instead of refusing to start")
    args = parser.parse_args(argv)
    cfg, dry_run = config.resolve_arguments(args, TrainConfig, NAMED_FLAGS, validate_config)
    return cfg, dry_run, args.overwrite


def build_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                            logging_dir=os.path.join(cfg.output_dir, "logs")),
    )


def build_dataloader(cfg: TrainConfig, dataset) -> torch.utils.data.DataLoader:
    """The training loader, to be prepared: batches of `cfg.train_batch_size` in the order of an `EpochSampler`
    (a function of the seed and the epoch set with `set_epoch`), which accelerate shards across processes."""
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.train_batch_size, drop_last=True,
                                       sampler=EpochSampler(len(dataset), cfg.seed),
                                       num_workers=cfg.dataloader_num_workers)


def prepare_latents(cfg: TrainConfig, accelerator):
    """Encodes the dataset once (cached, keyed by data, resolution and VAE).

    Returns:
        (LatentDataset, vae, vae_id, skipped): `skipped` lists the unreadable images left out (skip_corrupt).
    """
    from unet_dcnv4.data import LatentDataset, build_image_dataset, build_latent_cache, check_source
    from unet_dcnv4.vae import builtin_vae, load_vae

    # Checked first: a missing folder is cheaper to report than a VAE to load.
    check_source(cfg.data_source, "data_source")
    if cfg.vae is None:
        # Trains and caches the small VAE on first use: once, on the main process.
        with accelerator.main_process_first():
            vae_id = builtin_vae()
    else:
        # A local folder is recorded absolute, so that a checkpoint finds it from any working directory.
        vae_id = os.path.abspath(cfg.vae) if os.path.isdir(cfg.vae) else cfg.vae
    vae = load_vae(vae_id, subfolder=cfg.vae_subfolder).to(accelerator.device)
    vae.requires_grad_(False)
    dataset = build_image_dataset(cfg.data_source, resolution=cfg.resolution, class_labels=cfg.class_conditional,
                                  skip_corrupt=cfg.skip_corrupt)
    skipped = list(getattr(dataset, "skipped", []))
    if skipped:
        accelerator.print(f"skip_corrupt: skipped {len(skipped)} unreadable image(s): {', '.join(skipped)}")
    cache_dir = cfg.latent_cache_dir or os.path.join(cfg.output_dir, "latent_cache")
    cache_dir = build_latent_cache(dataset, vae, cache_dir, cfg.resolution, vae_id, batch_size=cfg.encode_batch_size,
                                   accelerator=accelerator, flips=cfg.flips, dtype=cfg.latent_cache_dtype)
    latents = LatentDataset(cache_dir)
    if cfg.class_conditional and latents.num_classes < 1:
        raise ValueError(f"class_conditional is true, but data_source {cfg.data_source!r} has no class labels "
                         "(a folder needs one sub-folder per class)")
    return latents, vae, vae_id, skipped


def build_model(cfg: TrainConfig, latent_shape: tuple[int, int, int], num_classes: int):
    """The U-Net for latents of shape (c, h, w): `cfg.model_type` picks DCNv4 or conv, all else identical."""
    from unet_dcnv4.unet import build_unet

    c, h, w = latent_shape
    if h != w:
        raise ValueError(f"latents must be square, got latent_shape {latent_shape}")
    return build_unet(cfg.model_type, cfg.model_size, sample_size=h, in_channels=c,
                      num_class_embeds=class_embeddings(cfg, num_classes), **unet_options(cfg))


def compute_loss(model, noise_scheduler, batch: dict, generator: torch.Generator, prediction_type: str,
                 class_conditional: bool, null_label: int | None = None,
                 class_dropout_prob: float = 0.0) -> torch.Tensor:
    """The denoising loss of one micro-batch.

    Args:
        model: the (wrapped) U-Net.
        noise_scheduler: the training `DDPMScheduler`.
        batch: {"mean": (B, c, h, w), "std": (B, c, h, w), "class_labels": (B,)} on the model's device.
        generator: draws the latent sample, the timesteps and the diffusion noise (its state is checkpointed).
        prediction_type: "epsilon" or "v_prediction".
        class_conditional: pass the class labels to the model.
        null_label: the null class of label dropout, None for none.
        class_dropout_prob: probability that a label is replaced by `null_label` (drawn from `generator`).

    Returns:
        The scalar fp32 MSE between the model output and its target.
    """
    from unet_dcnv4.data import sample_latents

    latents = sample_latents(batch["mean"], batch["std"], generator=generator)  # (B, c, h, w)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)  # (B, c, h, w)
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    labels = batch["class_labels"] if class_conditional else None
    if labels is not None and null_label is not None:
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < class_dropout_prob
        labels = torch.where(drop, torch.full_like(labels, null_label), labels)  # (B,)
    pred = model(noisy, timesteps, class_labels=labels).sample  # (B, c, h, w)
    return F.mse_loss(pred.float(), target.float())


def save_sample_grid(pipe, cfg: TrainConfig, num_classes: int, path: Path) -> np.ndarray:
    """Samples `cfg.num_samples` images with fixed seeds, saves them as one PNG grid; returns the grid (H, W, 3) uint8."""
    from PIL import Image
    from torchvision.utils import make_grid

    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    labels = [i % num_classes for i in range(cfg.num_samples)] if cfg.class_conditional else None
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=cfg.num_samples, generator=generator, num_inference_steps=cfg.sample_inference_steps,
                  class_labels=labels, output_type="np").images  # (B, H, W, 3) in [0, 1]
    nrow = max(1, int(math.sqrt(cfg.num_samples)))
    grid = make_grid(torch.from_numpy(images).permute(0, 3, 1, 2), nrow=nrow, padding=2)  # (3, H', W')
    grid = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return grid


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the peak resident set size of this process on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _hparams(cfg: TrainConfig) -> dict:
    """The config in the scalar types TensorBoard's hparams accept."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config_to_dict(cfg).items()}


@dataclasses.dataclass
class Resume:
    """What a run continues: the checkpoint (None for a new run), its training state, the config changes since
    it ({key: (old, new)}, checked by `plan_resume`), described in words, and every change recorded so far."""

    checkpoint: Path | None = None
    state: dict | None = None
    changes: dict = dataclasses.field(default_factory=dict)
    described: str = ""
    history: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Parts:
    """What trains: the prepared model (and the module inside its wrappers), the noise schedule, the optimiser
    and LR schedule, the prepared data loader, the EMA (or None), the noise generator and the objects that
    every checkpoint saves beside the model."""

    model: torch.nn.Module
    unwrapped: torch.nn.Module
    noise_scheduler: typing.Any
    optimizer: torch.optim.Optimizer
    lr_scheduler: typing.Any
    dataloader: torch.utils.data.DataLoader
    ema: typing.Any
    rng: NoiseGenerator
    custom_objects: list
    num_parameters: int


def train(cfg: TrainConfig, overwrite: bool = False) -> dict:
    """Runs (or resumes) the training described by `cfg`; returns the statistics written to train_stats.json.

    A new run refuses an output_dir that holds a run (`check_output_dir`) unless `overwrite`, which removes that
    run once this one's inputs are checked (`remove_run`). config.yaml is written then, when the run starts.
    """
    wall_start = time.perf_counter()
    accelerator = build_accelerator(cfg)
    # 1. What the run continues, its changes checked before anything is built.
    resume = plan_resume(cfg, accelerator, overwrite)
    if accelerator.is_main_process:
        print(config_to_yaml(cfg), end="")
    if accelerator.device.type == "cuda" and cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # 2. Data: latents cached once, a fresh latent drawn from the posterior every step.
    latents, vae, vae_id, skipped_images = prepare_latents(cfg, accelerator)
    global_batch = cfg.train_batch_size * accelerator.num_processes
    if len(latents) < global_batch:
        raise ValueError(f"train_batch_size {cfg.train_batch_size} x {accelerator.num_processes} processes needs at "
                         f"least {global_batch} latents, the dataset has {len(latents)}")
    # 3. Model, noise schedule, optimiser, EMA, noise generator, and their state when resuming.
    parts = build_parts(cfg, accelerator, latents, resume)
    global_step, train_seconds = restore(cfg, accelerator, parts, resume)
    # 4. The run starts: only now is a previous run removed (--overwrite) and the config written.
    start_run(cfg, accelerator, overwrite)
    state = run_state(cfg, accelerator, latents, vae, vae_id, skipped_images, parts, resume)
    # 5. The steps, with checkpoints and sample grids on the way.
    loop = train_steps(cfg, accelerator, parts, latents, vae, state, global_step, train_seconds, resume.checkpoint)
    # 6. The pipeline folder (EMA weights) and the run's statistics.
    images_per_step = global_batch * cfg.gradient_accumulation_steps
    stats = run_stats(cfg, accelerator, parts, state, loop, images_per_step, wall_start, skipped_images,
                      resume.history)
    write_outputs(cfg, accelerator, parts, vae, state, stats)
    accelerator.end_training()
    return stats


def plan_resume(cfg: TrainConfig, accelerator, overwrite: bool) -> Resume:
    """The checkpoint the run continues (or none), after refusing a used output_dir for a new run and a change
    that breaks exact resume unless allowed; every change is recorded with the step it starts at."""
    checkpoints_dir = Path(cfg.output_dir) / "checkpoints"
    resume_dir = resolve_resume_checkpoint(cfg.resume_from_checkpoint, checkpoints_dir)
    check_output_dir(Path(cfg.output_dir), cfg.resume_from_checkpoint, resume_dir, overwrite)
    if resume_dir is None:
        return Resume()
    old_cfg, old_state = read_checkpoint_state(resume_dir)
    try:
        changes = resume_changes(old_cfg, cfg, old_state, accelerator.num_processes)
    except ValueError as err:
        raise ValueError(f"{err} in {str(resume_dir)!r}") from None
    described = ", ".join(f"{k} ({old!r}, now {new!r})" for k, (old, new) in changes.items())
    exact = {k: v for k, v in changes.items() if k in EXACT_RESUME_CHECKS}
    if exact and not cfg.allow_resume_changes:
        listed = ", ".join(f"{k} ({old!r}, now {new!r})" for k, (old, new) in exact.items())
        raise ValueError(f"resume_from_checkpoint {str(resume_dir)!r} was trained with different {listed}; "
                         "that breaks exact resume (set allow_resume_changes: true, "
                         "--set allow_resume_changes=true, to continue anyway)")
    # Every change is recorded with the step it starts at, in train_stats.json and every later checkpoint.
    history = old_state.get("resume_changes", [])
    if changes:
        history = history + [{"step": old_state["step"], "checkpoint": str(resume_dir),
                              "changes": {k: list(v) for k, v in changes.items()}}]
    return Resume(resume_dir, old_state, changes, described, history)


def build_parts(cfg: TrainConfig, accelerator, latents, resume: Resume) -> Parts:
    """The model, noise schedule, optimiser, LR schedule, EMA and noise generator, prepared by accelerate and
    registered for checkpointing. Seeded here: building the latent cache (or finding it built) must not change
    the initial weights."""
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    device = accelerator.device
    set_seed(cfg.seed)
    model = build_model(cfg, latents.latent_shape, latents.num_classes)
    if cfg.recompute_value and cfg.model_type == "dcnv4":
        model.enable_value_recompute()
    num_parameters = sum(p.numel() for p in model.parameters())
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Latents are not bounded to [-1, 1]: clipping the predicted x0 there (diffusers' pixel-space default)
    # would collapse the samples' variance.
    noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                                    beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                                    prediction_type=cfg.prediction_type, clip_sample=False)
    # The fused AdamW (one kernel over all parameters) and the EMA's foreach update: the default per-tensor
    # loops cost a few ms a step on a CPU, more for the DCNv4 U-Net, which has more (smaller) tensors.
    # The DCNv4 U-Net's offset/mask branches may learn at their own rate (dcnv4_options: offset_lr_scale).
    groups = model.parameter_groups(cfg.learning_rate) if hasattr(model, "parameter_groups") else \
        [{"params": list(model.parameters()), "lr": cfg.learning_rate, "lr_scale": 1.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
                                  fused=device.type in ("cpu", "cuda") or None)
    # Stepped once per optimizer step on every process (not prepared, so it never scales with the process count).
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps)
    if cfg.torch_compile:
        model = torch.compile(model)
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, build_dataloader(cfg, latents))
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    custom_objects, ema = [], None
    if cfg.use_ema:
        ema = EMAModel(unwrapped.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=True,
                       inv_gamma=cfg.ema_inv_gamma, power=cfg.ema_power, foreach=True)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)
        custom_objects.append("ema")
    accelerator.register_for_checkpointing(lr_scheduler)
    custom_objects += ["lr_scheduler", "rng"]
    # Per-process noise states do not map onto another process count: a resume onto one starts new streams,
    # keyed by its step.
    resized = "num_processes" in resume.changes
    rng = NoiseGenerator(cfg.seed, device, accelerator.process_index, accelerator.num_processes,
                         keys=(resume.state["step"],) if resized else (), strict=not resized)
    accelerator.register_for_checkpointing(rng)
    return Parts(model, unwrapped, noise_scheduler, optimizer, lr_scheduler, dataloader, ema, rng, custom_objects,
                 num_parameters)


def restore(cfg: TrainConfig, accelerator, parts: Parts, resume: Resume) -> tuple[int, float]:
    """Loads the checkpoint's state into the parts and applies the allowed changes over it. Returns the step to
    continue from and the seconds spent in optimisation steps so far (0 and 0.0 for a new run)."""
    if resume.checkpoint is None:
        if cfg.resume_from_checkpoint == "latest":
            accelerator.print(f"No complete checkpoint in {Path(cfg.output_dir) / 'checkpoints'}; starting a new run")
        return 0, 0.0
    accelerator.print(f"Resuming from {resume.checkpoint} at step {resume.state['step']}"
                      + (f", recording the changes {resume.described}" if resume.changes else ", nothing changed"))
    model_device = next(parts.unwrapped.parameters()).device
    resumed = load_checkpoint(accelerator, resume.checkpoint, model_device, parts.ema)
    apply_resume_changes(resume.changes, cfg, parts.optimizer, parts.lr_scheduler, parts.ema)
    # Seconds spent in optimisation steps since step 0, over every resume: the x axis of FID against time.
    return resumed["step"], resumed.get("train_seconds") or 0.0


def start_run(cfg: TrainConfig, accelerator, overwrite: bool) -> None:
    """The run's inputs are checked, its model built and its state restored: only now is a previous run removed
    (--overwrite) and the config written, so that a run that stops on its inputs changes nothing."""
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        if overwrite:
            removed = remove_run(output_dir)
            if removed:
                print(f"--overwrite: removed {', '.join(p.name for p in removed)} from {output_dir}")
        output_dir.mkdir(parents=True, exist_ok=True)
        replace_file(output_dir / "config.yaml", config_to_yaml(cfg))
    accelerator.wait_for_everyone()


def run_state(cfg: TrainConfig, accelerator, latents, vae, vae_id: str, skipped_images: list, parts: Parts,
              resume: Resume) -> dict:
    """What every checkpoint records beside the weights (with the step and seconds added when it is written):
    the VAE and the latents' scaling, the data, the noise schedule, the process count and the resume history.
    The VAE takes the latents' scaling, which the saved pipeline divides by."""
    scaling_factor, shift_factor = latents.scaling_factor, latents.shift_factor
    vae.register_to_config(scaling_factor=scaling_factor, shift_factor=shift_factor)
    return {"vae": vae_id, "vae_subfolder": cfg.vae_subfolder, "scaling_factor": scaling_factor,
            "shift_factor": shift_factor, "latent_shape": list(latents.latent_shape),
            "num_classes": latents.num_classes, "custom_objects": parts.custom_objects,
            "train_scheduler_config": dict(parts.noise_scheduler.config),
            "num_processes": accelerator.num_processes, "skipped_images": skipped_images,
            "resume_changes": resume.history, "random_streams": RANDOM_STREAMS,
            "data_fingerprint": latents.index["dataset_fingerprint"], "vae_hash": latents.index["vae_hash"],
            # Images per class (flipped copies not counted twice): the class mix of samples for FID.
            "class_counts": (torch.bincount(latents.labels, minlength=latents.num_classes)
                             // (2 if latents.flips else 1)).tolist() if cfg.class_conditional else None}


def sampling_pipeline(cfg: TrainConfig, parts: Parts, vae, state: dict):
    """The latent diffusion pipeline of the model being trained (its current weights) and the run's VAE."""
    from pipelines import LatentDiffusionPipeline, make_scheduler

    return LatentDiffusionPipeline(unet=parts.unwrapped, vae=vae,
                                   scheduler=make_scheduler(cfg.sample_scheduler, parts.noise_scheduler.config),
                                   null_class_label=null_class_label(cfg, state["num_classes"]),
                                   class_counts=state["class_counts"])


def train_steps(cfg: TrainConfig, accelerator, parts: Parts, latents, vae, state: dict, global_step: int,
                train_seconds: float, last_checkpoint: Path | None) -> dict:
    """The training loop from `global_step` to `cfg.max_train_steps`: one iteration is one optimizer step over
    gradient_accumulation_steps micro-batches; logs, checkpoints and sample grids at their intervals.

    Returns:
        {"global_step", "train_seconds", "timed_steps", "timed_seconds", "skipped_steps", "last_loss"}.
    """
    output_dir = Path(cfg.output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    is_main = accelerator.is_main_process
    model, unwrapped, ema, dataloader = parts.model, parts.unwrapped, parts.ema, parts.dataloader
    null_label = null_class_label(cfg, latents.num_classes)

    def checkpoint(step: int) -> Path:
        return save_checkpoint(accelerator, checkpoints_dir, step, cfg,
                               dict(state, step=step, train_seconds=train_seconds),
                               total_limit=cfg.checkpoints_total_limit)

    def sample(step: int) -> None:
        if is_main:
            if cfg.use_ema:
                ema.store(unwrapped.parameters())
                ema.copy_to(unwrapped.parameters())
            unwrapped.eval()
            grid = save_sample_grid(sampling_pipeline(cfg, parts, vae, state), cfg, latents.num_classes,
                                    output_dir / "samples" / f"step-{step:07d}.png")
            unwrapped.train()
            if cfg.use_ema:
                ema.restore(unwrapped.parameters())
            accelerator.get_tracker("tensorboard").log_images({"samples": grid[None]}, step=step,
                                                               dataformats="NHWC")
        accelerator.wait_for_everyone()

    # Data order: batch b of the run is batch (b mod len) of epoch (b div len); resume skips what was consumed.
    def batches(start: int):
        epoch, skip = divmod(start, len(dataloader))
        while True:
            dataloader.set_epoch(epoch)
            loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
            yield from loader
            epoch, skip = epoch + 1, 0

    accelerator.init_trackers("train_ldm", config=_hparams(cfg))
    progress = progress_bar(total=cfg.max_train_steps, initial=global_step, desc="train", disable=not is_main)
    data = batches(global_step * cfg.gradient_accumulation_steps)
    images_per_step = cfg.train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    steps_this_run, timed_steps, timed_seconds, skipped_steps = 0, 0, 0.0, 0
    last_loss = float("nan")
    model.train()
    while global_step < cfg.max_train_steps:
        step_start = time.perf_counter()
        micro_losses = []
        for micro in range(cfg.gradient_accumulation_steps):
            batch = next(data)
            last_micro = micro == cfg.gradient_accumulation_steps - 1
            # Gradients are all-reduced only on the last micro-batch of the step.
            with nullcontext() if last_micro else accelerator.no_sync(model):
                loss = compute_loss(model, parts.noise_scheduler, batch, parts.rng.generator, cfg.prediction_type,
                                    cfg.class_conditional, null_label, cfg.class_dropout_prob)
                accelerator.backward(loss / cfg.gradient_accumulation_steps)
            micro_losses.append(loss.detach())
        step_loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        finite = math.isfinite(step_loss)
        if not finite and not cfg.skip_nonfinite_steps:
            where = f"resume from {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
            progress.close()
            accelerator.end_training()
            raise NonFiniteLossError(f"loss is {step_loss} at step {global_step + 1}; stopping ({where}; "
                                     "set skip_nonfinite_steps: true to skip such steps)")
        # fp16's grad scaler skips steps with non-finite gradients itself and must see them to lower its scale.
        if finite or cfg.mixed_precision == "fp16":
            parts.optimizer.step()
        parts.optimizer.zero_grad(set_to_none=True)
        parts.lr_scheduler.step()
        if finite:
            if cfg.use_ema:
                ema.step(unwrapped.parameters())
            last_loss = step_loss
        else:
            skipped_steps += 1
            accelerator.print(f"skipping step {global_step + 1}: loss is {step_loss} ({skipped_steps} skipped)")
        global_step += 1
        steps_this_run += 1
        step_seconds = time.perf_counter() - step_start
        train_seconds += step_seconds
        if steps_this_run > 1:
            # The first step of a process pays for warm-up (allocations, compilation): not timed.
            timed_steps, timed_seconds = timed_steps + 1, timed_seconds + step_seconds
        images_per_s = images_per_step * timed_steps / timed_seconds if timed_seconds else float("nan")
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", img_s=f"{images_per_s:.1f}")

        if global_step % cfg.log_every_steps == 0 or global_step == cfg.max_train_steps or not finite:
            accelerator.log({"train/loss": step_loss, "train/lr": parts.lr_scheduler.get_last_lr()[0],
                             "train/images_per_s": images_per_s, "train/grad_norm": float(grad_norm),
                             "train/skipped_steps": skipped_steps}, step=global_step)
        if global_step % cfg.checkpointing_steps == 0 or global_step == cfg.max_train_steps:
            last_checkpoint = checkpoint(global_step)
        if cfg.sample_every_steps and global_step % cfg.sample_every_steps == 0:
            sample(global_step)
    progress.close()
    return {"global_step": global_step, "train_seconds": train_seconds, "timed_steps": timed_steps,
            "timed_seconds": timed_seconds, "skipped_steps": skipped_steps, "last_loss": last_loss}


def run_stats(cfg: TrainConfig, accelerator, parts: Parts, state: dict, loop: dict, images_per_step: int,
              wall_start: float, skipped_images: list, history: list) -> dict:
    """The statistics train_stats.json holds: steps, speed, loss, memory, the data and what changed on resume."""
    device = accelerator.device
    timed_steps, timed_seconds = loop["timed_steps"], loop["timed_seconds"]
    return {
        "steps": loop["global_step"],
        "images_per_s": images_per_step * timed_steps / timed_seconds if timed_seconds else None,
        "final_loss": loop["last_loss"],
        "parameters": parts.num_parameters,
        "wall_time_s": time.perf_counter() - wall_start,
        "train_seconds": loop["train_seconds"],
        "data_fingerprint": state["data_fingerprint"],
        # Where the data was, whatever folder the run was started from: compare.py measures FID against it.
        "data_source_path": os.path.abspath(cfg.data_source) if os.path.isdir(cfg.data_source) else None,
        "vae_hash": state["vae_hash"],
        "peak_memory_mb": peak_memory_mb(device),
        "peak_memory_kind": "cuda_allocated" if device.type == "cuda" else "cpu_max_rss",
        "skipped_steps": loop["skipped_steps"],
        "model_type": cfg.model_type,
        "model_size": cfg.model_size,
        "mixed_precision": cfg.mixed_precision,
        "num_processes": accelerator.num_processes,
        "skipped_images": skipped_images,
        "num_skipped_images": len(skipped_images),
        "allow_resume_changes": cfg.allow_resume_changes,
        "resume_changes": history,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def write_outputs(cfg: TrainConfig, accelerator, parts: Parts, vae, state: dict, stats: dict) -> None:
    """The pipeline folder with the EMA weights (the raw ones without EMA) and train_stats.json, each replaced
    whole: a kill or an error leaves the previous one or the new one, never a part."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir = Path(cfg.output_dir)
        if cfg.use_ema:
            parts.ema.copy_to(parts.unwrapped.parameters())
        replace_folder(output_dir / "pipeline", sampling_pipeline(cfg, parts, vae, state).save_pretrained)
        replace_file(output_dir / "train_stats.json", json.dumps(stats, indent=2) + "\n")
        print(f"Outputs in {output_dir.resolve()}: pipeline/ (EMA U-Net + VAE + scheduler), checkpoints/, "
              f"samples/, logs/ (TensorBoard), train_stats.json, config.yaml")


def apply_resume_changes(changes: dict, cfg: TrainConfig, optimizer, lr_scheduler, ema) -> None:
    """Puts the new values of changed hyperparameters over those the checkpoint restored.

    The optimizer, the LR scheduler (its base learning rate) and the EMA restore their hyperparameters from the
    checkpoint; a change that `allow_resume_changes` lets through would otherwise be ignored.

    Args:
        changes: {key: (old, new)} from `resume_changes`.
        cfg: the resumed run's config.
        optimizer, lr_scheduler: the run's (prepared) AdamW and its LambdaLR scheduler, state already loaded.
        ema: the run's EMAModel, or None.
    """
    for group in optimizer.param_groups:
        if {"adam_beta1", "adam_beta2"} & changes.keys():
            group["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
        if "adam_weight_decay" in changes:
            group["weight_decay"] = cfg.adam_weight_decay
        if "adam_epsilon" in changes:
            group["eps"] = cfg.adam_epsilon
    if "learning_rate" in changes:
        lr_scheduler.base_lrs = [cfg.learning_rate * g.get("lr_scale", 1.0) for g in optimizer.param_groups]
        for group, base, factor in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * factor(lr_scheduler.last_epoch)
    if ema is not None and {"ema_max_decay", "ema_inv_gamma", "ema_power"} & changes.keys():
        ema.decay, ema.inv_gamma, ema.power = cfg.ema_max_decay, cfg.ema_inv_gamma, cfg.ema_power


# A user's mistakes (a bad config value, a missing folder or checkpoint, an unreadable image or VAE): one line.
INPUT_ERRORS = (ValueError, FileNotFoundError, CorruptImageError, VAELoadError)


def error_line(err: Exception) -> str:
    """The one-line message of an input error; an unreadable image names the key that skips it."""
    text = " ".join(str(err).split())
    if isinstance(err, CorruptImageError) and "--set skip_corrupt=true" not in text:
        text += " (--set skip_corrupt=true)"
    return text


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, dry_run, overwrite = parse_args(argv)
    except INPUT_ERRORS as err:
        print(f"train_ldm.py: error: {error_line(err)}", file=sys.stderr)
        return 2
    if dry_run:
        print(config_to_yaml(cfg), end="")
        return 0
    try:
        train(cfg, overwrite)
    except NonFiniteLossError as err:
        print(f"train_ldm.py: {err}", file=sys.stderr)
        return 1
    except INPUT_ERRORS as err:
        print(f"train_ldm.py: error: {error_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
