"""The analysis of FID against training step: mean curves over runs, plateaus per doubling, the difference at
each step with its interval, and crossings."""

import math

import pytest

from unet_dcnv4.curves import arm_curve, crossings, curve_analysis, curve_lines, plateau

STEPS = [1000, 2000, 4000, 8000]


def _arm(label, means, offsets=(-1.0, 0.0, 1.0), seconds=True):
    """Runs whose FIDs at STEPS are `means` + each run's offset (several runs: mean exactly `means`)."""
    runs = [{"fid_curve": [{"step": s, "train_seconds": s / 10 if seconds else None, "fid": m + o}
                           for s, m in zip(STEPS, means)]} for o in offsets]
    return {"label": label, "runs": runs}


def test_arm_curve_keeps_the_steps_every_run_measured():
    arm = _arm("a", [100, 80, 70, 65])
    arm["runs"][0]["fid_curve"].append({"step": 16000, "train_seconds": 1600, "fid": 60.0})  # one run only
    curve = arm_curve(arm["runs"])
    assert [p["step"] for p in curve] == STEPS
    assert [p["mean"] for p in curve] == [100, 80, 70, 65] and curve[0]["std"] == pytest.approx(1.0)
    assert curve[1]["train_seconds"] == 200
    assert arm_curve(_arm("a", [1, 2, 3, 4], seconds=False)["runs"])[0]["train_seconds"] is None


def test_plateau_is_the_first_doubling_that_falls_less_than_the_threshold():
    curve = arm_curve(_arm("a", [100, 80, 79, 78.5])["runs"])
    result = plateau(curve)
    assert [d["fall"] for d in result["doublings"]] == pytest.approx([0.2, 0.0125, 0.5 / 79])
    assert result["step"] == 4000
    assert plateau(curve, fall=0.01)["step"] == 8000
    assert plateau(arm_curve(_arm("b", [120, 85, 75, 70])["runs"]))["step"] is None


def test_crossings_interpolate_in_log_steps():
    diffs = [{"step": 1000, "value": -20.0}, {"step": 2000, "value": -5.0}, {"step": 4000, "value": 5.0},
             {"step": 8000, "value": 8.5}]
    (c,) = crossings(diffs)
    assert c["between"] == [2000, 4000] and c["about"] == pytest.approx(2 ** (math.log2(2000) + 0.5))
    assert c["from_lower"] == "a"
    assert crossings([{"step": 1, "value": 1.0}, {"step": 2, "value": 2.0}]) == []


def test_curve_analysis_and_its_lines():
    a, b = _arm("DCNv4", [100, 80, 79, 78.5]), _arm("conv", [120, 85, 75, 70])
    analysis = curve_analysis(a, b)
    assert [d["value"] for d in analysis["differences"]] == pytest.approx([-20, -5, 4, 8.5])
    first = analysis["differences"][0]
    assert first["ci95"][0] < -20 < first["ci95"][1] < 0 and first["p_value"] < 0.01
    assert [c["between"] for c in analysis["crossings"]] == [[2000, 4000]]
    text = "\n".join(curve_lines(analysis))
    assert "| 1000 | 100.00 +- 1.00 | 120.00 +- 1.00 | -20.00 |" in text
    assert "DCNv4: FID fall per doubling of the steps 1000->2000: +20.0%, 2000->4000: +1.2%" in text
    assert "levelled off (a fall under 2%) from step 4000" in text and "conv: " in text
    assert "conv: FID fall per doubling of the steps 1000->2000: +29.2%" in text
    assert "not levelled off (a fall under 2%) by step 8000" in text
    # -5 at 2000 and +4 at 4000: zero at 5/9 of the way in log2 of the step
    assert "The curves cross between steps 2000 and 4000 (about step 2939): DCNv4 had the lower FID before." in text

    one = curve_analysis(_arm("DCNv4", [100, 80, 79, 78.5], offsets=(0.0,)), b)
    assert one["differences"][0]["ci95"] is None and "n/a (one run)" in "\n".join(curve_lines(one))
    assert curve_analysis(_arm("x", [1, 2, 3, 4]), {"label": "y", "runs": [{"fid_curve": [
        {"step": 1000, "train_seconds": None, "fid": 1.0}]}]}) is None  # one common step: no curve
