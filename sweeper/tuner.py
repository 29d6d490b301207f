"""The only module that configures Ray: a validated Sweep in, a Ray Tune run out.

``launch`` connects to a cluster (``--address`` / ``RAY_ADDRESS``) or starts a fresh local one
(``address="local"``: never a stale cluster), runs the pre-flight checks, then restores the sweep if
its experiment exists (restore-or-start) or builds a new ``Tuner``: ASHA on epochs (or FIFO), Ray's
basic generator (grid axes expanded, other domains sampled) or Optuna TPE, per-trial resources
(possibly a function of the config), checkpoints every epoch and retries from the last one.

Driver-side bookkeeping lives in :class:`SweepCallback`: the sweep record on disk (status/export read
it without Ray), the live progress line, and every trial's outcome: completed, pruned (with ASHA's
rung, cutoff, peers and the trial's value), diverged, stalled or failed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import optuna
import ray
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from sweeper.checkpoints import repair_restorable_checkpoints
from sweeper.config import ConfigError, TrialConfig
from sweeper.console import console, error_console, fmt
from sweeper.records import SweepRecord, scalar_metrics
from sweeper.spaces import Sweep, grid_cells, trial_count, trial_resources
from sweeper.tracking import Tracker, default_tracking_uri, redact

__all__ = ["DEFAULT_STORAGE", "LaunchResult", "experiment_dir", "launch", "stop_sweep"]

DEFAULT_STORAGE = "sweeps"
_TUNE_ENV = {
    # Tune's CSV/JSON/TensorBoard loggers per trial: nobody reads them here, and at many results per
    # second they cost real time. Our record and MLflow keep what matters.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_AIR_NEW_OUTPUT": "0",
    # Checkpointing every epoch is the design (a retry loses at most one epoch), not a mistake.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


@dataclass
class LaunchResult:
    name: str
    experiment_dir: str
    outcomes: dict[str, int] = field(default_factory=dict)
    trials: int = 0
    epochs: int = 0
    restored: bool = False
    interrupted: bool = False
    best: dict[str, Any] | None = None
    undelivered: int = 0  # tracking operations still in the spool
    tracking_error: str | None = None


# ---- storage ------------------------------------------------------------------------------------------


def storage_root(storage: str | None) -> str:
    """An absolute local path or a URI (s3://, gs://, ...)."""
    storage = storage or DEFAULT_STORAGE
    if "://" in storage:
        return storage
    return str(Path(storage).expanduser().resolve())


def experiment_dir(name: str, storage: str | None) -> str:
    root = storage_root(storage)
    return f"{root.rstrip('/')}/{name}"


def record_root(storage: str | None) -> str:
    """Where records (and the embedded MLflow store) live: the storage dir, or ./sweeps if remote."""
    root = storage_root(storage)
    return storage_root(DEFAULT_STORAGE) if "://" in root else root


def record_for(name: str, storage: str | None) -> SweepRecord:
    """The local record of a sweep. Remote storage keeps Ray's state remote; the record stays local."""
    return SweepRecord(Path(record_root(storage)) / name)


def _check_storage(root: str, *, multi_node: bool) -> list[str]:
    import pyarrow.fs as pafs

    problems = []
    if "://" not in root and multi_node:
        problems.append(
            f"storage={root!r} is a path on this machine, but the cluster has several nodes: remote "
            "workers cannot write checkpoints there. Use shared storage (s3://bucket/path, "
            "gs://..., or an NFS mount present on every node, given as file:///mnt/...)")
        return problems
    try:
        fs, path = pafs.FileSystem.from_uri(root if "://" in root else Path(root).as_uri())
        fs.create_dir(path, recursive=True)
        probe = f"{path.rstrip('/')}/.sweeper-write-test-{os.getpid()}"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as exc:  # pyarrow raises OSError subclasses and ArrowInvalid
        problems.append(f"storage={root!r} is not writable: {exc}")
    return problems


# ---- pre-flight ---------------------------------------------------------------------------------------


def _configs_to_check(sweep: Sweep) -> list[TrialConfig]:
    """One config per grid cell (sampled elsewhere): resources and datasets may differ by cell."""
    from sweeper.spaces import base_config, sample_config

    sampled = sample_config(sweep)
    configs = []
    for cell in grid_cells(sweep):
        configs.append(TrialConfig.from_flat({**sampled, **base_config(sweep, cell)}))
    return configs


def preflight(sweep: Sweep, *, root: str, gpu_available: bool) -> list[str]:
    """Everything that would otherwise fail later: placement, storage, data. Returns problems."""

    problems: list[str] = []
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    capacity = [{"cpu": n["Resources"].get("CPU", 0.0), "gpu": n["Resources"].get("GPU", 0.0)}
                for n in nodes]
    configs = _configs_to_check(sweep)
    seen = set()
    for cfg in configs:
        need = trial_resources(sweep, cfg)
        if not gpu_available:
            need["gpu"] = 0.0
        key = (need["cpu"], need["gpu"])
        if key in seen:
            continue
        seen.add(key)
        if not any(c["cpu"] >= need["cpu"] and c["gpu"] >= need["gpu"] for c in capacity):
            biggest = max(capacity, key=lambda c: (c["gpu"], c["cpu"]), default={"cpu": 0, "gpu": 0})
            problems.append(
                f"a trial of {cfg.model.arch} asks for {fmt(need['cpu'])} CPU and {fmt(need['gpu'])} "
                f"GPU, but no node has that much (largest: {fmt(biggest['cpu'])} CPU, "
                f"{fmt(biggest['gpu'])} GPU): it would wait PENDING forever. Lower `resources` "
                "or add nodes")
    problems += _check_storage(root, multi_node=len(nodes) > 1)
    from sweeper.data import DatasetUnavailable, load_splits

    checked = set()
    for cfg in configs:
        key = (cfg.data.name, cfg.data.dir, cfg.data.resolution)
        if key in checked:
            continue
        checked.add(key)
        try:
            load_splits(cfg.data, seed=cfg.seed)  # decodes once into the node's cache
        except DatasetUnavailable as exc:
            problems.append(str(exc))
    return problems


# ---- scheduler and searcher ---------------------------------------------------------------------------


class ExplainedASHA(ASHAScheduler):
    """ASHA that writes down, for every trial it stops, the rung, cutoff, peers and value."""

    def __init__(self, *, record_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.record_dir = record_dir

    def on_trial_result(self, tune_controller, trial, result):
        context = self._rung_context(trial, result)
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and context is not None:
            milestone, recorded = context
            raw_cutoff = self._trial_info[trial.trial_id].cutoff(recorded) if recorded else None
            SweepRecord(self.record_dir).append_decision({
                "trial_id": trial.trial_id,
                "rung": milestone,
                "epoch": result[self._time_attr],
                "metric": self._metric,
                "value": result[self._metric],
                "cutoff": None if raw_cutoff is None else float(self._metric_op * raw_cutoff),
                "peers": len(recorded),
                "reduction_factor": self._reduction_factor,
                "time": time.time(),
            })
        return action

    def _rung_context(self, trial, result):
        """(milestone, results recorded there before this trial) if this result meets a rung."""
        if self._time_attr not in result or self._metric not in result:
            return None
        cur_iter = result[self._time_attr]
        if cur_iter >= self._max_t:  # reaching the budget is finishing, not pruning
            return None
        bracket = self._trial_info.get(trial.trial_id)
        if bracket is None:
            return None
        for milestone, recorded in bracket._rungs:  # descending milestones
            if cur_iter < milestone or trial.trial_id in recorded:
                continue
            return milestone, dict(recorded)
        return None


def _make_scheduler(sweep: Sweep, record: SweepRecord):
    if sweep.scheduler == "fifo":
        return FIFOScheduler()
    # The trial's own epoch, not Tune's iteration count: the two part when a restore resumes a trial
    # from a newer checkpoint than Tune's state names (see sweeper.checkpoints).
    return ExplainedASHA(record_dir=str(record.experiment_dir), time_attr="epoch",
                         max_t=sweep.max_epochs, grace_period=sweep.grace_period,
                         reduction_factor=sweep.reduction_factor)


class PrunedAwareOptunaSearch(OptunaSearch):
    """Tune hands Optuna an ASHA-stopped trial as COMPLETE with its last value; it was pruned.

    Telling Optuna PRUNED, with the value it was stopped at as its last intermediate value, keeps TPE
    from treating a trial cut at epoch 3 as if it had converged there.
    """

    def on_trial_complete(self, trial_id, result=None, error=False):
        if (result and not error and result.get("outcome") == "running"
                and trial_id in self._ot_trials and trial_id not in self._completed_trials):
            try:
                ot_trial = self._ot_trials[trial_id]
                value, step = result.get(self.metric), result.get("epoch")
                if value is not None and step is not None:
                    # Tune withholds the stopping result from the searcher; without it a trial
                    # stopped at its first rung would reach Optuna with no value at all.
                    ot_trial.report(value, step)
                self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
            except Exception as exc:  # never let bookkeeping end a sweep
                error_console.print(f"warning: could not mark trial {trial_id} pruned: {exc}")
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)


def _make_searcher(sweep: Sweep):
    if sweep.search == "random":
        return BasicVariantGenerator(random_state=sweep.seed)
    return PrunedAwareOptunaSearch(
        metric=sweep.metric, mode=sweep.mode,
        sampler=optuna.samplers.TPESampler(
            seed=sweep.seed, n_startup_trials=min(10, max(2, sweep.num_samples // 3))))


# ---- the driver callback ------------------------------------------------------------------------------


def trial_label(config: Mapping[str, Any]) -> str:
    """A readable trial name: vgg16-normal-plain-lr0.012."""
    arch = config.get("model.arch", "model")
    if arch == "vgg" and config.get("model.depth"):
        arch = f"vgg{config['model.depth']}p"
    parts = [str(arch), str(config.get("model.init", "he"))]
    parts.append("bn" if config.get("model.batch_norm") else "plain")
    lr = config.get("optim.lr")
    if isinstance(lr, (int, float)):
        parts.append(f"lr{lr:.2g}")
    return "-".join(parts)


class SweepCallback(Callback):
    """Writes the sweep record and prints progress; runs in the driver."""

    def __init__(self, sweep: Sweep, record_dir: str, tracker: Tracker, *, quiet: bool,
                 planned: int, scheduler=None):
        self.sweep, self.record_dir, self.quiet, self.planned = sweep, record_dir, quiet, planned
        self.tracker = tracker
        # Tune checkpoints searchers but not schedulers: a restored ASHA would start with empty
        # rungs and judge resumed trials against nobody. Its rungs travel in this callback's state.
        # (tuner.pkl pickles scheduler and callbacks together, so this reference survives a restore.)
        self.scheduler = scheduler
        self.opened: set[str] = set()  # trials whose MLflow run was asked for by this driver
        self.started = time.time()
        self.last_print = 0.0
        self.epochs = 0
        self.best: tuple[float, str] | None = None
        self.states: dict[str, str] = {}

    def setup(self, **info):
        self.started, self.last_print = time.time(), 0.0  # a resumed sweep's clock starts now

    @property
    def _record(self) -> SweepRecord:
        return SweepRecord(self.record_dir)

    def get_state(self):
        state = {"epochs": self.epochs, "best": self.best, "states": self.states}
        if isinstance(self.scheduler, ASHAScheduler):
            # One dict, pickled at once: trial_info keeps pointing into these same brackets.
            state["asha"] = {"brackets": self.scheduler._brackets,
                             "trial_info": self.scheduler._trial_info,
                             "num_stopped": self.scheduler._num_stopped}
        return state

    def set_state(self, state):
        self.epochs = state["epochs"]
        self.best = tuple(state["best"]) if state["best"] else None
        self.states = dict(state["states"])
        if "asha" in state and isinstance(self.scheduler, ASHAScheduler):
            self.scheduler._brackets = state["asha"]["brackets"]
            self.scheduler._trial_info = state["asha"]["trial_info"]
            self.scheduler._num_stopped = state["asha"]["num_stopped"]

    def _base(self, trial) -> dict[str, Any]:
        existing = self._record.trial(trial.trial_id) or {}
        return {**existing, "trial_id": trial.trial_id, "name": trial_label(trial.config),
                "config": dict(trial.config), "created": existing.get("created", time.time()),
                "num_failures": trial.num_failures}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.states[trial.trial_id] = "running"
        self._record.write_trial(trial.trial_id, {**self._base(trial), "status": "running"})
        self._open_run(trial)

    def _open_run(self, trial) -> None:
        if trial.trial_id not in self.opened:  # found again by tag after a retry or restore
            self.tracker.start_trial(trial.trial_id, run_name=trial_label(trial.config),
                                     config=trial.config)
            self.opened.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._record.append_epoch(trial.trial_id, result)
        self._open_run(trial)
        self.tracker.log_result(trial.trial_id, result)
        self.tracker.flush()
        self.epochs += 1
        value = result.get(self.sweep.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            better = (self.best is None or (value > self.best[0] if self.sweep.mode == "max"
                                            else value < self.best[0]))
            if better:
                self.best = (float(value), trial_label(trial.config))
        rec = self._base(trial)
        rec.update(status="running", epochs=int(result.get("epoch", 0)),
                   last=scalar_metrics(result))
        rec["best"] = _best(rec.get("best"), scalar_metrics(result), self.sweep)
        self._record.write_trial(trial.trial_id, rec)
        self._progress(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, error=None)
        self._progress(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, error=_error_text(trial))
        self._progress(trials, force=True)

    def _finish(self, trial, *, error: str | None) -> None:
        rec = self._base(trial)
        last = trial.last_result or {}
        decision = self._record.decisions().get(trial.trial_id)
        if error is not None:
            outcome, reason = "failed", error
        elif last.get("outcome") not in (None, "running"):
            outcome, reason = last["outcome"], last.get("stop_reason")
        elif last.get("stalled") and last.get("stall_reason"):
            # Stopped by ASHA while at chance: the stall is the finding (its prune stays recorded).
            outcome, reason = "stalled", last["stall_reason"]
        elif decision is not None:
            outcome = "pruned"
            reason = (f"ASHA rung {decision['rung']}: {self.sweep.metric}="
                      f"{fmt(decision['value'])} below cutoff {fmt(decision['cutoff'])} "
                      f"of {decision['peers']} peers")
        else:
            outcome, reason = "stopped", "stopped before its budget (sweep interrupted?)"
        rec.update(status="finished", outcome=outcome, reason=reason, prune=decision,
                   epochs=int(last.get("epoch", rec.get("epochs", 0))), finished=time.time())
        if last:
            rec["last"] = scalar_metrics(last)
        self._record.write_trial(trial.trial_id, rec)
        self.states[trial.trial_id] = outcome
        self._open_run(trial)
        tags = {"sweeper.outcome": outcome, "sweeper.stop_reason": reason,
                "sweeper.epochs": rec["epochs"]}
        if outcome == "stalled":
            tags["sweeper.stall_reason"] = reason
        if decision is not None:
            tags.update({f"sweeper.prune.{k}": decision.get(k)
                         for k in ("rung", "cutoff", "peers", "value")})
        self.tracker.set_tags(trial.trial_id, tags)
        self.tracker.finish(trial.trial_id, "FAILED" if outcome == "failed" else "FINISHED")
        self.tracker.flush()
        if not self.quiet:
            style = {"completed": "green", "pruned": "cyan", "failed": "red",
                     "diverged": "red", "stalled": "yellow"}.get(outcome, "")
            console.print(f"  {trial_label(trial.config):<32} {outcome:<9} after "
                          f"{rec['epochs']:>3} epochs  {self.sweep.metric}="
                          f"{fmt(last.get(self.sweep.metric))}  {reason or ''}", style=style)

    def _progress(self, trials, force: bool = False) -> None:
        now = time.time()
        if self.quiet or (not force and now - self.last_print < 10):
            return
        self.last_print = now
        # Inside on_trial_complete Tune still shows the trial RUNNING: count our own outcomes.
        done = sum(1 for outcome in self.states.values() if outcome != "running")
        running = max(0, sum(1 for t in trials if t.status == "RUNNING") - (1 if force else 0))
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
    text = getattr(trial, "error_msg", None) or ""
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[-1][:500] if lines else "the trial raised (see its error file)"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ---- launch -------------------------------------------------------------------------------------------


def _connect(address: str | None, local: bool, num_cpus: int | None) -> None:
    if ray.is_initialized():
        return
    for key, value in _TUNE_ENV.items():
        os.environ.setdefault(key, value)
    # With the per-trial loggers off, Tune's ResultGrid finds no result.json and warns about every
    # trial; the sweep record holds those metrics.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    if local:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError([
            "no Ray cluster given: pass --address ADDR (or set RAY_ADDRESS) to use a cluster, or "
            "--local to start a fresh Ray on this machine"])
    ray.init(address=address, log_to_driver=False, configure_logging=False)


def launch(sweep: Sweep, file_text: str, *, address: str | None = None, local: bool = False,
           num_cpus: int | None = None, quiet: bool = False, overrides: Mapping[str, Any] = {},
           restore: bool = True, tracking_uri: str | None = None,
           tracking_wait_s: float = 120.0) -> LaunchResult:
    """Run (or resume) a sweep to the end, or until interrupted; return what happened."""
    from sweeper.provenance import provenance
    from sweeper.trial import train_trial

    root = storage_root(sweep.storage)
    exp_dir = experiment_dir(sweep.name, sweep.storage)
    record = record_for(sweep.name, sweep.storage)
    _connect(address, local, num_cpus)
    try:
        gpu_available = ray.cluster_resources().get("GPU", 0) > 0
        problems = preflight(sweep, root=root, gpu_available=gpu_available)
        if problems:
            raise ConfigError(problems)
        if not gpu_available and any(trial_resources(sweep, c)["gpu"] for c in
                                     _configs_to_check(sweep)):
            console.print("no GPU in this Ray cluster: trials run on CPUs "
                          "(GPU requests set to 0)", style="yellow")
        planned = trial_count(sweep)
        restored = restore and tune.Tuner.can_restore(exp_dir)
        if not restore and record.exists():
            raise ConfigError([f"sweep {sweep.name!r} already exists in {exp_dir}: launch without "
                               "--fresh to resume it, or pick another --name"])
        if not record.exists():
            record.create({"sweep_uid": uuid.uuid4().hex,"name": sweep.name, "question": sweep.question, "metric": sweep.metric,
                           "mode": sweep.mode, "max_epochs": sweep.max_epochs,
                           "scheduler": sweep.scheduler, "search": sweep.search,
                           "num_samples": sweep.num_samples, "planned_trials": planned,
                           "grace_period": sweep.grace_period,
                           "reduction_factor": sweep.reduction_factor, "seed": sweep.seed,
                           "space": {k: repr(v) for k, v in sweep.space.items()},
                           "overrides": dict(overrides), "experiment_dir": exp_dir,
                           "created": time.time(), **provenance()}, file_text)
        record.claim_driver()
        meta = record.meta()
        tracker = Tracker(record.dir, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                          or default_tracking_uri(record_root(sweep.storage)),
                          experiment=sweep.name, sweep_uid=meta["sweep_uid"])
        record.update_meta(tracking_uri=redact(tracker.tracking_uri))
        tracker.start_sweep(
            run_name=f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(meta['created']))}",
            tags={"sweeper.sweep": sweep.name, "sweeper.git_sha": meta.get("git_sha"),
                  "sweeper.git_dirty": meta.get("git_dirty"), "sweeper.command": meta.get("command"),
                  "mlflow.note.content": sweep.question},
            params={"metric": sweep.metric, "mode": sweep.mode, "max_epochs": sweep.max_epochs,
                    "scheduler": sweep.scheduler, "search": sweep.search,
                    "num_samples": sweep.num_samples, "planned_trials": planned,
                    "grace_period": sweep.grace_period, "reduction_factor": sweep.reduction_factor,
                    "seed": sweep.seed, **{f"override.{k}": v for k, v in overrides.items()}},
            texts={"sweep_file.py": file_text,
                   "plan.json": json.dumps({"cells": grid_cells(sweep),
                                            "space": {k: repr(v) for k, v in sweep.space.items()},
                                            "planned_trials": planned}, indent=1, default=str)})
        tracker.flush()

        def resources(config: dict[str, Any]) -> dict[str, float]:
            need = trial_resources(sweep, TrialConfig.from_flat(config))
            return {"cpu": need["cpu"], "gpu": need["gpu"] if gpu_available else 0.0}

        trainable = tune.with_resources(train_trial, resources)
        param_space = _param_space(sweep)
        scheduler = _make_scheduler(sweep, record)
        callback = SweepCallback(sweep, str(record.experiment_dir), tracker, quiet=quiet,
                                 planned=planned, scheduler=scheduler)
        if restored:
            console.print(f"resuming sweep {sweep.name!r} from {exp_dir}")
            for fix in repair_restorable_checkpoints(exp_dir):
                if fix.moved_from:
                    console.print(f"  {fix.trial_dir}: {fix.restored} was pruned before Ray's state "
                                  f"named its successor; resuming from {fix.moved_from}",
                                  style="yellow")
                if fix.rerun:
                    console.print(f"  {fix.trial_dir}: removed {', '.join(fix.rerun)}, saved after "
                                  f"the state Ray resumes from; those epochs run again",
                                  style="yellow")
            tuner = tune.Tuner.restore(exp_dir, trainable=trainable, param_space=param_space,
                                       resume_errored=True)
        else:
            console.print(f"starting sweep {sweep.name!r}: {planned} trials, "
                          f"max {sweep.max_epochs} epochs each -> {exp_dir}")
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=sweep.metric, mode=sweep.mode,
                    scheduler=scheduler,
                    search_alg=_make_searcher(sweep),
                    num_samples=sweep.num_samples,
                    max_concurrent_trials=sweep.max_concurrent,
                    trial_name_creator=lambda t: trial_label(t.config),
                    trial_dirname_creator=lambda t: f"{trial_label(t.config)}-{t.trial_id}",
                ),
                run_config=tune.RunConfig(
                    name=sweep.name, storage_path=root, verbose=0,
                    callbacks=[callback],
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=sweep.keep_checkpoints),
                    failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                ),
            )
        tuner.fit()
    finally:
        record.release_driver()
        if ray.is_initialized() and local:
            ray.shutdown()
    result = _summarise(sweep, record, exp_dir, restored=restored)
    _finish_tracking(sweep, record, tracker, result, wait_s=tracking_wait_s, quiet=quiet)
    result.undelivered = tracker.pending()
    result.tracking_error = tracker.last_error()
    return result


def _finish_tracking(sweep: Sweep, record: SweepRecord, tracker: Tracker, result: LaunchResult,
                     *, wait_s: float, quiet: bool) -> None:
    """The study report on the parent run, the summary tags, and a last delivery attempt."""
    report_dir = record.dir / "report"
    try:
        from sweeper.report import build_report

        build_report(record, report_dir)
        tracker.log_artifacts(None, report_dir, "report")
    except Exception as exc:  # a report problem must not lose the sweep's tracking
        error_console.print(f"warning: the study report failed: {type(exc).__name__}: {exc}")
    tracker.set_tags(None, {"sweeper.outcomes": json.dumps(result.outcomes),
                            "sweeper.trials": result.trials, "sweeper.epochs": result.epochs,
                            "sweeper.best_trial": result.best["name"] if result.best else None})
    if not result.interrupted:
        tracker.finish(None, "FINISHED")
    if not tracker.flush_until(wait_s) and not quiet:
        error_console.print(f"[yellow]{tracker.pending()} tracking operation(s) not delivered "
                            f"({tracker.last_error()}); run `sweeper sync {sweep.name}` when the "
                            "tracking server is back[/yellow]")


def _param_space(sweep: Sweep) -> dict[str, Any]:
    from sweeper.spaces import base_config

    return base_config(sweep, dict(sweep.space))


def _summarise(sweep: Sweep, record: SweepRecord, exp_dir: str, *, restored: bool) -> LaunchResult:
    trials = record.trials()
    outcomes: dict[str, int] = {}
    for t in trials:
        outcome = t.get("outcome") or t.get("status", "unknown")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    finished = [t for t in trials if t.get("best")]
    best = None
    if finished:
        sign = 1 if sweep.mode == "max" else -1
        best = max(finished, key=lambda t: sign * t["best"][sweep.metric])
    return LaunchResult(name=sweep.name, experiment_dir=exp_dir, outcomes=outcomes,
                        trials=len(trials), epochs=sum(int(t.get("epochs", 0)) for t in trials),
                        restored=restored, best=best,
                        interrupted=sum(1 for t in trials if t.get("status") == "finished")
                        < trial_count(sweep))


# ---- stop ---------------------------------------------------------------------------------------------


def stop_sweep(name: str, storage: str | None) -> str:
    """Ask the driver of a running sweep to save its state and exit (it stays resumable)."""
    import socket

    record = record_for(name, storage)
    if not record.exists():
        raise ConfigError([f"no sweep named {name!r} under {storage_root(storage)}"])
    driver = record.driver()
    if driver is None:
        return f"sweep {name!r} is not running"
    if driver["host"] != socket.gethostname():
        raise ConfigError([f"sweep {name!r} is driven from host {driver['host']!r} "
                           f"(pid {driver['pid']}); run `sweeper stop` there"])
    try:
        # Tune treats SIGINT as "save the experiment state and stop": a later launch resumes it.
        os.kill(int(driver["pid"]), signal.SIGINT)
    except ProcessLookupError:
        record.release_driver()
        return f"sweep {name!r} is not running (its driver {driver['pid']} is gone)"
    return f"asked sweep {name!r} (pid {driver['pid']}) to save its state and stop"
