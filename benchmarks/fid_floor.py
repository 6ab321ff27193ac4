"""The lowest FID a run's samples could reach, measured as compare.py measures them (the same reference, sample
count and resolution): N images drawn from the data the run trained on, and those images passed through the run's
VAE (encoded to the posterior mean and decoded), for several random draws of N. The first is FID's floor at N
samples (its bias: a perfect model scores it, not 0); the second adds what the VAE loses. A FID curve that still
falls by several percent a doubling far above these floors has not levelled off for want of headroom.

    python benchmarks/fid_floor.py outputs/plateau_twemoji32/runs/baseline/seed0 --num_images 512 --draws 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _save(images: torch.Tensor, folder: Path, start: int) -> list[str]:
    """Images in [-1, 1], (B, 3, H, W), as PNGs numbered from `start`, quantized as the pipeline's samples are."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    paths = []
    for i, image in enumerate(pixels):
        path = folder / f"{start + i:06d}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


@torch.no_grad()
def floor(run_dir: str, num_images: int | None = None, draws: int = 3, reference=None, cache_dir: str | None = None,
          batch_size: int = 64, work_dir: str | None = None) -> dict:
    """FID and KID of `draws` random draws of `num_images` training images and of their VAE reconstructions.

    Args:
        run_dir: a train_ldm.py output folder (its config, train_stats.json and pipeline/).
        num_images: images a draw (default: as compare.py chooses, as many as the reference holds).
        draws: random draws of the images (draw d uses seed d).
        reference: what FID is measured against (default: the run's training data, as compare.py's).
        cache_dir: where reference features and Inception weights are cached.
        batch_size: images a VAE call.
        work_dir: where the drawn images are written (default: a temporary folder, removed after).
    """
    from pipelines import LatentDiffusionPipeline
    from unet_dcnv4.comparison import read_run, resolve_reference, training_data
    from unet_dcnv4.metrics import compute_fid_kid

    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    run = read_run(run_dir)
    data = training_data(run)
    reference, num_images, file_resolution = resolve_reference(run, reference, num_images, False, False, cache_dir,
                                                               False)
    if not 3 <= num_images <= len(data):
        raise ValueError(f"num_images must be between 3 and the {len(data)} training images, got {num_images}")
    vae = LatentDiffusionPipeline.from_pretrained(run["pipeline"]).vae.eval()
    resolution = file_resolution or run["config"].resolution
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(work_dir or tmp)
        for draw in range(draws):
            chosen = np.random.default_rng(draw).choice(len(data), num_images, replace=False)
            paths = {"real": [], "recon": []}
            for start in range(0, num_images, batch_size):
                images = torch.stack([data[int(i)][0] for i in chosen[start:start + batch_size]])
                decoded = vae.decode(vae.encode(images.to(vae.dtype)).latent_dist.mean).sample
                paths["real"] += _save(images, root / f"draw{draw}" / "real", start)
                paths["recon"] += _save(decoded, root / f"draw{draw}" / "recon", start)
            row = {"draw": draw}
            for kind, files in paths.items():
                metrics = compute_fid_kid(files, reference, resolution=resolution, cache_dir=cache_dir, verbose=False)
                row[f"fid_{kind}"], row[f"kid_{kind}"] = metrics["fid"], metrics["kid_mean"]
            rows.append(row)
            print(f"draw {draw}: FID of {num_images} training images {row['fid_real']:.2f}, of their VAE "
                  f"reconstructions {row['fid_recon']:.2f}", flush=True)
    summary = {"run": str(Path(run_dir).resolve()), "num_images": num_images, "resolution": resolution,
               "reference": reference if isinstance(reference, str) else f"the training data ({len(data)} images)",
               "draws": rows}
    for key in ("fid_real", "fid_recon", "kid_real", "kid_recon"):
        values = [r[key] for r in rows]
        summary[f"{key}_mean"] = float(np.mean(values))
        summary[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a train_ldm.py output folder")
    parser.add_argument("--num_images", type=int, default=None,
                        help="images a draw (default: as many as the reference holds, as compare.py)")
    parser.add_argument("--draws", type=int, default=3, help="random draws of the images")
    parser.add_argument("--reference", default=None, help="image folder or .npz (default: the run's training data)")
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    try:
        summary = floor(args.run, args.num_images, args.draws, args.reference, args.cache_dir, args.batch_size)
    except (ValueError, FileNotFoundError) as error:
        print(f"fid_floor: {error}", file=sys.stderr)
        return 2
    print(f"{summary['num_images']} images a draw, {len(summary['draws'])} draws, against {summary['reference']} at "
          f"{summary['resolution']}px: training images FID {summary['fid_real_mean']:.2f} +- "
          f"{summary['fid_real_std']:.2f}, their VAE reconstructions {summary['fid_recon_mean']:.2f} +- "
          f"{summary['fid_recon_std']:.2f}")
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
