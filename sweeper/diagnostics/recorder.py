"""One forward and backward pass, measured per layer while it runs; and the probe's isolation."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from sweeper.diagnostics import stats
from sweeper.diagnostics.layers import LayerInfo
from sweeper.diagnostics.theory import position_energy
from sweeper.diagnostics.updates import last_updates

__all__ = ["Recorder", "isolated"]


class Recorder:
    """One forward and backward pass's per-layer statistics, taken by hooks while the pass runs.

    Each layer's output, input, ReLU output and output gradient is reduced to a few numbers (or an
    HxW energy map) the moment it exists, on its first ``len(y)`` examples, so nothing the size of
    an activation outlives the pass: a recorded training step holds, beyond an unrecorded one, only
    the reductions' transient copies of one layer's ``len(y)`` examples at a time. Weight gradients
    are taken as the optimizer will see them (after accumulation, before the step) as device scalars,
    read once afterwards. The hooks only read, so a recorded
    training step updates the model exactly as an unrecorded one does.

    Used as a context around the pass: the probe's (:meth:`Diagnostics.measure`) or a training
    step's (:meth:`Diagnostics.watch_step`). Reading the statistics synchronises a GPU, in that one
    pass only."""

    def __init__(self, layers: list[LayerInfo], model: nn.Module, criterion: nn.Module, y: torch.Tensor,
                 *, optimizer: torch.optim.Optimizer | None = None):
        # optimizer: a training step's (its update is read as the step ends); None for a probe pass,
        # which takes no step and runs at the weights the epoch ends with.
        self.layers, self.model, self.criterion, self.optimizer = layers, model, criterion, optimizer
        self.norms: dict[str, tuple[float, float | None]] | None = None  # weight, bias norm before the step
        self.updates: dict[str, float] = {}  # the step's update ratio per layer, see last_step
        self.complete = False  # the pass ran to its end (a step that raised leaves nothing to read)
        self.y = y.detach()
        self.n = len(self.y)
        self.moments: dict[str, tuple[float, float, float, float]] = {}  # mean, var, E[y^2], sensitivity
        # E[x^2] of the input, its map size, its E[x^2] per position (see predicted_gain)
        self.inputs: dict[str, tuple[float, tuple[int, ...], torch.Tensor | None]] = {}
        self.out_grad_std: dict[str, float] = {}
        self.relu: dict[str, tuple[float, float]] = {}  # zero_frac, dead_frac
        self.grad_norms: dict[str, torch.Tensor] = {}
        self.loss, self.logit_std, self.classes = math.nan, math.nan, 2
        self._handles: list[Any] = []
        self._last: str | None = None

    def __enter__(self) -> "Recorder":
        index = {l.module: l for l in self.layers}
        n = self.n

        def layer_hook(mod, args, output):
            key = index[mod].key
            if key in self.moments:  # a module used twice: keep its first use
                return
            self._last = key
            self.moments[key] = stats.output_moments(output.detach()[:n])
            x_in = args[0].detach()[:n]
            energy = position_energy(x_in)  # None for a linear layer's flat input
            m2 = float(energy.mean()) if energy is not None else stats.second_moment(x_in)
            self.inputs[key] = (m2, tuple(x_in.shape[2:]), energy)
            if output.requires_grad:
                output.register_hook(functools.partial(self._out_grad, key))

        def relu_hook(mod, args, output):
            if self._last is not None and self._last not in self.relu:
                # Counted in float32: a bf16 sum of signs is exact only up to 256.
                self.relu[self._last] = stats.relu_fractions(*stats.relu_counts(output.detach()[:n].float()))

        def logits_hook(mod, args, output):
            from sweeper.models import split_outputs

            logits = split_outputs(output)[0].detach()[:n].float()
            self.loss = float(self.criterion(logits, self.y))
            self.logit_std, self.classes = float(logits.std()), logits.shape[1]

        def grad_hook(key):
            def hook(param):
                # Called after each accumulation: a layer used twice ends with its summed gradient.
                self.grad_norms[key] = torch.linalg.vector_norm(param.grad.detach())
            return hook

        if self.optimizer is not None:
            self.norms = stats.layer_norms(self.layers)
        self._handles = [l.module.register_forward_hook(layer_hook) for l in self.layers]
        self._handles += [m.register_forward_hook(relu_hook) for m in self.model.modules()
                          if isinstance(m, nn.ReLU)]
        self._handles.append(self.model.register_forward_hook(logits_hook))
        self._handles += [l.module.weight.register_post_accumulate_grad_hook(grad_hook(l.key))
                          for l in self.layers if l.module.weight.requires_grad]
        return self

    def _out_grad(self, key: str, grad: torch.Tensor) -> None:  # a tensor hook: must return None
        # A training step's loss is the mean over its whole batch, which scales dL/dy by 1/batch;
        # rescaled to the mean over the n examples measured, as a probe pass of them would give.
        self.out_grad_std.setdefault(key, stats.std(grad.detach()[:self.n]) * (grad.shape[0] / self.n))

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles = []
        if exc[0] is None:
            if self.optimizer is not None:  # .grad still holds this step's gradient: exact
                self.updates = last_updates(self.optimizer, self.layers)
            self.complete = True
        return False


class isolated:
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
