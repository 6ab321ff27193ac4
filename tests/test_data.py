"""Image dataset sources: folders (classes, corrupt files), the built-in photographs, Hugging Face datasets, and
which names are folders and which hub ids."""

from __future__ import annotations

import os
import socket
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from unet_dcnv4 import data
from unet_dcnv4.data import CorruptImageError, DataSourceError, build_image_dataset


def _write(path, size=(12, 10), color=(200, 30, 60), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    array = np.zeros((size[1], size[0], len(mode)), dtype=np.uint8)
    array[...] = color if len(color) == len(mode) else color[: len(mode)]
    array[: size[1] // 2, : size[0] // 2] = 255  # a corner that differs, so flips and crops are visible
    Image.fromarray(array.squeeze(-1) if mode == "L" else array, mode=mode).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    _write(str(root / "a.png"))
    _write(str(root / "sub" / "b.jpg"), size=(9, 14))
    _write(str(root / "sub" / "deeper" / "c.png"), color=(10, 20, 30, 0), mode="RGBA")
    _write(str(root / "d.png"), color=(90,), mode="L")
    (root / "notes.txt").write_text("not an image")
    return str(root)


def test_folder_items_fingerprint(folder):
    ds = build_image_dataset(folder, resolution=8)
    assert len(ds) == 4 and ds.num_classes == 0
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and label == 0
        assert image.min() >= -1 and image.max() <= 1
    # A fully transparent image is composited on white.
    c = ds.files.index(os.path.join("sub", "deeper", "c.png"))
    assert torch.allclose(ds[c][0], torch.ones(3, 8, 8))
    assert ds.fingerprint() == build_image_dataset(folder, resolution=8).fingerprint()
    assert ds.fingerprint() != build_image_dataset(folder, resolution=16).fingerprint()
    _write(os.path.join(folder, "e.png"))
    assert build_image_dataset(folder, resolution=8).fingerprint() != ds.fingerprint()


def test_folder_crops(folder):
    wide = os.path.join(folder, "a.png")  # 12 x 10
    for options in ({"center_crop": True}, {"random_crop": True}, {"center_crop": False}):
        ds = data.ImageFolderDataset(folder, resolution=6, **options)
        assert ds[ds.files.index(os.path.basename(wide))][0].shape == (3, 6, 6)
    assert data.ImageFolderDataset(folder, 6).deterministic
    assert not data.ImageFolderDataset(folder, 6, hflip=True).deterministic
    # Centre crop vs squashing the whole image give different pixels.
    a = data.ImageFolderDataset(folder, 6, center_crop=True)[0][0]
    b = data.ImageFolderDataset(folder, 6, center_crop=False)[0][0]
    assert not torch.allclose(a, b)


def test_folder_class_labels(tmp_path):
    root = tmp_path / "classes"
    for name, count in (("cat", 2), ("dog", 3)):
        for i in range(count):
            _write(str(root / name / f"{i}.png"))
    _write(str(root / "dog" / "nested" / "x.png"))
    ds = build_image_dataset(str(root), resolution=4, class_labels=True)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert sorted(ds[i][1] for i in range(len(ds))) == [0, 0, 1, 1, 1, 1]
    _write(str(root / "loose.png"))
    with pytest.raises(ValueError, match="loose.png"):
        build_image_dataset(str(root), resolution=4, class_labels=True)


def test_corrupt_file_named_or_skipped(folder):
    bad = os.path.join(folder, "sub", "broken.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    ds = build_image_dataset(folder, resolution=8)
    with pytest.raises(CorruptImageError, match="broken.png"):
        ds[ds.files.index(os.path.join("sub", "broken.png"))]
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = build_image_dataset(folder, resolution=8, skip_corrupt=True)
    assert len(ds) == 4 and ds.skipped == [bad]
    assert all(ds[i][0].shape == (3, 8, 8) for i in range(len(ds)))


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        build_image_dataset(str(tmp_path), resolution=8)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ValueError, match="file.png"):
        build_image_dataset(str(tmp_path / "file.png"))
    with pytest.raises(ValueError, match="resolution"):
        build_image_dataset("builtin", resolution=0)


def test_builtin_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the built-in dataset tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    data._builtin_photos.cache_clear()
    ds = build_image_dataset("builtin", resolution=16, builtin_size=20)
    assert len(ds) == 20 and ds.num_classes == 0
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    assert images.shape == (20, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert images.std(dim=(1, 2, 3)).min() > 0.01  # crops of photographs, not blank
    again = build_image_dataset("builtin", resolution=16, builtin_size=20)
    assert torch.equal(again[7][0], ds[7][0]) and again.fingerprint() == ds.fingerprint()
    reseeded = build_image_dataset("builtin", resolution=16, builtin_size=20, builtin_seed=1)
    assert reseeded.fingerprint() != ds.fingerprint()


class _FakeImage:
    pass


class _FakeClassLabel:
    def __init__(self, names):
        self.names = names


class _FakeDataset:
    def __init__(self, rows, features):
        self.rows, self.features = rows, features
        self.column_names = list(rows[0])
        self._fingerprint = "fake-v1"

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _fake_datasets_module(rows, features, calls):
    module = types.ModuleType("datasets")
    module.Image, module.ClassLabel, module.DatasetDict = _FakeImage, _FakeClassLabel, dict

    def load_dataset(name, split):
        calls.append(("hub", name, split))
        return _FakeDataset(rows, features)

    def load_from_disk(path):
        calls.append(("disk", path))
        return {"train": _FakeDataset(rows, features)}

    module.load_dataset, module.load_from_disk = load_dataset, load_from_disk
    return module


def test_hf_dataset_source(tmp_path, monkeypatch):
    rows = [{"img": Image.new("RGB", (10, 7), (i * 40, 0, 0)), "label": i % 2} for i in range(5)]
    calls = []
    module = _fake_datasets_module(rows, {"img": _FakeImage(), "label": _FakeClassLabel(["a", "b"])}, calls)
    monkeypatch.setitem(sys.modules, "datasets", module)
    ds = build_image_dataset("someone/tiny-images", resolution=4, class_labels=True)
    assert calls == [("hub", "someone/tiny-images", "train")]
    assert len(ds) == 5 and ds.classes == ["a", "b"] and ds.num_classes == 2
    image, label = ds[3]
    assert image.shape == (3, 4, 4) and label == 1
    assert torch.allclose(image[0], torch.full((4, 4), 120 / 127.5 - 1), atol=1e-6)

    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text("{}")
    ds = build_image_dataset(str(saved), resolution=4)
    assert calls[-1] == ("disk", str(saved)) and ds[0][1] == 0 and ds.num_classes == 0

    rows[2]["img"] = "not an image"
    with pytest.raises(CorruptImageError, match=r"tiny-images\[2\]"):
        build_image_dataset("someone/tiny-images", resolution=4)[2]
    with pytest.warns(UserWarning):
        assert len(build_image_dataset("someone/tiny-images", resolution=4, skip_corrupt=True)) == 4


def test_hf_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataSourceError, match="pip install datasets"):
        build_image_dataset("someone/tiny-images")


def test_missing_folders_and_hub_ids(tmp_path, monkeypatch):
    """A name that does not exist is a hub id only as `namespace/name` with no local `namespace`; anything else is
    a folder that is not there, named by its absolute path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for source in ("someone/tiny-images", "user.name/data-set_1"):
        assert data.is_hub_id(source), source
        data.check_source(source, "data_source")
    for source in ("mydata_typo", "data/imagenet", "data/imagenet/train", "./someone/x", "/abs/someone", "a/b/c",
                   "~/images", "someone/"):
        assert not data.is_hub_id(source), source
        with pytest.raises(ValueError, match=f"data_source '{source}' does not exist: no folder "
                                             f"'{os.path.abspath(source)}'"):
            data.check_source(source, "data_source")
    with pytest.raises(ValueError, match=r"source 'mydata_typo' does not exist.*'builtin'.*'user/name'"):
        build_image_dataset("mydata_typo")
    data.check_source(str(tmp_path / "data"))
    data.check_source("builtin")


def test_hf_hub_unreachable_is_one_clear_error(monkeypatch):
    calls = []
    module = _fake_datasets_module([{"img": Image.new("RGB", (4, 4))}], {"img": _FakeImage()}, calls)

    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    module.load_dataset = offline
    monkeypatch.setitem(sys.modules, "datasets", module)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataSourceError, match=r"cannot load the Hugging Face dataset 'someone/tiny-images': "
                                              r"the Hugging Face Hub is offline.*save_to_disk"):
        build_image_dataset("someone/tiny-images")


def _kinds(root):
    """One image file of every kind the reader converts: alpha, palette with transparency, greyscale with alpha,
    16-bit greyscale, CMYK, 1-bit, plain RGB and greyscale; returns the expected RGB pixels of each."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    alpha = np.where(np.arange(36).reshape(6, 6) % 3 == 0, 0, 255).astype(np.uint8)
    white = np.full_like(rgb, 255)
    over_white = np.where(alpha[..., None] == 0, white, rgb)
    grey = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    expected = {}
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(os.path.join(root, "rgba.png"))
    expected["rgba.png"] = over_white
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(os.path.join(root, "la.png"))
    expected["la.png"] = np.where(alpha[..., None] == 0, 255, np.repeat(grey[..., None], 3, -1))
    palette = Image.fromarray(rgb).quantize(8)
    palette.info["transparency"] = 0
    palette.save(os.path.join(root, "palette.png"), transparency=0)
    pal_rgb = np.asarray(palette.convert("RGB"))
    index = np.asarray(palette)
    expected["palette.png"] = np.where(index[..., None] == 0, 255, pal_rgb)
    sixteen = (grey.astype(np.uint16) * 257)
    Image.fromarray(sixteen).save(os.path.join(root, "grey16.png"))
    expected["grey16.png"] = np.repeat(grey[..., None], 3, -1)
    Image.fromarray(rgb).convert("CMYK").save(os.path.join(root, "cmyk.tif"))
    expected["cmyk.tif"] = np.asarray(Image.fromarray(rgb).convert("CMYK").convert("RGB"))
    bits = Image.fromarray(grey > 127)
    bits.save(os.path.join(root, "bits.bmp"))
    expected["bits.bmp"] = np.repeat(np.where(grey > 127, 255, 0)[..., None], 3, -1).astype(np.uint8)
    Image.fromarray(rgb).save(os.path.join(root, "plain.ppm"))
    expected["plain.ppm"] = rgb
    Image.fromarray(grey).save(os.path.join(root, "grey.gif"))
    expected["grey.gif"] = np.repeat(grey[..., None], 3, -1)
    return expected


def test_one_reader_for_training_and_metrics(tmp_path):
    from unet_dcnv4.metrics import ImageFolderForMetrics, list_images

    root = str(tmp_path / "kinds")
    expected = _kinds(root)
    (tmp_path / "kinds" / ".hidden.png").write_bytes(b"")
    Image.new("RGB", (6, 6)).save(tmp_path / "kinds" / ".000001.png.77.tmp", format="PNG")
    Image.new("RGB", (6, 6)).save(tmp_path / "kinds" / "000002.png.77.tmp.png")
    os.makedirs(tmp_path / "kinds" / ".cache")
    Image.new("RGB", (6, 6)).save(tmp_path / "kinds" / ".cache" / "x.png")
    files = data.list_image_files(root)
    assert files == sorted(expected)
    assert [os.path.relpath(p, root) for p in list_images(root)] == files
    training = build_image_dataset(root, resolution=6, center_crop=False)
    for_metrics = ImageFolderForMetrics(root, resolution=6)
    for i, name in enumerate(files):
        pixels = np.asarray(data.read_image(os.path.join(root, name)))
        np.testing.assert_array_equal(pixels, expected[name], err_msg=name)
        from_training = ((training[i][0].permute(1, 2, 0) + 1) * 127.5).round().numpy().astype(np.uint8)
        np.testing.assert_array_equal(from_training, expected[name], err_msg=name)
        np.testing.assert_array_equal(for_metrics[i].permute(1, 2, 0).numpy(), expected[name], err_msg=name)


def test_corrupt_image_message_names_the_key(folder):
    bad = os.path.join(folder, "broken.png")
    with open(bad, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(CorruptImageError, match=r"broken.png.*skip_corrupt: true"):
        data.read_image(bad)
