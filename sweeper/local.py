"""What runs on this machine without Ray: ``sweeper debug`` (one trial), ``validate``, and the commands
that read or mend a sweep's record (``status``, ``stop``, ``sync``, ``ui``), so that a laptop with
MLflow and no Ray reaches a sweep on shared storage."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Sequence

from sweeper.config import ConfigError, TrialConfig, file_in_the_way
from sweeper.console import EpochPrinter, config_table, console, error_console, fmt
from sweeper.records import SweepRecord

__all__ = ["STOPPED_REASON", "debug_config", "end_interrupted_runs", "mark_stopped", "run_debug", "validate_files"]


def debug_config(file: Path | None, overrides: Sequence[str], *, sample: int = 0,
                 epochs: int | None = None, device: str | None = None) -> TrialConfig:
    """The trial config ``sweeper debug`` runs: a sample of the file's space, or settings alone."""
    return _debug_sweep_and_config(file, overrides, sample=sample, epochs=epochs, device=device)[1]


def _debug_sweep_and_config(file: Path | None, overrides: Sequence[str], *, sample: int = 0,
                            epochs: int | None = None, device: str | None = None,
                            base: dict | None = None):
    """(the sweep or None, the config); ``base``: settings under the overrides when there is no file."""
    from sweeper.loading import load_sweep
    from sweeper.spaces import read_overrides, sample_config, with_override_problems

    problems: list[str] = []
    sweep = None
    if file is not None:
        sweep, _ = load_sweep(file, overrides)
        flat = sample_config(sweep, seed=sweep.seed + sample)
    else:
        flat, problems = read_overrides(overrides)
        flat = {**(base or {}), **flat}
        if "max_epochs" in flat:  # the sweep-level name works here too
            flat["epochs"] = flat.pop("max_epochs")
    if epochs is not None:
        flat["epochs"] = epochs
    if device is not None:
        flat["device"] = device
    return sweep, with_override_problems(problems, lambda: TrialConfig.from_flat(flat))


# What a resumed run may change: how long, where, where the data lives, what is measured.
_RESUME_MAY_CHANGE = ("epochs", "device", "data.dir", "diagnostics.")


def _checkpoint_config(resume: Path) -> dict | None:
    """The flat trial config a checkpoint was trained with (None in one written before it was kept)."""
    import torch

    from sweeper.train import CHECKPOINT_FILE

    try:
        state = torch.load(resume / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- a truncated or foreign file: the user's to know
        raise ConfigError([f"--resume {resume}: its {CHECKPOINT_FILE} cannot be read "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"]) from None
    config = state.get("config") if isinstance(state, dict) else None
    return dict(config) if isinstance(config, dict) else None


def _check_resumable(resume: Path, saved: dict, cfg: TrialConfig, *, from_file: bool) -> None:
    """A checkpoint continues only the config it was trained with: another model's weights raised a
    state_dict traceback, and another lr or batch size would silently not be the trial it was."""
    now = cfg.to_flat()
    keys = sorted(k for k in set(saved) | set(now)
                  if not k.startswith(_RESUME_MAY_CHANGE) and saved.get(k) != now.get(k))
    if not keys:
        return
    shown = "; ".join(f"{k}={saved.get(k)!r} there, {now.get(k)!r} here" for k in keys[:6])
    more = f" (and {len(keys) - 6} more)" if len(keys) > 6 else ""
    how = ("leave out the space file to take the checkpoint's own config (settings given after "
           "--resume still apply), or draw the same sample (--sample N)" if from_file else
           "leave out those settings: without a space file the checkpoint's own config is used")
    raise ConfigError([f"--resume {resume}: the checkpoint was trained with another config: "
                       f"{shown}{more}. Only epochs, device, data.dir and diagnostics may change on "
                       f"resume: {how}"])


def _trial_threads(sweep, cfg: TrialConfig) -> tuple[int, str] | None:
    """The CPU threads the sweep's trial of cfg trains with, and why, for a CPU run of a space file.

    Ray sets a trial worker's OMP_NUM_THREADS to its CPUs (floor, at least 1; ray 2.60
    ``_private.utils.set_omp_num_threads_if_unset``), and torch takes its thread count from it. A
    float sum over 1 thread and over all cores rounds differently, and a net near chance follows the
    difference: debug's VGG-19 stalled where the sweep's same config and seed completed. An
    OMP_NUM_THREADS the user set wins, in the sweep and here."""
    import math

    from sweeper.spaces import trial_resources

    if sweep is None or os.environ.get("OMP_NUM_THREADS"):
        return None
    cpus = trial_resources(sweep, cfg).get("cpu", 1)
    return max(math.floor(cpus), 1), f"as the sweep's trials (resources cpu={fmt(cpus)})"


def run_debug(file: Path | None, overrides: Sequence[str], *, sample: int = 0,
              epochs: int | None = None, device: str | None = None,
              checkpoint_dir: Path | None = None, resume: Path | None = None,
              diagnostics: bool = True):
    from sweeper.diagnostics import trial_hooks
    from sweeper.train import CHECKPOINT_FILE, fit, resolve_device

    problems = []
    if resume is not None and not (resume / CHECKPOINT_FILE).is_file():
        problems.append(f"--resume {resume}: no trial checkpoint there (a directory holding "
                        f"{CHECKPOINT_FILE}, as --checkpoint-dir or a sweep's checkpoint_NNNNNN writes)")
    if checkpoint_dir is not None:
        problems += file_in_the_way("--checkpoint-dir", checkpoint_dir)
    if problems:
        raise ConfigError(problems)
    saved = _checkpoint_config(resume) if resume is not None else None
    sweep, cfg = _debug_sweep_and_config(file, overrides, sample=sample, epochs=epochs, device=device,
                                         base=saved)
    if saved is not None:
        _check_resumable(resume, saved, cfg, from_file=file is not None)
    if not diagnostics:
        cfg = cfg.replace(**{"diagnostics.enabled": False})
    device_used = resolve_device(cfg.device)  # before the table: a refused device is the whole answer
    defaults = TrialConfig().to_flat()
    console.print(config_table(cfg.to_flat(), title=f"trial config (sample {sample})",
                               defaults=defaults))
    threads = _trial_threads(sweep, cfg) if str(device_used) == "cpu" else None
    if threads is not None:
        import torch

        torch.set_num_threads(threads[0])
        console.print(f"device: {device_used}, {threads[0]} thread(s) {threads[1]}; "
                      "OMP_NUM_THREADS=N sets another count")
    else:
        console.print(f"device: {device_used}")
    from sweeper.tune_standin import standin_sampled

    if sweep is not None and standin_sampled(sweep.space):
        console.print("Ray is not installed here: the space's tune domains were drawn by sweeper's "
                      "stand-in for ray.tune, which draws what Ray 2.60 draws for the same --sample")
    transfer = _transfer_line(cfg)
    if transfer:
        console.print(transfer)
    printer = EpochPrinter()

    def report(metrics, save):
        printer(metrics)
        if checkpoint_dir is not None:
            save(checkpoint_dir)

    result = fit(cfg, report=report, resume_from=resume, hooks=trial_hooks(cfg))
    if cfg.diagnostics.enabled and result.history:
        console.print(layer_table(result.initial, result.last))
    style = "green" if result.outcome == "completed" else "yellow"
    summary = f"outcome: {result.outcome}"
    if result.reason:
        summary += f" ({result.reason})"
    if "initial_loss" in result.initial:
        summary += f"; loss at step 0: {fmt(result.initial['initial_loss'])}"
    console.print(summary, style=style)
    test = _test_line(result.last)
    if test:
        console.print(test)
    if checkpoint_dir is not None:
        console.print(f"checkpoint: {checkpoint_dir}")
    return result


def _transfer_line(cfg) -> str | None:
    """What model.pretrained / init_from / freeze will do to the trial's model (a CPU build of it:
    sources are cached per process, so fit reads them again from memory)."""
    m = cfg.model
    if m.pretrained is None and m.init_from is None and m.freeze == "none":
        return None
    import torch

    from sweeper.data import num_classes
    from sweeper.models import build_model
    from sweeper.transfer import apply_transfer

    with torch.random.fork_rng(devices=[]):
        done = apply_transfer(build_model(m, num_classes=num_classes(cfg.data) or 10), m)
    return f"model: {done.describe()}"


def _test_line(last: dict) -> str | None:
    """The test split's numbers, measured once after a trial's last epoch (none if it stopped early)."""
    if "test_accuracy" not in last:
        return None
    line = (f"test: accuracy {fmt(last['test_accuracy'])}, top-1 error {fmt(last.get('test_top1_error'))}"
            f", top-5 error {fmt(last.get('test_top5_error'))}")
    if "test_multicrop_accuracy" in last:
        line += (f"; multi-crop ({int(last.get('test_views', 0))} views per image): accuracy "
                 f"{fmt(last['test_multicrop_accuracy'])}, top-1 error "
                 f"{fmt(last.get('test_multicrop_top1_error'))}, top-5 error "
                 f"{fmt(last.get('test_multicrop_top5_error'))}")
    return line


def layer_table(initial: dict, last: dict):
    """Per-layer health at init and now: where the signal dies, what moves, what is dead."""
    from rich.table import Table

    keys = [k.split("/", 1)[1] for k in last if k.startswith("act_std/")]
    title = f"layers at init -> after epoch {last.get('epoch')}"
    if not keys:  # a diverged epoch measures no layer: the init's figures still say where it blew up
        keys = [k.split("/", 1)[1] for k in initial if k.startswith("act_std/")]
        title = f"layers at init (not measured after epoch {last.get('epoch')}: the loss was not finite)"
    table = Table(title=title, title_justify="left")
    for col in ("layer", "module", "act_std", "grad_norm", "update_ratio", "dead_frac", "gain pred/meas"):
        table.add_column(col, justify="right" if col not in ("layer", "module") else "left")

    def pair(name: str, key: str) -> str:
        a, b = initial.get(f"{name}/{key}"), last.get(f"{name}/{key}")
        if b is None:
            return "-" if a is None else f"{fmt(a)} -> -"
        return f"{fmt(a)} -> {fmt(b)}" if a is not None else fmt(b)

    for key in keys:
        table.add_row(key, str(initial.get(f"layer/{key}", "")), pair("act_std", key),
                      pair("grad_norm", key), pair("update_ratio", key), pair("dead_frac", key),
                      f"{fmt(initial.get(f'gain_pred/{key}'))} / {fmt(initial.get(f'gain_meas/{key}'))}")
    return table


def validate_files(files: Sequence[Path], overrides: Sequence[str]) -> bool:
    """Load, validate and dry-run each file; print a summary; True when all are valid.

    Every file is checked, whatever the others do: a file that fails to import, raises, calls
    ``sys.exit()`` or hangs (see ``SWEEPER_LOAD_TIMEOUT``) is reported as that file's problem. Problems
    go to stderr, one block per file: ``"{file}: N problem(s)"`` then ``"  - {problem}"`` lines."""
    from rich.markup import escape

    from sweeper.loading import load_sweep
    from sweeper.preflight import dry_run_problems
    from sweeper.spaces import dry_run, grid_size, trial_count

    ok = True
    for file in files:
        try:
            sweep, _ = load_sweep(file, overrides)
            cfg = dry_run(sweep)
            # A storage the file names is probed as launch would (a path here; removed again): it
            # passed validate and was refused at launch. The default ./sweeps is the cwd's, not the file's.
            problems = dry_run_problems(sweep, local=False, num_cpus=None) if sweep.storage else []
        except ConfigError as exc:
            problems = exc.problems
        except Exception as exc:  # noqa: BLE001 -- report it with this file; the rest still get checked
            problems = [f"{file}: dry run failed with {type(exc).__name__}: {exc} (run `sweeper debug "
                        f"{file}` for the traceback)"]
        if problems:
            ok = False
            error_console.print(f"[red]{escape(str(file))}: {len(problems)} problem(s)[/red]")
            for problem in problems:
                error_console.print(f"  - {escape(problem)}")
            continue
        console.print(f"[green]{escape(str(file))}: ok[/green] -- sweep {escape(repr(sweep.name))}: "
                      f"{grid_size(sweep)} grid cell(s) x {sweep.num_samples} sample(s) = "
                      f"{trial_count(sweep)} trials, search={sweep.search}, "
                      f"scheduler={sweep.scheduler}, max_epochs={sweep.max_epochs}; dry run built "
                      f"{cfg.model.arch}")
    return ok


_PLAN_ROWS = 100  # grid cells --dry-run lists; the count line gives the rest


def print_plan(sweep) -> None:
    """`launch --dry-run`: the grid, the sampled axes and the trial count."""
    from rich.markup import escape
    from rich.table import Table

    from sweeper.spaces import describe_domain, grid_cells, trial_count

    cells = grid_cells(sweep)
    sampled = {k: describe_domain(v) for k, v in sweep.space.items()
               if callable(getattr(v, "sample", None)) and not isinstance(v, type)}
    console.print(f"sweep {escape(repr(sweep.name))}: {len(cells)} grid cell(s) x "
                  f"{sweep.num_samples} sample(s) = {trial_count(sweep)} trials; "
                  f"search={sweep.search}, scheduler={sweep.scheduler} (grace {sweep.grace_period}, "
                  f"reduction {sweep.reduction_factor}), max_epochs={sweep.max_epochs}, "
                  f"metric={sweep.metric} ({sweep.mode})")
    if sweep.question:
        console.print(escape(sweep.question.splitlines()[0]), style="italic")
    if cells and cells[0]:
        table = Table(title="grid", title_justify="left")
        table.add_column("#")
        for key in cells[0]:
            table.add_column(escape(key))
        for i, cell in enumerate(cells[:_PLAN_ROWS]):
            table.add_row(str(i), *(escape(fmt(v)) for v in cell.values()))
        console.print(table)
        if len(cells) > _PLAN_ROWS:
            console.print(f"... and {len(cells) - _PLAN_ROWS} more grid cells")
    for key, text in sampled.items():
        console.print(f"sampled per trial: {escape(key)} ~ {escape(text)}")


def resolve_storage(name: str, storage: str | None) -> str | None:
    """--storage if given; else ./sweeps if the sweep is there; else where this machine launched it.

    A name in ./sweeps that this machine last launched on another storage is two sweeps: which one
    `resume NAME` continues (or `status`, `report` read) must not be a guess, so the user is asked.
    A URI in the index is not opened to see whether the sweep is still there (a network round trip
    for every local status): its name is reason enough to ask."""
    from sweeper.store import DEFAULT_STORAGE, index_lookup, is_uri, redacted_root, storage_root

    if storage is not None:
        return storage
    here = Path(storage_root(DEFAULT_STORAGE))
    elsewhere = index_lookup(name)
    if not SweepRecord(here / name).exists():
        return elsewhere
    if elsewhere and (is_uri(elsewhere) or (Path(elsewhere) != here
                                            and SweepRecord(Path(elsewhere) / name).exists())):
        shown = redacted_root(elsewhere)
        raise ConfigError([f"two sweeps are named {name!r}: one in {here} (this directory's ./sweeps) "
                           f"and one in {shown} (where this machine last launched {name!r}); pass "
                           f"--storage {DEFAULT_STORAGE} or --storage {shlex.quote(shown)} to say which"])
    return None


def open_record_if_any(name: str, storage: str | None):
    """The sweep's record, or None where there is none (an MLflow experiment of that name may
    still be there: `ui NAME` opens it)."""
    from sweeper.store import open_sweep_record

    record, _ = open_sweep_record(name, storage)
    return record if record.exists() else None


def existing_record(name: str, storage: str | None, *, with_mirror: bool = False, read_meta: bool = True):
    """The sweep's record, read from wherever it lives (a fresh local copy for a URI). ``read_meta``:
    refuse a damaged sweep.json here, for every reader alike; ``stop`` needs only the driver's lease."""
    from sweeper.spaces import name_problem
    from sweeper.store import open_sweep_record, redacted_root, storage_root

    if (problem := name_problem(name)) is not None:  # a path would reach outside the storage
        raise ConfigError([problem])
    storage = resolve_storage(name, storage)
    record, mirror = open_sweep_record(name, storage)
    if not record.exists():
        if (record.dir / "sweep.json").exists():  # a directory or other non-file in its place
            raise ConfigError([f"{record.dir / 'sweep.json'}: the sweep record's file is damaged (not a "
                               "file); restore it from a copy"])
        raise ConfigError([f"no sweep named {name!r} under {redacted_root(storage_root(storage))} "
                           "(pass --storage where it was launched)"])
    if read_meta:
        record.meta()  # a damaged sweep.json is named here, for every verb alike (export did not read it)
    return (record, mirror) if with_mirror else record


def stop_sweep(name: str, storage: str | None) -> str:
    """Ask the driver of a running sweep to save its state and exit (it stays resumable).

    The request is a file in the sweep's record -- on its storage, for a sweep on a URI -- that the
    driver's own heartbeat thread acts on: no process is ever signalled from here, so a pid reused
    after a crash is never hit, and it works from any machine that can write the storage.
    """
    import json
    import time

    from sweeper.lease import STOP_FILE, died_holding, read_lease, request_stop
    from sweeper.store import resume_command

    # A live driver can be asked to stop even where sweep.json was damaged after it started.
    storage = resolve_storage(name, storage)  # once: the hints below name the same storage
    record, mirror = existing_record(name, storage, with_mirror=True, read_meta=False)
    info = read_lease(record.dir)
    if info is not None and info.alive:
        if mirror is not None:
            mirror.put_remote(STOP_FILE, json.dumps({"requested": time.time()}).encode())
        else:
            request_stop(record.dir)
        return (f"asked sweep {name!r} (driver {info.describe()}) to save its state and stop; "
                f"`sweeper launch` or {resume_command(name, storage, cluster=_cluster(record))} "
                "continues it")
    if info is not None and info.runs_the_original:
        original = Path(info.copied_from).parent  # the record is <storage>/<name>/sweeper
        return (f"sweep {name!r} is not running here: this folder is a copy of {original}, whose "
                f"driver ({info.describe()}) runs that one: "
                f"{resume_command(name, str(original.parent), verb='stop')} stops it")
    if died_holding(record.dir, info):
        who = info.describe() if info else "an older driver"
        return (f"sweep {name!r} is not running: its driver ({who}) died without releasing it; "
                f"{resume_command(name, storage, cluster=_cluster(record))} continues it")
    return f"sweep {name!r} is not running"


def _cluster(record) -> str | None:
    """The Ray the sweep's last launch used, for a resume hint (None if unknown or unreadable:
    `stop` answers even with a damaged sweep.json)."""
    try:
        return record.meta().get("cluster")
    except (ConfigError, OSError):
        return None


def saved_sweep(name: str, storage: str | None):
    """The Sweep as it was launched: the saved file text with the saved overrides."""
    import tempfile

    from sweeper.loading import load_sweep

    record = existing_record(name, storage)
    meta = record.meta()
    saved = record.dir / "sweep_file.py"
    if not saved.is_file():
        raise ConfigError([f"{saved} is missing: the sweep record no longer holds the file it was "
                           f"launched with; relaunch that file (`sweeper launch FILE --name {name}`, "
                           "same overrides) to resume it"])
    text = saved.read_text()
    items = [f"{k}={v}" for k, v in meta.get("overrides", {}).items()]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.py"
        path.write_text(text)
        sweep, _ = load_sweep(path, items)
    sweep = sweep.replace(name=name, storage=resolve_storage(name, storage) or sweep.storage)
    return sweep, text, meta.get("overrides", {})


def print_status(name: str, storage: str | None) -> None:
    from rich.table import Table

    record = existing_record(name, storage)
    meta = record.meta()
    metric = meta.get("metric", "val_accuracy")
    from sweeper.store import resume_command

    where = resolve_storage(name, storage)
    state, live = _driver_state(record, name, where)
    # A trial left "running" by a driver that is gone is not running: shown as export and the
    # report show it, stopped, as `sweeper sync` labels it.
    seen, cut_off = as_readers_see(record, name, where, live=live)
    trials = seen.trials()
    from sweeper.export import outcome_fields, status_outcome

    # The outcome as recorded (= MLflow's sweeper.outcome, export's `outcome`); counted by it alone,
    # so "3 pruned" here is the report's and the export's 3, at chance or not.
    fields = {t["trial_id"]: outcome_fields(t, record.epochs(t["trial_id"]) if "at_chance" not in t
                                            and t.get("outcome") else []) for t in trials}
    counts: dict[str, int] = {}
    for t in trials:
        key = fields[t["trial_id"]]["outcome"] or t.get("status", "?")
        counts[key] = counts.get(key, 0) + 1
    at_chance = sum(1 for f in fields.values() if f["outcome"] == "pruned" and f["at_chance"])
    outcomes = ", ".join(
        f"{n} {k}" + (f" ({at_chance} at chance)" if k == "pruned" and at_chance else "")
        for k, n in sorted(counts.items()))
    console.print(f"sweep {name!r}: {state}; {len(trials)}/{meta.get('planned_trials', '?')} "
                  "trials started" + (f"; {outcomes}" if outcomes else ""))
    if cut_off:
        console.print(left_running_note(name, where, cut_off))
    if "sweep_uid" in meta:
        tracker = _tracker_for(record, where, None)
        from sweeper.tracking import redact

        store = redact(tracker.tracking_uri)  # the sweep's store as it is now (moved with a folder)
        pending = tracker.pending()
        if pending and live:  # the driver delivers them itself, in the background
            console.print(f"MLflow: {pending} operation(s) on their way to {store} "
                          "(the running driver delivers them)")
        elif pending:
            error = tracker.last_error()
            error_console.print(f"[yellow]MLflow: {pending} operation(s) not yet delivered to "
                                f"{store}{f' ({error})' if error else ''}; "
                                f"{resume_command(name, where, verb='sync')} delivers them"
                                "[/yellow]")
        else:
            console.print(f"MLflow: all delivered to {store}")
    if not trials:
        console.print("no trial has started yet")
        return
    varying = _varying_keys([t.get("config", {}) for t in trials])
    table = Table(show_header=True, header_style="bold")
    table.add_column("trial")
    for key in varying:
        table.add_column(key.split(".")[-1])
    for col in ("outcome", "epochs", f"best {metric}", "stop reason"):
        table.add_column(col)
    for t in trials:
        best = (t.get("best") or {}).get(metric)
        table.add_row(t.get("name", t["trial_id"]),
                      *(fmt(t.get("config", {}).get(k)) for k in varying),
                      status_outcome(fields[t["trial_id"]], t.get("status")),
                      str(t.get("epochs", 0)),
                      fmt(best) if best is not None else "-", (t.get("reason") or "")[:100])
    console.print(table)


def _driver_state(record, name: str, storage: str | None) -> tuple[str, bool]:
    """('running (pid ... on host, heartbeat 2s ago)', True), or why it is not running."""
    from sweeper.lease import died_holding, read_lease
    from sweeper.store import resume_command

    info = read_lease(record.dir)
    if info is not None and info.alive:
        return f"running (driver {info.describe()})", True
    if info is not None and info.runs_the_original:
        return (f"not running here: this folder is a copy of {Path(info.copied_from).parent}, "
                "whose driver "
                f"({info.describe()}) runs that one, not this copy; "
                f"{resume_command(name, storage, cluster=_cluster(record))} continues the copy "
                "on its own"), False
    if died_holding(record.dir, info):
        who = info.describe() if info else "an older driver"
        return (f"not running: its driver ({who}) died without finishing; "
                f"{resume_command(name, storage, cluster=_cluster(record))} continues it"), False
    return "not running", False


def _varying_keys(configs: list[dict]) -> list[str]:
    keys: list[str] = []
    for cfg in configs:
        keys.extend(k for k in cfg if k not in keys)
    return [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]


def _tracker_for(record, storage: str | None, tracking_uri: str | None, *, check_store: bool = False):
    from sweeper.tracking import Tracker, check_tracking_uri, moved_store, sweep_tracking_uri

    check_tracking_uri(tracking_uri)
    meta = record.meta()
    uri = tracking_uri or sweep_tracking_uri(meta, storage)
    if check_store and not tracking_uri:  # the sweep's own store: a damaged file is refused, not retried
        check_tracking_uri(uri, option="the sweep's tracking store")
    if not meta.get("sweep_uid"):  # every launch writes one: its MLflow runs are found by it
        raise ConfigError([f"{record.dir / 'sweep.json'}: has no sweep_uid, which every launch writes "
                           "(its MLflow runs are found by it); the record is damaged: restore it from "
                           "a copy"])
    tracker = Tracker(record.dir, uri, experiment=meta.get("name", record.experiment_dir.name),
                      sweep_uid=meta["sweep_uid"])
    tracker.moved_from = moved_store(meta, storage, uri)
    return tracker


STOPPED_REASON = "stopped before its budget (the sweep was interrupted); it resumes with the sweep"


def _left_running(trial: dict) -> bool:
    """The record shows the trial running, with no outcome: only its driver could still end it."""
    return trial.get("status") == "running" and not trial.get("outcome")


def _as_stopped(trial: dict) -> dict:
    """A trial as :func:`mark_stopped` labels it."""
    return {**trial, "status": "stopped", "outcome": "stopped", "reason": STOPPED_REASON}


class _SeenAfterItsDriver:
    """A record whose driver is gone, as the readers show it: the trials it left running read as
    ``sweeper sync`` will label them (stopped). Without this, after a killed driver status said
    "interrupted", export "running" and the report "still running" about the same trial."""

    def __init__(self, record: SweepRecord) -> None:
        self._record = record

    def __getattr__(self, name: str):
        return getattr(self._record, name)

    def trials(self) -> list[dict]:
        return [_as_stopped(t) if _left_running(t) else t for t in self._record.trials()]

    def trial(self, trial_id: str) -> dict | None:
        t = self._record.trial(trial_id)
        return _as_stopped(t) if t is not None and _left_running(t) else t


def as_readers_see(record: SweepRecord, name: str, storage: str | None, *, live: bool | None = None):
    """(the record as status, export and report show it, trials a dead driver left running): those
    trials read as stopped, as ``sweeper sync`` labels them; the record itself is not changed.
    ``live``: whether the driver runs, when the caller already asked (None: asked here)."""
    if live is None:
        _, live = _driver_state(record, name, storage)
    left = 0 if live else sum(1 for t in record.trials() if _left_running(t))
    return (_SeenAfterItsDriver(record) if left else record), left


def record_for_readers(record: SweepRecord, name: str, storage: str | None):
    """export's and the report's record (:func:`as_readers_see`), saying on stderr which trials it
    shows as stopped and how ``sweeper sync`` labels them so."""
    where = resolve_storage(name, storage)
    seen, left = as_readers_see(record, name, where)
    if left:
        error_console.print(left_running_note(name, where, left), style="yellow")
    return seen


def left_running_note(name: str, storage: str | None, left: int) -> str:
    from sweeper.store import resume_command

    return (f"{left} trial(s) were running when the driver died (interrupted): shown as stopped, as "
            f"{resume_command(name, storage, verb='sync')} labels them; until then their MLflow runs "
            "still say RUNNING (a resume runs them again)")


def mark_stopped(record: SweepRecord, tracker) -> list[str]:
    """Label ``stopped`` every trial an interrupted launch left unfinished; their ids.

    Called when Tune's run has returned, and by ``sweeper sync`` for a driver that died: a trial the
    record still shows running was cut off by the interruption (``sweeper stop``, Ctrl-C, a killed
    driver), never ended by Tune, so no callback labelled it. The record, MLflow's
    ``sweeper.outcome`` tag, ``status``, ``export`` and the report then all say ``stopped``, and
    MLflow's run status is KILLED; when the sweep resumes, the trial runs again (its run RUNNING
    again) and its outcome is decided then.
    """
    stopped = []
    for t in record.trials():
        if _left_running(t):
            record.write_trial(t["trial_id"], {**t, "status": "stopped", "outcome": "stopped",
                                               "reason": STOPPED_REASON})
            tracker.set_tags(t["trial_id"], {"sweeper.outcome": "stopped"})
            # Not left RUNNING in MLflow's UI for ever: the run is KILLED until the sweep resumes it.
            tracker.finish(t["trial_id"], "KILLED")
            stopped.append(t["trial_id"])
    return stopped


def end_interrupted_runs(record: SweepRecord, tracker) -> list[str]:
    """A driver killed outright (SIGKILL, its machine lost) ended none of its MLflow runs: its trials
    and the sweep's run said RUNNING in the UI until a resume. Its running trials are labelled
    stopped as an interrupted launch labels them, and the sweep's run ends KILLED -- or FINISHED,
    if every planned trial had ended before the driver died. A resume sets them RUNNING again.
    Also what a driver does for itself when its Ray died under a SIGTERM (sweeper.tuner)."""
    stopped = mark_stopped(record, tracker)
    trials = record.trials()
    planned = record.meta().get("planned_trials")
    complete = (not stopped and isinstance(planned, int) and len(trials) >= planned
                and all(t.get("outcome") not in (None, "stopped") for t in trials))
    tracker.finish(None, "FINISHED" if complete else "KILLED")
    return stopped


def sync_tracking(name: str, storage: str | None, *, tracking_uri: str | None,
                  wait_s: float) -> bool:
    from sweeper.lease import died_holding, read_lease

    record, mirror = existing_record(name, storage, with_mirror=True)
    lease = read_lease(record.dir)
    if mirror is not None and lease is not None and lease.alive:
        raise ConfigError([f"sweep {name!r} is running (driver {lease.describe()}): its driver "
                           "delivers its own tracking; sync after it ends"])
    tracker = _tracker_for(record, resolve_storage(name, storage), tracking_uri, check_store=True)
    if died_holding(record.dir, lease):
        # The driver died without releasing its lease: nothing else will end its runs.
        stopped = end_interrupted_runs(record, tracker)
        if stopped:
            console.print(f"the driver of {name!r} died with {len(stopped)} trial(s) running: "
                          "labelled stopped, their MLflow runs KILLED until the sweep resumes")
    before = tracker.pending()
    ok = tracker.flush_until(wait_s)
    if mirror is not None:
        mirror.push()  # what was delivered, so the next reader does not deliver it again
    if ok:
        console.print(f"delivered {before} tracking operation(s); nothing pending")
    else:
        error_console.print(f"{tracker.pending()} of {before} operation(s) still pending: "
                            f"{tracker.last_error()}")
    return ok


def _check_bindable(host: str, port: int) -> None:
    """The server's bind, tried first: a bad host or a busy port is the user's to fix (exit 2), where
    MLflow's server would print its own traceback and exit."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError([f"--host {host!r}: not an address of this machine ({exc})"]) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            why = "the port is in use" if exc.errno == 98 else exc.strerror or str(exc)
            raise ConfigError([f"--host {host} --port {port}: cannot listen there ({why}); pick "
                               "another --port"]) from None


def run_ui(name: str | None, storage: str | None, *, host: str, port: int) -> int:
    """`mlflow ui` on the embedded store, in the foreground; Ctrl-C or SIGTERM stops all of it.

    * The URL opens in MLflow's model-training mode: MLflow 3.17's UI takes the mode from the URL's
      ``workflowType`` parameter, else from the browser's localStorage (default ``genai``), and no
      longer from the experiment's ``mlflow.experimentKind`` tag (its ``Z0`` flag is always on).
      See mlflow/server/js/build/static/js/main.c2f5f8d4.js, webpack modules 7975 (the workflow
      type provider), 31080 (``Fi``: experiment kind from the workflow type) and 89511 (``Z0``).
    * The server runs in its own process group (uvicorn's supervisor and workers with it):
      SIGINT/SIGTERM to this process are forwarded to that whole group, then this waits for it
      (SIGKILL after 15 s), so stopping ``sweeper ui`` leaves nothing behind.
    * One worker on small machines (MLflow's uvicorn default is 4), and no GenAI job runner unless
      ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` says otherwise: sweeps use neither.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    from sweeper.tracking import _sqlite_path, check_tracking_uri, default_tracking_uri, redact, \
        sweep_tracking_uri
    from sweeper.store import record_root, resume_command

    if not 1 <= port <= 65535:
        raise ConfigError([f"--port {port}: a TCP port is 1-65535"])
    _check_bindable(host, port)
    # A named sweep is found where `status` finds it: --storage, ./sweeps, or where it was launched,
    # and its runs in the store its launch recorded (status's and sync's): a sweep on a URI storage
    # has its embedded store in ./sweeps of the directory it was launched from, not this one.
    where = resolve_storage(name, storage) if name else storage
    uri = default_tracking_uri(record_root(where))
    record = open_record_if_any(name, where) if name else None
    if record is not None:
        uri = sweep_tracking_uri(record.meta(), where)
        if _sqlite_path(uri) is None:  # a tracking server or a database a server fronts
            raise ConfigError([f"sweep {name!r} records its runs in {redact(uri)}, not in an embedded "
                               "store: open that server's UI (or `mlflow ui --backend-store-uri` with "
                               "the database's URI)"])
    db = _sqlite_path(uri)
    if not db.is_file():
        raise ConfigError([f"no MLflow store at {db}: " + (
            f"{resume_command(name, where, verb='sync')} writes sweep "
            f"{name!r}'s runs there" if record is not None
            else "launch a sweep first (or pass --storage where it was launched)")])
    check_tracking_uri(uri, option="the MLflow store")
    url = f"http://{host}:{port}/#/experiments"
    if name:
        from mlflow.tracking import MlflowClient

        exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
        if exp is None:
            raise ConfigError([f"no MLflow experiment named {name!r} in {uri}"])
        url += f"/{exp.experiment_id}/runs"
    url += "?workflowType=machine_learning"
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
               "--host", host, "--port", str(port)]
    if (os.cpu_count() or 1) <= 4:
        command += ["--workers", "1"]
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    console.print(f"MLflow UI for {uri}: {url}  (Ctrl-C to stop)")
    sys.stdout.flush()

    started: list[subprocess.Popen] = []
    stop_at: list[float] = []  # when a stop was asked for (SIGINT/SIGTERM)

    def signal_group(sig: int) -> None:
        if started:
            try:
                os.killpg(started[0].pid, sig)  # pgid == the server's pid (start_new_session)
            except (ProcessLookupError, PermissionError):
                pass

    def forward(signum, _frame) -> None:
        if not stop_at:
            stop_at.append(time.monotonic())
        signal_group(signal.SIGTERM)

    # Handlers first: a signal that arrives while the server starts must not orphan it.
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = subprocess.Popen(command, env=env, start_new_session=True)  # own process group
        started.append(server)
        if stop_at:
            signal_group(signal.SIGTERM)
        while True:
            try:
                server.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stop_at and time.monotonic() - stop_at[0] > 15:
                    signal_group(signal.SIGKILL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started and started[0].poll() is None:  # leaving for another reason (an exception)
            signal_group(signal.SIGTERM)
            try:
                started[0].wait(15)
            except subprocess.TimeoutExpired:
                signal_group(signal.SIGKILL)
                started[0].wait()
        signal_group(signal.SIGKILL)  # workers the server left behind, if any
    # Ended on its own, not by a stop: the server failed (its own message is above it).
    return 0 if stop_at or not started else started[0].returncode
