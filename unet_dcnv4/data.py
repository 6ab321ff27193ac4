"""Image datasets (built-in photographs, image folders, Hugging Face `datasets`) and the latent cache.

The cache encodes a dataset once with a VAE, stores the posterior mean and std in safetensors shards,
and `LatentDataset` serves them so that training draws a fresh latent from them every step.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import math
import os
import re
import shutil
import struct
import warnings
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

from ._checks import positive_int
from .common import hub_offline, transport_errors
from .progress import progress

__all__ = [
    "IMAGE_EXTENSIONS",
    "LATENT_CACHE_DTYPES",
    "BuiltinImageDataset",
    "CorruptImageError",
    "DataSourceError",
    "HFImageDataset",
    "ImageFolderDataset",
    "LatentDataset",
    "build_image_dataset",
    "build_latent_cache",
    "check_source",
    "is_hub_id",
    "is_image_file",
    "list_image_files",
    "module_fingerprint",
    "read_image",
    "sample_latents",
    "read_rows",
    "shard_layout",
    "latent_scaling_factor",
    "to_rgb",
    "write_shard",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# Photographs that scikit-image ships inside its wheel (no fetch needed); grey ones are stacked to RGB.
_BUILTIN_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "camera", "coins", "moon", "brick", "grass", "gravel",
)
_CACHE_FORMAT = 1
_CACHE_INDEX = "cache.json"
_BUILD_KEY = "build.json"  # in the side folder of a build: the key its finished shards were encoded for
# How the latent cache may store the posterior mean and std, and the safetensors and numpy names of the dtypes.
_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LATENT_CACHE_DTYPES = tuple(_CACHE_DTYPES)
_SAFETENSORS_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_SAFETENSORS_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64}


class CorruptImageError(OSError):
    """An image file that cannot be decoded; the message names the file."""


class DataSourceError(ValueError):
    """A Hugging Face dataset that cannot be read (no `datasets` package, not reachable or cached, no such
    dataset); the message says why and what to pass instead."""


# A Hugging Face Hub dataset id, `namespace/name`. Ids without a namespace are not taken: "mydata" is far more
# likely a folder name with a typo, and the hub serves its former canonical datasets under a namespace.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_hub_id(source: str) -> bool:
    """Whether `source`, not a local path, names a Hugging Face Hub dataset: `namespace/name` whose namespace is no
    local folder either (`data/train` with a folder `data` is a path that does not exist)."""
    return bool(_HUB_ID.fullmatch(source)) and not os.path.exists(source) and \
        not os.path.exists(source.split("/")[0])


def check_source(source: str, name: str = "source") -> None:
    """Raises ValueError, naming the argument `name`, unless `source` is "builtin", a folder or a hub dataset id
    (`is_hub_id`); a path that does not exist is named as the absolute folder looked for."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"{name} must be 'builtin', a folder or a Hugging Face dataset id, got {source!r}")
    if source == "builtin" or os.path.isdir(source) or is_hub_id(source):
        return
    if os.path.isfile(source):
        raise ValueError(f"{name} must be a folder, 'builtin' or a Hugging Face dataset id, got the file {source!r}")
    raise ValueError(f"{name} {source!r} does not exist: no folder {os.path.abspath(source)!r} (expected 'builtin', "
                     "a folder of images, a `datasets` save_to_disk folder or a Hugging Face dataset id 'user/name')")


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a decoded image, the one conversion for training, latent caching and metrics.

    Transparency (RGBA, LA, PA, palette or greyscale with a transparent colour) is composited on white: the
    colours under transparent pixels are arbitrary and must not reach the model or the metric. 16- and 32-bit
    greyscale is scaled to 8 bits (PIL's own conversion would clip it), float images are read as [0, 1],
    CMYK, YCbCr, LAB, palette, 1-bit and greyscale go through PIL's conversion to RGB.
    """
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        scale = 257.0 if image.mode.startswith("I;16") or np.asarray(image).max() <= 65535 else 16843009.0
        grey = (np.asarray(image, dtype=np.float64) / scale).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "F":
        grey = (np.asarray(image, dtype=np.float64).clip(0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def read_image(path: str) -> Image.Image:
    """Decode the image file at `path` into 8-bit RGB (`to_rgb`); raises `CorruptImageError` naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptImageError(
            f"cannot read image {path}: {err}; set skip_corrupt: true to skip unreadable files"
        ) from err


def split_readable(items: list, read, name) -> tuple[list, list[str]]:
    """(the items whose image decodes, the names of those whose image does not), for `skip_corrupt`.

    Args:
        items: what names each image (paths, indices).
        read: item -> decoded image; raises `CorruptImageError` for an unreadable one.
        name: item -> how the skipped item is reported (its file path).
    """
    readable, skipped = [], []
    for item in items:
        try:
            read(item)
            readable.append(item)
        except CorruptImageError:
            skipped.append(name(item))
    return readable, skipped


def is_image_file(name: str) -> bool:
    """The one rule for which files in a folder are images: an image extension, not hidden, not a partial write."""
    return not name.startswith(".") and ".tmp" not in name.lower() and name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(root: str) -> list[str]:
    """Paths relative to `root` of every image under it (`is_image_file`; hidden folders skipped), sorted."""
    if not os.path.isdir(root):
        raise ValueError(f"image folder {root!r} does not exist or is not a folder")
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.relpath(os.path.join(folder, n), root) for n in names if is_image_file(n)]
    return sorted(files)


class _ImageDataset(Dataset, abc.ABC):
    """Shared transform, fingerprint and item layout of the image datasets."""

    kind = "base"

    def __init__(self, resolution: int, center_crop: bool, random_crop: bool, hflip: bool):
        positive_int("resolution", resolution)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_crop = random_crop
        self.hflip = hflip
        self.num_classes = 0
        self.classes: list[str] = []
        self.transform = transforms.Compose(self._transforms())

    def _transforms(self) -> list:
        r = self.resolution
        steps = [transforms.Resize(r, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True)]
        if self.random_crop:
            steps.append(transforms.RandomCrop(r))
        elif self.center_crop:
            steps.append(transforms.CenterCrop(r))
        else:
            # Neither crop: squash the whole image to a square rather than lose its borders.
            steps = [transforms.Resize((r, r), interpolation=transforms.InterpolationMode.BICUBIC, antialias=True)]
        if self.hflip:
            steps.append(transforms.RandomHorizontalFlip())
        steps += [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
        return steps

    @abc.abstractmethod
    def _load(self, index: int) -> tuple[Image.Image, int]:
        """The untransformed RGB image and label of item `index`."""

    @abc.abstractmethod
    def _source_fingerprint(self) -> dict:
        """What identifies the source's items (files, photos, dataset version)."""

    @property
    def deterministic(self) -> bool:
        """True when an index always yields the same pixels (no random crop or flip)."""
        return not (self.random_crop or self.hflip)

    def fingerprint(self) -> str:
        """A stable hex string naming the items and their transform: equal strings, equal pixels."""
        key = {
            "kind": self.kind,
            "source": self._source_fingerprint(),
            "resolution": self.resolution,
            "center_crop": self.center_crop,
            "random_crop": self.random_crop,
            "hflip": self.hflip,
            "num_classes": self.num_classes,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self._load(index)
        return self.transform(image), label  # (3, R, R) in [-1, 1]


class ImageFolderDataset(_ImageDataset):
    """Every image under `root`, found recursively; labels from the first sub-folder when asked."""

    kind = "folder"

    def __init__(
        self,
        root: str,
        resolution: int = 64,
        class_labels: bool = False,
        center_crop: bool = True,
        random_crop: bool = False,
        hflip: bool = False,
        skip_corrupt: bool = False,
    ):
        super().__init__(resolution, center_crop, random_crop, hflip)
        if not os.path.isdir(root):
            raise ValueError(f"root must be a folder of images, got {root!r}")
        self.root = root
        files = list_image_files(root)
        if not files:
            raise ValueError(f"root {root!r} holds no images with extensions {', '.join(IMAGE_EXTENSIONS)}")

        self.skipped: list[str] = []
        if skip_corrupt:
            path = functools.partial(os.path.join, root)
            readable, self.skipped = split_readable(files, lambda rel: read_image(path(rel)), path)
            if self.skipped:
                warnings.warn(f"skipped {len(self.skipped)} unreadable image(s) under {root}, first {self.skipped[0]}")
            if not readable:
                raise ValueError(f"root {root!r} holds no readable images ({len(self.skipped)} unreadable)")
            files = readable
        self.files = files

        if class_labels:
            at_root = [f for f in files if os.sep not in f]
            if at_root:
                raise ValueError(
                    f"class_labels=True needs every image inside a class sub-folder of {root!r}, "
                    f"but {at_root[0]!r} sits at its top level"
                )
            self.classes = sorted({f.split(os.sep, 1)[0] for f in files})
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = [index[f.split(os.sep, 1)[0]] for f in files]
            self.num_classes = len(self.classes)
        else:
            self.labels = [0] * len(files)

        # Size and modification time catch edited files without reading every byte (as make and rsync do).
        listing = []
        for rel in files:
            st = os.stat(os.path.join(root, rel))
            listing.append([rel.replace(os.sep, "/"), st.st_size, st.st_mtime_ns])
        self._listing_hash = hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> tuple[Image.Image, int]:
        return read_image(os.path.join(self.root, self.files[index])), self.labels[index]

    def _source_fingerprint(self) -> dict:
        return {"files": self._listing_hash, "classes": self.classes}


@lru_cache(maxsize=1)
def _builtin_photos() -> tuple[Image.Image, ...]:
    import skimage
    import skimage.data

    photos = []
    for name in _BUILTIN_PHOTOS:
        array = getattr(skimage.data, name)()
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        photos.append(Image.fromarray(array[..., :3].astype(np.uint8)))
    return tuple(photos)


class BuiltinImageDataset(_ImageDataset):
    """Seeded random square crops of the photographs shipped with scikit-image; needs no network.

    Each item is a crop of side between a quarter of the photo's shorter side (at least `resolution`)
    and the whole shorter side, resized to `resolution`. The crop boxes depend only on `seed` and
    `size`, so an index always names the same crop; `hflip` still flips at random.
    """

    kind = "builtin"

    def __init__(self, resolution: int = 64, size: int = 1024, seed: int = 0, hflip: bool = False):
        super().__init__(resolution, center_crop=True, random_crop=False, hflip=hflip)
        positive_int("builtin_size", size)
        self.size = size
        self.seed = seed
        rng = np.random.default_rng(seed)
        shapes = [(p.height, p.width) for p in _builtin_photos()]
        self.boxes = []
        for _ in range(size):
            photo = int(rng.integers(len(shapes)))
            h, w = shapes[photo]
            short = min(h, w)
            side = int(rng.integers(min(short, max(resolution, short // 4)), short + 1))
            top = int(rng.integers(0, h - side + 1))
            left = int(rng.integers(0, w - side + 1))
            self.boxes.append((photo, left, top, side))

    def _transforms(self) -> list:
        steps = [transforms.RandomHorizontalFlip()] if self.hflip else []
        return steps + [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]

    def __len__(self) -> int:
        return self.size

    def _load(self, index: int) -> tuple[Image.Image, int]:
        photo, left, top, side = self.boxes[index]
        crop = _builtin_photos()[photo].crop((left, top, left + side, top + side))
        return crop.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC, reducing_gap=3.0), 0

    def _source_fingerprint(self) -> dict:
        import skimage

        return {"photos": list(_BUILTIN_PHOTOS), "skimage": skimage.__version__, "size": self.size, "seed": self.seed}


class HFImageDataset(_ImageDataset):
    """A Hugging Face `datasets` split (hub name or `save_to_disk` folder) with an image column."""

    kind = "hf"

    def __init__(
        self,
        name_or_path: str,
        resolution: int = 64,
        class_labels: bool = False,
        center_crop: bool = True,
        random_crop: bool = False,
        hflip: bool = False,
        skip_corrupt: bool = False,
        split: str = "train",
        image_column: str | None = None,
        label_column: str | None = None,
    ):
        super().__init__(resolution, center_crop, random_crop, hflip)
        try:
            import datasets
        except ImportError as err:
            raise DataSourceError(
                f"source {name_or_path!r} is not 'builtin' nor an image folder, so it is read as a Hugging Face "
                "dataset, which needs the optional package `datasets` (pip install datasets or "
                "pip install unet_dcnv4[hf])"
            ) from err
        if os.path.isdir(name_or_path):
            loaded = datasets.load_from_disk(name_or_path)
        else:
            loaded = _load_hub_dataset(datasets, name_or_path, split)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"split must be one of {sorted(loaded)} for {name_or_path!r}, got {split!r}")
            loaded = loaded[split]
        self.name = name_or_path
        self.split = split
        self.data = loaded

        columns = list(loaded.column_names)
        if image_column is None:
            found = [c for c, f in loaded.features.items() if isinstance(f, datasets.Image)]
            found += [c for c in ("image", "img") if c in columns and c not in found]
            if not found:
                raise ValueError(f"image_column must be given: no image column among {columns} of {name_or_path!r}")
            image_column = found[0]
        elif image_column not in columns:
            raise ValueError(f"image_column must be one of {columns}, got {image_column!r}")
        self.image_column = image_column

        self.label_column = None
        self._label_map: dict[str, int] | None = None
        if class_labels:
            if label_column is None:
                found = [c for c in ("label", "labels", "class", "fine_label") if c in columns]
                if not found:
                    raise ValueError(f"label_column must be given: no label column among {columns}")
                label_column = found[0]
            elif label_column not in columns:
                raise ValueError(f"label_column must be one of {columns}, got {label_column!r}")
            self.label_column = label_column
            feature = loaded.features[label_column]
            if isinstance(feature, datasets.ClassLabel):
                self.classes = list(feature.names)
            else:
                self.classes = [str(v) for v in sorted(set(loaded[label_column]))]
                self._label_map = {c: i for i, c in enumerate(self.classes)}
            self.num_classes = len(self.classes)

        self.indices = list(range(len(loaded)))
        self.skipped: list[str] = []
        if skip_corrupt:
            readable, self.skipped = split_readable(self.indices, self._image, lambda i: f"{name_or_path}[{i}]")
            if self.skipped:
                warnings.warn(f"skipped {len(self.skipped)} unreadable image(s) in {name_or_path}")
            self.indices = readable

    def _image(self, i: int) -> Image.Image:
        try:
            value = self.data[i][self.image_column]
            if isinstance(value, dict) and value.get("path") and value.get("bytes") is None:
                return read_image(value["path"])
            if not isinstance(value, Image.Image):
                raise TypeError(f"column {self.image_column!r} holds {type(value).__name__}, not an image")
            value.load()
            return to_rgb(value)
        except (OSError, SyntaxError, ValueError, TypeError) as err:
            if isinstance(err, CorruptImageError):
                raise
            raise CorruptImageError(f"cannot read image {self.name}[{i}]: {err}") from err

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, index: int) -> tuple[Image.Image, int]:
        i = self.indices[index]
        label = 0
        if self.label_column is not None:
            value = self.data[i][self.label_column]
            label = int(value) if self._label_map is None else self._label_map[str(value)]
        return self._image(i), label

    def _source_fingerprint(self) -> dict:
        return {
            "name": self.name,
            "split": self.split,
            "data": getattr(self.data, "_fingerprint", None) or len(self.data),
            "image_column": self.image_column,
            "label_column": self.label_column,
            "skipped": self.skipped,
        }


def _load_hub_dataset(datasets, name: str, split: str):
    """`datasets.load_dataset(name, split=split)`, a failure to reach or find it as a `DataSourceError`."""

    try:
        return datasets.load_dataset(name, split=split)
    except (OSError, TimeoutError, *transport_errors()) as err:
        if hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE"):
            reason = "the Hugging Face Hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not cached"
        else:
            reason = "it could not be fetched from the Hugging Face Hub (no connection, or no such dataset there)"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataSourceError(
            f"cannot load the Hugging Face dataset {name!r}: {reason}. Save it where there is network "
            f"(datasets.load_dataset({name!r}).save_to_disk(FOLDER)) and pass that folder, or a folder of images. "
            f"({type(err).__name__}: {detail})"
        ) from err


def build_image_dataset(
    source: str = "builtin",
    resolution: int = 64,
    class_labels: bool = False,
    center_crop: bool = True,
    random_crop: bool = False,
    hflip: bool = False,
    skip_corrupt: bool = False,
    builtin_size: int = 1024,
    builtin_seed: int = 0,
    hf_split: str = "train",
) -> Dataset:
    """Build an image dataset whose items are `(image, label)`.

    Args:
        source: "builtin" (seeded crops of scikit-image's photographs, no network), a folder searched
            recursively for images, or a Hugging Face `datasets` `save_to_disk` folder (a folder holding
            `dataset_info.json`, `state.json` or `dataset_dict.json`) or hub id `namespace/name` (`is_hub_id`).
            Anything else is a ValueError naming the absolute folder looked for (`check_source`).
        resolution: side R of the square images.
        class_labels: labels from the first sub-folder (folders) or the label column (datasets);
            otherwise every label is 0 and `num_classes` is 0.
        center_crop: resize the shorter side to R, then crop the centre; with neither crop the whole
            image is resized to R x R.
        random_crop: crop at a random place instead (overrides center_crop).
        hflip: flip horizontally at random.
        skip_corrupt: skip unreadable images (listed in `dataset.skipped`) instead of raising
            `CorruptImageError`, which names the file.
        builtin_size: number of crops of the built-in source.
        builtin_seed: seed of the built-in crop boxes.
        hf_split: split of a Hugging Face dataset.

    Returns:
        A dataset of `(image (3, R, R) float in [-1, 1], label int)` with `fingerprint()`,
        `num_classes` and `classes`.
    """
    check_source(source)
    if source == "builtin":
        return BuiltinImageDataset(resolution, size=builtin_size, seed=builtin_seed, hflip=hflip)
    options = dict(
        resolution=resolution, class_labels=class_labels, center_crop=center_crop,
        random_crop=random_crop, hflip=hflip, skip_corrupt=skip_corrupt,
    )
    saved_markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if os.path.isdir(source) and not any(os.path.exists(os.path.join(source, m)) for m in saved_markers):
        return ImageFolderDataset(source, **options)
    return HFImageDataset(source, split=hf_split, **options)


def module_fingerprint(module) -> str:
    """Hash of a model's config (public keys) and weights: equal hashes compute alike (a VAE, a U-Net).

    Keys that diffusers filled in with the class default because the saved config.json lacks them (its
    `_use_default_values`: options the class gained after the folder was saved, whose defaults keep the old
    behaviour) are left out, so that a new option does not change the fingerprint of every saved model and
    orphan the samples made from it.
    """
    h = hashlib.sha256()
    config = dict(getattr(module, "config", {}) or {})
    filled = set(config.get("_use_default_values") or ())
    config = {k: v for k, v in config.items() if not k.startswith("_") and k not in filled}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _config_scale(vae) -> tuple[float, float] | None:
    """(scaling_factor, shift_factor) from the VAE config, or None when it states none of its own."""
    config = dict(getattr(vae, "config", {}) or {})
    factor = config.get("scaling_factor")
    # diffusers lists keys missing from a loaded config.json in `_use_default_values`: such a factor is
    # the class default, not one measured for these weights.
    if factor is None or "scaling_factor" in (config.get("_use_default_values") or []):
        return None
    if not isinstance(factor, (int, float)) or not factor > 0:
        return None
    shift = config.get("shift_factor")
    return float(factor), float(shift) if isinstance(shift, (int, float)) else 0.0


def _read_index(cache_dir: str) -> dict | None:
    path = os.path.join(cache_dir, _CACHE_INDEX)
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError):
        return None
    for shard in index.get("shards", []):
        file = os.path.join(cache_dir, shard["file"])
        if not os.path.isfile(file) or os.path.getsize(file) != shard["bytes"]:
            return None
    return index


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def write_shard(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write one cache shard atomically: to a side file first, renamed into place once complete, so that a shard
    file that exists is a whole one (what lets an interrupted build resume from it).

    Args:
        path: the shard's file.
        tensors: "mean" and "std" (N, c, h, w) in the cache's dtype, "mean_flip" and "std_flip" with flips,
            "labels" (N,) int64.
        metadata: "start" (the first image's index) and "count" (N) as strings, and "stats", the JSON list of
            the sums `latent_scaling_factor` takes, over the shard's float32 latents.
    """
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def _encode_shard(dataset, vae, indices, flips, batch_size, num_workers, dtype):
    """The tensors of one shard (see `write_shard`) and the sums over its float32 latents."""
    device = next(vae.parameters()).device
    vae_dtype = next(vae.parameters()).dtype
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    stats = torch.zeros(3, dtype=torch.float64)  # sum of m, sum of m^2 + s^2, count
    buffers: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "mean_flip": [], "std_flip": [], "labels": []}
    for images, labels in loader:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"dataset images must be (3, H, W), got a batch of shape {tuple(images.shape)}")
        x = images.to(device=device, dtype=vae_dtype)
        if flips:
            x = torch.cat([x, x.flip(-1)])
        posterior = vae.encode(x).latent_dist
        mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()  # (B or 2B, c, h, w)
        stats += torch.stack([mean.double().sum(), (mean.double() ** 2 + std.double() ** 2).sum(),
                              torch.tensor(float(mean.numel()), dtype=torch.float64)])
        n = images.shape[0]
        mean, std = mean.to(dtype), std.to(dtype)
        buffers["mean"].append(mean[:n])
        buffers["std"].append(std[:n])
        if flips:
            buffers["mean_flip"].append(mean[n:])
            buffers["std_flip"].append(std[n:])
        buffers["labels"].append(torch.as_tensor(labels, dtype=torch.int64).reshape(-1))
    return {k: torch.cat(v) for k, v in buffers.items() if v}, stats.tolist()


def build_latent_cache(
    dataset,
    vae,
    cache_dir: str,
    resolution: int,
    vae_id: str,
    batch_size: int = 32,
    accelerator=None,
    flips: bool = True,
    scaling_factor: float | str | None = "config",
    num_workers: int = 0,
    shard_size: int = 8192,
    dtype: str = "float32",
) -> str:
    """Encode `dataset` once with `vae` into safetensors shards under `cache_dir`, unless it already holds them.

    The cache is reused only when its index records the same dataset fingerprint, resolution, VAE
    hash (config and weights), flips, scaling option and dtype; otherwise it is built in a side folder
    `cache_dir + ".partial"` and swapped in, so an unfinished build never looks complete. Shard k holds
    images k * shard_size onwards and is written whole or not at all: a build interrupted and started again
    with the same key and `shard_size`, on any number of processes, encodes only the shards still missing.

    Args:
        dataset: items `(image (3, R, R) in [-1, 1], label)`, deterministic (no random crop or flip),
            with `fingerprint()` and `num_classes` (see `build_image_dataset`).
        vae: an `AutoencoderKL` or anything with `encode(x).latent_dist.mean/.std`, `config`,
            `parameters()` and `state_dict()`; encoding runs on its device and dtype.
        cache_dir: folder of this cache; it must be absent, empty or an earlier cache (never another folder).
        resolution: R, checked against the dataset's images.
        vae_id: name of the VAE (hub id or path), recorded for people reading the index.
        batch_size: images per encoder call (twice as many with flips).
        accelerator: an `accelerate.Accelerator`; each process encodes every num_processes-th shard, the main
            one writes the index.
        flips: also cache the horizontally flipped images (items N..2N-1 of `LatentDataset`).
        scaling_factor: "config" takes the VAE config's `scaling_factor` (and `shift_factor`) when the
            config states one, else measures; None measures 1/std of the latents over the data; a
            float is used as given. A config "states none" when it lacks the key or diffusers lists
            it in `_use_default_values` (an `AutoencoderKL` built without one, or loaded from a
            config.json without one). The index records the factor and where it came from.
        num_workers: DataLoader workers for reading images.
        shard_size: images per shard file.
        dtype: how the posterior mean and std are stored, one of `LATENT_CACHE_DTYPES`: "float32" (exact),
            "float16" or "bfloat16" (half the disk and page cache, rounded; the scaling factor is measured
            on the float32 latents either way).

    Returns:
        `cache_dir`.
    """
    if getattr(dataset, "resolution", resolution) != resolution:
        raise ValueError(f"resolution must match the dataset's ({dataset.resolution}), got {resolution}")
    if not getattr(dataset, "deterministic", True):
        raise ValueError(
            "dataset must be deterministic to be cached (random_crop=False, hflip=False); "
            "flips=True caches the mirrored images instead"
        )
    if not (scaling_factor in ("config", None) or (isinstance(scaling_factor, (int, float)) and scaling_factor > 0)):
        raise ValueError(f"scaling_factor must be 'config', None or a positive float, got {scaling_factor!r}")
    if dtype not in LATENT_CACHE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(LATENT_CACHE_DTYPES)}, got {dtype!r}")
    positive_int("shard_size", shard_size)
    if len(dataset) == 0:
        raise ValueError("dataset must hold at least one image, got an empty dataset")
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    is_main = rank == 0

    expected = {
        "format": _CACHE_FORMAT,
        "dataset_fingerprint": dataset.fingerprint(),
        "resolution": resolution,
        "vae_hash": module_fingerprint(vae),
        "flips": bool(flips),
        "scaling_factor_option": scaling_factor,
        "num_images": len(dataset),
        "dtype": dtype,
    }
    cache_dir = os.path.abspath(cache_dir)
    index = _read_index(cache_dir)
    # Caches written before the dtype option hold float32.
    if index is not None and all(index.get(k, "float32" if k == "dtype" else None) == v for k, v in expected.items()):
        return cache_dir
    if os.path.isdir(cache_dir) and os.listdir(cache_dir) and not os.path.exists(os.path.join(cache_dir, _CACHE_INDEX)):
        raise ValueError(f"cache_dir {cache_dir!r} is a non-empty folder that holds no latent cache; pick another")

    build_dir = cache_dir + ".partial"
    build_key = dict(expected, shard_size=shard_size)
    build_file = os.path.join(build_dir, _BUILD_KEY)
    if accelerator is not None:
        accelerator.wait_for_everyone()  # everyone has read the old index before the main process touches it
    if is_main:
        try:
            with open(build_file) as f:
                resumable = json.load(f) == build_key
        except (OSError, ValueError):
            resumable = False
        if not resumable:  # another cache's shards, or none: start afresh
            shutil.rmtree(build_dir, ignore_errors=True)
            os.makedirs(build_dir)
            with open(build_file + ".tmp", "w") as f:
                json.dump(build_key, f)
            os.replace(build_file + ".tmp", build_file)
    if accelerator is not None:
        accelerator.wait_for_everyone()

    n = len(dataset)
    num_shards = -(-n // shard_size)
    todo = [k for k in range(rank, num_shards, world) if not os.path.isfile(os.path.join(build_dir, _shard_name(k)))]
    was_training = getattr(vae, "training", False)
    vae.eval()
    failure = None
    try:
        with torch.no_grad():
            for k in progress(todo, desc=f"encoding latents (rank {rank}, shards)", disable=not is_main):
                start, stop = k * shard_size, min(n, (k + 1) * shard_size)
                tensors, stats = _encode_shard(dataset, vae, list(range(start, stop)), flips, batch_size,
                                               num_workers, _CACHE_DTYPES[dtype])
                write_shard(os.path.join(build_dir, _shard_name(k)), tensors,
                            {"start": str(start), "count": str(stop - start), "stats": json.dumps(stats)})
    except CorruptImageError as err:
        failure = err
    finally:
        vae.train(was_training)
    if world > 1:
        # An unreadable image stops every process with its message, not only the one that met it: the others
        # would otherwise wait at the next barrier until the launcher tears them down or the group times out.
        from accelerate.utils import gather_object

        failures = [f for f in gather_object([None if failure is None else str(failure)]) if f is not None]
        if failures:
            raise failure or CorruptImageError(failures[0])
    elif failure is not None:
        raise failure
    if accelerator is not None:
        accelerator.wait_for_everyone()

    if is_main:
        shards, total = [], np.zeros(3)
        for k in range(num_shards):
            name = _shard_name(k)
            with safe_open(os.path.join(build_dir, name), framework="pt") as f:
                meta = f.metadata()
                if k == 0:
                    latent_shape = list(f.get_slice("mean").get_shape()[1:])  # (c, h, w)
            shards.append({"file": name, "start": int(meta["start"]), "count": int(meta["count"]),
                           "bytes": os.path.getsize(os.path.join(build_dir, name))})
            total += np.asarray(json.loads(meta["stats"]))  # summed in shard order: the same on any process count
        assert [s["start"] for s in shards] == [k * shard_size for k in range(num_shards)]

        if scaling_factor == "config" and _config_scale(vae) is not None:
            factor, shift = _config_scale(vae)
            source = "config"
        elif scaling_factor is None or scaling_factor == "config":
            factor, shift, source = latent_scaling_factor(*total), 0.0, "measured"
        else:
            factor, shift, source = float(scaling_factor), 0.0, "given"

        index = dict(
            expected,
            vae_id=vae_id,
            scaling_factor=factor,
            shift_factor=shift,
            scaling_factor_source=source,
            latent_channels=latent_shape[0],
            latent_shape=latent_shape,
            num_classes=int(getattr(dataset, "num_classes", 0)),
            classes=list(getattr(dataset, "classes", [])),
            length=n * (2 if flips else 1),
            shards=shards,
        )
        os.remove(build_file)
        with open(os.path.join(build_dir, _CACHE_INDEX), "w") as f:
            json.dump(index, f, indent=1)
        shutil.rmtree(cache_dir, ignore_errors=True)
        os.replace(build_dir, cache_dir)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return cache_dir


def shard_layout(path: str) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """Every tensor of a safetensors file, by name: (numpy dtype, shape, byte offset of its data in the file), in
    the file's dtype (bfloat16 as uint16 bits: numpy has no bfloat16). Reads the header only.

    The layout is the safetensors format's: an 8-byte little-endian header length, a JSON header giving each
    tensor's dtype, shape and byte range `data_offsets` relative to the end of the header, then the data,
    C-contiguous and little-endian.
    """
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    size = os.path.getsize(path)
    layout = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_NUMPY:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, expected one of "
                             f"{', '.join(_SAFETENSORS_NUMPY)}")
        np_dtype = np.dtype(_SAFETENSORS_NUMPY[info["dtype"]]).newbyteorder("<")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != math.prod(shape) * np_dtype.itemsize or 8 + length + end > size:
            raise ValueError(f"{path}: tensor {name!r} of shape {shape} spans bytes {begin}..{end} of the data, "
                             f"which the file ({size} bytes) does not hold")
        layout[name] = (np_dtype, shape, 8 + length + begin)
    return layout


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 1024


def read_rows(fd: int, offset: int, row_bytes: int, rows, buffers: list) -> None:
    """buffers[j] = row rows[j] (of `row_bytes` bytes each) of the array at byte `offset` of the open file `fd`, by
    positioned reads (`os.preadv`, one per run of consecutive rows): the pages come from the page cache, shared
    by every process, and none is mapped into this one. Raises OSError on a short read."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    # Runs of consecutive rows, cut at the number of buffers one call takes.
    starts = np.flatnonzero((np.diff(sorted_rows, prepend=-2) != 1) | (np.arange(len(rows)) % _IOV_MAX == 0))
    order, sorted_rows, starts = order.tolist(), sorted_rows.tolist(), starts.tolist()
    for a, b in zip(starts, starts[1:] + [len(order)]):
        got = os.preadv(fd, [buffers[j] for j in order[a:b]], offset + sorted_rows[a] * row_bytes)
        if got != (b - a) * row_bytes:
            raise OSError(f"read {got} of {(b - a) * row_bytes} bytes at row {sorted_rows[a]}: the file is shorter "
                          "than its header says")


class LatentDataset(Dataset):
    """The latents of a cache built by `build_latent_cache`, scaled for the diffusion model.

    Items are `{"mean": (c, h, w), "std": (c, h, w), "class_labels": int}` in float32 with
    `mean = (posterior_mean - shift_factor) * scaling_factor` and `std = posterior_std * scaling_factor`;
    with flips cached, items N..2N-1 are the mirrored images. Draw the latent with `sample_latents`.

    The shards are read by positioned reads of the rows a batch needs (`read_rows`), each process and
    DataLoader worker opening them on first use, and scaled per batch (`__getitems__`): every process of a node
    shares one copy of the data in the page cache, and a process holds only the class labels (L,) and the batch
    it reads; nothing of the cache is mapped into it (mapped pages would count in its RSS once read). Use
    `first_means` for a fixed sample of the means rather than reading them all.
    """

    def __init__(self, cache_dir: str):
        index = _read_index(cache_dir)
        if index is None:
            raise ValueError(f"cache_dir {cache_dir!r} holds no complete latent cache; run build_latent_cache first")
        if index.get("format") != _CACHE_FORMAT:
            found = index.get("format")
            raise ValueError(f"cache_dir {cache_dir!r} has cache format {found}, expected {_CACHE_FORMAT}; "
                             "delete it and run build_latent_cache (train_ldm.py does) to rebuild it")
        self.cache_dir = cache_dir
        self.index = index
        self.dtype = index.get("dtype", "float32")  # caches written before the dtype option hold float32
        if self.dtype not in LATENT_CACHE_DTYPES:
            raise ValueError(f"cache_dir {cache_dir!r} has dtype {self.dtype!r}, expected one of "
                             f"{', '.join(LATENT_CACHE_DTYPES)}")
        self.scaling_factor = float(index["scaling_factor"])
        self.shift_factor = float(index["shift_factor"])
        self.latent_shape = tuple(index["latent_shape"])
        self.num_classes = int(index["num_classes"])
        self.classes = list(index["classes"])
        self.flips = bool(index["flips"])
        self.num_images = sum(s["count"] for s in index["shards"])
        self._starts = np.asarray([s["start"] for s in index["shards"]], dtype=np.int64)
        found = self.num_images * (2 if self.flips else 1)
        if found != index["length"] or list(self._starts) != list(np.cumsum([0] + [s["count"] for s in
                                                                                    index["shards"][:-1]])):
            raise ValueError(f"cache_dir {cache_dir!r} holds {found} latents, its index says {index['length']}")
        self._files: dict[int, tuple[int, dict]] = {}  # shard -> (file descriptor, layout)
        labels = []
        for k, shard in enumerate(index["shards"]):
            dtype, shape, offset = self._shard(k)[1]["labels"]
            labels.append(torch.from_numpy(np.fromfile(os.path.join(cache_dir, shard["file"]), dtype=dtype,
                                                       count=math.prod(shape), offset=offset).astype(np.int64)))
        labels = torch.cat(labels)
        self.labels = torch.cat([labels, labels]) if self.flips else labels  # (L,) int64

    def __getstate__(self) -> dict:
        # The open files are not pickled: a DataLoader worker or another process opens the shards on first use.
        return dict(self.__dict__, _files={})

    def __del__(self):
        for fd, _ in getattr(self, "_files", {}).values():
            os.close(fd)

    def _shard(self, k: int) -> tuple[int, dict]:
        if k not in self._files:
            path = os.path.join(self.cache_dir, self.index["shards"][k]["file"])
            layout = shard_layout(path)
            expected = np.dtype(_SAFETENSORS_NUMPY[_SAFETENSORS_NAMES[self.dtype]])
            found = {name: dtype.str for name, (dtype, _, _) in layout.items() if name != "labels"}
            if any(np.dtype(v) != expected for v in found.values()):
                raise ValueError(f"cache_dir {self.cache_dir!r}: shard {self.index['shards'][k]['file']} holds "
                                 f"{found}, its index says {self.dtype}; delete the cache and rebuild it")
            self._files[k] = (os.open(path, os.O_RDONLY), layout)
        return self._files[k]

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean (B, c, h, w), std (B, c, h, w), class labels (B,)) of the items `indices`, scaled, float32."""
        i = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).numpy()
        length = len(self)
        if len(i) and (i.min() < -length or i.max() >= length):
            bad = i[(i < -length) | (i >= length)][0]
            raise IndexError(f"index {bad} is out of range for a LatentDataset of {length} latents")
        i = i % max(length, 1)
        flipped = i >= self.num_images
        image = i - flipped * self.num_images
        shard = np.searchsorted(self._starts, image, side="right") - 1
        stored = np.dtype(_SAFETENSORS_NUMPY[_SAFETENSORS_NAMES[self.dtype]])
        mean = np.empty((len(i), *self.latent_shape), dtype=stored)
        std = np.empty_like(mean)
        mean_rows, std_rows = ([memoryview(row).cast("B") for row in a] for a in (mean, std))
        row_bytes = math.prod(self.latent_shape) * stored.itemsize
        group = flipped * len(self._starts) + shard  # the rows of each shard and side (flipped or not)
        for g in np.unique(group):
            rows = np.flatnonzero(group == g)
            k, suffix = int(shard[rows[0]]), "_flip" if flipped[rows[0]] else ""
            (fd, layout), local = self._shard(k), image[rows] - self._starts[k]
            for name, views in (("mean", mean_rows), ("std", std_rows)):
                _, _, offset = layout[name + suffix]
                read_rows(fd, offset, row_bytes, local, [views[j] for j in rows.tolist()])
        storage = _CACHE_DTYPES[self.dtype]
        mean, std = (torch.from_numpy(a).view(storage) for a in (mean, std))
        # The same float32 operations as on the whole cache: an item is bit for bit what it was when read eagerly.
        mean = (mean.float() - self.shift_factor) * self.scaling_factor
        std = std.float() * self.scaling_factor
        return mean, std, self.labels[torch.from_numpy(i)]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        # The DataLoader's batched fetch: the whole batch in one `read`.
        mean, std, labels = self.read(indices)
        items = zip(mean.unbind(), std.unbind(), labels.tolist())
        return [{"mean": m, "std": s, "class_labels": c} for m, s, c in items]

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def first_means(self, n: int) -> torch.Tensor:
        """The scaled posterior means of the first min(n, L) items, (n, c, h, w) float32."""
        return self.read(range(min(n, len(self))))[0]


def latent_scaling_factor(sum_mean: float, sum_second_moment: float, count: float) -> float:
    """1 / std of latents sampled from diagonal Gaussian posteriors N(m, s^2), from sums over every element:
    the sampled latents' variance is E[m^2 + s^2] - E[m]^2.

    Args:
        sum_mean: the sum of the posterior means m.
        sum_second_moment: the sum of m^2 + s^2.
        count: the number of elements summed.
    """
    var = sum_second_moment / count - (sum_mean / count) ** 2
    return 1.0 / math.sqrt(max(var, 1e-12))


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw `mean + std * eps`, eps ~ N(0, I) from `generator` (same device as `mean`), shapes (..., c, h, w)."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * eps
