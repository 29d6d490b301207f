"""The Diagnostics hook: when it measures, what it logs, and when it names a stall (every metric is
described in the package docstring, :mod:`sweeper.diagnostics`)."""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from torch import nn

from sweeper.config import DiagnosticsConfig
from sweeper.diagnostics import stats
from sweeper.diagnostics.causes import classify_stall, gradient_lr, signal_cause, signal_ratio
from sweeper.diagnostics.layers import NORMS, WEIGHTED, LayerInfo, unique
from sweeper.diagnostics.recorder import Recorder, isolated
from sweeper.diagnostics.theory import (chain_second_moments, layer_gain, padding_fraction,
                                        scheme_gain, spatial_correlation)
from sweeper.diagnostics.updates import last_updates, next_updates
from sweeper.inits import fans
from sweeper.outcomes import no_better_than_chance, run_at_end, trained_bar

__all__ = ["Diagnostics", "trial_hooks"]


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
        self._recorded: Recorder | None = None  # this epoch's recorded training step, see watch_step

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
                changes, starts = stats.norms(moved), stats.norms([s for _, s in pairs])
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
        # At its last epoch a trial shorter than stall_epochs that sat at chance throughout is stalled,
        # as sweeper.outcomes.classify judges it: it was "stalled" with no cause in the sweep's record
        # while debug said "completed" (a width-1/8 VGG-11 with N(0, 0.01) init, 1 and 2 epochs).
        last = getattr(ctx, "epoch", 0) >= getattr(getattr(ctx, "cfg", None), "epochs", math.inf)
        stalled = run_at_end(flags) >= (min(self.cfg.stall_epochs, len(flags)) if last
                                        else self.cfg.stall_epochs)
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
            not vals or max(vals) > trained_bar(1 / ctx.data.num_classes))
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
            if isinstance(mod, WEIGHTED):
                order[mode[0]].append(mod)
                if inputs and isinstance(inputs[0], torch.Tensor):
                    sizes.setdefault(mod, tuple(inputs[0].shape[2:]))
            if mode[0] == "train":  # tensors kept alive, so that `is` compares what it should
                calls.append((mod, inputs[0] if inputs else None, output))

        handles = [m.register_forward_hook(hook) for m in model.modules()
                   if isinstance(m, WEIGHTED) or not any(True for _ in m.children())]
        try:
            with torch.no_grad(), isolated(model):
                model.eval()
                model(x)
                mode[0] = "train"
                model.train()
                model(x)
        finally:
            for h in handles:
                h.remove()
        main = unique(order["eval"])
        aux = [m for m in unique(order["train"]) if m not in main]
        paths = {m: name for name, m in model.named_modules()}
        kind = lambda m: "conv" if isinstance(m, nn.Conv2d) else "fc"  # noqa: E731
        self.layers = [
            LayerInfo(i, f"{prefix}{i:02d}_{kind(m)}", paths[m], m,
                      scheme_gain(ctx.cfg.model, m, sizes.get(m)), aux=prefix == "a")
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

    def watch_step(self, ctx, y: torch.Tensor) -> "Recorder | None":
        """The hook that measures an epoch on one of its own training steps (see :class:`Recorder`).

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
        self._recorded = Recorder(self.layers, ctx.model, ctx.criterion, y[:self.cfg.probe_size],
                                   optimizer=ctx.optimizer)
        return self._recorded

    def measure(self, ctx, *, step: str = "last", recorded: "Recorder | None" = None) -> dict[str, Any]:
        """The layer statistics, from ``recorded`` (a training step's, see :meth:`watch_step`) or,
        without one, from a probe pass of the fixed probe batch. ``step``: which optimizer step
        ``update_ratio`` reports -- ``"last"``, the step training just took (see :func:`last_step`),
        or ``"next"``, the one it would take now on the gradient in ``.grad`` (step 0, where no step
        has been taken yet).

        It runs after every epoch, so its cost is part of every trial's: the statistics are taken in
        a few passes over each tensor (see :mod:`sweeper.diagnostics.stats`), the norms of all layers
        in one fused call each, and nothing is copied that is not needed (issue #9)."""
        model = ctx.model
        norms = [(name, m) for name, m in model.named_modules()
                 if isinstance(m, NORMS) and m.running_var is not None]
        lr = ctx.optimizer.param_groups[0]["lr"]
        aux_weight = getattr(getattr(ctx.cfg, "model", None), "aux_weight", 0.0)

        def bn_buffers() -> list[float]:
            return stats.norms([t for _, m in norms for t in (m.running_var, m.running_mean)], ord=1)

        saved_grads = [p.grad for p in model.parameters()]
        try:
            if recorded is None:
                updates = {} if step == "next" else last_updates(ctx.optimizer, self.layers)
                x, y = ctx.data.probe_batch(self.cfg.probe_size)
                recorded = Recorder(self.layers, model, ctx.criterion, y)
                with isolated(model), recorded:
                    model.zero_grad(set_to_none=True)
                    from sweeper.models import split_outputs

                    logits, aux = split_outputs(model(x))
                    loss = ctx.criterion(logits.float(), y)
                    # The probe's gradient is the one training computes: auxiliary losses included.
                    total = loss + aux_weight * sum(ctx.criterion(a.float(), y) for a in aux) if aux else loss
                    total.backward()
                    bn_stats = bn_buffers()  # as the probe's forward left them, before isolated restores them
            else:
                updates = dict(recorded.updates)  # the recorded step's own, not a later short batch's
                bn_stats = bn_buffers()
            missing = [l for l in self.layers if l.key not in updates]
            if missing:  # step 0, or an optimizer last_step cannot read: the next step, on .grad
                updates.update(next_updates(ctx.optimizer, missing))
            metrics = self._metrics(recorded, updates, lr)
            for i, (name, m) in enumerate(norms):
                metrics[f"bn_running_var/{name}"] = bn_stats[2 * i] / m.running_var.numel()
                metrics[f"bn_running_mean/{name}"] = bn_stats[2 * i + 1] / m.running_mean.numel()
        finally:
            for p, g in zip(model.parameters(), saved_grads):
                p.grad = g
        metrics["nonfinite"] = float(not all(math.isfinite(v) for k, v in metrics.items()
                                             if isinstance(v, float) and k.startswith(MEASURED)))
        return metrics

    def _metrics(self, rec: "Recorder", updates: dict[str, float], lr: float) -> dict[str, Any]:
        """The per-layer metrics from one recorded pass (see the module docstring for each)."""
        metrics: dict[str, Any] = {
            "probe_loss": rec.loss,
            "loss_minus_chance": rec.loss - math.log(rec.classes),
            "logit_std": rec.logit_std,
        }
        used = [l for l in self.layers if l.key in rec.moments]  # not: an aux head in eval mode
        # Every layer's weight, bias and gradient norm in one fused call and one read each.
        now = stats.layer_norms(used)
        with_grad = [l.key for l in used if l.key in rec.grad_norms]
        grad_norms = dict(zip(with_grad, stats.read_floats([rec.grad_norms[k] for k in with_grad])))
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
            pred = layer_gain(fans(l.module)[0], pass_weight ** 2 / w.numel(), b2,
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


# What "nonfinite" (and so the cause `exploding`) reads: the net's own numbers. Not a ratio whose
# denominator is a layer's input, which is 0 behind a fully dead layer: a VGG-16 at lr 0.5 with its
# last conv 100% dead had gain_pred inf and gain_meas nan on the fc head, finite loss and logit std
# 0.13-0.19, and was named exploding.
MEASURED = ("probe_loss", "loss_minus_chance", "logit_std", "act_mean/", "act_std/", "sensitivity/",
             "weight_norm/", "grad_norm/", "out_grad_std/", "bn_running_var/", "bn_running_mean/")
