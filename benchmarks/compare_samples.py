"""FID/KID of two folders of samples against one reference, with the interval of the FID difference.

For samples made on one machine and measured on another: `sample.py` folders, or those that
`twemoji64_compare.sh` writes with FID=0 on a GPU machine without torch-fidelity's Inception weights.
compare.py does the same from the training runs themselves (and adds cost, throughput, the FID
curve and several runs an arm); this script needs only the images. Both folders must be sample folders
(a manifest.json beside images/) made with the same sampling settings (sampler, steps, seed, precision,
EMA, class labels and mix, guidance, number of images). With one sample set an arm, the interval covers
image noise only (a jackknife of each set), not the seed-to-seed variation of training.

    python benchmarks/compare_samples.py outputs/samples_dcnv4 outputs/samples_conv \
        --reference .data/twemoji64/images --output_dir outputs/twemoji64_comparison

Writes comparison.json and comparison.md to --output_dir and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from unet_dcnv4.comparison import interval_text
from unet_dcnv4.intervals import difference_interval, jackknife_fid_variance, verdict
from unet_dcnv4.metrics import FrechetResampler, compute_fid_kid
from unet_dcnv4.sampling import read_sample_folder

# What must be equal for the two sample sets to be compared (the model and its weights may differ).
SAMPLING_KEYS = ("sampler", "num_inference_steps", "seed", "precision", "use_ema", "class_labels", "class_mix",
                 "guidance_scale")


def check_same_sampling(manifests: list[dict], counts: list[int]) -> None:
    """Raise ValueError naming each sampling setting, or the image count, in which the two folders differ."""
    problems = []
    if counts[0] != counts[1]:
        problems.append(f"number of images ({counts[0]} vs {counts[1]}; FID's bias depends on it)")
    for key in SAMPLING_KEYS:
        a, b = (m.get(key) for m in manifests)
        if a != b:
            problems.append(f"{key} ({a!r} vs {b!r})")
    if problems:
        raise ValueError("the two sample folders were not made alike: " + "; ".join(problems))


def compare_samples(folders: list[str], labels: list[str], reference: str, output_dir: str,
                    resolution: int | None = None, jackknife_groups: int = 50, seed: int = 0,
                    cache_dir: str | None = None, batch_size: int = 50, device: str | None = None) -> dict:
    """Measure both folders against `reference`, the interval of the FID difference, and write the report."""
    read = [read_sample_folder(f) for f in folders]
    if os.path.realpath(folders[0]) == os.path.realpath(folders[1]):
        raise ValueError(f"sample folder {folders[0]!r} is given twice")
    check_same_sampling([m for _, m in read], [len(p) for p, _ in read])
    arms, image_variances, resampler = [], [], None
    for label, folder, (paths, manifest) in zip(labels, folders, read):
        print(f"[{label}] FID/KID of {len(paths)} images in {folder}", flush=True)
        m = compute_fid_kid(paths, reference, resolution=resolution, cache_dir=cache_dir, batch_size=batch_size,
                            device=device, verbose=False, return_features=True)
        if resampler is None:  # a reference .npz may hold statistics only
            resampler = FrechetResampler(m["reference_features"]) if m["reference_features"] is not None else \
                FrechetResampler.from_statistics(m["reference_statistics"]["mu"], m["reference_statistics"]["sigma"])
        image_variances.append(jackknife_fid_variance(resampler.prepare(m["sample_features"]), resampler,
                                                      jackknife_groups, seed))
        arms.append({"label": label, "folder": os.path.abspath(folder), "num_images": len(paths),
                     "fid": m["fid"], "kid_mean": m["kid_mean"], "kid_std": m["kid_std"],
                     "manifest": manifest})
    difference = difference_interval([arms[0]["fid"]], [arms[1]["fid"]], *image_variances)
    for arm, spread in zip(arms, difference.pop("arms")):
        arm["interval_covers"], arm["interval_covers_text"] = spread["covers"], spread["covers_text"]
    summary = {
        "arms": arms,
        "fid_difference": {"a": labels[0], "b": labels[1], **difference, "jackknife_groups": jackknife_groups},
        "verdict": verdict(labels, difference["ci95"]),
        "reference": os.path.abspath(reference),
        "num_reference": m["num_reference"],
        "resolution": m["resolution"],
        "inception_weights": m["inception_weights"],
    }
    os.makedirs(output_dir, exist_ok=True)
    Path(output_dir, "comparison.json").write_text(json.dumps(summary, indent=2))
    table = markdown_table(summary)
    Path(output_dir, "comparison.md").write_text(table)
    print(table)
    return summary


def markdown_table(summary: dict) -> str:
    d = summary["fid_difference"]
    lines = ["| arm | images | FID | KID x1000 |", "| --- | ---: | ---: | ---: |"]
    for arm in summary["arms"]:
        kid = "n/a" if arm["kid_mean"] is None else f"{1000 * arm['kid_mean']:.2f} +- {1000 * arm['kid_std']:.2f}"
        lines.append(f"| {arm['label']} | {arm['num_images']} | {arm['fid']:.2f} | {kid} |")  # n/a: no activations
    lines += ["", f"FID {d['a']} - {d['b']}: {d['value']:+.2f}, {interval_text(d)}: {summary['verdict']}.",
              f"The interval covers {summary['arms'][0]['interval_covers_text']}.",
              (f"Against {summary['num_reference']} reference images ({summary['reference']}) at "
               if summary["num_reference"] else f"Against the Inception statistics in {summary['reference']} at ") +
              f"{summary['resolution']}px; {summary['inception_weights']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="sample folder of arm a (e.g. the DCNv4 model's)")
    parser.add_argument("b", help="sample folder of arm b (e.g. the conv model's)")
    parser.add_argument("--labels", nargs=2, default=["a", "b"], metavar=("A", "B"), help="the arms' names")
    parser.add_argument("--reference", required=True, help="image folder, or .npz of Inception statistics, to measure against (the training data)")
    parser.add_argument("--output_dir", required=True, help="where comparison.{json,md} go")
    parser.add_argument("--resolution", type=int, default=None, help="side both sets are resized to "
                        "(default: the reference's)")
    parser.add_argument("--jackknife_groups", type=int, default=50,
                        help="groups of the jackknife that measures each sample set's image noise")
    parser.add_argument("--seed", type=int, default=0, help="seed of the jackknife's groups")
    parser.add_argument("--cache_dir", default=None, help="reference features and converted Inception weights")
    parser.add_argument("--batch_size", type=int, default=50)
    args = parser.parse_args(argv)
    if args.jackknife_groups < 2:
        parser.error(f"--jackknife_groups must be >= 2, got {args.jackknife_groups}")
    try:
        compare_samples([args.a, args.b], args.labels, args.reference, args.output_dir, args.resolution,
                        args.jackknife_groups, args.seed, args.cache_dir, args.batch_size)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
