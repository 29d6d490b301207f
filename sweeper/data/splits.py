"""Train/validation/test splits of a decoded dataset, and the pixel statistics augmentation needs.

The test split is the same for every trial: the official one where the dataset has it, else a fixed
carve (seed 0) of the training files. The validation split is carved from training with the trial's
own seed, so seeds differ in which examples they validate on but never in what they are tested on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sweeper.config import DataConfig
from sweeper.data.cache import cached
from sweeper.data.sources import DATASETS, DatasetSpec, default_dir

__all__ = ["TEST_FRACTION", "Splits", "decoded_bytes", "load_splits", "num_classes", "resolution", "source_dir"]

TEST_FRACTION = 0.2  # carved from sources without an official test split
_TEST_SEED = 0  # independent of the trial seed: one test set for every trial
# Pixels used for the mean/std/PCA statistics; beyond this a spread-out subset is exact enough.
_STAT_PIXELS = 16_000_000
# (cache key, seed, val_fraction, limit) -> pixel_statistics of that training split, per process.
_STATS: dict[tuple, tuple[torch.Tensor, ...]] = {}


@dataclass(frozen=True)
class Splits:
    name: str
    train_x: torch.Tensor  # uint8 N x 3 x H x W
    train_y: torch.Tensor  # int64 N
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    mean: torch.Tensor  # (3,) float32 on the 0..1 scale, from the training split
    std: torch.Tensor  # (3,)
    eigval: torch.Tensor  # (3,) eigenvalues of the training RGB covariance (0..1 scale), descending
    eigvec: torch.Tensor  # (3, 3) matching unit eigenvectors in the columns

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _spec(cfg: DataConfig) -> DatasetSpec:
    try:
        return DATASETS[cfg.name]
    except KeyError:
        raise ValueError(f"data.name={cfg.name!r} is not one of {sorted(DATASETS)}") from None


def resolution(cfg: DataConfig) -> int:
    """The side the data is decoded at: data.resolution, else the dataset's native size."""
    return cfg.resolution or _spec(cfg).native_resolution


def num_classes(cfg: DataConfig) -> int | None:
    """Known without reading any file, except for imagefolder (None)."""
    if cfg.name == "synthetic":
        return cfg.synthetic_classes
    return _spec(cfg).num_classes


def source_dir(cfg: DataConfig) -> Path:
    """Where a real dataset's files are looked for (or downloaded to)."""
    return Path(cfg.dir).expanduser().resolve() if cfg.dir else default_dir(cfg.name)


def _cache_key(cfg: DataConfig, spec: DatasetSpec, res: int, directory: Path) -> str:
    key = f"{cfg.name}|res={res}"
    if spec.needs_files:
        key += f"|dir={directory}"
        if spec.stamp is not None:
            key += f"|stamp={spec.stamp(directory)}"
    if cfg.name == "synthetic":
        key += f"|n={cfg.synthetic_size}|k={cfg.synthetic_classes}"
    return key


def decoded_bytes(cfg: DataConfig) -> int | None:
    """Bytes of the dataset as this node decoded it (its cache file: uint8 images and labels), which
    is what a trial's splits hold together; None if it was not decoded here yet. Reads no images."""
    from sweeper.data.cache import cache_file

    spec = _spec(cfg)
    try:
        size = cache_file(_cache_key(cfg, spec, resolution(cfg), source_dir(cfg))).stat().st_size
    except OSError:
        return None
    return size  # an upper bound with data.limit, which keeps fewer training images


def load_splits(cfg: DataConfig, *, seed: int) -> Splits:
    """Decode (once per node, cached) and split; raises DatasetUnavailable for absent real datasets."""
    spec = _spec(cfg)
    res = resolution(cfg)
    directory = source_dir(cfg)

    def build() -> dict[str, Any]:
        d = spec.decode(cfg, directory, res)
        return {"train_x": d.train_x, "train_y": d.train_y, "test_x": d.test_x, "test_y": d.test_y,
                "classes": list(d.classes)}

    data = cached(_cache_key(cfg, spec, res, directory), build)
    x, y = data["train_x"], data["train_y"]
    test_x, test_y = data["test_x"], data["test_y"]
    if test_x is None:
        keep, test = _carve(len(y), TEST_FRACTION, _TEST_SEED, "the fixed test split")
        test_x, test_y = x[test], y[test]
        x, y = x[keep], y[keep]
    train, val = _carve(len(y), cfg.val_fraction, seed, "data.val_fraction")
    if cfg.limit is not None:
        train = train[:cfg.limit]
    train_x, train_y = x[train], y[train]
    # The statistics are most of a warm load's time (~70% on digits); a reused Ray worker runs trial
    # after trial on the same split, so they are kept per process (a few floats per split).
    stats_key = (_cache_key(cfg, spec, res, directory), seed, cfg.val_fraction, cfg.limit)
    if stats_key not in _STATS:
        _STATS[stats_key] = pixel_statistics(train_x)
    mean, std, eigval, eigvec = (t.clone() for t in _STATS[stats_key])
    return Splits(name=cfg.name, train_x=train_x, train_y=train_y, val_x=x[val], val_y=y[val],
                  test_x=test_x.contiguous(), test_y=test_y.contiguous(), classes=list(data["classes"]),
                  mean=mean, std=std, eigval=eigval, eigvec=eigvec)


def _carve(n: int, fraction: float, seed: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, carved) indices: a seeded random ``fraction`` of range(n), at least one each side."""
    if n < 2:
        from sweeper.config import ConfigError  # a ValueError: the user's data and setting, exit 2

        raise ConfigError([f"cannot carve {what} ({fraction}) from {n} example(s): need at least 2 "
                           "(add images, or use a dataset with more per class)"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = min(max(1, round(fraction * n)), n - 1)
    return order[k:], order[:k]


def pixel_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and std, and the eigen-decomposition of the RGB covariance, on the 0..1 scale.

    Accumulated in float64 over chunks, so memory stays bounded; above ``_STAT_PIXELS`` pixels an
    evenly spread subset of images stands in for the whole split.
    """
    n, c, h, w = x.shape
    if n * h * w > _STAT_PIXELS:
        x = x[torch.linspace(0, n - 1, max(1, _STAT_PIXELS // (h * w))).long()]
    total = torch.zeros(c, dtype=torch.float64)
    outer = torch.zeros(c, c, dtype=torch.float64)
    count = 0
    for chunk in torch.split(x, max(1, 1_000_000 // (h * w))):
        p = chunk.permute(0, 2, 3, 1).reshape(-1, c).double().div_(255.0)
        total += p.sum(0)
        outer += p.T @ p
        count += len(p)
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    std = cov.diagonal().clamp_min(0).sqrt().clamp_min(1e-6)  # constant channels: no division by 0
    eigval, eigvec = torch.linalg.eigh(cov)
    # eigh sorts ascending; descending puts the principal (brightness-like) component first.
    return mean.float(), std.float(), eigval.flip(0).clamp_min(0).float(), eigvec.flip(1).float()
