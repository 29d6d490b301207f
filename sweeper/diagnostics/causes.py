"""Naming a stall: why a trial sits at chance, from one epoch's per-layer measurements.

:func:`classify_stall` names the measured cause (one of :data:`STALL_REASONS`);
:mod:`sweeper.counterfactual` then checks it by intervention, and :func:`signal_cause` says which
signal collapsed when an init intervention fixed a stall named otherwise. The thresholds below are
the whole of what "vanished", "dead" and "frozen" mean here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sweeper.diagnostics.layers import LayerInfo
from sweeper.diagnostics.updates import group_of
from sweeper.outcomes import SIGNAL_COLLAPSE

__all__ = ["STALL_REASONS", "classify_stall", "gradient_lr", "signal_cause", "signal_ratio"]

STALL_REASONS = ("exploding", "dead_relu", "vanishing_signal", "vanishing_gradient", "lr_too_high",
                 "lr_too_small", "learn_then_collapse", "plateau")

# Thresholds for naming a stall (science notes: update ratios ~3e-4..2e-8 in stalled small-init nets).
FROZEN_UPDATE = 1e-5  # every layer's update ratio below this: nothing moves
# Every relative loss gradient ||grad W|| / ||W|| below this: even a step of lr 0.1 with momentum 0.9
# (gradient_lr 1) would move no weight by FROZEN_UPDATE. Frozen small-init nets read 1e-18..4e-7.
FROZEN_GRADIENT = 1e-5
SLOW_UPDATE = 1e-3  # below this with a healthy signal: the lr is too small for the epochs given
LR_FALL = 3.0  # updates this many times below step 0's large ones: the lr was too high, not too small
DEAD_DEEP = 0.3  # dead-unit fraction in the deep half that marks a dead-ReLU collapse
INSENSITIVE = 0.05  # output std across examples / RMS below this: the input no longer matters
GRADIENT_COLLAPSE = 1e-3  # first/last layer grad norm below this: the backward signal died
HUGE_LOGITS = 1e4


def signal_ratio(metrics: dict[str, Any], layers: list[LayerInfo]) -> float:
    """The forward signal along depth: the smallest main-path activation std after the first layer,
    over the first layer's (nan when nothing was measured or the first layer is silent)."""
    stds = [metrics[f"act_std/{l.key}"] for l in layers
            if not l.aux and f"act_std/{l.key}" in metrics]
    if not stds or not stds[0] > 0:
        return math.nan
    return min(stds[1:], default=stds[0]) / stds[0]


def classify_stall(metrics: dict[str, Any], layers: list[LayerInfo], *,
                   initial_max_update: float = math.nan, initial_signal: float = math.nan,
                   gradient_lr: float = math.nan) -> str:
    """Name why a trial sits at chance, from one measurement of :meth:`Diagnostics.measure`.

    ``initial_max_update`` (the largest update ratio at step 0) separates an lr too small (updates
    were tiny from the start) from one too high (the first steps were large, then the net settled at
    chance in a flat region where the gradients are >= LR_FALL x smaller). ``initial_signal`` is step 0's
    :func:`signal_ratio`: a signal that had died at init is the root cause even where training has
    since lifted the ratio. ``gradient_lr`` (:func:`gradient_lr`, SGD only) turns each layer's
    relative loss gradient into the step it drives, for the "nothing moves" test. Only the main path
    counts.
    """
    keys = [l.key for l in layers if not l.aux and f"act_std/{l.key}" in metrics]
    if not keys:
        return "plateau"
    if metrics.get("nonfinite") or metrics.get("logit_std", 0.0) > HUGE_LOGITS:
        return "exploding"
    # The root cause first: a forward signal that dies along depth, now or at init. Once it has,
    # biases (the only parameters still getting gradient) take over the deep layers, inflate their
    # outputs and kill units as a consequence. Seen: a Xavier VGG-19 without BN whose ratio was 4e-4
    # at init (science notes predict 5e-4) read 2e-3 by epoch 3, with the last two convs' units
    # dead, and was named dead_relu.
    if signal_ratio(metrics, layers) < SIGNAL_COLLAPSE or initial_signal < SIGNAL_COLLAPSE:
        return "vanishing_signal"
    deep = keys[len(keys) // 2:]
    dead = [metrics.get(f"dead_frac/{k}", 0.0) for k in deep]
    dead = [d for d in dead if math.isfinite(d)]
    sens = [metrics[f"sensitivity/{k}"] for k in deep]
    if (dead and sum(dead) / len(dead) > DEAD_DEEP) or (sens and min(sens) < INSENSITIVE and
                                                       max(dead, default=0.0) > DEAD_DEEP):
        return "dead_relu"
    # Gradients and updates only of the layers that train: a frozen backbone (model.freeze) has no
    # gradient by construction, which is no vanishing gradient (seen: a fine-tuning arm so named).
    trained = [l.key for l in layers if l.key in keys and _trains(l.module)]
    if not trained:
        return "plateau"
    updates = [metrics[f"update_ratio/{k}"] for k in trained]
    # Nothing moves, yet few units are dead. With SGD the update ratio also holds weight decay's pull,
    # which in a frozen net settles at lr wd / (1 - momentum): 5e-5 under the VGG recipe (measured
    # 4.8e-5 in every layer of a stalled VGG-16 whose relative gradients were 1e-18..4e-7), above
    # FROZEN_UPDATE from lr 2e-3 on, so the test never fired. What moves a weight is the loss gradient:
    # its step is gradient_lr x ||grad W|| / ||W|| (science notes: "what collapses is every relative
    # gradient"). Other optimizers keep the update ratio (Adam normalises the gradient away).
    rel_grads = None
    if math.isfinite(gradient_lr) and all(f"rel_grad/{k}" in metrics for k in trained):
        rel_grads = [metrics[f"rel_grad/{k}"] for k in trained]
        driven = [gradient_lr * g for g in rel_grads]
    else:
        driven = updates
    if max(driven) < FROZEN_UPDATE:
        # Frozen by the gradient, or by the lr? Healthy relative gradients under a tiny lr are an lr
        # too small, not a dead signal. Seen: a He VGG-16 whose plateau schedule had cut lr 0.01 to
        # 1e-4 (gradient_lr 1e-3) read relative gradients 4e-3..7e-3 and a healthy forward signal,
        # and was named vanishing_signal; with a constant lr the same run reached 61%.
        if rel_grads is not None and max(rel_grads) >= FROZEN_GRADIENT:
            return "lr_too_small"
        return "vanishing_signal"
    first_grad = metrics[f"grad_norm/{trained[0]}"]
    last_grad = metrics[f"grad_norm/{trained[-1]}"]
    if last_grad > 0 and first_grad / last_grad < GRADIENT_COLLAPSE:
        return "vanishing_gradient"
    if max(updates) < SLOW_UPDATE:
        if initial_max_update >= SLOW_UPDATE:
            # The first steps were large at this lr, so it is not too small: the updates fell with the
            # gradient, in the flat region the large steps reached. A 10x fall was asked: a He VGG-19
            # at lr 0.02 went 4.5e-3 -> 5.6e-4 (8x) while its last conv died (0.03 -> 0.42 dead) and
            # validation fell 21.5% -> 8.3%, and was named lr_too_small beside lr 0.01 and 0.002
            # training. A fall under 3x is no lr verdict either way.
            return "lr_too_high" if max(updates) < initial_max_update / LR_FALL else "plateau"
        return "lr_too_small"
    return "plateau"


def gradient_lr(optimizer: Any, layers: list[LayerInfo]) -> float:
    """For plain SGD (torch.optim.SGD), the factor that turns a constant loss gradient into its
    steady-state step: lr (1 - dampening) / (1 - momentum), of the group holding the first main-path
    weight the optimizer trains (a frozen backbone's are not in it). nan for any other optimizer, or
    when no such weight is found."""
    if type(optimizer) is not torch.optim.SGD:
        return math.nan
    groups = (group_of(optimizer, l.module.weight) for l in layers if not l.aux)
    group = next((g for g in groups if g is not None), None)
    if group is None:
        return math.nan
    momentum = float(group.get("momentum", 0.0))
    if momentum >= 1.0:
        return math.nan
    return float(group["lr"]) * (1.0 - float(group.get("dampening", 0.0)) * (momentum > 0)) / (1.0 - momentum)


def _trains(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return weight is None or bool(weight.requires_grad)


def signal_cause(metrics: dict[str, Any], layers: list[LayerInfo]) -> str:
    """The init/signal cause the measurements point to, when an intervention on the init (He, BN)
    fixed a stall that classify_stall named otherwise: dead units if the deep half is dead, else the
    signal that collapsed more along depth -- forward (last/first activation std) or backward
    (first/last weight-gradient norm)."""
    keys = [l.key for l in layers if not l.aux and f"act_std/{l.key}" in metrics]
    if not keys:
        return "vanishing_signal"
    deep = [metrics.get(f"dead_frac/{k}", 0.0) for k in keys[len(keys) // 2:]]
    deep = [d for d in deep if math.isfinite(d)]
    if deep and sum(deep) / len(deep) > DEAD_DEEP:
        return "dead_relu"
    forward = signal_ratio(metrics, layers)
    forward = forward if math.isfinite(forward) else 1.0
    first, last = metrics.get(f"grad_norm/{keys[0]}", 1.0), metrics.get(f"grad_norm/{keys[-1]}", 1.0)
    backward = first / last if last > 0 else 1.0
    return "vanishing_gradient" if backward < forward else "vanishing_signal"

