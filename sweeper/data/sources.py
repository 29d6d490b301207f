"""Dataset sources: each decodes its files once into uint8 tensors (N x 3 x H x W) and int64 labels.

Real datasets go through torchvision's own dataset classes, so the real on-disk formats are read by
real code (and downloaded by it when ``data.download`` is on and the network allows). The embedded
default, ``digits``, ships inside scikit-learn and needs no network at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from sweeper.config import DataConfig

__all__ = ["DATASETS", "DatasetSpec", "DatasetUnavailable", "Decoded", "default_dir"]


class DatasetUnavailable(Exception):
    """A real dataset is not on disk (and may not be downloaded); the message says what to do."""


@dataclass(frozen=True)
class Decoded:
    train_x: torch.Tensor  # uint8 N x 3 x H x W
    train_y: torch.Tensor  # int64 N
    test_x: torch.Tensor | None  # None: the source has no official test split; carve a fixed one
    test_y: torch.Tensor | None
    classes: list[str]


@dataclass(frozen=True)
class DatasetSpec:
    decode: Callable[[DataConfig, Path, int], Decoded]  # (cfg, directory, resolution)
    native_resolution: int
    num_classes: int | None  # None: known only after reading (imagefolder)
    needs_files: bool  # a real dataset, looked for on disk
    expected: str  # what is looked for, for error messages
    flip: bool = True  # is a mirrored image still of its class? (data.flip=None uses this)


def default_dir(name: str) -> Path:
    from sweeper.data.cache import cache_root

    return cache_root() / "data" / name


def _unavailable(name: str, directory: Path, expected: str) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"dataset {name!r} not found in {directory} (looked for {expected}). Put the files there, "
        f"pass --data-dir DIR (data.dir=DIR), set data.download=true when online, or use "
        f"data.name=digits (embedded, offline)")


def _resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 N x 3 x h x w -> uint8 N x 3 x r x r (bilinear, antialiased when shrinking)."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    out = []
    for chunk in torch.split(x, 512):  # bounded memory for large sets
        y = F.interpolate(chunk.float(), size=(resolution, resolution), mode="bilinear",
                          align_corners=False, antialias=chunk.shape[-1] > resolution)
        out.append(y.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _from_hwc(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


# ---- embedded ---------------------------------------------------------------------------------------


def _digits(cfg: DataConfig, directory: Path, resolution: int) -> Decoded:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 grey levels 0..16 -> 0..255, upsampled and replicated to RGB so every model sees 3 channels.
    grey = torch.from_numpy(digits.images * (255.0 / 16.0)).float()[:, None]
    x = F.interpolate(grey, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return Decoded(x, torch.from_numpy(digits.target).long(), None, None,
                   [str(i) for i in range(10)])


def _synthetic(cfg: DataConfig, directory: Path, resolution: int) -> Decoded:
    """Class c = a grating at angle pi*c/C in its own colour, with random phase, frequency and noise.

    Learnable by a small CNN (orientation and colour are local features) but not trivially: the
    phase and a noise floor vary per image. Fixed seed: every trial sees the same data.
    """
    n, k, r = cfg.synthetic_size, cfg.synthetic_classes, resolution
    g = torch.Generator().manual_seed(1234)
    y = torch.arange(n) % k
    y = y[torch.randperm(n, generator=g)]
    angle = math.pi * y.float() / k
    freq = 2 * math.pi * (2.0 + torch.rand(n, generator=g) * 2.0) / r
    phase = torch.rand(n, generator=g) * 2 * math.pi
    coords = torch.arange(r).float()
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    proj = (torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy)
    wave = torch.sin(freq[:, None, None] * proj + phase[:, None, None])  # N x r x r in [-1, 1]
    hue = torch.rand(k, 3, generator=g) * 0.6 + 0.2  # one colour per class
    img = hue[y][:, :, None, None] * (0.5 + 0.5 * wave[:, None])
    img = img + 0.1 * torch.randn(n, 3, r, r, generator=g)
    x = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return Decoded(x, y.long(), None, None, [f"class{i}" for i in range(k)])


# ---- torchvision datasets ---------------------------------------------------------------------------


def _torchvision(name: str, make: Callable[..., object], expected: str):
    """Wrap a torchvision constructor: missing files become DatasetUnavailable."""

    def build(cfg: DataConfig, directory: Path, **kwargs):
        try:
            return make(str(directory), download=cfg.download, **kwargs)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted..."
            if "not found" in str(exc).lower() or "download" in str(exc).lower():
                raise _unavailable(name, directory, expected) from None
            raise
        except (OSError, ConnectionError) as exc:  # download attempted offline
            raise DatasetUnavailable(f"{_unavailable(name, directory, expected)} "
                                     f"(download failed: {exc})") from None

    return build


def _cifar(name: str, cls_name: str, expected: str):
    def decode(cfg: DataConfig, directory: Path, resolution: int) -> Decoded:
        import torchvision.datasets as tvd

        build = _torchvision(name, getattr(tvd, cls_name), expected)
        train, test = build(cfg, directory, train=True), build(cfg, directory, train=False)
        return Decoded(_resize(_from_hwc(train.data), resolution),
                       torch.as_tensor(train.targets, dtype=torch.long),
                       _resize(_from_hwc(test.data), resolution),
                       torch.as_tensor(test.targets, dtype=torch.long), list(train.classes))

    return decode


def _stl10(cfg: DataConfig, directory: Path, resolution: int) -> Decoded:
    import torchvision.datasets as tvd

    build = _torchvision("stl10", tvd.STL10, "stl10_binary/train_X.bin, test_X.bin")
    train, test = build(cfg, directory, split="train"), build(cfg, directory, split="test")
    return Decoded(_resize(torch.from_numpy(train.data), resolution),
                   torch.as_tensor(train.labels, dtype=torch.long),
                   _resize(torch.from_numpy(test.data), resolution),
                   torch.as_tensor(test.labels, dtype=torch.long), list(train.classes))


def _decode_files(paths: list[str], resolution: int) -> torch.Tensor:
    """Decode image files to uint8 3 x r x r: shorter side to r, then a centre crop (no distortion)."""
    from PIL import Image

    out = torch.empty(len(paths), 3, resolution, resolution, dtype=torch.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = resolution / min(w, h)
            im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                           Image.BILINEAR)
            w, h = im.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            out[i] = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    return out


def _food101(cfg: DataConfig, directory: Path, resolution: int) -> Decoded:
    import torchvision.datasets as tvd

    build = _torchvision("food101", tvd.Food101, "food-101/meta/train.json and food-101/images/")
    train, test = build(cfg, directory, split="train"), build(cfg, directory, split="test")
    return Decoded(_decode_files([str(p) for p in train._image_files], resolution),
                   torch.as_tensor(train._labels, dtype=torch.long),
                   _decode_files([str(p) for p in test._image_files], resolution),
                   torch.as_tensor(test._labels, dtype=torch.long), list(train.classes))


def _imagefolder(cfg: DataConfig, directory: Path, resolution: int) -> Decoded:
    import torchvision.datasets as tvd

    if cfg.dir is None:
        raise DatasetUnavailable("data.name='imagefolder' needs data.dir=DIR (a folder with one "
                                 "subfolder per class, or train/ and test/ folders of those)")
    if not directory.is_dir():
        raise _unavailable("imagefolder", directory, "class subfolders of images")
    test_dir = next((directory / d for d in ("test", "val") if (directory / d).is_dir()), None)
    train_dir = directory / "train" if test_dir is not None and (directory / "train").is_dir() \
        else directory
    try:
        train = tvd.ImageFolder(str(train_dir))
        test = tvd.ImageFolder(str(test_dir)) if train_dir != directory else None
    except (FileNotFoundError, RuntimeError) as exc:
        raise _unavailable("imagefolder", directory, f"class subfolders of images ({exc})") from None
    if test is not None and test.classes != train.classes:
        raise DatasetUnavailable(f"imagefolder {directory}: test classes {test.classes} differ from "
                                 f"train classes {train.classes}")
    return Decoded(_decode_files([p for p, _ in train.samples], resolution),
                   torch.as_tensor(train.targets, dtype=torch.long),
                   None if test is None else _decode_files([p for p, _ in test.samples], resolution),
                   None if test is None else torch.as_tensor(test.targets, dtype=torch.long),
                   list(train.classes))


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(_digits, 32, 10, False, "scikit-learn's embedded digits", flip=False),
    # A mirrored grating has another orientation, i.e. another class.
    "synthetic": DatasetSpec(_synthetic, 32, None, False, "generated", flip=False),
    "cifar10": DatasetSpec(_cifar("cifar10", "CIFAR10", "cifar-10-batches-py/"), 32, 10, True,
                           "cifar-10-batches-py/"),
    "cifar100": DatasetSpec(_cifar("cifar100", "CIFAR100", "cifar-100-python/"), 32, 100, True,
                            "cifar-100-python/"),
    "stl10": DatasetSpec(_stl10, 96, 10, True, "stl10_binary/"),
    "food101": DatasetSpec(_food101, 64, 101, True, "food-101/"),
    "imagefolder": DatasetSpec(_imagefolder, 64, None, True, "class subfolders"),
}
