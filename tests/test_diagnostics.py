"""The DCNv4 layer statistics read the offset/mask layout right: a fresh U-Net samples the regular grid with box
filter masks, and moved offsets and masks are measured as they were set."""

import pytest
import torch
from diffusers import DDPMScheduler

from unet_dcnv4.diagnostics import STATISTICS, layer_statistics, summarise
from unet_dcnv4.unet import build_unet


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet("dcnv4", "tiny", sample_size=8)


def test_a_fresh_unet_samples_the_grid_with_box_filters(unet):
    latents = torch.randn(2, 4, 8, 8)
    rows = layer_statistics(unet, latents, [10, 900], DDPMScheduler(num_train_timesteps=1000))
    layers = [name for name, m in unet.named_modules() if type(m).__name__ == "DCNv4Conv2d"]
    assert len(rows) == 2 * len(layers) and {r["layer"] for r in rows} == set(layers)
    for r in rows:
        assert set(STATISTICS) <= set(r) and r["offset_mean"] == r["offset_p95"] == 0
        assert r["mask_sum_mean"] == pytest.approx(1) and r["mask_sum_std"] == pytest.approx(0, abs=1e-6)
        assert r["mask_peak"] == pytest.approx(1 / 9) and r["mask_negative"] == 0
    assert "| 0 | 10 | " in summarise(rows)


def test_moved_offsets_and_masks_are_measured_as_set(unet):
    name, layer = next((n, m) for n, m in unet.named_modules() if type(m).__name__ == "DCNv4Conv2d")
    G, K = layer.group, layer.K
    original = layer.offset_mask.bias.detach().clone()
    with torch.no_grad():
        bias = layer.offset_mask.bias[: 3 * G * K].view(G, 3 * K)
        bias[:, : 2 * K] = torch.tensor([3.0, 4.0]).repeat(K)  # every point moved by (3, 4): 5 px
        bias[:, 2 * K:] = 0
        bias[:, 2 * K] = -2.0  # one tap, negative
    try:
        row = next(r for r in layer_statistics(unet, torch.randn(1, 4, 8, 8), [500],
                                               DDPMScheduler(num_train_timesteps=1000)) if r["layer"] == name)
    finally:
        with torch.no_grad():
            layer.offset_mask.bias.copy_(original)
    assert row["offset_mean"] == pytest.approx(5 * layer.offset_scale)
    assert row["mask_sum_mean"] == pytest.approx(-2) and row["mask_peak"] == pytest.approx(1)
    assert row["mask_negative"] == pytest.approx(1 / K)


def test_timesteps_outside_the_schedule_are_refused(unet):
    with pytest.raises(ValueError, match=r"timesteps must be a non-empty list in \[0, 1000\)"):
        layer_statistics(unet, torch.randn(1, 4, 8, 8), [1000], DDPMScheduler(num_train_timesteps=1000))
