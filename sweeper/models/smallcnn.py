"""A small four-conv baseline: fast enough for smoke runs, deep enough to show init effects."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from sweeper.config import ModelConfig
from sweeper.models._common import scaled

__all__ = ["SmallCNN", "smallcnn"]

_CHANNELS = (64, 128, 256, 512)


class SmallCNN(nn.Sequential):
    """(conv3x3 [+ BN] + ReLU + 2x2 max-pool) x 4, global average pool, linear head."""

    def __init__(self, cfg: ModelConfig, *, num_classes: int) -> None:
        layers: list[nn.Module] = []
        in_ch = 3
        for channels in _CHANNELS:
            out_ch = scaled(channels, cfg.width)
            layers.append(nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=not cfg.batch_norm))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            # ceil_mode: four halvings of an 8 px input (the smallest the config allows) end at 1x1, not 0x0.
            layers += [nn.ReLU(inplace=False), nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)]
            in_ch = out_ch
        super().__init__(OrderedDict(
            features=nn.Sequential(*layers),
            head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes)),
        ))


def smallcnn(cfg: ModelConfig, *, num_classes: int) -> SmallCNN:
    return SmallCNN(cfg, num_classes=num_classes)
