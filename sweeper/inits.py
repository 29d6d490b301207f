"""Weight initialisation schemes, and what each predicts for the signal at init.

Every Conv2d and Linear layer gets the scheme's weights and zero biases; BatchNorm gets weight 1 and
bias 0. The standard deviation of each scheme is computed in one place, :func:`weight_std`, which both
initialises the layers and feeds the theory numbers the diagnostics log beside the measured ones.

Schemes (``model.init``):
  normal   N(0, init_std^2). The VGG paper's "zero mean and 1e-2 variance": read as std 0.01 (Caffe
           practice) it vanishes with depth; read literally (std 0.1) it explodes at full width.
  he       Kaiming/He et al. 2015: Var[w] = 2/fan for ReLU nets (fan_in preserves the forward signal,
           fan_out the backward one); normal by default.
  xavier   Glorot & Bengio 2010: Var[w] = 2/(fan_in + fan_out); uniform by default.
  default  PyTorch's own layer init (kaiming_uniform with a=sqrt(5): Var[w] = 1/(3 fan_in)), left as is.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from sweeper.config import ModelConfig

__all__ = ["INITS", "fans", "init_weights", "relu_gain", "weight_std"]

# Distribution used when model.init_distribution is None.
INITS: dict[str, str] = {
    "default": "uniform",
    "he": "normal",
    "normal": "normal",
    "xavier": "uniform",
}

_WEIGHTED = (nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def fans(module: nn.Module) -> tuple[int, int]:
    """(fan_in, fan_out) of a conv or linear layer: k*k*C_in and k*k*C_out (per group for convs)."""
    w = module.weight
    receptive = w[0][0].numel() if w.dim() > 2 else 1
    return w.shape[1] * receptive, w.shape[0] * receptive


def weight_std(cfg: "ModelConfig", fan_in: int, fan_out: int) -> float:
    """The standard deviation that ``cfg.init`` gives a layer with these fans."""
    if cfg.init == "normal":
        return cfg.init_std
    if cfg.init == "he":
        return math.sqrt(2.0 / (fan_in if cfg.init_mode == "fan_in" else fan_out))
    if cfg.init == "xavier":
        return math.sqrt(2.0 / (fan_in + fan_out))
    if cfg.init == "default":
        return 1.0 / math.sqrt(3.0 * fan_in)
    raise ValueError(f"model.init={cfg.init!r} is not one of {sorted(INITS)}")


def relu_gain(cfg: "ModelConfig", module: nn.Module) -> float:
    """He et al.'s per-layer variance multiplier g = n*Var[w]/2 for a layer followed by ReLU (n = fan_in).

    g = 1 keeps the signal's scale; g^L over L layers is what vanishes (normal 0.01, xavier) or explodes.
    """
    fan_in, fan_out = fans(module)
    return 0.5 * fan_in * weight_std(cfg, fan_in, fan_out) ** 2


@torch.no_grad()
def init_weights(model: nn.Module, cfg: "ModelConfig") -> nn.Module:
    """Apply ``cfg.init`` to every conv and linear layer of ``model``, in place; return the model."""
    distribution = cfg.init_distribution or INITS[cfg.init]
    for module in model.modules():
        if isinstance(module, _NORMS):
            if module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        elif isinstance(module, _WEIGHTED) and cfg.init != "default":
            std = weight_std(cfg, *fans(module))
            if distribution == "normal":
                nn.init.normal_(module.weight, 0.0, std)
            else:  # uniform on [-a, a] has std a/sqrt(3)
                bound = std * math.sqrt(3.0)
                nn.init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
