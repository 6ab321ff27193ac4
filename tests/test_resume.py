"""What a resume restores and where: state on the model's device, independent and reproducible random streams;
pruning that keeps the checkpoint just written; a run's outputs replaced whole or not at all."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from unet_dcnv4 import checkpoints
from unet_dcnv4 import vae as vae_module
from unet_dcnv4.common import derive_seed
from unet_dcnv4.training import (
    NoiseGenerator, TrainConfig, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_ldm  # noqa: E402  (a top-level script, importable once the repository root is on the path)


def _training_objects(accelerator, device: str):
    """A tiny model on `device`, its AdamW and EMA and a noise generator, prepared and registered."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMAModel(model.parameters(), use_ema_warmup=True)
    rng = NoiseGenerator(0, torch.device("cpu"))
    accelerator.register_for_checkpointing(ema, rng)
    return model, optimizer, ema, rng


@pytest.mark.filterwarnings("ignore:for (weight|bias). copying from a non-meta parameter:UserWarning")
def test_resume_puts_restored_state_on_the_model_device(tmp_path):
    """A checkpoint saved on one device resumes onto another (here meta, standing in for a GPU after a CPU
    save): the EMA, the optimizer state and the noise generator end where they must, and the EMA steps."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, optimizer, ema, rng = _training_objects(accelerator, "cpu")
    model(torch.randn(4, 3)).square().sum().backward()
    optimizer.step()
    ema.step(model.parameters())
    save_checkpoint(accelerator, tmp_path, 1, TrainConfig(), {"step": 1})
    expected_draw = torch.randn(5, generator=rng.generator)

    # The model stays where it was built (no device placement), as a GPU model would stay on its GPU.
    resumed = Accelerator(cpu=True, device_placement=False)
    model, optimizer, ema, rng = _training_objects(resumed, "meta")
    state = load_checkpoint(resumed, tmp_path / "checkpoint-1", torch.device("meta"), ema)
    assert state == {"step": 1}
    assert [p.device.type for p in ema.shadow_params] == ["meta", "meta"]
    moments = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    assert len(moments) == 4 and all(t.device.type == "meta" for t in moments)
    assert rng.generator.device.type == "cpu" and torch.equal(torch.randn(5, generator=rng.generator), expected_draw)
    ema.step(model.parameters())  # the first step after the resume, which mixed devices
    assert ema.optimization_step == 2


def _epoch_orders(seed: int, epochs: int, n: int = 16, batch: int = 4) -> list[list[int]]:
    """The order in which train_ldm's prepared loader reads items 0..n-1 in each of the first epochs."""
    from accelerate import Accelerator

    loader = Accelerator(cpu=True).prepare(train_ldm.build_dataloader(TrainConfig(seed=seed, train_batch_size=batch),
                                                                      TensorDataset(torch.arange(n))))
    orders = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        orders.append(torch.cat([b[0] for b in loader]).tolist())
    return orders


def test_seeds_give_independent_data_orders():
    from accelerate import skip_first_batches

    seed0, seed1 = _epoch_orders(0, 2), _epoch_orders(1, 2)
    assert all(sorted(order) == list(range(16)) for order in seed0 + seed1)
    assert seed0[0] != seed1[0]
    assert seed0[1] != seed1[0], "seed 1 replays the data order of seed 0 one epoch later"
    assert seed0[0] != seed0[1]
    assert _epoch_orders(0, 2) == seed0

    # A resume reads the rest of the epoch it was interrupted in, in the same order.
    from accelerate import Accelerator

    loader = Accelerator(cpu=True).prepare(train_ldm.build_dataloader(TrainConfig(seed=0, train_batch_size=4),
                                                                      TensorDataset(torch.arange(16))))
    loader.set_epoch(1)
    assert torch.cat([b[0] for b in skip_first_batches(loader, 2)]).tolist() == seed0[1][8:]


def test_processes_share_one_order_and_read_disjoint_batches():
    """Two processes (each with its own sampler, as in a launch) read the halves of each global batch of the one
    order that a single process with the global batch reads."""
    from accelerate.data_loader import prepare_data_loader

    cfg = TrainConfig(seed=0, train_batch_size=2)
    shards = [prepare_data_loader(train_ldm.build_dataloader(cfg, TensorDataset(torch.arange(16))), num_processes=2,
                                  process_index=rank, put_on_device=False) for rank in (0, 1)]
    for epoch, order in enumerate(_epoch_orders(0, 2)):
        for shard in shards:
            shard.set_epoch(epoch)
        batches = [[b[0].tolist() for b in shard] for shard in shards]
        assert [i for pair in zip(*batches) for half in pair for i in half] == order


def test_vae_streams_are_independent_per_seed():
    n, batch = 8, 4
    first_epoch = {seed: vae_module._batch_indices(seed, n, 0, batch) + vae_module._batch_indices(seed, n, 1, batch)
                   for seed in (0, 1)}
    second_epoch_seed0 = vae_module._batch_indices(0, n, 2, batch) + vae_module._batch_indices(0, n, 3, batch)
    assert sorted(first_epoch[0]) == list(range(n))
    assert first_epoch[0] != first_epoch[1] and second_epoch_seed0 != first_epoch[1]
    flips = [torch.rand(8, generator=vae_module._step_generator(seed, "flip", step, rank))
             for seed, step, rank in ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1))]
    assert all(not torch.equal(a, b) for i, a in enumerate(flips) for b in flips[i + 1:])


def test_noise_generators_differ_per_seed_and_rank():
    draws = [torch.randn(4, generator=NoiseGenerator(seed, torch.device("cpu"), rank, 2).generator)
             for seed, rank in ((0, 0), (0, 1), (1, 0), (1, 1))]
    assert all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1:])


def test_derive_seed():
    assert derive_seed(0, "data", 1) == derive_seed(0, "data", 1)
    assert len({derive_seed(0, "data", 1), derive_seed(1, "data", 0), derive_seed(0, "noise", 1),
                derive_seed(0, "data"), derive_seed(0, "data", 1, 0)}) == 5
    assert 0 <= derive_seed(2**40, "x", 2**40) < 2**63
    with pytest.raises(ValueError, match="seed must be an int >= 0, got -1"):
        derive_seed(-1, "data")
    with pytest.raises(ValueError, match=r"keys\[0\] must be an int >= 0, got 1.5"):
        derive_seed(0, "data", 1.5)
    with pytest.raises(ValueError, match="purpose"):
        derive_seed(0, "")


def _fake_checkpoint(folder: Path, step: int) -> Path:
    """A complete checkpoint folder as list_checkpoints sees one (its state file)."""
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "training_state.json").write_text(json.dumps({"step": step}))
    return path


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    """A higher step of an earlier run left in the folder must not outlive, nor push out, the new checkpoint."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    _training_objects(accelerator, "cpu")
    _fake_checkpoint(tmp_path, 100)
    written = save_checkpoint(accelerator, tmp_path, 5, TrainConfig(), {"step": 5}, total_limit=1)
    assert [path.name for _, path in list_checkpoints(tmp_path)] == ["checkpoint-5"]
    assert latest_checkpoint(tmp_path) == written

    # Steps above the one kept are older than it (a resume went back) and go before the lowest steps.
    for step in (1, 8):
        _fake_checkpoint(tmp_path, step)
    deleted = checkpoints.prune_checkpoints(tmp_path, 2, keep=written)
    assert [path.name for path in deleted] == ["checkpoint-8"]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1, 5]
    _fake_checkpoint(tmp_path, 9)
    assert [path.name for path in checkpoints.prune_checkpoints(tmp_path, 2)] == ["checkpoint-1"]


def test_a_failed_replacement_keeps_the_previous_output(tmp_path, monkeypatch):
    final = tmp_path / "pipeline"
    checkpoints.replace_folder(final, lambda folder: (folder / "model_index.json").write_text("old"))

    def dies_half_way(folder: Path) -> None:
        (folder / "model_index.json").write_text("{")
        raise KeyboardInterrupt("killed while saving")

    with pytest.raises(KeyboardInterrupt):
        checkpoints.replace_folder(final, dies_half_way)
    assert (final / "model_index.json").read_text() == "old"
    # Killed between its two renames, a replacement leaves the previous folder aside; the next one restores it
    # before it writes, and replaces it once complete.
    final.rename(tmp_path / "pipeline.old")
    with pytest.raises(KeyboardInterrupt):
        checkpoints.replace_folder(final, dies_half_way)
    assert (final / "model_index.json").read_text() == "old"
    checkpoints.replace_folder(final, lambda folder: (folder / "model_index.json").write_text("new"))
    assert (final / "model_index.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]

    stats = checkpoints.replace_file(tmp_path / "train_stats.json", "old")
    real_replace = checkpoints.os.replace

    def killed_before_the_rename(src, dst):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(checkpoints.os, "replace", killed_before_the_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.replace_file(stats, "new, written in full")
    assert stats.read_text() == "old"
    monkeypatch.setattr(checkpoints.os, "replace", real_replace)
    checkpoints.replace_file(stats, "new")
    assert stats.read_text() == "new" and not (tmp_path / "train_stats.json.tmp").exists()
