"""End-to-end tests of train_ldm.py on tiny data: outputs, exact resume and the changes a resume records, atomic
checkpoints and outputs, a folder holding one run, errors, two processes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from unet_dcnv4 import sampling, training
from unet_dcnv4.ops import _layer_op
from unet_dcnv4.training import load_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_ldm  # noqa: E402  (a top-level script, importable once the repository root is on the path)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models gain nothing from more threads, and oversubscribed shared cores slow them down a hundredfold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny VAE saved with save_pretrained, 16 random 16x16 images in two class folders, a shared latent cache."""
    from unet_dcnv4.vae import build_small_vae

    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    build_small_vae(resolution=16, downsample_factor=4, base_channels=8).save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / "images" / label).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / label / f"{i}.png")
    return root


def args(assets: Path, output_dir: Path, steps: int, **sets) -> list[str]:
    """Command-line arguments of a tiny run: 4x4x4 latents, batch 4, the tiny U-Net, no sampling unless asked."""
    values = dict(vae=str(assets / "vae"), data_source=str(assets / "images"), resolution=16,
                  latent_cache_dir=str(assets / "latents"), train_batch_size=4, lr_warmup_steps=2,
                  log_every_steps=1, sample_every_steps=0, checkpoints_total_limit=None)
    values.update(sets)
    out = ["--output_dir", str(output_dir), "--max_train_steps", str(steps), "--checkpointing_steps", "3"]
    for key, value in values.items():
        out += ["--set", f"{key}={'null' if value is None else value}"]
    return out


def weights(checkpoint: Path) -> dict:
    """Model weights, EMA weights and optimizer state of a checkpoint folder."""
    out = {f"model.{k}": v for k, v in load_file(checkpoint / "model.safetensors").items()}
    ema = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
    out.update({f"ema.{i}": p for i, p in enumerate(ema["shadow_params"])})
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=False)["state"]
    out.update({f"adam.{i}.{k}": v for i, s in optimizer.items() for k, v in s.items()})
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def straight_run(assets, tmp_path_factory):
    """Six uninterrupted steps of the DCNv4 model with gradient accumulation over two epochs of data."""
    out = tmp_path_factory.mktemp("straight")
    assert train_ldm.main(args(assets, out, 6, gradient_accumulation_steps=2, sample_every_steps=6, num_samples=4,
                                sample_inference_steps=2)) == 0
    return out


def test_dcnv4_run_writes_everything(straight_run):
    from diffusers import DiffusionPipeline

    from unet_dcnv4.unet import DCNv4UNet2DModel

    stats = json.loads((straight_run / "train_stats.json").read_text())
    assert stats["steps"] == 6 and stats["model_type"] == "dcnv4"
    assert np.isfinite(stats["final_loss"]) and stats["images_per_s"] > 0 and stats["parameters"] > 0
    assert stats["wall_time_s"] > 0 and stats["peak_memory_mb"] > 0
    assert 0 < stats["train_seconds"] < stats["wall_time_s"]
    states = [json.loads((straight_run / "checkpoints" / f"checkpoint-{s}" / "training_state.json").read_text())
              for s in (3, 6)]
    assert 0 < states[0]["train_seconds"] < states[1]["train_seconds"] == stats["train_seconds"]
    assert states[0]["data_fingerprint"] == stats["data_fingerprint"] and len(stats["data_fingerprint"]) == 32
    # The data's folder, absolute, and the fingerprint compare.py checks it against.
    from unet_dcnv4 import comparison

    assert os.path.isabs(stats["data_source_path"]) and os.path.isdir(stats["data_source_path"])
    assert len(comparison.training_data(comparison.read_run(straight_run))) == 16
    assert load_config(straight_run / "config.yaml").gradient_accumulation_steps == 2
    # What ran is recorded: the op's implementation in the run's config and in the saved model's config.
    assert "dcnv4_impl: auto" in (straight_run / "config.yaml").read_text()
    unet_config = json.loads((straight_run / "pipeline" / "unet" / "config.json").read_text())
    assert (unet_config["impl"], unet_config["cuda_backward"]) == ("auto", "atomic")
    assert [s for s, _ in training.list_checkpoints(straight_run / "checkpoints")] == [3, 6]
    assert (straight_run / "checkpoints" / "checkpoint-6" / "config.yaml").is_file()
    grid = Image.open(straight_run / "samples" / "step-0000006.png")
    assert grid.size == (2 + 2 * 18, 2 + 2 * 18)  # 2x2 images of 16 px, 2 px padding
    assert list((straight_run / "logs").rglob("events.out.tfevents*"))

    pipe = DiffusionPipeline.from_pretrained(straight_run / "pipeline", trust_remote_code=True)
    assert isinstance(pipe.unet, DCNv4UNet2DModel)
    ema = torch.load(straight_run / "checkpoints" / "checkpoint-6" / "custom_checkpoint_0.pkl", weights_only=False)
    for p, shadow in zip(pipe.unet.parameters(), ema["shadow_params"]):
        assert torch.equal(p, shadow)
    scaling = json.loads((straight_run / "checkpoints" / "checkpoint-6" / "training_state.json").read_text())
    assert pipe.vae.config.scaling_factor == scaling["scaling_factor"]
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_dcnv4_statistics_follow_the_checkpoints(straight_run, tmp_path, capsys):
    from unet_dcnv4 import diagnostics

    output = tmp_path / "stats.json"
    assert diagnostics.main([str(straight_run), "--timesteps", "10", "900", "--num_latents", "4",
                             "--output", str(output)]) == 0
    rows = json.loads(output.read_text())
    assert sorted({(r["step"], r["timestep"]) for r in rows}) == [(3, 10), (3, 900), (6, 10), (6, 900)]
    assert all(r["train_seconds"] > 0 for r in rows)
    # Six steps of training have moved the offsets and masks away from the grid and the box filter.
    assert max(r["offset_mean"] for r in rows) > 0 and any(r["mask_sum_std"] > 1e-6 for r in rows)
    assert "| 6 | 900 | " in capsys.readouterr().out
    assert diagnostics.main([str(tmp_path), "--output", str(output)]) == 2
    assert "has no config.yaml" in capsys.readouterr().err


def test_pipeline_from_checkpoint(straight_run):
    pipe = sampling.pipeline_from_checkpoint(straight_run / "checkpoints" / "checkpoint-6")
    saved = load_file(straight_run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert_same(saved, {k: v.contiguous() for k, v in pipe.unet.state_dict().items()})
    raw = sampling.pipeline_from_checkpoint(straight_run / "checkpoints" / "checkpoint-6", use_ema=False)
    assert not torch.equal(next(raw.unet.parameters()), next(pipe.unet.parameters()))


def test_resume_is_exact(assets, straight_run, tmp_path):
    common = dict(gradient_accumulation_steps=2, sample_every_steps=6, num_samples=4, sample_inference_steps=2)
    assert train_ldm.main(args(assets, tmp_path, 3, **common)) == 0
    first = json.loads((tmp_path / "train_stats.json").read_text())["train_seconds"]
    assert train_ldm.main(args(assets, tmp_path, 6, **common) + ["--resume_from_checkpoint", "latest"]) == 0
    assert_same(weights(straight_run / "checkpoints" / "checkpoint-6"), weights(tmp_path / "checkpoints" / "checkpoint-6"))
    # Training seconds carry over a resume: the resumed run counts from where the first one stopped.
    assert json.loads((tmp_path / "train_stats.json").read_text())["train_seconds"] > first


def test_recompute_value_trains_the_same_weights(assets, straight_run, tmp_path, monkeypatch):
    """recompute_value trades memory for a matrix multiply; the weights it trains are the same bits."""
    import unet_dcnv4.modules

    recomputing = []

    def recording_layer(*a):  # the layer op's last argument is recompute_value
        recomputing.append(a[-1])
        return _layer_op(*a)

    monkeypatch.setattr(unet_dcnv4.modules, "_layer_op", recording_layer)
    common = dict(gradient_accumulation_steps=2, sample_every_steps=6, num_samples=4, sample_inference_steps=2)
    assert train_ldm.main(args(assets, tmp_path, 6, recompute_value=True, **common)) == 0
    assert any(recomputing), "the DCNv4 layers did not recompute"
    assert_same(weights(straight_run / "checkpoints" / "checkpoint-6"), weights(tmp_path / "checkpoints" / "checkpoint-6"))


def test_resume_refuses_a_different_model(assets, straight_run, capsys):
    before = (straight_run / "config.yaml").read_text()
    assert train_ldm.main(args(assets, straight_run, 8, model_type="conv") + ["--resume_from_checkpoint", "latest"]) == 2
    assert "model_type ('dcnv4', now 'conv')" in capsys.readouterr().err
    assert train_ldm.main(args(assets, straight_run, 8) + ["--resume_from_checkpoint", str(straight_run)]) == 2
    assert "is not a complete checkpoint folder" in capsys.readouterr().err
    assert (straight_run / "config.yaml").read_text() == before


@pytest.mark.parametrize("sets, needle", [
    (dict(seed=1), "seed (0, now 1)"),
    (dict(train_batch_size=2), "train_batch_size (4, now 2)"),
    (dict(gradient_accumulation_steps=1), "gradient_accumulation_steps (2, now 1)"),
    (dict(prediction_type="v_prediction"), "prediction_type ('epsilon', now 'v_prediction')"),
    (dict(beta_schedule="linear", num_train_timesteps=500), "num_train_timesteps (1000, now 500), beta_schedule"),
    (dict(flips=False), "flips (True, now False)"),
    (dict(skip_corrupt=True), "skip_corrupt (False, now True)"),
    (dict(latent_cache_dtype="float16"), "latent_cache_dtype ('float32', now 'float16')"),
    (dict(learning_rate=0.1), "learning_rate (0.0002, now 0.1)"),
])
def test_resume_refuses_changes_that_break_exact_resume(assets, straight_run, capsys, sets, needle):
    before = (straight_run / "config.yaml").read_text()
    common = dict(gradient_accumulation_steps=2, sample_every_steps=6, num_samples=4, sample_inference_steps=2)
    argv = args(assets, straight_run, 8, **{**common, **sets}) + ["--resume_from_checkpoint", "latest"]
    assert train_ldm.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err and "allow_resume_changes" in err, err
    assert (straight_run / "config.yaml").read_text() == before


def test_resume_refuses_a_checkpoint_of_the_former_data_order(assets, straight_run, tmp_path, capsys):
    """Checkpoints that record no `random_streams` were trained on `seed + epoch` data orders."""
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(straight_run / "checkpoints" / "checkpoint-3", checkpoint)
    state = json.loads((checkpoint / "training_state.json").read_text())
    assert state.pop("random_streams") == training.RANDOM_STREAMS
    (checkpoint / "training_state.json").write_text(json.dumps(state))
    common = dict(gradient_accumulation_steps=2, sample_every_steps=6, num_samples=4, sample_inference_steps=2)
    assert train_ldm.main(args(assets, tmp_path, 6, **common) + ["--resume_from_checkpoint", str(checkpoint)]) == 2
    assert f"random_streams (0, now {training.RANDOM_STREAMS})" in capsys.readouterr().err


def test_allowed_resume_changes_are_applied_and_recorded(assets, tmp_path, capsys):
    assert train_ldm.main(args(assets, tmp_path, 3, model_type="conv")) == 0
    changed = dict(model_type="conv", learning_rate=0.01, ema_power=0.5, adam_weight_decay=0.1)
    argv = args(assets, tmp_path, 4, **changed) + ["--resume_from_checkpoint", "latest"]
    assert train_ldm.main(argv) == 2
    assert train_ldm.main(argv + ["--set", "allow_resume_changes=true"]) == 0
    assert "learning_rate (0.0002, now 0.01)" in capsys.readouterr().out
    stats = json.loads((tmp_path / "train_stats.json").read_text())
    assert stats["allow_resume_changes"] is True
    assert stats["resume_changes"] == [{"step": 3, "checkpoint": str(tmp_path / "checkpoints" / "checkpoint-3"),
                                        "changes": {"max_train_steps": [3, 4], "allow_resume_changes": [False, True],
                                                    "learning_rate": [0.0002, 0.01], "adam_weight_decay": [0.0, 0.1],
                                                    "ema_power": [0.75, 0.5]}}]
    assert load_config(tmp_path / "config.yaml").allow_resume_changes is True
    checkpoint = tmp_path / "checkpoints" / "checkpoint-4"
    assert json.loads((checkpoint / "training_state.json").read_text())["resume_changes"] == stats["resume_changes"]
    # The new values are the ones in use, not those the checkpoint restored.
    groups = torch.load(checkpoint / "optimizer.bin", weights_only=False)["param_groups"]
    assert [(g["initial_lr"], g["weight_decay"]) for g in groups] == [(0.01, 0.1)]
    assert torch.load(checkpoint / "custom_checkpoint_1.pkl", weights_only=False)["base_lrs"] == [0.01]
    assert torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)["power"] == 0.5


def test_offset_lr_scale_trains_the_offset_branch_at_its_rate(assets, straight_run, tmp_path):
    """dcnv4_options: offset_lr_scale puts the offset/mask branches in a parameter group of their own; at 0 they
    stay as initialised (zero weights, zero offsets) while the rest trains, and a resume that changes the learning
    rate keeps the ratio."""
    options = "{offset_lr_scale: 0.0}"
    assert train_ldm.main(args(assets, tmp_path, 2, dcnv4_options=options)) == 0
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    state = load_file(checkpoint / "model.safetensors")
    offset_weights = [v for k, v in state.items() if k.endswith("offset_mask.weight")]
    assert offset_weights and all(torch.count_nonzero(w) == 0 for w in offset_weights)
    # At the default scale the same weights have moved.
    trained = load_file(straight_run / "checkpoints" / "checkpoint-6" / "model.safetensors")
    assert all(torch.count_nonzero(v) > 0 for k, v in trained.items() if k.endswith("offset_mask.weight"))
    groups = torch.load(checkpoint / "optimizer.bin", weights_only=False)["param_groups"]
    assert [(g["lr_scale"], g["initial_lr"]) for g in groups] == [(1.0, 2e-4), (0.0, 0.0)]
    config = json.loads((tmp_path / "pipeline" / "unet" / "config.json").read_text())
    assert config["offset_lr_scale"] == 0.0

    argv = args(assets, tmp_path, 3, dcnv4_options=options, learning_rate=0.01, allow_resume_changes=True)
    assert train_ldm.main(argv + ["--resume_from_checkpoint", "latest"]) == 0
    groups = torch.load(tmp_path / "checkpoints" / "checkpoint-3" / "optimizer.bin", weights_only=False)["param_groups"]
    assert [g["initial_lr"] for g in groups] == [0.01, 0.0]


def test_resume_changes_list_every_key():
    """Every key is refused, refused unless allowed, or free; all but resume_from_checkpoint are recorded."""
    names = [f.name for f in dataclasses.fields(training.TrainConfig)]
    lists = training.ARCHITECTURE_KEYS + training.EXACT_RESUME_KEYS + training.RECORDED_RESUME_KEYS
    assert sorted(lists) == sorted(set(names) - {"resume_from_checkpoint"})
    old = training.TrainConfig(output_dir="runs/a")
    new = training.TrainConfig(output_dir="runs/./a/", resume_from_checkpoint="latest", lr_scheduler="linear",
                               lr_warmup_steps=5, max_grad_norm=0.5, mixed_precision="bf16", skip_nonfinite_steps=True,
                               max_train_steps=2000, seed=1)
    state = {"num_processes": 1, "random_streams": training.RANDOM_STREAMS}
    assert training.resume_changes(old, new, state, 2) == {
        "seed": (0, 1), "max_train_steps": (1000, 2000), "lr_scheduler": ("constant_with_warmup", "linear"),
        "lr_warmup_steps": (20, 5), "max_grad_norm": (1.0, 0.5), "skip_nonfinite_steps": (False, True),
        "mixed_precision": ("no", "bf16"), "num_processes": (1, 2)}
    assert training.resume_changes(old, dataclasses.replace(old, output_dir="runs/b"), state, 1) == {
        "output_dir": ("runs/a", "runs/b")}


def test_resume_records_every_change(assets, tmp_path, monkeypatch, capsys):
    """Settings a resume may change (schedule, clipping, the non-finite policy, the length) are recorded with
    the step they start at; the output folder spelled another way is no change."""
    common = dict(model_type="conv")
    assert train_ldm.main(args(assets, tmp_path / "run", 3, **common)) == 0
    monkeypatch.chdir(tmp_path)
    changed = dict(common, lr_scheduler="linear", max_grad_norm=0.5, skip_nonfinite_steps=True)
    assert train_ldm.main(args(assets, Path("run"), 4, **changed) + ["--resume_from_checkpoint", "latest"]) == 0
    expected = [{"step": 3, "checkpoint": str(Path("run") / "checkpoints" / "checkpoint-3"),
                 "changes": {"max_train_steps": [3, 4], "lr_scheduler": ["constant_with_warmup", "linear"],
                             "max_grad_norm": [1.0, 0.5], "skip_nonfinite_steps": [False, True]}}]
    run = tmp_path / "run"
    assert json.loads((run / "train_stats.json").read_text())["resume_changes"] == expected
    state = json.loads((run / "checkpoints" / "checkpoint-4" / "training_state.json").read_text())
    assert state["resume_changes"] == expected
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Resuming from")]
    assert len(lines) == 1 and "max_grad_norm (1.0, now 0.5)" in lines[0] and "skip_nonfinite_steps" in lines[0]
    # A resume that changes nothing adds nothing.
    assert train_ldm.main(args(assets, Path("run"), 4, **changed) + ["--resume_from_checkpoint", "latest"]) == 0
    assert json.loads((run / "train_stats.json").read_text())["resume_changes"] == expected
    assert "nothing changed" in capsys.readouterr().out


def test_killed_checkpoint_leaves_previous_usable(assets, straight_run, tmp_path, monkeypatch):
    import accelerate

    save_state = accelerate.Accelerator.save_state

    def dies_while_saving_step_6(self, output_dir=None, **kwargs):
        save_state(self, output_dir, **kwargs)
        if Path(output_dir).name.startswith("checkpoint-6"):
            raise KeyboardInterrupt("killed while checkpointing")

    common = dict(gradient_accumulation_steps=2, sample_every_steps=6, num_samples=4, sample_inference_steps=2)
    monkeypatch.setattr(accelerate.Accelerator, "save_state", dies_while_saving_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_ldm.main(args(assets, tmp_path, 6, **common))
    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    assert (tmp_path / "checkpoints" / "checkpoint-6.tmp").is_dir()
    assert training.latest_checkpoint(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "checkpoint-3"
    assert train_ldm.main(args(assets, tmp_path, 6, **common) + ["--resume_from_checkpoint", "latest"]) == 0
    assert not (tmp_path / "checkpoints" / "checkpoint-6.tmp").exists()
    assert_same(weights(straight_run / "checkpoints" / "checkpoint-6"), weights(tmp_path / "checkpoints" / "checkpoint-6"))


def test_conv_run_and_total_limit(assets, tmp_path):
    from diffusers import DiffusionPipeline, UNet2DModel

    assert train_ldm.main(args(assets, tmp_path, 4, model_type="conv", class_conditional=True,
                                prediction_type="v_prediction") + ["--checkpointing_steps", "1",
                                                                   "--checkpoints_total_limit", "2"]) == 0
    assert [s for s, _ in training.list_checkpoints(tmp_path / "checkpoints")] == [3, 4]
    stats = json.loads((tmp_path / "train_stats.json").read_text())
    assert stats["model_type"] == "conv" and stats["steps"] == 4
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipeline", trust_remote_code=True)
    # Two classes and the null class of label dropout (class_dropout_prob 0.1 by default); 8 images per class.
    assert type(pipe.unet) is UNet2DModel and pipe.unet.config.num_class_embeds == 3 and pipe.num_classes == 2
    assert pipe.config.null_class_label == 2 and list(pipe.config.class_counts) == [8, 8]
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_nonfinite_loss_stops_or_is_skipped(assets, tmp_path, monkeypatch, capsys):
    compute_loss = train_ldm.compute_loss
    calls = []

    def nan_on_third_call(*a, **k):
        calls.append(1)
        loss = compute_loss(*a, **k)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_ldm, "compute_loss", nan_on_third_call)
    assert train_ldm.main(args(assets, tmp_path / "stop", 4, model_type="conv")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "loss is nan at step 3" in err.splitlines()[-1] and "no checkpoint was written yet" in err
    assert not (tmp_path / "stop" / "train_stats.json").exists()

    calls.clear()
    assert train_ldm.main(args(assets, tmp_path / "skip", 4, model_type="conv", skip_nonfinite_steps=True)) == 0
    stats = json.loads((tmp_path / "skip" / "train_stats.json").read_text())
    assert stats["skipped_steps"] == 1 and np.isfinite(stats["final_loss"])


@pytest.mark.filterwarnings("ignore:skipped 2 unreadable image:UserWarning")
def test_corrupt_image_stops_or_is_skipped(assets, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(assets / "images", images)
    (images / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    truncated = (images / "b" / "0.png").read_bytes()
    (images / "b" / "truncated.png").write_bytes(truncated[:len(truncated) // 2])
    common = dict(model_type="conv", data_source=str(images), latent_cache_dir=str(tmp_path / "latents"))
    assert train_ldm.main(args(assets, tmp_path / "stop", 1, **common)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train_ldm.py")]  # after the encoder's progress
    assert len(lines) == 1 and "broken.png" in lines[0] and "--set skip_corrupt=true" in lines[0], err
    assert err.rstrip().endswith(lines[0]) and "Traceback" not in err
    assert not (tmp_path / "stop" / "train_stats.json").exists()

    assert train_ldm.main(args(assets, tmp_path / "skip", 1, skip_corrupt=True, **common)) == 0
    skipped = [str(images / "a" / "broken.png"), str(images / "b" / "truncated.png")]
    assert "skipped 2 unreadable image(s)" in capsys.readouterr().out
    stats = json.loads((tmp_path / "skip" / "train_stats.json").read_text())
    assert stats["skipped_images"] == skipped and stats["num_skipped_images"] == 2


@pytest.mark.parametrize("sets, needle", [
    (dict(data_source="./no-such-folder"), "data_source './no-such-folder' does not exist"),
    (dict(vae="./no-such-vae"), "not a folder holding a VAE"),
    (dict(resume_from_checkpoint="/no/such/checkpoint"), "is not a complete checkpoint folder"),
])
def test_input_mistakes_are_one_line(assets, tmp_path, capsys, sets, needle):
    assert train_ldm.main(args(assets, tmp_path, 1, model_type="conv", **sets)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("train_ldm.py: error: ") and needle in err, err
    # A run that stops on its inputs leaves no config.yaml that would describe a run that never started.
    assert not (tmp_path / "config.yaml").exists()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("train_ldm.py: error: "), err
    return err


def test_a_missing_data_source_names_the_folder(assets, tmp_path, monkeypatch, capsys):
    """A relative path that does not exist is a folder looked for, not a Hugging Face dataset id."""
    monkeypatch.chdir(tmp_path)
    assert train_ldm.main(args(assets, tmp_path / "run", 1, model_type="conv", data_source="mydata_typo")) == 2
    err = one_error_line(capsys)
    assert f"data_source 'mydata_typo' does not exist: no folder {str(tmp_path / 'mydata_typo')!r}" in err
    assert "'builtin'" in err and "'user/name'" in err
    assert train_ldm.main(args(assets, tmp_path / "run", 1, model_type="conv", data_source="data/imagenet/train")) == 2
    assert repr(str(tmp_path / "data" / "imagenet" / "train")) in one_error_line(capsys)
    # The ImageNet configs without their data stop on it before loading their VAE from the hub.
    # (fp32: accelerate keeps the precision of this process's first run)
    assert train_ldm.main(["--config", str(REPO / "configs" / "imagenet256_conv.yaml"), "--output_dir", "run",
                           "--mixed_precision", "no"]) == 2
    assert repr(str(tmp_path / "data" / "imagenet" / "train")) in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_hub_dataset_without_the_datasets_package_is_one_line(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.chdir(tmp_path)
    assert train_ldm.main(args(assets, tmp_path / "run", 1, model_type="conv", data_source="someone/images")) == 2
    assert "'someone/images'" in (err := one_error_line(capsys)) and "pip install datasets" in err


def test_a_train_vae_checkpoint_as_the_vae_or_the_checkpoint(assets, tmp_path, capsys):
    """train_vae.py's checkpoints hold its own config: named as such, with the folder to pass instead."""
    from unet_dcnv4 import config
    from unet_dcnv4.vae import VAETrainConfig

    vae_run = tmp_path / "vae_run"
    config.save_config(VAETrainConfig(output_dir=str(vae_run)), vae_run)
    checkpoint = vae_run / "checkpoints" / "checkpoint-2"
    config.save_config(VAETrainConfig(output_dir=str(vae_run)), checkpoint)
    (checkpoint / "training_state.json").write_text(json.dumps({"step": 2}))
    shutil.copytree(assets / "vae", vae_run / "vae")
    assert train_ldm.main(args(assets, tmp_path / "run", 1, model_type="conv", vae=checkpoint)) == 2
    err = one_error_line(capsys)
    assert "is a checkpoint of train_vae.py" in err and repr(str(vae_run / "vae")) in err
    assert train_ldm.main(args(assets, tmp_path / "run", 1, model_type="conv")
                          + ["--resume_from_checkpoint", str(checkpoint)]) == 2
    assert "is a checkpoint of train_vae.py" in one_error_line(capsys)


def test_a_new_run_into_a_used_folder_is_refused(assets, straight_run, tmp_path, capsys):
    before = {name: (straight_run / name).read_bytes() for name in ("config.yaml", "train_stats.json")}
    assert train_ldm.main(args(assets, straight_run, 6, model_type="conv")) == 2
    err = one_error_line(capsys)
    assert "holds a run already" in err and "--resume_from_checkpoint latest" in err and "--overwrite" in err
    # --overwrite starts a new run: it cannot resume from the checkpoints it removes.
    assert train_ldm.main(args(assets, straight_run, 6) + ["--resume_from_checkpoint", "latest", "--overwrite"]) == 2
    assert "--overwrite removes the checkpoints" in one_error_line(capsys)
    # A resume from another folder's checkpoint would mix two runs in one folder.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(straight_run / "checkpoints" / "checkpoint-3", elsewhere)
    assert train_ldm.main(args(assets, straight_run, 6) + ["--resume_from_checkpoint", str(elsewhere)]) == 2
    assert "holds another run" in one_error_line(capsys)
    assert before == {name: (straight_run / name).read_bytes() for name in before}

    # 'latest' in a folder whose finished run has no checkpoint left does not start over it.
    finished = tmp_path / "finished"
    shutil.copytree(straight_run / "pipeline", finished / "pipeline")
    shutil.copy(straight_run / "train_stats.json", finished)
    assert train_ldm.main(args(assets, finished, 1) + ["--resume_from_checkpoint", "latest"]) == 2
    assert "finds no complete checkpoint" in (err := one_error_line(capsys)) and "--overwrite" in err


def test_overwrite_replaces_the_previous_run(assets, tmp_path, capsys):
    run = tmp_path / "run"
    sampled = dict(model_type="conv", sample_every_steps=3, num_samples=1, sample_inference_steps=1)
    # 'latest' in an empty folder starts a new run.
    assert train_ldm.main(args(assets, run, 3, **sampled) + ["--resume_from_checkpoint", "latest"]) == 0
    assert "No complete checkpoint" in capsys.readouterr().out
    (run / "latent_cache").mkdir()
    (run / "latent_cache" / "cache.json").write_text("{}")
    # Stopped by its inputs, an --overwrite run removes nothing.
    assert train_ldm.main(args(assets, run, 1, model_type="conv", data_source=tmp_path / "missing")
                          + ["--overwrite"]) == 2
    assert json.loads((run / "train_stats.json").read_text())["steps"] == 3
    assert train_ldm.main(args(assets, run, 1, model_type="conv") + ["--overwrite"]) == 0
    assert [s for s, _ in training.list_checkpoints(run / "checkpoints")] == [1]
    assert json.loads((run / "train_stats.json").read_text())["steps"] == 1
    assert load_config(run / "config.yaml").max_train_steps == 1
    assert not (run / "samples").exists() and len(list((run / "logs" / "train_ldm").glob("events.out.tfevents*"))) == 1
    assert (run / "latent_cache" / "cache.json").read_text() == "{}"


def test_a_failed_final_save_keeps_the_previous_pipeline_and_stats(assets, tmp_path, monkeypatch):
    from pipelines import LatentDiffusionPipeline

    def outputs() -> dict:
        files = [*(tmp_path / "pipeline").rglob("*"), tmp_path / "train_stats.json"]
        return {str(path.relative_to(tmp_path)): path.read_bytes() for path in files if path.is_file()}

    assert train_ldm.main(args(assets, tmp_path, 1, model_type="conv")) == 0
    before = outputs()

    def dies_half_way(self, save_directory, **kwargs):
        (Path(save_directory) / "model_index.json").write_text("{")
        raise KeyboardInterrupt("killed while saving the pipeline")

    resume = args(assets, tmp_path, 2, model_type="conv") + ["--resume_from_checkpoint", "latest"]
    with monkeypatch.context() as patch:
        patch.setattr(LatentDiffusionPipeline, "save_pretrained", dies_half_way)
        with pytest.raises(KeyboardInterrupt):
            train_ldm.main(resume)
    assert outputs() == before
    assert train_ldm.main(resume) == 0
    assert json.loads((tmp_path / "train_stats.json").read_text())["steps"] == 2
    assert sorted(p.name for p in tmp_path.glob("pipeline*")) == ["pipeline"]


def test_a_bug_keeps_its_traceback(assets, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("a bug in the trainer")

    monkeypatch.setattr(train_ldm, "build_model", broken)
    with pytest.raises(RuntimeError, match="a bug in the trainer"):
        train_ldm.main(args(assets, tmp_path, 1, model_type="conv"))


def test_gradient_accumulation_matches_the_larger_batch(assets, tmp_path, monkeypatch):
    """2 micro-batches of b give the first step of one batch of 2b: same items, same gradient, same update.

    The loss draws its noise per item from the item itself (compute_loss draws in batch order, which differs
    between the two layouts); what is compared is the loop's accumulation, scaling and data order.
    """
    import torch.nn.functional as F

    def per_item_noise_loss(model, noise_scheduler, batch, generator, prediction_type, class_conditional,
                            *label_dropout):
        latents = batch["mean"]  # (B, c, h, w)
        noise = torch.sin(latents * 12.9898 + 78.233)  # (B, c, h, w)
        timesteps = (latents.flatten(1).abs().sum(1) * 997).long() % noise_scheduler.config.num_train_timesteps
        pred = model(noise_scheduler.add_noise(latents, noise, timesteps), timesteps).sample  # (B, c, h, w)
        return F.mse_loss(pred.float(), noise.float())

    monkeypatch.setattr(train_ldm, "compute_loss", per_item_noise_loss)
    # Adam's first step is about lr * sign(gradient): a large epsilon keeps rounding-level gradient differences
    # from flipping it where the gradient is near zero. No clipping, so that the two norms' rounding cannot differ.
    common = dict(model_type="conv", adam_epsilon=1e-3, max_grad_norm=1e6)
    assert train_ldm.main(args(assets, tmp_path / "big", 1, train_batch_size=8, **common)) == 0
    assert train_ldm.main(args(assets, tmp_path / "acc", 1, train_batch_size=4, gradient_accumulation_steps=2,
                               **common)) == 0
    big, acc = (weights(tmp_path / run / "checkpoints" / "checkpoint-1") for run in ("big", "acc"))
    assert big.keys() == acc.keys()
    moved = 0
    for key in big:
        torch.testing.assert_close(acc[key], big[key], rtol=1e-4, atol=1e-7, msg=key)
        moved += key.startswith("adam.") and key.endswith("exp_avg") and bool(big[key].abs().max() > 0)
    assert moved > 10


def test_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    assert train_ldm.main(["--output_dir", str(tmp_path / "out"), "--dry_run", "--seed", "7",
                           "--set", "model_type=conv"]) == 0
    printed = capsys.readouterr().out
    assert "seed: 7" in printed and "model_type: conv" in printed
    assert not (tmp_path / "out").exists()


def test_config_layers_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_type: conv\nlearning_rate: 1\n")
    cfg = load_config(path, ["seed=3", "dcnv4_options={group_channels: 8}"])
    assert (cfg.model_type, cfg.learning_rate, cfg.seed, cfg.dcnv4_options) == ("conv", 1.0, 3, {"group_channels": 8})
    for bad, needle in [({"nope": 1}, "valid keys: output_dir"), ({"mixed_precision": "fp8"}, "mixed_precision"),
                        ({"model_type": "foo"}, "model_type"), ({"seed": "x"}, "seed"),
                        ({"max_train_steps": 0}, "max_train_steps"), ({"model_size": "huge"}, "model_size"),
                        ({"dcnv4_options": {"bad": 1}}, "dcnv4_options"), ({"dcnv4_impl": "cuda"}, "dcnv4_impl"),
                        ({"dcnv4_cuda_backward": "fast"}, "dcnv4_cuda_backward")]:
        with pytest.raises(ValueError, match=needle):
            load_config(None, bad)
    cfg = load_config(None, ["dcnv4_impl=reference", "dcnv4_cuda_backward=tiled", "dcnv4_options={group_channels: 8}"])
    assert training.unet_options(cfg) == {"group_channels": 8, "impl": "reference", "cuda_backward": "tiled"}
    assert training.unet_options(load_config(None, ["model_type=conv", "dcnv4_impl=reference"])) == {}
    for name in ("ldm_default", "ldm_tiny_cpu", "twemoji64_dcnv4", "twemoji64_conv"):
        load_config(REPO / "configs" / f"{name}.yaml")
    dcnv4, conv = (load_config(REPO / "configs" / f"twemoji64_{m}.yaml") for m in ("dcnv4", "conv"))
    assert {k: v for k, v in vars(dcnv4).items() if k not in ("model_type", "output_dir")} == \
           {k: v for k, v in vars(conv).items() if k not in ("model_type", "output_dir")}


@pytest.mark.parametrize("argv, needle", [
    (["--set", "nope=1"], "unknown config key 'nope'"),
    (["--mixed_precision", "fp8"], "mixed_precision"),
    (["--set", "model_type=foo"], "model_type"),
])
def test_cli_errors_are_one_line(argv, needle, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train_ldm.py"), "--output_dir", str(tmp_path), *argv],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_resume_is_exact(assets, tmp_path, capsys):
    """Two gloo processes: an interrupted and resumed run gives the bits of an uninterrupted one."""
    # `accelerate launch --cpu --num_processes 2` starts a single process unless mpirun is set up; torchrun (the
    # --multi_gpu launcher) with ACCELERATE_USE_CPU gives two gloo processes on any machine.
    env = dict(os.environ, ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="")

    def launch(output_dir: Path, steps: int, *extra: str) -> None:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), str(REPO / "train_ldm.py"),
                   *args(assets, output_dir, steps, model_type="conv", train_batch_size=2), *extra]
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(straight, 4)
    stats = json.loads((straight / "train_stats.json").read_text())
    assert stats["num_processes"] == 2 and stats["steps"] == 4
    rng = torch.load(straight / "checkpoints" / "checkpoint-3" / "custom_checkpoint_2.pkl", weights_only=False)
    assert len(rng["states"]) == 2 and not torch.equal(rng["states"][0], rng["states"][1])
    launch(resumed, 3)
    launch(resumed, 4, "--resume_from_checkpoint", "latest")
    assert [s for s, _ in training.list_checkpoints(resumed / "checkpoints")] == [3, 4]
    assert_same(weights(straight / "checkpoints" / "checkpoint-4"), weights(resumed / "checkpoints" / "checkpoint-4"))

    # One process cannot continue the two processes' streams: refused unless allowed, then recorded.
    argv = args(assets, resumed, 5, model_type="conv", train_batch_size=2) + ["--resume_from_checkpoint", "latest"]
    assert train_ldm.main(argv) == 2
    assert "num_processes (2, now 1)" in capsys.readouterr().err
    assert train_ldm.main(argv + ["--set", "allow_resume_changes=true"]) == 0
    stats = json.loads((resumed / "train_stats.json").read_text())
    assert stats["steps"] == 5 and [entry["changes"] for entry in stats["resume_changes"]] == [
        {"max_train_steps": [3, 4]},
        {"max_train_steps": [4, 5], "allow_resume_changes": [False, True], "num_processes": [2, 1]}]


@pytest.mark.slow
def test_kill_during_checkpointing_loses_nothing(assets, tmp_path):
    """SIGKILL at every point of save_checkpoint: the newest complete checkpoint stays findable and loadable,
    and resuming from it gives the uninterrupted run's bits."""
    common = dict(model_type="conv", checkpoints_total_limit=1)
    straight = tmp_path / "straight"
    assert train_ldm.main(args(assets, straight, 2, model_type="conv") + ["--checkpointing_steps", "1"]) == 0
    expected = weights(straight / "checkpoints" / "checkpoint-2")
    # The complete checkpoints each kill leaves, newest last: the previous one until the new one is renamed into
    # place, and none that is being deleted (checkpoint-1, pruned by checkpoints_total_limit=1).
    survivors = {"after_save_state": ["checkpoint-1"], "after_config": ["checkpoint-1"],
                 "after_state_file": ["checkpoint-1"], "between_renames": ["checkpoint-1", "checkpoint-2.old"],
                 "after_rename": ["checkpoint-1", "checkpoint-2"], "while_deleting": ["checkpoint-2"]}
    assert set(survivors) == set(training.FAULT_POINTS)
    for point in training.FAULT_POINTS:
        run = tmp_path / point
        # Saving a step that has a checkpoint already is the only path through the two renames.
        for step in (1, 2) if point == "between_renames" else (1,):
            shutil.copytree(straight / "checkpoints" / f"checkpoint-{step}", run / "checkpoints" / f"checkpoint-{step}")
        command = [sys.executable, str(REPO / "train_ldm.py"), *args(assets, run, 2, **common),
                   "--checkpointing_steps", "1", "--resume_from_checkpoint", str(run / "checkpoints" / "checkpoint-1")]
        env = dict(os.environ, **{training.FAULT_ENV: point})
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        assert result.returncode == -signal.SIGKILL, (point, result.stderr[-3000:])

        assert [path.name for _, path in training.list_checkpoints(run / "checkpoints")] == survivors[point], point
        latest = training.latest_checkpoint(run / "checkpoints")
        cfg, state = training.read_checkpoint_state(latest)
        assert cfg.model_type == "conv" and latest.name.startswith(f"checkpoint-{state['step']}") and weights(latest)
        assert train_ldm.main(args(assets, run, 2, **common) + ["--resume_from_checkpoint", "latest"]) == 0, point
        assert_same(expected, weights(training.latest_checkpoint(run / "checkpoints")))


@pytest.mark.slow
def test_a_corrupt_image_stops_every_process(assets, tmp_path):
    """One process meets the unreadable image while caching latents; every process stops with the error line
    (none is left waiting at a barrier for the launcher to tear it down)."""
    images = tmp_path / "images"
    shutil.copytree(assets / "images", images)
    (images / "a" / "broken.png").write_bytes(b"not an image")  # in the second process's half of the files
    env = dict(os.environ, ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(REPO / "train_ldm.py"),
               *args(assets, tmp_path / "run", 1, model_type="conv", data_source=str(images),
                     latent_cache_dir=str(tmp_path / "latents"))]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=150)
    # Both processes stop with the one-line error (their lines may interleave on the shared stderr).
    assert result.returncode != 0 and result.stderr.count("train_ldm.py: error: cannot read image") == 2, \
        result.stderr[-3000:]
    assert "broken.png" in result.stderr


@dataclasses.dataclass
class _Documented:
    """A config for the help test."""

    # First group.
    a: int = 1
    b: str | None = None  # after b
    # Above c, one line,
    # and a second.
    c: dict = dataclasses.field(default_factory=dict)

    # Second group, whose heading
    # takes two lines.
    d: bool = False


def test_help_lists_every_key_with_its_default_group_and_comments(capsys):
    from unet_dcnv4 import config

    assert config.field_comments(_Documented) == [
        ("First group.", "a", [], None), ("First group.", "b", [], "after b"),
        ("First group.", "c", ["Above c, one line,", "and a second."], None),
        ("Second group, whose heading takes two lines.", "d", [], None)]
    assert config.keys_help(_Documented).splitlines()[1:] == [
        "", "  # First group.", "  a: 1", "  b: null  # after b", "  # Above c, one line,", "  # and a second.",
        "  c: {}", "", "  # Second group, whose heading takes two lines.", "  d: false"]

    import train_vae

    from unet_dcnv4.vae import VAETrainConfig

    for module, cls in ((train_ldm, training.TrainConfig), (train_vae, VAETrainConfig)):
        with pytest.raises(SystemExit):
            module.main(["--help"])
        text = capsys.readouterr().out
        keys = [line.strip().split(":")[0] for line in text.split("config keys and their defaults")[1].splitlines()
                if line.startswith("  ") and not line.strip().startswith("#") and ":" in line]
        assert keys == [f.name for f in dataclasses.fields(cls)]
    with pytest.raises(SystemExit):
        train_ldm.main(["--help"])
    text = capsys.readouterr().out
    assert "  # Optimisation.\n  train_batch_size: 32  # per process\n" in text
    assert "  latent_cache_dtype: float32  # how the cache stores" in text and "  dcnv4_options: {}" in text
