"""compare.py and unet_dcnv4.comparison on tiny fabricated runs: the report, several runs per arm with an interval and
a verdict, sample folders tied to what made them, and the refusal of runs from different experiments."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_cases import tiny_pipeline
from unet_dcnv4 import comparison
from unet_dcnv4.metrics import resolve_inception_weights

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import compare  # noqa: E402  (a top-level script, importable once the repository root is on the path)


def _fake_run(path: Path, model_type: str, seed: int = 0, config: str = "", stats: dict | None = None) -> str:
    """What train_ldm.py leaves behind, with untrained tiny components: config, statistics, pipeline."""
    from unet_dcnv4.unet import build_unet

    pipe = tiny_pipeline()
    torch.manual_seed(seed)
    pipe.register_modules(unet=build_unet(model_type, "tiny", sample_size=8).eval())
    pipe.save_pretrained(path / "pipeline")
    (path / "config.yaml").write_text(f"model_type: {model_type}\nmodel_size: tiny\nresolution: 16\nseed: {seed}\n"
                                      + config)
    values = {"steps": 10, "images_per_s": 12.5, "final_loss": 0.5, "parameters": 1, "wall_time_s": 3.0,
              "data_fingerprint": "data-0", **(stats or {})}
    (path / "train_stats.json").write_text(json.dumps(values))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    reference = root / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(reference / f"{i}.png")
    return {
        "dcnv4": [_fake_run(root / f"dcnv4_{s}", "dcnv4", s) for s in (0, 1)],
        "conv": [_fake_run(root / f"conv_{s}", "conv", s) for s in (0, 1)],
        "reference": str(reference),
    }


def _argv(out: Path, reference: str, *extra: str) -> list[str]:
    return ["--output_dir", str(out), "--reference", reference, "--num_inference_steps", "2", "--batch_size", "4",
            "--cache_dir", str(out.parent / "cache"), "--grid_images", "4", "--bootstrap", "50", *extra]


@pytest.fixture(scope="module")
def pair(runs, tmp_path_factory):
    """One comparison of one run per arm, and what it printed."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("pair") / "cmp"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert compare.main([runs["dcnv4"][0], runs["conv"][0], *_argv(out, runs["reference"])]) == 0
    return out, printed.getvalue()


def test_one_run_per_arm_writes_json_markdown_and_figure(pair, tmp_path):
    out, printed = pair
    assert "| DCNv4 | 1 |" in printed and "| conv | 1 |" in printed and "Verdict: " in printed

    summary = json.loads((out / "comparison.json").read_text())
    dcnv4, conv = summary["arms"]
    assert [dcnv4["label"], conv["label"]] == ["DCNv4", "conv"]
    assert summary["num_images"] == 8 and summary["num_reference"] == 8 and summary["resolution"] == 16
    for arm in summary["arms"]:
        assert arm["num_runs"] == 1 and arm["fid_std"] == 0 and arm["fid_mean"] == arm["runs"][0]["fid"] > 0
        run = arm["runs"][0]
        assert run["train_images_per_s"] == 12.5 and run["sampling_images_per_s"] > 0 and run["train_steps"] == 10
        assert sorted(os.listdir(Path(run["samples"]) / "images")) == [f"{i:06d}.png" for i in range(8)]
        assert run["fid_curve"] == [{"step": 10, "train_seconds": None, "fid": run["fid"], "kid_mean": run["kid_mean"]}]
    assert dcnv4["parameters"] < conv["parameters"] and conv["parameter_ratio"] == 1
    assert dcnv4["parameter_ratio"] == pytest.approx(dcnv4["parameters"] / conv["parameters"])
    diff = summary["fid_difference"]
    assert diff["value"] == pytest.approx(dcnv4["fid_mean"] - conv["fid_mean"])
    assert diff["ci95"][0] <= diff["value"] <= diff["ci95"][1] and diff["ci95"][0] < diff["ci95"][1]
    assert diff["resampled"].startswith("sample sets only")
    assert summary["verdict"] == diff["verdict"] == comparison.verdict(["DCNv4", "conv"], diff["ci95"])
    assert summary["budget"].startswith("equal widths, no budget matched")
    assert summary["inception_weights"] == resolve_inception_weights(str(out.parent / "cache"))["source"]
    assert "Verdict: " in (out / "comparison.md").read_text()
    figure = Image.open(out / "comparison.png")
    assert figure.size[0] > figure.size[1]


def test_several_runs_per_arm_give_mean_std_and_an_interval_over_runs(runs, tmp_path):
    out = tmp_path / "cmp"
    argv = ["--a", *runs["dcnv4"], "--b", *runs["conv"], *_argv(out, runs["reference"], "--num_images", "4")]
    assert compare.main(argv) == 0
    summary = json.loads((out / "comparison.json").read_text())
    for arm in summary["arms"]:
        fids = [r["fid"] for r in arm["runs"]]
        assert arm["num_runs"] == 2 and fids[0] != fids[1]
        assert arm["fid_mean"] == pytest.approx(np.mean(fids)) and arm["fid_std"] == pytest.approx(np.std(fids, ddof=1))
    assert summary["fid_difference"]["resampled"].startswith("runs within each arm")
    # Every run is sampled with the same seeds: run folders of one arm differ only by their weights.
    manifests = [json.loads((Path(r["samples"]) / "manifest.json").read_text()) for a in summary["arms"]
                 for r in a["runs"]]
    assert len({m["seed"] for m in manifests}) == 1 and len({m["weights"] for m in manifests}) == 4


def test_verdict_reads_the_interval():
    assert comparison.verdict(["DCNv4", "conv"], (-3.0, -0.5)) == "DCNv4 lower FID"
    assert comparison.verdict(["DCNv4", "conv"], (0.5, 3.0)) == "conv lower FID"
    assert comparison.verdict(["DCNv4", "conv"], (-0.5, 3.0)) == "no significant difference at 95%"


def test_bootstrap_interval_covers_zero_for_one_distribution_and_not_for_two():
    from unet_dcnv4.metrics import FrechetResampler

    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(400, 16, generator=gen, dtype=torch.float64)
    same = [torch.randn(200, 16, generator=gen, dtype=torch.float64) for _ in range(4)]
    shifted = [torch.randn(200, 16, generator=gen, dtype=torch.float64) + 0.5 for _ in range(2)]
    resampler = FrechetResampler(reference)

    def interval(a, b):
        features = {"a": [resampler.prepare(f) for f in a], "b": [resampler.prepare(f) for f in b]}
        draws = comparison.bootstrap_fid_difference(features, resampler, 200, seed=1)
        observed = np.mean([resampler.fid(p) for p in features["a"]]) - np.mean([resampler.fid(p) for p in
                                                                                 features["b"]])
        return observed + np.quantile(draws - draws.mean(), [0.025, 0.975])

    low, high = interval(same[:2], same[2:])
    assert low < 0 < high
    low, high = interval(same[:2], shifted)
    assert high < 0


def test_sample_folders_are_reused_only_for_the_same_model_and_settings(runs, pair, tmp_path, capsys):
    import shutil

    out = tmp_path / "cmp"
    shutil.copytree(pair[0], out)
    shutil.copytree(pair[0].parent / "cache", tmp_path / "cache")
    pair = [runs["dcnv4"][0], runs["conv"][0]]
    run0 = Path(json.loads((out / "comparison.json").read_text())["arms"][0]["runs"][0]["samples"])
    assert run0.parent.name == "samples" and run0.name.startswith("dcnv4_0-")
    run0 = out / "samples" / run0.name  # the copy's
    image = run0 / "images" / "000003.png"
    first = image.stat().st_mtime_ns
    fid = json.loads((out / "comparison.json").read_text())["arms"][0]["fid_mean"]
    # Stray files in the sample folder are not measured: an interrupted write and an image beyond N.
    (run0 / "images" / ".000009.png.123.tmp").write_bytes(b"partial")
    Image.new("RGB", (16, 16), (255, 0, 0)).save(run0 / "images" / "000050.png")
    assert compare.main([*pair, *_argv(out, runs["reference"])]) == 0
    assert image.stat().st_mtime_ns == first
    assert json.loads((out / "comparison.json").read_text())["arms"][0]["fid_mean"] == fid

    capsys.readouterr()
    assert compare.main([*pair, *_argv(out, runs["reference"], "--seed", "5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be reused" in err and "seed (0, now 5)" in err
    assert compare.main([*pair, *_argv(out, runs["reference"], "--seed", "5", "--overwrite")]) == 0
    assert image.stat().st_mtime_ns != first
    assert json.loads((run0 / "manifest.json").read_text())["seed"] == 5


@pytest.mark.parametrize("config, stats, key", [
    ("resolution: 32\n", {}, "resolution"),
    ("learning_rate: 0.001\n", {}, "learning_rate"),
    ("flips: false\n", {}, "flips"),
    ("beta_schedule: linear\n", {}, "beta_schedule"),
    ("prediction_type: v_prediction\n", {}, "prediction_type"),
    ("train_batch_size: 8\n", {}, "global_batch"),
    ("", {"steps": 20}, "train_steps"),
    ("", {"data_fingerprint": "data-1"}, "data"),
])
def test_runs_of_different_experiments_are_refused(runs, tmp_path, capsys, config, stats, key):
    other = _fake_run(tmp_path / "other", "conv", config=config, stats=stats)
    argv = [runs["dcnv4"][0], other, *_argv(tmp_path / "x", runs["reference"])]
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: runs differ in what defines the experiment") and err.count("\n") == 1
    assert f"{key} (" in err


def test_an_allowed_difference_is_recorded(runs, tmp_path):
    other = _fake_run(tmp_path / "other", "conv", config="learning_rate: 0.001\n")
    out = tmp_path / "x"
    assert compare.main([runs["dcnv4"][0], other, *_argv(out, runs["reference"], "--allow_mismatch",
                                                          "learning_rate", "--num_images", "4")]) == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert len(summary["allowed_differences"]) == 1 and summary["allowed_differences"][0].startswith("learning_rate")
    assert "Allowed differences" in (out / "comparison.md").read_text()


def test_the_vae_is_compared_by_its_weights(runs, tmp_path, capsys):
    other = Path(_fake_run(tmp_path / "other", "conv"))
    vae = tiny_pipeline(seed=3).vae
    vae.save_pretrained(other / "pipeline" / "vae")
    assert compare.main([runs["dcnv4"][0], str(other), *_argv(tmp_path / "x", runs["reference"])]) == 2
    assert "vae_weights (" in capsys.readouterr().err


def test_an_arm_must_hold_one_model(runs, tmp_path, capsys):
    argv = ["--a", runs["dcnv4"][0], runs["conv"][1], "--b", runs["conv"][0], *_argv(tmp_path / "x", runs["reference"])]
    assert compare.main(argv) == 2
    assert "mixes models" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["only_one"], "exactly two positional"),
    (["a", "b", "--a", "c"], "not both"),
    (["--a", "c"], "both --a RUN... and --b RUN..."),
])
def test_argument_mistakes_are_one_line(tmp_path, capsys, argv, needle):
    assert compare.main([*argv, "--output_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert compare.main([str(tmp_path), str(tmp_path), "--output_dir", str(tmp_path / "x")]) == 2
    assert "has no config.yaml" in capsys.readouterr().err
