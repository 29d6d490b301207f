"""Datasets for trials: decoded once per node, held on the trial's device, batched by index.

``load_splits(cfg, seed=...)`` returns uint8 train/validation/test tensors and the statistics the
augmentation needs; :class:`DeviceData` moves them to the device once and yields normalised,
augmented batches with no per-sample Python (random crop with padding, horizontal flip, and the VGG
paper's "random RGB colour shift", AlexNet's PCA lighting noise). The test split is fixed for every
trial; the validation split is carved from training with the trial's seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from sweeper.config import DataConfig
from sweeper.data.cache import cache_root, cached
from sweeper.data.sources import DATASETS, DatasetSpec, DatasetUnavailable, default_dir

__all__ = ["DATASETS", "DatasetSpec", "DatasetUnavailable", "DeviceData", "Splits", "cache_root",
           "load_splits", "num_classes", "resolution"]

TEST_FRACTION = 0.2  # carved (with a fixed seed) from sources that have no official test split
_TEST_SEED = 0


@dataclass(frozen=True)
class Splits:
    name: str
    train_x: torch.Tensor  # uint8 N x 3 x H x W
    train_y: torch.Tensor  # int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    mean: torch.Tensor  # (3,) on the 0..1 scale, from the training split
    std: torch.Tensor
    eigval: torch.Tensor  # (3,) PCA of training RGB pixels (0..1 scale), for lighting noise
    eigvec: torch.Tensor  # (3, 3), eigenvectors in columns

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def resolution(cfg: DataConfig) -> int:
    return cfg.resolution or DATASETS[cfg.name].native_resolution


def num_classes(cfg: DataConfig) -> int | None:
    """Known without reading files, except for imagefolder (None)."""
    if cfg.name == "synthetic":
        return cfg.synthetic_classes
    return DATASETS[cfg.name].num_classes


def load_splits(cfg: DataConfig, *, seed: int) -> Splits:
    spec = DATASETS[cfg.name]
    res = resolution(cfg)
    directory = Path(cfg.dir).expanduser().resolve() if cfg.dir else default_dir(cfg.name)
    key = f"{cfg.name}|res={res}"
    if spec.needs_files:
        key += f"|dir={directory}"
    if cfg.name == "synthetic":
        key += f"|n={cfg.synthetic_size}|k={cfg.synthetic_classes}"

    def build():
        d = spec.decode(cfg, directory, res)
        return {"train_x": d.train_x, "train_y": d.train_y, "test_x": d.test_x, "test_y": d.test_y,
                "classes": d.classes}

    data = cached(key, build)
    train_x, train_y = data["train_x"], data["train_y"]
    test_x, test_y = data["test_x"], data["test_y"]
    if test_x is None:  # same test set for every trial, whatever its seed
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(_TEST_SEED))
        n_test = max(1, int(round(TEST_FRACTION * len(order))))
        test_x, test_y = train_x[order[:n_test]], train_y[order[:n_test]]
        train_x, train_y = train_x[order[n_test:]], train_y[order[n_test:]]
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(cfg.val_fraction * len(order))))
    val_idx, train_idx = order[:n_val], order[n_val:]
    if cfg.limit is not None:
        train_idx = train_idx[:cfg.limit]
    train_x, val_x = train_x[train_idx], train_x[val_idx]
    train_y, val_y = train_y[train_idx], train_y[val_idx]
    mean, std, eigval, eigvec = _pixel_statistics(train_x)
    return Splits(cfg.name, train_x, train_y, val_x, val_y, test_x, test_y, list(data["classes"]),
                  mean, std, eigval, eigvec)


def _pixel_statistics(x: torch.Tensor):
    """Per-channel mean/std and the RGB covariance's eigen-decomposition, from <= 2M pixels."""
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 3)
    if len(pixels) > 2_000_000:
        step = len(pixels) // 2_000_000 + 1
        pixels = pixels[::step]
    pixels = pixels.double() / 255.0
    mean, std = pixels.mean(0), pixels.std(0).clamp_min(1e-6)
    cov = torch.cov(pixels.T)
    eigval, eigvec = torch.linalg.eigh(cov)
    return mean.float(), std.float(), eigval.clamp_min(0).float(), eigvec.float()


class DeviceData:
    """The splits on one device; batches are index gathers, augmented as whole tensors."""

    def __init__(self, splits: Splits, cfg: DataConfig, *, device: torch.device | str = "cpu",
                 channels_last: bool = False):
        self.cfg = cfg
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.num_classes = splits.num_classes
        self._x = {"train": splits.train_x.to(self.device), "val": splits.val_x.to(self.device),
                   "test": splits.test_x.to(self.device)}
        self._y = {"train": splits.train_y.to(self.device), "val": splits.val_y.to(self.device),
                   "test": splits.test_y.to(self.device)}
        self._mean = splits.mean.to(self.device).view(1, 3, 1, 1)
        self._std = splits.std.to(self.device).view(1, 3, 1, 1)
        # Lighting noise adds eigvec @ (alpha * eigval): precompute the scaled basis once.
        self._light = (splits.eigvec * splits.eigval[None, :]).to(self.device)
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self.flip = cfg.flip if cfg.flip is not None else DATASETS[cfg.name].flip

    @property
    def num_train(self) -> int:
        return len(self._y["train"])

    @property
    def steps_per_epoch(self) -> int:
        bs = self.cfg.batch_size
        full, rest = divmod(self.num_train, bs)
        return full + (1 if rest >= 2 else 0)

    def _finish(self, x01: torch.Tensor) -> torch.Tensor:
        x = (x01 - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def train_batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch, shuffled and augmented; every random draw comes from ``generator`` (CPU)."""
        n, bs = self.num_train, self.cfg.batch_size
        perm = torch.randperm(n, generator=generator).to(self.device)
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            if len(idx) < 2:  # a batch of one breaks BatchNorm's batch statistics
                break
            x = self._x["train"][idx].float().div_(255.0)
            yield self._finish(self._augment(x, generator)), self._y["train"][idx]

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.cfg.crop_padding
        if p > 0:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (n,), generator=g).to(self.device)
            ox = torch.randint(0, 2 * p + 1, (n,), generator=g).to(self.device)
            rows = (oy[:, None] + torch.arange(h, device=self.device))[:, None, :, None]
            cols = (ox[:, None] + torch.arange(w, device=self.device))[:, None, None, :]
            batch = torch.arange(n, device=self.device)[:, None, None, None]
            chans = torch.arange(3, device=self.device)[None, :, None, None]
            x = padded[batch, chans, rows, cols]
        if self.flip:
            flip = (torch.rand(n, generator=g) < 0.5).to(self.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.cfg.color_shift > 0:
            alpha = (torch.randn(n, 3, generator=g) * self.cfg.color_shift).to(self.device)
            x = x + (alpha @ self._light.T)[:, :, None, None]
        return x

    def eval_batches(self, split: str = "val", batch_size: int | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """In order, unaugmented."""
        x_all, y_all = self._x[split], self._y[split]
        bs = batch_size or max(self.cfg.batch_size, 256)
        for start in range(0, len(y_all), bs):
            yield self._finish(x_all[start:start + bs].float() / 255.0), y_all[start:start + bs]

    def probe_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same fixed batch every call: the first ``n`` validation examples, unaugmented."""
        if self._probe is None or len(self._probe[1]) != min(n, len(self._y["val"])):
            x, y = self._x["val"][:n], self._y["val"][:n]
            self._probe = (self._finish(x.float() / 255.0), y)
        return self._probe
