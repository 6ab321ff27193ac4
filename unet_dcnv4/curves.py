"""FID against training step for two arms of a comparison: each arm's mean curve over its runs, where it
levels off (FID falling by less than a given share per doubling of the steps), the difference of the arms at
every step with its interval, and where the curves cross.
"""

from __future__ import annotations

import math

import numpy as np

from .intervals import difference_interval

__all__ = ["PLATEAU_FALL", "arm_curve", "plateau", "crossings", "curve_analysis", "curve_lines"]

# FID falling by less than this share of itself over a doubling of the steps: the curve has levelled off.
PLATEAU_FALL = 0.02


def arm_curve(runs: list[dict]) -> list[dict]:
    """The mean curve of an arm: at every step that all its runs measured, the runs' FIDs, their mean and
    standard deviation, and the mean training seconds (None when a run did not record them).

    Args:
        runs: each with "fid_curve", a list of {"step", "train_seconds", "fid"}.
    """
    steps = sorted(set.intersection(*[{p["step"] for p in run["fid_curve"]} for run in runs])) if runs else []
    out = []
    for step in steps:
        points = [next(p for p in run["fid_curve"] if p["step"] == step) for run in runs]
        fids = [float(p["fid"]) for p in points]
        seconds = [p.get("train_seconds") for p in points]
        out.append({"step": step, "fids": fids, "mean": float(np.mean(fids)),
                    "std": float(np.std(fids, ddof=1)) if len(fids) > 1 else None,
                    "train_seconds": None if any(s is None for s in seconds) else float(np.mean(seconds))})
    return out


def plateau(curve: list[dict], fall: float = PLATEAU_FALL) -> dict:
    """Where a mean curve levels off: the relative fall of FID over every doubling of the steps it measured
    ((FID(s) - FID(2s)) / FID(s)), and the first step 2s at which that fall is below `fall` (None if none is).

    Returns:
        {"doublings": [{"from", "to", "fall"}], "step": int or None, "fall": the threshold}.
    """
    mean = {p["step"]: p["mean"] for p in curve}
    doublings = [{"from": s, "to": 2 * s, "fall": (mean[s] - mean[2 * s]) / mean[s]}
                 for s in sorted(mean) if 2 * s in mean and mean[s] > 0]
    step = next((d["to"] for d in doublings if d["fall"] < fall), None)
    return {"doublings": doublings, "step": step, "fall": fall}


def crossings(differences: list[dict]) -> list[dict]:
    """The steps between which the mean difference a - b changes sign, each with the step where the straight
    line between the two differences, in log2 of the step, is zero."""
    out = []
    for left, right in zip(differences, differences[1:]):
        d0, d1 = left["value"], right["value"]
        if d0 == 0 or d0 * d1 >= 0:
            continue
        x0, x1 = math.log2(left["step"]), math.log2(right["step"])
        at = 2 ** (x0 + (x1 - x0) * d0 / (d0 - d1))
        out.append({"between": [left["step"], right["step"]], "about": at,
                    "from_lower": "a" if d0 < 0 else "b"})
    return out


def curve_analysis(arm_a: dict, arm_b: dict, fall: float = PLATEAU_FALL) -> dict | None:
    """Both arms' mean curves, plateaus, their difference a - b at every step both measured (with its interval
    when each arm has two runs or more: Welch's t on the per-run FIDs), and where they cross. None when the
    arms share fewer than two steps.

    Args:
        arm_a, arm_b: {"label", "runs": [{"fid_curve": [...]}, ...]}.
    """
    curves = [arm_curve(arm_a["runs"]), arm_curve(arm_b["runs"])]
    by_step = [{p["step"]: p for p in curve} for curve in curves]
    common = sorted(set(by_step[0]) & set(by_step[1]))
    if len(common) < 2:
        return None
    differences = []
    for step in common:
        a, b = by_step[0][step], by_step[1][step]
        row = {"step": step, "value": a["mean"] - b["mean"], "ci95": None, "p_value": None, "df": None}
        if len(a["fids"]) > 1 and len(b["fids"]) > 1:
            interval = difference_interval(a["fids"], b["fids"])
            row.update(ci95=interval["ci95"], p_value=interval["p_value"], df=interval["df"])
        differences.append(row)
    return {
        "a": arm_a["label"], "b": arm_b["label"],
        "arms": [{"label": arm["label"], "curve": curve, "plateau": plateau(curve, fall)}
                 for arm, curve in zip((arm_a, arm_b), curves)],
        "differences": differences,
        "crossings": crossings(differences),
    }


def curve_lines(analysis: dict) -> list[str]:
    """The analysis as markdown: a table of FID against step, then each arm's plateau and the crossings."""
    a, b = analysis["arms"]
    lines = [f"| step | {a['label']} FID | {b['label']} FID | {analysis['a']} - {analysis['b']} | 95% interval | p |",
             "| ---: | ---: | ---: | ---: | --- | ---: |"]
    curves = [{p["step"]: p for p in arm["curve"]} for arm in (a, b)]

    def fid(point):
        return f"{point['mean']:.2f}" + (f" +- {point['std']:.2f}" if point["std"] is not None else "")

    for d in analysis["differences"]:
        step = d["step"]
        interval = "n/a (one run)" if d["ci95"] is None else f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
        p = "n/a" if d["p_value"] is None else f"{d['p_value']:.2g}"
        lines.append(f"| {step} | {fid(curves[0][step])} | {fid(curves[1][step])} | {d['value']:+.2f} | "
                     f"{interval} | {p} |")
    lines.append("")
    for arm in (a, b):
        plat = arm["plateau"]
        falls = ", ".join(f"{d['from']}->{d['to']}: {100 * d['fall']:+.1f}%" for d in plat["doublings"]) or "none"
        last = arm["curve"][-1]["step"]
        threshold = f"a fall under {100 * plat['fall']:.0f}%"
        where = f"levelled off ({threshold}) from step {plat['step']}" if plat["step"] is not None else \
            f"not levelled off ({threshold}) by step {last}"
        lines.append(f"{arm['label']}: FID fall per doubling of the steps {falls}; {where}.")
    if analysis["crossings"]:
        for c in analysis["crossings"]:
            lower = analysis[c["from_lower"]]
            lines.append(f"The curves cross between steps {c['between'][0]} and {c['between'][1]} (about step "
                         f"{c['about']:.0f}): {lower} had the lower FID before.")
    else:
        steps = [d["step"] for d in analysis["differences"]]
        lines.append(f"The mean curves do not cross between steps {steps[0]} and {steps[-1]}.")
    return lines
