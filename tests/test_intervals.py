"""The interval of a FID difference holds its 95% (simulated arms of synthetic Inception-like features with known
seed-to-seed and image-level spread), the method it replaced does not, and the verdicts and Holm's correction read
it right."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from unet_dcnv4.intervals import arm_spread, difference_interval, holm, jackknife_fid_variance, verdict

_spec = importlib.util.spec_from_file_location(
    "interval_coverage", Path(__file__).resolve().parents[1] / "benchmarks" / "interval_coverage.py")
simulation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(simulation)
Arms, SEEDED, UNSEEDED, coverage = simulation.Arms, simulation.SEEDED, simulation.UNSEEDED, simulation.coverage

def test_seed_spread_is_larger_than_image_noise_in_the_simulation():
    rng = np.random.default_rng(3)
    fixed, seeded = Arms(UNSEEDED), Arms(SEEDED)
    for arm in (0, 1):
        image_var = np.var([fixed.fid(fixed.run(rng, arm)) for _ in range(300)])
        total_var = np.var([seeded.fid(seeded.run(rng, arm)) for _ in range(300)])
        assert total_var - image_var > image_var


def test_interval_covers_95_percent_with_three_runs_an_arm():
    assert 0.93 <= coverage(Arms(SEEDED), 3, 1000) <= 0.97


def test_interval_covers_95_percent_with_one_run_an_arm():
    # One run an arm measures image noise only: simulated without seed spread, the truth is the difference of the
    # two models' expected FIDs at this number of images.
    assert 0.93 <= coverage(Arms(UNSEEDED), 1, 600) <= 0.97


@pytest.mark.parametrize("tau, runs, too", [(SEEDED, 3, "narrow"), (UNSEEDED, 1, "wide")])
def test_the_nested_bootstrap_it_replaced_fails(tau, runs, too):
    covered = coverage(Arms(tau), runs, 100, "nested_bootstrap", draws=40)
    assert covered < 0.93 if too == "narrow" else covered > 0.97


def test_welch_interval_of_per_run_fids():
    a, b = [189.05 - 1.76, 189.05, 189.05 + 1.76], [167.80 - 1.65, 167.80, 167.80 + 1.65]
    result = difference_interval(a, b)
    assert result["method"] == "Welch's t interval on the per-run FIDs"
    assert result["value"] == pytest.approx(21.25)
    assert 3.9 < result["df"] < 4.0  # two arms of 3 runs with equal spread: close to 4
    # With ~4 degrees of freedom the 95% multiplier is ~2.78, not 1.96.
    assert (result["ci95"][1] - result["value"]) / result["se"] == pytest.approx(2.78, abs=0.02)
    assert result["ci95"] == pytest.approx([17.4, 25.1], abs=0.1) and result["p_value"] < 2e-4
    assert [arm["covers"] for arm in result["arms"]] == ["runs", "runs"]
    assert verdict(["DCNv4", "conv"], result["ci95"]) == "conv lower FID"


def test_each_arm_is_labelled_by_what_its_spread_covers():
    result = difference_interval([200.0], [190.0, 195.0, 185.0], (4.0, 19), None)
    assert [arm["covers"] for arm in result["arms"]] == ["images", "runs"]
    assert result["arms"][0]["covers_text"].startswith("image noise only")
    assert result["arms"][1]["covers_text"].startswith("seed-to-seed")
    # Satterthwaite: the one-run arm's jackknife (19 df) and the three runs' spread (2 df).
    se2 = 4.0 + 25.0 / 3
    assert result["se"] == pytest.approx(se2 ** 0.5)
    assert result["df"] == pytest.approx(se2 ** 2 / (4.0 ** 2 / 19 + (25.0 / 3) ** 2 / 2))
    with pytest.raises(ValueError, match="one run needs image_variance"):
        difference_interval([200.0], [190.0, 195.0])
    with pytest.raises(ValueError, match="finite FIDs"):
        arm_spread([float("nan"), 3.0])


def test_jackknife_variance_is_close_to_the_image_noise_of_fid():
    arms = Arms(UNSEEDED)
    rng = np.random.default_rng(5)
    true_var = np.var([arms.fid(arms.run(rng, 0)) for _ in range(400)], ddof=1)
    # 30 groups of 3 images, 10 images left over in every replicate.
    estimates = [jackknife_fid_variance(arms.run(rng, 0), arms.resampler, groups=30, seed=s) for s in range(30)]
    assert all(df == 29 for _, df in estimates)
    assert 0.75 < np.mean([v for v, _ in estimates]) / true_var < 1.33
    with pytest.raises(ValueError, match="at least 3 images"):
        jackknife_fid_variance(arms.resampler.prepare(torch.zeros(2, arms.dims, dtype=torch.float64)), arms.resampler)


def test_verdict_reads_the_interval():
    assert verdict(["DCNv4", "conv"], (-3.0, -0.5)) == "DCNv4 lower FID"
    assert verdict(["DCNv4", "conv"], (0.5, 3.0)) == "conv lower FID"
    assert verdict(["DCNv4", "conv"], (-0.5, 3.0)) == "no significant difference at 95%"


def test_holm_adjusts_step_down_and_keeps_the_order():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.3, 0.001]) == pytest.approx([0.3, 0.002])
    assert holm([]) == []
    with pytest.raises(ValueError, match="probabilities"):
        holm([1.5])
