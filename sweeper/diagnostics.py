"""Per-layer training health, and a named reason when a trial stalls. Plain PyTorch.

At init (step 0) and after every epoch, :class:`Diagnostics` pushes one fixed probe batch forward and
backward through the model (train mode, as training sees it) and measures, for every conv and linear
layer in execution order (``l00_conv``, ``l01_conv``, ..., ``l10_fc``):

  act_mean, act_std     the layer's output (pre-activation) -- the forward signal
  out_grad_std          std of dL/d(output) -- the backward signal
  zero_frac, dead_frac  of the ReLU that follows: zero outputs (~0.5 healthy) and units (channels) that
                        are zero for every probe example and position
  sensitivity           mean over units of (std across examples) / RMS: ~0 when the output ignores the input
  weight_norm, grad_norm, rel_grad = grad_norm / weight_norm
  update_ratio          lr * grad_norm / weight_norm, the step SGD takes relative to the weight
  rel_change            ||W_now - W_epoch_start|| / ||W_epoch_start||: what momentum and decay really did
  gain_meas, gain_pred  measured Var[y_l] / Var[y_{l-1}] beside He et al.'s n*Var[w]/2 for the init

Glorot & Bengio's point is why rel_grad and update_ratio, not the first/last gradient ratio, are the
stall signal: with equal widths the weight gradients keep their ratio while every one of them vanishes.

The probe runs under a forked RNG with BatchNorm buffers restored, so diagnostics never change the
training trajectory: a trial gives the same metrics with and without them.

Stall detection: training loss within ``stall_tolerance`` of ln(num_classes) for ``stall_epochs``
epochs (or a learned-then-collapsed trial back at chance); the cause is named from the measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sweeper.config import DiagnosticsConfig, ModelConfig
from sweeper.inits import fans, relu_gain, weight_std

__all__ = ["STALL_REASONS", "Diagnostics", "LayerInfo", "classify_stall", "predicted_stds"]

STALL_REASONS = ("exploding", "dead_relu", "vanishing_signal", "vanishing_gradient", "lr_too_high",
                 "lr_too_small", "learn_then_collapse", "plateau")

_WEIGHTED = (nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)

# Thresholds for naming a stall (science notes: update ratios ~3e-4..2e-8 in stalled small-init nets).
FROZEN_UPDATE = 1e-5  # every layer's update ratio below this: nothing moves
SLOW_UPDATE = 1e-3  # below this with a healthy signal: the lr is too small for the epochs given
DEAD_DEEP = 0.3  # dead-unit fraction in the deep half that marks a dead-ReLU collapse
INSENSITIVE = 0.05  # output std across examples / RMS below this: the input no longer matters
SIGNAL_COLLAPSE = 1e-3  # last/first layer activation std below this: the forward signal died
GRADIENT_COLLAPSE = 1e-3  # first/last layer grad norm below this: the backward signal died
HUGE_LOGITS = 1e4


@dataclass(frozen=True)
class LayerInfo:
    index: int
    key: str  # l03_conv
    path: str  # the module's name in the model, e.g. features.6
    module: nn.Module
    gain_pred: float  # n*Var[w]/2 of the init


class Diagnostics:
    """A :class:`sweeper.train.Hook` that measures layer health and labels stalls."""

    def __init__(self, cfg: DiagnosticsConfig):
        self.cfg = cfg
        self.layers: list[LayerInfo] = []
        self._start_weights: list[torch.Tensor] = []
        self._min_loss = math.inf
        self._initial_max_update = math.nan  # the largest per-step update ratio at step 0

    # ---- Hook protocol --------------------------------------------------------------------------

    def on_fit_start(self, ctx) -> dict[str, Any]:
        self._discover(ctx)
        metrics = self.measure(ctx)
        for layer, std in zip(self.layers, predicted_stds(ctx.cfg.model, self.layers,
                                                          input_second_moment=self._input_m2)):
            metrics[f"act_std_pred/{layer.key}"] = std
        # Which module each metric name means: trackers log these strings as parameters.
        metrics.update({f"layer/{key}": path for key, path in self.layer_map().items()})
        self._snapshot()
        self._initial_max_update = metrics.get("max_update_ratio", math.nan)
        return metrics

    def on_epoch_end(self, ctx, metrics: dict[str, Any]) -> dict[str, Any]:
        if not self.layers:  # resumed: rediscover the layers of the rebuilt model
            self._discover(ctx)
        out = self.measure(ctx)
        if self._start_weights:
            for layer, start in zip(self.layers, self._start_weights):
                change = (layer.module.weight.detach() - start).norm() / (start.norm() + 1e-30)
                out[f"rel_change/{layer.key}"] = float(change)
        self._snapshot()

        chance = math.log(ctx.data.num_classes)
        loss = metrics["train_loss"]
        self._min_loss = min(self._min_loss, loss)
        history = [h["train_loss"] for h in ctx.history] + [loss]
        recent = history[-self.cfg.stall_epochs:]
        at_chance = lambda v: math.isfinite(v) and abs(v - chance) <= self.cfg.stall_tolerance  # noqa
        stalled = len(recent) >= self.cfg.stall_epochs and all(at_chance(v) for v in recent)
        collapsed = at_chance(loss) and self._min_loss < chance - 0.5
        if stalled or collapsed:
            reason = "learn_then_collapse" if collapsed else classify_stall(
                out, self.layers, initial_max_update=self._initial_max_update)
            ctx.label = ("stalled", reason)
            ctx.stop = self.cfg.stop_on_stall
        else:
            ctx.label = None
        out["stalled"] = 1.0 if ctx.label else 0.0
        if ctx.label:
            out["stall_reason"] = ctx.label[1]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"start_weights": self._start_weights, "min_loss": self._min_loss,
                "initial_max_update": self._initial_max_update}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._start_weights = list(state["start_weights"])
        self._min_loss = state["min_loss"]
        self._initial_max_update = state["initial_max_update"]

    # ---- measurement ----------------------------------------------------------------------------

    def _discover(self, ctx) -> None:
        """Find the weight layers in execution order by running the probe once with hooks."""
        order: list[nn.Module] = []
        handles = [m.register_forward_hook(lambda mod, i, o: order.append(mod))
                   for m in ctx.model.modules() if isinstance(m, _WEIGHTED)]
        x, _ = ctx.data.probe_batch(self.cfg.probe_size)
        try:
            with torch.no_grad(), _isolated(ctx.model):
                ctx.model(x)
        finally:
            for h in handles:
                h.remove()
        paths = {m: name for name, m in ctx.model.named_modules()}
        seen: list[nn.Module] = []
        for m in order:
            if m not in seen:
                seen.append(m)
        self.layers = [
            LayerInfo(i, f"l{i:02d}_{'conv' if isinstance(m, nn.Conv2d) else 'fc'}", paths[m], m,
                      relu_gain(ctx.cfg.model, m))
            for i, m in enumerate(seen)
        ]
        self._input_m2 = float(x.float().pow(2).mean())

    def _snapshot(self) -> None:
        self._start_weights = [l.module.weight.detach().clone() for l in self.layers]

    def layer_map(self) -> dict[str, str]:
        """``l03_conv`` -> ``features.6``: the param that ties metric names to the model."""
        return {l.key: l.path for l in self.layers}

    def measure(self, ctx) -> dict[str, Any]:
        model = ctx.model
        index = {l.module: l for l in self.layers}
        outputs: dict[str, torch.Tensor] = {}
        out_grads: dict[str, torch.Tensor] = {}
        relu_stats: dict[str, list[torch.Tensor]] = {}
        last = [None]

        def layer_hook(mod, inputs, output):
            key = index[mod].key
            if key in outputs:  # a module used twice: keep its first use
                return
            last[0] = key
            outputs[key] = output.detach()
            if output.requires_grad:
                output.register_hook(lambda g, key=key: out_grads.__setitem__(key, g.detach()))

        def relu_hook(mod, inputs, output):
            if last[0] is not None and last[0] not in relu_stats:
                relu_stats[last[0]] = _relu_stats(output.detach())

        handles = [l.module.register_forward_hook(layer_hook) for l in self.layers]
        handles += [m.register_forward_hook(relu_hook) for m in model.modules()
                    if isinstance(m, nn.ReLU)]
        x, y = ctx.data.probe_batch(self.cfg.probe_size)
        lr = ctx.optimizer.param_groups[0]["lr"]
        saved_grads = [p.grad for p in model.parameters()]
        try:
            with _isolated(model):
                model.zero_grad(set_to_none=True)
                from sweeper.models import split_outputs

                logits = split_outputs(model(x))[0].float()
                loss = ctx.criterion(logits, y)
                loss.backward()
                metrics: dict[str, Any] = {
                    "probe_loss": float(loss.detach()),
                    "loss_minus_chance": float(loss.detach()) - math.log(logits.shape[1]),
                    "logit_std": float(logits.detach().std()),
                }
                prev_var = float(x.float().var())
                rel_grads = []
                for l in self.layers:
                    k, w = l.key, l.module.weight
                    out = outputs.get(k)
                    if out is None:  # not used on this pass (e.g. an aux head in eval mode)
                        continue
                    out = out.float()
                    var = float(out.var())
                    grad_norm = float(w.grad.norm()) if w.grad is not None else 0.0
                    weight_norm = float(w.detach().norm())
                    rel = grad_norm / (weight_norm + 1e-30)
                    rel_grads.append(rel)
                    metrics[f"act_mean/{k}"] = float(out.mean())
                    metrics[f"act_std/{k}"] = math.sqrt(var)
                    metrics[f"sensitivity/{k}"] = _sensitivity(out)
                    metrics[f"weight_norm/{k}"] = weight_norm
                    metrics[f"grad_norm/{k}"] = grad_norm
                    metrics[f"rel_grad/{k}"] = rel
                    metrics[f"update_ratio/{k}"] = lr * rel
                    metrics[f"gain_pred/{k}"] = l.gain_pred
                    metrics[f"gain_meas/{k}"] = var / prev_var if prev_var > 0 else float("nan")
                    prev_var = var
                    if k in out_grads:
                        metrics[f"out_grad_std/{k}"] = float(out_grads[k].float().std())
                    if k in relu_stats:
                        zero, dead = relu_stats[k]
                        metrics[f"zero_frac/{k}"] = float(zero)
                        metrics[f"dead_frac/{k}"] = float(dead)
                for name, m in model.named_modules():
                    if isinstance(m, _NORMS) and m.running_var is not None:
                        metrics[f"bn_running_var/{name}"] = float(m.running_var.mean())
                        metrics[f"bn_running_mean/{name}"] = float(m.running_mean.abs().mean())
        finally:
            for h in handles:
                h.remove()
            for p, g in zip(model.parameters(), saved_grads):
                p.grad = g
        finite = [v for v in metrics.values() if isinstance(v, float)]
        metrics["nonfinite"] = float(not all(math.isfinite(v) for v in finite))
        if rel_grads:
            metrics["min_update_ratio"] = lr * min(rel_grads)
            metrics["max_update_ratio"] = lr * max(rel_grads)
            metrics["sum_update_ratio"] = lr * sum(rel_grads)
        return metrics


def classify_stall(metrics: dict[str, Any], layers: list[LayerInfo], *,
                   initial_max_update: float = math.nan) -> str:
    """Name why a trial sits at chance, from one measurement of :meth:`Diagnostics.measure`.

    ``initial_max_update`` (the largest update ratio at step 0) separates an lr too small (updates
    were tiny from the start) from one too high (the first steps were large, then the net settled at
    chance in a flat region where the gradients are >= 10x smaller).
    """
    keys = [l.key for l in layers if f"act_std/{l.key}" in metrics]
    if not keys:
        return "plateau"
    if metrics.get("nonfinite") or metrics.get("logit_std", 0.0) > HUGE_LOGITS:
        return "exploding"
    stds = [metrics[f"act_std/{k}"] for k in keys]
    # The root cause first: a forward signal that dies along depth. Once it has, biases (the only
    # parameters still getting gradient) take over the deep layers and kill units as a consequence.
    if stds[0] > 0 and min(stds[1:], default=stds[0]) / stds[0] < SIGNAL_COLLAPSE:
        return "vanishing_signal"
    deep = keys[len(keys) // 2:]
    dead = [metrics.get(f"dead_frac/{k}", 0.0) for k in deep]
    dead = [d for d in dead if math.isfinite(d)]
    sens = [metrics[f"sensitivity/{k}"] for k in deep]
    if (dead and sum(dead) / len(dead) > DEAD_DEEP) or (sens and min(sens) < INSENSITIVE and
                                                       max(dead, default=0.0) > DEAD_DEEP):
        return "dead_relu"
    updates = [metrics[f"update_ratio/{k}"] for k in keys]
    if max(updates) < FROZEN_UPDATE:  # nothing moves, yet few units are dead
        return "vanishing_signal"
    first_grad = metrics[f"grad_norm/{keys[0]}"]
    last_grad = metrics[f"grad_norm/{keys[-1]}"]
    if last_grad > 0 and first_grad / last_grad < GRADIENT_COLLAPSE:
        return "vanishing_gradient"
    if max(updates) < SLOW_UPDATE:
        if initial_max_update >= SLOW_UPDATE and max(updates) < initial_max_update / 10:
            return "lr_too_high"
        return "lr_too_small"
    return "plateau"


def predicted_stds(model_cfg: ModelConfig, layers: list[LayerInfo], *,
                   input_second_moment: float = 1.0) -> list[float]:
    """He et al.'s forward prediction of each layer's output std at init, in execution order.

    Var[y_l] = n_l Var[w_l] E[x_l^2]; E[x^2] of the network input for the first layer, then
    E[x_{l+1}^2] = Var[y_l] / 2 behind a ReLU. It ignores pooling (x1.8-2.6) and zero padding
    (x0.44 on 2x2 maps), and BatchNorm (which resets the scale): compare it with the measured std
    of BN-free nets, where the product of per-layer gains is the whole story.
    """
    out = []
    m2 = input_second_moment
    for l in layers:
        fan_in, fan_out = fans(l.module)
        var = fan_in * weight_std(model_cfg, fan_in, fan_out) ** 2 * m2
        out.append(math.sqrt(var))
        m2 = var / 2
    return out


def _relu_stats(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of zero outputs, fraction of units zero for every example and position)."""
    positive = out > 0
    zero_frac = 1.0 - positive.float().mean()
    per_unit = positive.transpose(0, 1).reshape(out.shape[1], -1).any(dim=1)
    return zero_frac, 1.0 - per_unit.float().mean()


def _sensitivity(out: torch.Tensor) -> float:
    """Mean over units of (std across examples) / RMS of the output."""
    rms = out.pow(2).mean().sqrt()
    if rms == 0:
        return 0.0
    return float(out.std(dim=0).mean() / rms)


class _isolated:
    """Train mode for a probe, without touching the RNG or BatchNorm's running statistics."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        devices = [p.device.index or 0 for p in self.model.parameters() if p.is_cuda][:1]
        self.rng = torch.random.fork_rng(devices=devices)
        self.rng.__enter__()
        self.model.train()
        return self

    def __exit__(self, *exc):
        self.rng.__exit__(*exc)
        with torch.no_grad():
            for name, buf in self.model.named_buffers():
                buf.copy_(self.buffers[name])
        self.model.train(self.was_training)
        return False
