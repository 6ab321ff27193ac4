"""compare.py on two tiny fabricated runs (a DCNv4 and a conv U-Net) writes all its outputs."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_pipeline import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _load_compare():
    spec = importlib.util.spec_from_file_location("compare_script", ROOT / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = _load_compare()


def _fake_run(path: Path, model_type: str) -> str:
    """What train_ldm.py leaves behind, with untrained tiny components: config, statistics, pipeline."""
    from unet_dcnv4.unet import build_unet

    pipe = tiny_pipeline()
    torch.manual_seed(1)
    pipe.register_modules(unet=build_unet(model_type, "tiny", sample_size=8).eval())
    pipe.save_pretrained(path / "pipeline")
    (path / "config.yaml").write_text(f"model_type: {model_type}\nmodel_size: tiny\nresolution: 16\n")
    stats = {"steps": 10, "images_per_s": 12.5, "final_loss": 0.5, "parameters": 1, "wall_time_s": 3.0}
    (path / "train_stats.json").write_text(json.dumps(stats))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    reference = root / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(reference / f"{i}.png")
    return _fake_run(root / "dcnv4_run", "dcnv4"), _fake_run(root / "conv_run", "conv"), str(reference)


def test_comparison_writes_json_markdown_and_figure(runs, tmp_path, capsys):
    dcnv4_run, conv_run, reference = runs
    out = tmp_path / "cmp"
    argv = [dcnv4_run, conv_run, "--output_dir", str(out), "--reference", reference, "--num_inference_steps", "2",
            "--batch_size", "4", "--cache_dir", str(tmp_path / "cache"), "--grid_images", "4"]
    assert compare.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| dcnv4 |" in printed and "| conv |" in printed

    summary = json.loads((out / "comparison.json").read_text())
    assert [r["label"] for r in summary["runs"]] == ["dcnv4", "conv"]
    assert summary["num_images"] == 8 and summary["num_reference"] == 8 and summary["resolution"] == 16
    for r in summary["runs"]:
        assert np.isfinite(r["fid"]) and r["fid"] > 0 and np.isfinite(r["kid_mean"])
        assert r["parameters"] > 0 and r["gflops"] > 0
        assert r["train_images_per_s"] == 12.5 and r["sampling_images_per_s"] > 0 and r["train_steps"] == 10
        assert len(list((out / r["label"] / "images").glob("*.png"))) == 8
        assert r["fid_curve"] == [{"step": 10, "fid": r["fid"], "kid_mean": r["kid_mean"]}]
    dcnv4, conv = summary["runs"]
    assert dcnv4["parameters"] != conv["parameters"]
    assert "| dcnv4 |" in (out / "comparison.md").read_text()
    assert "Inception" in summary["inception_weights"] or "inception" in summary["inception_weights"]
    figure = Image.open(out / "comparison.png")
    assert figure.size[0] > figure.size[1]


def test_runs_on_different_data_are_refused(runs, tmp_path, capsys):
    dcnv4_run, conv_run, reference = runs
    other = Path(tmp_path / "other")
    other.mkdir()
    for name in ("pipeline", "train_stats.json"):
        (other / name).symlink_to(Path(conv_run) / name)
    (other / "config.yaml").write_text("model_type: conv\nmodel_size: tiny\nresolution: 32\n")
    assert compare.main([dcnv4_run, str(other), "--output_dir", str(tmp_path / "x"), "--reference", reference]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: runs differ in resolution") and err.count("\n") == 1


def test_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert compare.main([str(tmp_path), str(tmp_path), "--output_dir", str(tmp_path / "x")]) == 2
    assert "has no config.yaml" in capsys.readouterr().err
