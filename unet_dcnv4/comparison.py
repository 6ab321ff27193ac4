"""Comparing two arms of training runs (e.g. the DCNv4 U-Net and the conv baseline, several seeds each): the
check that they share one experiment, sampling and FID/KID of every run, the interval of the FID difference
(`intervals.py`), and the report (`comparison.json`, `.md`, `.png`). `compare.py` is its command line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import typing
from pathlib import Path

import numpy as np
import torch

from .curves import curve_analysis, curve_lines
from .intervals import difference_interval, jackknife_fid_variance, verdict

__all__ = ["EXPERIMENT_EXCLUDED", "BOOKKEEPING", "MIN_IMAGES", "read_run", "experiment_identity", "model_config",
           "training_changes", "check_distinct_runs", "check_comparable", "training_data", "compare_arms",
           "pool_comparisons", "interval_text", "markdown_table", "write_figure"]

# TrainConfig keys that do not define the experiment: the model (what is compared), the seed (what varies
# within an arm), bookkeeping and hardware settings. Every other key must agree between all runs, and new keys
# are compared unless listed here. Some keys are replaced by what they resolve to: the data and VAE by their
# fingerprints, batch size and accumulation by the global batch, max_train_steps by the steps trained.
MODEL_KEYS = ("model_type", "model_size", "dcnv4_options", "recompute_value")
EXPERIMENT_EXCLUDED = MODEL_KEYS + (
    "seed", "output_dir", "resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit",
    "log_every_steps", "latent_cache_dir", "encode_batch_size", "dataloader_num_workers", "allow_tf32",
    "channels_last", "torch_compile", "dcnv4_impl", "dcnv4_cuda_backward", "sample_every_steps", "num_samples",
    "sample_inference_steps", "sample_scheduler", "train_batch_size", "gradient_accumulation_steps",
    "max_train_steps", "data_source", "vae", "vae_subfolder", "allow_resume_changes",
)
# Keys that do not change what a run trains: the exclusions less the model, the seed and those replaced by what
# they resolve to (data, VAE, global batch). A resume may change them without changing the run's meaning;
# max_train_steps too, unless the learning-rate schedule is drawn over it (LR_SCHEDULES_OVER_STEPS).
BOOKKEEPING = tuple(k for k in EXPERIMENT_EXCLUDED if k not in MODEL_KEYS + (
    "seed", "data_source", "vae", "vae_subfolder", "train_batch_size", "gradient_accumulation_steps"))
LR_SCHEDULES_OVER_STEPS = ("linear", "cosine")
# Samples a run needs at least: FID needs a covariance, the jackknife of a one-run arm three images.
MIN_IMAGES = 3
# The DCNv4-only keys of a model: a conv run ignores them. recompute_value is not one: it trains the same weights.
DCNV4_MODEL_KEYS = ("dcnv4_options",)
# What the runs of a comparison share and how they were measured: comparisons pooled by `pool_comparisons` agree
# on all of it ("experiment": what `experiment_identity` gives every run, seed and model aside).
POOLED_PROTOCOL = ("experiment", "sampler", "num_inference_steps", "num_images", "seed", "mixed_precision",
                   "guidance_scale", "class_mix", "reference", "num_reference", "resolution", "inception_weights",
                   "isc", "prc", "kid_unavailable")
# What makes an arm's model: the same arm of every pooled comparison agrees on all of it.
POOLED_ARM = ("label", "model_type", "model_size", "dcnv4_options", "match", "parameters", "gflops",
              "block_out_channels", "train_steps")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _latent_cache_index(run: Path, cfg) -> dict | None:
    """The latent cache index the run trained on: its own folder's cache, or the configured one."""
    candidates = [run / "latent_cache"]
    if cfg.latent_cache_dir:
        candidates.append(Path(cfg.latent_cache_dir))
    for folder in candidates:
        if (folder / "cache.json").is_file():
            return json.loads((folder / "cache.json").read_text())
    return None


def read_run(run_dir: str | os.PathLike) -> dict:
    """A training run's config, statistics, pipeline folder, checkpoints and what identifies its experiment.

    Args:
        run_dir: an --output_dir of train_ldm.py (config.yaml, train_stats.json, pipeline/, checkpoints/).
    """
    from .checkpoints import STATE_FILE, list_checkpoints
    from .training import load_config

    run = Path(run_dir)
    for needed in ("config.yaml", "train_stats.json", "pipeline/model_index.json"):
        if not (run / needed).is_file():
            raise ValueError(f"run folder {str(run_dir)!r} has no {needed}; "
                             "pass an --output_dir of a finished train_ldm.py run")
    cfg = load_config(run / "config.yaml")
    stats = json.loads((run / "train_stats.json").read_text())
    checkpoints = []
    for step, path in list_checkpoints(run / "checkpoints"):
        state = json.loads((path / STATE_FILE).read_text())
        checkpoints.append({"step": step, "path": str(path), "train_seconds": state.get("train_seconds")})
    return {
        "dir": str(run),
        "config": cfg,
        "train_stats": stats,
        "pipeline": str(run / "pipeline"),
        "checkpoints": checkpoints,
        "identity": experiment_identity(run, cfg, stats),
    }


def experiment_identity(run: Path, cfg, stats: dict) -> dict:
    """Everything that defines a run's experiment except the model, as comparable values.

    The data is named by the dataset fingerprint of the latents it trained on (from train_stats.json, else the
    run's latent cache; the configured path as written only when neither exists), the VAE by a hash of the
    pipeline's VAE weights and its scaling factor, the batch by its global size, the length by the steps
    trained.
    """
    from .training import config_to_dict

    identity = {k: v for k, v in config_to_dict(cfg).items() if k not in EXPERIMENT_EXCLUDED}
    index = _latent_cache_index(run, cfg)
    data = stats.get("data_fingerprint") or (index or {}).get("dataset_fingerprint")
    identity["data"] = data if data else f"data_source {cfg.data_source!r} (no fingerprint recorded)"
    vae_dir = run / "pipeline" / "vae"
    weights = sorted(vae_dir.glob("diffusion_pytorch_model*.safetensors")) or sorted(vae_dir.glob("*.bin"))
    vae_config = json.loads((vae_dir / "config.json").read_text()) if (vae_dir / "config.json").is_file() else {}
    identity["vae_weights"] = _file_digest(weights[0]) if weights else None
    identity["vae_scaling_factor"] = vae_config.get("scaling_factor")
    identity["vae_shift_factor"] = vae_config.get("shift_factor")
    processes = stats.get("num_processes", 1)
    identity["global_batch"] = cfg.train_batch_size * cfg.gradient_accumulation_steps * processes
    identity["train_steps"] = stats.get("steps")
    return identity


def model_config(cfg) -> dict:
    """What a run's config says about its model: type and size, and the DCNv4 options of a DCNv4 run."""
    keys = ("model_type", "model_size") + (DCNV4_MODEL_KEYS if cfg.model_type == "dcnv4" else ())
    return {k: getattr(cfg, k) for k in keys}


def training_changes(run: dict) -> list[tuple[str, str]]:
    """The changes made at a resume of the run that alter what it trains, as (key, description).

    Read from `resume_changes` in train_stats.json (every key changed at a resume, with the step); keys in
    `BOOKKEEPING` do not count, nor `max_train_steps` under a schedule that is not drawn over it.
    """
    cfg = run["config"]
    found = []
    for entry in run["train_stats"].get("resume_changes") or []:
        for key, (old, new) in entry.get("changes", {}).items():
            if key in BOOKKEEPING and not (key == "max_train_steps" and cfg.lr_scheduler in LR_SCHEDULES_OVER_STEPS):
                continue
            found.append((key, f"{key} changed from {old!r} to {new!r} at step {entry.get('step')} in {run['dir']}"))
    return found


def check_distinct_runs(runs: list[dict]) -> None:
    """Refuse a run given twice, or two runs of the same model, seed and experiment (one run counted twice)."""
    seen: dict[str, str] = {}
    for run in runs:
        where = str(Path(run["dir"]).resolve())
        if where in seen:
            raise ValueError(f"run {run['dir']} is given twice; each run may be counted once")
        seen[where] = run["dir"]
    for i, run in enumerate(runs):
        for other in runs[i + 1:]:
            if (model_config(run["config"]) == model_config(other["config"])
                    and run["config"].seed == other["config"].seed and run["identity"] == other["identity"]):
                raise ValueError(f"runs {run['dir']} and {other['dir']} have the same model, seed "
                                 f"({run['config'].seed}) and config: one run counted twice; give runs of different "
                                 "seeds")


def check_comparable(arms: dict[str, list[dict]], allow: tuple[str, ...] = ()) -> list[str]:
    """Refuse runs that differ in anything but the model between arms and the seed within an arm, and runs whose
    training was changed at a resume.

    Args:
        arms: label -> runs (`read_run` dicts).
        allow: identity keys allowed to differ, or keys allowed to have changed at a resume ("all" allows every
            key); each allowed difference is returned.

    Returns:
        One line per allowed difference. Raises ValueError naming every difference that is not allowed, and
        every model difference within an arm.
    """
    for label, runs in arms.items():
        first = model_config(runs[0]["config"])
        for run in runs[1:]:
            other = model_config(run["config"])
            changed = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
            if changed:
                raise ValueError(f"arm {label!r} mixes models: {runs[0]['dir']} and {run['dir']} differ in "
                                 + ", ".join(f"{k} ({first.get(k)!r} vs {other.get(k)!r})" for k in changed))
    runs = [run for arm in arms.values() for run in arm]
    reference = runs[0]
    found, allowed = [], []
    for run in runs[1:]:
        for key in sorted(set(reference["identity"]) | set(run["identity"])):
            a, b = reference["identity"].get(key), run["identity"].get(key)
            if a != b:
                line = f"{key} ({a!r} in {reference['dir']}, {b!r} in {run['dir']})"
                (allowed if "all" in allow or key in allow else found).append(line)
    midway = []
    for run in runs:
        for key, line in training_changes(run):
            (allowed if "all" in allow or key in allow else midway).append(line)
    if found:
        raise ValueError("runs differ in what defines the experiment: " + "; ".join(found)
                         + ". Pass --allow_mismatch KEY (or all) to compare them anyway")
    if midway:
        raise ValueError("runs changed their training when resumed: " + "; ".join(midway)
                         + ". Pass --allow_mismatch KEY (or all) to compare them anyway")
    return allowed


def training_data(run: dict, skip_corrupt: bool = False):
    """The images a run trained on, to measure its FID against: its data_source (a relative folder resolved where
    the run was trained, as train_stats.json records it), refused unless it has the fingerprint the run recorded.

    Args:
        run: a `read_run` dict.
        skip_corrupt: leave unreadable images out (as the run did when it trained with skip_corrupt).
    """
    from .data import build_image_dataset

    cfg, stats = run["config"], run["train_stats"]
    source = stats.get("data_source_path") or cfg.data_source
    dataset = build_image_dataset(source, resolution=cfg.resolution, class_labels=cfg.class_conditional,
                                  skip_corrupt=skip_corrupt)
    recorded = stats.get("data_fingerprint")
    if recorded and dataset.fingerprint() != recorded:
        where = repr(source) if source == "builtin" or os.path.isabs(source) else \
            f"{source!r} (resolved to {os.path.abspath(source)})"
        raise ValueError(f"data_source {where} is not the data {run['dir']} trained on: its fingerprint differs from the one the run recorded (files added, removed or "
                         "changed, or another folder); pass --reference FOLDER to measure against other images")
    return dataset


def _arm_label(runs: list[dict]) -> str:
    cfg = runs[0]["config"]
    label = "DCNv4" if cfg.model_type == "dcnv4" else "conv"
    if cfg.model_type == "dcnv4" and cfg.dcnv4_options:
        label += " (" + ", ".join(f"{k}={v}" for k, v in sorted(cfg.dcnv4_options.items())) + ")"
    return label


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def compare_arms(
    arms: list[list[str]],
    output_dir: str,
    samples_dir: str | None = None,
    reference=None,
    num_images: int | None = None,
    sampler: str = "ddim",
    num_inference_steps: int = 50,
    batch_size: int = 64,
    seed: int = 0,
    mixed_precision: str = "no",
    cache_dir: str | None = None,
    fid_curve: bool = True,
    curve_steps: list[int] | None = None,
    grid_images: int = 36,
    jackknife_groups: int = 50,
    allow_mismatch: tuple[str, ...] = (),
    overwrite: bool = False,
    skip_corrupt: bool = False,
    guidance_scale: float = 1.0,
    class_mix: str = "data",
    isc: bool = False,
    prc: bool = False,
) -> dict:
    """Sample and measure every run of two arms, then write comparison.{json,md,png} to `output_dir`.

    Args:
        arms: two lists of train_ldm.py output folders (arm a, arm b; e.g. DCNv4 seeds, conv seeds).
        output_dir: where the report goes.
        samples_dir: where each run's samples go, in a folder named by the run and reused when its manifest
            matches (default `<output_dir>/samples`; comparisons sharing a baseline can share it).
        reference: image folder, or `.npz` of Inception statistics (`metrics.load_reference_statistics`: ADM's
            reference batches or a `--save_stats` file), to measure against (default: the training data of the runs).
        num_images: samples per run (default: the reference's size, so that FID's bias is the same for all; for a
            `.npz`, its number of activations or images; required for a `.npz` of statistics only).
        sampler, num_inference_steps, batch_size, seed, mixed_precision: sampling; every run uses the same seeds.
        cache_dir: reference features and converted Inception weights.
        fid_curve: also measure the intermediate checkpoints (FID against steps and training seconds).
        curve_steps: the checkpoint steps the curve measures (None: every checkpoint); each must be a checkpoint of
            every run.
        grid_images: images per grid in the figure.
        jackknife_groups: groups of the jackknife that measures the image noise of an arm of one run.
        allow_mismatch: experiment keys allowed to differ between runs (see `check_comparable`).
        overwrite: regenerate sample folders that another model or setting wrote, instead of stopping.
        skip_corrupt: leave unreadable reference images out instead of stopping.
        guidance_scale: classifier-free guidance scale for class-conditional runs (1.0: none).
        class_mix: class mix of the samples of class-conditional runs, "data" or "uniform".
        isc: also measure each run's Inception Score (needs Inception weights with the classifier).
        prc: also measure each run's precision and recall (needs reference images or activations).

    Returns:
        What comparison.json holds.
    """
    from .metrics import FrechetResampler

    if len(arms) != 2 or not all(arms):
        raise ValueError(f"arms must be two non-empty lists of run folders, got {arms!r}")
    if num_images is not None and (not isinstance(num_images, int) or num_images < MIN_IMAGES):
        raise ValueError(f"num_images must be an int >= {MIN_IMAGES} (FID needs a covariance, its interval a "
                         f"jackknife), got {num_images!r}")
    # 1. The runs: read, distinct, comparable, and holding the curve's checkpoints.
    runs_by_arm, allowed = read_arms(arms, fid_curve, curve_steps, allow_mismatch)
    cfg = next(iter(runs_by_arm.values()))[0]["config"]
    # The runs' own choice counts too: a run trained without its unreadable images is measured without them.
    skip_corrupt = skip_corrupt or getattr(cfg, "skip_corrupt", False)
    # 2. What FID is measured against, and with how many samples.
    reference, num_images, file_resolution = resolve_reference(next(iter(runs_by_arm.values()))[0], reference,
                                                                num_images, isc, prc, cache_dir, skip_corrupt)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(output_dir, exist_ok=True)
    measurer = _Measurer(reference=reference, resolution=file_resolution or cfg.resolution, cache_dir=cache_dir,
                         device=device, skip_corrupt=skip_corrupt, isc=isc, prc=prc,
                         settings=dict(sampler=sampler, num_inference_steps=num_inference_steps, batch_size=batch_size,
                                       seed=seed, mixed_precision=mixed_precision, num_images=num_images,
                                       overwrite=overwrite, guidance_scale=guidance_scale, class_mix=class_mix))
    # 3. Every run sampled and measured (and its curve's checkpoints), each arm summarised.
    arms_out = []
    for label, runs in runs_by_arm.items():
        results = [measure_run(measurer, label, i, len(runs), run, samples_dir or os.path.join(output_dir, "samples"),
                               fid_curve, curve_steps) for i, run in enumerate(runs)]
        arms_out.append(summarize_arm(label, runs[0]["config"], results, num_images, grid_images, isc, prc))
    a, b = arms_out
    for arm in arms_out:
        arm["parameter_ratio"] = arm["parameters"] / b["parameters"]
        arm["gflops_ratio"] = arm["gflops"] / b["gflops"]
    # 4. The interval: from the per-run FIDs of arms with several runs, from a jackknife of the sample set of an arm
    # with one run (image noise only).
    last = measurer.last
    resampler = FrechetResampler(last["reference_features"], device=device) \
        if last["reference_features"] is not None else \
        FrechetResampler.from_statistics(last["reference_statistics"]["mu"], last["reference_statistics"]["sigma"],
                                         device=device)
    image_variances = [jackknife_fid_variance(resampler.prepare(arm["runs"][0].pop("sample_features")), resampler,
                                              jackknife_groups, seed) if arm["num_runs"] == 1 else None
                       for arm in arms_out]
    for arm in arms_out:
        for run in arm["runs"]:
            run.pop("sample_features", None)
    difference, conclusion = _arms_difference(arms_out, image_variances)
    # 5. The report.
    summary = {
        "arms": arms_out,
        "experiment": shared_experiment([run for runs in runs_by_arm.values() for run in runs]),
        "fid_difference": {"a": a["label"], "b": b["label"], **difference, "verdict": conclusion,
                           "jackknife_groups": jackknife_groups if any(image_variances) else None},
        "verdict": conclusion,
        "budget": _budget_line(a, b),
        "allowed_differences": allowed,
        "sampler": sampler,
        "num_inference_steps": num_inference_steps,
        "num_images": num_images,
        "seed": seed,
        "mixed_precision": mixed_precision,
        "guidance_scale": guidance_scale,
        "class_mix": last["class_mix"],
        "reference": reference if isinstance(reference, str) else f"{cfg.data_source} at {cfg.resolution}px",
        "num_reference": last["num_reference"],
        "resolution": last["resolution"],
        "kid_unavailable": last["kid_unavailable"],
        "isc": isc,
        "prc": prc,
        "inception_weights": last["inception_weights"],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        # FID against step when the runs measured intermediate checkpoints: plateaus, differences, crossings.
        "curves": curve_analysis(arms_out[0], arms_out[1]) if fid_curve else None,
    }
    write_report(summary, output_dir)
    return summary


def read_arms(arms: list[list[str]], fid_curve: bool, curve_steps: list[int] | None,
              allow_mismatch: tuple[str, ...]) -> tuple[dict[str, list[dict]], list[str]]:
    """The runs of each arm by the arm's label (`read_run`), refused when a run is given twice, when the runs
    differ in what they train (`check_comparable`, `allow_mismatch` aside) or lack a checkpoint the curve asks
    for. Returns (runs by label, the differences allowed)."""
    runs_by_arm: dict[str, list[dict]] = {}
    for index, dirs in enumerate(arms):
        runs = [read_run(d) for d in dirs]
        label = _arm_label(runs)
        if label in runs_by_arm:
            label = f"{label} [{'ab'[index]}]"
        runs_by_arm[label] = runs
    check_distinct_runs([run for runs in runs_by_arm.values() for run in runs])
    if fid_curve and curve_steps is not None:
        for run in (run for runs in runs_by_arm.values() for run in runs):
            kept = {c["step"] for c in run["checkpoints"]} | {run["train_stats"]["steps"]}
            missing = sorted(set(curve_steps) - kept)
            if missing:
                raise ValueError(f"curve_steps {missing} are not checkpoints of {run['dir']} (it keeps {sorted(kept)})")
    return runs_by_arm, check_comparable(runs_by_arm, allow_mismatch)


def resolve_reference(first_run: dict, reference, num_images: int | None, isc: bool, prc: bool,
                      cache_dir: str | None, skip_corrupt: bool) -> tuple:
    """What FID is measured against (default: the runs' training data), the samples per run (default: as many
    as the reference holds, since FID is biased by the sample count), and the resolution an `.npz` fixes (None
    otherwise). Refuses what cannot be measured before any sampling: an Inception Score with weights that have no
    classifier, precision/recall or a default sample count against statistics only."""
    from .metrics import (check_isc_available, is_statistics_file, list_images, load_reference_statistics,
                          resolve_inception_weights)

    if reference is None:
        reference = training_data(first_run, skip_corrupt)
    if isc:
        check_isc_available(resolve_inception_weights(cache_dir))
    file_resolution, size = None, None
    if is_statistics_file(reference):
        stats = load_reference_statistics(reference)
        file_resolution = stats["resolution"]
        size = len(stats["features"]) if stats["features"] is not None else \
            stats["images"][0] if stats["images"] is not None else None
        if prc and size is None:
            raise ValueError(f"precision/recall needs the reference's activations, and {reference} holds statistics "
                             "only (mu, sigma); give a reference folder or an .npz with activations or images")
        if num_images is None and size is None:
            raise ValueError(f"{reference} holds Inception statistics only, no activations to count: give "
                             "--num_images (the number of images its statistics were computed from, as FID is "
                             "biased by the sample count)")
    if num_images is None:
        # As many samples as reference images: FID is biased by the sample count, so fix it, and fix it high.
        num_images = size if is_statistics_file(reference) else \
            len(list_images(reference)) if isinstance(reference, str) else len(reference)
        if num_images < MIN_IMAGES:
            raise ValueError(f"the reference holds {num_images} images; FID and its interval need at least "
                             f"{MIN_IMAGES}")
    return reference, num_images, file_resolution


@dataclasses.dataclass
class _Measurer:
    """Samples a pipeline into a folder (reused when its manifest matches) and measures FID/KID (and IS,
    precision/recall for a run's final weights) against the reference; keeps the last measurement, whose
    reference features and setting the report uses."""

    reference: typing.Any
    resolution: int
    cache_dir: str | None
    device: str
    skip_corrupt: bool
    isc: bool
    prc: bool
    settings: dict
    last: dict | None = None

    def __call__(self, pipe, source: str, folder: str, use_ema: bool | None, extras: bool = False) -> dict:
        from .metrics import compute_fid_kid

        sampled = _sample(pipe, source, folder, use_ema=use_ema, device=self.device, **self.settings)
        # A statistics file that records its resolution fixes it; the samples are resized to it.
        metrics = compute_fid_kid(sampled["paths"], self.reference, resolution=self.resolution,
                                  cache_dir=self.cache_dir, device=self.device, return_features=True,
                                  skip_corrupt=self.skip_corrupt, verbose=False, sample_cache_dir=folder,
                                  isc=self.isc and extras, prc=self.prc and extras)
        measured = {**metrics, "sampling_images_per_s": sampled["images_per_s"], "class_mix": sampled["class_mix"]}
        if extras:
            self.last = measured
        return measured


def measure_run(measure: _Measurer, label: str, i: int, count: int, run: dict, samples_dir: str,
                fid_curve: bool, curve_steps: list[int] | None) -> dict:
    """One run sampled and measured with its pipeline's weights, and at the checkpoints of its FID curve; its
    row of comparison.json, with its sample features under "sample_features" (popped by the caller)."""
    from pipelines import LatentDiffusionPipeline

    from .sampling import pipeline_from_checkpoint
    from .unet import model_report

    # Named by the run, not by its place in this comparison: comparisons that share a samples folder
    # (and a baseline) reuse each other's samples; the manifest says whether they may.
    name = Path(run["dir"]).resolve()
    digest = hashlib.sha256(str(name).encode()).hexdigest()[:8]
    folder = os.path.join(samples_dir, f"{name.name}-{digest}")
    print(f"[{label}] run {i + 1}/{count}: sampling {measure.settings['num_images']} images from {run['pipeline']}",
          flush=True)
    pipe = LatentDiffusionPipeline.from_pretrained(run["pipeline"])
    report = model_report(pipe.unet)
    measured = measure(pipe, run["pipeline"], folder, use_ema=None, extras=True)
    stats = run["train_stats"]
    curve = []
    if fid_curve:
        # The weights the run's pipeline holds: the EMA's when it kept one, else the raw ones.
        use_ema = run["config"].use_ema
        for checkpoint in run["checkpoints"]:
            if checkpoint["step"] == stats["steps"] or curve_steps is not None and checkpoint["step"] not in curve_steps:
                continue
            print(f"[{label}] run {i + 1}: FID at step {checkpoint['step']}", flush=True)
            point = measure(pipeline_from_checkpoint(checkpoint["path"], use_ema=use_ema), checkpoint["path"],
                            os.path.join(folder, f"step-{checkpoint['step']}"), use_ema=use_ema)
            curve.append({"step": checkpoint["step"], "train_seconds": checkpoint["train_seconds"],
                          "fid": point["fid"], "kid_mean": point["kid_mean"]})
    curve.append({"step": stats["steps"], "train_seconds": stats.get("train_seconds"),
                  "fid": measured["fid"], "kid_mean": measured["kid_mean"]})
    return {
        "run_dir": run["dir"],
        "seed": run["config"].seed,
        "fid": measured["fid"],
        "kid_mean": measured["kid_mean"],
        "kid_std": measured["kid_std"],
        "parameters": report["parameters"],
        "gflops": report["gflops"],
        "block_out_channels": list(pipe.unet.config.block_out_channels),
        "train_images_per_s": stats.get("images_per_s"),
        "sampling_images_per_s": measured["sampling_images_per_s"],
        "train_steps": stats["steps"],
        "train_wall_time_s": stats.get("wall_time_s"),
        # Summed over every process that trained the run; wall_time_s and images_per_s are its last process's.
        "train_seconds": stats.get("train_seconds"),
        "fid_curve": curve,
        "samples": folder,
        **{k: measured[k] for k in _EXTRA_METRICS[measure.isc, measure.prc]},
        "sample_features": measured["sample_features"],
    }


def summarize_arm(label: str, cfg_arm, results: list[dict], num_images: int, grid_images: int, isc: bool,
                  prc: bool) -> dict:
    """An arm's row of comparison.json: its setting, the mean and spread of its runs' metrics, its runs and the
    grid of its first run's samples."""
    from .sampling import write_grid

    return {
        "label": label,
        "model_type": cfg_arm.model_type,
        "model_size": cfg_arm.model_size,
        "dcnv4_options": dict(cfg_arm.dcnv4_options) if cfg_arm.model_type == "dcnv4" else {},
        "match": cfg_arm.dcnv4_options.get("match") if cfg_arm.model_type == "dcnv4" else None,
        **arm_statistics(results, isc, prc),
        "grid": write_grid(results[0]["samples"], num_images, grid_images),
    }


def arm_statistics(results: list[dict], isc: bool, prc: bool) -> dict:
    """The part of an arm's row that its runs' rows give: their count, the mean and spread of their metrics, the
    model's size and the runs themselves."""
    fid_mean, fid_std = _mean_std([r["fid"] for r in results])
    kid_mean, kid_std = _mean_std([r["kid_mean"] for r in results])
    return {
        "num_runs": len(results),
        "fid_mean": fid_mean,
        "fid_std": fid_std,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "parameters": results[0]["parameters"],
        "gflops": results[0]["gflops"],
        "block_out_channels": results[0]["block_out_channels"],
        "train_images_per_s": _mean_std([r["train_images_per_s"] for r in results])[0],
        "sampling_images_per_s": _mean_std([r["sampling_images_per_s"] for r in results])[0],
        "train_steps": results[0]["train_steps"],
        "train_wall_time_s": _mean_std([r["train_wall_time_s"] for r in results])[0],
        "train_seconds": _mean_std([r.get("train_seconds") for r in results])[0],
        **{_ARM_KEY[k]: _mean_std([r[k] for r in results])[0] for k in _EXTRA_METRICS[isc, prc] if k in _ARM_KEY},
        "runs": results,
    }


def _arms_difference(arms: list[dict], image_variances) -> tuple[dict, str]:
    """The interval of the FID difference of two arms (`difference_interval`) and its verdict; each arm gets what
    its spread covers."""
    a, b = arms
    difference = difference_interval([r["fid"] for r in a["runs"]], [r["fid"] for r in b["runs"]], *image_variances)
    for arm, spread in zip(arms, difference.pop("arms")):
        arm["interval_covers"] = spread["covers"]
        arm["interval_covers_text"] = spread["covers_text"]
    return difference, verdict([a["label"], b["label"]], difference["ci95"])


def shared_experiment(runs: list[dict]) -> dict:
    """What defines the experiment of all `runs` (`read_run` dicts): the identity keys on which they agree, and
    under "differing" the keys on which they differ (those a comparison was allowed to mix)."""
    identities = [json.loads(json.dumps(run["identity"], default=str)) for run in runs]
    keys = sorted(set().union(*identities))
    same = {k: identities[0].get(k) for k in keys if all(i.get(k) == identities[0].get(k) for i in identities)}
    return {**same, "differing": [k for k in keys if k not in same]}


def _without_install_paths(value):
    """`value` with the folders of installed packages left out of its paths (".../site-packages/pkg/f" -> "pkg/f"):
    the same Inception weights installed on two machines, or in a result copied into docs/data."""
    return re.sub(r"/\S*/(?:site|dist)-packages/", "", value) if isinstance(value, str) else value


def pool_comparisons(summaries: list[dict], sources: list[str] | None = None, output_dir: str | None = None) -> dict:
    """One comparison from several that measured other runs (other seeds) of the same two arms the same way, say
    on other machines: every run of an arm together, the interval of the FID difference from all of them
    (Welch's t; each pooled arm needs two runs or more), the curves too. Refused unless the comparisons agree on
    the experiment, on how they sampled and measured (`POOLED_PROTOCOL`) and on each arm's model (`POOLED_ARM`),
    and unless every run is counted once (a seed of an arm in one comparison only).

    Args:
        summaries: what `compare_arms` returned, or its comparison.json files read.
        sources: a name for each (e.g. its file), for the messages and the report.
        output_dir: where comparison.{json,md,png} of the pooled comparison go (None: not written).

    Returns:
        What the pooled comparison.json holds: a `compare_arms` summary, with "pooled_from" listing each source
        and the seeds it gave each arm.
    """
    sources = list(sources) if sources is not None else [f"comparison {i + 1}" for i in range(len(summaries))]
    if len(summaries) < 2 or len(sources) != len(summaries):
        raise ValueError(f"pool needs two comparisons or more (and one source name each), got {len(summaries)}")
    summaries = [json.loads(json.dumps(s, default=str)) for s in summaries]  # as comparison.json reads them
    first = summaries[0]
    for source, summary in zip(sources, summaries):
        if "experiment" not in summary:
            raise ValueError(f"{source} does not record its runs' experiment (a comparison.json written before "
                             "pooling existed): compare its runs again to pool it")
        differing = [k for k in POOLED_PROTOCOL
                     if _without_install_paths(summary.get(k)) != _without_install_paths(first.get(k))]
        if differing:
            raise ValueError(f"{source} was not measured as {sources[0]} was: they differ in "
                             + "; ".join(f"{k} ({first.get(k)!r} vs {summary.get(k)!r})" for k in differing))
        if (summary["curves"] is None) != (first["curves"] is None):
            raise ValueError(f"{source} and {sources[0]} do not both measure FID curves; pool curves with curves")
        for arm, base in zip(summary["arms"], first["arms"]):
            changed = [k for k in POOLED_ARM if arm.get(k) != base.get(k)]
            if changed:
                raise ValueError(f"arm {base['label']!r} of {sources[0]} and arm {arm['label']!r} of {source} are not "
                                 "the same model: they differ in "
                                 + "; ".join(f"{k} ({base.get(k)!r} vs {arm.get(k)!r})" for k in changed))
    arms_out = []
    for index, base in enumerate(first["arms"]):
        seen: dict[int, str] = {}
        runs = []
        for source, summary in zip(sources, summaries):
            for run in summary["arms"][index]["runs"]:
                if run["seed"] in seen:
                    raise ValueError(f"seed {run['seed']} of arm {base['label']!r} is in {seen[run['seed']]} and in "
                                     f"{source}: a run counted twice")
                seen[run["seed"]] = source
                runs.append(run)
        if len(runs) < 2:
            raise ValueError(f"arm {base['label']!r} has {len(runs)} run in all; a pooled interval needs two or more "
                             "an arm (Welch's t on the per-run FIDs)")
        grid = next((s["arms"][index]["grid"] for s in summaries if os.path.isfile(s["arms"][index]["grid"] or "")),
                    None)
        arms_out.append({**{k: base[k] for k in ("label", "model_type", "model_size", "dcnv4_options", "match")},
                         **arm_statistics(runs, first.get("isc", False), first.get("prc", False)), "grid": grid})
    a, b = arms_out
    for arm in arms_out:
        arm["parameter_ratio"] = arm["parameters"] / b["parameters"]
        arm["gflops_ratio"] = arm["gflops"] / b["gflops"]
    difference, conclusion = _arms_difference(arms_out, (None, None))
    pooled = {
        **{k: first.get(k) for k in POOLED_PROTOCOL},
        "arms": arms_out,
        "fid_difference": {"a": a["label"], "b": b["label"], **difference, "verdict": conclusion,
                           "jackknife_groups": None},
        "verdict": conclusion,
        "budget": _budget_line(a, b),
        "allowed_differences": sorted({line for s in summaries for line in s["allowed_differences"]}),
        "device": ", ".join(dict.fromkeys(s["device"] for s in summaries)),
        "curves": curve_analysis(a, b) if first["curves"] is not None else None,
        "pooled_from": [{"source": source, "seeds": [[r["seed"] for r in arm["runs"]] for arm in summary["arms"]]}
                        for source, summary in zip(sources, summaries)],
    }
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        write_report(pooled, output_dir)
    return pooled


def write_report(summary: dict, output_dir: str) -> None:
    """comparison.json, comparison.md (printed too) and comparison.png in `output_dir`."""
    with open(os.path.join(output_dir, "comparison.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = markdown_table(summary)
    Path(output_dir, "comparison.md").write_text(table)
    write_figure(summary, os.path.join(output_dir, "comparison.png"))
    print(table)


# What --isc and --prc add to each run, by (isc, prc).
_EXTRA_METRICS = {(False, False): (), (True, False): ("isc_mean", "isc_std"),
                  (False, True): ("precision", "recall"), (True, True): ("isc_mean", "isc_std", "precision", "recall")}
# Their mean over an arm's runs, under these keys.
_ARM_KEY = {"isc_mean": "isc_mean", "precision": "precision_mean", "recall": "recall_mean"}


def _sample(pipe, source: str, folder: str, use_ema: bool | None, device: str, sampler: str,
            num_inference_steps: int, batch_size: int, seed: int, mixed_precision: str, num_images: int,
            overwrite: bool, guidance_scale: float, class_mix: str) -> dict:
    """Sample `num_images` images of `pipe` into `folder` (reused when its manifest matches); returns
    {"paths": exactly those images, "images_per_s": throughput of this call's sampling or of the one that wrote
    them, "class_mix": the class mix the samples follow (None: unconditional)}."""
    from pipelines import make_scheduler

    from .sampling import generate_samples, prepare_sample_folder, sample_manifest, sample_paths, to_precision

    pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    manifest = sample_manifest(pipe, source, sampler, num_inference_steps, seed, mixed_precision, use_ema=use_ema,
                               guidance_scale=guidance_scale, class_mix=class_mix)
    prepare_sample_folder(folder, manifest, overwrite=overwrite)
    to_precision(pipe, device, mixed_precision)
    labels = 0 if pipe.unet.config.num_class_embeds else None
    # One untimed call absorbs one-time costs (kernel builds, allocator warm-up) before the timed sampling.
    pipe(batch_size=1, num_inference_steps=1, class_labels=labels, output_type="latent")
    stats = generate_samples(pipe, folder, num_images, seed=seed, batch_size=batch_size,
                             num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             class_mix=class_mix)
    stats_path = Path(folder) / "sample_stats.json"
    if stats["written"]:
        images_per_s = stats["written"] / stats["seconds"]
        stats_path.write_text(json.dumps({"images_per_s": images_per_s, "images": stats["written"]}))
    elif stats_path.is_file():
        images_per_s = json.loads(stats_path.read_text())["images_per_s"]
    else:
        images_per_s = None
    return {"paths": sample_paths(folder, num_images), "images_per_s": images_per_s,
            "class_mix": manifest["class_mix"]}


def _budget_line(a: dict, b: dict) -> str:
    for arm, other in ((a, b), (b, a)):
        if arm["match"]:
            return (f"{arm['label']} widened to {other['label']}'s {arm['match']} (widths "
                    f"{tuple(arm['block_out_channels'])}): parameters {arm['parameters'] / other['parameters']:.2f}x, "
                    f"GFLOPs {arm['gflops'] / other['gflops']:.2f}x")
    return (f"equal widths, no budget matched: {a['label']} has {a['parameter_ratio']:.2f}x the parameters and "
            f"{a['gflops_ratio']:.2f}x the GFLOPs of {b['label']}")


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def interval_text(difference: dict) -> str:
    """"95% interval [low, high] (method, df, p)" of a `difference_interval` result."""
    low, high = difference["ci95"]
    return (f"{difference['level']:.0%} interval [{low:+.2f}, {high:+.2f}] ({difference['method']}; "
            f"df {difference['df']:.1f}, p = {difference['p_value']:.2g})")


def markdown_table(summary: dict) -> str:
    """The comparison as a markdown table, the FID difference with its interval, the verdict and the setting."""
    precision = "fp32" if summary["mixed_precision"] == "no" else summary["mixed_precision"]
    isc, prc = summary.get("isc", False), summary.get("prc", False)
    extra_head = " IS |" * isc + " precision | recall |" * prc
    lines = [
        "| arm | runs | FID | KID (x1000) |" + extra_head + " parameters (M) | params ratio | GFLOPs | GFLOPs ratio "
        "| train img/s | sample img/s | train steps | train s |",
        "| --- |" + " ---: |" * (11 + isc + 2 * prc),
    ]
    for arm in summary["arms"]:
        kid = "n/a" if arm["kid_mean"] is None else \
            f"{_fmt(arm['kid_mean'] * 1000, '.2f')} +- {_fmt(arm['kid_std'] * 1000, '.2f')}"
        extra = (f" {_fmt(arm['isc_mean'], '.2f')} |" if isc else "") + \
            (f" {_fmt(arm['precision_mean'], '.3f')} | {_fmt(arm['recall_mean'], '.3f')} |" if prc else "")
        lines.append(
            f"| {arm['label']} | {arm['num_runs']} | {_fmt(arm['fid_mean'], '.2f')} +- {_fmt(arm['fid_std'], '.2f')} | "
            f"{kid} |{extra} "
            f"{arm['parameters'] / 1e6:.3f} | {arm['parameter_ratio']:.2f} | {arm['gflops']:.3f} | "
            f"{arm['gflops_ratio']:.2f} | {_fmt(arm['train_images_per_s'], '.1f')} | "
            f"{_fmt(arm['sampling_images_per_s'], '.2f')} | {arm['train_steps']} | "
            f"{_fmt(arm.get('train_seconds') or arm['train_wall_time_s'], '.0f')} |")
    diff = summary["fid_difference"]
    lines += [
        "",
        f"FID difference ({diff['a']} - {diff['b']}): {diff['value']:+.2f}, {interval_text(diff)}.",
        "The interval covers " + "; ".join(f"for {arm['label']}, {arm['interval_covers_text']}"
                                           for arm in summary["arms"]) + ".",
        f"Verdict: {summary['verdict']}.",
        f"Budget: {summary['budget']}.",
        "",
        "Train img/s: the timed steps of each run's last training process (a resumed run's last segment); train s: "
        + ("the training seconds summed over all its processes." if all(arm.get("train_seconds") is not None
                                                                         for arm in summary["arms"])
           else "the wall time of each run's last training process (these runs did not record the sum)."),
        f"Mean +- standard deviation over runs (KID of one run: mean over subsets). {summary['num_images']} samples "
        f"per run ({summary['sampler']}, {summary['num_inference_steps']} steps, seed {summary['seed']}, {precision}"
        + (f", guidance scale {summary['guidance_scale']:g}, class mix {summary['class_mix']}"
           if summary["class_mix"] else "") + ") "
        + (f"against {summary['num_reference']} reference images ({summary['reference']})"
           if summary["num_reference"] is not None else f"against the Inception statistics of {summary['reference']}")
        + f" at {summary['resolution']}px on {summary['device']}; {summary['inception_weights']}"
        + ("; IS: mean over runs of torch-fidelity's Inception Score" if isc else "")
        + ("; precision/recall: mean over runs, torch-fidelity's on Inception pool features, k = 3" if prc else "")
        + (f"; {summary['kid_unavailable']}" if summary.get("kid_unavailable") else "") + ".",
    ]
    if summary["allowed_differences"]:
        lines.append("Allowed differences between runs: " + "; ".join(summary["allowed_differences"]) + ".")
    if summary.get("pooled_from"):
        lines.append("Pooled from " + "; ".join(
            f"{p['source']} (seeds " + ", ".join(f"{arm['label']} {seeds}" for arm, seeds in zip(summary["arms"],
                                                                                             p["seeds"])) + ")"
            for p in summary["pooled_from"]) + ": every run measured as above.")
    if summary.get("curves"):
        lines += ["", "FID against training step (mean +- standard deviation over runs; the interval: Welch's t on "
                  "the per-run FIDs at that step, n/a for an arm of one run):", ""]
        lines += curve_lines(summary["curves"])
    return "\n".join(lines) + "\n"


def log_axis(values: list[float]) -> bool:
    """Whether a curve's x values (all positive) span a factor of 8 or more: then they are drawn on a log axis."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 8


def write_figure(summary: dict, path: str) -> None:
    """One sample grid per arm, then FID against training step and against training seconds (mean line, band
    from min to max over runs; a log axis where they span a factor of 8) where runs have intermediate
    checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    arms = summary["arms"]
    with_curve = any(len(run["fid_curve"]) > 1 for arm in arms for run in arm["runs"])
    panels = len(arms) + 2 * int(with_curve)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 5.2), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        if arm["grid"] is None:  # a pooled arm whose samples are on none of this machine's folders
            ax.text(0.5, 0.5, "samples not on this machine", ha="center", va="center", fontsize=9)
        else:
            ax.imshow(Image.open(arm["grid"]))
        ax.set_title(f"{arm['label']}\nFID {arm['fid_mean']:.2f} +- {arm['fid_std']:.2f} ({arm['num_runs']} runs)",
                     fontsize=9)
        ax.axis("off")
    if with_curve:
        for ax, key, name in ((axes[0][-2], "step", "training step"), (axes[0][-1], "train_seconds",
                                                                           "training seconds")):
            for arm in arms:
                steps = sorted(set.intersection(*[{p["step"] for p in run["fid_curve"]} for run in arm["runs"]]))
                xs, mean, low, high = [], [], [], []
                for step in steps:
                    points = [p for run in arm["runs"] for p in run["fid_curve"] if p["step"] == step]
                    x = [p[key] for p in points]
                    if any(v is None for v in x):
                        continue
                    fids = [p["fid"] for p in points]
                    xs.append(np.mean(x))
                    mean.append(np.mean(fids))
                    low.append(min(fids))
                    high.append(max(fids))
                if not xs:
                    continue
                line = ax.plot(xs, mean, marker="o", label=arm["label"])[0]
                if arm["num_runs"] > 1:
                    ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
            ax.set_xlabel(name)
            if log_axis([x for line in ax.get_lines() for x in line.get_xdata()]):
                ax.set_xscale("log")  # checkpoints at log-spaced steps: the early crossing stays visible
            ax.set_ylabel("FID")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
