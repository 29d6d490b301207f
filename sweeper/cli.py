"""The ``sweeper`` command line: argument parsing only; the work happens in the modules it calls.

Exit status (also in ``sweeper --help`` and the README):

- 0: done (a sweep: every trial ended, none failed);
- 1: an internal error (a bug, a real failure: its traceback is shown), or trials that failed
  after their retries;
- 2: bad input: a setting, a file, a dataset, storage, resources (one message per problem, no
  traceback unless ``--traceback``; nothing started, nothing written);
- 3: interrupted (Ctrl-C, ``sweeper stop``, SIGTERM): the sweep saved its state; launch or resume
  continues it;
- 4: finished, but tracking data is still undelivered (``sweeper sync NAME`` delivers it).
"""

from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.markup import escape

from sweeper.config import ConfigError, file_in_the_way
from sweeper.console import console, error_console

# Token authentication on, said before anything imports Ray (Ray reads the mode once, at import):
# a fresh local Ray then makes or reuses ~/.ray/auth_token, and a driver joining a cluster at an
# explicit address presents the token instead of failing for a minute. RAY_AUTH_MODE=disabled in
# the environment still opts out. Where Ray is already imported (a program that imported it first),
# the variable is left alone: Ray would start a token-only cluster it cannot itself join.
if "ray" not in sys.modules:
    os.environ.setdefault("RAY_AUTH_MODE", "token")

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_UNDELIVERED", "EXIT_USAGE", "app",
           "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
from sweeper.interrupts import EXIT_INTERRUPTED  # noqa: E402 - 3; the SIGTERM watchdog exits with it
EXIT_UNDELIVERED = 4

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Ray Tune sweeps of PyTorch image classifiers, with MLflow tracking that "
                       "explains why deep plain nets stall.\n\n"
                       "Exit status: 0 done; 1 internal error or failed trials; 2 bad input "
                       "(nothing started); 3 interrupted (resumable); 4 done, tracking not "
                       "delivered (`sweeper sync`).")

_SHOW_TRACEBACK = {"on": False}

# What a command may need that a machine kept for training may lack (a GPU box with torch alone),
# and what works there anyway.
_ENGINES = {
    "ray": "Without Ray, `sweeper debug FILE` trains one trial and `sweeper validate FILE` checks a "
           "space (their `tune` domains are read by sweeper's stand-in).",
    "mlflow": "Without MLflow, `sweeper debug FILE` still trains one trial.",
    "optuna": "Without Optuna, a space with search=\"random\" needs none.",
}


@app.callback()
def _options(traceback: bool = typer.Option(
        False, "--traceback", help="Show the full traceback of input errors too (for bug reports).")
) -> None:
    _SHOW_TRACEBACK["on"] = traceback


def _print_problems(problems: List[str]) -> None:
    for problem in problems:
        error_console.print(f"[red]error:[/red] {escape(problem)}", highlight=False)


def user_errors(func: Callable) -> Callable:
    """Turn the errors a user can fix into messages and exit code 2; Ctrl-C into exit code 3."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            if _SHOW_TRACEBACK["on"]:
                raise
            _print_problems(exc.problems)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            error_console.print("interrupted", style="yellow")
            raise typer.Exit(EXIT_INTERRUPTED)
        except ModuleNotFoundError as exc:
            missing = (exc.name or "").partition(".")[0]
            if missing not in _ENGINES or _SHOW_TRACEBACK["on"]:
                raise
            command = func.__name__.strip("_").replace("_", "-")
            error_console.print(f"[red]error:[/red] sweeper {command} needs {escape(missing)}, which is not "
                                f"installed in this Python ({escape(sys.executable)}); install sweeper "
                                f"with its dependencies (pip install -e . in its checkout). "
                                f"{_ENGINES[missing]}", highlight=False)
        except Exception as exc:
            from sweeper.data import DatasetUnavailable  # lazy: torch is slow to import
            from sweeper.models import is_allocation_failure, too_big

            if _SHOW_TRACEBACK["on"]:
                raise
            if isinstance(exc, DatasetUnavailable):
                _print_problems([str(exc)])
            elif is_allocation_failure(exc):  # data.resolution=30000 in debug: a setting, not a bug
                _print_problems(too_big(exc, "this trial", "lower data.resolution, model.width or "
                                        "data.batch_size (--traceback shows where)").problems)
            else:
                raise
        raise typer.Exit(EXIT_USAGE)

    return wrapper


def _split_args(args: List[str]) -> tuple[Optional[Path], List[str]]:
    """`debug [FILE] [key=value ...]`: the first argument is a file unless it contains '='."""
    if args and "=" not in args[0]:
        return Path(args[0]), list(args[1:])
    return None, list(args)


@app.command()
@user_errors
def debug(
    args: List[str] = typer.Argument(None, metavar="[FILE] [KEY=VALUE]...",
                                     help="A search-space file and/or trial settings."),
    sample: int = typer.Option(0, help="Which sample of the space to draw (a seed)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default: the sweep's max_epochs)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N."),
    checkpoint_dir: Optional[Path] = typer.Option(
        None, help="Save a checkpoint here after every epoch."),
    resume: Optional[Path] = typer.Option(None, help="Continue from a checkpoint directory."),
    diagnostics: bool = typer.Option(True, help="Per-layer health metrics and stall detection."),
    data_dir: Optional[Path] = typer.Option(None, help="Where real datasets live (data.dir)."),
) -> None:
    """Run one trial in the foreground, without Ray: real tracebacks, pdb works."""
    from sweeper.local import run_debug

    file, overrides = _split_args(args or [])
    if data_dir is not None:
        overrides.append(f"data.dir={data_dir.resolve()}")
    result = run_debug(file, overrides, sample=sample, epochs=epochs, device=device,
                       checkpoint_dir=checkpoint_dir, resume=resume, diagnostics=diagnostics)
    # Stalled, diverged or collapsed are findings, as in a sweep (exit 0): the outcome line says
    # which. Only a trial that failed is exit 1, as the exit statuses above say.
    if result.outcome == "failed":
        raise typer.Exit(1)


@app.command()
@user_errors
def validate(
    files: List[str] = typer.Argument(..., metavar="FILE... [KEY=VALUE]...",
                                      help="Search-space files, and overrides as launch takes them."),
    overrides: List[str] = typer.Option([], "--set", "-s", help="KEY=VALUE override (repeatable)."),
) -> None:
    """Check search-space files (every problem at once) and dry-run one model of each on the CPU."""
    from sweeper.local import validate_files

    # `validate FILE max_epochs=-1` as `launch FILE max_epochs=-1`: a KEY=VALUE that is no file is
    # an override (it was reported as a missing file). Strings, not Paths: s3:// keeps its slashes.
    given = [a for a in files if "=" in a and not Path(a).exists()]
    paths = [Path(a) for a in files if a not in given]
    if not paths:
        raise ConfigError([f"validate needs a search-space file before the overrides {given}"])
    if not validate_files(paths, [*given, *overrides]):
        raise typer.Exit(EXIT_USAGE)


@app.command()
@user_errors
def launch(
    file: Path = typer.Argument(..., help="Search-space file."),
    overrides: List[str] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                          help="Run-level overrides, e.g. dataset=digits width=1/8."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS)."),
    local: bool = typer.Option(False, "--local", help="Start a fresh Ray on this machine."),
    storage: Optional[str] = typer.Option(None, help="Results: a directory or s3://, gs:// URI."),
    name: Optional[str] = typer.Option(None, help="Sweep name (default: the file's)."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs for --local Ray (default: all)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, print the plan, run nothing."),
    fresh: bool = typer.Option(False, "--fresh", help="Never resume an existing sweep of this name."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the final summary."),
    tracking_uri: Optional[str] = typer.Option(
        None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else SQLite in the storage)."),
    data_dir: Optional[str] = typer.Option(
        None, help="Where real datasets live on every node (data.dir)."),
) -> None:
    """Run a sweep on Ray Tune; a sweep of the same name that exists is resumed."""
    from sweeper.local import print_plan
    from sweeper.spaces import dry_run as build_once
    from sweeper.loading import load_sweep
    from sweeper.spaces import parse_overrides

    overrides = list(overrides or [])
    if data_dir is not None:
        overrides.append(f"data.dir={data_dir}")
    sweep, text = load_sweep(file, overrides)
    if storage is not None:
        sweep = sweep.replace(storage=storage)
    if name is not None:
        sweep = sweep.replace(name=name)
    build_once(sweep)
    from sweeper.preflight import check_launch_options

    check_launch_options(address=address, local=local, num_cpus=num_cpus, tracking_uri=tracking_uri)
    from sweeper.tuner import check_plan, launch as run_sweep

    if dry_run:
        recorded = check_plan(sweep, local=local, num_cpus=num_cpus, address=address, restore=not fresh)
        print_plan(sweep)
        if recorded is not None:
            console.print(f"the launch would resume sweep {sweep.name!r}, which records {recorded} "
                          "trial(s) already (--fresh refuses, --name starts another)")
        return

    result = run_sweep(sweep, text, address=address, local=local, num_cpus=num_cpus, quiet=quiet,
                       overrides=parse_overrides(overrides), restore=not fresh,
                       tracking_uri=tracking_uri)
    _print_summary(result)
    _exit_for(result)


@app.command()
@user_errors
def resume(
    name: str = typer.Argument(..., help="Sweep name."),
    storage: Optional[str] = typer.Option(None, help="Where the sweep lives."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address."),
    local: bool = typer.Option(False, "--local", help="Start a fresh Ray on this machine."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs for --local Ray."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI."),
) -> None:
    """Resume a stopped or crashed sweep from its saved state (the file it was launched with)."""
    from sweeper.local import saved_sweep
    from sweeper.tuner import launch as run_sweep

    sweep, text, overrides = saved_sweep(name, storage)
    result = run_sweep(sweep, text, address=address, local=local, num_cpus=num_cpus, quiet=quiet,
                       overrides=overrides, restore=True, tracking_uri=tracking_uri)
    _print_summary(result)
    _exit_for(result)


@app.command()
@user_errors
def status(
    name: str = typer.Argument(..., help="Sweep name."),
    storage: Optional[str] = typer.Option(None, help="Where the sweep lives."),
) -> None:
    """Table of the sweep's trials: config, outcome, epochs, best metric, stop reason."""
    from sweeper.local import print_status

    print_status(name, storage)


@app.command()
@user_errors
def export(
    name: str = typer.Argument(..., help="Sweep name."),
    format: Optional[str] = typer.Option(
        None, "--format", "-f", help="parquet, csv or json (default: what --out names, else parquet)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file stem."),
    epochs: bool = typer.Option(False, "--epochs", help="Also one row per (trial, epoch)."),
    storage: Optional[str] = typer.Option(None, help="Where the sweep lives."),
) -> None:
    """Write one row per trial (and per epoch) with pyarrow."""
    from sweeper.export import export as write
    from sweeper.local import existing_record, record_for_readers

    record = record_for_readers(existing_record(name, storage), name, storage)
    for path in write(record, out or Path(name), fmt=format, epochs=epochs):
        console.print(f"wrote {path}")


@app.command()
@user_errors
def stop(
    name: str = typer.Argument(..., help="Sweep name."),
    storage: Optional[str] = typer.Option(None, help="Where the sweep lives."),
) -> None:
    """Ask a running sweep to save its state and exit; `sweeper launch`/`resume` continues it."""
    from sweeper.local import stop_sweep

    console.print(stop_sweep(name, storage))


@app.command()
@user_errors
def sync(
    name: str = typer.Argument(..., help="Sweep name."),
    storage: Optional[str] = typer.Option(None, help="Where the sweep lives."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: the sweep's)."),
    wait: float = typer.Option(30.0, help="Seconds to keep retrying."),
) -> None:
    """Deliver tracking data the MLflow server missed while it was down; end the runs a killed
    driver left RUNNING (its trials labelled stopped, until the sweep resumes)."""
    from sweeper.local import sync_tracking

    if not (math.isfinite(wait) and wait >= 0):  # NaN would retry a down server for ever
        raise ConfigError([f"--wait {wait}: seconds to keep retrying must be a number >= 0"])
    if not sync_tracking(name, storage, tracking_uri=tracking_uri, wait_s=wait):
        raise typer.Exit(EXIT_UNDELIVERED)


@app.command()
@user_errors
def report(
    name: str = typer.Argument(..., help="Sweep name."),
    storage: Optional[str] = typer.Option(None, help="Where the sweep lives."),
    out: Optional[Path] = typer.Option(
        None, help="Directory (default: the sweep record's report/; ./NAME-report for a sweep on "
                   "a URI, whose record's copy goes to the storage too)."),
) -> None:
    """Write the study report (tables, figures, text, one HTML file)."""
    import shutil

    from sweeper.local import existing_record, record_for_readers
    from sweeper.report import build_report

    if out is not None and (problems := file_in_the_way("--out", out)):
        raise ConfigError(problems)
    record, mirror = existing_record(name, storage, with_mirror=True)
    result = build_report(record_for_readers(record, name, storage),
                          record.dir / "report" if mirror or out is None else out)
    html = result.html
    if mirror is not None:  # beside the sweep on its storage, and here to open
        mirror.push()
        target = out or Path(f"{name}-report")
        shutil.copytree(record.dir / "report", target, dirs_exist_ok=True)
        html = target / Path(result.html).name
    console.print(result.summary)
    console.print(f"report: {html}")


@app.command()
@user_errors
def ui(
    name: Optional[str] = typer.Argument(None, help="Sweep name (opens its experiment)."),
    storage: Optional[str] = typer.Option(None, help="Where the sweeps live."),
    host: str = typer.Option("127.0.0.1", help="Bind address; keep it local unless you mean it."),
    port: int = typer.Option(5000, help="Port."),
) -> None:
    """Start the MLflow UI on the sweeps' embedded store and print its URL."""
    from sweeper.local import run_ui

    if run_ui(name, storage, host=host, port=port):
        raise typer.Exit(1)  # the server failed (why is above): never a clean 0


@app.command()
@user_errors
def ensemble(
    name: str = typer.Argument(..., help="Sweep name."),
    top: Optional[int] = typer.Option(
        None, "--top", "-k", help="The K best trials by the sweep's metric at their checkpoint epoch."),
    trials: List[str] = typer.Option(
        [], "--trials", help="Only these trials: ids or names, comma-separated or repeated "
                             "(without --top: all of them)."),
    where: List[str] = typer.Option(
        [], "--where", help="Only trials with KEY=VALUE: outcome, status or a trial setting "
                            "(outcome=completed, model.arch=vgg11); repeatable."),
    storage: Optional[str] = typer.Option(None, help="Where the sweep lives."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: the sweep's)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Soft-voting ensemble of a sweep's best trials on the test split, logged under its MLflow run."""
    from sweeper.ensemble import run_ensemble
    from sweeper.local import existing_record, resolve_storage
    from sweeper.tracking import check_tracking_uri, sweep_tracking_uri
    from sweeper.store import storage_root

    where_storage = resolve_storage(name, storage)
    record = existing_record(name, storage)
    check_tracking_uri(tracking_uri)
    uri = tracking_uri or sweep_tracking_uri(record.meta(), where_storage)
    if not run_ensemble(record, storage_root=storage_root(where_storage), tracking_uri=uri, top=top,
                        trials=trials, where=where, device=device):
        raise typer.Exit(EXIT_UNDELIVERED)


def _exit_for(result) -> None:
    if result.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    if result.outcomes.get("failed"):
        raise typer.Exit(EXIT_FAILED)
    if result.undelivered:
        error_console.print(f"[yellow]{result.undelivered} tracking operation(s) not delivered: "
                            f"{result.tracking_error}[/yellow]")
        raise typer.Exit(EXIT_UNDELIVERED)


def _print_summary(result) -> None:
    from sweeper.console import fmt
    from sweeper.store import redacted_root

    counts = sorted(result.outcomes.items())
    if result.planned > result.trials:  # a stopped sweep: the trials it never started count too
        counts.append(("not started", result.planned - result.trials))
    outcomes = ", ".join(f"{n} {k}" for k, n in counts)
    console.print(f"sweep {result.name!r}: {max(result.planned, result.trials)} trials ({outcomes}); "
                  f"{result.epochs} epochs run; results in {redacted_root(result.experiment_dir)}")
    if result.interrupted:
        from sweeper.store import resume_command

        console.print(f"stopped before its end: "
                      f"{resume_command(result.name, result.storage, cluster=result.cluster)} (or the same "
                      "launch command) continues it", style="yellow")
    if result.best:
        console.print(f"best: {result.best['name']} "
                      + " ".join(f"{k}={fmt(v)}" for k, v in result.best["best"].items()
                                 if k in ("val_accuracy", "val_loss", "epoch")))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
