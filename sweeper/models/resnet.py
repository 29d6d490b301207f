"""ResNet-18/34 (He et al., CVPR 2016) with BasicBlocks, an ImageNet or a CIFAR stem, and BN optional."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from sweeper.config import ModelConfig
from sweeper.models._common import norm2d, scaled

__all__ = ["BasicBlock", "ResNet", "resnet18", "resnet34"]

_STAGE_CHANNELS = (64, 128, 256, 512)


def _conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, batch_norm: bool) -> nn.Conv2d:
    # Under BN a conv bias is cancelled by the mean subtraction; without BN it is the layer's only offset.
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=not batch_norm)


class BasicBlock(nn.Module):
    """Two 3x3 convs plus the shortcut; a 1x1 projection shortcut where the shape changes (option B)."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int, batch_norm: bool) -> None:
        super().__init__()
        self.conv1 = _conv(in_ch, out_ch, 3, stride=stride, batch_norm=batch_norm)
        self.bn1 = norm2d(out_ch, batch_norm)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = _conv(out_ch, out_ch, 3, batch_norm=batch_norm)
        self.bn2 = norm2d(out_ch, batch_norm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=_conv(in_ch, out_ch, 1, stride=stride, batch_norm=batch_norm),
                bn=norm2d(out_ch, batch_norm),
            ))
        # Its own module (not a second call of relu1) so that activation hooks see each ReLU once.
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Sequential):
    """stem, layer1..layer4, global average pool, linear head; registered in forward order."""

    def __init__(self, blocks: Sequence[int], cfg: ModelConfig, *, num_classes: int) -> None:
        bn, width = cfg.batch_norm, cfg.width
        stem_ch = scaled(64, width)
        if cfg.stem == "imagenet":
            stem = nn.Sequential(OrderedDict(
                conv=_conv(3, stem_ch, 7, stride=2, batch_norm=bn), bn=norm2d(stem_ch, bn),
                relu=nn.ReLU(inplace=False), pool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            ))
        elif cfg.stem == "cifar":
            # At 32 px the ImageNet stem's 4x downsampling would leave layer4 a 1x1 map.
            stem = nn.Sequential(OrderedDict(
                conv=_conv(3, stem_ch, 3, batch_norm=bn), bn=norm2d(stem_ch, bn), relu=nn.ReLU(inplace=False),
            ))
        else:
            raise ValueError(f"model.stem={cfg.stem!r} is not one of ['cifar', 'imagenet']")
        layers: OrderedDict[str, nn.Module] = OrderedDict(stem=stem)
        in_ch = stem_ch
        for stage, (n_blocks, channels) in enumerate(zip(blocks, _STAGE_CHANNELS, strict=True)):
            out_ch = scaled(channels, width)
            layers[f"layer{stage + 1}"] = nn.Sequential(*(
                BasicBlock(in_ch if i == 0 else out_ch, out_ch,
                           stride=2 if stage > 0 and i == 0 else 1, batch_norm=bn)
                for i in range(n_blocks)
            ))
            in_ch = out_ch
        layers["pool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten()
        layers["fc"] = nn.Linear(in_ch, num_classes)
        super().__init__(layers)


def resnet18(cfg: ModelConfig, *, num_classes: int) -> ResNet:
    return ResNet((2, 2, 2, 2), cfg, num_classes=num_classes)


def resnet34(cfg: ModelConfig, *, num_classes: int) -> ResNet:
    return ResNet((3, 4, 6, 3), cfg, num_classes=num_classes)
