"""Pieces shared by the model families."""

from __future__ import annotations

from torch import nn

__all__ = ["norm2d", "scaled"]


def scaled(channels: int, width: float) -> int:
    """``channels`` times the width multiplier, never 0, so that very small widths still build."""
    return max(1, round(channels * width))


def norm2d(channels: int, batch_norm: bool, *, eps: float = 1e-5) -> nn.Module:
    # Identity instead of leaving the slot out keeps module names the same with BN on and off, so
    # per-layer results of the two settings line up by name.
    return nn.BatchNorm2d(channels, eps=eps) if batch_norm else nn.Identity()
