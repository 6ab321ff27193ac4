"""End-to-end tests of train_ldm.py on tiny data: outputs, exact resume, atomic checkpoints, errors, two processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from unet_dcnv4 import training
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
    assert load_config(straight_run / "config.yaml").gradient_accumulation_steps == 2
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


def test_pipeline_from_checkpoint(straight_run):
    pipe = training.pipeline_from_checkpoint(straight_run / "checkpoints" / "checkpoint-6")
    saved = load_file(straight_run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert_same(saved, {k: v.contiguous() for k, v in pipe.unet.state_dict().items()})
    raw = training.pipeline_from_checkpoint(straight_run / "checkpoints" / "checkpoint-6", use_ema=False)
    assert not torch.equal(next(raw.unet.parameters()), next(pipe.unet.parameters()))


def test_resume_is_exact(assets, straight_run, tmp_path):
    common = dict(gradient_accumulation_steps=2, sample_every_steps=6, num_samples=4, sample_inference_steps=2)
    assert train_ldm.main(args(assets, tmp_path, 3, **common)) == 0
    assert train_ldm.main(args(assets, tmp_path, 6, **common) + ["--resume_from_checkpoint", "latest"]) == 0
    assert_same(weights(straight_run / "checkpoints" / "checkpoint-6"), weights(tmp_path / "checkpoints" / "checkpoint-6"))


@pytest.mark.filterwarnings("ignore:A saved_tensors_hooks context:FutureWarning")
def test_recompute_value_trains_the_same_weights(assets, straight_run, tmp_path, monkeypatch):
    """recompute_value trades memory for a matrix multiply; the weights it trains are the same bits."""
    import unet_dcnv4.modules

    checkpointed = []

    def counting_checkpoint(*a, **kw):
        checkpointed.append(1)
        return torch.utils.checkpoint.checkpoint(*a, **kw)

    monkeypatch.setattr(unet_dcnv4.modules, "checkpoint", counting_checkpoint)
    common = dict(gradient_accumulation_steps=2, sample_every_steps=6, num_samples=4, sample_inference_steps=2)
    assert train_ldm.main(args(assets, tmp_path, 6, recompute_value=True, **common)) == 0
    assert checkpointed, "the DCNv4 layers did not recompute"
    assert_same(weights(straight_run / "checkpoints" / "checkpoint-6"), weights(tmp_path / "checkpoints" / "checkpoint-6"))


def test_resume_refuses_a_different_model(assets, straight_run, capsys):
    before = (straight_run / "config.yaml").read_text()
    assert train_ldm.main(args(assets, straight_run, 8, model_type="conv") + ["--resume_from_checkpoint", "latest"]) == 2
    assert "model_type ('dcnv4', now 'conv')" in capsys.readouterr().err
    assert train_ldm.main(args(assets, straight_run, 8) + ["--resume_from_checkpoint", str(straight_run)]) == 2
    assert "is not a complete checkpoint folder" in capsys.readouterr().err
    assert (straight_run / "config.yaml").read_text() == before


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
    assert type(pipe.unet) is UNet2DModel and pipe.unet.config.num_class_embeds == 2
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
                        ({"dcnv4_options": {"bad": 1}}, "dcnv4_options")]:
        with pytest.raises(ValueError, match=needle):
            load_config(None, bad)
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


def test_two_process_cpu_run_and_resume(assets, tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts a single process unless mpirun is set up; torchrun (the
    # --multi_gpu launcher) with ACCELERATE_USE_CPU gives two gloo processes on any machine.
    env = dict(os.environ, ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="")

    def launch(steps: int, *extra: str) -> None:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), str(REPO / "train_ldm.py"),
                   *args(assets, tmp_path, steps, model_type="conv"), *extra]
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    launch(3)
    stats = json.loads((tmp_path / "train_stats.json").read_text())
    assert stats["num_processes"] == 2 and stats["steps"] == 3
    rng = torch.load(tmp_path / "checkpoints" / "checkpoint-3" / "custom_checkpoint_2.pkl", weights_only=False)
    assert len(rng["states"]) == 2 and not torch.equal(rng["states"][0], rng["states"][1])
    launch(4, "--resume_from_checkpoint", "latest")
    assert [s for s, _ in training.list_checkpoints(tmp_path / "checkpoints")] == [3, 4]
    assert json.loads((tmp_path / "train_stats.json").read_text())["steps"] == 4
