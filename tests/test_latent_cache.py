"""The latent cache: round trip through an invertible stand-in VAE, invalidation, scaling factor."""

from __future__ import annotations

import json
import os
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
