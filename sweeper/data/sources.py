"""Dataset sources: each decodes its files once into uint8 tensors (N x 3 x H x W) and int64 labels.

Real datasets go through torchvision's own dataset classes, so the real on-disk formats are read by
real code (and downloaded by it when ``data.download`` is on and the network allows). The embedded
default, ``digits``, ships inside scikit-learn and needs no network at all; ``synthetic`` is generated.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from sweeper.config import DataConfig

__all__ = ["DATASETS", "DatasetSpec", "DatasetUnavailable", "Decoded", "default_dir"]

_SYNTHETIC_SEED = 1234  # fixed: every trial, whatever its seed, sees the same synthetic data
# STL-10 ships no class_names.txt in some mirrors; these are the official names, in label order.
_STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


class DatasetUnavailable(Exception):
    """A real dataset is not on disk (and may not or could not be downloaded); the message says what to do."""


@dataclass(frozen=True)
class Decoded:
    train_x: torch.Tensor  # uint8 N x 3 x H x W
    train_y: torch.Tensor  # int64 N
    test_x: torch.Tensor | None  # None: the source has no official test split; a fixed one is carved
    test_y: torch.Tensor | None
    classes: list[str]


@dataclass(frozen=True)
class DatasetSpec:
    decode: Callable[[DataConfig, Path, int], Decoded]  # (cfg, directory, resolution)
    native_resolution: int
    num_classes: int | None  # None: depends on the config or the files (synthetic, imagefolder)
    needs_files: bool  # a real dataset, looked for on disk
    expected: str  # what is looked for, for error messages
    flip: bool = True  # is a mirrored image still of its class? (data.flip=None uses this)
    # Extra cache-key text that changes when the files do; for user folders, which change under us.
    stamp: Callable[[Path], str] | None = None


def default_dir(name: str) -> Path:
    from sweeper.data.cache import cache_root

    return cache_root() / "data" / name


def _unavailable(name: str, directory: Path, expected: str, *, cause: str | None = None,
                 downloadable: bool = True) -> DatasetUnavailable:
    if cause is None:
        what = f"dataset {name!r} not found in {directory} (looked for {expected})."
    else:
        what = f"dataset {name!r} could not be read from {directory} (looked for {expected}): {cause}."
    download = "set data.download=true when online, " if downloadable else ""
    return DatasetUnavailable(f"{what} Put the files there, pass --data-dir DIR (data.dir=DIR), "
                              f"{download}or use data.name=digits (embedded, offline).")


def _resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 N x 3 x h x w -> uint8 N x 3 x r x r (bilinear; antialiased when shrinking)."""
    if x.shape[-2:] == (resolution, resolution):
        return x.contiguous()
    out = torch.empty(len(x), x.shape[1], resolution, resolution, dtype=torch.uint8)
    for start in range(0, len(x), 512):  # float copies of a whole dataset would not fit in memory
        chunk = x[start:start + 512].float()
        y = F.interpolate(chunk, size=(resolution, resolution), mode="bilinear", align_corners=False,
                          antialias=min(x.shape[-2:]) > resolution)
        out[start:start + 512] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _hwc_to_chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


# ---- embedded ---------------------------------------------------------------------------------------


def _digits(cfg: DataConfig, directory: Path, resolution: int) -> Decoded:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 grey levels 0..16 -> 0..255, upsampled, and replicated to RGB so every model sees 3 channels.
    grey = torch.from_numpy(digits.images * (255.0 / 16.0)).float()[:, None]
    x = F.interpolate(grey, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return Decoded(x, torch.from_numpy(digits.target).long(), None, None,
                   [str(i) for i in range(10)])


def _synthetic(cfg: DataConfig, directory: Path, resolution: int) -> Decoded:
    """Class c = a sine grating at angle pi*c/C (jittered by +-0.3 of the gap between classes).

    Orientation is the only cue: colour, brightness, phase and spatial frequency vary per image as
    nuisances, over Gaussian pixel noise. A small CNN learns 10 classes within a few epochs, while
    100 classes stay hard enough for architectures to differ. Mirroring changes the angle, i.e. the
    class, so the dataset's default is no flip.
    """
    n, k, r = cfg.synthetic_size, cfg.synthetic_classes, resolution
    g = torch.Generator().manual_seed(_SYNTHETIC_SEED)
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]  # balanced classes
    coords = torch.arange(r, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    x = torch.empty(n, 3, r, r, dtype=torch.uint8)
    for start in range(0, n, 1024):  # bounded float memory for large sizes or resolutions
        y = labels[start:start + 1024]
        m = len(y)
        angle = (math.pi / k) * (y.float() + 0.6 * (torch.rand(m, generator=g) - 0.5))
        cycles = 2.0 + 2.0 * torch.rand(m, generator=g)  # 2..4 periods across the image
        phase = 2 * math.pi * torch.rand(m, generator=g)
        hue = 0.3 + 0.6 * torch.rand(m, 3, generator=g)
        colour = hue * (0.7 + 0.3 * torch.rand(m, 1, generator=g))  # and brightness
        proj = torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy
        wave = torch.sin((2 * math.pi / r) * cycles[:, None, None] * proj + phase[:, None, None])
        img = colour[:, :, None, None] * (0.5 + 0.5 * wave[:, None])
        img += 0.15 * torch.randn(m, 3, r, r, generator=g)
        x[start:start + m] = img.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return Decoded(x, labels.long(), None, None, [f"class{i}" for i in range(k)])


# ---- torchvision datasets ---------------------------------------------------------------------------


def _open(cls: type, name: str, cfg: DataConfig, directory: Path, expected: str, **kwargs: Any):
    """Construct a torchvision dataset; its "not found"/offline failures become DatasetUnavailable."""
    present = (directory / expected.split("/")[0]).exists()
    try:
        return cls(str(directory), download=cfg.download, **kwargs)
    except RuntimeError as exc:
        # torchvision 0.29 raises RuntimeError("Dataset not found or corrupted. ...") both when the
        # files are absent and when an md5 differs from the official release; tell the two apart.
        text = str(exc)
        if "not found" not in text.lower() and "corrupt" not in text.lower():
            raise
        if present and not cfg.download:
            cause = (f"the folder is there but torchvision rejected it ({text}); a file is missing, "
                     "truncated, or differs from the official release (torchvision checks md5 sums)")
            raise _unavailable(name, directory, expected, cause=cause) from None
        raise _unavailable(name, directory, expected) from None
    except OSError as exc:  # URLError, timeouts, missing files inside a present folder
        cause = f"download failed ({exc})" if cfg.download else f"{type(exc).__name__}: {exc}"
        raise _unavailable(name, directory, expected, cause=cause) from None


def _cifar(name: str, cls_name: str, expected: str) -> Callable[[DataConfig, Path, int], Decoded]:
    def decode(cfg: DataConfig, directory: Path, resolution: int) -> Decoded:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        train = _open(cls, name, cfg, directory, expected, train=True)
        test = _open(cls, name, cfg, directory, expected, train=False)
        # CIFAR100 reads 'fine_labels' into .targets and 'fine_label_names' into .classes.
        return Decoded(_resize(_hwc_to_chw(train.data), resolution),
                       torch.as_tensor(train.targets, dtype=torch.long),
                       _resize(_hwc_to_chw(test.data), resolution),
                       torch.as_tensor(test.targets, dtype=torch.long), list(train.classes))

    return decode


_STL10_EXPECTED = ("stl10_binary/ (train_X.bin, train_y.bin, test_X.bin, test_y.bin and "
                   "unlabeled_X.bin: torchvision checks all five for every split)")


def _stl10(cfg: DataConfig, directory: Path, resolution: int) -> Decoded:
    import torchvision.datasets as tvd

    train = _open(tvd.STL10, "stl10", cfg, directory, _STL10_EXPECTED, split="train")
    test = _open(tvd.STL10, "stl10", cfg, directory, _STL10_EXPECTED, split="test")
    # .data is already N x 3 x 96 x 96 (torchvision transposes the column-major files); labels 0-based.
    return Decoded(_resize(torch.from_numpy(train.data), resolution),
                   torch.as_tensor(train.labels, dtype=torch.long),
                   _resize(torch.from_numpy(test.data), resolution),
                   torch.as_tensor(test.labels, dtype=torch.long),
                   list(getattr(train, "classes", _STL10_CLASSES)))


def _image_loader(resolution: int) -> Callable[[str], torch.Tensor]:
    """A torchvision ``loader``: path -> uint8 3 x r x r, shorter side to r then a centre crop."""
    from PIL import Image, ImageOps

    def load(path: str) -> torch.Tensor:
        try:
            with Image.open(path) as im:
                # JPEG decodes at 1/2, 1/4 or 1/8 scale almost for free; ask for the smallest scale
                # that still covers the target (a no-op for other formats). Food-101 decodes ~5x faster.
                im.draft("RGB", (resolution, resolution))
                im = ImageOps.fit(im.convert("RGB"), (resolution, resolution),
                                  method=Image.Resampling.BILINEAR)
                return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
        except OSError as exc:
            # "Truncated File Read" named no file: in a folder of thousands the user could not find it.
            if str(path) in str(exc):
                raise
            raise OSError(f"{path}: {exc}") from exc

    return load


def _decode_images(dataset: Any, name: str, directory: Path, resolution: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (image, label) of a torchvision dataset whose loader is :func:`_image_loader`."""
    n = len(dataset)
    x = torch.empty(n, 3, resolution, resolution, dtype=torch.uint8)
    y = torch.empty(n, dtype=torch.long)

    def one(i: int) -> None:
        x[i], y[i] = dataset[i]

    # PIL releases the GIL while decoding and resizing, so threads scale without worker processes.
    workers = min(8, os.cpu_count() or 1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(one, range(n)):
                pass
    except OSError as exc:  # a file listed but missing, or not an image (PIL's UnidentifiedImageError)
        raise DatasetUnavailable(f"dataset {name!r} in {directory} is incomplete: {exc} (remove or "
                                 "replace that file)") from None
    return x, y


_FOOD101_EXPECTED = "food-101/meta/{train,test}.json and food-101/images/"


def _food101(cfg: DataConfig, directory: Path, resolution: int) -> Decoded:
    import torchvision.datasets as tvd

    loader = _image_loader(resolution)
    train = _open(tvd.Food101, "food101", cfg, directory, _FOOD101_EXPECTED, split="train",
                  loader=loader)
    test = _open(tvd.Food101, "food101", cfg, directory, _FOOD101_EXPECTED, split="test",
                 loader=loader)
    train_x, train_y = _decode_images(train, "food101", directory, resolution)
    test_x, test_y = _decode_images(test, "food101", directory, resolution)
    return Decoded(train_x, train_y, test_x, test_y, list(train.classes))


_IMAGEFOLDER_EXPECTED = "one subfolder of images per class, or train/ and test/ (or val/) folders of those"


def _imagefolder_layout(directory: Path) -> tuple[Path, Path | None]:
    """(train root, test root or None). A train/ folder alone is the training set, not a class."""
    train = directory / "train"
    if not train.is_dir():
        return directory, None
    test = next((directory / d for d in ("test", "val") if (directory / d).is_dir()), None)
    return train, test


def _imagefolder_stamp(directory: Path) -> str:
    """Newest mtime of the folder and the two levels below (class folders): adding or removing
    images changes it, so a changed folder is decoded again instead of served stale from the cache."""
    try:
        newest = directory.stat().st_mtime_ns
        for sub in os.scandir(directory):
            if sub.is_dir():
                newest = max(newest, sub.stat().st_mtime_ns)
                for subsub in os.scandir(sub.path):
                    if subsub.is_dir():
                        newest = max(newest, subsub.stat().st_mtime_ns)
    except OSError:  # absent: the decode reports it
        return "absent"
    return str(newest)


def _imagefolder(cfg: DataConfig, directory: Path, resolution: int) -> Decoded:
    import torchvision.datasets as tvd

    if cfg.dir is None:
        raise DatasetUnavailable(
            "data.dir=None: data.name='imagefolder' needs data.dir=DIR (--data-dir DIR), a folder "
            f"with {_IMAGEFOLDER_EXPECTED}; or use data.name=digits (embedded, offline).")
    if not directory.is_dir():
        raise _unavailable("imagefolder", directory, _IMAGEFOLDER_EXPECTED, downloadable=False)
    train_root, test_root = _imagefolder_layout(directory)
    loader = _image_loader(resolution)
    try:
        train = tvd.ImageFolder(str(train_root), loader=loader)
        test = tvd.ImageFolder(str(test_root), loader=loader) if test_root else None
    except FileNotFoundError as exc:  # torchvision: no class folder, or a class without images
        raise _unavailable("imagefolder", directory, _IMAGEFOLDER_EXPECTED, cause=str(exc),
                           downloadable=False) from None
    if len(train.classes) < 2:  # one class: every loss is 0, every accuracy 1 -- nothing to learn
        raise DatasetUnavailable(f"imagefolder {directory}: {train_root.name}/ has "
                                 f"{len(train.classes)} class folder(s) {train.classes}; a classifier "
                                 "needs at least 2 (one folder per class)")
    train_x, train_y = _decode_images(train, "imagefolder", directory, resolution)
    if test is None:
        return Decoded(train_x, train_y, None, None, list(train.classes))
    unknown = sorted(set(test.classes) - set(train.classes))
    if unknown:
        raise DatasetUnavailable(f"imagefolder {directory}: classes {unknown} are in {test_root.name}/ "
                                 f"but not in train/ (train classes: {train.classes})")
    test_x, test_y = _decode_images(test, "imagefolder", directory, resolution)
    # ImageFolder numbers each folder's classes on its own; a test folder lacking a class would shift
    # every later label, so map test labels by name onto the training numbering.
    remap = torch.tensor([train.class_to_idx[c] for c in test.classes], dtype=torch.long)
    return Decoded(train_x, train_y, test_x, remap[test_y], list(train.classes))


DATASETS: dict[str, DatasetSpec] = {
    # A mirrored 2 is no 2.
    "digits": DatasetSpec(_digits, 32, 10, False, "scikit-learn's embedded digits", flip=False),
    # A mirrored grating has another orientation, i.e. another class.
    "synthetic": DatasetSpec(_synthetic, 32, None, False, "generated", flip=False),
    "cifar10": DatasetSpec(_cifar("cifar10", "CIFAR10", "cifar-10-batches-py/"), 32, 10, True,
                           "cifar-10-batches-py/"),
    "cifar100": DatasetSpec(_cifar("cifar100", "CIFAR100", "cifar-100-python/"), 32, 100, True,
                            "cifar-100-python/"),
    "stl10": DatasetSpec(_stl10, 96, 10, True, _STL10_EXPECTED),
    "food101": DatasetSpec(_food101, 64, 101, True, _FOOD101_EXPECTED),
    "imagefolder": DatasetSpec(_imagefolder, 64, None, True, _IMAGEFOLDER_EXPECTED,
                               stamp=_imagefolder_stamp),
}
