"""What diagnostics call a layer: the modules measured, and how each is named.

Layers are the conv and linear modules, numbered in the order the network runs them in eval mode
(its main path: ``l00_conv`` ... ``l10_fc``, the classifier last); layers that run only in training
(GoogLeNet's auxiliary heads) come after, as ``a00_conv``, ``a01_fc``. The hook's discovery pass
(:class:`sweeper.diagnostics.hook.Diagnostics`) finds them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["NORMS", "WEIGHTED", "LayerInfo", "unique"]

WEIGHTED = (nn.Conv2d, nn.Linear)  # the layers measured
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class LayerInfo:
    index: int  # position in the numbering: main path first, then auxiliary layers
    key: str  # l03_conv (main path) or a00_conv (auxiliary head)
    path: str  # the module's name in the model, e.g. features.6
    module: nn.Module
    gain_pred: float  # n Var[w] rho of the init scheme (biases aside) on the probe's map size
    aux: bool = False  # runs only in training (an auxiliary head): not on the main path


def unique(modules: list[nn.Module]) -> list[nn.Module]:
    seen: dict[nn.Module, None] = {}
    for m in modules:
        seen.setdefault(m, None)
    return list(seen)
