"""The splits on the trial's device, batched by index gathers and augmented as whole tensors.

A DataLoader would decode and augment per sample in Python, which starves a GPU on 32x32 images;
here the uint8 data crosses to the device once, and each step is a handful of batched tensor ops.

No step waits for the host: an epoch's randomness (order, crop offsets, flips, lighting noise) is drawn
up front and crosses to the device in one non-blocking copy from pinned memory, and every step after
that only queues kernels. A CPU generator makes exactly the calls, in exactly the order, that drawing
batch by batch made: a seed gives the same batches as before, and the same draws on every device.

VGG's multi-scale training (``data.crop``, ``data.scale_min``/``data.scale_max``): each batch is
resized to a drawn S x S (one batched, antialiased interpolate), then every image is cropped to
``data.crop`` at its own drawn offset. Evaluation batches are the centre crop at one scale (see
:meth:`DeviceData.eval_scale`); the multi-crop test views are built in :mod:`sweeper.data.views`.

Memory: the splits live on the device as uint8, 3 x R x R bytes per image (R = data.resolution):
Food-101 (101,000 images) needs 1.2 GB at R=64, 5.0 GB at 128, 7.8 GB at 160 and 19.9 GB at 256;
STL-10 (13,000) needs 0.36 GB at 96. Each trial holds its own copy, so trials sharing a GPU each pay
it; a trial whose data does not fit the device's free memory stops at once with a message saying so
(:class:`DataTooLarge`) instead of failing with an out-of-memory error later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from sweeper.config import DataConfig
from sweeper.data.sources import DATASETS
from sweeper.data.splits import Splits

__all__ = ["SPLITS", "DataTooLarge", "DeviceData", "EpochDraws", "data_bytes"]

SPLITS = ("train", "val", "test")
Batch = tuple[torch.Tensor, torch.Tensor]
# Free device memory the data may take at most: the rest is for the model, its optimizer state and
# activations (a VGG-16 step at batch 64 and 112 px: ~3 GB, estimated; several trials may share a GPU).
DEVICE_DATA_FRACTION = 0.8


class DataTooLarge(RuntimeError):
    """The splits would not fit in the device's free memory; the message says what to lower."""


def data_bytes(splits: Splits) -> int:
    """Bytes the splits take on the device (uint8 images + int64 labels)."""
    return sum(getattr(splits, f"{s}_x").numel() + 8 * getattr(splits, f"{s}_y").numel()
               for s in SPLITS)


@dataclass(frozen=True)
class EpochDraws:
    """One epoch's random draws on the data's device; a part that is switched off is None.

    ``bounds`` are the (start, stop) of each batch in ``perm``; the per-sample draws are indexed like
    ``perm``'s batches (sample i of batch b is row start_b + i).
    """

    perm: torch.Tensor  # int64 [n]: the epoch's order
    bounds: list[tuple[int, int]]
    oy: torch.Tensor | None  # int64 [m]: crop row offsets in 0..2p
    ox: torch.Tensor | None  # int64 [m]: crop column offsets
    mirror: torch.Tensor | None  # bool [m]: flip horizontally
    alpha: torch.Tensor | None  # float32 [m, 3]: PCA lighting coefficients, already times color_shift
    # Training scale S per batch (host ints: they are shapes), or None without data.scale_min/max.
    scales: list[int] | None = None


class DeviceData:
    """Batches of one trial's data on ``device``: shuffled and augmented for training, in order for eval.

    Every random draw in :meth:`train_batches` comes from the generator passed in, drawn on that
    generator's device (a CPU generator's draws are moved to ``device`` once per epoch), so a seed fixes
    the epoch.
    """

    def __init__(self, splits: Splits, cfg: DataConfig, *, device: torch.device | str = "cpu",
                 channels_last: bool = False,
                 normalize: tuple[Sequence[float], Sequence[float]] | None = None):
        # normalize: (mean, std) per RGB channel on the 0..1 scale instead of the training split's
        # statistics (pretrained weights expect their own: sweeper.transfer.input_normalization).
        self.cfg = cfg
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.classes = list(splits.classes)
        self.flip = cfg.flip if cfg.flip is not None else DATASETS[cfg.name].flip
        self._check_fits(splits)
        self._x = {s: getattr(splits, f"{s}_x").to(self.device) for s in SPLITS}
        self._y = {s: getattr(splits, f"{s}_y").to(self.device) for s in SPLITS}
        mean, std = (splits.mean, splits.std) if normalize is None else \
            (torch.as_tensor(normalize[0], dtype=torch.float32), torch.as_tensor(normalize[1], dtype=torch.float32))
        self._mean = mean.to(self.device).view(1, 3, 1, 1)
        self._std = std.to(self.device).view(1, 3, 1, 1)
        # Lighting noise per image is sum_i alpha_i * eigval_i * eigvec[:, i] = (alpha * eigval) @ eigvec.T
        self._eigval = splits.eigval.to(self.device)
        self._eigvec_t = splits.eigvec.T.contiguous().to(self.device)
        h, w = self._x["train"].shape[-2:]
        self.stored = h  # the side of the stored (square) images
        # Output side of training and evaluation batches: data.crop, else the stored image's.
        self.crop = cfg.crop if cfg.crop is not None else h
        self._rows = torch.arange(cfg.crop or h, device=self.device)  # crop gathers: offset + these
        self._cols = torch.arange(cfg.crop or w, device=self.device)
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

    @property
    def last_full_step(self) -> int:
        """The index of the epoch's last full-size step (the only step, where the data is smaller)."""
        return max(self.num_train // self.cfg.batch_size, 1) - 1

    # ---- batches --------------------------------------------------------------------------------

    def train_batches(self, generator: torch.Generator) -> Iterator[Batch]:
        """One epoch: shuffled, augmented (crop, flip, lighting), normalised.

        All of the epoch's draws happen before the first batch is yielded (see :meth:`draw_epoch`);
        the steps themselves never read from or copy to the host.
        """
        draws = self.draw_epoch(generator)
        x_all, y_all = self._x["train"], self._y["train"]
        for b, (start, stop) in enumerate(draws.bounds):
            idx = draws.perm[start:stop]
            x = x_all.index_select(0, idx).float().div_(255.0)
            if draws.scales is not None:
                x = resize(x, draws.scales[b])
            yield self._finish(self._augment(x, draws, start, stop)), y_all.index_select(0, idx)

    def draw_epoch(self, generator: torch.Generator) -> EpochDraws:
        """The epoch's order and augmentation draws, on this data's device.

        The draws are the calls that a batch-by-batch loop would make, in its order (the permutation,
        then per batch: row offsets, column offsets, flips, lighting), so a seed gives the same epoch
        whichever way it is consumed; a last batch of one is dropped before it draws anything.
        """
        n, bs = self.num_train, self.cfg.batch_size
        on = generator.device
        perm = torch.randperm(n, generator=generator, device=on)
        bounds = []
        for start in range(0, n, bs):
            if min(n, start + bs) - start < 2:  # a batch of one breaks BatchNorm's batch statistics
                break
            bounds.append((start, min(n, start + bs)))
        p = self.cfg.crop_padding
        scales = None
        if self.cfg.scale_min is not None and self.cfg.scale_max is not None:
            # One S per batch, all drawn here. Sizes are shapes, so they must be host ints: free from a
            # CPU generator (fit's), one read per epoch (not per step) from a CUDA one.
            # Per batch rather than per image: one antialiased F.interpolate resizes the whole batch,
            # while per-image sizes would take one kernel per image (or grid_sample, which does not
            # antialias a 2x shrink). Across an epoch each image still meets S uniform at random,
            # independently of the images in other batches; only images sharing a batch share S.
            scales = torch.randint(self.cfg.scale_min, self.cfg.scale_max + 1, (len(bounds),),
                                   generator=generator, device=on).tolist()
        parts: dict[str, list[torch.Tensor]] = {"oy": [], "ox": [], "mirror": [], "alpha": []}
        for b, (start, stop) in enumerate(bounds):
            m = stop - start
            if p > 0 or self.cfg.crop is not None:
                # Offsets of the crop in the zero-padded image of side S + 2p (S: this batch's scale,
                # else the stored side); with no data.crop the crop is the image itself: 0..2p.
                side = scales[b] if scales is not None else self.stored
                room = side + 2 * p - self.crop + 1
                parts["oy"].append(torch.randint(0, room, (m,), generator=generator, device=on))
                parts["ox"].append(torch.randint(0, room, (m,), generator=generator, device=on))
            if self.flip:
                parts["mirror"].append(torch.rand(m, generator=generator, device=on) < 0.5)
            if self.cfg.color_shift > 0:
                parts["alpha"].append(torch.randn(m, 3, generator=generator, device=on))
        drawn = {"perm": perm, **{k: torch.cat(v) for k, v in parts.items() if v}}
        moved = self._to_device(drawn)
        alpha = moved.get("alpha")
        if alpha is not None:
            alpha = alpha.mul_(self.cfg.color_shift)  # on the device, as the per-batch draw did
        return EpochDraws(perm=moved["perm"], bounds=bounds, oy=moved.get("oy"), ox=moved.get("ox"),
                          mirror=moved.get("mirror"), alpha=alpha, scales=scales)

    def eval_batches(self, split: str = "val", batch_size: int | None = None) -> Iterator[Batch]:
        """``split`` ('train', 'val' or 'test') in order, normalised, unaugmented."""
        x_all, y_all = self._x[self._check_split(split)], self._y[split]
        # No gradients are kept in evaluation, so larger batches than training's fit.
        bs = batch_size or max(self.cfg.batch_size, 256)
        if bs < 1:
            raise ValueError(f"batch_size={bs!r} must be >= 1")
        for start in range(0, len(y_all), bs):
            yield self._finish(self._eval_view(x_all[start:start + bs])), y_all[start:start + bs]

    def probe_batch(self, n: int) -> Batch:
        """The same batch on every call: the first ``n`` validation examples, unaugmented."""
        if self._probe is None or len(self._probe[1]) != min(n, len(self._y["val"])):
            x, y = self._x["val"][:n], self._y["val"][:n]
            self._probe = (self._finish(self._eval_view(x)), y)
        return self._probe

    # ---- views (multi-scale evaluation) ---------------------------------------------------------

    @property
    def eval_scale(self) -> int:
        """The single-crop evaluation scale Q: the middle of [scale_min, scale_max] (VGG's Q for
        jittered S), else the stored side; the centre ``crop`` of the image resized to Q is evaluated."""
        if self.cfg.scale_min is not None and self.cfg.scale_max is not None:
            return (self.cfg.scale_min + self.cfg.scale_max) // 2
        return self.stored

    def images(self, split: str) -> Batch:
        """(uint8 N x 3 x R x R images, labels) of ``split`` on the device, as stored."""
        return self._x[self._check_split(split)], self._y[split]

    def normalise(self, x01: torch.Tensor) -> torch.Tensor:
        """Float images on the 0..1 scale -> the network's input, normalised as every batch is."""
        return self._finish(x01)

    # ---- internals ------------------------------------------------------------------------------

    def _check_split(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")
        return split

    def _eval_view(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float 0..1 centre ``crop`` at :attr:`eval_scale` (the images as they are
        without data.crop)."""
        x = x.float().div_(255.0)
        if self.cfg.crop is None:
            return x
        x = resize(x, self.eval_scale)
        top = (x.shape[-1] - self.crop) // 2
        return x[:, :, top:top + self.crop, top:top + self.crop]

    def _check_fits(self, splits: Splits) -> None:
        """Raise DataTooLarge if the uint8 splits would take more than DEVICE_DATA_FRACTION of the
        device's free memory (CUDA only: a CPU trial's data already sits in host memory)."""
        if self.device.type != "cuda":
            return
        need = data_bytes(splits)
        free, total = torch.cuda.mem_get_info(self.device)
        if need > DEVICE_DATA_FRACTION * free:
            side = splits.train_x.shape[-1]
            raise DataTooLarge(
                f"data.name={self.cfg.name!r} at data.resolution={side}: the splits take "
                f"{need / 1e9:.2f} GB as uint8 on {self.device}, which has {free / 1e9:.2f} GB free of "
                f"{total / 1e9:.2f} GB (at most {DEVICE_DATA_FRACTION:.0%} of the free memory goes to "
                "data). Lower data.resolution (memory grows with its square), set data.limit, or run "
                "fewer trials per GPU (resources).")

    def _finish(self, x01: torch.Tensor) -> torch.Tensor:
        x = x01.sub_(self._mean).div_(self._std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _to_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host draws to a CUDA device in one non-blocking copy; elsewhere a plain (free) ``.to``."""
        if self.device.type == "cuda" and any(t.device != self.device for t in tensors.values()):
            return packed_copy(tensors, self.device, pin=True)
        return {k: t.to(self.device) for k, t in tensors.items()}

    def _augment(self, x: torch.Tensor, draws: EpochDraws, start: int, stop: int) -> torch.Tensor:
        """Augment a float N x 3 x H x W batch (rows start:stop of the epoch) on the 0..1 scale;
        the result is crop x crop (H x W without data.crop)."""
        n, c, _, w = x.shape
        h = k = len(self._rows)  # the output side: data.crop, else the image's
        p = self.cfg.crop_padding
        if draws.oy is not None and draws.ox is not None:
            # Random crop of the zero-padded image = per-sample shift with zero fill: gather rows, then
            # columns, at per-sample offsets; two batched gathers, no loop over samples.
            padded = F.pad(x, (p, p, p, p))
            rows = draws.oy[start:stop, None] + self._rows  # n x h
            cols = draws.ox[start:stop, None] + self._cols  # n x k
            x = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * p))
            x = x.gather(3, cols[:, None, None, :].expand(n, c, h, k))
        if draws.mirror is not None:
            x = torch.where(draws.mirror[start:stop, None, None, None], x.flip(3), x)
        if draws.alpha is not None:
            # AlexNet's PCA lighting: one RGB offset per image along the training pixels' principal axes.
            alpha = draws.alpha[start:stop]
            x = x.add_(((alpha * self._eigval) @ self._eigvec_t)[:, :, None, None])
        return x


def resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """Float N x 3 x H x W -> N x 3 x side x side: bilinear, antialiased when shrinking (no-op at H)."""
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False,
                         antialias=side < min(x.shape[-2:]))


def packed_copy(tensors: dict[str, torch.Tensor], device: torch.device, *,
                pin: bool) -> dict[str, torch.Tensor]:
    """``tensors`` on ``device`` through ONE copy: packed as bytes into one (pinned) host buffer.

    A blocking copy from pageable memory makes the host wait for the device; a non-blocking copy from
    pinned memory is only queued (the caching host allocator keeps the buffer alive until it has run).
    The values arrive bit for bit: the bytes are reinterpreted, never converted.
    """
    # Widest elements first, so that each piece starts at an offset its dtype can be viewed at.
    order = sorted(tensors, key=lambda k: -tensors[k].element_size())
    flat = [tensors[k].contiguous().view(-1).view(torch.uint8) for k in order]
    host = torch.empty(sum(f.numel() for f in flat), dtype=torch.uint8, pin_memory=pin)
    torch.cat(flat, out=host)
    moved = host.to(device, non_blocking=pin)
    out, offset = {}, 0
    for k, f in zip(order, flat):
        t = tensors[k]
        out[k] = moved[offset:offset + f.numel()].view(t.dtype).view(t.shape)
        offset += f.numel()
    return out
