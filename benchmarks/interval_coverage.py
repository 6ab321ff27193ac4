"""How often the interval of a FID difference covers the truth, in simulated comparisons with known seed-to-seed
and image-level spread (synthetic Inception-like features, no network), for the interval `compare.py` reports
and for the bootstrap it replaced; and how well a jackknife and a bootstrap of one sample set measure FID's image
noise.

    python benchmarks/interval_coverage.py                  # 1,000 comparisons a case, about 2 minutes
    python benchmarks/interval_coverage.py --simulations 400 --old_simulations 150

A run of arm k is a model whose features are N(mu_k + delta, A_k^T A_k), with delta ~ N(0, tau_k^2 I) drawn per
run (its seed), measured on `images` sample features against a fixed reference set of N(0, I). The truth is the
difference of the arms' expected FIDs at that number of images, by Monte Carlo.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unet_dcnv4.intervals import difference_interval, jackknife_fid_variance  # noqa: E402
from unet_dcnv4.metrics import FrechetResampler  # noqa: E402

# Seed spread of each arm (unequal, as two architectures' would be), and none, for arms of one run.
SEEDED, UNSEEDED = (0.8, 0.4), (0.0, 0.0)


class Arms:
    """Two arms of simulated runs (see the module docstring).

    Args:
        tau: seed spread of each arm.
        dims: feature dimensions D.
        images: sample features per run.
        reference: reference features.
    """

    def __init__(self, tau: tuple[float, float], dims: int = 64, images: int = 100, reference: int = 1000):
        rng = np.random.default_rng(0)
        self.resampler = FrechetResampler(torch.from_numpy(rng.standard_normal((reference, dims))))
        self.tau, self.dims, self.images = tau, dims, images
        self.mu = [np.full(dims, 0.6), np.full(dims, 0.55)]
        self.mix = [np.eye(dims) * s + 0.05 * rng.standard_normal((dims, dims)) for s in (1.5, 1.45)]

    def run(self, rng: np.random.Generator, arm: int) -> tuple:
        """The prepared sample features of one new run of `arm`."""
        shift = self.mu[arm] + self.tau[arm] * rng.standard_normal(self.dims)
        features = rng.standard_normal((self.images, self.dims)) @ self.mix[arm] + shift
        return self.resampler.prepare(torch.from_numpy(features))

    def fid(self, prepared, indices: torch.Tensor | None = None) -> float:
        return self.resampler.fid(prepared, indices)

    def truth(self, draws: int = 3000) -> float:
        """E[FID(a)] - E[FID(b)] over seeds and sample sets, by Monte Carlo."""
        rng = np.random.default_rng(12345)
        return float(np.mean([self.fid(self.run(rng, 0)) for _ in range(draws)])
                     - np.mean([self.fid(self.run(rng, 1)) for _ in range(draws)]))


def nested_bootstrap_interval(arms: Arms, runs: list[list[tuple]], rng: np.random.Generator,
                              draws: int) -> tuple[float, float]:
    """The interval this project reported before: runs resampled within each arm, then each drawn run's images,
    the draws re-centred on the observed difference."""
    observed = np.mean([arms.fid(p) for p in runs[0]]) - np.mean([arms.fid(p) for p in runs[1]])
    n = arms.images
    out = []
    for _ in range(draws):
        means = []
        for arm in runs:
            picks = rng.integers(0, len(arm), len(arm)) if len(arm) > 1 else [0]
            means.append(np.mean([arms.fid(arm[r], torch.from_numpy(rng.integers(0, n, n))) for r in picks]))
        out.append(means[0] - means[1])
    out = np.asarray(out)
    low, high = observed + np.quantile(out - out.mean(), [0.025, 0.975])
    return float(low), float(high)


def coverage(arms: Arms, runs_per_arm: int, simulations: int, method: str = "interval", seed: int = 1,
             groups: int = 20, draws: int = 60) -> float:
    """The share of `simulations` comparisons whose 95% interval covers the true difference.

    Args:
        method: "interval" (`intervals.difference_interval`, a jackknife of `groups` groups for an arm of one
            run) or "nested_bootstrap" (`draws` draws).
    """
    truth = arms.truth()
    rng = np.random.default_rng(seed)
    covered = 0
    for i in range(simulations):
        runs = [[arms.run(rng, k) for _ in range(runs_per_arm)] for k in (0, 1)]
        if method == "interval":
            fids = [[arms.fid(p) for p in arm] for arm in runs]
            jackknife = [jackknife_fid_variance(arm[0], arms.resampler, groups=groups, seed=i) if len(arm) == 1
                         else None for arm in runs]
            low, high = difference_interval(fids[0], fids[1], *jackknife)["ci95"]
        elif method == "nested_bootstrap":
            low, high = nested_bootstrap_interval(arms, runs, rng, draws)
        else:
            raise ValueError(f"method must be 'interval' or 'nested_bootstrap', got {method!r}")
        covered += low <= truth <= high
    return covered / simulations


def image_noise_ratios(arms: Arms, sets: int = 15, groups: int = 50, draws: int = 100) -> dict[str, float]:
    """Mean estimate of the variance of one sample set's FID (image noise) over its true variance, for a grouped
    jackknife and a bootstrap of the set's images."""
    rng = np.random.default_rng(1)
    true = np.var([arms.fid(arms.run(rng, 0)) for _ in range(500)], ddof=1)
    jackknife, bootstrap = [], []
    n = arms.images
    for s in range(sets):
        prepared = arms.run(rng, 0)
        jackknife.append(jackknife_fid_variance(prepared, arms.resampler, groups=groups, seed=s)[0])
        bootstrap.append(np.var([arms.fid(prepared, torch.from_numpy(rng.integers(0, n, n))) for _ in range(draws)],
                                ddof=1))
    return {"jackknife": float(np.mean(jackknife) / true), "bootstrap": float(np.mean(bootstrap) / true)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--simulations", type=int, default=1000, help="comparisons per case for the interval")
    parser.add_argument("--old_simulations", type=int, default=200, help="comparisons per case for the bootstrap")
    args = parser.parse_args(argv)
    if args.simulations < 1 or args.old_simulations < 1:
        parser.error("--simulations and --old_simulations must be >= 1")
    torch.set_num_threads(1)
    print("| runs an arm | seed spread (tau) | interval (compare.py) | nested bootstrap (before) |")
    print("| ---: | --- | ---: | ---: |")
    for runs, tau in ((3, SEEDED), (1, UNSEEDED)):
        arms = Arms(tau)
        new = coverage(arms, runs, args.simulations)
        old = coverage(arms, runs, args.old_simulations, "nested_bootstrap")
        print(f"| {runs} | {tau} | {new:.3f} (n={args.simulations}) | {old:.3f} (n={args.old_simulations}) |",
              flush=True)
    print("\n| features D | images n | jackknife / true variance | bootstrap / true variance |")
    print("| ---: | ---: | ---: | ---: |")
    for dims, images in ((64, 100), (128, 64), (256, 100)):
        ratios = image_noise_ratios(Arms(UNSEEDED, dims=dims, images=images), groups=min(50, images))
        print(f"| {dims} | {images} | {ratios['jackknife']:.2f} | {ratios['bootstrap']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
