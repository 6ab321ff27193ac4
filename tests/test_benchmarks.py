"""The benchmark scripts run on the CPU at small sizes, and their GPU-only part (the CUDA table) formats
what it should."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from unet_dcnv4.modules import DCNv4Conv2d

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_op = _load("bench_op")
bench_unet = _load("bench_unet")


def test_bench_op_on_cpu_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "op.json"
    assert bench_op.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["err_fwd"] < 1e-5 and r["fwd_ms"] > 0 and r["bwd_ms"] > 0 for r in rows)
    assert "speedup" in capsys.readouterr().out


def test_bench_op_offset_std_sets_the_offsets_and_names_its_rows(tmp_path, capsys):
    value, om = bench_op.make_inputs((1, 4, 5, 8, 2), torch.float32, "cpu", offset_std=0.0)
    used = om[..., : 3 * 2 * 9].view(1, 4, 5, 2, 27)
    assert (used[..., :18] == 0).all() and (used[..., 18:] != 0).all()  # offsets zero, masks kept
    _, om2 = bench_op.make_inputs((1, 4, 5, 8, 2), torch.float32, "cpu", offset_std=2.0)
    assert 1.5 < om2[..., :54].view(1, 4, 5, 2, 27)[..., :18].std() < 2.5
    out = tmp_path / "op.json"
    assert bench_op.main(["--device", "cpu", "--quick", "--offset_std", "0", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["offset_std"] for r in rows] == [0.0, 2.0]
    printed = capsys.readouterr().out
    assert " s0 " in printed and printed.count(" s0 ") == 1
    assert bench_op.main(["--device", "cpu", "--quick", "--offset_std", "-1"]) == 2
    assert "--offset_std must be >= 0" in capsys.readouterr().err


def test_compare_builds_puts_each_builds_times_side_by_side(tmp_path, capsys):
    compare_builds = _load("compare_builds")

    def row(std, fwd, bwd, dtype="float32"):
        return {"N": 64, "H": 32, "W": 32, "C": 256, "G": 16, "dtype": dtype, "offset_std": std, "err_fwd": 1e-7,
                "fwd_ms": fwd, "bwd_ms": bwd, "bwd_tiled_ms": 2 * bwd, "floor_fwd_ms": 0.05, "floor_bwd_ms": 0.1}

    for build, rows in {"default": [row(2.0, 0.10, 0.40), row(0.0, 0.09, 0.30)],
                        "before": [row(2.0, 0.20, 0.50), row(0.0, 0.18, 0.45), row(2.0, 0.3, 0.6, "bfloat16")],
                        "skip0": [row(2.0, 0.11, 0.41), row(0.0, 0.10, 0.15)]}.items():
        (tmp_path / f"bench_{build}.json").write_text(json.dumps({"env": {}, "rows": rows}))
    assert compare_builds.main([str(tmp_path), "default", "before", "skip0", "wide"]) == 0
    captured = capsys.readouterr()
    assert "no bench_<build>.json for ['wide']" in captured.err
    lines = captured.out.splitlines()
    forward = lines[lines.index("forward, ms") + 2: lines.index("forward, ms") + 4]
    assert forward[0].split(" | ") == ["64,32,32,256,16", "float32", "2", "0.1000", "0.2000", "0.1100", "default",
                                       "0.50", "2.00"]
    backward = lines[lines.index("backward (atomic kernel), ms") + 3].split(" | ")
    assert backward[2] == "0" and backward[-3:] == ["skip0", "0.67", "3.00"]
    assert "left out: 1 rows not measured by every build" in captured.out  # bf16: the before build only
    assert compare_builds.main([str(tmp_path / "absent"), "default"]) == 2


def test_bench_op_cuda_table_lists_both_backward_kernels():
    row = {"N": 64, "H": 56, "W": 56, "C": 64, "G": 4, "dtype": "float32", "floor_fwd_ms": 0.064,
           "floor_bwd_ms": 0.111, "fwd_ms": 0.096, "bwd_ms": 0.444, "bwd_tiled_ms": 0.222, "conv3x3_fwd_ms": 0.2,
           "dwconv3x3_fwd_ms": 0.05, "anchor_fwd_x_floor": 3.4, "anchor_bwd_x_floor": 10.5}
    lines = bench_op.table("cuda", [row]).splitlines()
    by_dir = {line.split()[2]: line.split() for line in lines[1:4]}
    assert set(by_dir) == {"fwd", "bwd", "bwd-t"}
    assert by_dir["fwd"][4] == "1.50" and by_dir["bwd"][4] == "4.00" and by_dir["bwd-t"][4] == "2.00"


@pytest.mark.filterwarnings("ignore:A saved_tensors_hooks context:FutureWarning")
def test_bench_unet_on_cpu_reports_memory_and_ratios(tmp_path, capsys):
    out = tmp_path / "unet.json"
    assert bench_unet.main(["--device", "cpu", "--skip", "layers", "--size", "tiny", "--sample_size", "8",
                            "--unet_batch", "2", "--dtypes", "bf16", "--iters", "1", "--warmup", "0",
                            "--profile", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    rows = {r["model"]: r for r in results if r["kind"] == "unet"}
    assert set(rows) == {"dcnv4", "dcnv4_rv", "dcnv4_mp", "conv"}
    assert abs(rows["dcnv4_mp"]["parameters"] / rows["conv"]["parameters"] - 1) <= 0.05
    assert all(r["saved_mib"] > 0 and r["state_mib"] > 0 and r["peak_mib"] is None for r in rows.values())
    assert rows["dcnv4_rv"]["saved_mib"] < rows["dcnv4"]["saved_mib"]
    assert rows["dcnv4_rv"]["parameters"] == rows["dcnv4"]["parameters"]
    printed = capsys.readouterr().out
    assert "dcnv4/conv bf16: img/s" in printed and "dcnv4_rv/conv bf16: img/s" in printed
    assert "dcnv4_mp/conv bf16: img/s" in printed
    # --profile: each U-Net's step by group; only the DCNv4 U-Nets have DCNv4 layers (their full-resolution 3x3
    # convs stay convs by default, so both arms have convolutions).
    profiles = {r["model"]: r["ms"] for r in results if r["kind"] == "profile"}
    assert set(profiles) == set(rows)
    conv = profiles.pop("conv")
    assert conv["convolutions"] > 0 and conv["optimizer"] > 0 and conv["everything else"] > 0
    assert conv["DCNv4 op kernels"] == conv["DCNv4 projections"] == conv["DCNv4 layers, other"] == 0
    for groups in profiles.values():
        assert groups["DCNv4 op kernels"] > 0 and groups["DCNv4 projections"] > 0
        assert groups["DCNv4 layers, other"] > 0 and groups["convolutions"] > 0
    assert "bf16  DCNv4 op kernels" in printed and "dcnv4-conv bf16: " in printed


class _Event:
    def __init__(self, name, parent=None):
        self.name, self.cpu_parent = name, parent


def test_profile_groups_take_the_innermost_named_event():
    layer = _Event("unet_dcnv4::dcnv4_layer_backward", _Event("autograd::engine::evaluate_function: x"))
    product = _Event("aten::baddbmm", layer)
    group = bench_unet._profile_group
    assert group(_Event("unet_dcnv4::dcnv4_backward", layer)) == "DCNv4 op kernels"
    assert group(product) == "DCNv4 projections"
    assert group(_Event("aten::copy_", product)) == "DCNv4 projections"  # the bias copy of a product
    assert group(_Event("aten::copy_", layer)) == "DCNv4 layers, other"
    assert group(layer) == "DCNv4 layers, other"
    assert group(_Event("aten::mm")) == "everything else"  # a product outside the layers (a Linear)
    assert group(_Event("aten::mkldnn_convolution", _Event("aten::convolution"))) == "convolutions"
    assert group(_Event("aten::_fused_adamw_", _Event("Optimizer.step#AdamW.step"))) == "optimizer"


@pytest.mark.parametrize("argv, message", [
    (["--profile", "-1"], "--profile must be a number of steps >= 0"),
    (["--profile", "2", "--skip", "unet"], "--skip unet leaves out"),
    (["--profile", "2", "--device", "meta"], "--profile times the CPU"),
])
def test_bench_unet_profile_refuses_what_it_cannot_profile(argv, message, capsys):
    assert bench_unet.main(argv) == 2
    assert message in capsys.readouterr().err


def test_saved_mib_counts_what_autograd_keeps():
    """A 3x3 conv keeps its input; DCNv4Conv2d keeps its input (an NCHW one as it is, not an NHWC copy),
    value, offset_mask and the op's output."""
    x = torch.randn(2, 32, 16, 16, requires_grad=True)
    conv = torch.nn.Conv2d(32, 32, 3, padding=1)
    dcn = DCNv4Conv2d(32, 32)
    conv_mib = bench_unet.saved_mib(lambda: conv(x), exclude=[*conv.parameters()])
    assert conv_mib == pytest.approx(x.numel() * 4 / 2**20)
    dcn_mib = bench_unet.saved_mib(lambda: dcn(x), exclude=[x, *dcn.parameters()])
    pixels = 2 * 16 * 16
    expected = pixels * (32 + dcn.offset_mask.out_features + 32) * 4 / 2**20
    assert dcn_mib == pytest.approx(expected)


def test_time_interleaved_alternates_the_functions_and_batches_short_calls():
    import time

    from unet_dcnv4.timing import time_interleaved

    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.004)

    def fast():
        calls.append("fast")

    ms = time_interleaved({"slow": slow, "fast": fast}, warmup=1, iters=3)
    # Warm-up and sizing call of each, then one call of each per round, in turn.
    assert calls == ["slow", "slow", "fast", "fast"] + ["slow", "fast"] * 3
    assert ms["slow"] >= 4.0 > ms["fast"]
    calls.clear()
    time_interleaved({"slow": slow}, warmup=0, iters=2, min_ms=20.0)
    assert 1 + 2 * 2 <= len(calls) <= 1 + 2 * 6  # batches of about 20 ms of 4 ms calls (fewer when the sleeps overrun)
    with pytest.raises(ValueError, match="iters must be >= 1"):
        time_interleaved({"fast": fast}, iters=0)


def test_resume_check_compares_against_the_run_to_run_spread():
    """A resumed run passes when it is as close to the straight run as a rerun is; with bit-identical
    reruns it must be bit-identical too."""
    check = _load("resume_check")
    straight = {"model.w": torch.tensor([1.0, 2.0]), "ema.0": torch.tensor([3.0])}
    rerun = {"model.w": torch.tensor([1.0, 2.001]), "ema.0": torch.tensor([3.0])}
    far = {"model.w": torch.tensor([1.5, 2.0]), "ema.0": torch.tensor([3.0])}
    spread = check.distance(straight, rerun, "model.")
    assert spread["different_tensors"] == 1 and spread["max_abs"] == pytest.approx(0.001, rel=1e-3)
    assert check.resume_ok(spread, check.distance(straight, rerun, "model."), tolerance=4.0)
    assert not check.resume_ok(spread, check.distance(straight, far, "model."), tolerance=4.0)
    same = check.distance(straight, straight, "ema.")
    assert same["rel_l2"] == 0 and check.resume_ok(same, same, 4.0)
    assert not check.resume_ok(same, check.distance(straight, rerun, "model."), 4.0)
    with pytest.raises(ValueError, match="different tensors"):
        check.distance(straight, {"model.w": straight["model.w"]}, "model.")


def _write_pngs(folder: Path, images) -> None:
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / "images" / f"{i:06d}.png")


def _gradients(n: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 32)[None, :, None]
    return [(a * (1 - ramp) + b * ramp + np.zeros((32, 1, 1))).astype(np.uint8)
            for a, b in (rng.uniform(0, 255, (2, 3)) for _ in range(n))]


def test_compare_samples_measures_two_folders_and_refuses_unlike_ones(tmp_path, capsys):
    import numpy as np

    compare = _load("compare_samples")
    close, far, reference = tmp_path / "close", tmp_path / "far", tmp_path / "reference"
    _write_pngs(close, _gradients(12, seed=1))
    _write_pngs(far, [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(12)])
    _write_pngs(reference, _gradients(12, seed=2))
    manifest = {"sampler": "ddim", "num_inference_steps": 50, "seed": 0, "precision": "bf16", "use_ema": None,
                "class_labels": None, "class_mix": None, "guidance_scale": 1.0}
    for folder in (close, far):
        (folder / "manifest.json").write_text(json.dumps(manifest))
    (close / "grid.png").write_bytes((close / "images" / "000000.png").read_bytes())  # not a sample

    out = tmp_path / "report"
    argv = [str(close), str(far), "--labels", "DCNv4", "conv", "--reference", str(reference / "images"),
            "--output_dir", str(out), "--jackknife_groups", "4", "--cache_dir", str(tmp_path / "cache")]
    assert compare.main(argv) == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert [a["num_images"] for a in summary["arms"]] == [12, 12]
    difference = summary["fid_difference"]
    low, high = difference["ci95"]
    assert summary["arms"][0]["fid"] < summary["arms"][1]["fid"] and low <= difference["value"] <= high
    assert high < 0 and summary["verdict"] == "DCNv4 lower FID"
    assert difference["df"] > 0 and 0 <= difference["p_value"] < 0.05 and difference["jackknife_groups"] == 4
    assert [a["interval_covers"] for a in summary["arms"]] == ["images", "images"]
    text = (out / "comparison.md").read_text()
    assert "DCNv4 lower FID" in text and "image noise only" in text

    # A reference given as statistics only (mu and sigma, no activations): the same FIDs, and an interval.
    from unet_dcnv4 import metrics

    saved, stats_only = tmp_path / "saved.npz", tmp_path / "stats_only.npz"
    assert metrics.main([str(reference / "images"), "--save_stats", str(saved), "--cache_dir",
                         str(tmp_path / "cache")]) == 0
    np.savez(stats_only, **{k: v for k, v in np.load(saved).items() if k in ("mu", "sigma")})
    out_npz = tmp_path / "report_npz"
    assert compare.main([*argv[:5], "--reference", str(stats_only), "--output_dir", str(out_npz), *argv[9:], "--resolution",
                         "32"]) == 0
    from_stats = json.loads((out_npz / "comparison.json").read_text())
    for arm, folder_arm in zip(from_stats["arms"], summary["arms"]):
        assert arm["fid"] == pytest.approx(folder_arm["fid"], rel=1e-6)
    assert from_stats["fid_difference"]["ci95"][1] < 0 and from_stats["num_reference"] is None
    assert [a["kid_mean"] for a in from_stats["arms"]] == [None, None]
    text = (out_npz / "comparison.md").read_text()
    assert "| n/a |" in text and "Against the Inception statistics in" in text  # KID needs activations

    for key, value in (("seed", 1), ("use_ema", True), ("class_labels", [0, 1])):
        (far / "manifest.json").write_text(json.dumps({**manifest, key: value}))
        assert compare.main(argv) == 2
        err = capsys.readouterr().err
        assert f"{key} ({manifest[key]!r} vs {value!r})" in err and err.count("\n") == 1
    (far / "manifest.json").unlink()
    assert compare.main(argv) == 2
    assert "is not a sample folder" in capsys.readouterr().err
    assert compare.main([str(close), str(close), *argv[2:]]) == 2
    assert "given twice" in capsys.readouterr().err


def _run_on_images(tmp_path: Path, count: int) -> tuple[str, str]:
    """A finished run (untrained tiny pipeline) whose training data is a folder of `count` random 16x16 images."""
    import numpy as np
    from PIL import Image

    from pipeline_cases import tiny_pipeline
    from unet_dcnv4.data import build_image_dataset

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    run = tmp_path / "run"
    tiny_pipeline().save_pretrained(run / "pipeline")
    (run / "config.yaml").write_text(f"model_type: conv\nmodel_size: tiny\nresolution: 16\ndata_source: {images}\n")
    fingerprint = build_image_dataset(str(images), resolution=16).fingerprint()
    (run / "train_stats.json").write_text(json.dumps({"steps": 1, "data_fingerprint": fingerprint,
                                                      "data_source_path": str(images)}))
    return str(run), str(images)


def test_fid_floor_measures_drawn_training_images_and_their_reconstructions(tmp_path, capsys):
    fid_floor = _load("fid_floor")
    run, _ = _run_on_images(tmp_path, 6)
    cache = str(tmp_path / "cache")
    # Every training image drawn: the same set as the reference, FID 0 up to rounding; the untrained VAE's
    # reconstructions are far from it.
    whole = fid_floor.floor(run, num_images=6, draws=1, cache_dir=cache, work_dir=str(tmp_path / "drawn"))
    assert whole["draws"][0]["fid_real"] == pytest.approx(0.0, abs=1e-3) and whole["draws"][0]["fid_recon"] > 1.0
    assert len(list((tmp_path / "drawn" / "draw0" / "recon").glob("*.png"))) == 6
    # Four of six: the draws differ, and a draw's FID is above the whole set's.
    out = tmp_path / "floor.json"
    assert fid_floor.main([run, "--num_images", "4", "--draws", "2", "--cache_dir", cache, "--output", str(out)]) == 0
    part = json.loads(out.read_text())
    assert part["draws"][0]["fid_real"] != part["draws"][1]["fid_real"] and part["fid_real_mean"] > 1e-3
    assert part["num_images"] == 4 and "training images FID" in capsys.readouterr().out
    assert fid_floor.main([run, "--num_images", "7", "--cache_dir", cache]) == 2
    assert "num_images must be between 3 and the 6 training images, got 7" in capsys.readouterr().err
