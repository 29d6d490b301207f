"""The splits on the trial's device, batched by index gathers and augmented as whole tensors.

A DataLoader would decode and augment per sample in Python, which starves a GPU on 32x32 images;
here the uint8 data crosses to the device once, and each step is a handful of batched tensor ops.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from sweeper.config import DataConfig
from sweeper.data.sources import DATASETS
from sweeper.data.splits import Splits

__all__ = ["SPLITS", "DeviceData"]

SPLITS = ("train", "val", "test")
Batch = tuple[torch.Tensor, torch.Tensor]


class DeviceData:
    """Batches of one trial's data on ``device``: shuffled and augmented for training, in order for eval.

    Every random draw in :meth:`train_batches` comes from the generator passed in, drawn on that
    generator's device (a CPU generator's draws are moved to ``device``), so a seed fixes the epoch.
    """

    def __init__(self, splits: Splits, cfg: DataConfig, *, device: torch.device | str = "cpu",
                 channels_last: bool = False):
        self.cfg = cfg
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.classes = list(splits.classes)
        self.flip = cfg.flip if cfg.flip is not None else DATASETS[cfg.name].flip
        self._x = {s: getattr(splits, f"{s}_x").to(self.device) for s in SPLITS}
        self._y = {s: getattr(splits, f"{s}_y").to(self.device) for s in SPLITS}
        self._mean = splits.mean.to(self.device).view(1, 3, 1, 1)
        self._std = splits.std.to(self.device).view(1, 3, 1, 1)
        # Lighting noise per image is sum_i alpha_i * eigval_i * eigvec[:, i] = (alpha * eigval) @ eigvec.T
        self._eigval = splits.eigval.to(self.device)
        self._eigvec_t = splits.eigvec.T.contiguous().to(self.device)
        self._probe: Batch | None = None

    # ---- sizes ----------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_train(self) -> int:
        return len(self._y["train"])

    def num_examples(self, split: str) -> int:
        return len(self._y[self._check_split(split)])

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_train, self.cfg.batch_size)
        return full + (1 if rest >= 2 else 0)  # see train_batches: a last batch of one is dropped

    # ---- batches --------------------------------------------------------------------------------

    def train_batches(self, generator: torch.Generator) -> Iterator[Batch]:
        """One epoch: shuffled, augmented (crop, flip, lighting), normalised."""
        n, bs = self.num_train, self.cfg.batch_size
        perm = torch.randperm(n, generator=generator, device=generator.device).to(self.device)
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            if len(idx) < 2:  # a batch of one breaks BatchNorm's batch statistics
                break
            x = self._x["train"][idx].float().div_(255.0)
            yield self._finish(self._augment(x, generator)), self._y["train"][idx]

    def eval_batches(self, split: str = "val", batch_size: int | None = None) -> Iterator[Batch]:
        """``split`` ('train', 'val' or 'test') in order, normalised, unaugmented."""
        x_all, y_all = self._x[self._check_split(split)], self._y[split]
        # No gradients are kept in evaluation, so larger batches than training's fit.
        bs = batch_size or max(self.cfg.batch_size, 256)
        if bs < 1:
            raise ValueError(f"batch_size={bs!r} must be >= 1")
        for start in range(0, len(y_all), bs):
            yield self._finish(x_all[start:start + bs].float().div_(255.0)), y_all[start:start + bs]

    def probe_batch(self, n: int) -> Batch:
        """The same batch on every call: the first ``n`` validation examples, unaugmented."""
        if self._probe is None or len(self._probe[1]) != min(n, len(self._y["val"])):
            x, y = self._x["val"][:n], self._y["val"][:n]
            self._probe = (self._finish(x.float().div_(255.0)), y)
        return self._probe

    # ---- internals ------------------------------------------------------------------------------

    def _check_split(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")
        return split

    def _finish(self, x01: torch.Tensor) -> torch.Tensor:
        x = x01.sub_(self._mean).div_(self._std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _draw(self, fn, *args, generator: torch.Generator) -> torch.Tensor:
        return fn(*args, generator=generator, device=generator.device).to(self.device)

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Augment a float N x 3 x H x W batch on the 0..1 scale, in place where possible."""
        n, c, h, w = x.shape
        p = self.cfg.crop_padding
        if p > 0:
            # Random crop of the zero-padded image = per-sample shift with zero fill: gather rows, then
            # columns, at per-sample offsets; two batched gathers, no loop over samples.
            padded = F.pad(x, (p, p, p, p))
            oy = self._draw(torch.randint, 0, 2 * p + 1, (n,), generator=g)
            ox = self._draw(torch.randint, 0, 2 * p + 1, (n,), generator=g)
            rows = oy[:, None] + torch.arange(h, device=self.device)  # n x h
            cols = ox[:, None] + torch.arange(w, device=self.device)  # n x w
            x = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * p))
            x = x.gather(3, cols[:, None, None, :].expand(n, c, h, w))
        if self.flip:
            mirror = self._draw(torch.rand, n, generator=g) < 0.5
            x = torch.where(mirror[:, None, None, None], x.flip(3), x)
        if self.cfg.color_shift > 0:
            # AlexNet's PCA lighting: one RGB offset per image along the training pixels' principal axes.
            alpha = self._draw(torch.randn, n, 3, generator=g).mul_(self.cfg.color_shift)
            x = x.add_(((alpha * self._eigval) @ self._eigvec_t)[:, :, None, None])
        return x
