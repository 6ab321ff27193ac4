"""Check that a training run resumed from a checkpoint ends where an uninterrupted run ends, on any device.

Three runs of `train_ldm.py` on the embedded default (or --config): two uninterrupted runs of --steps steps,
and one stopped at --steps/2 (its checkpoint) and resumed from it to --steps. The final checkpoints' model
weights, EMA weights and AdamW moments are compared. On a GPU the atomic backward makes two uninterrupted
runs differ in the last bits, so the resumed run passes when it is no farther from the first run than the
second uninterrupted run is (times --tolerance), and exactly equal when the uninterrupted runs are.

    python benchmarks/resume_check.py --out resume.json                   # bf16 on the GPU if there is one
    python benchmarks/resume_check.py --mixed_precision no --steps 6      # a quick CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def checkpoint_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Model weights, EMA weights and optimizer moments of a train_ldm.py checkpoint folder, in float64."""
    out = {f"model.{k}": v for k, v in load_file(checkpoint / "model.safetensors").items()}
    ema = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False, map_location="cpu")
    out.update({f"ema.{i}": p for i, p in enumerate(ema["shadow_params"])})
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=False, map_location="cpu")["state"]
    out.update({f"adam.{i}.{k}": v for i, s in optimizer.items() for k, v in s.items() if torch.is_tensor(v)})
    return {k: v.detach().to("cpu", torch.float64) for k, v in out.items()}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> dict:
    """Largest absolute difference and relative L2 difference over the tensors whose name starts with prefix."""
    if a.keys() != b.keys():
        raise ValueError(f"the checkpoints hold different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    keys = [k for k in a if k.startswith(prefix)]
    diff = sum(float((a[k] - b[k]).square().sum()) for k in keys) ** 0.5
    norm = sum(float(a[k].square().sum()) for k in keys) ** 0.5
    return {"max_abs": max(float((a[k] - b[k]).abs().max()) for k in keys), "rel_l2": diff / max(norm, 1e-30),
            "different_tensors": sum(not torch.equal(a[k], b[k]) for k in keys), "tensors": len(keys)}


def resume_ok(rerun: dict, resumed: dict, tolerance: float) -> bool:
    """Whether the resumed run is as close to the first run as a second uninterrupted run is (within
    `tolerance` times its relative distance), or exactly equal when the uninterrupted runs are."""
    if rerun["rel_l2"] == 0:
        return resumed["rel_l2"] == 0
    return resumed["rel_l2"] <= tolerance * rerun["rel_l2"]


def launch(out_dir: Path, steps: int, args, resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "train_ldm.py"), "--output_dir", str(out_dir), "--max_train_steps", str(steps),
           "--checkpointing_steps", str(args.steps // 2), "--mixed_precision", args.mixed_precision,
           "--set", "sample_every_steps=0", "--set", "checkpoints_total_limit=null"]
    if args.config:
        cmd += ["--config", args.config]
    for item in args.set:
        cmd += ["--set", item]
    if resume:
        cmd += ["--resume_from_checkpoint", "latest"]
    log = open(out_dir.with_suffix(".resume.log" if resume else ".log"), "w")
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def wait(procs: dict[str, subprocess.Popen], root: Path) -> None:
    for name, proc in procs.items():
        if proc.wait() != 0:
            log = root / f"{name}.log"
            tail = log.read_text().splitlines()[-15:] if log.exists() else []
            raise SystemExit(f"resume_check: the run {name} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("outputs/resume_check"), help="where the three runs go")
    parser.add_argument("--steps", type=int, default=40, help="steps of a run (even; the checkpoint is at half)")
    parser.add_argument("--mixed_precision", default="bf16" if torch.cuda.is_available() else "no")
    parser.add_argument("--config", default=None, help="train_ldm.py config (default: the embedded default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to train_ldm.py")
    parser.add_argument("--tolerance", type=float, default=4.0,
                        help="how much farther than the second uninterrupted run the resumed run may be")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.steps % 2:
        parser.error(f"--steps must be an even number of at least 2, got {args.steps}")
    args.root.mkdir(parents=True, exist_ok=True)
    names = ("straight", "rerun", "resumed")
    dirs = {n: args.root / n for n in names}
    for d in dirs.values():
        if d.exists():
            parser.error(f"{d} exists: pass an empty --root")

    t0 = time.time()
    # The runs are independent until the resume, so they share the device.
    wait({"straight": launch(dirs["straight"], args.steps, args), "rerun": launch(dirs["rerun"], args.steps, args),
          "resumed": launch(dirs["resumed"], args.steps // 2, args)}, args.root)
    wait({"resumed.resume": launch(dirs["resumed"], args.steps, args, resume=True)}, args.root)

    final = {n: checkpoint_tensors(d / "checkpoints" / f"checkpoint-{args.steps}") for n, d in dirs.items()}
    losses = {n: json.loads((d / "train_stats.json").read_text())["final_loss"] for n, d in dirs.items()}
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "steps": args.steps, "mixed_precision": args.mixed_precision, "final_loss": losses,
              "seconds": round(time.time() - t0, 1)}
    passed = True
    for part in ("model.", "ema.", "adam."):
        rerun = distance(final["straight"], final["rerun"], part)
        resumed = distance(final["straight"], final["resumed"], part)
        ok = resume_ok(rerun, resumed, args.tolerance)
        result[part.rstrip(".")] = {"rerun_vs_straight": rerun, "resumed_vs_straight": resumed, "ok": ok}
        passed &= ok
        print(f"{part.rstrip('.'):6} rerun vs straight: rel {rerun['rel_l2']:.2e} max {rerun['max_abs']:.2e} | "
              f"resumed vs straight: rel {resumed['rel_l2']:.2e} max {resumed['max_abs']:.2e} "
              f"({resumed['different_tensors']}/{resumed['tensors']} tensors differ) -> {'ok' if ok else 'FAIL'}")
    result["passed"] = passed
    print(f"final losses: {losses}; resume check {'passed' if passed else 'FAILED'} in {result['seconds']} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
