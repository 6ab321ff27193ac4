"""The latent cache: round trip through an invertible stand-in VAE, invalidation, scaling factor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unet_dcnv4.data import LatentDataset, build_image_dataset, build_latent_cache, sample_latents, module_fingerprint
from unet_dcnv4.vae import build_small_vae

R = 8
POSTERIOR_STD = 0.1


class UnshuffleVAE(torch.nn.Module):
    """Encodes by pixel-unshuffle (exactly invertible) with a constant posterior std."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config if config is not None else {}
        self.offset = torch.nn.Parameter(torch.zeros(()))
        self.encode_calls = 0

    def encode(self, x):
        self.encode_calls += 1
        mean = F.pixel_unshuffle(x, 2) + self.offset  # (B, 12, R/2, R/2)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.full_like(mean, POSTERIOR_STD)))

    def decode(self, z):
        return F.pixel_shuffle(z - self.offset, 2)  # (B, 3, R, R)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (R, R, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return str(root)


def test_round_trip_and_flips(folder, tmp_path):
    ds = build_image_dataset(folder, resolution=R)
    vae = UnshuffleVAE({"scaling_factor": 0.5, "shift_factor": 0.25})
    cache = build_latent_cache(ds, vae, str(tmp_path / "cache"), R, vae_id="unshuffle", batch_size=2)
    latents = LatentDataset(cache)
    assert len(latents) == 2 * len(ds) and latents.latent_shape == (12, R // 2, R // 2)
    assert latents.scaling_factor == 0.5 and latents.shift_factor == 0.25 and latents.num_classes == 0
    for i in range(len(ds)):
        image = ds[i][0]
        item, flipped = latents[i], latents[i + len(ds)]
        assert item["class_labels"] == 0 and item["mean"].shape == (12, R // 2, R // 2)
        decoded = vae.decode((item["mean"] / 0.5 + 0.25)[None])[0]
        assert torch.allclose(decoded, image, atol=1e-6)
        assert torch.allclose(vae.decode((flipped["mean"] / 0.5 + 0.25)[None])[0], image.flip(-1), atol=1e-6)
        assert torch.allclose(item["std"], torch.full_like(item["std"], POSTERIOR_STD * 0.5))

    # A sampled latent decodes to the image plus noise of the posterior's std.
    batch = torch.stack([latents[i]["mean"] for i in range(len(latents))])
    stds = torch.stack([latents[i]["std"] for i in range(len(latents))])
    z = sample_latents(batch, stds, generator=torch.Generator().manual_seed(0))
    images = torch.stack([ds[i][0] for i in range(len(ds))] + [ds[i][0].flip(-1) for i in range(len(ds))])
    error = vae.decode(z / 0.5 + 0.25) - images
    assert abs(error.std().item() - POSTERIOR_STD) < 0.02 and abs(error.mean().item()) < 0.02
    again = sample_latents(batch, stds, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, again)

    with open(os.path.join(cache, "cache.json")) as f:
        index = json.load(f)
    assert index["dataset_fingerprint"] == ds.fingerprint() and index["resolution"] == R
    assert index["vae_hash"] == module_fingerprint(vae) and index["vae_id"] == "unshuffle"
    assert index["scaling_factor_source"] == "config" and index["latent_channels"] == 12


def test_reuse_and_invalidation(folder, tmp_path):
    cache_dir = str(tmp_path / "cache")
    ds = build_image_dataset(folder, resolution=R)
    vae = UnshuffleVAE({"scaling_factor": 1.0})
    build_latent_cache(ds, vae, cache_dir, R, vae_id="v", batch_size=8)
    assert vae.encode_calls == 1
    build_latent_cache(ds, vae, cache_dir, R, vae_id="v", batch_size=8)
    assert vae.encode_calls == 1  # reused

    with torch.no_grad():
        vae.offset.fill_(0.5)  # new weights
    build_latent_cache(ds, vae, cache_dir, R, vae_id="v", batch_size=8)
    assert vae.encode_calls == 2
    assert torch.allclose(LatentDataset(cache_dir)[0]["mean"], F.pixel_unshuffle(ds[0][0][None], 2)[0] + 0.5)

    vae.config = {"scaling_factor": 2.0}  # new config
    build_latent_cache(ds, vae, cache_dir, R, vae_id="v", batch_size=8)
    assert vae.encode_calls == 3 and LatentDataset(cache_dir).scaling_factor == 2.0

    Image.new("RGB", (R, R), (1, 2, 3)).save(os.path.join(folder, "new.png"))  # new data
    ds = build_image_dataset(folder, resolution=R)
    build_latent_cache(ds, vae, cache_dir, R, vae_id="v", batch_size=8)
    assert vae.encode_calls == 4 and len(LatentDataset(cache_dir)) == 2 * 6

    build_latent_cache(ds, vae, cache_dir, R, vae_id="v", batch_size=8, flips=False)
    assert vae.encode_calls == 5 and len(LatentDataset(cache_dir)) == 6

    # A stale cache (a shard cut short) is rebuilt, not reused.
    shard = next(p for p in os.listdir(cache_dir) if p.endswith(".safetensors"))
    with open(os.path.join(cache_dir, shard), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="no complete latent cache"):
        LatentDataset(cache_dir)
    build_latent_cache(ds, vae, cache_dir, R, vae_id="v", batch_size=8, flips=False)
    assert vae.encode_calls == 6 and len(LatentDataset(cache_dir)) == 6


def test_measured_scaling_factor(folder, tmp_path):
    ds = build_image_dataset(folder, resolution=R)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    images = torch.cat([images, images.flip(-1)])
    expected = 1 / (images.var(unbiased=False) + POSTERIOR_STD**2).sqrt().item()

    for config, option in (({}, "config"), ({"scaling_factor": 0.3}, None)):
        cache_dir = str(tmp_path / f"c{option}")
        cache = build_latent_cache(ds, UnshuffleVAE(config), cache_dir, R, vae_id="v", scaling_factor=option)
        latents = LatentDataset(cache)
        with open(os.path.join(cache, "cache.json")) as f:
            assert json.load(f)["scaling_factor_source"] == "measured"
        assert latents.scaling_factor == pytest.approx(expected, rel=1e-5)
        z = torch.stack([sample_latents(latents[i]["mean"], latents[i]["std"]) for i in range(len(latents))])
        assert 0.7 < z.std().item() < 1.3  # unit scale after scaling

    cache = build_latent_cache(ds, UnshuffleVAE(), str(tmp_path / "given"), R, vae_id="v", scaling_factor=0.7)
    assert LatentDataset(cache).scaling_factor == 0.7


def test_real_autoencoder_class_labels_and_accelerator(tmp_path):
    from accelerate import Accelerator

    root = tmp_path / "classes"
    for c, name in enumerate(("x", "y")):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (100 * c, 50 * i, 0)).save(root / name / f"{i}.png")
    ds = build_image_dataset(str(root), resolution=16, class_labels=True)
    torch.manual_seed(0)
    vae = build_small_vae(resolution=16, base_channels=8)
    cache = build_latent_cache(ds, vae, str(tmp_path / "cache"), 16, vae_id="tiny", accelerator=Accelerator(cpu=True))
    latents = LatentDataset(cache)
    assert latents.latent_shape == (4, 4, 4) and latents.num_classes == 2
    assert [latents[i]["class_labels"] for i in range(len(latents))] == [0, 0, 1, 1] * 2
    # Built without a scaling_factor, its config only holds the class default: the factor is measured.
    assert latents.index["scaling_factor_source"] == "measured" and latents.scaling_factor != vae.config.scaling_factor
    with torch.no_grad():
        expected = vae.encode(ds[3][0][None]).latent_dist.mean[0] * latents.scaling_factor
    assert torch.allclose(latents[3]["mean"], expected, atol=1e-5)


def test_refusals(folder, tmp_path):
    vae = UnshuffleVAE()
    with pytest.raises(ValueError, match="deterministic"):
        build_latent_cache(build_image_dataset(folder, R, hflip=True), vae, str(tmp_path / "c"), R, vae_id="v")
    ds = build_image_dataset(folder, R)
    with pytest.raises(ValueError, match="resolution"):
        build_latent_cache(ds, vae, str(tmp_path / "c"), 2 * R, vae_id="v")
    with pytest.raises(ValueError, match="scaling_factor"):
        build_latent_cache(ds, vae, str(tmp_path / "c"), R, vae_id="v", scaling_factor=-1.0)
    with pytest.raises(ValueError, match="holds no latent cache"):
        build_latent_cache(ds, vae, folder, R, vae_id="v")  # never deletes a foreign folder
    assert len(os.listdir(folder)) == 5


class FailingVAE(UnshuffleVAE):
    """An `UnshuffleVAE` whose encoder call number `fail_at` raises, as a build killed part way would stop."""

    def __init__(self, config=None, fail_at=None):
        super().__init__(config)
        self.fail_at = fail_at

    def encode(self, x):
        if self.encode_calls + 1 == self.fail_at:
            raise RuntimeError("interrupted")
        return super().encode(x)


def eager_items(cache_dir):
    """The items as LatentDataset computed them before it read rows on demand: every shard loaded,
    concatenated and scaled at once."""
    from safetensors.torch import load_file

    with open(os.path.join(cache_dir, "cache.json")) as f:
        index = json.load(f)
    parts = [load_file(os.path.join(cache_dir, s["file"])) for s in index["shards"]]
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    mean, std, labels = cat["mean"], cat["std"], cat["labels"]
    if index["flips"]:
        mean, std = torch.cat([mean, cat["mean_flip"]]), torch.cat([std, cat["std_flip"]])
        labels = torch.cat([labels, labels])
    mean = (mean.float() - index["shift_factor"]) * index["scaling_factor"]
    return mean, std.float() * index["scaling_factor"], labels


def cache_tensors(cache_dir):
    from safetensors.torch import load_file

    with open(os.path.join(cache_dir, "cache.json")) as f:
        index = json.load(f)
    return index, {s["file"]: load_file(os.path.join(cache_dir, s["file"])) for s in index["shards"]}


def test_items_equal_eager_reading_in_sampler_order(folder, tmp_path):
    from unet_dcnv4.training import EpochSampler

    ds = build_image_dataset(folder, resolution=R)
    # A shift and a factor that round in float32, shards of 2 images: items cross shards and flips.
    vae = UnshuffleVAE({"scaling_factor": 0.18215, "shift_factor": 0.0609})
    cache = build_latent_cache(ds, vae, str(tmp_path / "cache"), R, vae_id="v", batch_size=3, shard_size=2)
    latents = LatentDataset(cache)
    mean, std, labels = eager_items(cache)
    assert len(latents) == len(mean) == 10
    for i in range(len(latents)):
        item = latents[i]
        assert torch.equal(item["mean"], mean[i]) and torch.equal(item["std"], std[i])
        assert item["class_labels"] == labels[i] and latents[i - len(latents)]["class_labels"] == labels[i]
    assert torch.equal(latents.first_means(3), mean[:3]) and torch.equal(latents.first_means(99), mean)
    with pytest.raises(IndexError, match="out of range"):
        latents[len(latents)]

    # Batches in the EpochSampler's order through workers, which unpickle the dataset and map the shards themselves.
    sampler = EpochSampler(len(latents), seed=3)
    sampler.set_epoch(2)
    loader = torch.utils.data.DataLoader(latents, batch_size=4, sampler=sampler, num_workers=2)
    order = list(sampler)
    batches = list(loader)
    assert torch.equal(torch.cat([b["mean"] for b in batches]), mean[order])
    assert torch.equal(torch.cat([b["std"] for b in batches]), std[order])
    assert torch.equal(torch.cat([b["class_labels"] for b in batches]), labels[order])


def test_old_float32_cache_loads_and_is_reused(folder, tmp_path):
    """A cache written before the dtype option: shards named per rank, an index without "dtype"."""
    ds = build_image_dataset(folder, resolution=R)
    vae = UnshuffleVAE({"scaling_factor": 0.5})
    cache = build_latent_cache(ds, vae, str(tmp_path / "cache"), R, vae_id="v", flips=False)
    expected = eager_items(cache)
    index_path = os.path.join(cache, "cache.json")
    with open(index_path) as f:
        index = json.load(f)
    del index["dtype"]
    os.rename(os.path.join(cache, index["shards"][0]["file"]), os.path.join(cache, "shard-r000-00000.safetensors"))
    index["shards"][0]["file"] = "shard-r000-00000.safetensors"
    with open(index_path, "w") as f:
        json.dump(index, f)

    latents = LatentDataset(cache)
    assert latents.dtype == "float32"
    assert all(torch.equal(latents[i]["mean"], expected[0][i]) for i in range(len(latents)))
    build_latent_cache(ds, vae, cache, R, vae_id="v", flips=False)
    assert vae.encode_calls == 1  # reused as the float32 cache it is
    build_latent_cache(ds, vae, cache, R, vae_id="v", flips=False, dtype="float16")
    assert vae.encode_calls == 2 and LatentDataset(cache).dtype == "float16"  # never taken for another dtype


def test_dtype_is_recorded_keyed_and_close(folder, tmp_path):
    ds = build_image_dataset(folder, resolution=R)
    vae = UnshuffleVAE({"scaling_factor": 0.5})
    reference = LatentDataset(build_latent_cache(ds, vae, str(tmp_path / "f32"), R, vae_id="v"))
    cache_dir = str(tmp_path / "cache")
    calls = vae.encode_calls
    for dtype, unit_roundoff in (("float16", 2.0**-11), ("bfloat16", 2.0**-8)):
        build_latent_cache(ds, vae, cache_dir, R, vae_id="v", dtype=dtype)
        build_latent_cache(ds, vae, cache_dir, R, vae_id="v", dtype=dtype)
        calls += 1
        assert vae.encode_calls == calls  # encoded once per dtype, then reused
        index, shards = cache_tensors(cache_dir)
        assert index["dtype"] == dtype
        assert all(t["mean"].dtype == getattr(torch, dtype) for t in shards.values())
        latents = LatentDataset(cache_dir)
        for i in range(len(latents)):
            item, exact = latents[i], reference[i]
            assert item["mean"].dtype == torch.float32
            assert not torch.equal(item["std"], exact["std"]) or dtype == "float16"  # 0.1 rounds in bfloat16
            for key in ("mean", "std"):
                assert torch.allclose(item[key], exact[key], rtol=unit_roundoff, atol=1e-7)
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_latent_cache(ds, vae, cache_dir, R, vae_id="v", dtype="int8")


def test_dataset_reads_the_cache_without_holding_it(tmp_path):
    from unet_dcnv4.data import BuiltinImageDataset

    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc/self/status (Linux)")
    ds = BuiltinImageDataset(resolution=64, size=256)
    cache = build_latent_cache(ds, UnshuffleVAE({"scaling_factor": 0.5}), str(tmp_path / "cache"), 64, vae_id="v",
                               batch_size=64, shard_size=64)
    data_bytes = sum(s["bytes"] for s in json.load(open(os.path.join(cache, "cache.json")))["shards"])
    assert data_bytes > 48e6  # 256 images x 4 arrays x 12x32x32 float32

    # Measured in a fresh process, whose memory nothing else in this session has touched: every latent read,
    # in batches of 32 in a random order. RSS counts anonymous memory (a loaded cache) and mapped file pages
    # (a memory-mapped one, once read) alike.
    script = (
        "import sys, torch\n"
        "from unet_dcnv4.data import LatentDataset\n"
        "def rss():\n"
        "    with open('/proc/self/status') as f:\n"
        "        return next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmRSS:'))\n"
        "latents = LatentDataset(sys.argv[1])\n"
        "latents.read([0])\n"
        "before, peak = rss(), 0\n"
        "for batch in torch.randperm(len(latents), generator=torch.Generator().manual_seed(0)).split(32):\n"
        "    assert latents.read(batch)[0].shape == (32, 12, 32, 32)\n"
        "    peak = max(peak, rss())\n"
        "print(peak - before)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, cache], capture_output=True, text=True, check=True)
    grown = int(run.stdout.split()[-1])
    assert grown < 0.5 * data_bytes, f"reading every latent grew the process by {grown} bytes of {data_bytes}"
    latents = LatentDataset(cache)
    latents.read(list(range(0, 512, 16)))
    # What it holds in memory is the labels and a file descriptor per shard read.
    held = [v for v in vars(latents).values() if isinstance(v, (torch.Tensor, np.ndarray))]
    assert sum(v.nbytes for v in held) <= latents.labels.nbytes + 8 * len(latents.index["shards"])
    assert pickle_size(latents) < 64 * 1024  # what a DataLoader worker receives


def pickle_size(obj):
    import pickle

    return len(pickle.dumps(obj))


def test_interrupted_build_resumes_from_the_last_complete_shard(folder, tmp_path):
    ds = build_image_dataset(folder, resolution=R)
    config = {"scaling_factor": 0.5}
    whole = str(tmp_path / "whole")
    build_latent_cache(ds, UnshuffleVAE(config), whole, R, vae_id="v", batch_size=2, shard_size=2,
                       scaling_factor=None)

    cache_dir = str(tmp_path / "cache")
    with pytest.raises(RuntimeError, match="interrupted"):  # shards 0 and 1 written, shard 2 not
        build_latent_cache(ds, FailingVAE(config, fail_at=3), cache_dir, R, vae_id="v", batch_size=2, shard_size=2,
                           scaling_factor=None)
    assert not os.path.exists(cache_dir)  # an unfinished build never looks complete
    partial = cache_dir + ".partial"
    assert sorted(p for p in os.listdir(partial) if p.endswith(".safetensors")) == \
        ["shard-00000.safetensors", "shard-00001.safetensors"]
    written = {p: os.stat(os.path.join(partial, p)).st_mtime_ns for p in os.listdir(partial)}

    vae = UnshuffleVAE(config)
    build_latent_cache(ds, vae, cache_dir, R, vae_id="v", batch_size=2, shard_size=2, scaling_factor=None)
    assert vae.encode_calls == 1  # only shard 2
    for p in ("shard-00000.safetensors", "shard-00001.safetensors"):
        assert os.stat(os.path.join(cache_dir, p)).st_mtime_ns == written[p]
    assert not os.path.exists(partial)
    assert_same_cache(cache_dir, whole)

    # Resumed by another number of processes: a second process's shards (1 of 0..2) are kept by a single one.
    other = str(tmp_path / "other")
    with pytest.raises(RuntimeError, match="interrupted"):  # the main process set the build up, then stopped
        build_latent_cache(ds, FailingVAE(config, fail_at=1), other, R, vae_id="v", batch_size=2, shard_size=2,
                           scaling_factor=None)
    second = SimpleNamespace(process_index=1, num_processes=2, wait_for_everyone=lambda: None)
    vae = UnshuffleVAE(config)
    build_latent_cache(ds, vae, other, R, vae_id="v", batch_size=2, shard_size=2, scaling_factor=None,
                       accelerator=second)
    assert vae.encode_calls == 1 and not os.path.exists(other)
    vae = UnshuffleVAE(config)
    build_latent_cache(ds, vae, other, R, vae_id="v", batch_size=2, shard_size=2, scaling_factor=None)
    assert vae.encode_calls == 2
    assert_same_cache(other, whole)

    # Shards encoded for another key (here flips) are not taken.
    with pytest.raises(RuntimeError, match="interrupted"):
        build_latent_cache(ds, FailingVAE(config, fail_at=2), str(tmp_path / "f"), R, vae_id="v", batch_size=2,
                           shard_size=2, flips=False)
    vae = UnshuffleVAE(config)
    build_latent_cache(ds, vae, str(tmp_path / "f"), R, vae_id="v", batch_size=2, shard_size=2)
    assert vae.encode_calls == 3


def assert_same_cache(a, b):
    (index_a, tensors_a), (index_b, tensors_b) = cache_tensors(a), cache_tensors(b)
    assert index_a == index_b and tensors_a.keys() == tensors_b.keys()
    for name, t in tensors_a.items():
        assert t.keys() == tensors_b[name].keys() and all(torch.equal(t[k], tensors_b[name][k]) for k in t)


def _read(path, name, rows):
    """Rows `rows` of tensor `name` of a safetensors file, by `read_rows`."""
    from unet_dcnv4.data import read_rows, shard_layout

    dtype, shape, offset = shard_layout(path)[name]
    out = np.empty((len(rows), *shape[1:]), dtype=dtype)
    fd = os.open(path, os.O_RDONLY)
    try:
        read_rows(fd, offset, out[0].nbytes, rows, [memoryview(r).cast("B") for r in out.reshape(len(rows), -1)])
    finally:
        os.close(fd)
    return torch.from_numpy(out)


def test_positioned_reads_match_safetensors(tmp_path):
    from safetensors.torch import load_file

    from unet_dcnv4.data import read_rows, shard_layout, write_shard

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(6, 2, 5, generator=g), "b": torch.randn(6, 7, generator=g).half(),
               "c": torch.randn(6, 3, generator=g).bfloat16(), "labels": torch.arange(6),
               "long": torch.arange(5000.0)}  # one run longer than the buffers one call takes
    path = str(tmp_path / "s.safetensors")
    write_shard(path, tensors, {"start": "0", "count": "6"})
    loaded, layout = load_file(path), shard_layout(path)
    assert layout.keys() == loaded.keys() and not os.path.exists(path + ".tmp")
    rows = [4, 0, 1, 2, 5, 2]  # runs of consecutive rows, a repeat, any order
    for k, t in loaded.items():
        assert layout[k][1] == tuple(t.shape)
        if k != "long":
            got = _read(path, k, rows)
            assert torch.equal(got.view(torch.bfloat16) if t.dtype == torch.bfloat16 else got, t[rows])
    assert torch.equal(_read(path, "long", range(1, 5000)), tensors["long"][1:])
    last = max(layout, key=lambda k: layout[k][2])  # the tensor at the end of the file
    with open(path, "r+b") as f:  # a truncated file: its header promises more than it holds
        f.truncate(os.path.getsize(path) - 8)
    with pytest.raises(ValueError, match="does not hold"):
        shard_layout(path)
    dtype, shape, offset = layout[last]
    out = np.empty(shape, dtype=dtype)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="shorter than its header says"):
            read_rows(fd, offset, out[0].nbytes, [shape[0] - 1], [memoryview(out[-1]).cast("B")])
    finally:
        os.close(fd)
