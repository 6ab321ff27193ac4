"""A design study of the DCNv4 U-Net: rows of variants x seeds on one dataset and budget, each compared with
the conv U-Net, in one table.

    python benchmarks/design_study.py --jobs 2            # benchmarks/design_study.yaml, seeds 0 1 2
    python benchmarks/design_study.py --only dw_kernel_3  # run, extend or redo some rows only
    python benchmarks/design_study.py --phases throughput table  # re-time every row on a quiet machine
    python benchmarks/design_study.py --only default --max_train_steps 4000 --output_dir outputs/study_4000
                                                          # one row again at twice the budget
    python benchmarks/design_study.py --phases confirm --confirm_row lower_level
                                                          # confirm a row chosen elsewhere, no select phase

The study file (YAML) holds `base` (TrainConfig keys every run shares: data, VAE, budget), `baseline` (keys
over `base` for the conv U-Net), `variants` (row name -> keys over `base`; a row's `dcnv4_options` merge key
by key over the base's) and optionally `curve_rows` (rows whose comparison also measures FID at every
checkpoint, or at the steps `curve_steps` lists) and `confirm` (`seeds`, fresh ones, and `base`, keys over the
base for other data, and optionally `reference`: where the selected row is confirmed); its paths are relative to
the repository root. Each run is a train_ldm.py process in <output_dir>/runs/<row>/seed<S>, started from its whole
config, written first to <output_dir>/configs/<row>.seed<S>.yaml (`python train_ldm.py --config` that file
redoes the run by hand). A finished run is reused only when its saved config equals the intended one (the
bookkeeping keys of `EXPERIMENT_EXCLUDED` aside); an unfinished one resumes from its last checkpoint; a run
whose config differs stops the study with the differing keys, unless --overwrite retrains it.

Then every row is compared with the baseline by `compare_arms` (per-arm FID/KID mean +- std, the 95% interval of
the FID difference and its p-value, Welch's t on the per-run FIDs; the baseline is sampled once for all rows), the
p-values of all rows get Holm's correction (the table says which verdicts survive it), each row's training
step and U-Net evaluation are timed against the baseline's in interleaved rounds in one process, and study.md and
study.json get one table. Selection (`select`) takes the row with the lowest mean FID among those that beat conv
after Holm's correction (or the lowest of all, marked so) into selected.json; confirmation (`confirm`) trains that
row (or the row --confirm_row names, say one chosen from a study whose runs are on another machine) and conv on
the confirm data with the confirm seeds, compares them with the FID curve at `curve_steps` and writes
confirm/confirmation.md: a verdict on data and seeds the choice was not made on, and the curves of the second
domain.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unet_dcnv4.comparison import (BOOKKEEPING, MODEL_KEYS, compare_arms, interval_text,  # noqa: E402
                                  pool_comparisons)
from unet_dcnv4.config import to_dict, to_yaml  # noqa: E402
from unet_dcnv4.intervals import LEVEL, holm, verdict  # noqa: E402
from unet_dcnv4.timing import time_interleaved  # noqa: E402
from unet_dcnv4.training import TrainConfig, load_config  # noqa: E402

BASELINE = "baseline"
PHASES = ("train", "compare", "throughput", "table", "select", "confirm")
# A finished run is reused whatever its BOOKKEEPING keys are (they do not change what it trains); a larger
# max_train_steps resumes a finished run (train_ldm.py resumes exactly).


def read_study(path: str | os.PathLike) -> dict:
    """The study file, checked: base, baseline, variants (at least one), curve_rows naming rows."""
    study = yaml.safe_load(Path(path).read_text())
    if not isinstance(study, dict) or not isinstance(study.get("variants"), dict) or not study["variants"]:
        raise ValueError(f"study file {str(path)!r} must hold a mapping with a non-empty 'variants' mapping")
    unknown = sorted(set(study) - {"base", "baseline", "variants", "curve_rows", "curve_steps", "confirm"})
    if unknown:
        raise ValueError(f"study file {str(path)!r} has unknown keys {unknown}; "
                         "allowed: base, baseline, variants, curve_rows, curve_steps, confirm")
    confirm = study.setdefault("confirm", None)
    if confirm is not None:
        seeds = confirm.get("seeds") if isinstance(confirm, dict) else None
        if not isinstance(confirm, dict) or set(confirm) - {"base", "seeds", "reference"} or not isinstance(
                confirm.get("base", {}), dict) or not seeds or not all(isinstance(x, int) and x >= 0 for x in seeds):
            raise ValueError(f"study file {str(path)!r}: confirm must hold 'seeds' (a non-empty list of seeds), and "
                             f"optionally 'base' (keys over base for the other data) and 'reference', got {confirm!r}")
        confirm.setdefault("base", {})
        confirm.setdefault("reference", None)
        model = sorted(set(confirm["base"]) & set(MODEL_KEYS))
        if model:
            raise ValueError(f"study file {str(path)!r}: confirm's base sets {model}; the model is the selected row's")
    steps = study.setdefault("curve_steps", None)
    if steps is not None and (not isinstance(steps, list) or not all(isinstance(x, int) and x > 0 for x in steps)):
        raise ValueError(f"study file {str(path)!r}: curve_steps must be a list of positive steps, got {steps!r}")
    if BASELINE in study["variants"]:
        raise ValueError(f"study file {str(path)!r}: {BASELINE!r} names the conv row; rename that variant")
    study.setdefault("base", {})
    study.setdefault("baseline", {"model_type": "conv"})
    for row, keys in [(BASELINE, study["baseline"]), *study["variants"].items()]:
        shared = sorted(set(keys or {}) - set(MODEL_KEYS) - set(BOOKKEEPING))
        if shared:
            raise ValueError(f"study file {str(path)!r}: row {row!r} sets {shared}, which every run of a comparison "
                             f"shares; a row may set only {list(MODEL_KEYS)} (put the others in base)")
    study.setdefault("curve_rows", [])
    missing = sorted(set(study["curve_rows"]) - set(study["variants"]))
    if missing:
        raise ValueError(f"study file {str(path)!r}: curve_rows names no variant {missing}")
    return study


def row_overrides(study: dict, row: str) -> dict:
    """The TrainConfig keys of a row: base, then the row's keys; dcnv4_options merge key by key."""
    keys = dict(study["baseline"] if row == BASELINE else study["variants"][row] or {})
    merged = {**study["base"], **keys}
    if "dcnv4_options" in keys:
        merged["dcnv4_options"] = {**study["base"].get("dcnv4_options", {}), **keys["dcnv4_options"]}
    return merged


def confirm_study(study: dict) -> dict:
    """The study on the confirmation data: the base with the keys of `confirm.base` over it (dcnv4_options merged
    key by key)."""
    extra = study["confirm"]["base"]
    base = {**study["base"], **extra}
    if "dcnv4_options" in extra:
        base["dcnv4_options"] = {**study["base"].get("dcnv4_options", {}), **extra["dcnv4_options"]}
    return {**study, "base": base}


def select_row(rows: list[dict]) -> dict:
    """The row a study selects for confirmation: the lowest mean FID among the rows whose verdict still says
    DCNv4 has the lower FID after Holm's correction; when none does, the lowest mean FID of all, marked so.

    Args:
        rows: the variant rows of `table` (the baseline's left out).
    """
    if not rows:
        raise ValueError("no compared row to select from; run the compare and table phases first")
    winners = [r for r in rows if r["verdict_holm"] != verdict(["", ""], (-1.0, 1.0)) and r["fid_difference"] < 0]
    best = min(winners or rows, key=lambda r: r["fid_mean"])
    return {"row": best["row"], "changes": best["changes"], "fid_mean": best["fid_mean"],
            "fid_difference": best["fid_difference"], "ci95": best["ci95"], "p_value": best["p_value"],
            "p_holm": best["p_holm"], "verdict_holm": best["verdict_holm"], "survived_holm": bool(winners),
            "rule": "lowest mean FID among the rows that beat conv after Holm's correction" if winners else
                    "no row beat conv after Holm's correction: the lowest mean FID of all rows"}


def run_config(study: dict, row: str, seed: int, output_dir: Path) -> TrainConfig:
    return load_config(None, {**row_overrides(study, row), "seed": seed,
                              "output_dir": str(output_dir / "runs" / row / f"seed{seed}")})


def config_differences(saved: TrainConfig, wanted: TrainConfig) -> dict:
    """Keys (bookkeeping aside, and dcnv4_options between two conv runs, which ignore them) whose values
    differ: key -> (saved, wanted)."""
    a, b = to_dict(saved), to_dict(wanted)
    ignored = set(BOOKKEEPING) | ({"dcnv4_options"} if a.get("model_type") == b.get("model_type") == "conv" else set())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in ignored and a.get(k) != b.get(k)}


def run_state(cfg: TrainConfig) -> str:
    """"finished", "partial" (resume it) or "new" for the run folder of `cfg`; raises when it holds another run."""
    run = Path(cfg.output_dir)
    if not (run / "config.yaml").is_file():
        return "new"
    differences = config_differences(load_config(run / "config.yaml"), cfg)
    if differences:
        listed = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differences.items())
        raise FileExistsError(f"{run} holds a run of another config ({listed}); pass --overwrite to retrain it")
    stats = run / "train_stats.json"
    steps = json.loads(stats.read_text()).get("steps", 0) if stats.is_file() else 0
    if steps > cfg.max_train_steps:
        raise FileExistsError(f"{run} trained {steps} steps, more than max_train_steps={cfg.max_train_steps}; "
                              "pass --overwrite to retrain it")
    if steps == cfg.max_train_steps and (run / "pipeline" / "model_index.json").is_file():
        return "finished"
    return "partial"


# What train_ldm.py does before it trains: the latent cache built (and the built-in VAE, on first use).
_PREPARE = ("import sys; sys.path.insert(0, sys.argv[1]); import train_ldm; from unet_dcnv4.training import "
            "load_config; cfg = load_config(sys.argv[2]); train_ldm.prepare_latents(cfg, train_ldm.build_accelerator(cfg))")


def train(cfg: TrainConfig, output_dir: Path, threads: int, prepare_only: bool = False) -> None:
    """One train_ldm.py process for `cfg` (resuming from the last checkpoint), its output in <run>.log; with
    `prepare_only`, only what it does before training: the latent cache built."""
    run = Path(cfg.output_dir)
    config_file = output_dir / "configs" / f"{run.parent.name}.{run.name}.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(to_yaml(cfg))
    log = run.parent / f"{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", TQDM_MININTERVAL="30")
    command = [sys.executable, "-c", _PREPARE, str(ROOT), str(config_file)] if prepare_only else \
        [sys.executable, str(ROOT / "train_ldm.py"), "--config", str(config_file), "--resume_from_checkpoint", "latest"]
    with open(log, "a") as out:
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{'preparing' if prepare_only else 'training'} {run} failed (exit {code}); the end of "
                           f"{log}:\n{tail}")


def train_all(configs: list[TrainConfig], output_dir: Path, jobs: int, overwrite: bool,
              threads: int | None = None) -> None:
    """Trains what is not finished, in the order given, `jobs` at a time with `threads` threads each (default:
    the cores split evenly); when none has saved a checkpoint and the latent cache they share is not built, that
    cache is built first, by one process with every core (a run that checkpointed has built it)."""
    todo, begun = [], 0
    for cfg in configs:
        try:
            state = run_state(cfg)
        except FileExistsError:
            if not overwrite:
                raise
            shutil.rmtree(cfg.output_dir)
            state = "new"
        print(f"{cfg.output_dir}: {state}" + (", reused" if state == "finished" else ""), flush=True)
        if state != "finished":
            todo.append(cfg)
        begun += state == "finished" or (Path(cfg.output_dir) / "checkpoints").is_dir()
    caches = {cfg.latent_cache_dir for cfg in configs}
    begun += None not in caches and all((Path(c) / "cache.json").is_file() for c in caches)
    cores = os.cpu_count() or 1
    started = time.time()

    def one(cfg: TrainConfig, threads: int) -> None:
        print(f"[{time.time() - started:7.0f} s] train {cfg.output_dir}", flush=True)
        train(cfg, output_dir, threads)
        print(f"[{time.time() - started:7.0f} s] done  {cfg.output_dir}", flush=True)

    if todo and not begun:  # nothing trained yet: the latent cache (and the built-in VAE) once, before the jobs
        print(f"[{time.time() - started:7.0f} s] latent cache of {todo[0].output_dir}", flush=True)
        train(todo[0], output_dir, cores, prepare_only=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(one, cfg, threads or max(1, cores // jobs)) for cfg in todo]
        for future in concurrent.futures.as_completed(futures):
            if future.exception() is not None:
                for other in futures:
                    other.cancel()
                raise future.exception()


def _stats_digest(runs: list[str]) -> list[str]:
    return [(Path(r) / "train_stats.json").read_text() for r in runs]


def compare_row(row: str, runs: list[str], baseline_runs: list[str], output_dir: Path, args, curve: bool,
                curve_steps: list[int] | None = None) -> dict:
    """`compare_arms` of a row against the baseline (with the FID curve at `curve_steps`, or at every checkpoint,
    when `curve`), reused when its runs and settings are unchanged."""
    folder = output_dir / "comparisons" / row
    key = {"runs": runs, "baseline": baseline_runs, "stats": _stats_digest(runs + baseline_runs), "curve": curve,
           "curve_steps": curve_steps,
           "num_images": args.num_images, "num_inference_steps": args.num_inference_steps,
           "jackknife_groups": args.jackknife_groups, "reference": args.reference}
    key_file = folder / "study_key.json"
    if (folder / "comparison.json").is_file() and key_file.is_file() and json.loads(key_file.read_text()) == key:
        print(f"comparison {row}: unchanged, reused", flush=True)
        return json.loads((folder / "comparison.json").read_text())
    print(f"comparison {row} against the baseline", flush=True)
    summary = compare_arms([runs, baseline_runs], str(folder), samples_dir=str(output_dir / "samples"),
                           reference=args.reference, num_images=args.num_images,
                           num_inference_steps=args.num_inference_steps, batch_size=args.batch_size,
                           fid_curve=curve, curve_steps=curve_steps, jackknife_groups=args.jackknife_groups)
    key_file.write_text(json.dumps(key, indent=1))
    return summary


def throughput_fns(run: str, cfg: TrainConfig, eval_batch: int) -> dict[str, tuple]:
    """What the throughput of the trained U-Net of `run` times: "train", one training step (forward, MSE,
    backward, AdamW) at the run's batch, and "eval", one no-grad evaluation at `eval_batch` (a sampling step),
    fp32 or the run's autocast dtype; each as (function, images per call)."""
    from unet_dcnv4.sampling import load_pipeline

    unet = load_pipeline(str(Path(run) / "pipeline"), use_ema=False).unet.float()
    if cfg.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    c, s = unet.config.in_channels, unet.config.sample_size
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)
    batch = cfg.train_batch_size * cfg.gradient_accumulation_steps
    x = torch.randn(batch, c, s, s)
    t = torch.randint(0, cfg.num_train_timesteps, (batch,))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6, fused=True)  # as train_ldm.py
    xe, te = torch.randn(eval_batch, c, s, s), torch.full((eval_batch,), cfg.num_train_timesteps // 2)

    def step():
        unet.train()
        with autocast:
            loss = torch.nn.functional.mse_loss(unet(x, t).sample.float(), x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def evaluate():
        unet.eval()
        with torch.no_grad(), autocast:
            unet(xe, te)

    return {"train": (step, batch), "eval": (evaluate, eval_batch)}


def measure_rows(rows: dict[str, list[str]], baseline_runs: list[str], configs: dict, args) -> dict:
    """Each row's throughput (seed 0's model) and its ratio to the baseline's, the two timed in interleaved
    rounds in one process (the machine's load falls on both alike)."""
    base = throughput_fns(baseline_runs[0], configs[BASELINE], args.batch_size)
    results, base_ms = {}, None
    for row, runs in rows.items():
        mine = throughput_fns(runs[0], configs[row], args.batch_size)
        fns = {(who, kind): fn for who, arm in (("row", mine), ("base", base)) for kind, (fn, _) in arm.items()}
        ms = time_interleaved(fns, warmup=args.warmup, iters=args.iters)
        base_ms = {kind: ms[("base", kind)] for kind in base}
        results[row] = {}
        for kind, (_, images) in mine.items():
            results[row][f"{kind}_images_per_s"] = images / ms[("row", kind)] * 1e3
            results[row][f"{kind}_images_ratio"] = ms[("base", kind)] / ms[("row", kind)] * images / base[kind][1]
        print(f"throughput {row}: train {results[row]['train_images_per_s']:.1f} img/s "
              f"({results[row]['train_images_ratio']:.2f}x conv), U-Net evaluation "
              f"{results[row]['eval_images_per_s']:.1f} img/s ({results[row]['eval_images_ratio']:.2f}x conv)",
              flush=True)
    if base_ms is None:
        base_ms = time_interleaved({kind: fn for kind, (fn, _) in base.items()}, warmup=args.warmup, iters=args.iters)
    # The baseline's own figures: its timing beside the last row.
    results[BASELINE] = {**{f"{kind}_images_per_s": images / base_ms[kind] * 1e3 for kind, (_, images) in base.items()},
                         "train_images_ratio": 1.0, "eval_images_ratio": 1.0}
    return results


def changes(study: dict, row: str) -> str:
    """What a row changes from the study's base DCNv4 U-Net, in one cell."""
    if row == BASELINE:
        return ", ".join(f"{k}={v}" for k, v in study["baseline"].items())
    keys = study["variants"][row] or {}
    flat = {**{k: v for k, v in keys.items() if k != "dcnv4_options"}, **keys.get("dcnv4_options", {})}
    return ", ".join(f"{k}={v}" for k, v in flat.items()) or "(the base)"


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(study: dict, summaries: dict, speed: dict) -> tuple[list[dict], str]:
    """One row per variant and the baseline: the rows of study.json and the markdown of study.md. Each row's
    p-value is corrected by Holm's method across the rows of the table; its verdict stands after the correction
    only when the adjusted p-value stays below 1 - LEVEL."""
    def entry(row: str, arm: dict, difference: dict | None, ratios: tuple[float, float]) -> dict:
        return {"row": row, "changes": changes(study, row), "label": arm["label"],
                "block_out_channels": arm["block_out_channels"], "parameters": arm["parameters"],
                "parameter_ratio": ratios[0], "gflops": arm["gflops"], "gflops_ratio": ratios[1],
                "num_runs": arm["num_runs"], "fid_mean": arm["fid_mean"], "fid_std": arm["fid_std"],
                "kid_mean": arm["kid_mean"], "kid_std": arm["kid_std"],
                "fid_difference": difference and difference["value"], "ci95": difference and difference["ci95"],
                "df": difference and difference["df"], "p_value": difference and difference["p_value"],
                "method": difference and difference["method"],
                "verdict": difference and difference["verdict"], **speed.get(row, {})}

    rows = [entry(row, summary["arms"][0], summary["fid_difference"],
                  (summary["arms"][0]["parameter_ratio"], summary["arms"][0]["gflops_ratio"]))
            for row, summary in summaries.items()]
    for r, adjusted in zip(rows, holm([r["p_value"] for r in rows])):
        r["p_holm"] = adjusted
        r["verdict_holm"] = r["verdict"] if adjusted < 1 - LEVEL else verdict(["", ""], (-1.0, 1.0))
    if summaries:
        rows.append(entry(BASELINE, next(iter(summaries.values()))["arms"][1], None, (1.0, 1.0)))
    return rows, rows_markdown(rows)


def rows_markdown(rows: list[dict]) -> str:
    """study.md's table from study.json's rows (the compared rows, then the baseline's)."""
    compared = sum(r["fid_difference"] is not None for r in rows)
    lines = ["| row | changes from the base | widths | params ratio | GFLOPs ratio | train img/s (x conv) | "
             "U-Net eval img/s (x conv) | runs | FID | KID (x1000) | FID - conv, 95% interval | df | p | "
             f"p (Holm, {compared} rows) | verdict | verdict after Holm |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        speed_cells = [f"{_cell(r.get(f'{k}_images_per_s'), '.0f')} ({_cell(r.get(f'{k}_images_ratio'), '.2f')})"
                       for k in ("train", "eval")]
        interval = "-" if r["ci95"] is None else \
            f"{r['fid_difference']:+.2f} [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]"
        lines.append(f"| {r['row']} | {r['changes']} | {tuple(r['block_out_channels'])} | {r['parameter_ratio']:.2f} | "
                     f"{r['gflops_ratio']:.2f} | {speed_cells[0]} | {speed_cells[1]} | {r['num_runs']} | "
                     f"{_cell(r['fid_mean'], '.2f')} +- {_cell(r['fid_std'], '.2f')} | "
                     f"{_cell(r['kid_mean'] * 1000, '.2f')} +- {_cell(r['kid_std'] * 1000, '.2f')} | {interval} | "
                     f"{_cell(r['df'], '.1f')} | {_cell(r['p_value'], '.2g')} | {_cell(r.get('p_holm'), '.2g')} | "
                     f"{r['verdict'] or '-'} | {r.get('verdict_holm') or '-'} |")
    methods = sorted({r["method"] for r in rows if r["method"]})
    if methods:
        lines += ["", "Intervals: " + "; ".join(methods) + f". Holm's correction across the {compared} "
                  "compared rows controls the chance of any false verdict among them at 5%."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default=str(ROOT / "benchmarks" / "design_study.yaml"), help="the study file")
    parser.add_argument("--output_dir", default="outputs/design_study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", default=None, help="rows to run (default: all, in the file's order)")
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help="the budget of every run, over the study file's base (default: the file's)")
    parser.add_argument("--jobs", type=int, default=1, help="training processes at a time (threads split evenly)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of each training process (default: the cores split evenly over --jobs)")
    parser.add_argument("--overwrite", action="store_true", help="retrain runs whose saved config differs")
    parser.add_argument("--num_images", type=int, default=512, help="samples per run for FID/KID")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--reference", default=None, help="image folder for FID (default: the training data)")
    parser.add_argument("--batch_size", type=int, default=64, help="sampling batch (and the timed evaluation's)")
    parser.add_argument("--jackknife_groups", type=int, default=50,
                        help="groups of the jackknife that measures the image noise of a row of one seed")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each throughput timing")
    parser.add_argument("--iters", type=int, default=10, help="timed steps (median) of each throughput timing")
    parser.add_argument("--confirm_row", default=None,
                        help="the row the confirm phase trains against conv, instead of the select phase's choice "
                             "(selected.json): a row chosen from a study whose runs are not on this machine; "
                             "--seeds are then the seeds it was chosen on, and the confirmation says it was named")
    parser.add_argument("--confirm_pool", nargs="+", default=[], metavar="COMPARISON_JSON",
                        help="comparison.json files of confirm runs measured elsewhere (some of the study's confirm "
                             "seeds, say on another machine): the confirm phase does not train their seeds again and "
                             "pools them with the runs it trains (compare.py --pool)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                        help="what to do, in this order: train the runs, compare each row with the baseline, time "
                             "each row against the baseline (throughput.json), write the table from the comparisons "
                             "and timings on disk, select the row to confirm (selected.json), and confirm it against "
                             "conv on the study's confirm data with its fresh seeds (confirm/)")
    args = parser.parse_args(argv)
    try:
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        if args.jobs < 1 or args.num_images < 3 or args.iters < 1 or args.warmup < 0 or args.jackknife_groups < 2:
            raise ValueError("--jobs and --iters must be >= 1, --num_images >= 3, --warmup >= 0, "
                             "--jackknife_groups >= 2")
        if args.confirm_row is not None and "select" in args.phases:
            raise ValueError("--confirm_row replaces the select phase's choice: leave select out of --phases")
        if args.max_train_steps is not None and args.max_train_steps < 1:
            raise ValueError(f"--max_train_steps must be >= 1, got {args.max_train_steps}")
        study = read_study(Path(args.study).resolve())
        if args.confirm_row is not None and args.confirm_row not in study["variants"]:
            raise ValueError(f"--confirm_row names no row of the study: {args.confirm_row!r}; "
                             f"rows: {list(study['variants'])}")
        if args.max_train_steps is not None:
            study["base"]["max_train_steps"] = args.max_train_steps
        rows = args.only or list(study["variants"])
        unknown = sorted(set(rows) - set(study["variants"]))
        if unknown:
            raise ValueError(f"--only names rows the study does not have: {unknown}; rows: {list(study['variants'])}")
        output_dir = Path(args.output_dir).resolve()
        os.chdir(ROOT)  # the study file's paths (data, VAE, caches) are relative to the repository root
        configs = {row: [run_config(study, row, seed, output_dir) for seed in args.seeds]
                   for row in [BASELINE] + rows}
    except (ValueError, FileNotFoundError) as error:
        print(f"design_study: {error}", file=sys.stderr)
        return 2

    started = time.time()
    output_dir.mkdir(parents=True, exist_ok=True)
    if "train" in args.phases:
        try:
            # Seed by seed, every row of a seed before the next seed: a study stopped part-way holds paired runs.
            order = [cfgs[i] for i in range(len(args.seeds)) for cfgs in configs.values()]
            train_all(order, output_dir, args.jobs, args.overwrite, args.threads)
        except FileExistsError as error:
            print(f"design_study: {error}", file=sys.stderr)
            return 2
    runs = {row: [c.output_dir for c in cfgs] for row, cfgs in configs.items()}
    if "compare" in args.phases:
        for row in rows:
            compare_row(row, runs[row], runs[BASELINE], output_dir, args, row in study["curve_rows"],
                        study["curve_steps"])
    speed_file = output_dir / "throughput.json"
    speed = json.loads(speed_file.read_text()) if speed_file.is_file() else {}
    if "throughput" in args.phases:
        speed.update(measure_rows({row: runs[row] for row in rows}, runs[BASELINE],
                                  {row: cfgs[0] for row, cfgs in configs.items()}, args))
        speed_file.write_text(json.dumps(speed, indent=1))
    if not {"table", "select", "confirm"} & set(args.phases):
        print(f"done in {time.time() - started:.0f} s")
        return 0
    # Every compared row of the study in the file's order, rows outside --only as last compared.
    summaries = {row: json.loads((output_dir / "comparisons" / row / "comparison.json").read_text())
                 for row in study["variants"] if (output_dir / "comparisons" / row / "comparison.json").is_file()}
    table_rows, markdown = table(study, summaries, speed)
    if "table" in args.phases:
        (output_dir / "study.json").write_text(json.dumps({"study": study, "seeds": args.seeds, "rows": table_rows},
                                                          indent=1))
        (output_dir / "study.md").write_text(markdown)
        print(f"\n{markdown}\nwritten to {output_dir}/study.md and study.json in {time.time() - started:.0f} s "
              f"on {os.cpu_count()} cores")
    try:
        if "select" in args.phases:
            selected = {**select_row([r for r in table_rows if r["row"] != BASELINE]), "seeds": args.seeds,
                        "data_source": study["base"].get("data_source"),
                        "max_train_steps": study["base"].get("max_train_steps")}
            (output_dir / "selected.json").write_text(json.dumps(selected, indent=1))
            print(f"selected {selected['row']!r} ({selected['rule']})")
        if "confirm" in args.phases:
            confirm(study, output_dir, args)
    except (ValueError, FileExistsError) as error:
        print(f"design_study: {error}", file=sys.stderr)
        return 2
    return 0


def confirm(study: dict, output_dir: Path, args) -> dict | None:
    """Trains the selected row and the baseline on the study's confirm data with its fresh seeds, compares them
    (with the FID curve at the study's `curve_steps`), times the row against conv (`measure_rows`, when both
    arms have a finished run in this folder) and writes confirm/confirmation.md; None (and a line saying so) when
    the study file has no `confirm`."""
    if study["confirm"] is None:
        print("confirm: the study file has no confirm section (seeds and data to confirm on); skipped")
        return None
    selected_file = output_dir / "selected.json"
    if args.confirm_row is not None:
        selected = {"row": args.confirm_row, "changes": changes(study, args.confirm_row), "seeds": args.seeds,
                    "data_source": study["base"].get("data_source"),
                    "max_train_steps": study["base"].get("max_train_steps"),
                    "rule": "named with --confirm_row, not chosen by this study's select phase"}
    elif not selected_file.is_file():
        raise ValueError(f"{selected_file} does not exist: run the select phase first, or name the row with "
                         "--confirm_row")
    else:
        selected = json.loads(selected_file.read_text())
    row, seeds = selected["row"], study["confirm"]["seeds"]
    if set(seeds) & set(selected["seeds"]):
        raise ValueError(f"confirm seeds {seeds} repeat the selection's seeds {selected['seeds']}: use fresh seeds")
    other = confirm_study(study)
    folder = output_dir / "confirm"
    # Seeds measured elsewhere (arm a the row, arm b conv, as compare_row orders them) are not trained again.
    pooled = [json.loads(Path(f).read_text()) for f in args.confirm_pool]
    measured = {name: {r["seed"] for s in pooled for r in s["arms"][i]["runs"]}
                for i, name in enumerate((row, BASELINE))}
    outside = sorted(set().union(*measured.values()) - set(seeds))
    if outside:
        raise ValueError(f"--confirm_pool holds seeds {outside}, which are not the study's confirm seeds {seeds}")
    todo = {name: [s for s in seeds if s not in measured[name]] for name in (BASELINE, row)}
    if pooled and not all(todo.values()) and any(todo.values()):
        raise ValueError(f"--confirm_pool leaves seeds {todo} to train: a comparison of them needs both arms; pool "
                         "files that leave the same seeds of both arms, or all of them")
    configs = {name: [run_config(other, name, seed, folder) for seed in todo[name]] for name in (BASELINE, row)}
    order = [cfg for pair in itertools.zip_longest(configs[BASELINE], configs[row]) for cfg in pair if cfg]
    train_all(order, folder, args.jobs, args.overwrite, args.threads)
    settings = argparse.Namespace(**{**vars(args), "reference": study["confirm"]["reference"]})
    # With the FID curve at the study's curve steps: the confirmation is also the second domain's curves.
    summaries = [compare_row(row, [c.output_dir for c in configs[row]], [c.output_dir for c in configs[BASELINE]],
                             folder, settings, True, study["curve_steps"])] if configs[row] else []
    sources = [*args.confirm_pool, "the runs trained here"][:len(pooled) + len(summaries)]
    summary = pool_comparisons([*pooled, *summaries], sources, str(folder / "comparisons" / f"{row}-pooled")) \
        if len(sources) > 1 else (pooled + summaries)[0]
    difference = summary["fid_difference"]
    # The speed at matched parameters: the first confirm seed of each arm whose finished run is in this folder
    # (trained here, or by an earlier call, though pooled), timed in interleaved rounds.
    local = {name: next((cfg for cfg in (run_config(other, name, seed, folder) for seed in seeds)
                         if run_state(cfg) == "finished"), None) for name in (row, BASELINE)}
    speed = measure_rows({row: [local[row].output_dir]}, [local[BASELINE].output_dir], local, args)[row] \
        if all(local.values()) else None
    text = (f"Confirmation of row {row!r} ({selected['changes']}), selected on {selected['data_source']} at "
            f"{selected['max_train_steps']} steps with seeds {selected['seeds']} ({selected['rule']}), against conv "
            f"on {other['base'].get('data_source')} at {other['base'].get('max_train_steps')} steps with fresh seeds "
            f"{seeds}" + (f" (measured in {', '.join(sources)})" if pooled else "")
            + f": FID difference {difference['value']:+.2f}, {interval_text(difference)}; {difference['verdict']}.\n"
            + (f"Throughput against conv on this machine ({os.cpu_count()} cores, {torch.get_num_threads()} threads): "
               f"training {speed['train_images_ratio']:.2f}x conv's images/s, U-Net evaluation "
               f"{speed['eval_images_ratio']:.2f}x.\n" if speed else ""))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "confirmation.md").write_text(text)
    (folder / "confirmation.json").write_text(json.dumps({"selected": selected, "seeds": seeds,
                                                          "data_source": other["base"].get("data_source"),
                                                          "fid_difference": difference,
                                                          "pooled_from": summary.get("pooled_from"),
                                                          "throughput": speed}, indent=1))
    print(text, end="")
    return summary


if __name__ == "__main__":
    sys.exit(main())
