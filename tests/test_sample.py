"""sample.py end to end on a tiny saved pipeline: file count, resume, the grid/npz, and a two-process split."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_cases import tiny_pipeline
from unet_dcnv4 import sampling

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sample.py"
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402  (a top-level script, importable once the repository root is on the path)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline")
    tiny_pipeline(num_class_embeds=3).save_pretrained(path)
    return str(path)


def _args(pipeline_dir, out, n, *extra):
    return [pipeline_dir, "--output_dir", str(out), "--num_images", str(n), "--num_inference_steps", "2",
            "--batch_size", "3", "--seed", "7", *extra]


def _pixels(out, i):
    return np.asarray(Image.open(Path(out) / "images" / f"{i:06d}.png"), dtype=np.int16)


def test_writes_n_files_grid_npz_and_resumes(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert sample.main(_args(pipeline_dir, out, 5, "--npz")) == 0
    files = sorted(os.listdir(out / "images"))
    assert files == [f"{i:06d}.png" for i in range(5)]
    assert Image.open(out / "images" / files[0]).size == (16, 16)
    assert Image.open(out / "grid.png").size == (3 * 16, 2 * 16)
    npz = np.load(out / "samples.npz")["arr_0"]
    assert npz.shape == (5, 16, 16, 3) and npz.dtype == np.uint8
    np.testing.assert_array_equal(npz[3], _pixels(out, 3))
    stats = json.loads((out / "sample_stats.json").read_text())
    assert stats["num_images"] == 5 and stats["sampler"] == "ddim" and stats["images_per_s"] > 0

    # Resume: delete two images, ask for seven; only the missing and the new ones are produced.
    before = {i: (out / "images" / f"{i:06d}.png").stat().st_mtime_ns for i in (0, 2, 4)}
    kept = _pixels(out, 0)
    os.remove(out / "images" / "000001.png")
    os.remove(out / "images" / "000003.png")
    capsys.readouterr()
    assert sample.main(_args(pipeline_dir, out, 7)) == 0
    assert "wrote 4 images, skipped 3" in capsys.readouterr().out
    assert len(os.listdir(out / "images")) == 7
    assert {i: (out / "images" / f"{i:06d}.png").stat().st_mtime_ns for i in (0, 2, 4)} == before
    np.testing.assert_array_equal(_pixels(out, 0), kept)
    np.testing.assert_array_equal(_pixels(out, 3), npz[3])


def test_image_depends_on_index_and_seed_not_on_batching(pipeline_dir, tmp_path):
    assert sample.main(_args(pipeline_dir, tmp_path / "a", 4)) == 0
    assert sample.main(_args(pipeline_dir, tmp_path / "b", 4, "--batch_size", "1")) == 0
    assert sample.main(_args(pipeline_dir, tmp_path / "c", 1, "--seed", "8")) == 0
    for i in range(4):
        # Batched and single-image runs may differ in the last float bit, so allow one grey level.
        assert np.abs(_pixels(tmp_path / "a", i) - _pixels(tmp_path / "b", i)).max() <= 1
    assert np.abs(_pixels(tmp_path / "a", 0) - _pixels(tmp_path / "a", 1)).max() > 8
    assert np.abs(_pixels(tmp_path / "a", 0) - _pixels(tmp_path / "c", 0)).max() > 8


def test_class_labels_and_samplers(pipeline_dir, tmp_path):
    assert sample.main(_args(pipeline_dir, tmp_path / "one", 2, "--class_labels", "2", "--sampler", "euler")) == 0
    assert sample.main(_args(pipeline_dir, tmp_path / "all", 2, "--sampler", "euler")) == 0
    # Index 0 is class 0 by default and class 2 when asked: the same noise, another class, another image.
    assert np.abs(_pixels(tmp_path / "one", 0) - _pixels(tmp_path / "all", 0)).max() > 8
    # Index 1 is class 1 by default; asked for class 2 only, it matches index 1 of a run of class 2 alone.
    assert sample.main(_args(pipeline_dir, tmp_path / "two", 2, "--class_labels", "2", "--sampler", "euler",
                             "--seed", "7")) == 0
    np.testing.assert_array_equal(_pixels(tmp_path / "two", 1), _pixels(tmp_path / "one", 1))
    assert sampling.index_seed(7, 1) != sampling.index_seed(7, 2) != sampling.index_seed(8, 1)
    assert sampling.class_label_for(5, None, 3) == 2 and sampling.class_label_for(5, [4, 1], 6) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--class_labels", "x"], "--class_labels"),
        (["--class_labels", "3"], r"lie in \[0, 3\)"),
        (["--num_inference_steps", "0"], "num_inference_steps"),
    ],
)
def test_user_mistakes_exit_with_one_line(pipeline_dir, tmp_path, capsys, extra, message):
    assert sample.main(_args(pipeline_dir, tmp_path / "x", 2, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err)


def test_missing_source_is_a_one_line_error(tmp_path, capsys):
    assert sample.main([str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "neither a pipeline folder nor a training checkpoint" in capsys.readouterr().err


def test_two_processes_split_the_indices_without_overlap(pipeline_dir, tmp_path):
    out = tmp_path / "split"
    # accelerate runs several CPU processes through its multi-GPU launcher (torchrun) when told to use the CPU.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(SCRIPT), *_args(pipeline_dir, out, 5)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "process 0: wrote 3 images" in result.stdout and "process 1: wrote 2 images" in result.stdout
    assert sorted(os.listdir(out / "images")) == [f"{i:06d}.png" for i in range(5)]
    assert sample.main(_args(pipeline_dir, tmp_path / "single", 5)) == 0
    for i in range(5):
        assert np.abs(_pixels(out, i) - _pixels(tmp_path / "single", i)).max() <= 1


def test_a_folder_is_reused_only_for_the_same_model_and_settings(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert sample.main(_args(pipeline_dir, out, 3)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["sampler"] == "ddim" and manifest["num_inference_steps"] == 2
    assert manifest["precision"] == "no" and manifest["weights"].startswith("unet:")
    before = (out / "images" / "000000.png").stat().st_mtime_ns
    for extra, key in ((["--seed", "8"], "seed (7, now 8)"), (["--sampler", "euler"], "sampler ('ddim', now 'euler')"),
                       (["--num_inference_steps", "3"], "num_inference_steps (2, now 3)")):
        capsys.readouterr()
        assert sample.main(_args(pipeline_dir, out, 3, *extra)) == 2
        err = capsys.readouterr().err
        assert key in err and "--overwrite" in err and err.count("\n") == 1
    other = tmp_path / "other_pipeline"
    tiny_pipeline(num_class_embeds=3, seed=1).save_pretrained(other)
    assert sample.main([str(other), *_args(pipeline_dir, out, 3)[1:]]) == 2
    assert "weights (" in capsys.readouterr().err
    assert (out / "images" / "000000.png").stat().st_mtime_ns == before
    assert sample.main(_args(pipeline_dir, out, 3, "--seed", "8", "--overwrite")) == 0
    assert json.loads((out / "manifest.json").read_text())["seed"] == 8
    assert (out / "images" / "000000.png").stat().st_mtime_ns != before


def test_images_without_a_manifest_are_not_reused(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "images").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(out / "images" / "000000.png")
    assert sample.main(_args(pipeline_dir, out, 2)) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_temporary_files_are_hidden_and_never_listed(pipeline_dir, tmp_path, monkeypatch):
    from unet_dcnv4.data import list_image_files

    seen = []
    replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        listed = list_image_files(os.path.dirname(dst))
        assert os.path.basename(src) not in listed
        replace(src, dst)

    monkeypatch.setattr(sampling.os, "replace", spy)
    assert sample.main(_args(pipeline_dir, tmp_path / "run", 2)) == 0
    written = [name for name in seen if ".png" in name]
    assert len(written) == 2 and all(name.startswith(".") and name.endswith(".tmp") for name in written)


def test_fp16_keeps_a_force_upcast_vae_in_fp32():
    pipe = tiny_pipeline()
    pipe.vae.register_to_config(force_upcast=True)
    sampling.to_precision(pipe, "cpu", "fp16")
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    pipe.vae.register_to_config(force_upcast=False)
    sampling.to_precision(pipe, "cpu", "fp16")
    assert pipe.vae.dtype == torch.float16
    sampling.to_precision(pipe, "cpu", "bf16")
    assert pipe.unet.dtype == pipe.vae.dtype == torch.bfloat16


def test_guidance_is_recorded_and_refused_without_a_null_class(pipeline_dir, tmp_path, capsys):
    assert sample.main(_args(pipeline_dir, tmp_path / "g", 2, "--guidance_scale", "2")) == 2
    err = capsys.readouterr().err
    assert "needs a class-conditional model trained with label dropout" in err and err.count("\n") == 1
    guided = tmp_path / "guided_pipeline"
    tiny_pipeline(num_class_embeds=3, null_class=True).save_pretrained(guided)
    assert sample.main([str(guided), *_args(pipeline_dir, tmp_path / "g", 2, "--guidance_scale", "2")[1:]]) == 0
    assert json.loads((tmp_path / "g" / "manifest.json").read_text())["guidance_scale"] == 2.0


def test_class_mix_follows_the_training_frequencies_or_is_uniform():
    pipe = tiny_pipeline(num_class_embeds=3, class_counts=[8, 0, 2])
    counts = sampling.class_counts_for(pipe, "data")
    labels = [sampling.class_label_for(i, None, 3, seed=0, class_counts=counts) for i in range(2000)]
    assert labels.count(1) == 0 and 0.75 < labels.count(0) / 2000 < 0.85
    assert labels == [sampling.class_label_for(i, None, 3, seed=0, class_counts=counts) for i in range(2000)]
    assert sampling.class_counts_for(pipe, "uniform") is None
    assert [sampling.class_label_for(i, None, 3) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    manifest = sampling.sample_manifest(pipe, "x", "ddim", 2, 0, "no", None, class_mix="data")
    assert manifest["class_mix"] == "data"
    assert sampling.sample_manifest(tiny_pipeline(num_class_embeds=3), "x", "ddim", 2, 0, "no", None)["class_mix"] \
        == "uniform"
    with pytest.raises(ValueError, match="class_mix must be one of"):
        sampling.class_counts_for(pipe, "balanced")
