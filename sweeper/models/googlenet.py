"""GoogLeNet / Inception v1 (Szegedy et al., CVPR 2015), laid out as torchvision's so parameter counts match.

In training mode with auxiliary heads the forward pass returns :class:`GoogLeNetOutput`
``(logits, aux1, aux2)``; otherwise the logits alone. The training loop weights the auxiliary losses.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor, nn

from sweeper.config import ConfigError, ModelConfig
from sweeper.models._common import norm2d, scaled

__all__ = ["INCEPTION", "GoogLeNet", "GoogLeNetOutput", "googlenet"]

# Table 1 of the paper: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
INCEPTION: dict[str, tuple[int, int, int, int, int, int]] = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


class GoogLeNetOutput(NamedTuple):
    logits: Tensor
    aux1: Tensor
    aux2: Tensor


class BasicConv(nn.Sequential):
    """conv, BN (eps 1e-3, as torchvision) or Identity, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, batch_norm: bool, *, kernel_size: int, stride: int = 1) -> None:
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2,
                           bias=not batch_norm),
            bn=norm2d(out_ch, batch_norm, eps=1e-3),
            relu=nn.ReLU(inplace=False),
        ))


class Inception(nn.Module):
    def __init__(self, in_ch: int, spec: tuple[int, ...], batch_norm: bool, width: float) -> None:
        super().__init__()
        n1, r3, n3, r5, n5, proj = (scaled(n, width) for n in spec)
        bn = batch_norm
        self.branch1 = BasicConv(in_ch, n1, bn, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv(in_ch, r3, bn, kernel_size=1), BasicConv(r3, n3, bn, kernel_size=3))
        # 3x3 as torchvision; the paper's 5x5. Kept so that parameter counts (and torchvision's
        # pretrained weights) match.
        self.branch3 = nn.Sequential(BasicConv(in_ch, r5, bn, kernel_size=1), BasicConv(r5, n5, bn, kernel_size=3))
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            BasicConv(in_ch, proj, bn, kernel_size=1),
        )
        self.out_channels = n1 + n3 + n5 + proj

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)


def _aux_head(in_ch: int, num_classes: int, batch_norm: bool, width: float) -> nn.Sequential:
    conv_ch, hidden = scaled(128, width), scaled(1024, width)
    return nn.Sequential(OrderedDict(
        # The paper's 5x5/3 average pool yields 4x4 at 224 px; adaptive pooling yields 4x4 at any size
        # (at 32 px it upsamples the 2x2 map).
        pool=nn.AdaptiveAvgPool2d((4, 4)),
        conv=BasicConv(in_ch, conv_ch, batch_norm, kernel_size=1),
        flatten=nn.Flatten(),
        fc1=nn.Linear(conv_ch * 16, hidden),
        relu=nn.ReLU(inplace=False),
        dropout=nn.Dropout(0.7),
        fc2=nn.Linear(hidden, num_classes),
    ))


class GoogLeNet(nn.Module):
    """The main path is registered in forward order; the auxiliary heads, side branches used only in
    training, are registered last so that enumerating layers walks the main path without interruption.

    As torchvision, the stem has no LRN (the paper's two LRN layers have no parameters) and the max-pools
    use ceil_mode, which keeps 32 px inputs at 2x2 by inception 4 and 1x1 by inception 5; inputs below
    15 px would pool away to nothing and are refused.
    """

    def __init__(self, cfg: ModelConfig, *, num_classes: int) -> None:
        super().__init__()
        bn, width = cfg.batch_norm, cfg.width
        c64, c192 = scaled(64, width), scaled(192, width)
        self.conv1 = BasicConv(3, c64, bn, kernel_size=7, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv(c64, c64, bn, kernel_size=1)
        self.conv3 = BasicConv(c64, c192, bn, kernel_size=3)
        self.pool2 = nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
        ch = c192
        blocks: dict[str, Inception] = {}
        for name, spec in INCEPTION.items():
            blocks[name] = Inception(ch, spec, bn, width)
            ch = blocks[name].out_channels
        self.inception3a, self.inception3b = blocks["3a"], blocks["3b"]
        self.pool3 = nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
        self.inception4a, self.inception4b, self.inception4c = blocks["4a"], blocks["4b"], blocks["4c"]
        self.inception4d, self.inception4e = blocks["4d"], blocks["4e"]
        self.pool4 = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.inception5a, self.inception5b = blocks["5a"], blocks["5b"]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(ch, num_classes)
        self.aux1: nn.Module | None = None
        self.aux2: nn.Module | None = None
        if cfg.aux_heads:
            self.aux1 = _aux_head(blocks["4a"].out_channels, num_classes, bn, width)
            self.aux2 = _aux_head(blocks["4d"].out_channels, num_classes, bn, width)

    def forward(self, x: Tensor) -> Tensor | GoogLeNetOutput:
        if min(x.shape[-2:]) < 15:
            # Caught here because torch's own error ("output size is too small", deep inside) names no setting.
            # A ConfigError (a ValueError): the user's setting, exit 2 at launch and debug alike.
            raise ConfigError([f"GoogLeNet needs inputs of at least 15x15 px, got {tuple(x.shape[-2:])}: "
                               "its ceil-mode stem pools reduce smaller ones to nothing (raise "
                               "data.resolution)"])
        x = self.pool2(self.conv3(self.conv2(self.pool1(self.conv1(x)))))
        x = self.pool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        with_aux = self.training and self.aux1 is not None and self.aux2 is not None
        aux1 = self.aux1(x) if with_aux else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if with_aux else None
        x = self.pool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        logits = self.fc(self.dropout(self.flatten(self.avgpool(x))))
        if with_aux:
            return GoogLeNetOutput(logits, aux1, aux2)
        return logits


def googlenet(cfg: ModelConfig, *, num_classes: int) -> GoogLeNet:
    return GoogLeNet(cfg, num_classes=num_classes)
