"""How sure a FID difference is: the spread of each arm's mean FID, the interval and p-value of the difference of
two arms, the verdict, and Holm's correction across the rows of a study.

An arm's mean FID varies with the seed of each run (training) and with the sample set of each run (image noise).
With two runs or more, the spread of its per-run FIDs holds both, and the difference of two arms gets Welch's t
interval on the per-run FIDs (degrees of freedom by Welch-Satterthwaite, a few with a few seeds, so the multiplier
is far above 1.96). An arm of one run has no seed spread to measure: its image noise alone is measured by a
grouped jackknife over its sample set, and the result is labelled as covering image noise only. (A bootstrap of the
sample set overstates FID's image noise several times over when the features have more dimensions than the set has
images, as Inception's 2,048 do; the jackknife does not, see tests/test_intervals.py.)
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["LEVEL", "jackknife_fid_variance", "arm_spread", "difference_interval", "verdict", "holm"]

LEVEL = 0.95
COVERS_RUNS = "seed-to-seed and image noise (the spread of {n} per-run FIDs)"
COVERS_IMAGES = ("image noise only (1 run: a jackknife over its sample set in {groups} groups; seed-to-seed variation "
                 "not included)")


def jackknife_fid_variance(prepared: tuple[torch.Tensor, torch.Tensor], resampler, groups: int = 50,
                           seed: int = 0) -> tuple[float, int]:
    """The variance of one sample set's FID over sample sets of its size (image noise), by a grouped jackknife.

    The n images are split at random into g = `groups` blocks of d = n // g images (the n mod g left over are kept
    in every replicate), the FID is recomputed with each block left out, and, as the delete-d jackknife weighs
    g of its subsets, variance = (n - d) / (d g) * sum((FID_(b) - mean)^2); with n = g d this is the grouped
    jackknife's (g - 1) / g * sum(...).

    Args:
        prepared: `resampler.prepare(features)` of the sample set, features (n, D).
        resampler: a `metrics.FrechetResampler` holding the reference statistics.
        groups: blocks g (at most n; fewer, larger blocks are cheaper, more give more degrees of freedom).
        seed: seed of the split.

    Returns:
        (variance, degrees of freedom g - 1).
    """
    n = len(prepared[0])
    if n < 3:
        raise ValueError(f"a jackknife of FID needs at least 3 images, the sample set has {n}")
    if not isinstance(groups, int) or groups < 2:
        raise ValueError(f"groups must be an int >= 2, got {groups!r}")
    g = min(groups, n)
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x7AC4])).permutation(n)
    size = n // g
    replicates = np.array([resampler.fid(prepared, torch.from_numpy(np.delete(order, np.s_[b * size:(b + 1) * size])))
                           for b in range(g)])
    return float((n - size) / (size * g) * np.sum((replicates - replicates.mean()) ** 2)), g - 1


def arm_spread(fids: list[float], image_variance: tuple[float, int] | None = None) -> dict:
    """The variance of an arm's mean FID, its degrees of freedom and what it covers.

    Args:
        fids: the FID of each run of the arm.
        image_variance: for an arm of one run, (variance, df) of its FID over sample sets
            (`jackknife_fid_variance`); ignored when the arm has several runs.

    Returns:
        {"runs", "mean", "variance" (of the mean), "df", "covers" ("runs" or "images"), "covers_text"}.
    """
    fids = [float(f) for f in fids]
    if not fids or not all(math.isfinite(f) for f in fids):
        raise ValueError(f"fids must be a non-empty list of finite FIDs, got {fids!r}")
    k = len(fids)
    if k >= 2:
        return {"runs": k, "mean": float(np.mean(fids)), "variance": float(np.var(fids, ddof=1)) / k, "df": k - 1,
                "covers": "runs", "covers_text": COVERS_RUNS.format(n=k)}
    if image_variance is None:
        raise ValueError("an arm of one run needs image_variance, the (variance, df) of its FID over sample sets")
    variance, df = image_variance
    return {"runs": 1, "mean": fids[0], "variance": float(variance), "df": int(df), "covers": "images",
            "covers_text": COVERS_IMAGES.format(groups=int(df) + 1)}


def difference_interval(fids_a: list[float], fids_b: list[float], image_variance_a: tuple[float, int] | None = None,
                        image_variance_b: tuple[float, int] | None = None, level: float = LEVEL) -> dict:
    """The difference of the mean FIDs of two arms (a - b) with its interval, p-value and method.

    The standard error adds the two arms' `arm_spread` variances; the degrees of freedom come from the
    Welch-Satterthwaite formula, so with several runs in each arm this is Welch's t interval on the per-run FIDs,
    and with one run in an arm that arm contributes its jackknife image-noise variance (its df: groups - 1).

    Args:
        fids_a, fids_b: the per-run FIDs of each arm.
        image_variance_a, image_variance_b: (variance, df) of the FID of the arm's one run over sample sets; needed
            only for an arm of one run.
        level: the interval's coverage.

    Returns:
        {"value", "ci95" ([low, high] at `level`), "se", "df", "t", "p_value" (two-sided, of no difference),
         "level", "method", "arms": [arm_spread(a), arm_spread(b)]}.
    """
    from scipy import stats

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    arms = [arm_spread(fids_a, image_variance_a), arm_spread(fids_b, image_variance_b)]
    value = arms[0]["mean"] - arms[1]["mean"]
    se2 = arms[0]["variance"] + arms[1]["variance"]
    if se2 > 0:
        df = se2 ** 2 / sum(arm["variance"] ** 2 / arm["df"] for arm in arms)
        se = math.sqrt(se2)
        t = value / se
        p_value = float(2 * stats.t.sf(abs(t), df))
        half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    else:  # identical per-run FIDs: no spread measured at all
        df, se, t, half = float(sum(arm["df"] for arm in arms)), 0.0, math.copysign(math.inf, value), 0.0
        p_value = 1.0 if value == 0 else 0.0
    if all(arm["covers"] == "runs" for arm in arms):
        method = "Welch's t interval on the per-run FIDs"
    elif all(arm["covers"] == "images" for arm in arms):
        method = "t interval from each run's jackknife image-noise variance (image noise only)"
    else:
        method = ("t interval (Welch-Satterthwaite) from the per-run FIDs of the arm with several runs and the "
                  "jackknife image-noise variance of the arm with one")
    return {"value": value, "ci95": [value - half, value + half], "se": se, "df": float(df), "t": t,
            "p_value": p_value, "level": level, "method": method, "arms": arms}


def verdict(labels: list[str], ci95: tuple[float, float] | list[float], level: float = LEVEL) -> str:
    """"<arm a> lower FID", "<arm b> lower FID" or "no significant difference at 95%" from the interval of a - b."""
    if ci95[1] < 0:
        return f"{labels[0]} lower FID"
    if ci95[0] > 0:
        return f"{labels[1]} lower FID"
    return f"no significant difference at {level:.0%}"


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the order given: a row's verdict survives the
    correction at level alpha when its adjusted p-value is below 1 - level."""
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p_values must be a list of probabilities, got {p_values!r}")
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()
