"""VAE building, loading (local and offline hub), train_vae.py end to end with resume, the built-in VAE."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image

from unet_dcnv4 import vae as vae_module
from unet_dcnv4.vae import VAETrainConfig, build_small_vae, builtin_vae, load_vae, small_vae_config

_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "train_vae.py")
_spec = importlib.util.spec_from_file_location("train_vae", _SCRIPT)
train_vae = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_vae)

TINY = "--resolution 16 --base_channels 8 --batch_size 4 --num_holdout 4 --lr_warmup_steps 0".split()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(24):
        base = rng.integers(0, 256, (1, 1, 3))
        image = np.clip(base + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / f"{i:02d}.png")
    return str(root)


@pytest.mark.parametrize("factor", [1, 4, 8])
def test_small_vae_shapes(factor):
    vae = build_small_vae(resolution=16, downsample_factor=factor, base_channels=8, latent_channels=3)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        assert z.shape == (2, 3, 16 // factor, 16 // factor)
        assert vae.decode(z).sample.shape == (2, 3, 16, 16)


def test_small_vae_config_errors():
    with pytest.raises(ValueError, match="downsample_factor"):
        small_vae_config(downsample_factor=3)
    with pytest.raises(ValueError, match="base_channels"):
        small_vae_config(base_channels=12)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = build_small_vae(resolution=16, base_channels=8)
    vae.save_pretrained(tmp_path / "vae")
    for path in (str(tmp_path / "vae"), str(tmp_path)):  # the folder itself, or one with vae/ inside
        loaded = load_vae(path)
        assert loaded.config.block_out_channels == vae.config.block_out_channels
        for (name, a), (_, b) in zip(vae.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(vae(x).sample, loaded(x).sample)
    assert load_vae(str(tmp_path), torch_dtype=torch.float16).dtype == torch.float16


def test_load_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(OSError, match="HF_HUB_OFFLINE.*local folder"):
        load_vae("stabilityai/sd-vae-ft-mse")
    with pytest.raises(ValueError, match="not a folder holding a VAE"):
        load_vae("./no-such-folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        load_vae(str(tmp_path / "empty"))


def test_a_train_vae_run_is_named_with_the_folder_to_pass(tmp_path):
    """Its run folder loads (the VAE is in vae/); its checkpoints and an unfinished run say which folder to pass."""
    from unet_dcnv4 import config
    from unet_dcnv4.training import read_checkpoint_state

    run = tmp_path / "vae_run"
    config.save_config(VAETrainConfig(output_dir=str(run)), run)
    checkpoint = run / "checkpoints" / "checkpoint-2"
    config.save_config(VAETrainConfig(output_dir=str(run)), checkpoint)
    (checkpoint / "training_state.json").write_text(json.dumps({"step": 2}))
    with pytest.raises(ValueError, match=r"is the output folder of a train_vae.py run, not a saved VAE: the run "
                                         r".* has not saved its VAE yet \(no vae/ folder\): finish it"):
        load_vae(str(run))
    with pytest.raises(ValueError, match="is a checkpoint of train_vae.py .*, not a saved VAE: the run .* has not"):
        load_vae(str(checkpoint))
    build_small_vae(resolution=16, base_channels=8).save_pretrained(run / "vae")
    assert load_vae(str(run)).config.block_out_channels == [8, 16, 32]
    for folder, what in ((checkpoint, "a checkpoint of train_vae.py"), (run / "checkpoints", "the checkpoints folder")):
        with pytest.raises(ValueError, match=f"{what}.*pass the run's vae/ folder, '{run / 'vae'}'"):
            load_vae(str(folder))
    loose = tmp_path / "loose"
    shutil.copytree(checkpoint, loose)
    with pytest.raises(ValueError, match="a checkpoint of train_vae.py .*: pass the vae/ folder of the run"):
        load_vae(str(loose))
    # Given to train_ldm.py's resume or sample.py, it is not read as a train_ldm.py config ("unknown key 'data'").
    with pytest.raises(ValueError, match="is a checkpoint of train_vae.py .*, not of train_ldm.py"):
        read_checkpoint_state(checkpoint)


def _weights(path):
    return load_vae(path).state_dict()


def test_train_vae_script_and_resume(folder, tmp_path):
    straight = str(tmp_path / "straight")
    metrics = train_vae.main(TINY + ["--data", folder, "--output_dir", straight, "--max_train_steps", "4"])
    for name in ("vae/config.json", "vae/diffusion_pytorch_model.safetensors", "reconstructions.png", "metrics.json"):
        assert os.path.isfile(os.path.join(straight, name)), name
    with open(os.path.join(straight, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["psnr_db"] == metrics["psnr_db"] and np.isfinite(saved["psnr_db"]) and saved["steps"] == 4
    assert saved["num_holdout"] == 2  # a tenth of 24 images
    vae = load_vae(straight)
    assert vae.config.scaling_factor == pytest.approx(saved["scaling_factor"])
    assert vae.config.latent_channels == 4 and vae.config.block_out_channels == [8, 16, 32]
    assert Image.open(os.path.join(straight, "reconstructions.png")).size[0] > 16

    resumed = str(tmp_path / "resumed")
    first_half = ["--max_train_steps", "2", "--checkpointing_steps", "2"]
    train_vae.main(TINY + ["--data", folder, "--output_dir", resumed] + first_half)
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["checkpoint-2"]
    # Saved like train_ldm's checkpoints: complete only with its state file, the resolved config inside, and an
    # unfinished save (a `.tmp` folder, here one whose weights are missing) is never resumed from.
    saved = os.path.join(resumed, "checkpoints", "checkpoint-2")
    assert json.load(open(os.path.join(saved, "training_state.json"))) == {"step": 2}
    assert "max_train_steps: 2" in open(os.path.join(saved, "config.yaml")).read()
    assert "max_train_steps: 2" in open(os.path.join(resumed, "config.yaml")).read()
    unfinished = os.path.join(resumed, "checkpoints", "checkpoint-3.tmp")
    shutil.copytree(saved, unfinished)
    os.remove(os.path.join(unfinished, "model.safetensors"))
    second_half = ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"]
    train_vae.main(TINY + ["--data", folder, "--output_dir", resumed] + second_half)
    a, b = _weights(straight), _weights(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_train_vae_config_file_overrides_and_dry_run(tmp_path, capsys):
    (tmp_path / "vae.yaml").write_text("resolution: 16\nloss: l2\n")
    out = str(tmp_path / "out")
    argv = ["--config", str(tmp_path / "vae.yaml"), "--set", "seed=3", "--set", "loss=l1", "--batch_size", "2",
            "--output_dir", out, "--dry_run"]
    assert train_vae.main(argv) == {}
    printed = capsys.readouterr().out
    assert all(line in printed.splitlines() for line in ("resolution: 16", "loss: l1", "seed: 3", "batch_size: 2"))
    assert not os.path.exists(out)
    for argv, needle in [(["--set", "nope=1"], "unknown config key 'nope'"),
                         (["--set", "loss=l3"], "config key 'loss' must be one of l1, l2, got 'l3'"),
                         (["--mixed_precision", "fp8"], "config key 'mixed_precision' must be one of"),
                         (["--max_train_steps", "0"], "config key 'max_train_steps' must be >= 1, got 0")]:
        with pytest.raises(SystemExit) as exit_info:
            train_vae.main(argv + ["--output_dir", out, "--dry_run"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and needle in err[0], err


def test_train_vae_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_vae.main(["--data", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code != 0 and "--data must be 'builtin' or a folder" in capsys.readouterr().err
    (tmp_path / "few").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "few" / "one.png")
    with pytest.raises(SystemExit) as exit_info:
        train_vae.main(["--data", str(tmp_path / "few"), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "at least 10 images" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:skipped 1 unreadable image:UserWarning")
def test_train_vae_corrupt_image_stops_or_is_skipped(folder, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(folder, images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    base = TINY + ["--data", str(images), "--max_train_steps", "1"]
    with pytest.raises(SystemExit) as exit_info:
        train_vae.main(base + ["--output_dir", str(tmp_path / "stop")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train_vae.py")]  # after the progress bar
    assert exit_info.value.code == 2 and len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert lines[0].startswith("train_vae.py: error: ") and "broken.png" in lines[0] and "--skip_corrupt" in lines[0]

    metrics = train_vae.main(base + ["--output_dir", str(tmp_path / "skip"), "--skip_corrupt"])
    assert metrics["skipped_images"] == [str(images / "broken.png")] and metrics["num_skipped_images"] == 1
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().out
    with open(tmp_path / "skip" / "metrics.json") as f:
        assert json.load(f)["skipped_images"] == metrics["skipped_images"]


def test_train_vae_warms_up_once_per_step_whatever_the_process_count(folder, tmp_path, monkeypatch):
    """Accelerate steps a prepared scheduler once per process per step; train_vae's must step once per step.

    Accelerate's scheduler wrapper is made to see two processes, as on a two-process launch.
    """
    import accelerate.scheduler

    monkeypatch.setattr(accelerate.scheduler, "AcceleratorState", lambda: types.SimpleNamespace(num_processes=2))
    argv = TINY[:-2] + ["--data", folder, "--output_dir", str(tmp_path), "--max_train_steps", "3",
                        "--lr_warmup_steps", "10", "--learning_rate", "0.001"]
    metrics = train_vae.main(argv)
    assert metrics["learning_rate"] == pytest.approx(0.001 * 3 / 10)


def test_builtin_vae_trains_once(tmp_path, monkeypatch):
    config = VAETrainConfig(resolution=16, builtin_size=40, base_channels=8, batch_size=4, max_train_steps=2,
                            num_holdout=4, lr_warmup_steps=0)
    path = builtin_vae(cache_dir=str(tmp_path), config=config)
    assert os.path.isfile(os.path.join(path, "config.json")) and path.startswith(str(tmp_path))
    assert load_vae(path).config.latent_channels == 4

    def no_training(*args, **kwargs):
        raise AssertionError("the cached built-in VAE was trained again")

    monkeypatch.setattr(vae_module.subprocess, "run", no_training)
    assert builtin_vae(cache_dir=str(tmp_path), config=config) == path
    other = VAETrainConfig(**{**config.__dict__, "seed": 1})
    with pytest.raises(AssertionError, match="trained again"):
        builtin_vae(cache_dir=str(tmp_path), config=other)  # a new config is a new cache entry
