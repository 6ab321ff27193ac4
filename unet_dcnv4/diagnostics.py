"""What the DCNv4 layers of a U-Net do with their freedom: per layer, how far the sampling points move from the
regular grid and how the masks weigh them, measured on noisy training latents at chosen timesteps; for a run, at
every kept checkpoint, so that the statistics follow training.

    python -m unet_dcnv4.diagnostics RUN                      # every checkpoint of a train_ldm.py run
    python -m unet_dcnv4.diagnostics RUN --timesteps 50 500 950 --num_latents 64 --output stats.json

Per layer and timestep: the mean and 95th percentile of the points' displacement |(dx, dy)| * offset_scale in
pixels of the layer's input; per group and pixel the sum of the K masks (1 at the default initialisation, a box
filter), its spread, the share of the largest |mask| in the sum of |masks| (1/K: even weights, 1: one tap), and
the share of negative masks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

__all__ = ["STATISTICS", "layer_statistics", "run_statistics", "summarise"]

STATISTICS = ("offset_mean", "offset_p95", "mask_sum_mean", "mask_sum_std", "mask_peak", "mask_negative")


def _dcnv4_layers(unet) -> list[tuple[str, torch.nn.Module]]:
    from .modules import DCNv4

    return [(name, module) for name, module in unet.named_modules() if isinstance(module, DCNv4)]


def _statistics(layer, offset_mask: torch.Tensor) -> dict:
    """The statistics of one layer's offset/mask projection output (N, H, W, P)."""
    G, K = layer.group, layer.K
    values = offset_mask[..., : 3 * G * K].float().reshape(*offset_mask.shape[:3], G, 3 * K)  # (N, H, W, G, 3K)
    offsets = values[..., : 2 * K].reshape(*values.shape[:4], K, 2)  # (N, H, W, G, K, 2): (dx, dy) pairs
    masks = values[..., 2 * K:]  # (N, H, W, G, K)
    displacement = offsets.norm(dim=-1).flatten() * layer.offset_scale
    sums = masks.sum(-1)  # (N, H, W, G)
    magnitude = masks.abs()
    peak = magnitude.amax(-1) / magnitude.sum(-1).clamp_min(1e-12)
    return {
        "offset_mean": float(displacement.mean()),
        "offset_p95": float(torch.quantile(displacement[:1 << 24], 0.95)),
        "mask_sum_mean": float(sums.mean()),
        "mask_sum_std": float(sums.std()) if sums.numel() > 1 else 0.0,
        "mask_peak": float(peak.mean()),
        "mask_negative": float((masks < 0).float().mean()),
    }


@torch.no_grad()
def layer_statistics(unet, latents: torch.Tensor, timesteps: list[int], noise_scheduler, seed: int = 0) -> list[dict]:
    """The statistics of every DCNv4 layer of `unet` on `latents` noised to each of `timesteps`.

    Args:
        unet: a U-Net with DCNv4 layers (a conv U-Net has none: the result is empty).
        latents: (N, c, h, w) clean latents, scaled as the U-Net trained on them.
        timesteps: diffusion timesteps to noise the latents to.
        noise_scheduler: the training noise schedule (`add_noise`).
        seed: seed of the noise, the same for every timestep and call.

    Returns:
        One dict per layer and timestep: "layer" (module name), "timestep", "resolution" ([H, W] of its output),
        and `STATISTICS`.
    """
    limit = noise_scheduler.config.num_train_timesteps
    if not timesteps or any(not 0 <= int(t) < limit for t in timesteps):
        raise ValueError(f"timesteps must be a non-empty list in [0, {limit}), got {list(timesteps)}")
    layers = _dcnv4_layers(unet)
    captured: dict[str, torch.Tensor] = {}
    # A hook on the projection makes the layer call its modules one by one, so that the hook sees their output.
    handles = [layer.offset_mask.register_forward_hook(
        lambda module, args, out, name=name: captured.__setitem__(name, out.detach())) for name, layer in layers]
    was_training = unet.training
    unet.eval()
    rows = []
    try:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        for t in timesteps:
            t_batch = torch.full((len(latents),), int(t), dtype=torch.long, device=latents.device)
            captured.clear()
            unet(noise_scheduler.add_noise(latents, noise, t_batch), t_batch)
            for name, layer in layers:
                out = captured[name]
                rows.append({"layer": name, "timestep": int(t), "resolution": list(out.shape[1:3]),
                             **_statistics(layer, out)})
    finally:
        for handle in handles:
            handle.remove()
        unet.train(was_training)
    return rows


def _run_latents(run: Path, cfg, num_latents: int) -> torch.Tensor:
    """The first `num_latents` posterior means of the run's latent cache, scaled as in training."""
    from .data import LatentDataset

    for folder in [run / "latent_cache"] + ([Path(cfg.latent_cache_dir)] if cfg.latent_cache_dir else []):
        if (folder / "cache.json").is_file():
            return LatentDataset(str(folder)).first_means(num_latents)
    raise ValueError(f"run {str(run)!r} has no latent cache (latent_cache/ or latent_cache_dir) to measure on")


def run_statistics(run_dir: str | os.PathLike, timesteps: list[int], num_latents: int = 64, seed: int = 0) -> list[dict]:
    """`layer_statistics` of a train_ldm.py run at each complete checkpoint (the weights its pipeline would
    hold: the EMA's when the run keeps one), with "step" and "train_seconds" added to each row."""
    from diffusers import DDPMScheduler

    from .checkpoints import STATE_FILE, list_checkpoints
    from .sampling import pipeline_from_checkpoint
    from .training import load_config

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ValueError(f"run_dir {str(run_dir)!r} has no config.yaml; pass an --output_dir of train_ldm.py")
    cfg = load_config(run / "config.yaml")
    if cfg.model_type != "dcnv4":
        raise ValueError(f"run_dir {str(run_dir)!r} trained a {cfg.model_type} U-Net, which has no DCNv4 layers")
    checkpoints = list_checkpoints(run / "checkpoints")
    if not checkpoints:
        raise ValueError(f"run_dir {str(run_dir)!r} has no complete checkpoint")
    latents = _run_latents(run, cfg, num_latents)
    rows = []
    for step, path in checkpoints:
        state = json.loads((path / STATE_FILE).read_text())
        pipe = pipeline_from_checkpoint(path, use_ema=cfg.use_ema)
        schedule = DDPMScheduler.from_config(state["train_scheduler_config"])
        for row in layer_statistics(pipe.unet, latents, timesteps, schedule, seed):
            rows.append({"step": step, "train_seconds": state.get("train_seconds"), **row})
    return rows


def summarise(rows: list[dict]) -> str:
    """A markdown table: per step and timestep, each statistic's mean over the layers (min-max in brackets for
    the displacement and the mask sum)."""
    lines = ["| step | timestep | layers | offset mean px (min-max) | offset p95 px | mask sum (min-max) | "
             "mask sum sd | mask peak | negative masks |",
             "| ---: | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: |"]
    keys = sorted({(r.get("step", 0), r["timestep"]) for r in rows})
    for step, t in keys:
        group = [r for r in rows if r.get("step", 0) == step and r["timestep"] == t]

        def mean(k):
            return sum(r[k] for r in group) / len(group)

        def span(k):
            return f"{min(r[k] for r in group):.3f}-{max(r[k] for r in group):.3f}"

        lines.append(f"| {step} | {t} | {len(group)} | {mean('offset_mean'):.3f} ({span('offset_mean')}) | "
                     f"{mean('offset_p95'):.3f} | {mean('mask_sum_mean'):.3f} ({span('mask_sum_mean')}) | "
                     f"{mean('mask_sum_std'):.3f} | {mean('mask_peak'):.3f} | {mean('mask_negative'):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a train_ldm.py output folder of a DCNv4 U-Net")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[50, 500, 950],
                        help="diffusion timesteps the latents are noised to")
    parser.add_argument("--num_latents", type=int, default=64, help="training latents measured on (the first N)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    parser.add_argument("--output", default=None, help="JSON file for every row (default: RUN/dcnv4_stats.json)")
    args = parser.parse_args(argv)
    try:
        if args.num_latents < 1 or any(t < 0 for t in args.timesteps):
            raise ValueError(f"--num_latents must be >= 1 and --timesteps >= 0, got {args.num_latents} and "
                             f"{args.timesteps}")
        rows = run_statistics(args.run, args.timesteps, args.num_latents, args.seed)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output = args.output or os.path.join(args.run, "dcnv4_stats.json")
    Path(output).write_text(json.dumps(rows, indent=1))
    print(summarise(rows), end="")
    print(f"{len(rows)} rows written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
