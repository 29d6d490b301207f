"""Per-layer training health, and a named reason when a trial stalls. Plain PyTorch.

At init (step 0) :class:`Diagnostics` pushes one fixed probe batch forward and backward through the
model (train mode, as training sees it; auxiliary heads' losses weighted by ``model.aux_weight`` as
training weights them); for every epoch it records the epoch's last full-size training step as that
step runs (``diagnostics.epoch_probe='training_step'``, the default: :class:`_Recorder`) or runs the
same probe pass again after the epoch (``'fixed'``). Either way it measures, for every conv and linear
layer, over ``probe_size`` examples:

  act_mean, act_std     the layer's output (pre-activation) -- the forward signal
  out_grad_std          std of dL/d(output) -- the backward signal
  zero_frac, dead_frac  of the ReLU that follows: zero outputs (~0.5 healthy) and units (channels) that
                        are zero for every probe example and position
  sensitivity           mean over units of (std across examples) / RMS: ~0 when the output ignores the input
  weight_norm, grad_norm, rel_grad = grad_norm / weight_norm
  update_ratio          ||W_after - W_before|| / ||W_before|| of one real optimizer step (momentum,
                        weight decay and Adam included; see :func:`last_step`)
  rel_change            ||W_now - W_epoch_start|| / ||W_epoch_start||: the whole epoch's displacement
  gain_meas             E[y^2] / E[x^2]: the layer's output y over its *own* input x, captured by a
                        forward hook, so pooling, BN, shortcuts and branches before it do not enter
  gain_pred             the same from theory: n E[w^2] rho + E[b^2] / E[x^2] (:func:`predicted_gain`),
                        rho weighted by where the real input's energy sits (:func:`padding_fraction`)
  gain_err              gain_meas / gain_pred - 1; ``gain_err_max`` is the largest |gain_err|

Step 0 also carries ``act_std_pred/<layer>``: He et al.'s output std predicted by propagating E[x^2]
analytically from the probe input through every module on the path (:func:`chain_second_moments`),
and ``act_std_err_max``, the largest factor between it and the measured std.

Layers are numbered in the order the network runs them in eval mode, its main path: ``l00_conv`` ...
``l10_fc``, the classifier last. Layers that run only in training (GoogLeNet's auxiliary heads) come
after, as ``a00_conv``, ``a01_fc``, ...: the main path's names are the same with and without them.

Glorot & Bengio's point is why rel_grad and update_ratio, not the first/last gradient ratio, are the
stall signal: with equal widths the weight gradients keep their ratio while every one of them vanishes.

A probe pass runs under a forked RNG with BatchNorm buffers restored, and a recorded step's hooks only
read, so diagnostics never change the training trajectory: a trial gives the same metrics with and
without them. A recorded epoch costs only its statistics (about a quarter of a step on a CPU; see
``measure``); a 'fixed' epoch adds the probe's forward and backward, about one training step; step 0
costs one probe pass and the layer discovery in both modes (issue #9: +3% against +7% on 21-step
epochs). What a recorded epoch measures is the step that trained the net: augmented training images,
the batch's own gradient (over the whole batch, so ``grad_norm`` carries less noise at larger
batches; ``out_grad_std`` is rescaled to a mean over the examples measured, as a probe's is) and
update, with everything taken from the pass (``rel_grad``, ``gain_pred`` included) at the weights
that step ran with; ``weight_norm`` and ``rel_change`` are the weights at the epoch's end. A 'fixed'
epoch compares epochs on the same unaugmented images. Under ``compile`` every epoch uses the probe
pass: a recorded step runs eagerly, and an eager step is not bit-identical to a compiled one.

Stall detection: ``stall_epochs`` epochs in a row no better than chance (training loss not below
ln(num_classes) - ``stall_tolerance``, validation accuracy not past 2x chance where measured:
:func:`sweeper.outcomes.no_better_than_chance`), or a trial that learned (an epoch's loss below
ln C - 2 x ``stall_tolerance``, and validation accuracy past 2x chance where measured) back in that
band or above it (``learn_then_collapse``); the cause is named from the measurements,
then checked by intervention the first time a stall is named (:mod:`sweeper.counterfactual`: lr / 10,
lr x 10, He init, BN in short runs): where the interventions decide it, the label carries their cause
(``stall_reason``; the measured one stays in ``stall_reason_measured``, the evidence in ``cf_evidence``).
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sweeper.config import DiagnosticsConfig, ModelConfig
from sweeper.inits import fans, weight_std
from sweeper.outcomes import SIGNAL_COLLAPSE, TRAINED_OVER_CHANCE, no_better_than_chance

__all__ = ["STALL_REASONS", "Diagnostics", "LayerInfo", "chain_second_moments", "classify_stall",
           "gradient_lr", "last_step", "maxpool_factor", "padding_fraction", "position_energy",
           "predicted_gain", "predicted_stds", "relu_correlation", "signal_cause", "signal_ratio",
           "spatial_correlation", "trial_hooks"]

STALL_REASONS = ("exploding", "dead_relu", "vanishing_signal", "vanishing_gradient", "lr_too_high",
                 "lr_too_small", "learn_then_collapse", "plateau")

_WEIGHTED = (nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)

# Thresholds for naming a stall (science notes: update ratios ~3e-4..2e-8 in stalled small-init nets).
FROZEN_UPDATE = 1e-5  # every layer's update ratio below this: nothing moves
SLOW_UPDATE = 1e-3  # below this with a healthy signal: the lr is too small for the epochs given
LR_FALL = 3.0  # updates this many times below step 0's large ones: the lr was too high, not too small
DEAD_DEEP = 0.3  # dead-unit fraction in the deep half that marks a dead-ReLU collapse
INSENSITIVE = 0.05  # output std across examples / RMS below this: the input no longer matters
GRADIENT_COLLAPSE = 1e-3  # first/last layer grad norm below this: the backward signal died
HUGE_LOGITS = 1e4


@dataclass(frozen=True)
class LayerInfo:
    index: int  # position in the numbering: main path first, then auxiliary layers
    key: str  # l03_conv (main path) or a00_conv (auxiliary head)
    path: str  # the module's name in the model, e.g. features.6
    module: nn.Module
    gain_pred: float  # n Var[w] rho of the init scheme (biases aside) on the probe's map size
    aux: bool = False  # runs only in training (an auxiliary head): not on the main path


def trial_hooks(cfg) -> list:
    """The hooks a trial trains with (a ``TrialConfig``): the Diagnostics hook unless it is off. One
    place for the Ray trial, ``sweeper debug`` and the bench scripts."""
    return [Diagnostics(cfg.diagnostics)] if cfg.diagnostics.enabled else []


class Diagnostics:
    """A :class:`sweeper.train.Hook` that measures layer health and labels stalls."""

    def __init__(self, cfg: DiagnosticsConfig):
        self.cfg = cfg
        self.layers: list[LayerInfo] = []
        self._chain: list[nn.Module] = []  # the modules act_std_pred walks, see _discover
        self._start_weights: list[torch.Tensor] = []
        self._min_loss = math.inf
        self._initial_max_update = math.nan  # the largest per-step update ratio at step 0
        self._initial_signal = math.nan  # step 0's forward signal ratio (see signal_ratio)
        # The counterfactual check of the first named stall: {"cause", "decisive", "evidence"}.
        self._checked: dict[str, Any] | None = None
        self._recorded: _Recorder | None = None  # this epoch's recorded training step, see watch_step

    # ---- Hook protocol --------------------------------------------------------------------------

    def on_fit_start(self, ctx) -> dict[str, Any]:
        self._discover(ctx)
        # Step 0 has no previous step: update_ratio is the first step the optimizer will take, on
        # the probe batch's gradient, from its (empty) state.
        metrics = self.measure(ctx, step="next")
        x, _ = ctx.data.probe_batch(self.cfg.probe_size)
        keys = {l.module: l.key for l in self.layers}
        folds = []
        m2_in = float(x.detach().float().pow(2).mean())
        chain = chain_second_moments(self._chain, m2_in, tuple(x.shape[2:]),
                                     input_correlation=spatial_correlation(x))
        for m, m2 in chain:
            if m in keys and math.isfinite(m2):
                k = keys[m]
                metrics[f"act_std_pred/{k}"] = math.sqrt(m2)
                meas = metrics.get(f"act_std/{k}", math.nan)
                if m2 > 0 and meas > 0:
                    folds.append(max(meas / math.sqrt(m2), math.sqrt(m2) / meas))
        if folds:
            metrics["act_std_err_max"] = max(folds)
        # Which module each metric name means: trackers log these strings as parameters.
        metrics.update({f"layer/{key}": path for key, path in self.layer_map().items()})
        self._snapshot()
        self._initial_max_update = metrics.get("max_update_ratio", math.nan)
        self._initial_signal = signal_ratio(metrics, self.layers)
        return metrics

    def on_epoch_end(self, ctx, metrics: dict[str, Any]) -> dict[str, Any]:
        if not self.layers:  # resumed: rediscover the layers of the rebuilt model
            self._discover(ctx)
        recorded, self._recorded = self._recorded, None
        if recorded is not None and not recorded.complete:  # the step raised: nothing to read
            recorded = None
        out = self.measure(ctx, step="last", recorded=recorded)
        if self._start_weights:
            pairs = list(zip(self.layers, self._start_weights))
            with torch.no_grad():
                moved = torch._foreach_sub([l.module.weight.detach() for l, _ in pairs],
                                           [s for _, s in pairs])
                changes, starts = _norms(moved), _norms([s for _, s in pairs])
            for (layer, _), change, start in zip(pairs, changes, starts):
                out[f"rel_change/{layer.key}"] = change / (start + 1e-30)
        self._snapshot()

        chance = math.log(ctx.data.num_classes)
        loss = metrics["train_loss"]
        self._min_loss = min(self._min_loss, loss)
        # A stall: stall_epochs epochs in a row that show no learning (sweeper.outcomes, whose
        # "at chance" this is): the loss not below the chance band (above it is worse than guessing),
        # validation not past the "trains" bar.
        rows = [*ctx.history, metrics]
        flags = [no_better_than_chance(h["train_loss"], chance, self.cfg.stall_tolerance,
                                       h.get("val_accuracy"), rows[i - 1]["train_loss"] if i else None)
                 for i, h in enumerate(rows)]
        stalled = len(flags) >= self.cfg.stall_epochs and all(flags[-self.cfg.stall_epochs:])
        # Learned = an epoch's loss a whole tolerance past the edge of the chance band, the bar a
        # counterfactual run must pass to have "escaped chance" (sweeper.counterfactual). It was
        # ln C - 0.5, which missed a He-init VGG-19 that reached 33% validation accuracy (loss 2.04,
        # ln 10 - 0.26) and fell back to ln 10: the report then said it trained. Learned also means
        # validation accuracy past the report's "trains" bar (2x chance), where one was measured: one
        # epoch just past the band (2.19) in a noisy net near chance is no learning to lose, and
        # naming it a collapse would spend the once-per-trial check on it. Collapsed = back in the
        # band or past it: the same VGG-19 under `sweeper debug` went 2.30, 2.22, 1.98, then 2.96
        # (val 12%), above ln C, and was "completed". (Starting above ln C, as He init does, is no
        # collapse: nothing was learned to lose.)
        vals = [v for v in (h.get("val_accuracy") for h in [*ctx.history, metrics])
                if isinstance(v, (int, float)) and math.isfinite(v)]
        learned = self._min_loss < chance - 2 * self.cfg.stall_tolerance and (
            not vals or max(vals) > TRAINED_OVER_CHANCE / ctx.data.num_classes)
        collapsed = learned and math.isfinite(loss) and loss >= chance - self.cfg.stall_tolerance
        if stalled or collapsed:
            measured = "learn_then_collapse" if collapsed else classify_stall(
                out, self.layers, initial_max_update=self._initial_max_update,
                initial_signal=self._initial_signal, gradient_lr=gradient_lr(ctx.optimizer, self.layers))
            if self._checked is None:  # the first epoch a stall is named: check it, once per trial
                out.update(self._check(ctx, measured, out))
            reason = measured
            if self._checked and self._checked["decisive"] and not collapsed:
                reason = self._checked["cause"]  # the interventions decided it
            out["stall_reason_measured"] = measured
            ctx.label = ("stalled", reason)
            ctx.stop = self.cfg.stop_on_stall
        else:
            ctx.label = None
        out["stalled"] = 1.0 if ctx.label else 0.0
        if ctx.label:
            out["stall_reason"] = ctx.label[1]
        return out

    def _check(self, ctx, measured: str, metrics: dict[str, Any]) -> dict[str, Any]:
        """Run the counterfactuals (:mod:`sweeper.counterfactual`) and decide the checked cause.

        A learned-then-collapsed trial keeps its label (it names what happened, and outcomes read it);
        its evidence is still recorded. A run that fails (e.g. out of memory for a BN copy) leaves the
        measured cause and says why, instead of failing the trial: the runs only ever touch copies."""
        from sweeper.counterfactual import checked_cause, run_counterfactuals

        if not self.cfg.counterfactuals:
            self._checked = {"cause": measured, "decisive": False, "evidence": "counterfactuals off"}
            return {}
        try:
            evidence = run_counterfactuals(ctx, self.cfg)
        except Exception as exc:  # noqa: BLE001 -- a diagnostic must not end a sweep's trial
            why = f"the runs failed: {type(exc).__name__}: {exc}"
            self._checked = {"cause": measured, "decisive": False, "evidence": why}
            return {"cf_skipped": why, "cf_evidence": f"no counterfactuals: {why}"}
        cause, decisive = checked_cause(evidence, measured, lambda: signal_cause(metrics, self.layers))
        line = evidence.sentence()
        if measured == "learn_then_collapse":
            decisive = False
            if evidence.runs:
                line += f" -> label kept: learn_then_collapse (the interventions point to {cause})"
        elif evidence.runs:
            line += f" -> {cause}" + ("" if cause == measured else f" (measured: {measured})")
        self._checked = {"cause": cause if decisive else measured, "decisive": decisive, "evidence": line}
        return {**evidence.metrics(), "cf_evidence": line}

    def state_dict(self) -> dict[str, Any]:
        return {"start_weights": self._start_weights, "min_loss": self._min_loss,
                "initial_max_update": self._initial_max_update, "checked": self._checked,
                "initial_signal": self._initial_signal}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._start_weights = list(state["start_weights"])
        self._min_loss = state["min_loss"]
        self._initial_max_update = state["initial_max_update"]
        self._initial_signal = state.get("initial_signal", math.nan)  # absent before it was kept
        self._checked = state.get("checked")  # absent in checkpoints written before issue #10

    # ---- measurement ----------------------------------------------------------------------------

    def _discover(self, ctx) -> None:
        """Number the weight layers and find the module chain, from two hooked passes of the probe's
        first two examples.

        Eval mode runs the main path only (auxiliary heads are training-only side branches), so its
        order numbers ``l00``...; layers that run only in train mode are numbered after it, ``a00``....
        The train-mode pass records every leaf module's call: the chain that ``act_std_pred`` walks
        is the run of calls, from the model input on, where each module consumes the previous one's
        output. It breaks at the first branch, shortcut or functional op between modules (ResNets,
        GoogLeNet): theory for those would need the graph, so no prediction is made past the break.
        """
        model = ctx.model
        # Two examples: the order of the calls and the maps' sizes do not depend on the batch, and
        # these two passes are part of every trial's step 0 (64 examples cost as much as the probe).
        # Two, not one: BatchNorm in train mode needs more than one value per channel.
        x = ctx.data.probe_batch(self.cfg.probe_size)[0][:2]
        order = {"eval": [], "train": []}
        calls: list[tuple[nn.Module, Any, Any]] = []
        sizes: dict[nn.Module, tuple[int, ...]] = {}
        mode = ["eval"]

        def hook(mod, inputs, output):
            if isinstance(mod, _WEIGHTED):
                order[mode[0]].append(mod)
                if inputs and isinstance(inputs[0], torch.Tensor):
                    sizes.setdefault(mod, tuple(inputs[0].shape[2:]))
            if mode[0] == "train":  # tensors kept alive, so that `is` compares what it should
                calls.append((mod, inputs[0] if inputs else None, output))

        handles = [m.register_forward_hook(hook) for m in model.modules()
                   if isinstance(m, _WEIGHTED) or not any(True for _ in m.children())]
        try:
            with torch.no_grad(), _isolated(model):
                model.eval()
                model(x)
                mode[0] = "train"
                model.train()
                model(x)
        finally:
            for h in handles:
                h.remove()
        main = _unique(order["eval"])
        aux = [m for m in _unique(order["train"]) if m not in main]
        paths = {m: name for name, m in model.named_modules()}
        kind = lambda m: "conv" if isinstance(m, nn.Conv2d) else "fc"  # noqa: E731
        self.layers = [
            LayerInfo(i, f"{prefix}{i:02d}_{kind(m)}", paths[m], m,
                      _scheme_gain(ctx.cfg.model, m, sizes.get(m)), aux=prefix == "a")
            for prefix, group in (("l", main), ("a", aux)) for i, m in enumerate(group)
        ]
        self._chain = []
        previous = x
        for mod, inp, out in calls:
            if inp is not previous or mod in self._chain:
                break
            self._chain.append(mod)
            previous = out

    def _snapshot(self) -> None:
        self._start_weights = [l.module.weight.detach().clone() for l in self.layers]

    def layer_map(self) -> dict[str, str]:
        """``l03_conv`` -> ``features.6``: the param that ties metric names to the model."""
        return {l.key: l.path for l in self.layers}

    def watch_step(self, ctx, y: torch.Tensor) -> "_Recorder | None":
        """The hook that measures an epoch on one of its own training steps (see :class:`_Recorder`).

        ``fit`` calls this before the epoch's last full-size step and runs that step inside the
        returned context; :meth:`on_epoch_end` then reads the statistics that step recorded instead of
        running a probe pass. None (the probe batch at epoch end instead) where
        ``diagnostics.epoch_probe='fixed'``, or where the batch is smaller than ``probe_size``: the
        statistics are always over ``probe_size`` examples, so a dead unit means the same thing at
        every batch size."""
        if self.cfg.epoch_probe != "training_step" or y.shape[0] < self.cfg.probe_size:
            self._recorded = None
            return None
        if not self.layers:  # resumed: rediscover the layers of the rebuilt model
            self._discover(ctx)
        self._recorded = _Recorder(self.layers, ctx.model, ctx.criterion, y[:self.cfg.probe_size],
                                   optimizer=ctx.optimizer)
        return self._recorded

    def measure(self, ctx, *, step: str = "last", recorded: "_Recorder | None" = None) -> dict[str, Any]:
        """The layer statistics, from ``recorded`` (a training step's, see :meth:`watch_step`) or,
        without one, from a probe pass of the fixed probe batch. ``step``: which optimizer step
        ``update_ratio`` reports -- ``"last"``, the step training just took (see :func:`last_step`),
        or ``"next"``, the one it would take now on the gradient in ``.grad`` (step 0, where no step
        has been taken yet).

        It runs after every epoch, so its cost is part of every trial's: the statistics are taken in
        a few passes over each tensor (see :func:`_output_moments`, :func:`_relu_counts`), the norms of
        all layers in one fused call each, and nothing is copied that is not needed (issue #9)."""
        model = ctx.model
        norms = [(name, m) for name, m in model.named_modules()
                 if isinstance(m, _NORMS) and m.running_var is not None]
        lr = ctx.optimizer.param_groups[0]["lr"]
        aux_weight = getattr(getattr(ctx.cfg, "model", None), "aux_weight", 0.0)

        def bn_buffers() -> list[float]:
            return _norms([t for _, m in norms for t in (m.running_var, m.running_mean)], ord=1)

        saved_grads = [p.grad for p in model.parameters()]
        try:
            if recorded is None:
                updates = {} if step == "next" else _last_updates(ctx.optimizer, self.layers)
                x, y = ctx.data.probe_batch(self.cfg.probe_size)
                recorded = _Recorder(self.layers, model, ctx.criterion, y)
                with _isolated(model), recorded:
                    model.zero_grad(set_to_none=True)
                    from sweeper.models import split_outputs

                    logits, aux = split_outputs(model(x))
                    loss = ctx.criterion(logits.float(), y)
                    # The probe's gradient is the one training computes: auxiliary losses included.
                    total = loss + aux_weight * sum(ctx.criterion(a.float(), y) for a in aux) if aux else loss
                    total.backward()
                    bn_stats = bn_buffers()  # as the probe's forward left them, before _isolated restores them
            else:
                updates = dict(recorded.updates)  # the recorded step's own, not a later short batch's
                bn_stats = bn_buffers()
            missing = [l for l in self.layers if l.key not in updates]
            if missing:  # step 0, or an optimizer last_step cannot read: the next step, on .grad
                updates.update(_next_updates(ctx.optimizer, missing))
            metrics = self._metrics(recorded, updates, lr)
            for i, (name, m) in enumerate(norms):
                metrics[f"bn_running_var/{name}"] = bn_stats[2 * i] / m.running_var.numel()
                metrics[f"bn_running_mean/{name}"] = bn_stats[2 * i + 1] / m.running_mean.numel()
        finally:
            for p, g in zip(model.parameters(), saved_grads):
                p.grad = g
        metrics["nonfinite"] = float(not all(math.isfinite(v) for k, v in metrics.items()
                                             if isinstance(v, float) and k.startswith(_MEASURED)))
        return metrics

    def _metrics(self, rec: "_Recorder", updates: dict[str, float], lr: float) -> dict[str, Any]:
        """The per-layer metrics from one recorded pass (see the module docstring for each)."""
        metrics: dict[str, Any] = {
            "probe_loss": rec.loss,
            "loss_minus_chance": rec.loss - math.log(rec.classes),
            "logit_std": rec.logit_std,
        }
        used = [l for l in self.layers if l.key in rec.moments]  # not: an aux head in eval mode
        # Every layer's weight, bias and gradient norm in one fused call and one read each.
        now = _layer_norms(used)
        with_grad = [l.key for l in used if l.key in rec.grad_norms]
        grad_norms = dict(zip(with_grad, _read([rec.grad_norms[k] for k in with_grad])))
        # The pass's statistics belong to the weights it ran with: a recorded step's are those before
        # its update (rec.norms); weight_norm itself is the weights' now, at the epoch's end.
        at_pass = rec.norms if rec.norms is not None else now
        errs, steps = [], []
        for l in used:
            k, w = l.key, l.module.weight
            weight_norm = now[k][0]
            pass_weight, pass_bias = at_pass[k]
            mean, var, m2_out, sensitivity = rec.moments[k]
            grad_norm = grad_norms.get(k, 0.0)
            rel = grad_norm / (pass_weight + 1e-30)
            update = updates.get(k, lr * rel)
            steps.append(update)
            metrics[f"act_mean/{k}"] = mean
            metrics[f"act_std/{k}"] = math.sqrt(var)
            metrics[f"sensitivity/{k}"] = sensitivity
            metrics[f"weight_norm/{k}"] = weight_norm
            metrics[f"grad_norm/{k}"] = grad_norm
            metrics[f"rel_grad/{k}"] = rel
            metrics[f"update_ratio/{k}"] = update
            in_m2, size, energy = rec.inputs[k]
            bias = getattr(l.module, "bias", None)
            b2 = pass_bias ** 2 / bias.numel() if bias is not None else None
            pred = _gain(fans(l.module)[0], pass_weight ** 2 / w.numel(), b2,
                         padding_fraction(l.module, size, energy), in_m2)
            meas = m2_out / in_m2 if in_m2 > 0 else math.nan
            metrics[f"gain_pred/{k}"] = pred
            metrics[f"gain_meas/{k}"] = meas
            if pred > 0 and math.isfinite(pred) and math.isfinite(meas):
                metrics[f"gain_err/{k}"] = meas / pred - 1.0
                if not l.aux:
                    errs.append(meas / pred - 1.0)
            if k in rec.out_grad_std:
                metrics[f"out_grad_std/{k}"] = rec.out_grad_std[k]
            if k in rec.relu:
                metrics[f"zero_frac/{k}"], metrics[f"dead_frac/{k}"] = rec.relu[k]
        if errs:
            metrics["gain_err_max"] = max(abs(e) for e in errs)
            metrics["gain_err_median"] = statistics.median(abs(e) for e in errs)
        if steps:
            metrics["min_update_ratio"] = min(steps)
            metrics["max_update_ratio"] = max(steps)
            metrics["sum_update_ratio"] = sum(steps)
        return metrics


class _Recorder:
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

    def __enter__(self) -> "_Recorder":
        index = {l.module: l for l in self.layers}
        n = self.n

        def layer_hook(mod, args, output):
            key = index[mod].key
            if key in self.moments:  # a module used twice: keep its first use
                return
            self._last = key
            self.moments[key] = _output_moments(output.detach()[:n])
            x_in = args[0].detach()[:n]
            energy = position_energy(x_in)  # None for a linear layer's flat input
            m2 = float(energy.mean()) if energy is not None else _second_moment(x_in)
            self.inputs[key] = (m2, tuple(x_in.shape[2:]), energy)
            if output.requires_grad:
                output.register_hook(functools.partial(self._out_grad, key))

        def relu_hook(mod, args, output):
            if self._last is not None and self._last not in self.relu:
                # Counted in float32: a bf16 sum of signs is exact only up to 256.
                self.relu[self._last] = _relu_fractions(*_relu_counts(output.detach()[:n].float()))

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
            self.norms = _layer_norms(self.layers)
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
        self.out_grad_std.setdefault(key, _std(grad.detach()[:self.n]) * (grad.shape[0] / self.n))

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles = []
        if exc[0] is None:
            if self.optimizer is not None:  # .grad still holds this step's gradient: exact
                self.updates = _last_updates(self.optimizer, self.layers)
            self.complete = True
        return False


# What "nonfinite" (and so the cause `exploding`) reads: the net's own numbers. Not a ratio whose
# denominator is a layer's input, which is 0 behind a fully dead layer: a VGG-16 at lr 0.5 with its
# last conv 100% dead had gain_pred inf and gain_meas nan on the fc head, finite loss and logit std
# 0.13-0.19, and was named exploding.
_MEASURED = ("probe_loss", "loss_minus_chance", "logit_std", "act_mean/", "act_std/", "sensitivity/",
             "weight_norm/", "grad_norm/", "out_grad_std/", "bn_running_var/", "bn_running_mean/")


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
    if math.isfinite(gradient_lr) and all(f"rel_grad/{k}" in metrics for k in trained):
        driven = [gradient_lr * metrics[f"rel_grad/{k}"] for k in trained]
    else:
        driven = updates
    if max(driven) < FROZEN_UPDATE:
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
    groups = (_group_of(optimizer, l.module.weight) for l in layers if not l.aux)
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


# ---- theory -------------------------------------------------------------------------------------


def padding_fraction(module: nn.Module, size: tuple[int, ...] | None,
                     energy: torch.Tensor | None = None) -> float:
    """rho: the average fraction of a conv's taps that land inside an input map of ``size``.

    Zero padding feeds the taps outside the map zeros, so a conv's output variance is n Var[w] rho
    E[x^2], not n Var[w] E[x^2]. Exact for any kernel, stride, padding and dilation: per spatial axis,
    count the taps inside the map over all output positions; the 2-D fraction is the product of the
    axes' (the inside count is separable). A 3x3/pad 1 conv on HxH gives ((3H - 2) / 3H)^2: 0.96, 0.84,
    0.44, 0.11 at H = 32, 8, 2, 1. Linear layers (and non-zero padding modes) have rho = 1.

    ``energy`` (an HxW map of the input's E[x^2] per position, :func:`position_energy`) weights each
    tap by the energy at the position it reads: rho_eff = mean over outputs of sum_(taps inside)
    e(p + t) / (k*k mean(e)), the same as rho on a flat map. Inside a net the map is not flat: the
    previous zero-padded conv gave its border outputs fewer taps, so a map's rim carries less energy
    than its centre, and a 3x3 conv -- whose border taps are the ones that fall off the map -- reads
    more of the centre than flat rho assumes: +5-11% on 4x4 and 8x8 maps (issue #10's measurement).
    """
    if not isinstance(module, nn.Conv2d) or not size or module.padding_mode != "zeros":
        return 1.0
    if energy is not None and energy.dim() == 2 and tuple(energy.shape) == tuple(size[-2:]):
        return _weighted_padding_fraction(module, energy)
    rho = 1.0
    for axis, length in enumerate(size[-2:]):
        k, s, d = module.kernel_size[axis], module.stride[axis], module.dilation[axis]
        pad = module.padding
        # 'same' pads d(k-1) in total; PyTorch puts the odd one at the end, which the count ignores.
        p = {"valid": 0, "same": d * (k - 1) // 2}[pad] if isinstance(pad, str) else pad[axis]
        outputs = (length + 2 * p - d * (k - 1) - 1) // s + 1
        if outputs <= 0:
            return math.nan
        inside = sum(1 for o in range(outputs) for t in range(k) if 0 <= o * s - p + t * d < length)
        rho *= inside / (outputs * k)
    return rho


def _weighted_padding_fraction(conv: nn.Conv2d, energy: torch.Tensor) -> float:
    """rho weighted by the input's energy per position (see :func:`padding_fraction`): a conv of the
    map with an all-ones kernel (the conv's own stride, padding and dilation) sums, per output
    position, the energy its in-map taps read."""
    e = energy.detach().double()
    mean = float(e.mean())
    if not math.isfinite(mean) or mean <= 0:
        return padding_fraction(conv, tuple(energy.shape))
    ones = torch.ones(1, 1, *conv.kernel_size, dtype=torch.float64, device=e.device)
    read = nn.functional.conv2d((e / mean)[None, None], ones, stride=conv.stride, padding=conv.padding,
                                dilation=conv.dilation)
    if read.numel() == 0:
        return math.nan
    return float(read.mean()) / ones.numel()


def position_energy(x: torch.Tensor) -> torch.Tensor | None:
    """E[x^2] per spatial position of a batch of maps (N, C, H, W), over examples and channels: an HxW
    float64 map, exact for vanished signals (scaled by the largest magnitude first where the squares
    would leave float32's range, as :func:`_second_moment`). Its mean is E[x^2]. None for inputs
    without two spatial axes."""
    if x.dim() != 4 or x.numel() == 0:
        return None
    x = x.detach()
    energy = x.float().square().mean(dim=(0, 1)).double()  # unscaled first: see _M2_SAFE
    if _M2_SAFE <= float(energy.mean()) < math.inf:
        return energy
    scale = _abs_max(x)
    if scale == 0.0 or not math.isfinite(scale):
        return torch.full(tuple(x.shape[2:]), 0.0 if scale == 0.0 else math.inf, dtype=torch.float64)
    return (x.float() / scale).square().mean(dim=(0, 1)).double() * (scale * scale)


def predicted_gain(module: nn.Module, size: tuple[int, ...] | None, input_second_moment: float, *,
                   input_energy: torch.Tensor | None = None) -> float:
    """Var[y] / E[x^2] predicted for one conv or linear layer with random weights: n E[w^2] rho + E[b^2] / E[x^2].

    He et al.: y = sum_j w_j x_j + b over n = k*k*C_in (fan-in) taps, with zero-mean weights
    independent of the input, gives E[y^2] = n E[w^2] rho E[x^2] + E[b^2], rho the fraction of taps
    inside the map (:func:`padding_fraction`). E[w^2] and E[b^2] are the layer's actual ones (not the
    scheme's formula), which removes the sampling noise of the init from the comparison; PyTorch's
    default init draws biases ~ U(+-1/sqrt(n)), which dominate once the signal has vanished.

    With ``input_energy`` (the real input's E[x^2] per position, :func:`position_energy`) rho is
    weighted by where the energy sits, and the prediction is the exact expectation over this layer's
    weights given its input: E_w[E[y^2]] = E[w^2] sum over in-map taps of E[x^2] + E[b^2], whatever the
    input's correlations. What is left between it and one measurement is the spread of one weight
    draw: E[y^2] = mean over output units u of w_u' M w_u, M the second-moment matrix of the input
    patches, whose relative std is sqrt(2 tr(M^2) / C_out) / tr(M) for Gaussian weights. Deep ReLU
    features of different inputs point nearly the same way (their correlation tends to 1), so M is
    close to rank 1 and a 10-class head's gain is a chi^2_10 / 10 variable: +-45% from one draw.
    """
    w2 = float(module.weight.detach().float().pow(2).mean())
    bias = getattr(module, "bias", None)
    b2 = float(bias.detach().float().pow(2).mean()) if bias is not None else None
    return _gain(fans(module)[0], w2, b2, padding_fraction(module, size, input_energy), input_second_moment)


def _gain(fan_in: int, w2: float, b2: float | None, rho: float, input_second_moment: float) -> float:
    """:func:`predicted_gain` from E[w^2], E[b^2] (None: no bias) and rho."""
    gain = fan_in * w2 * rho
    if b2 is not None:
        gain += b2 / input_second_moment if input_second_moment > 0 else (math.inf if b2 > 0 else 0.0)
    return gain


def maxpool_factor(taps: int, correlation: float = 0.0) -> float:
    """E[max-pool(relu(y))^2] / E[relu(y)^2] over ``taps`` zero-mean Gaussian y with pairwise
    ``correlation`` (derived, not fitted).

    Write y_i = sqrt(c) z_0 + sqrt(1 - c) z_i with independent standard normals; the pool's output is
    max(0, sqrt(c) z_0 + sqrt(1 - c) M), M the largest of ``taps`` standard normals, whose density is
    k Phi^(k-1) phi. Its second moment is a 2-D integral, done here on a grid, over E[relu(y)^2] = 1/2.
    2x2 pools: 3.09 for independent taps, 2.67 at c = 1/pi, 1.77 at c = 0.83, 1 at c = 1: neighbouring
    conv outputs are correlated, which is why the science notes saw 1.8-2.6 and not 3.1.
    """
    c = min(max(correlation, 0.0), 1.0)
    if taps <= 1 or c >= 1.0:
        return 1.0
    key = (taps, round(c, 3))
    if key not in _MAXPOOL_FACTORS:
        _MAXPOOL_FACTORS[key] = _maxpool_factor(taps, key[1])
    return _MAXPOOL_FACTORS[key]


def _maxpool_factor(k: int, c: float, steps: int = 160, half_width: float = 8.0) -> float:
    h = 2 * half_width / steps
    grid = [-half_width + i * h for i in range(steps + 1)]
    phi = [math.exp(-t * t / 2) / math.sqrt(2 * math.pi) for t in grid]
    p_max = [k * (0.5 * (1 + math.erf(t / math.sqrt(2)))) ** (k - 1) * f * h for t, f in zip(grid, phi)]
    a, b = math.sqrt(c), math.sqrt(1 - c)
    total = 0.0
    for z, pz in zip(grid, phi):
        for m, pm in zip(grid, p_max):
            v = a * z + b * m
            if v > 0:
                total += pz * h * pm * v * v
    return 2.0 * total


_MAXPOOL_FACTORS: dict[tuple[int, float], float] = {}


def relu_correlation(c: float) -> float:
    """E[relu(a) relu(b)] / E[relu(a)^2] for zero-mean Gaussians a, b of correlation c (Cho & Saul's
    arc-cosine kernel): (sqrt(1 - c^2) + (pi - arccos c) c) / pi; 1/pi at c = 0, 1 at c = 1."""
    c = min(max(c, -1.0), 1.0)
    return (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / math.pi


def spatial_correlation(x: torch.Tensor) -> float:
    """E[x(p) x(q)] / E[x^2] over neighbouring positions p, q of a 2x2 block (horizontal, vertical,
    diagonal, weighted as a 2x2 pool's six pairs): the input's share of the chain's correlation."""
    if x.dim() < 4 or min(x.shape[-2:]) < 2:
        return 0.0
    x = x.detach().float()
    m2 = x.pow(2).mean()
    if m2 == 0:
        return 0.0
    h = (x[..., :, 1:] * x[..., :, :-1]).mean()
    v = (x[..., 1:, :] * x[..., :-1, :]).mean()
    d = ((x[..., 1:, 1:] * x[..., :-1, :-1]).mean() + (x[..., 1:, :-1] * x[..., :-1, 1:]).mean()) / 2
    return float((h + v + d) / 3 / m2)


def chain_second_moments(chain: list[nn.Module], input_second_moment: float,
                         input_size: tuple[int, ...] | None = None, *,
                         input_correlation: float = 0.0) -> list[tuple[nn.Module, float]]:
    """He et al.'s forward theory along a chain of modules: [(module, E[output^2])], predicted.

    Starting from the network input's E[x^2] (measured; it is not rectified, so the first layer
    needs no factor 1/2), each module maps E[x^2] to E[out^2]:
      conv / linear   n E[w^2] rho E[x^2] + E[b^2] (:func:`predicted_gain`; its output is zero-mean
                      and symmetric)
      ReLU            E[y^2] / 2 for a zero-mean symmetric y; no change on an already rectified input
      BatchNorm       resets the scale: mean(gamma^2 + beta^2) (1 at init), symmetric again
      max-pool        x :func:`maxpool_factor` of the window's taps inside the map, over rectified
                      inputs, at the predicted correlation of neighbouring taps (below)
      dropout         x 1 / (1 - p): the probe runs in train mode (inverted dropout scales kept units up)
      LRN             / k^(2 beta): its small-signal limit (k = 2, beta = 0.75: / 2.83)
      average pool    unchanged when it only repeats a map (1x1 -> 7x7); a global average over P
                      positions gives E[x^2] (1/P + (1 - 1/P) r), r the neighbours' correlation
      flatten, identity: unchanged
    Any other module ends the prediction (the returned list stops there).

    The max-pool factor needs the correlation c of neighbouring pre-activations, which the chain
    carries too (mean-field theory of random conv nets, Xiao et al. 2018): with zero-mean independent
    weights, E[y(p) y(q)] = Var[w] sum over the tap indices inside the map at *both* positions of
    E[x x'] of the input, so a conv passes on the input's neighbour correlation r times omega, the
    shared in-map taps over the geometric mean of each position's in-map taps (1 on large maps,
    0.5 for neighbours on a 2x2 map: zero padding decorrelates small maps); a ReLU maps c to
    :func:`relu_correlation`; pools and dropout (r x (1 - p)) follow. All nearby lags are treated as one
    (the 2x2 block's six pairs), and the input's r is measured (:func:`spatial_correlation`).
    """
    out: list[tuple[nn.Module, float]] = []
    m2, symmetric = input_second_moment, True
    c = r = min(max(input_correlation, 0.0), 1.0)  # c: pre-activation; r: of what flows now
    for mod, (size_in, size_out) in zip(chain, _chain_sizes(chain, input_size)):
        if isinstance(mod, _WEIGHTED):
            m2 = predicted_gain(mod, size_in, m2) * m2
            c = r = r * _block_overlap(mod, size_in) if isinstance(mod, nn.Conv2d) else 0.0
            symmetric = True
        elif isinstance(mod, nn.ReLU):
            if symmetric:
                m2, r = m2 / 2, relu_correlation(c)
            symmetric = False
        elif isinstance(mod, _NORMS):
            m2 = float((mod.weight.detach() ** 2 + mod.bias.detach() ** 2).mean()) if mod.affine else 1.0
            symmetric = True
        elif isinstance(mod, nn.MaxPool2d):
            m2 *= _pool_taps_factor(mod, size_in, c) if not symmetric else math.nan
        elif isinstance(mod, nn.Dropout):
            if 0 < mod.p < 1:  # the probe runs in train mode, whatever mode the model is in now
                m2, r = m2 / (1 - mod.p), r * (1 - mod.p)
        elif isinstance(mod, nn.LocalResponseNorm):
            m2 /= mod.k ** (2 * mod.beta)
        elif isinstance(mod, nn.AdaptiveAvgPool2d):
            positions = math.prod(size_in) if size_in else math.nan
            if positions == 1:
                pass  # repeats the one value
            elif size_out and tuple(size_out) == (1, 1):
                m2 *= 1 / positions + (1 - 1 / positions) * r
            else:
                break
        elif isinstance(mod, (nn.Flatten, nn.Identity)):
            pass
        else:
            break
        out.append((mod, m2))
        if not math.isfinite(m2):
            break
    return out


def _block_overlap(conv: nn.Conv2d, size: tuple[int, ...] | None) -> float:
    """omega: how much of its input's neighbour correlation a conv passes on, averaged over the six
    pairs of a 2x2 block of output positions (see :func:`chain_second_moments`)."""
    if not size or conv.padding_mode != "zeros":
        return 1.0
    axes = []
    for a in range(2):
        k, s, d = conv.kernel_size[a], conv.stride[a], conv.dilation[a]
        pad = conv.padding
        p = {"valid": 0, "same": d * (k - 1) // 2}[pad] if isinstance(pad, str) else pad[a]
        n = _out_len(conv, size[a], a)
        inside = [{t for t in range(k) if 0 <= o * s - p + t * d < size[a]} for o in range(n)]
        pairs = [len(inside[o] & inside[o + 1]) / math.sqrt(len(inside[o]) * len(inside[o + 1]))
                 for o in range(n - 1) if inside[o] and inside[o + 1]]
        axes.append(sum(pairs) / len(pairs) if pairs else 1.0)
    ax, ay = axes
    return (2 * ax + 2 * ay + 2 * ax * ay) / 6


def _chain_sizes(chain: list[nn.Module], size: tuple[int, ...] | None) -> list[tuple[Any, Any]]:
    """(input, output) spatial size of each module of a chain, by each module's own arithmetic."""
    out = []
    for mod in chain:
        size_in = size
        if size is not None:
            if isinstance(mod, (nn.Conv2d, nn.MaxPool2d)):
                size = tuple(_out_len(mod, size[a], a) for a in range(2))
            elif isinstance(mod, nn.AdaptiveAvgPool2d):
                o = mod.output_size
                o = (o, o) if isinstance(o, int) else o
                size = tuple(s if t is None else t for s, t in zip(size, o))
            elif isinstance(mod, (nn.Flatten, nn.Linear)):
                size = None
        out.append((size_in, size))
    return out


def _pair(v, axis):
    return v[axis] if isinstance(v, (tuple, list)) else v


def _out_len(mod: nn.Module, length: int, axis: int) -> int:
    k, s = _pair(mod.kernel_size, axis), _pair(mod.stride, axis) or _pair(mod.kernel_size, axis)
    p, d = _pair(mod.padding, axis), _pair(mod.dilation, axis)
    if isinstance(p, str):
        p = 0 if p == "valid" else d * (k - 1) // 2
    span = length + 2 * p - d * (k - 1) - 1
    if getattr(mod, "ceil_mode", False):
        n = -(-span // s) + 1
        if (n - 1) * s >= length + p:  # PyTorch: the last window must start inside the input
            n -= 1
        return n
    return span // s + 1


def _pool_taps_factor(mod: nn.MaxPool2d, size: tuple[int, ...] | None, correlation: float) -> float:
    """The mean over output positions of maxpool_factor(taps inside the map) for a max-pool."""
    if not size:
        return math.nan
    axes = []
    for a in range(2):
        k, s = _pair(mod.kernel_size, a), _pair(mod.stride, a) or _pair(mod.kernel_size, a)
        p, d = _pair(mod.padding, a), _pair(mod.dilation, a)
        n = _out_len(mod, size[a], a)
        axes.append([sum(1 for t in range(k) if 0 <= o * s - p + t * d < size[a]) for o in range(n)])
    # Most positions see the same number of taps: the factor once per distinct count.
    counts = Counter(i * j for i in axes[0] for j in axes[1])
    return sum(maxpool_factor(n, correlation) * c for n, c in counts.items()) / counts.total()


def predicted_stds(model_cfg: ModelConfig, layers: list[LayerInfo], *,
                   input_second_moment: float = 1.0) -> list[float]:
    """The init scheme's forward prediction for a plain stack of conv/linear layers with ReLUs between
    and nothing else (no padding, pooling or BatchNorm: :func:`chain_second_moments` handles those).

    Var[y_l] = n_l Var[w_l] E[x_l^2] with Var[w] from the scheme's formula and zero biases; E[x^2] of
    the network input for the first layer, then E[x_{l+1}^2] = Var[y_l] / 2 behind a ReLU.
    """
    out = []
    m2 = input_second_moment
    for l in layers:
        fan_in, fan_out = fans(l.module)
        var = fan_in * weight_std(model_cfg, fan_in, fan_out) ** 2 * m2
        out.append(math.sqrt(var))
        m2 = var / 2
    return out


def _scheme_gain(cfg: ModelConfig, module: nn.Module, size: tuple[int, ...] | None) -> float:
    fan_in, fan_out = fans(module)
    try:
        return fan_in * weight_std(cfg, fan_in, fan_out) ** 2 * padding_fraction(module, size)
    except ValueError:
        return math.nan


def _unique(modules: list[nn.Module]) -> list[nn.Module]:
    seen: dict[nn.Module, None] = {}
    for m in modules:
        seen.setdefault(m, None)
    return list(seen)


# ---- update ratios ------------------------------------------------------------------------------


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
    group = _group_of(optimizer, param)
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


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, Any] | None:
    """The optimizer's param group holding ``param``; None if it does not train it."""
    return next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)


def _last_updates(optimizer: torch.optim.Optimizer, layers: list[LayerInfo]) -> dict[str, float]:
    keys, deltas, befores = [], [], []
    with torch.no_grad():
        for l in layers:
            w = l.module.weight
            delta = last_step(optimizer, w)
            if delta is not None:
                keys.append(l.key)
                deltas.append(delta)
                befores.append(w.detach() - delta)
        steps, weights = _norms(deltas), _norms(befores)
    return {k: d / (b + 1e-30) for k, d, b in zip(keys, steps, weights)}


def _next_updates(optimizer: torch.optim.Optimizer, layers: list[LayerInfo]) -> dict[str, float]:
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
        steps = _norms(torch._foreach_sub([c for _, _, c in pairs], [w.detach() for _, w, _ in pairs]))
        weights = _norms([w.detach() for _, w, _ in pairs])
        return {key: d / (n + 1e-30) for (key, _, _), d, n in zip(pairs, steps, weights)}


# ---- helpers ------------------------------------------------------------------------------------
# The statistics below run on every layer's output, input, ReLU output and output gradient after
# every epoch, so they are written for few passes over each tensor (issue #9: on a 2-core CPU the
# straightforward forms cost as much again as the probe's forward and backward). They give the
# straightforward forms' numbers up to float32 rounding; the rare cases those forms handle specially
# (all zeros, non-finite, huge values, one example) go to those forms.

# Squares are first taken unscaled, which is exact where they stay in float32's normal range: a
# finite result (no square or sum overflowed) with E[x^2] >= _M2_SAFE, where what underflow can lose
# (< 1.2e-38 per value) is below float32's rounding. Otherwise the tensor is divided by its largest
# magnitude first, as the plain forms always do (vanished signals reach 1e-20 in stalled nets).
_M2_SAFE = 1e-20
_HUGE = 1e30  # a largest magnitude above this: float32 means and variances may overflow; the plain forms


def _abs_max(x: torch.Tensor) -> float:
    """max |x| as a float, NaN if x has a NaN. amax and amin read x without writing an |x| copy."""
    if x.numel() == 0:
        return 0.0
    hi, lo = float(x.amax()), float(x.amin())
    return math.nan if math.isnan(hi) or math.isnan(lo) else max(hi, -lo)


def _read(scalars: list[torch.Tensor]) -> list[float]:
    """Device scalars as floats, in one read."""
    if not scalars:
        return []
    if len({t.dtype for t in scalars}) > 1:
        return [float(t) for t in scalars]
    return torch.stack(scalars).tolist()


def _layer_norms(layers: list[LayerInfo]) -> dict[str, tuple[float, float | None]]:
    """Each layer's weight norm and bias norm (None without a bias), in one fused call each."""
    with torch.no_grad():
        weights = _norms([l.module.weight.detach() for l in layers])
        biased = [l for l in layers if getattr(l.module, "bias", None) is not None]
        biases = dict(zip([l.key for l in biased], _norms([l.module.bias.detach() for l in biased])))
    return {l.key: (w, biases.get(l.key)) for l, w in zip(layers, weights)}


def _norms(tensors: list[torch.Tensor], ord: float = 2) -> list[float]:
    """Each tensor's vector norm, in one fused call and one read."""
    if not tensors:
        return []
    return _read(list(torch._foreach_norm(tensors, ord)))


def _output_moments(out: torch.Tensor) -> tuple[float, float, float, float]:
    """(mean, unbiased variance, E[y^2], :func:`_sensitivity`) of a layer's output y, from one centring
    per unit: the per-unit means mu_u and sums of squared deviations ss_u (which the sensitivity needs
    anyway) give the variance as (sum ss_u + N sum (mu_u - mu)^2) / (n - 1) and E[y^2] as
    (sum ss_u + N sum mu_u^2) / n -- sums of non-negative terms, no cancellation. ~5 passes over y
    instead of ~20 for var(), mean(), _second_moment() and _sensitivity() apart."""
    out = out.float()
    if out.dim() < 1 or out.shape[0] < 2:
        return float(out.mean()), float(out.var()), _second_moment(out), _sensitivity(out)
    moments = _centred_moments(out, 1.0)
    if not _M2_SAFE <= moments[2] < math.inf:  # also NaN: see _M2_SAFE
        scale = _abs_max(out)
        if not 0.0 < scale <= _HUGE:  # also NaN
            return float(out.mean()), float(out.var()), _second_moment(out), _sensitivity(out)
        moments = _centred_moments(out, scale)
    return moments


def _centred_moments(out: torch.Tensor, k: float) -> tuple[float, float, float, float]:
    """:func:`_output_moments` of out / k, given back in out's units."""
    n = out.numel()
    flat = (out if k == 1.0 else out / k).reshape(out.shape[0], -1)
    examples, units = flat.shape
    mu = flat.mean(dim=0)
    ss = (flat - mu).square_().sum(dim=0)
    grand = mu.mean()
    between = (mu - grand).square_().sum()
    mean, within, between, std_sum = torch.stack(
        (grand, ss.sum(), between, ss.sqrt().sum())).double().tolist()
    var = (within + examples * between) / (n - 1) * k * k
    if not 1.1754943508222875e-38 <= var <= 3.4028234663852886e38:
        # The plain var() is float32: it flushes (or underflows) and overflows as a float32 does.
        var = float(torch.tensor(var, dtype=torch.float64, device=out.device).float())
    m2 = (within + examples * (between + units * mean * mean)) / n  # in units of k^2
    std_mean = std_sum / units / math.sqrt(examples - 1)
    return mean * k, var, m2 * k * k, std_mean / math.sqrt(m2) if m2 > 0 else 0.0


def _std(t: torch.Tensor) -> float:
    """t.std() as a float, ~3x cheaper on a CPU than std()'s Welford pass: from the sum of squares
    where the mean is too small to cancel a relevant part of it (n mean^2 <= half of it), else centred."""
    t = t.float()
    n = t.numel()
    if n < 2:
        return float(t.std())
    mean, squares = torch.stack((t.mean(), t.square().sum())).double().tolist()
    if _M2_SAFE <= squares / n < math.inf and n * mean * mean <= squares / 2:
        return math.sqrt((squares - n * mean * mean) / (n - 1))
    scale = _abs_max(t)
    if not 0.0 < scale <= _HUGE:  # also NaN
        return float(t.std())
    x = t / scale
    return math.sqrt(float((x - x.mean()).square_().sum()) / (n - 1)) * scale


def _relu_counts(out: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Per unit (channel) of a ReLU's output, how many of its values are positive; with the number of
    values and the output, for :func:`_relu_fractions`. A ReLU's outputs are >= 0, so sign() counts
    them (~10x cheaper on a CPU than comparisons: no bool tensors); a NaN makes its unit's count NaN."""
    if out.dim() <= 1:
        return out.sign(), out.numel(), out
    per = out.sign().sum(dim=0)
    if per.dim() > 1:
        per = per.reshape(out.shape[1], -1).sum(dim=1, dtype=torch.float64)
    return per, out.numel(), out


def _relu_fractions(per_unit: torch.Tensor, numel: int, out: torch.Tensor) -> tuple[float, float]:
    """(zero_frac, dead_frac) from :func:`_relu_counts`; outputs with a NaN: :func:`_relu_stats`."""
    positive, dead = torch.stack((per_unit.sum(), (per_unit == 0).sum())).double().tolist()
    if numel == 0 or math.isnan(positive):
        return tuple(float(v) for v in _relu_stats(out))
    return 1.0 - positive / numel, dead / per_unit.numel()


def _relu_stats(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of zero outputs, fraction of units zero for every example and position)."""
    positive = out > 0
    zero_frac = 1.0 - positive.float().mean()
    # A unit is a channel: alive if positive for any example and position (no transposed copy).
    per_unit = positive.any(dim=0).reshape(out.shape[1], -1).any(dim=1) if out.dim() > 1 else positive
    return zero_frac, 1.0 - per_unit.float().mean()


def _second_moment(x: torch.Tensor) -> float:
    """E[x^2] as a Python float, exact for vanished signals: where x's squares would leave float32's
    range (see _M2_SAFE), x is scaled by its largest magnitude first, because a std of 1e-20 squares
    below float32's range (and denormals are flushed on CPU). Cheaper than squaring a float64 copy of
    the activation (3x on a CPU, per layer and epoch)."""
    x = x.detach()
    if x.numel() == 0:
        return 0.0
    m2 = float(x.float().square().mean())  # unscaled first: see _M2_SAFE
    if _M2_SAFE <= m2 < math.inf:
        return m2
    scale = _abs_max(x)
    if scale == 0.0 or not math.isfinite(scale):
        return 0.0 if scale == 0.0 else math.inf
    return float((x.float() / scale).square().mean()) * scale * scale


def _sensitivity(out: torch.Tensor) -> float:
    """Mean over units of (std across examples) / RMS of the output.

    The ratio does not change with the output's scale, so the output is scaled by its largest
    magnitude (a vanished signal stays representable in float32), and the per-unit std is taken on
    the centred output (``Tensor.std(dim=0)`` costs ~15x as much on a CPU: a strided Welford pass).
    """
    scale = _abs_max(out)
    if scale == 0.0 or not math.isfinite(scale) or out.shape[0] < 2:
        return 0.0
    x = out.float() / scale
    centred = x - x.mean(dim=0, keepdim=True)
    std = (centred.pow(2).sum(dim=0) / (x.shape[0] - 1)).sqrt()
    return float(std.mean() / x.pow(2).mean().sqrt())


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
