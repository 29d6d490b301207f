"""VGG (Simonyan & Zisserman, ICLR 2015): the paper's configurations A-E as data, and a plain stack of any depth.

A plan lists the feature extractor left to right: an ``int`` is a 3x3 conv with that many output channels,
``(channels, kernel)`` a conv with another kernel size (configuration C's 1x1 convs), ``"M"`` a 2x2 max-pool
and ``"LRN"`` local response normalisation. Every conv is followed by (BN and) ReLU.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from sweeper.config import ModelConfig
from sweeper.models._common import scaled

__all__ = [
    "A", "A_LRN", "B", "C", "D", "E", "STAGE_CHANNELS", "Layer", "VGG", "conv_count", "plain_plan",
    "vgg", "vgg11", "vgg11_lrn", "vgg13", "vgg16", "vgg16c", "vgg19", "vgg_from_plan",
]

Layer = int | tuple[int, int] | str

A: list[Layer] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
A_LRN: list[Layer] = [64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
B: list[Layer] = [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
C: list[Layer] = [64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M",
                  512, 512, (512, 1), "M", 512, 512, (512, 1), "M"]
D: list[Layer] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
E: list[Layer] = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                  512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
STAGE_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)

_HEAD_LAYERS = 3  # the paper head's FC-4096, FC-4096, FC-classes count as weight layers


def conv_count(plan: list[Layer]) -> int:
    return sum(1 for layer in plan if not isinstance(layer, str))


def plain_plan(depth: int) -> list[Layer]:
    """The conv plan of a plain VGG stack with ``depth`` weight layers (convs + 3 FC, as the paper counts).

    11/13/16/19 give the paper's A/B/D/E. Other depths spread ``depth - 3`` convs over the five stages as
    evenly as possible, the remainder going to the earliest stages: at 32x32 input the last stages run
    on 2x2 and 1x1 maps, where a padded 3x3 conv uses only 4/9 (or 1/9) of its taps, so extra depth is
    only real depth where the maps are still at least 8x8.
    """
    if depth < len(STAGE_CHANNELS) + _HEAD_LAYERS:
        raise ValueError(f"model.depth={depth!r} is too shallow: a plain VGG stack needs >= 8 weight layers "
                         "(5 convs, one per stage, + 3 FC)")
    paper = {11: A, 13: B, 16: D, 19: E}.get(depth)
    if paper is not None:
        return list(paper)
    per_stage, extra = divmod(depth - _HEAD_LAYERS, len(STAGE_CHANNELS))
    plan: list[Layer] = []
    for stage, channels in enumerate(STAGE_CHANNELS):
        plan += [channels] * (per_stage + (stage < extra)) + ["M"]
    return plan


class VGG(nn.Sequential):
    """``features`` (the conv stack) then ``head``, both Sequentials registered in forward order."""

    def __init__(self, features: nn.Sequential, head: nn.Sequential) -> None:
        super().__init__(OrderedDict(features=features, head=head))


def _features(plan: list[Layer], *, batch_norm: bool, width: float) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    in_ch = 3
    for layer in plan:
        match layer:
            case "M":
                # ceil_mode changes nothing at 32 or 224 px (every map is even); at the 8-16 px the config
                # allows it keeps a 1x1 map instead of pooling it away to nothing.
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
                continue
            case "LRN":
                # AlexNet's constants. PyTorch (like Caffe, where VGG was trained) divides alpha by size,
                # so this is the Caffe reference setting, 5x weaker than the AlexNet formula read literally.
                layers.append(nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0))
                continue
            case int():
                out_ch, kernel = layer, 3
            case (int(), int()):
                out_ch, kernel = layer
            case _:
                raise ValueError(f"unknown VGG plan entry {layer!r}: expected an int, (channels, kernel), "
                                 "'M' or 'LRN'")
        out_ch = scaled(out_ch, width)
        # The bias is kept under BN (where it is redundant) because torchvision keeps it, and the
        # parameter counts must match torchvision's.
        layers.append(nn.Conv2d(in_ch, out_ch, kernel_size=kernel, padding=kernel // 2))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=False))
        in_ch = out_ch
    return nn.Sequential(*layers), in_ch


def _head(cfg: ModelConfig, in_ch: int, num_classes: int) -> nn.Sequential:
    if cfg.head == "paper":
        hidden = scaled(4096, cfg.width)
        # torchvision's classifier. The 7x7 pool is a no-op at 224 px; at 32 px it repeats the 1x1 map
        # 49 times, which keeps the paper's FC sizes (and parameter count) at any resolution.
        return nn.Sequential(
            nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(),
            nn.Linear(in_ch * 49, hidden), nn.ReLU(inplace=False), nn.Dropout(cfg.dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=False), nn.Dropout(cfg.dropout),
            nn.Linear(hidden, num_classes),
        )
    if cfg.head == "compact":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes))
    raise ValueError(f"model.head={cfg.head!r} is not one of ['compact', 'paper']")


def vgg_from_plan(plan: list[Layer], cfg: ModelConfig, *, num_classes: int) -> VGG:
    features, out_ch = _features(plan, batch_norm=cfg.batch_norm, width=cfg.width)
    return VGG(features, _head(cfg, out_ch, num_classes))


def vgg11(cfg: ModelConfig, *, num_classes: int) -> VGG:
    """Configuration A."""
    return vgg_from_plan(A, cfg, num_classes=num_classes)


def vgg11_lrn(cfg: ModelConfig, *, num_classes: int) -> VGG:
    """Configuration A-LRN: the paper's test of AlexNet's LRN (it did not help, so B-E drop it)."""
    return vgg_from_plan(A_LRN, cfg, num_classes=num_classes)


def vgg13(cfg: ModelConfig, *, num_classes: int) -> VGG:
    """Configuration B."""
    return vgg_from_plan(B, cfg, num_classes=num_classes)


def vgg16c(cfg: ModelConfig, *, num_classes: int) -> VGG:
    """Configuration C: 16 layers, the third conv of stages 3-5 being 1x1 (more non-linearity, same field)."""
    return vgg_from_plan(C, cfg, num_classes=num_classes)


def vgg16(cfg: ModelConfig, *, num_classes: int) -> VGG:
    """Configuration D."""
    return vgg_from_plan(D, cfg, num_classes=num_classes)


def vgg19(cfg: ModelConfig, *, num_classes: int) -> VGG:
    """Configuration E."""
    return vgg_from_plan(E, cfg, num_classes=num_classes)


def vgg(cfg: ModelConfig, *, num_classes: int) -> VGG:
    """A plain VGG stack with ``cfg.depth`` weight layers (see :func:`plain_plan`)."""
    if cfg.depth is None:
        raise ValueError("model.depth is required for model.arch='vgg' (weight layers, e.g. 11, 16, 30)")
    return vgg_from_plan(plain_plan(cfg.depth), cfg, num_classes=num_classes)
