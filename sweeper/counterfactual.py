"""Check a stall's named cause by intervention: short runs that change one thing. Plain PyTorch.

A cause named from measurements alone can be wrong (a BN-free net that sat at chance at a high lr, and
that a smaller lr trains, was once named ``lr_too_small``). So when :class:`sweeper.diagnostics.Diagnostics`
first names a stall, it runs, on the trial's own training data and batch order:

  from the trial's init        lr / 10 (``lr_div10``), lr x 10 (``lr_x10``)
  from the stalled weights     lr / 10 (``stalled_lr_div10``), lr x 10 (``stalled_lr_x10``), with the
                               optimizer's state (momentum) as the trial has it now
  from scratch                 He init (``he_init``), BatchNorm (``batch_norm``): the trial's lr, one
                               change each; skipped where the trial already has it

The init is rebuilt from the trial's seed exactly as :func:`sweeper.train.fit` built it (same seed, same
build, so bit-identical to the trial's step 0, also after a resume); each run trains its own model and
optimizer, draws its batches from its own generator seeded as the trial's (the same batches in the same
order: a run differs from the trial only in its intervention), and runs under a forked RNG. Nothing the
trial owns is touched, so training continues bit-identically.

**Escaped chance**: the mean training loss of the run's last K steps (K = a fifth of the run, at most
20) is below ln C - 2 x ``stall_tolerance``, i.e. a whole tolerance past the edge of the band in which
the stall was declared. A net that has learned nothing but the class prior sits at ln C minus the
prior's deficit (~0 for balanced classes) with per-batch noise that the mean of K batches averages out;
the trial itself sat within one tolerance of ln C for ``stall_epochs`` epochs. A non-finite run did not
escape.

**Cost**: all runs together take at most ``counterfactual_budget`` (10%) of the trial's budget (epochs x
steps per epoch): each gets min(``counterfactual_steps``, that share / number of runs) steps, and when
that is below ``counterfactual_min_steps`` nothing runs and the reason is recorded.

**The rule** (:func:`checked_cause`), from the interventions where they are decisive:
  an lr / 10 run escaped and no lr x 10 run did   -> ``lr_too_high``
  an lr x 10 run escaped and no lr / 10 run did   -> ``lr_too_small``
  no lr change escaped, He init or BN did          -> an init/signal cause (the measured one if it is
                                                      one, else the one the measurements point to)
  otherwise (nothing escaped, or both lr directions did) -> the measured cause, unchanged.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["INTERVENTIONS", "SIGNAL_CAUSES", "Evidence", "RunResult", "checked_cause", "plan_steps",
           "rebuild_initial_model", "run_counterfactuals"]

# name -> (start, what changes, how the evidence line calls it)
INTERVENTIONS: dict[str, tuple[str, str]] = {
    "lr_div10": ("init", "lr/10"),
    "lr_x10": ("init", "lr x10"),
    "stalled_lr_div10": ("stalled", "lr/10"),
    "stalled_lr_x10": ("stalled", "lr x10"),
    "he_init": ("scratch", "He init"),
    "batch_norm": ("scratch", "BN"),
}
SIGNAL_CAUSES = ("vanishing_signal", "vanishing_gradient", "dead_relu")
_LR_FACTOR = {"lr_div10": 0.1, "lr_x10": 10.0, "stalled_lr_div10": 0.1, "stalled_lr_x10": 10.0}
_DIVERGE_CHECK = 50  # steps between host reads that end a run whose loss is no longer finite


@dataclass(frozen=True)
class RunResult:
    escaped: bool
    loss: float  # mean training loss of the last K steps (nan if the run diverged)
    steps: int  # steps run (fewer than planned if the loss became non-finite)


@dataclass
class Evidence:
    """What the interventions did; ``skipped`` says why none ran (then ``runs`` is empty)."""

    runs: dict[str, RunResult] = field(default_factory=dict)
    not_run: dict[str, str] = field(default_factory=dict)  # intervention -> why it was left out
    steps: int = 0  # planned steps per run
    total_steps: int = 0  # steps actually run, all runs together
    budget: int = 0  # the trial's epochs x steps per epoch
    threshold: float = math.nan  # escaped: last-K mean loss below this
    seconds: float = 0.0
    skipped: str | None = None

    def escaped(self, *names: str) -> bool:
        return any(self.runs[n].escaped for n in names if n in self.runs)

    def metrics(self) -> dict[str, Any]:
        if self.skipped:
            return {"cf_skipped": self.skipped, "cf/budget": float(self.budget)}
        out: dict[str, Any] = {"cf/steps": float(self.total_steps), "cf/steps_per_run": float(self.steps),
                               "cf/budget": float(self.budget), "cf/seconds": self.seconds,
                               "cf/threshold": self.threshold}
        for name, r in self.runs.items():
            out[f"cf/{name}/escaped"] = 1.0 if r.escaped else 0.0
            out[f"cf/{name}/loss"] = r.loss
            out[f"cf/{name}/steps"] = float(r.steps)
        return out

    def sentence(self) -> str:
        """One line, e.g. "lr/10 escaped chance in 200 steps; lr x10 did not; ...; He init did; BN did"."""
        if self.skipped:
            return f"no counterfactuals: {self.skipped}"
        if self.runs and not any(r.escaped for r in self.runs.values()):
            tried = ", ".join(_label(n) for n in self.runs)
            return f"no intervention escaped chance in {self.steps} steps ({tried})" + self._left_out()
        parts, first = [], True
        for name, r in self.runs.items():
            verb = (f"escaped chance in {r.steps} steps" if first else "did") if r.escaped else "did not"
            if r.escaped:
                first = False
            if not math.isfinite(r.loss):
                verb += " (diverged)"
            parts.append(f"{_label(name)} {verb}")
        return "; ".join(parts) + self._left_out()

    def _left_out(self) -> str:
        return "".join(f"; {_label(n)} not run ({why})" for n, why in self.not_run.items())


def _label(name: str) -> str:
    start, what = INTERVENTIONS[name]
    return f"{what} from the stalled weights" if start == "stalled" else what


# ---- the rule -----------------------------------------------------------------------------------


def checked_cause(evidence: Evidence, measured: str, signal_cause: Callable[[], str]) -> tuple[str, bool]:
    """(cause, decisive): the cause the interventions support, and whether they decided it.

    ``measured`` is the measurement-based cause; ``signal_cause()`` names the init/signal cause the
    measurements point to, used when only He init or BN escaped and ``measured`` is not such a cause.
    """
    if evidence.skipped or not evidence.runs:
        return measured, False
    down = evidence.escaped("lr_div10", "stalled_lr_div10")
    up = evidence.escaped("lr_x10", "stalled_lr_x10")
    fixed_by_init = evidence.escaped("he_init", "batch_norm")
    if down and not up:
        return "lr_too_high", True
    if up and not down:
        return "lr_too_small", True
    if not down and not up and fixed_by_init:
        return (measured if measured in SIGNAL_CAUSES else signal_cause()), True
    return measured, False


# ---- planning -----------------------------------------------------------------------------------


def plan_steps(*, epochs: int, steps_per_epoch: int, runs: int, max_steps: int, min_steps: int,
               fraction: float) -> tuple[int, str | None]:
    """(steps per run, None) within ``fraction`` of the trial's budget, or (0, why not)."""
    budget = epochs * steps_per_epoch
    allowed = int(fraction * budget)
    per_run = min(max_steps, allowed // runs) if runs else 0
    if runs and per_run < min_steps:
        return 0, (f"{runs} runs x {min_steps} steps = {runs * min_steps} steps exceed "
                   f"the {allowed} steps allowed, {fraction:.0%} of the trial's budget of {budget} steps "
                   f"({epochs} epochs x {steps_per_epoch} steps); diagnostics.counterfactual_budget "
                   f"sets that share")
    return per_run, None


def _planned(cfg) -> tuple[dict[str, str], dict[str, str]]:
    """(interventions to run: name -> start, interventions left out: name -> why)."""
    run, left = {}, {}
    for name, (start, _) in INTERVENTIONS.items():
        if name == "he_init" and cfg.model.init == "he":
            left[name] = "the trial's own init"
        elif name == "batch_norm" and cfg.model.batch_norm:
            left[name] = "the trial has it"
        else:
            run[name] = start
    return run, left


# ---- running ------------------------------------------------------------------------------------


def rebuild_initial_model(cfg, num_classes: int, device: torch.device) -> nn.Module:
    """The trial's model at step 0, rebuilt from its seed as :func:`sweeper.train.fit` builds it
    (``torch.manual_seed(cfg.seed)``, then ``build_model`` on the CPU), without touching the caller's
    RNG. Only the CPU generator is seeded: the init draws from it alone, and ``torch.manual_seed``
    would also reseed (and leave reseeded) every CUDA generator the trial's dropout draws from."""
    from sweeper.models import build_model
    from sweeper.transfer import apply_transfer

    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(cfg.seed)
        model = build_model(cfg.model, num_classes=num_classes)
        apply_transfer(model, cfg.model)  # step 0 holds the trial's copied weights and frozen blocks
    model = model.to(device)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def run_counterfactuals(ctx, dcfg) -> Evidence:
    """Run the interventions for the trial in ``ctx`` (a :class:`sweeper.train.TrainContext`);
    ``dcfg`` is its :class:`~sweeper.config.DiagnosticsConfig`. Never changes the trial's state."""
    cfg, data = ctx.cfg, ctx.data
    todo, left = _planned(cfg)
    steps_per_epoch = getattr(data, "steps_per_epoch", None)
    if not hasattr(data, "train_batches") or not steps_per_epoch:
        return Evidence(not_run=left, skipped="the context has no training batches to run on")
    steps, why = plan_steps(epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, runs=len(todo),
                            max_steps=dcfg.counterfactual_steps, min_steps=dcfg.counterfactual_min_steps,
                            fraction=dcfg.counterfactual_budget)
    evidence = Evidence(not_run=left, steps=steps, budget=cfg.epochs * steps_per_epoch,
                        threshold=math.log(data.num_classes) - 2 * dcfg.stall_tolerance, skipped=why)
    if why:
        return evidence
    from sweeper.train import _autocast

    device = next(ctx.model.parameters()).device
    autocast = _autocast(cfg, device)
    lr_now = ctx.optimizer.param_groups[0]["lr"]
    t0 = time.perf_counter()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # dropout draws in the runs stay out of the trial's RNG
        for name, start in todo.items():
            model, optimizer = _start(name, start, ctx, cfg, device)
            if name in _LR_FACTOR:
                base = lr_now if start == "stalled" else cfg.optim.lr
                for group in optimizer.param_groups:
                    group["lr"] = base * _LR_FACTOR[name]
            losses = _train(model, optimizer, data, ctx.criterion, cfg, steps, autocast)
            evidence.runs[name] = _judge(losses, evidence.threshold)
            evidence.total_steps += len(losses)
            del model, optimizer
    evidence.seconds = time.perf_counter() - t0
    return evidence


def _start(name: str, start: str, ctx, cfg, device: torch.device):
    """A fresh (model, optimizer) for one run: never the trial's own objects."""
    from sweeper.train import _optimizer

    if start == "stalled":
        # One deepcopy of both: the optimizer's state (momentum) then keys the copied parameters.
        return copy.deepcopy((ctx.model, ctx.optimizer))
    if name == "he_init":
        cfg = cfg.replace(**{"model.init": "he"})
    elif name == "batch_norm":
        cfg = cfg.replace(**{"model.batch_norm": True})
    model = rebuild_initial_model(cfg, ctx.data.num_classes, device)
    return model, _optimizer(cfg, model)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, data, criterion: nn.Module, cfg,
           steps: int, autocast) -> torch.Tensor:
    """``steps`` training steps on the trial's batch order; the per-step losses (one host read at the
    end, plus one every _DIVERGE_CHECK steps to end a run that has diverged)."""
    from sweeper.train import train_step

    aux_weight = cfg.model.aux_weight
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # as fit's batch generator: the same batches
    losses: list[torch.Tensor] = []
    model.train()
    while len(losses) < steps:
        before = len(losses)
        for x, y in data.train_batches(gen):
            _, loss = train_step(model, optimizer, criterion, x, y, aux_weight=aux_weight,
                                 autocast=autocast)
            losses.append(loss.detach().float())
            if len(losses) >= steps:
                break
            if len(losses) % _DIVERGE_CHECK == 0 and not bool(torch.isfinite(losses[-1])):
                return torch.stack(losses).double().cpu()
        if len(losses) == before:  # no batch at all
            break
    return torch.stack(losses).double().cpu() if losses else torch.empty(0, dtype=torch.float64)


def _judge(losses: torch.Tensor, threshold: float) -> RunResult:
    n = len(losses)
    if n == 0:
        return RunResult(False, math.nan, 0)
    k = max(1, min(20, n // 5))
    tail = float(losses[-k:].mean())
    escaped = math.isfinite(tail) and tail < threshold
    return RunResult(escaped, tail if math.isfinite(tail) else math.nan, n)
