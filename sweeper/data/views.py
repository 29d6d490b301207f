"""VGG's multi-crop test: many views per image, their soft-max posteriors averaged per image.

Simonyan & Zisserman test at several scales Q (the image's side resized to Q), cut a regular grid of
``crop`` x ``crop`` views from each, and mirror each view: Q in {256, 384, 512} x 2 flips x 5 x 5 crops
= 150 views per image. The class posterior of an image is the mean of its views' soft-max outputs.

Settings: ``data.test_scales`` ("256,384,512"), ``data.test_grid`` (5), ``data.test_flips`` (true),
``data.crop`` (224). Views are evenly spaced from corner to corner (offsets round(i (Q - crop) /
(grid - 1)), i = 0..grid-1; a grid of 1 is the centre crop).

Batched, and without host syncs on CUDA: for a chunk of images, one scale's views (chunk x flips x
grid^2) are cut by two index gathers and go through the network in one forward; the averaged
probabilities and the summed loss/top-1/top-5 stay on the device and are read once, at the end.
Cost: views-per-image forwards of the crop per test image (150x a single-crop test).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from sweeper.config import DataConfig
from sweeper.data.device import DeviceData, resize

__all__ = ["grid_offsets", "multicrop_evaluate", "view_batches", "views_per_image"]


def views_per_image(cfg: DataConfig) -> int:
    """len(test_scales) x (2 with test_flips, else 1) x test_grid^2; 0 without test_scales."""
    return len(cfg.test_scale_list) * (2 if cfg.test_flips else 1) * cfg.test_grid ** 2


def grid_offsets(scale: int, crop: int, grid: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 [grid]: the crops' top (or left) offsets at one scale, evenly spaced corner to corner.

    Made on the device by a kernel (no host-to-device copy)."""
    if grid == 1:
        return torch.full((1,), (scale - crop) // 2, dtype=torch.long, device=device)
    return torch.linspace(0, scale - crop, grid, device=device).round().long()


def _cut(x01: torch.Tensor, scale: int, crop: int, grid: int, flips: bool) -> torch.Tensor:
    """Float b x 3 x R x R -> b x V_scale x 3 x crop x crop: the views of one scale, per image in the
    order (row, column, flip)."""
    b, c = x01.shape[:2]
    x = resize(x01, scale)
    off = grid_offsets(scale, crop, grid, x.device)
    idx = (off[:, None] + torch.arange(crop, device=x.device)).flatten()  # grid*crop rows (or columns)
    x = x.index_select(2, idx).index_select(3, idx)  # b x 3 x (grid crop) x (grid crop)
    x = x.view(b, c, grid, crop, grid, crop).permute(0, 2, 4, 1, 3, 5)  # b x gy x gx x 3 x crop x crop
    x = x.reshape(b, grid * grid, c, crop, crop)
    if flips:
        x = torch.stack([x, x.flip(-1)], dim=2).view(b, grid * grid * 2, c, crop, crop)
    return x


def view_batches(data: DeviceData, split: str = "test", batch_size: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(views, labels, b): normalised views (b x V_scale) x 3 x crop x crop for b images at one scale,
    scale after scale per chunk of images; ``labels`` are the b images' labels."""
    cfg = data.cfg
    x_all, y_all = data.images(split)
    per_scale = (2 if cfg.test_flips else 1) * cfg.test_grid ** 2
    # About one evaluation batch of views per forward (at least one image's views of one scale).
    chunk = max(1, (batch_size or max(cfg.batch_size, 256)) // per_scale)
    for start in range(0, len(y_all), chunk):
        x01 = x_all[start:start + chunk].float().div_(255.0)
        y = y_all[start:start + chunk]
        for q in cfg.test_scale_list:
            v = _cut(x01, q, data.crop, cfg.test_grid, cfg.test_flips)
            yield data.normalise(v.flatten(0, 1)), y, len(y)


def multicrop_evaluate(model: nn.Module, data: DeviceData, split: str = "test", *,
                       autocast: Callable[[], Any] = contextlib.nullcontext,
                       batch_size: int | None = None) -> dict[str, float]:
    """Loss, accuracy, top-1/top-5 error of the views' averaged soft-max posteriors, and ``views``
    (per image). The loss is the negative log of the averaged probability of the true class."""
    cfg = data.cfg
    n_views = views_per_image(cfg)
    if n_views == 0:
        raise ValueError("multicrop_evaluate needs data.test_scales (e.g. '256,384,512')")
    scales = len(cfg.test_scale_list)
    was_training = model.training
    model.eval()
    totals = None
    probs = None
    with torch.no_grad():
        for i, (v, y, b) in enumerate(view_batches(data, split, batch_size)):
            with autocast():
                logits = _main(model(v))
            p = logits.float().softmax(dim=1).view(b, -1, logits.shape[1]).sum(dim=1)
            probs = p if i % scales == 0 else probs.add_(p)
            if i % scales == scales - 1:  # this chunk's last scale: its images are complete
                stats = _stats(probs.div_(n_views), y)
                totals = stats if totals is None else totals.add_(stats)
    model.train(was_training)
    n, loss_sum, top1, top5 = totals.double().tolist()  # the one read of the device
    return {"loss": loss_sum / n, "accuracy": top1 / n, "top1_error": 1 - top1 / n,
            "top5_error": 1 - top5 / n, "views": n_views}


def _main(output: Any) -> torch.Tensor:
    from sweeper.models import split_outputs

    return split_outputs(output)[0]


def _stats(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[n, summed NLL, top-1 hits, top-5 hits] as one device tensor (no host read)."""
    k = min(5, probs.shape[1])
    hits = probs.topk(k, dim=1).indices == y[:, None]
    nll = -probs.gather(1, y[:, None]).clamp_min(1e-12).log().sum()
    return torch.stack([torch.full_like(nll, y.shape[0]), nll, hits[:, 0].sum().float(),
                        hits.any(dim=1).sum().float()])
