"""Update ratios: ||W_after - W_before|| / ||W_before|| of a real optimizer step, read exactly from
the optimizer's state (:func:`last_step`) or by stepping a copy (:func:`next_updates`)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from sweeper.diagnostics import stats
from sweeper.diagnostics.layers import LayerInfo

__all__ = ["group_of", "last_step", "last_updates", "next_updates"]


def last_step(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor | None:
    """W_after - W_before of the optimizer's most recent step on ``param``, read from its state; None
    where that cannot be done exactly.

    Diagnostics see the model only at epoch end, after the epoch's last step; the optimizer's state
    holds that step, so it is recovered exactly at no cost (no per-step hook, nothing to checkpoint,
    the same after a resume):
      SGD with momentum   W_after - W_before = -lr * buf (buf already holds weight decay and dampening)
      SGD otherwise       W_before = (W_after + lr (g + momentum buf)) / (1 - lr wd), with g the last
                          batch's gradient, still in .grad (training zeroes it before, not after, the step)
      Adam                -lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps) (L2 weight decay is
                          inside m and v); decoupled decay (AdamW) also scales W_before by (1 - lr wd)
    The lr in the param group is the one that step used: schedulers step after the epoch's hooks.
    """
    group = group_of(optimizer, param)
    state = optimizer.state.get(param, {})
    if group is None:
        return None
    lr, wd = float(group["lr"]), float(group.get("weight_decay", 0.0))
    w = param.detach()
    if type(optimizer) is torch.optim.SGD:
        momentum = group.get("momentum", 0.0)
        buf = state.get("momentum_buffer")
        if momentum and buf is None:
            return None  # no step taken yet
        if momentum and not group.get("nesterov", False):
            return -lr * buf
        if param.grad is None:
            return None
        g = -param.grad if group.get("maximize", False) else param.grad
        direction = g + momentum * buf if momentum else g
        before = (w + lr * direction) / (1 - lr * wd)
        return w - before
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        if "exp_avg" not in state:
            return None
        t = float(state["step"])
        beta1, beta2 = group["betas"]
        v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
        adam = -lr / (1 - beta1 ** t) * state["exp_avg"] / denom
        decoupled = type(optimizer) is torch.optim.AdamW or group.get("decoupled_weight_decay", False)
        if decoupled and wd:
            return w - (w - adam) / (1 - lr * wd)
        return adam
    return None


def group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, Any] | None:
    """The optimizer's param group holding ``param``; None if it does not train it."""
    return next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)


def last_updates(optimizer: torch.optim.Optimizer, layers: list[LayerInfo]) -> dict[str, float]:
    keys, deltas, befores = [], [], []
    with torch.no_grad():
        for l in layers:
            w = l.module.weight
            delta = last_step(optimizer, w)
            if delta is not None:
                keys.append(l.key)
                deltas.append(delta)
                befores.append(w.detach() - delta)
        steps, weights = stats.norms(deltas), stats.norms(befores)
    return {k: d / (b + 1e-30) for k, d, b in zip(keys, steps, weights)}


def next_updates(optimizer: torch.optim.Optimizer, layers: list[LayerInfo]) -> dict[str, float]:
    """||step|| / ||W|| of the step the optimizer would take now on the gradients in .grad.

    A copy of the optimizer (same class, same param-group settings, a deep copy of each weight's
    state) steps copies of the weights, so nothing the trial owns changes. Optimizers that cannot be
    rebuilt this way get nothing here (the caller falls back to lr * ||grad W|| / ||W||).
    """
    groups = []
    pairs = []
    with torch.no_grad():
        for group in optimizer.param_groups:
            members = {id(p) for p in group["params"]}
            clones = []
            for l in layers:
                w = l.module.weight
                if id(w) in members and w.grad is not None:
                    c = w.detach().clone()
                    c.grad = w.grad.detach().clone()
                    clones.append(c)
                    pairs.append((l.key, w, c))
            if clones:
                groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": clones})
        if not groups:
            return {}
        try:
            shadow = type(optimizer)(groups)
            for _, w, c in pairs:
                if w in optimizer.state:
                    shadow.state[c] = copy.deepcopy(optimizer.state[w])
            shadow.step()
        except Exception:  # an optimizer whose constructor wants more than param groups
            return {}
        steps = stats.norms(torch._foreach_sub([c for _, _, c in pairs], [w.detach() for _, w, _ in pairs]))
        weights = stats.norms([w.detach() for _, w, _ in pairs])
        return {key: d / (n + 1e-30) for (key, _, _), d, n in zip(pairs, steps, weights)}
