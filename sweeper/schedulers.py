"""Which trials to stop (ASHA, per grid cell) and which to try next (random/grid or Optuna TPE).

:class:`CellASHA` is asynchronous successive halving (Li et al., MLSys 2020) built on Ray Tune's public
scheduler interface (``FIFOScheduler``: trials run in the order the searcher made them; this class only
decides STOP or CONTINUE on each result). It keeps its own rung table, for two reasons:

- **Rungs per grid cell.** In a factorial study (depth x init x BatchNorm) the learning rate is tuned
  *within* each cell: a trial is compared only with trials of its own cell, so every cell keeps its best
  learning rate to the end, and "this cell stalled" means stalled at its best lr. One ASHA across cells
  would cut a whole cell at its first rung because another cell trains faster. ``cell_keys=()`` gives
  classic across-sweep ASHA.
- **Its explanations and its state are its own.** Every stop is written to the sweep record with the
  rung, the cutoff, the peers and the trial's value, and the rung table is saved beside it
  (``rungs.json``), so a restored sweep judges resumed trials against the same peers -- without reading
  Ray's private scheduler attributes, which move between Ray versions.

Rungs sit at ``grace_period * reduction_factor**k`` epochs below ``max_t``. A trial reaching a rung is
stopped when its value is worse than the ``1 - 1/reduction_factor`` quantile of the values already
recorded there by its peers (Ray's ASHA rule, so behaviour matches what users know), then recorded.
The first trial at a rung always continues, so every cell runs at least one trial to ``max_t``.

**Ties at the cutoff** are broken by the split's loss. Accuracy on a validation set of a few hundred
images is a coarse number, and stalled trials all sit at the same chance value: with Ray's rule alone
("stop if worse than the cutoff") a trial *equal* to the cutoff continues, so a rung full of trials at
chance (or at 100% on an easy set) stops nobody and ASHA runs them all to ``max_t`` (seen: 24 x 15
epochs on digits ran 0.80x of FIFO's epochs). A trial tied with the cutoff is compared on the loss of
the same split (``val_loss`` for ``val_accuracy``) with the peers tied with it, by the same quantile.
Without a tie nothing changes. The decision records the tie-break (``tie_break``).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import optuna
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from sweeper.console import error_console
from sweeper.driver import setting
from sweeper.records import SweepRecord
from sweeper.spaces import grid_cells

__all__ = ["CellASHA", "FinishingFIFO", "PrunedAwareOptunaSearch", "finished", "launch_order",
           "make_scheduler", "make_searcher", "milestones"]

RUNGS_FILE = "rungs.json"
# The metric that breaks a tie at the cutoff: the loss of the same split (lower is better).
TIEBREAK = {f"{split}_{name}": f"{split}_loss" for split in ("train", "val")
            for name in ("accuracy", "top1_error", "top5_error")}


def milestones(grace_period: int, max_t: int, reduction_factor: int) -> list[int]:
    """Rung epochs where a trial can be stopped, ascending (integer arithmetic: no float edge cases)."""
    out, m = [], grace_period
    while m < max_t:
        out.append(m)
        m *= reduction_factor
    return out


class CellASHA(FIFOScheduler):
    """ASHA with rungs per grid cell and a recorded reason for every stop (see the module docstring)."""

    def __init__(self, *, record_dir: str, metric: str, mode: str, max_t: int, grace_period: int,
                 reduction_factor: int, cell_keys: Sequence[str] = (), time_attr: str = "epoch"):
        super().__init__()
        self.record_dir = str(record_dir)
        self._metric, self.mode, self.max_t = metric, mode, max_t  # .metric: Ray's property
        self.grace_period, self.reduction_factor = grace_period, reduction_factor
        self.cell_keys, self.time_attr = tuple(cell_keys), time_attr
        self.rungs = milestones(grace_period, max_t, reduction_factor)
        # cell -> rung (as str, for JSON) -> trial_id -> [metric, tie-break metric]; None until loaded
        self._table: dict[str, dict[str, dict[str, float]]] | None = None

    def set_search_properties(self, metric, mode, **spec) -> bool:
        # Ours are fixed at construction; accept Tune's (equal) values.
        return (metric in (None, self.metric)) and (mode in (None, self.mode))

    # ---- the rung table, kept in the sweep record ---------------------------------------------

    @property
    def _record_dir(self) -> str:
        # A restored scheduler writes where this launch's record is, not where the first one was.
        return setting("record_dir", self.record_dir)

    @property
    def _path(self) -> Path:
        return Path(self._record_dir) / "sweeper" / RUNGS_FILE

    def table(self) -> dict[str, dict[str, dict[str, float]]]:
        if self._table is None:  # a restored sweep: the rungs as the last driver left them
            try:
                self._table = json.loads(self._path.read_text())
            except (OSError, ValueError):
                self._table = {}
        return self._table

    def _save(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(f".{RUNGS_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._table))
        os.replace(tmp, self._path)

    def __getstate__(self):  # Tune pickles the scheduler into tuner.pkl: the table lives on disk
        state = dict(self.__dict__)
        state["_table"] = None
        return state

    # ---- decisions ------------------------------------------------------------------------------

    def cell_of(self, config: Mapping[str, Any]) -> str:
        return json.dumps([[k, config.get(k)] for k in self.cell_keys], default=str)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self.time_attr not in result or self.metric not in result:
            return _stop_if_finished(result)
        epoch = int(result[self.time_attr])
        if epoch >= self.max_t:  # reaching the budget is finishing, not pruning
            self._record(trial, epoch, result[self.metric])
            return TrialScheduler.STOP
        decision = self.judge(trial.trial_id, self.cell_of(getattr(trial, "config", {}) or {}),
                              epoch, result[self.metric], result.get(TIEBREAK.get(self.metric, "")))
        if decision is None:  # not pruned; a trial that finished by itself ends at this report
            return _stop_if_finished(result)
        SweepRecord(self._record_dir).append_decision(decision)
        return TrialScheduler.STOP

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        # A finished trial's last value joins its rung too (later peers are judged against it).
        if result and self.time_attr in result and self.metric in result:
            self._record(trial, int(result[self.time_attr]), result[self.metric],
                         result.get(TIEBREAK.get(self.metric, "")))

    def judge(self, trial_id: str, cell: str, epoch: int, value: float,
              secondary: float | None = None) -> dict[str, Any] | None:
        """Record the trial at the highest rung it reached first; the stop decision, or None.
        ``secondary``: the tie-break metric's value (``TIEBREAK``), None where there is none."""
        rungs = self.table().setdefault(cell, {})
        for rung in reversed(self.rungs):
            if epoch < rung:
                continue
            recorded = rungs.setdefault(str(rung), {})
            if trial_id in recorded:
                return None  # judged at this rung already (a replayed result after a restore)
            peers = list(recorded.values())
            cutoff = self._cutoff([_primary(v) for v in peers])
            value, second = _finite(value), _finite(secondary if secondary is not None else math.nan)
            recorded[trial_id] = [value, second]
            self._save()
            decision = {"trial_id": trial_id, "rung": rung, "epoch": epoch, "metric": self.metric,
                        "value": value, "cutoff": cutoff, "peers": len(recorded) - 1,
                        "cell": json.loads(cell) if self.cell_keys else None,
                        "reduction_factor": self.reduction_factor, "time": time.time()}
            if cutoff is None:
                return None
            if self._sign * value < self._sign * cutoff:
                return decision
            if value == cutoff and not math.isnan(second):
                tied = [_secondary(v) for v in peers if _primary(v) == value]
                tied = [t for t in tied if not math.isnan(t)]
                if tied:  # lower loss is better: the same quantile, on the negated loss
                    loss_cutoff = -float(np.percentile([-t for t in tied],
                                                       (1 - 1 / self.reduction_factor) * 100))
                    if second > loss_cutoff:
                        decision["tie_break"] = {"metric": TIEBREAK[self.metric], "value": second,
                                                 "cutoff": loss_cutoff, "tied_peers": len(tied)}
                        return decision
            return None
        return None

    def _record(self, trial, epoch: int, value: float, secondary: float | None = None) -> None:
        cell = self.cell_of(getattr(trial, "config", {}) or {})
        rungs = self.table().setdefault(cell, {})
        for rung in reversed(self.rungs):
            if epoch >= rung:
                if trial.trial_id not in rungs.setdefault(str(rung), {}):
                    rungs[str(rung)][trial.trial_id] = [
                        _finite(value), _finite(secondary if secondary is not None else math.nan)]
                    self._save()
                return

    @property
    def _sign(self) -> float:
        return 1.0 if self.mode == "max" else -1.0

    def _cutoff(self, values: list[float]) -> float | None:
        """The value a trial must reach at a rung: the top 1/rf quantile of its peers (Ray's rule)."""
        if not values:
            return None
        signed = [self._sign * v for v in values]
        return self._sign * float(np.nanpercentile(signed, (1 - 1 / self.reduction_factor) * 100))

    def debug_string(self) -> str:
        return f"CellASHA: rungs {self.rungs} per cell of {list(self.cell_keys) or 'the sweep'}"


def _primary(entry: float | list[float]) -> float:
    """A rung entry is [metric, tie-break] (a float in rung tables written before tie-breaks)."""
    return float(entry[0]) if isinstance(entry, list) else float(entry)


def _secondary(entry: float | list[float]) -> float:
    return float(entry[1]) if isinstance(entry, list) and len(entry) > 1 else math.nan


def _finite(value: float) -> float:
    """Diverged trials report +-inf as their worst value; quantiles need finite numbers."""
    value = float(value)
    if math.isnan(value):
        return value
    return max(min(value, 1e300), -1e300)


def finished(result: Mapping[str, Any]) -> bool:
    """The report says its trial has finished: its last epoch, or the epoch its fit stopped on
    (diverged, stalled). ``outcome`` is ``running`` in every other report of a sweeper trial.

    Both schedulers answer STOP to such a report, after judging it as any other. Tune's function
    trainable holds each report until the driver asks for the next one, so a CONTINUE would keep the
    finished trial's worker waiting for another round trip through the driver just to learn that
    the function has returned (measured: ~35 ms of an idle worker per trial, 200 one-epoch trials
    on 2 cores). Nothing in a trial runs after its last report. (A Tune ``Stopper`` would do the
    same but hide that report from the scheduler, and with it ASHA's decision at a rung.)
    """
    outcome = result.get("outcome")
    return isinstance(outcome, str) and outcome != "running"


def _stop_if_finished(result: Mapping[str, Any]) -> str:
    """What both schedulers answer a report they do not stop for a reason of their own."""
    return TrialScheduler.STOP if finished(result) else TrialScheduler.CONTINUE


class FinishingFIFO(FIFOScheduler):
    """Ray's FIFO scheduler (no trial is stopped early), ending each trial on its finished report
    (:func:`finished`) instead of one round trip later."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return _stop_if_finished(result)


def make_scheduler(sweep, record_dir: str, cell_keys: Sequence[str]):
    if sweep.scheduler == "fifo":
        return FinishingFIFO()
    # The trial's own epoch, not Tune's iteration count: the two part when a restore resumes a trial
    # from a newer checkpoint than Tune's state names (see sweeper.checkpoints).
    return CellASHA(record_dir=record_dir, metric=sweep.metric, mode=sweep.mode,
                    max_t=sweep.max_epochs, grace_period=sweep.grace_period,
                    reduction_factor=sweep.reduction_factor, cell_keys=cell_keys)


class PrunedAwareOptunaSearch(OptunaSearch):
    """Tune hands Optuna an ASHA-stopped trial as COMPLETE with its last value; it was pruned.

    Telling Optuna PRUNED, with the value it was stopped at as its last intermediate value, keeps TPE
    from treating a trial cut at epoch 3 as if it had converged there. This reads OptunaSearch's
    trial map and study (``_ot_trials``, ``_ot_study``: Ray 2.60 has no public accessor);
    tests/test_tuner.py fails loudly if they move, and a failure here is a warning, never the end of
    the sweep.
    """

    def on_trial_complete(self, trial_id, result=None, error=False):
        if result and not error and result.get("outcome") == "running":
            try:
                ot_trials, study = self._ot_trials, self._ot_study
                if trial_id in ot_trials and trial_id not in self._completed_trials:
                    ot_trial = ot_trials[trial_id]
                    value, step = result.get(self.metric), result.get("epoch")
                    if value is not None and step is not None:
                        # Tune withholds the stopping result from the searcher; without it a trial
                        # stopped at its first rung would reach Optuna with no value at all.
                        ot_trial.report(value, step)
                    study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
                    self._completed_trials.add(trial_id)
                    return
            except Exception as exc:  # never let bookkeeping end a sweep
                error_console.print(f"warning: could not mark trial {trial_id} pruned: {exc}")
                return
        super().on_trial_complete(trial_id, result=result, error=error)


def launch_order(sweep) -> list[dict[str, Any]]:
    """The grid cells in the order their trials start: every cell ``num_samples`` times, in rounds
    (each cell's first trial before any cell's second), each round in a seeded random order.

    Why not Ray's order (the grid's first axis fastest, the same order every round): asynchronous
    ASHA judges a trial against the peers that reached its rung *before* it. Started in grid order, a
    factorial's first trials are one corner of it (vgg_depth: every BN-free cell before any BN cell),
    so the corner that happens to come first sets every early cutoff -- a corner stalled at chance lets
    everything after it through. Seen on vgg_depth (24 cells x 15 epochs on digits, ASHA across the
    sweep, grace 1): 0.43x FIFO's epochs in grid order. A random order makes the early peers a fair
    sample of the study; rounds keep every cell represented early, as Ray's order does, so a sweep
    stopped half way still has a trial in every cell. Empty when the space has no grid axes.
    """
    cells = grid_cells(sweep)
    if not any(cells):  # no grid axes: Ray samples every trial, nothing to order
        return []
    rng = random.Random(sweep.seed)
    order: list[dict[str, Any]] = []
    for _ in range(sweep.num_samples):
        round_ = [dict(cell) for cell in cells]
        rng.shuffle(round_)
        order.extend(round_)
    return order


def make_searcher(sweep):
    if sweep.search == "random":
        # Each preset point fixes a trial's grid values (its cell); Ray samples the other domains
        # (the learning rate...) from the seeded generator as before. Ray counts each point as one
        # sample, so TuneConfig.num_samples is the trial count (spaces.trial_count), not num_samples.
        # The concurrency cap goes here: Tune ignores TuneConfig.max_concurrent_trials (with only a
        # warning) when the search algorithm is a BasicVariantGenerator rather than a Searcher.
        return BasicVariantGenerator(points_to_evaluate=launch_order(sweep) or None,
                                     random_state=sweep.seed, max_concurrent=sweep.max_concurrent or 0)
    return PrunedAwareOptunaSearch(
        metric=sweep.metric, mode=sweep.mode,
        sampler=optuna.samplers.TPESampler(
            seed=sweep.seed, n_startup_trials=min(10, max(2, sweep.num_samples // 3))))
