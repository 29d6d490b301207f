"""The only module that configures Ray: a validated Sweep in, a Ray Tune run out.

``launch`` checks what needs no cluster before Ray starts, takes the sweep's driver lease, connects
to a cluster (``--address`` / ``RAY_ADDRESS``) or starts a fresh local one (``address="local"``: never
a stale cluster), runs the checks that need it, then restores the sweep if its experiment exists
(restore-or-start) or builds a new ``Tuner``: the scheduler and searcher from
:mod:`sweeper.schedulers` (ASHA per grid cell on epochs, or FIFO; random/grid or Optuna TPE), per-trial
resources (possibly a function of the config), checkpoints every epoch, retries from the last one, and
reused worker processes. The checks themselves live in :mod:`sweeper.preflight`; this module orders them.

Driver-side bookkeeping lives in :mod:`sweeper.callback` (the sweep record, progress, outcomes) and
:mod:`sweeper.lease` (one driver per sweep); tracking in :mod:`sweeper.tracking`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import ray
from ray import tune

from sweeper.callback import SweepCallback, trial_label
from sweeper.local import end_interrupted_runs, mark_stopped
from sweeper.checkpoints import repair_restorable_checkpoints, tune_state_problems
from sweeper.driver import activate
from sweeper.interrupts import SigtermStops, StopNotice, ray_children
from sweeper.config import ConfigError, TrialConfig
from sweeper.console import console, error_console
from sweeper.outcomes import OUTCOMES
from sweeper.preflight import _check_reachable, _check_space_unchanged, _configs_to_check, _dirs_to_create, \
    _machine_problems, _probe_storage, _refuse_a_second_sweep_of_the_name, _refuse_ray_client, \
    _remove_created, check_launch_options, default_store_problems, dry_run_problems, preflight, \
    sweep_path_problems
from sweeper.records import SweepRecord
from sweeper.schedulers import make_scheduler, make_searcher
from sweeper.spaces import Sweep, grid_cells, trial_count, trial_resources
# The storage helpers live in sweeper.store (readers -- status, report, export, ui -- run without Ray).
from sweeper.store import DEFAULT_STORAGE, cluster_flag, index_remember, join_uri, open_sweep_record, \
    redacted_root, storage_root
from sweeper.tracking import Tracker, is_default_tracking_uri, launch_tracking_uri, moved_store, redact

__all__ = ["DEFAULT_STORAGE", "LaunchResult", "check_plan", "experiment_dir", "launch"]

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
    storage: str | None = None  # as the sweep gave it (None: ./sweeps)
    outcomes: dict[str, int] = field(default_factory=dict)
    trials: int = 0  # started (the record's)
    planned: int = 0  # the sweep's trial count
    epochs: int = 0
    restored: bool = False
    interrupted: bool = False
    best: dict[str, Any] | None = None
    undelivered: int = 0  # tracking operations still in the spool
    tracking_error: str | None = None
    cluster: str | None = None  # the Ray it used, as `resume` takes it (store.cluster_flag)


# ---- storage ------------------------------------------------------------------------------------------


def experiment_dir(name: str, storage: str | None) -> str:
    return join_uri(storage_root(storage), name)


# ---- launch -------------------------------------------------------------------------------------------


class _NoTuneRestoreHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


def _connect(address: str | None, local: bool, num_cpus: int | None) -> str | None:
    """Start a fresh local Ray or join a cluster; the local session directory (None for a cluster)."""
    if ray.is_initialized():
        return None
    for key, value in _TUNE_ENV.items():
        os.environ.setdefault(key, value)
    # With the per-trial loggers off, Tune's ResultGrid finds no result.json and warns about every
    # trial; the sweep record holds those metrics.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # Ray's "token authentication is enabled" notice would stand above our own first line; the
    # README says how auth works.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    # On an interrupt Tune logs "Resume experiment with: Tuner.restore(path=..., trainable=...)":
    # not a command a sweeper user can run, beside sweeper's own `sweeper resume` hint. Only that
    # record is dropped (ray 2.60 tune/tune.py; tests/test_reliability.py's stop test fails if the
    # wording moves and it shows again).
    tune_log = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _NoTuneRestoreHint) for f in tune_log.filters):
        tune_log.addFilter(_NoTuneRestoreHint())
    if local:
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                           log_to_driver=False, configure_logging=False)
        return context.address_info.get("session_dir")
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except Exception as exc:  # noqa: BLE001 - Ray raises RuntimeError, AuthenticationError or
        # ConnectionError here, depending on where the token was found wanting
        text = str(exc)
        if isinstance(exc, ConnectionError):
            # Ray's own retries said why on stderr; a wrong token and a wrong address end alike,
            # except that a HOST:PORT address has just answered (preflight._check_reachable).
            source = _token_source()
            fix = ("the cluster's is the head node's ~/.ray/auth_token: give this machine that one "
                   "(~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)")
            if address and address != "auto" and source:
                raise ConfigError([
                    f"could not connect to the Ray cluster at {address!r}: it answered at that "
                    f"address, so it most likely refused the authentication token this machine "
                    f"presented ({source}); {fix}"]) from None
            raise ConfigError([
                f"could not connect to the Ray cluster at {address!r}: it is not reachable from "
                f"here, or it refused this machine's authentication token "
                f"({source or 'none found'}); {fix}"]) from None
        if not any(word in text for word in ("token", "Unauthenticated", "InvalidAuthToken")):
            raise
        if _token_source() is not None:
            raise ConfigError([
                f"the Ray cluster at {address!r} refused this machine's authentication token: "
                "it is not the cluster's. Copy the head node's ~/.ray/auth_token to this "
                "machine's ~/.ray/auth_token, or set RAY_AUTH_TOKEN to it"]) from None
        raise ConfigError([
            f"the Ray cluster at {address!r} needs its authentication token, and this machine "
            "has none: copy the head node's ~/.ray/auth_token to this machine's ~/.ray/, or "
            "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)"]) from None
    return None


def _token_source() -> str | None:
    """Where Ray takes this machine's token from, in Ray's order (ray/_private/authentication,
    2.60): the RAY_AUTH_TOKEN variable, the file RAY_AUTH_TOKEN_PATH names, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN variable"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = os.environ["RAY_AUTH_TOKEN_PATH"]
        return f"RAY_AUTH_TOKEN_PATH={path}" if os.path.isfile(path) else None
    path = os.path.expanduser("~/.ray/auth_token")
    return path if os.path.isfile(path) else None


def _running_message(name: str, info) -> str:
    return (f"sweep {name!r} is already running (driver {info.describe()}): one driver per sweep. "
            f"`sweeper stop {name}` stops it; `sweeper status {name}` shows it")


def check_plan(sweep: Sweep, *, local: bool, num_cpus: int | None, address: str | None,
               restore: bool) -> int | None:
    """``launch --dry-run``: what the launch would refuse before Ray starts, starting and leaving
    nothing (the dry run printed plans for a changed space under an existing name, a sweep already
    running, a name that lives in another storage, no cluster given). Returns the number of trials
    the sweep already records when the launch would resume it, else None."""
    record, _ = open_sweep_record(sweep.name, sweep.storage)
    _prepare(sweep, record, local=local, num_cpus=num_cpus, restore=restore, address=address,
             dry_run=True)
    return len(record.trials()) if record.exists() else None


def _prepare(sweep: Sweep, record: SweepRecord, *, local: bool, num_cpus: int | None,
             restore: bool, address: str | None = None, dry_run: bool = False) -> None:
    """Every check that needs no cluster, before Ray starts: bad input exits with nothing started.
    ``dry_run``: the same, but weight files are not read (a study is planned before its source
    runs), a live driver is refused here rather than by its lease, and nothing is left behind."""
    # A dry run without --local or --address plans the sweep wherever it will run: only a cluster it
    # names is checked.
    if not local and (address or os.environ.get("RAY_ADDRESS") or not dry_run):
        if not (address or os.environ.get("RAY_ADDRESS")):
            raise ConfigError([
                "no Ray cluster given: pass --address ADDR (or set RAY_ADDRESS) to use a cluster, "
                "or --local to start a fresh Ray on this machine"])
        _refuse_ray_client(address)
        _check_reachable(address)
    root = storage_root(sweep.storage)
    if record.exists():
        if sweep.storage is None:
            # ./sweeps holds the name, and so may the storage this machine last launched it on: the
            # launch would resume one of two sweeps by guess (and point the index away from the
            # other); resume, status and report ask for --storage there, and so does this.
            from sweeper.local import resolve_storage

            resolve_storage(sweep.name, None)
        if not restore:
            raise ConfigError([f"sweep {sweep.name!r} already exists in "
                               f"{experiment_dir(sweep.name, sweep.storage)}: launch without "
                               "--fresh to resume it, or pick another --name"])
        _check_space_unchanged(sweep, record)
        from sweeper.lease import read_lease

        info = read_lease(record.dir)
        if info is not None and info.alive:
            # Running: Tune's state may not be written yet. The launch's lease refuses it anyway.
            if dry_run:
                raise ConfigError([_running_message(sweep.name, info)])
        else:
            _check_tune_state(sweep, record)
    elif sweep.storage is None:  # before the storage probe below makes ./sweeps
        _refuse_a_second_sweep_of_the_name(sweep.name, root)
    if dry_run:
        problems = dry_run_problems(sweep, local=local, num_cpus=num_cpus)
        if problems:
            raise ConfigError(problems)
        return
    from sweeper.transfer import source_problems

    sources = source_problems(sweep)  # model.pretrained / init_from: readable here, fitting their models
    if sources and not local:
        raise ConfigError(sources)
    if local:  # the cluster is this machine: nothing needs it to have started
        problems = _machine_problems(sweep, num_cpus) + _probe_storage(root) + sources
        if problems:
            raise ConfigError(problems)


def _check_tune_state(sweep: Sweep, record: SweepRecord) -> None:
    """A sweep that records trials resumes from Ray Tune's saved state, or not at all: with that
    state gone a launch started every trial again beside the recorded ones (duplicate rows in
    status, export and the report), and with it damaged Ray failed with a traceback once started."""
    trials = record.trials()
    if not trials:  # nothing ran yet: starting afresh loses and repeats nothing
        return
    exp_dir = experiment_dir(sweep.name, sweep.storage)
    problems = tune_state_problems(exp_dir)
    if problems:
        raise ConfigError([
            f"sweep {sweep.name!r} records {len(trials)} trial(s), but Ray Tune's saved state in "
            f"{redacted_root(exp_dir)} cannot resume it: {'; '.join(problems)}. Put those files back "
            "to resume the sweep, or launch it under another --name to start over (this record "
            f"stays readable by status, export and report), or remove {redacted_root(exp_dir)} to "
            "start this name afresh"])


def launch(sweep: Sweep, file_text: str, *, address: str | None = None, local: bool = False,
           num_cpus: int | None = None, quiet: bool = False, overrides: Mapping[str, Any] = {},
           restore: bool = True, tracking_uri: str | None = None,
           tracking_wait_s: float = 120.0) -> LaunchResult:
    """Run (or resume) a sweep to the end, or until interrupted; return what happened.

    Order matters: checks that need no cluster run before Ray starts; the driver lease is taken
    before connecting (a second driver is refused without touching the cluster); checks that need
    the cluster run right after connecting, and a failure there shuts Ray down and removes what
    this launch created.
    """
    from sweeper.lease import DriverLease, LeaseHeld, clean_orphans
    from sweeper.provenance import provenance
    from sweeper.spaces import space_signature
    from sweeper.trial import train_trial
    from sweeper.transfer import resolve_sweep

    check_launch_options(address=address, local=local, num_cpus=num_cpus, tracking_uri=tracking_uri)
    # model.init_from='sweep:NAME/REF' -> that trial's checkpoint location, in the trials' configs
    # (and so in their params): resolved once, here, so that every node reads the same checkpoint.
    sweep, resolved = resolve_sweep(sweep)
    for line in resolved if not quiet else ():
        console.print(line)
    root = storage_root(sweep.storage)
    exp_dir = experiment_dir(sweep.name, sweep.storage)
    taken = sweep_path_problems(root, sweep.name) + default_store_problems(sweep.storage, tracking_uri)
    if taken:
        raise ConfigError(taken)
    record, mirror = open_sweep_record(sweep.name, sweep.storage)
    _prepare(sweep, record, local=local, num_cpus=num_cpus, restore=restore, address=address)

    created = _dirs_to_create(record.dir)
    lease = DriverLease(record.dir, mirrored=mirror is not None)
    try:
        lease.claim()
    except LeaseHeld as held:
        raise ConfigError([_running_message(sweep.name, held.info)]) from None
    started = False
    sigterm = SigtermStops()  # SIGTERM stops the sweep as Ctrl-C does (sweeper.interrupts)
    try:  # from here on, a failure undoes what this launch started and created
        if lease.previous is not None and lease.previous.runs_the_original:
            console.print(f"this folder is a copy of {Path(lease.previous.copied_from).parent}: "
                          f"its lease names the driver running there ({lease.previous.describe()}), "
                          "which does not run this copy: taking it over", style="yellow")
        elif lease.previous is not None:
            ended = clean_orphans(lease.previous)
            console.print(f"the previous driver of {sweep.name!r} ({lease.previous.describe()}) "
                          "died without releasing the sweep: taking it over"
                          + (f"; ended {len(ended)} process(es) its Ray left behind" if ended
                             else ""), style="yellow")
        try:
            session = _connect(address, local, num_cpus)
        except SystemExit as exc:  # ray.init's own SIGTERM handler while it starts: sys.exit(15)
            if exc.code != signal.SIGTERM:
                raise
            raise KeyboardInterrupt from None
        # Ray's handlers, installed while it connected, are replaced from here on.
        sigterm.install(ray_children() if local else ())
        lease.set_session_dir(session)
        gpu_available = ray.cluster_resources().get("GPU", 0) > 0
        problems = preflight(sweep, root=root, gpu_available=gpu_available, local=local)
        if problems:
            raise ConfigError(problems)
        started = True
    finally:
        if not started:
            sigterm.uninstall()
            lease.release()
            if ray.is_initialized():
                ray.shutdown()
            _remove_created(created)
    index_remember(sweep.name, root)
    if mirror is not None:  # the record goes to the storage from now on, heartbeat included
        mirror.start()
    sigterm.first.append(lease.release)
    if mirror is not None:
        sigterm.then.append(mirror.stop)  # last: the released lease reaches the storage
    notice = StopNotice(lease, sigterm)
    logging.getLogger("ray.tune.tune").addFilter(notice)
    try:
        return _run(sweep, file_text, record=record, root=root, exp_dir=exp_dir, local=local,
                    cluster=cluster_flag(local, address, num_cpus),
                    quiet=quiet, overrides=overrides, restore=restore, tracking_uri=tracking_uri,
                    tracking_wait_s=tracking_wait_s, gpu_available=gpu_available,
                    signature=space_signature(sweep), provenance=provenance,
                    trainable_fn=train_trial, lease=lease, sigterm=sigterm)
    except KeyboardInterrupt:
        # A second Ctrl-C or SIGTERM: no waiting, but the record and the runs say what happened
        # (the spool keeps the runs' ends for `sweeper sync`), and the resume command is given.
        if sigterm.cut_short is not None:
            sigterm.cut_short(False)
        raise
    finally:
        sigterm.uninstall()
        logging.getLogger("ray.tune.tune").removeFilter(notice)
        lease.release()
        if mirror is not None:
            mirror.stop()  # the last push: the released lease disappears from the storage too
        if ray.is_initialized() and local:
            ray.shutdown()


def _run(sweep: Sweep, file_text: str, *, record: SweepRecord, root: str, exp_dir: str, local: bool,
         cluster: str | None,
         quiet: bool, overrides: Mapping[str, Any], restore: bool, tracking_uri: str | None,
         tracking_wait_s: float, gpu_available: bool, signature: dict[str, str], provenance,
         trainable_fn, lease, sigterm: SigtermStops | None = None) -> LaunchResult:
    if not gpu_available and sweep.resources != "auto" and any(
            trial_resources(sweep, c)["gpu"] for c in _configs_to_check(sweep)):
        console.print("no GPU in this Ray cluster: trials run on CPUs "
                      "(GPU requests set to 0)", style="yellow")
    planned = trial_count(sweep)
    restored = restore and tune.Tuner.can_restore(exp_dir)
    if not record.exists():
        record.create({"sweep_uid": uuid.uuid4().hex, "name": sweep.name,
                       "question": sweep.question, "metric": sweep.metric,
                       "mode": sweep.mode, "max_epochs": sweep.max_epochs,
                       "scheduler": sweep.scheduler, "search": sweep.search,
                       "num_samples": sweep.num_samples, "seeds": sweep.seeds,
                       "planned_trials": planned, "grace_period": sweep.grace_period,
                       "prune_within": sweep.prune_within,
                       "reduction_factor": sweep.reduction_factor, "seed": sweep.seed,
                       "space": signature, "signature": signature,
                       "overrides": dict(overrides), "experiment_dir": exp_dir,
                       "created": time.time(), **provenance()}, file_text)
    meta = record.meta()
    uri, switched = launch_tracking_uri(meta, sweep.storage,
                                        tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    if switched:
        console.print(switched, style="yellow")
    tracker = Tracker(record.dir, uri, experiment=sweep.name, sweep_uid=meta["sweep_uid"])
    tracker.moved_from = moved_store(meta, sweep.storage, tracker.tracking_uri)
    record.update_meta(tracking_uri=redact(_absolute(tracker.tracking_uri)), cluster=cluster,
                       tracking_default=is_default_tracking_uri(tracker.tracking_uri, sweep.storage))
    if tracker.tracking_uri.startswith("sqlite:") and (not local or "://" in root):
        # A cluster sweep, or one whose record lives on a URI: its runs are on this machine only.
        console.print(f"MLflow runs go to the embedded store {tracker.tracking_uri} on this machine "
                      "(`sweeper ui` serves it); pass --tracking-uri http://HOST:5000 to share them",
                      style="yellow")
    tracker.start_sweep(
        run_name=f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(meta['created']))}",
        tags={k: v for k, v in {  # an unknown value is left out, not tagged 'None'
            "sweeper.sweep": sweep.name, "sweeper.git_sha": meta.get("git_sha"),
            "sweeper.git_dirty": meta.get("git_dirty"), "sweeper.git_repo": meta.get("git_repo"),
            "sweeper.command": meta.get("command"), "mlflow.note.content": sweep.question}.items()
            if v is not None},
        params={"metric": sweep.metric, "mode": sweep.mode, "max_epochs": sweep.max_epochs,
                "scheduler": sweep.scheduler, "search": sweep.search,
                "num_samples": sweep.num_samples, "seeds": sweep.seeds,
                "planned_trials": planned, "prune_within": sweep.prune_within,
                "grace_period": sweep.grace_period, "reduction_factor": sweep.reduction_factor,
                "seed": sweep.seed, **{f"override.{k}": v for k, v in overrides.items()}},
        texts={"sweep_file.py": file_text,
               "plan.json": json.dumps({"cells": grid_cells(sweep), "space": signature,
                                        "planned_trials": planned}, indent=1, default=str)})
    tracker.flush()

    plan = _packing_plan(sweep) if sweep.resources == "auto" and gpu_available else None

    def resources(config: dict[str, Any]) -> dict[str, float]:
        need = trial_resources(sweep, TrialConfig.from_flat(config))
        gpu = need["gpu"] if gpu_available else 0.0
        if plan is not None:  # measured once per config shape, then from the cache
            gpu = plan.fraction(config)
        return {"cpu": need["cpu"], "gpu": gpu}

    # The metric and its mode travel with the trainable: a diverged trial reports the worst value.
    trainable = tune.with_resources(
        tune.with_parameters(trainable_fn, metric=sweep.metric, mode=sweep.mode), resources)
    param_space = _param_space(sweep)
    scheduler = make_scheduler(sweep, str(record.experiment_dir), cell_keys=_cell_keys(sweep))
    callback = SweepCallback(sweep, str(record.experiment_dir), tracker, quiet=quiet,
                             planned=planned)
    if restored:
        console.print(f"resuming sweep {sweep.name!r} from {exp_dir}")
        for fix in repair_restorable_checkpoints(exp_dir):
            if fix.restarted:
                console.print(f"  {fix.trial_dir}: its checkpoint {fix.restored} is missing from "
                              "storage and nothing newer exists: the trial starts again from "
                              "scratch", style="yellow")
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
                      f"max {sweep.max_epochs} epochs each -> {redacted_root(exp_dir)}")
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode,
                scheduler=scheduler,
                search_alg=make_searcher(sweep),
                num_samples=planned,  # trial_count: one sample per launch_order point
                # Optuna's searcher is capped by Tune (a ConcurrencyLimiter); random/grid search by
                # its BasicVariantGenerator (make_searcher), which Tune would not cap.
                max_concurrent_trials=sweep.max_concurrent if sweep.search != "random" else None,
                # A finished trial's worker process trains the next one: no fresh interpreter,
                # torch import and dataset load per trial (short trials were paying seconds each).
                reuse_actors=True,
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
    activate(tracker=tracker, quiet=quiet, record_dir=str(record.experiment_dir))
    if sigterm is not None:
        sigterm.cut_short = _end_cut_short(sweep, record, tracker, cluster)
        sigterm.then.insert(0, lambda: (tracker.close(timeout=2.0), tracker.flush_until(5.0)))
    try:
        tuner.fit()
    finally:
        if sigterm is not None:
            sigterm.fit_over()
        activate()
        tracker.close()  # the last delivery below is synchronous
        try:  # what an interruption cut off (nothing, after a whole run); even if fit raised
            mark_stopped(record, tracker)
        except OSError as exc:  # never hide why fit ended
            error_console.print(f"warning: could not label the unfinished trials stopped: {exc}")
    if local:
        ray.shutdown()  # the report and the last tracking delivery need no cluster
        if sigterm is not None:
            sigterm.reinstall()
    result = _summarise(sweep, record, exp_dir, restored=restored)
    result.cluster = cluster
    # After a SIGTERM the last delivery waits seconds, not minutes (a SIGKILL follows); the sweep
    # counts as interrupted only if trials were left unfinished (a SIGTERM at its very end is not).
    hurry = sigterm is not None and sigterm.hurry
    result.interrupted = result.interrupted or lease.stop_requested
    _finish_tracking(sweep, record, tracker, result, quiet=quiet,
                     wait_s=min(tracking_wait_s, 5.0) if hurry else tracking_wait_s)
    result.undelivered = tracker.pending()
    result.tracking_error = tracker.last_error()
    return result


def _absolute(uri: str) -> str:
    """A relative ``sqlite:///x.db`` as its absolute path: the record is read from other working
    directories (a resume there would have made another store and split the runs)."""
    from sweeper.tracking import _sqlite_path

    db = _sqlite_path(uri)
    return f"sqlite:///{db.resolve()}" if db is not None and not db.is_absolute() else uri


def _end_cut_short(sweep: Sweep, record: SweepRecord, tracker: Tracker,
                   cluster: str | None) -> Callable[[bool], None]:
    """How a launch cut short ends (a second Ctrl-C or SIGTERM; a SIGTERM that also ended the local
    Ray, see sweeper.interrupts): the trials it was running labelled stopped, their runs' and the
    sweep's ends and its summary spooled, as ``sweeper sync`` ends a dead driver's, and the resume
    command; ``delivering``: the caller delivers the spool next (else `sweeper sync` will)."""
    from sweeper.store import resume_command

    def end(delivering: bool) -> None:
        end_interrupted_runs(record, tracker)
        summary = _summarise(sweep, record, "", restored=False)
        _log_summary(sweep, tracker, summary)
        sync = resume_command(sweep.name, sweep.storage, verb="sync")
        # All of them: after a second Ctrl-C, the interrupted fit's own cleanup labelled them first.
        stopped = summary.outcomes.get("stopped", 0)
        console.print(f"{stopped} trial(s) labelled stopped; the sweep resumes from Ray's last "
                      f"saved state: {resume_command(sweep.name, sweep.storage, cluster=cluster)} "
                      "(or the same launch "
                      "command) continues it" + ("" if delivering else f"; {sync} delivers its "
                                                 "tracking"), style="yellow")

    return end


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
    _log_summary(sweep, tracker, result)
    # Interrupted: KILLED, as its stopped trials' runs; a resume makes it RUNNING again.
    tracker.finish(None, "KILLED" if result.interrupted else "FINISHED")
    if not tracker.flush_until(wait_s) and not quiet:
        from sweeper.store import resume_command

        sync = resume_command(sweep.name, sweep.storage, verb="sync")
        error_console.print(f"[yellow]{tracker.pending()} tracking operation(s) not delivered "
                            f"({tracker.last_error()}); run {sync} when the tracking server is "
                            "back[/yellow]")


def _log_summary(sweep: Sweep, tracker: Tracker, result: LaunchResult) -> None:
    """The sweep's run: its outcome counts, trials, epochs and best as tags and metrics."""
    tracker.set_tags(None, {"sweeper.outcomes": json.dumps(result.outcomes),
                            "sweeper.trials": result.trials, "sweeper.epochs": result.epochs,
                            "sweeper.best_trial": result.best["name"] if result.best else None,
                            # The parent's description: the question, and where the answer is.
                            "mlflow.note.content": (
                                f"{sweep.question}\n\n**Study report:** this run's artifacts, "
                                "report/report.html (also report/summary.md); each trial's "
                                "description is its one-line diagnosis and profile.png its "
                                "per-layer profile.")})
    # Summary metrics on the parent, so the sweep's run shows its result in the runs table: the same
    # counts as the sweeper.outcome tags of its children.
    # Every outcome, zeros included: a count that fell to zero since the last launch (a stopped
    # trial that has finished since) must not keep its old value as the latest one.
    summary = {f"trials_{k}": 0.0 for k in (*OUTCOMES, "running")}
    summary.update({f"trials_{k}": float(n) for k, n in result.outcomes.items()})
    summary.update(trials=float(result.trials), epochs_run=float(result.epochs))
    if result.best:
        summary[f"best_{sweep.metric}"] = float(result.best["best"][sweep.metric])
    tracker.log_parent_metrics(summary)


def _packing_plan(sweep: Sweep):
    """resources='auto': measure a training step's memory where the trials' GPUs are; print the plan.

    The probe is a one-GPU Ray task whose worker exits after it (max_calls=1), so no process keeps a
    CUDA context on a GPU the trials are packed onto; the launch runs before trials hold the GPUs.
    """
    from sweeper.packing import PackingPlan, measure_peak_bytes
    from sweeper.spaces import base_config, sample_config

    probe = ray.remote(num_gpus=1, num_cpus=1, max_calls=1)(measure_peak_bytes)
    first_flat = base_config(sweep, sample_config(sweep))
    first = ray.get(probe.remote(first_flat))
    plan = PackingPlan(first["device_name"], first["total_bytes"],
                       lambda flat: ray.get(probe.remote(flat)))
    plan.remember(first_flat, first)
    sampled = sample_config(sweep)
    shown = set()
    for cell in grid_cells(sweep):
        flat = {**sampled, **base_config(sweep, cell)}
        line = plan.describe(flat)
        if line not in shown:
            shown.add(line)
            console.print(f"packing: {line}")
    return plan


def _cell_keys(sweep: Sweep) -> list[str]:
    """The grid axes ASHA compares within (none: one comparison across the sweep)."""
    if getattr(sweep, "prune_within", "cell") != "cell":
        return []
    cells = grid_cells(sweep)
    return list(cells[0]) if cells and cells[0] else []


def _param_space(sweep: Sweep) -> dict[str, Any]:
    from sweeper.spaces import base_config, run_space

    return base_config(sweep, run_space(sweep))


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
    return LaunchResult(name=sweep.name, experiment_dir=exp_dir, storage=sweep.storage, outcomes=outcomes,
                        trials=len(trials), planned=trial_count(sweep),
                        epochs=sum(int(t.get("epochs", 0)) for t in trials),
                        restored=restored, best=best,
                        interrupted=sum(1 for t in trials if t.get("status") == "finished")
                        < trial_count(sweep))
