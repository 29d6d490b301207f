"""The driver callback: the sweep record, the live progress line, and every trial's outcome.

Runs in the driver, inside Tune's event loop, so nothing here may wait: record writes are small local
appends and rewrites, and tracking only spools (delivery runs on the Tracker's own thread).
Outcomes: completed, pruned (with the rung, cutoff, peers and value CellASHA recorded), diverged,
stalled or failed.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

from ray.tune import Callback

from sweeper.config import TrialConfig
from sweeper.console import console, error_console, fmt
from sweeper.driver import setting
from sweeper.outcomes import Outcome, classify
from sweeper.records import SweepRecord, scalar_metrics
from sweeper.spaces import Sweep
from sweeper.tracking import Tracker

__all__ = ["SweepCallback", "trial_label"]

_PROGRESS_S = 10.0  # seconds between progress lines while trials run
_ENDED_LINE_S = 1.0  # ... and between the lines printed as trials end


def trial_label(config: Mapping[str, Any]) -> str:
    """A readable trial name: vgg16-normal-plain-lr0.0123."""
    arch = config.get("model.arch", "model")
    if arch == "vgg" and config.get("model.depth"):
        arch = f"vgg{config['model.depth']}p"
    parts = [str(arch), str(config.get("model.init", "he"))]
    parts.append("bn" if config.get("model.batch_norm") else "plain")
    parts += _transfer_parts(config)
    lr = config.get("optim.lr")
    if isinstance(lr, (int, float)):
        # 3 significant digits: at 2, draws of 0.1538 and 0.1524 in one cell were both "lr0.15"
        parts.append(f"lr{lr:.3g}")
    if config.get("seed") not in (None, 0):  # replicates (Sweep.seeds) stay apart by name
        parts.append(f"s{config['seed']}")
    return "-".join(parts)


def _transfer_parts(config: Mapping[str, Any]) -> list[str]:
    """What a trial copied and froze (sweeper.transfer): the arms of a fine-tuning study would
    otherwise share one name (resnet18-he-bn-lr0.03 six times)."""
    parts = []
    if config.get("model.pretrained") or config.get("model.init_from"):
        layers = config.get("model.init_layers")
        if layers == "none":
            parts.append("scratch")
        else:
            parts.append("pt" if config.get("model.pretrained") else "from")
            if layers in ("vgg_paper", "all", "backbone"):
                parts[-1] += f"-{layers.replace('_', '')}"
    freeze = config.get("model.freeze")
    if isinstance(freeze, str) and freeze != "none":
        parts.append("frz" if freeze == "backbone" else f"frz-last{freeze.rpartition(':')[2]}")
    return parts


class SweepCallback(Callback):
    """Writes the sweep record and prints progress; runs in the driver."""

    def __init__(self, sweep: Sweep, record_dir: str, tracker: Tracker, *, quiet: bool,
                 planned: int):
        self.sweep, self.record_dir, self.quiet, self.planned = sweep, record_dir, quiet, planned
        self.tracker = tracker
        self.opened: set[str] = set()  # trials whose MLflow run was asked for by this driver
        self.started = time.time()
        self.last_print = 0.0
        self.epochs = 0
        self.best: tuple[float, str] | None = None
        self.states: dict[str, str] = {}
        self._forget_record()

    def _forget_record(self) -> None:
        # This driver is the record's only writer (sweeper.lease): each trial's record is read from
        # disk once and then kept, and decisions.jsonl is read from where the last read stopped.
        # Reading them again at every event was on the path from one trial's end to the next
        # trial's start.
        self._trials: dict[str, dict[str, Any]] = {}
        self._decisions: dict[str, dict[str, Any]] = {}
        self._decisions_offset = 0
        self._recorded: dict[str, int] = {}  # trial -> the last epoch its record holds
        self._code_tags: dict[str, Any] | None = None  # the launch's git SHA, for each child run

    def __getstate__(self):  # Tune pickles the callback: the caches are this process's
        state = dict(self.__dict__)
        for key in ("_trials", "_decisions", "_decisions_offset", "_recorded", "_code_tags"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._forget_record()

    def setup(self, **info):
        self.started, self.last_print = time.time(), 0.0  # a resumed sweep's clock starts now
        # Tuner.restore brings this callback back from Ray's pickle with the first launch's
        # settings; this launch's tracker (its tracking URI) and output flags win.
        self.tracker = setting("tracker", self.tracker)
        self.quiet = setting("quiet", self.quiet)
        self.record_dir = setting("record_dir", self.record_dir)
        self._forget_record()

    @property
    def _record(self) -> SweepRecord:
        return SweepRecord(self.record_dir)

    def get_state(self):
        return {"epochs": self.epochs, "best": self.best, "states": self.states}

    def set_state(self, state):
        self.epochs = state["epochs"]
        self.best = tuple(state["best"]) if state["best"] else None
        self.states = dict(state["states"])

    def _write(self, trial_id: str, rec: dict[str, Any]) -> None:
        self._record.write_trial(trial_id, rec)
        self._trials[trial_id] = rec

    def _decision(self, trial_id: str) -> dict[str, Any] | None:
        new, self._decisions_offset = self._record.decisions_from(self._decisions_offset)
        self._decisions.update(new)
        return self._decisions.get(trial_id)

    def _base(self, trial) -> dict[str, Any]:
        existing = self._trials.get(trial.trial_id)
        if existing is None:
            existing = self._record.trial(trial.trial_id) or {}
        return {**existing, "trial_id": trial.trial_id, "name": trial_label(trial.config),
                "config": dict(trial.config), "created": existing.get("created", time.time()),
                "num_failures": trial.num_failures}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.states[trial.trial_id] = "running"
        rec = {**self._base(trial), "status": "running"}
        was_stopped = rec.pop("outcome", None) == "stopped"  # by an interrupted launch: it runs again
        if was_stopped:
            rec.pop("reason", None)
        self._write(trial.trial_id, rec)
        self._open_run(trial)
        if was_stopped:
            self.tracker.set_tags(trial.trial_id, {"sweeper.outcome": "running"})

    def _open_run(self, trial) -> None:
        if trial.trial_id not in self.opened:  # found again by tag after a retry or restore
            if self._code_tags is None:
                # The code each result came from, on the trial's own run (the sweep file's text
                # and the command are on the parent; the seed and config in params and config.json).
                try:
                    meta = self._record.meta()
                except (OSError, ValueError):  # no sweep.json (a bare record): no code tags
                    meta = {}
                self._code_tags = {k: meta[m] for k, m in (("sweeper.git_sha", "git_sha"),
                                                           ("sweeper.git_dirty", "git_dirty"))
                                   if meta.get(m) is not None}
            try:  # config.json holds the resolved config: every setting, defaults included
                resolved = TrialConfig.from_flat(dict(trial.config)).to_flat()
            except Exception:  # noqa: BLE001 -- a config the trial will refuse: its own keys only
                resolved = None
            self.tracker.start_trial(trial.trial_id, run_name=trial_label(trial.config),
                                     config=trial.config, resolved=resolved, tags=self._code_tags)
            self.opened.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        carried = result.pop("resumed_history", None)
        if carried:
            self._fill_gap(trial, carried, before=int(result.get("epoch", 0)))
        self._open_run(trial)
        epoch = int(result.get("epoch", 0))
        metrics = scalar_metrics(result)
        if 0 < epoch <= self._last_recorded(trial.trial_id):
            # This epoch ran again: a driver died after recording it, before Ray saved the state
            # this sweep resumed from. Its first copy stands, in the record as in MLflow (which
            # never logs a step twice), so that every reader gives the same number.
            metrics = next((row for row in self._record.epochs(trial.trial_id)
                            if int(row.get("epoch", 0)) == epoch), metrics)
        else:
            self._record.append_epoch(trial.trial_id, result)
            self._recorded[trial.trial_id] = epoch
            self.tracker.log_result(trial.trial_id, result)
            self.tracker.deliver_soon()  # never wait on the tracking server in Tune's event loop
        self.epochs += 1
        value = metrics.get(self.sweep.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            better = (self.best is None or (value > self.best[0] if self.sweep.mode == "max"
                                            else value < self.best[0]))
            if better:
                self.best = (float(value), trial_label(trial.config))
        rec = self._base(trial)
        rec.update(status="running", epochs=epoch, last=dict(metrics))
        rec["best"] = _best(rec.get("best"), metrics, self.sweep)
        checkpoint = result.get("checkpoint_dir_name")  # set by Ray when this report saved one
        if checkpoint:
            # Relative to the experiment dir, so that the record reads the same on any machine and
            # storage URI (sweeper.checkpoints.load_trial_state joins it to the storage root).
            rec["checkpoint"] = f"{os.path.basename(str(trial.path).rstrip('/'))}/{checkpoint}"
            rec["checkpoint_epoch"] = int(result.get("epoch", 0))
        self._write(trial.trial_id, rec)
        self._progress(trials)

    def _last_recorded(self, trial_id: str) -> int:
        """The last epoch the record holds for a trial: read once per trial and driver, then kept
        (a new trial has no file: one stat)."""
        if trial_id not in self._recorded:
            rows = self._record.epochs(trial_id)
            self._recorded[trial_id] = max((int(row.get("epoch", 0)) for row in rows), default=0)
        return self._recorded[trial_id]

    def _fill_gap(self, trial, carried: str, *, before: int) -> None:
        """Epochs the resumed checkpoint holds that the record lacks (a killed driver's last unpushed
        seconds): recorded and tracked now, from the checkpoint's own rows, so none goes missing."""
        import json

        have = {int(row.get("epoch", 0)) for row in self._record.epochs(trial.trial_id)}
        for row in json.loads(carried):
            epoch = int(row.get("epoch", 0))
            if epoch not in have and 0 < epoch < before:
                self._record.append_epoch(trial.trial_id, row)
                self._recorded[trial.trial_id] = max(self._recorded.get(trial.trial_id, 0), epoch)
                self.tracker.log_result(trial.trial_id, row)
                if not self.quiet:
                    console.print(f"  {trial_label(trial.config)}: epoch {epoch} recorded from its "
                                  "checkpoint (the previous driver died before writing it)",
                                  style="yellow")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, error=None)
        self._progress(trials, ended=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A trial failed and Tune retries it (FailureConfig.max_failures): said in one line, even
        with --quiet, since above it Tune prints the error's traceback, and after a lost node Ray
        prints pages of its own, neither saying what happens next."""
        last = self._last_recorded(trial.trial_id)
        after = f"after epoch {last}" if last else "before its first epoch"
        error_console.print(f"  {trial_label(trial.config)}: failed {after} ({_error_text(trial)}); "
                            f"retry {trial.num_failures} of {self.sweep.max_failures}, from its "
                            "last checkpoint", style="yellow", markup=False, highlight=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, error=_error_text(trial))
        self._progress(trials, ended=True)

    def _finish(self, trial, *, error: str | None) -> None:
        rec = self._base(trial)
        last = trial.last_result or {}
        decision = self._decision(trial.trial_id)
        epochs = self._record.epochs(trial.trial_id) or ([scalar_metrics(last)] if last else [])
        diag = TrialConfig.from_flat(dict(trial.config)).diagnostics
        result = classify(epochs, decision=decision, error=error, metric=self.sweep.metric,
                          finished=error is not None or decision is not None
                          or last.get("outcome") not in (None, "running"),
                          stall_epochs=diag.stall_epochs, stall_tolerance=diag.stall_tolerance)
        outcome, reason = result.outcome, result.reason
        rec.update(status="finished", outcome=outcome, reason=reason, prune=decision,
                   at_chance=result.at_chance, cause=result.cause,
                   chance_epochs=result.chance_epochs,
                   epochs=int(last.get("epoch", rec.get("epochs", 0))), finished=time.time())
        if last:
            # The recorded copy of the last epoch (its first, if it ran again after a resume).
            same = epochs and int(epochs[-1].get("epoch", -1)) == int(last.get("epoch", -2))
            rec["last"] = dict(epochs[-1]) if same else scalar_metrics(last)
        evidence = next((e["cf_evidence"] for e in reversed(epochs) if e.get("cf_evidence")), None)
        if evidence:
            rec["cause_evidence"] = evidence
        self._write(trial.trial_id, rec)
        self.states[trial.trial_id] = outcome
        self._open_run(trial)
        tags = {"sweeper.outcome": outcome, "sweeper.stop_reason": reason,
                "sweeper.epochs": rec["epochs"], "sweeper.at_chance": str(result.at_chance).lower(),
                "sweeper.cause": result.cause,
                # The run's description in the MLflow UI: the one-sentence diagnosis.
                "mlflow.note.content": diagnosis(trial_label(trial.config), result, rec)}
        if outcome == "stalled":
            tags["sweeper.stall_reason"] = result.cause
        if evidence:  # what the interventions showed (sweeper.counterfactual): strings are no metrics
            tags["sweeper.cause_evidence"] = evidence
        if decision is not None:
            tags.update({f"sweeper.prune.{k}": decision.get(k)
                         for k in ("rung", "cutoff", "peers", "value")})
        self.tracker.set_tags(trial.trial_id, tags)
        if epochs and any(k.startswith("init/act_std/") for k in epochs[0]):
            # Its per-layer profile (init vs now, log scale) on the child run: drawn and uploaded
            # by the tracker's delivery thread, never here.
            self.tracker.log_figure(trial.trial_id, epochs[0], epochs[-1],
                                    title=f"{trial_label(trial.config)}: {outcome}")
        self.tracker.finish(trial.trial_id, "FAILED" if outcome == "failed" else "FINISHED")
        self.tracker.deliver_soon()
        if not self.quiet:
            style = {"completed": "green", "pruned": "cyan", "failed": "red", "diverged": "red",
                     "stalled": "yellow", "val_collapse": "yellow",
                     "late_start": "green"}.get(outcome, "")
            # The last epoch's value, and the trial's best where it differs (the progress line's
            # "best" is a best, so an unlabelled last value beside it read as a contradiction).
            metric = self.sweep.metric
            last_value = (rec.get("last") or {}).get(metric)
            best_value = (rec.get("best") or {}).get(metric)
            best_text = f" (best {fmt(best_value)})" if best_value not in (None, last_value) else ""
            console.print(f"  {trial_label(trial.config):<32} {outcome:<12} after "
                          f"{rec['epochs']:>3} epochs  last {metric}={fmt(last_value)}{best_text}  "
                          f"{reason or ''}", style=style)

    def _progress(self, trials, ended: bool = False) -> None:
        """A line every 10 s, and when a trial ends: then at most one a second (a sweep of many
        short trials printed one line per trial), and always when the last one does."""
        if self.quiet:
            return
        now = time.time()
        # Inside on_trial_complete Tune still shows the trial RUNNING: count our own outcomes.
        done = sum(1 for outcome in self.states.values() if outcome != "running")
        last = ended and done >= self.planned
        if now - self.last_print < (_ENDED_LINE_S if ended else _PROGRESS_S) and not last:
            return
        self.last_print = now
        running = max(0, sum(1 for t in trials if t.status == "RUNNING") - (1 if ended else 0))
        pending = sum(1 for t in trials if t.status == "PENDING")
        elapsed = now - self.started
        budget = self.planned * self.sweep.max_epochs
        eta = ""
        if self.epochs and done < self.planned:
            # An upper bound: ASHA will cut some of the remaining budget.
            eta = f" | ETA <= {_duration(elapsed / self.epochs * max(budget - self.epochs, 0))}"
        best = f" | best {self.sweep.metric} {fmt(self.best[0])} ({self.best[1]})" if self.best else ""
        console.print(f"[{_duration(elapsed)}] trials: {done}/{self.planned} done, {running} running, "
                      f"{pending} pending | epochs {self.epochs}/{budget}{best}{eta}", style="dim")


def diagnosis(name: str, result: Outcome, rec: Mapping[str, Any]) -> str:
    """One sentence: what happened to the trial and why, with its best value."""
    best, last = rec.get("best") or {}, rec.get("last") or {}
    # test accuracy exists only after the last epoch: the same number export and the report give
    values = {"best val_accuracy": best.get("val_accuracy"), "test_accuracy": last.get("test_accuracy")}
    metrics = ", ".join(f"{k} {fmt(v)}" for k, v in values.items() if isinstance(v, (int, float)))
    text = f"{name}: {result.outcome.replace('_', ' ')}"
    if result.reason:
        text += f" -- {result.reason}"
    elif result.outcome == "completed":
        text += f" after {rec.get('epochs')} epochs"
    if metrics:
        text += f"; {metrics}"
    return text + "."


def _best(previous: Mapping[str, Any] | None, metrics: Mapping[str, Any], sweep: Sweep):
    value = metrics.get(sweep.metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return previous
    if previous is None or previous.get(sweep.metric) is None:
        return dict(metrics)
    old = previous[sweep.metric]
    better = value > old if sweep.mode == "max" else value < old
    return dict(metrics) if better else previous


def _error_text(trial) -> str:
    """The trial's latest failure in a line: the exception's last line (``RuntimeError: ...``), or
    why Ray lost its worker (``The actor is dead because its node has died...``).

    Tune appends each failure to the trial's error file (``Trial.error_file``, ray 2.60
    ``Trial.handle_error``: a ``Failure # N (occurred at ...)`` header, then the error's text);
    tests/test_sweeps.py's retry test fails if that moves and this falls back to the generic text.
    """
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text(errors="replace") if path else ""
    except OSError:
        text = ""
    latest = text.rsplit("Failure # ", 1)[-1].splitlines()[1:]  # without its header line
    lines = [line.strip() for line in latest if line.strip()]
    why = next((line for line in lines if line.startswith("The actor is dead because")), None)
    return (why or lines[-1])[:500] if lines else "the trial raised (see its error file)"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


