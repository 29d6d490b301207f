"""Search-space files and the validated :class:`Sweep` they define.

A search space is a Python file with one module-level ``SWEEP = Sweep(...)`` whose ``space`` maps
dotted trial settings (``"model.arch"``, ``"optim.lr"``; see :mod:`sweeper.config`) to fixed values or
Ray Tune sampling primitives (``tune.choice``, ``tune.loguniform``, ``tune.grid_search``, ...).

Loading (:func:`load_sweep`) runs the file under a time limit and turns every way it can fail (not
there, not Python, not UTF-8, a syntax error, an exception, ``sys.exit()``, an endless loop) into a
ConfigError naming the file and line. It then applies command-line overrides and checks everything it
can before any Ray process starts, reporting **all** problems at once: Sweep fields, the metric and mode,
unknown trial settings, every domain under the search algorithm that will sample it, and every
categorical value and numeric bound of the space, each validated as a trial config would be.
:func:`dry_run` then builds one sampled model on the CPU and pushes a batch through it.
:func:`describe_domain` and :func:`space_signature` describe a space as stable text.

This module does not import Ray: it recognises Tune's domains by their duck type, so ``sweeper debug``
works wherever torch does (a file that itself imports Ray needs Ray, of course; :func:`load_sweep`
then imports ``ray.tune`` just before running it, so that Ray's slow first import is not counted
against the file's time limit).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import itertools
import math
import os
import random
import re
import signal
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from sweeper.config import EPOCH_METRICS, ConfigError, TrialConfig, parse_value

__all__ = [
    "ALIASES",
    "Sweep",
    "corner_values",
    "describe_domain",
    "dry_run",
    "grid_cells",
    "load_sweep",
    "parse_overrides",
    "run_space",
    "sample_config",
    "space_signature",
    "trial_count",
]

# Short names for the settings people change most on the command line.
ALIASES: dict[str, str] = {
    "dataset": "data.name",
    "data_dir": "data.dir",
    "width": "model.width",
    "batch_size": "data.batch_size",
    "limit": "data.limit",
    "lr": "optim.lr",
}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# Loading a search-space file may take this long (seconds) before it is refused as hung.
LOAD_TIMEOUT_S = 30.0
LOAD_TIMEOUT_ENV = "SWEEPER_LOAD_TIMEOUT"
# resources="auto": GPU shares from a measured memory probe (sweeper.packing).
AUTO = "auto"
Resources = Mapping[str, float] | Callable[[TrialConfig], Mapping[str, float]] | str


@dataclass(frozen=True)
class Sweep:
    """A study: what to vary, how to search, and how to run trials. Constructing one validates it."""

    name: str
    space: Mapping[str, Any]
    question: str = ""  # defaults to the search-space file's docstring
    metric: str = "val_accuracy"
    mode: str = "max"
    max_epochs: int = 10  # every trial's epoch budget; ASHA's max_t
    scheduler: str = "asha"  # 'asha' or 'fifo' (no early stopping)
    # ASHA compares a trial with the trials of its own grid cell ('cell': every cell keeps its best
    # lr to the end, so "this cell stalled" means at its best lr) or with the whole sweep ('sweep').
    prune_within: str = "cell"
    grace_period: int = 1  # ASHA: epochs before a trial can be stopped
    reduction_factor: int = 3  # ASHA: each rung keeps the top 1/reduction_factor
    search: str = "random"  # 'random' (Ray's basic generator, grid axes expanded) or 'optuna' (TPE)
    num_samples: int = 1  # samples per grid cell (random) / trials in all (optuna)
    # Replicates: every cell runs once per seed (seed, seed+1, ...), each with its own samples and its
    # own ASHA rungs, so a verdict can say "trains in 3/3 seeds".
    seeds: int = 1
    # Per trial, e.g. {"cpu": 1, "gpu": 0.25}, a function of the TrialConfig (deep VGGs need more), or
    # "auto": as many trials per GPU as a measured training step says fit (sweeper.packing).
    resources: Resources = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    max_concurrent: int | None = None  # None: as many as the cluster fits
    seed: int = 0  # drives sampling, and every trial's seed unless the space sets "seed"
    max_failures: int = 1  # retries of a failed trial, from its last checkpoint
    keep_checkpoints: int = 1
    storage: str | None = None  # local dir or s3://, gs:// URI; None: ./sweeps

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def replace(self, **changes: Any) -> "Sweep":
        return dataclasses.replace(self, **changes)

    def problems(self) -> list[str]:
        p: list[str] = []
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            p.append(f"name={self.name!r} must be 1-100 letters, digits, '_', '-' or '.', "
                     "starting with a letter or digit")
        if not isinstance(self.space, Mapping):
            p.append(f"space must be a dict of 'section.name' -> value or tune domain, "
                     f"not {type(self.space).__name__}")
            return p
        if self.mode not in ("max", "min"):
            p.append(f"mode={self.mode!r} is not one of ['max', 'min']")
        p.extend(_metric_problems(self.metric, self.mode))
        if isinstance(self.seeds, int) and self.seeds > 1 and isinstance(self.space, Mapping):
            if "seed" in self.space:
                p.append(f"seeds={self.seeds} replicates every cell with its own seed, but the space "
                         "sets 'seed' too: keep one of them")
            if self.search == "optuna":
                p.append(f"seeds={self.seeds} needs search='random' (replicates are a grid axis)")
        if self.prune_within not in ("cell", "sweep"):
            p.append(f"prune_within={self.prune_within!r} is not one of ['cell', 'sweep']")
        if self.scheduler not in ("asha", "fifo"):
            p.append(f"scheduler={self.scheduler!r} is not one of ['asha', 'fifo']")
        if self.search not in ("optuna", "random"):
            p.append(f"search={self.search!r} is not one of ['optuna', 'random']")
        for key, lo in (("max_epochs", 1), ("grace_period", 1), ("num_samples", 1), ("seeds", 1),
                        ("max_failures", 0), ("keep_checkpoints", 1), ("seed", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                p.append(f"{key}={value!r} must be an integer >= {lo}")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 2:
            p.append(f"reduction_factor={self.reduction_factor!r} must be an integer >= 2")
        if isinstance(self.grace_period, int) and isinstance(self.max_epochs, int) \
                and self.grace_period > self.max_epochs:
            p.append(f"grace_period={self.grace_period} must be <= max_epochs={self.max_epochs}")
        if self.max_concurrent is not None and (isinstance(self.max_concurrent, bool) or
                not isinstance(self.max_concurrent, int) or self.max_concurrent < 1):
            p.append(f"max_concurrent={self.max_concurrent!r} must be None or an integer >= 1")
        if not callable(self.resources) and self.resources != AUTO:
            p.extend(_resource_problems("resources", self.resources))
        p.extend(self._space_problems())
        if self.search == "optuna" and any(_is_grid(v) for v in self.space.values()):
            grid = [k for k, v in self.space.items() if _is_grid(v)]
            p.append(f"search='optuna' cannot expand grid axes {grid}: use search='random' for a "
                     "factorial grid, or tune.choice for Optuna to pick from")
        return p

    def _space_problems(self) -> list[str]:
        p: list[str] = []
        if "epochs" in self.space:  # one budget for ASHA and the trials: the Sweep's
            p.append(f"space['epochs'] is set by the Sweep: use max_epochs={self.space['epochs']!r}")
        sweep_fields = {f.name for f in dataclasses.fields(Sweep)} - {"seed"}  # seed: both
        checked: dict[str, Any] = {}
        wrong: list[str] = []  # keys whose domain is wrong
        for key, value in self.space.items():
            if not isinstance(key, str):
                p.append(f"space key {key!r} must be a string 'section.name' (e.g. 'optim.lr')")
                continue
            if key in sweep_fields:
                p.append(f"space[{key!r}] is a Sweep setting, not a trial setting: pass "
                         f"Sweep({key}=...) (or {key}=... on the command line)")
                continue
            problems = _domain_problems(key, value, self.search)
            p.extend(problems)
            if problems:
                wrong.append(key)
            elif key != "epochs":
                checked[key] = value
        # Keys whose domain is wrong are left out of the trial-config checks; drop what those checks
        # then say about them (e.g. "model.depth is required"), which would only confuse.
        about_wrong = re.compile("|".join(rf"(?<![\w.]){re.escape(k)}(?!\w)" for k in wrong) or "(?!)")
        try:
            for cfg_problems in _corner_problems(self, checked):
                p.extend(x for x in cfg_problems if x not in p and not about_wrong.search(x))
        except ConfigError as exc:
            p.extend(exc.problems)
        return p


def _metric_problems(metric: Any, mode: Any) -> list[str]:
    """The metric must be one a trial reports every epoch, and the mode must agree with it."""
    allowed = sorted(EPOCH_METRICS)
    if not isinstance(metric, str) or metric not in EPOCH_METRICS:
        hint = ""
        if isinstance(metric, str):
            if metric.startswith("test_"):
                hint = ("; test metrics exist only after the last epoch, so ASHA and Optuna cannot "
                        "compare trials on them")
                if "val_" + metric[5:] in EPOCH_METRICS:
                    hint += f": use {'val_' + metric[5:]!r}"
            else:
                short = {"accuracy": "val_accuracy", "acc": "val_accuracy", "val_acc": "val_accuracy",
                         "loss": "val_loss", "error": "val_top1_error", "top1_error": "val_top1_error",
                         "top5_error": "val_top5_error", "train_acc": "train_accuracy"}
                close = [short[metric]] if metric in short else \
                    difflib.get_close_matches(metric, allowed, n=2, cutoff=0.6)
                if close:
                    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?"
        return [f"metric={metric!r} is not a metric every trial reports each epoch{hint} "
                f"(one of {allowed})"]
    better = EPOCH_METRICS[metric]
    if mode in ("max", "min") and mode != better:
        word = "lower" if better == "min" else "higher"
        return [f"mode={mode!r} contradicts metric={metric!r}, which is better {word}: "
                f"mode={mode!r} would keep the worst trials; use mode={better!r}"]
    return []


# ---- loading ------------------------------------------------------------------------------------------


def load_sweep(path: str | Path, overrides: Sequence[str] = (), *,
               timeout_s: float | None = None) -> tuple[Sweep, str]:
    """Import a search-space file and apply ``key=value`` overrides; return (sweep, file text).

    Every way a file can fail to load becomes a ConfigError, never a traceback: a missing file, a
    directory, a non-Python or non-UTF-8 file, and anything the file raises while it runs (a syntax
    error, a missing module, a bad ``tune`` domain, ``sys.exit()``, ``KeyboardInterrupt``). Each such
    problem reads ``"{path}:{line}: {ErrorType}: {message}"``, with the line of the failing statement in
    the file. Loading is limited to ``timeout_s`` seconds (default $SWEEPER_LOAD_TIMEOUT, else 30; 0 for
    no limit; enforced with SIGALRM, so only in the main thread). ConfigErrors raised inside the file
    (``Sweep(...)`` validation) keep their problems, each prefixed with ``"{path}: "``.
    """
    path = Path(path)
    data = _read_space_file(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([f"{path}:{line}: UnicodeDecodeError: byte {data[exc.start]:#04x} at column "
                           f"{column} is not UTF-8; save the file as UTF-8"]) from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # as Path.read_text gives it
    limit = _load_timeout(timeout_s)
    module = _exec_space(path, data, limit)
    sweep = _the_sweep(path, module)
    if not sweep.question and isinstance(module.__doc__, str) and module.__doc__.strip():
        sweep = sweep.replace(question=module.__doc__.strip())
    return apply_overrides(sweep, parse_overrides(overrides)), text


def _read_space_file(path: Path) -> bytes:
    """The file's bytes, or a ConfigError saying why this path is no search-space file."""
    what = "a search space is a Python file (.py) that defines SWEEP = Sweep(...)"
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.py"))[:5]
        hint = f" (it holds {', '.join(inside)}: give one of them)" if inside else ""
        raise ConfigError([f"{path}: is a directory, not a search-space file{hint}; {what}"])
    if not path.exists():
        hint = ""
        if path.parent.is_dir():
            near = difflib.get_close_matches(path.name, [p.name for p in path.parent.glob("*.py")],
                                             n=1, cutoff=0.6)
            if near:
                hint = f"; did you mean {str(path.parent / near[0])!r}?"
        raise ConfigError([f"{path}: search-space file does not exist{hint}"])
    if not path.is_file():
        raise ConfigError([f"{path}: is not a regular file; {what}"])
    suffix = path.suffix.lower()
    if suffix != ".py":
        kind = f"a {suffix} file" if suffix else "a file without the .py suffix"
        raise ConfigError([f"{path}: is {kind}, not a Python search-space file; {what}"])
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot be read: {exc.strerror or exc}"]) from None


def _load_timeout(timeout_s: float | None) -> float:
    if timeout_s is not None:
        return float(timeout_s)
    raw = os.environ.get(LOAD_TIMEOUT_ENV, "").strip()
    if not raw:
        return LOAD_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise ConfigError([f"{LOAD_TIMEOUT_ENV}={raw!r} must be a number of seconds >= 0 "
                           "(0: no limit)"])
    return value


class _LoadTimeout(BaseException):
    """Raised into a space file that runs past its loading time limit."""


def _exec_space(path: Path, data: bytes, limit: float) -> types.ModuleType:
    """Run the file's code in a fresh module; every failure becomes a ConfigError naming its line."""
    filename = str(path)
    module_name = "_sweeper_space_" + re.sub(r"\W", "_", path.stem)
    try:
        code = compile(data, filename, "exec", dont_inherit=True)
    except SyntaxError as exc:
        if exc.lineno is None and b"\0" in data:  # "source code string cannot contain null bytes"
            exc.lineno = data[:data.find(b"\0")].count(b"\n") + 1
        raise ConfigError([_syntax_problem(path, exc)]) from None
    except ValueError as exc:  # NUL bytes, before Python 3.12
        line = data[:data.find(b"\0")].count(b"\n") + 1 if b"\0" in data else None
        raise ConfigError([f"{_where(path, line)}SyntaxError: {exc}"]) from None
    # Slow first imports are not the file's time: what Sweep(...) validation imports (torch, via the
    # model and dataset registries) and, if the file imports it, Ray.
    warm = ["sweeper.data", "sweeper.inits", "sweeper.models"]
    if re.search(rb"^\s*(from|import)\s+ray\b", data, re.MULTILINE):
        warm.append("ray.tune")
    for name in warm:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 -- Sweep validation or the file's import will say what is wrong
            pass
    module = types.ModuleType(module_name)
    module.__file__ = filename
    timer = _AlarmTimer(limit)
    sys.modules[module_name] = module  # dataclasses and pickling look a class's module up here
    try:
        try:
            timer.start()
            exec(code, module.__dict__)
        finally:
            timer.stop()
    except _LoadTimeout as exc:
        raise ConfigError([f"{_where(path, _line_in(exc.__traceback__, filename))}TimeoutError: took "
                           f"longer than {limit:g} s to load (an endless loop at import?); "
                           f"{LOAD_TIMEOUT_ENV}=SECONDS allows more"]) from None
    except ConfigError as exc:
        raise ConfigError([f"{path}: {p}" for p in exc.problems]) from None
    except BaseException as exc:  # noqa: B036 -- SystemExit, KeyboardInterrupt: the file's, not ours
        raise ConfigError([_raised_problem(path, exc)]) from None
    finally:
        timer.stop()  # again: the alarm may have interrupted the first stop
        sys.modules.pop(module_name, None)
    if timer.fired:  # the file caught our timeout and went on
        raise ConfigError([f"{path}: TimeoutError: took longer than {limit:g} s to load (an endless "
                           f"loop at import?); {LOAD_TIMEOUT_ENV}=SECONDS allows more"])
    return module


class _AlarmTimer:
    """SIGALRM after ``limit`` seconds raises _LoadTimeout; stop() restores the previous handler and
    timer (e.g. pytest-timeout's). Only in the main thread (where Python runs signal handlers) and
    where setitimer exists; elsewhere loading has no time limit."""

    def __init__(self, limit: float):
        self.limit = limit
        self.fired = self.armed = False
        self.active = (limit > 0 and hasattr(signal, "setitimer")
                       and threading.current_thread() is threading.main_thread())

    def _handler(self, signum, frame):
        if not self.armed:
            return
        if _in_import(frame) and time.monotonic() - self.started < max(10 * self.limit, 60.0):
            # Interrupting an import can leave a C extension half-initialised (importing torch again
            # then crashed the process): let the import finish and check again; only an import that
            # itself hangs (10x the limit, at least a minute) is interrupted.
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            return
        self.fired = True
        raise _LoadTimeout()

    def start(self) -> None:
        if self.active:
            self.previous = signal.signal(signal.SIGALRM, self._handler)
            self.started = time.monotonic()
            self.armed = self.running = True
            self.outer = signal.setitimer(signal.ITIMER_REAL, self.limit)

    def stop(self) -> None:
        self.armed = False  # from here on the handler raises nothing, so this cannot be interrupted
        if not getattr(self, "running", False):
            return
        self.running = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous if self.previous is not None else signal.SIG_DFL)
        delay, interval = self.outer
        if delay > 0:  # someone else's timer was running: put it back, less the time we took
            left = delay - (time.monotonic() - self.started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), interval)


def _in_import(frame: types.FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}: " if line else f"{path}: "


def _line_in(tb: types.TracebackType | None, filename: str) -> int | None:
    """The line of the innermost frame of ``filename`` in a traceback."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _syntax_problem(path: Path, exc: SyntaxError) -> str:
    name = type(exc).__name__  # SyntaxError, IndentationError, TabError
    if exc.filename in (str(path), None):
        line = f" `{exc.text.strip()[:60]}`" if exc.text and exc.text.strip() else ""
        col = f", column {exc.offset}" if exc.offset else ""
        return f"{_where(path, exc.lineno)}{name}: {exc.msg}{col}{line}"
    return f"{exc.filename}:{exc.lineno}: {name}: {exc.msg}"


def _raised_problem(path: Path, exc: BaseException) -> str:
    """'{path}:{line}: {ErrorType}: {message}' for whatever a space file raised while loading."""
    where = _where(path, _line_in(exc.__traceback__, str(path)))
    name = type(exc).__name__
    if isinstance(exc, SystemExit):
        return (f"{where}SystemExit: called sys.exit({exc.code!r}) while being loaded; a search-space "
                "file must only define SWEEP = Sweep(...)")
    if isinstance(exc, KeyboardInterrupt):
        return f"{where}KeyboardInterrupt: interrupted while being loaded"
    if isinstance(exc, SyntaxError):  # from a module the file imports
        return f"{where}{name} in {exc.filename}:{exc.lineno}: {exc.msg}"
    message = _one_line(str(exc))
    if isinstance(exc, TypeError):
        match = re.search(r"Sweep\.__init__\(\) got an unexpected keyword argument '(\w+)'", message)
        if match:
            fields = [f.name for f in dataclasses.fields(Sweep)]
            close = difflib.get_close_matches(match.group(1), fields, n=2, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            message += f"{hint} (Sweep's settings: {', '.join(fields)})"
    if isinstance(exc, ModuleNotFoundError):
        message += f" (is it installed in this Python, {sys.executable}?)"
    return f"{where}{name}: {message}" if message else f"{where}{name}"


def _the_sweep(path: Path, module: types.ModuleType) -> Sweep:
    found = {k: v for k, v in vars(module).items() if isinstance(v, Sweep)}
    if len(found) == 1:
        return next(iter(found.values()))
    if not found and "SWEEP" in vars(module):
        raise ConfigError([f"{path}: SWEEP is a {type(module.SWEEP).__name__}, not a Sweep: write "
                           "SWEEP = Sweep(name=..., space={...})"])
    names = f" ({', '.join(found)})" if found else ""
    raise ConfigError([f"{path}: must define exactly one Sweep (e.g. SWEEP = Sweep(...)); "
                       f"found {len(found)}{names}"])


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r} is not key=value (e.g. max_epochs=6 or model.width=1/8)")
            continue
        out[ALIASES.get(key.strip(), key.strip())] = parse_value(value.strip())
    if problems:
        raise ConfigError(problems)
    return out


def apply_overrides(sweep: Sweep, overrides: Mapping[str, Any]) -> Sweep:
    """Sweep fields by name (max_epochs=6); anything else is a fixed trial setting (data.name=digits)."""
    sweep_fields = {f.name for f in dataclasses.fields(Sweep)} - {"space", "question", "resources"}
    changes = {k: v for k, v in overrides.items() if k in sweep_fields}
    space = dict(sweep.space)
    space.update({k: v for k, v in overrides.items() if k not in sweep_fields})
    if "storage" in changes and changes["storage"] is not None:
        changes["storage"] = str(changes["storage"])
    return sweep.replace(space=space, **changes)


# ---- domains: description and checks, by duck type (no Ray import) -----------------------------------

_OPTUNA_DOMAINS = ("tune.uniform, tune.quniform, tune.loguniform, tune.randint, tune.qrandint, "
                   "tune.lograndint or tune.choice")
_OPTUNA_CHOICE_TYPES = (bool, int, float, str)  # and None: what Optuna's storage can hold


@dataclass(frozen=True)
class _Domain:
    """What a Tune domain samples: kind 'float'/'int'/'choice'/'function' (else the class name),
    sampler 'uniform'/'loguniform'/'normal'/'grid'/'function' (else the sampler's class name)."""

    kind: str
    sampler: str
    q: Any = None  # quantisation step, None if not quantised
    lower: Any = None
    upper: Any = None
    mean: Any = None
    sd: Any = None
    categories: tuple = ()
    func: Any = None


def _domain(value: Any) -> _Domain:
    kinds = {"Float": "float", "Integer": "int", "Categorical": "choice", "Function": "function"}
    names = [c.__name__ for c in type(value).__mro__]
    kind = next((kinds[n] for n in names if n in kinds), type(value).__name__)
    try:
        sampler = value.get_sampler()
    except Exception:  # noqa: BLE001 -- a foreign domain: describe what we can
        sampler = getattr(value, "sampler", None)
    q = None
    if sampler is not None and hasattr(sampler, "q") and hasattr(sampler, "sampler"):  # Quantized
        q, sampler = sampler.q, sampler.sampler
    sampler_names = {c.__name__ for c in type(sampler).__mro__} if sampler is not None else set()
    for label in ("LogUniform", "Normal", "Uniform", "Grid"):
        if label in sampler_names:
            how = label.lower()
            break
    else:
        how = "function" if kind == "function" else type(sampler).__name__.lstrip("_").lower()
    categories = tuple(getattr(value, "categories", ()) or ()) if kind == "choice" else ()
    return _Domain(kind=kind, sampler=how, q=q, lower=getattr(value, "lower", None),
                   upper=getattr(value, "upper", None), mean=getattr(sampler, "mean", None),
                   sd=getattr(sampler, "sd", None), categories=categories,
                   func=getattr(value, "func", None))


_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")


def _text(value: Any) -> str:
    """repr, with numpy scalars as Python numbers and memory addresses dropped (stable across runs)."""
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(_text(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()
    return _ADDRESS_RE.sub("", repr(value))


def describe_domain(value: Any) -> str:
    """Readable, stable text for any space value: ``loguniform(0.001, 0.1)``, ``randint(1, 5)``,
    ``choice(['a', 'b'])``, ``grid_search([11, 13])``, ``qrandint(8, 64, 8)``, ``randn(0.0, 1.0)``;
    a plain value as its repr. Equal values give equal texts in every process."""
    if _is_grid(value):
        values = value["grid_search"]
        return f"grid_search({_text(list(values) if isinstance(values, tuple) else values)})"
    if not _is_domain(value):
        return _text(value)
    d = _domain(value)
    q = "" if d.q is None else f", {_text(d.q)}"
    prefix = "" if d.q is None else "q"
    bounds = f"{_text(d.lower)}, {_text(d.upper)}"
    if d.kind == "float" and d.sampler == "uniform":
        return f"{prefix}uniform({bounds}{q})"
    if d.kind == "float" and d.sampler == "loguniform":
        return f"{prefix}loguniform({bounds}{q})"
    if d.kind == "float" and d.sampler == "normal":
        return f"{prefix}randn({_text(d.mean)}, {_text(d.sd)}{q})"
    if d.kind == "int" and d.sampler == "uniform":
        return f"{prefix}randint({bounds}{q})"
    if d.kind == "int" and d.sampler == "loguniform":
        return f"{prefix}lograndint({bounds}{q})"
    if d.kind == "choice":
        text = f"choice({_text(list(d.categories))})"
        return text if d.sampler == "uniform" else f"{text}.{d.sampler}()"
    if d.kind == "function":
        code = getattr(d.func, "__code__", None)
        where = f" at {Path(code.co_filename).name}:{code.co_firstlineno}" if code else ""
        return f"sample_from({getattr(d.func, '__qualname__', _text(d.func))}{where})"
    return _ADDRESS_RE.sub("", f"{type(value).__name__}({d.sampler}"
                               f"{', ' + bounds if d.lower is not None else ''}{q})")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) or (
        type(x).__module__ == "numpy" and hasattr(x, "item")
        and isinstance(x.item(), (int, float)) and not isinstance(x.item(), bool))


def _domain_problems(key: str, value: Any, search: str) -> list[str]:
    """What is wrong with one space entry under the search algorithm that will sample it."""
    where = f"space[{key!r}]"
    if _is_grid(value):
        values = value["grid_search"]
        if not isinstance(values, (list, tuple)) or not values:
            return [f"{where}=grid_search({_text(values)}) needs a non-empty list of values, e.g. "
                    "tune.grid_search([11, 13, 16])"]
        return []
    if not _is_domain(value):
        return []
    text = describe_domain(value)
    d = _domain(value)
    if d.kind == "function":
        if search == "optuna":
            return [f"{where}={text}: search='optuna' cannot convert tune.sample_from (Ray's "
                    f"OptunaSearch takes only {_OPTUNA_DOMAINS})"]
        return [f"{where}={text}: tune.sample_from cannot be checked before the sweep starts (nor "
                "searched by Optuna): use tune.choice / tune.loguniform / tune.grid_search"]
    if d.kind == "choice":
        if not d.categories:
            return [f"{where}=choice([]) has nothing to choose from: give at least one value, "
                    "e.g. tune.choice(['he', 'xavier'])"]
        if d.sampler != "uniform":
            return [f"{where}={text}: a choice must sample uniformly (tune.choice); for every value "
                    "in turn use tune.grid_search([...])"]
        if search == "optuna":
            bad = [c for c in d.categories if c is not None and not isinstance(c, _OPTUNA_CHOICE_TYPES)]
            if bad:
                return [f"{where}={text}: search='optuna' can store only None, bool, int, float or "
                        f"str choices, not {type(bad[0]).__name__} {_text(bad[0])}: choose among "
                        "names or numbers"]
        return []
    if d.kind not in ("float", "int"):
        if search == "optuna":
            return [f"{where}={text}: search='optuna' cannot convert a {type(value).__name__} domain "
                    f"(Ray's OptunaSearch takes only {_OPTUNA_DOMAINS})"]
        return []
    p: list[str] = []
    if d.q is not None and (not _is_number(d.q) or not d.q > 0):
        p.append(f"{where}={text}: the quantisation step q={_text(d.q)} must be a number > 0")
    if d.sampler == "normal":
        if not (_is_number(d.sd) and d.sd > 0 and _is_number(d.mean) and math.isfinite(d.mean)):
            p.append(f"{where}={text}: randn needs a finite mean and sd > 0")
        if search == "optuna":
            p.append(f"{where}={text}: search='optuna' cannot sample a normal distribution (Ray's "
                     f"OptunaSearch takes only {_OPTUNA_DOMAINS}): use tune.uniform or "
                     "tune.loguniform, or search='random'")
        return p
    if d.sampler not in ("uniform", "loguniform"):
        return p + [f"{where}={text}: unsupported sampler {d.sampler!r}"]
    lo, hi = d.lower, d.upper
    if not (_is_number(lo) and _is_number(hi) and math.isfinite(lo) and math.isfinite(hi)):
        return p + [f"{where}={text}: bounds must be finite numbers, e.g. "
                    f"{'tune.randint(1, 5)' if d.kind == 'int' else 'tune.uniform(0.0, 0.5)'}"]
    name = text.partition("(")[0]
    if d.sampler == "loguniform" and not lo > 0:
        p.append(f"{where}={text}: a log scale needs 0 < lower < upper, got lower={_text(lo)}")
    if not lo < hi:
        swap = f" (swap them: {name}({_text(hi)}, {_text(lo)}{'' if d.q is None else ', ' + _text(d.q)}))" \
            if lo > hi else ""
        exclusive = "; randint's upper bound is exclusive: randint(1, 5) draws 1 to 4" \
            if d.kind == "int" and d.q is None else ""
        p.append(f"{where}={text} needs lower < upper, got lower={_text(lo)} "
                 f"{'>' if lo > hi else '='} upper={_text(hi)}{swap}{exclusive}")
    elif d.kind == "int" and d.q is not None and _is_number(d.q) and d.q > 0 \
            and math.floor(hi / d.q) < math.ceil(lo / d.q):
        p.append(f"{where}={text} has no multiple of q={_text(d.q)} between {_text(lo)} and "
                 f"{_text(hi)}, so nothing to sample")
    if search == "optuna" and d.q is not None and d.sampler == "loguniform":
        if d.kind == "float":
            p.append(f"{where}={text}: search='optuna' drops the step q={_text(d.q)} of a log-uniform "
                     f"domain (Ray's OptunaSearch ignores it): use tune.loguniform({_text(lo)}, "
                     f"{_text(hi)}), or search='random'")
        elif d.q != 1:
            p.append(f"{where}={text}: search='optuna' cannot step a log-scaled integer (Optuna "
                     f"allows log only with step 1): use tune.lograndint({_text(lo)}, {_text(hi)}) or "
                     f"tune.qrandint({_text(lo)}, {_text(hi)}, {_text(d.q)})")
    return p


def space_signature(sweep: Sweep) -> dict[str, str]:
    """Everything that decides which trials a sweep runs, as sorted ``{name: text}`` (JSON-ready).

    Space keys map to :func:`describe_domain` texts; the Sweep's settings appear as ``sweep.<field>``
    (metric, mode, max_epochs, scheduler, prune_within, grace_period, reduction_factor, search,
    num_samples, seed),
    and ``sweep.space_order`` lists the keys in order (it decides grid order and which value each
    draw of the seeded sampler goes to). Two loads of one file give equal signatures; any change of a
    key or a value changes it."""
    out = {str(k): describe_domain(v) for k, v in sweep.space.items()}
    for name in ("metric", "mode", "max_epochs", "scheduler", "prune_within", "grace_period",
                 "reduction_factor", "search", "num_samples", "seeds", "seed"):
        out[f"sweep.{name}"] = _text(getattr(sweep, name))
    out["sweep.space_order"] = _text([str(k) for k in sweep.space])
    return dict(sorted(out.items()))


# ---- sampling -----------------------------------------------------------------------------------------


def _is_grid(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"grid_search"}


def _is_domain(value: Any) -> bool:
    # Ray Tune's Domain classes (Categorical, Float, Integer, Function) all expose .sample().
    return callable(getattr(value, "sample", None)) and not isinstance(value, type)


def run_space(sweep: Sweep) -> dict[str, Any]:
    """The space trials are drawn from: the file's, plus a ``seed`` grid axis when ``seeds > 1``."""
    space = dict(sweep.space)
    if sweep.seeds > 1:
        space["seed"] = {"grid_search": [sweep.seed + i for i in range(sweep.seeds)]}
    return space


def grid_cells(sweep: Sweep) -> list[dict[str, Any]]:
    """Every combination of the grid axes, seeds included (one empty cell if there are none)."""
    axes = {k: list(v["grid_search"]) for k, v in run_space(sweep).items() if _is_grid(v)}
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def trial_count(sweep: Sweep) -> int:
    return len(grid_cells(sweep)) * sweep.num_samples


def base_config(sweep: Sweep, values: Mapping[str, Any]) -> dict[str, Any]:
    """The flat trial config: sampled values + the Sweep's epochs and (default) seed."""
    flat = {"seed": sweep.seed}
    flat.update(values)
    flat["epochs"] = sweep.max_epochs
    return flat


def sample_config(sweep: Sweep, seed: int | None = None) -> dict[str, Any]:
    """One flat trial config drawn from the space (grid axes: a random cell), without Ray."""
    import numpy as np

    rng = random.Random(sweep.seed if seed is None else seed)
    state = np.random.RandomState(rng.randrange(2**31))
    values = {}
    for key, value in sweep.space.items():
        if _is_grid(value):
            values[key] = rng.choice(list(value["grid_search"]))
        elif _is_domain(value):
            values[key] = _plain(value.sample(random_state=state))
        else:
            values[key] = value
    return base_config(sweep, values)


def corner_values(value: Any) -> list[Any]:
    """Values that exercise a space entry: every category / grid value, a numeric domain's bounds."""
    if _is_grid(value):
        return list(value["grid_search"])
    if not _is_domain(value):
        return [value]
    if hasattr(value, "categories"):
        return list(value.categories)
    if _domain(value).sampler == "normal":  # unbounded: check its mean
        return [_domain(value).mean]
    if hasattr(value, "lower") and hasattr(value, "upper"):
        lower, upper = value.lower, value.upper
        if type(value).__name__ == "Integer":
            upper = upper - 1  # tune.randint excludes its upper bound
        return [lower, upper]
    return [value]


def _corner_problems(sweep: Sweep, space: Mapping[str, Any] | None = None) -> list[list[str]]:
    """Validate a base config, then each corner value of each key on top of it."""
    space = sweep.space if space is None else space
    corners = {k: corner_values(v) for k, v in space.items()}
    corners = {k: c for k, c in corners.items() if c}
    base = base_config(sweep, {k: c[0] for k, c in corners.items()})
    results = [_config_problems(base)]
    for key, candidates in corners.items():
        for candidate in candidates[1:]:
            results.append(_config_problems({**base, key: candidate}))
    return results


def _config_problems(flat: Mapping[str, Any]) -> list[str]:
    try:
        TrialConfig.from_flat(flat)
    except ConfigError as exc:
        return [f"space: {p}" for p in exc.problems]
    return []


def _resource_problems(name: str, resources: Any) -> list[str]:
    if not isinstance(resources, Mapping):
        return [f"{name}={resources!r} must be a dict like {{'cpu': 1, 'gpu': 0.5}}, a function "
                "of the trial config returning one, or 'auto' (GPU shares from a measured memory "
                "probe)"]
    p = []
    for key, amount in resources.items():
        if key not in ("cpu", "gpu"):
            p.append(f"{name}[{key!r}] is not one of ['cpu', 'gpu']")
        elif isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0 \
                or not math.isfinite(amount):
            p.append(f"{name}[{key!r}]={amount!r} must be a number >= 0")
        elif key == "gpu" and amount > 1 and amount != int(amount):
            p.append(f"{name}['gpu']={amount!r}: fractions are allowed only below 1 GPU")
    if not p and resources.get("cpu", 1) == 0 and resources.get("gpu", 0) == 0:
        p.append(f"{name} asks for no CPU and no GPU; a trial needs at least one")
    return p


def trial_resources(sweep: Sweep, cfg: TrialConfig) -> dict[str, float]:
    """Resources for one trial; a callable ``resources`` is checked on each config it returns for.

    ``resources="auto"`` asks for one CPU and at most one GPU here; the launch replaces the GPU
    share with the measured packing (sweeper.packing).
    """
    name = f"resources(config of {cfg.model.arch})"
    if sweep.resources == AUTO:
        return {"cpu": 1.0, "gpu": 1.0}
    if callable(sweep.resources):
        try:
            resources = sweep.resources(cfg)
        except BaseException as exc:  # noqa: B036 -- the space file's function: never a traceback
            code = getattr(sweep.resources, "__code__", None)
            line = _line_in(exc.__traceback__, code.co_filename) if code else None
            where = f"{code.co_filename}:{line}: " if code and line else ""
            message = _one_line(str(exc))
            raise ConfigError([f"{where}{name} raised {type(exc).__name__}"
                               f"{': ' + message if message else ''}; it must return a dict like "
                               "{'cpu': 1, 'gpu': 0.5}"]) from None
    else:
        resources = sweep.resources
    problems = _resource_problems(name, resources)
    if problems:
        raise ConfigError(problems)
    return {"cpu": float(resources.get("cpu", 1)), "gpu": float(resources.get("gpu", 0))}


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars (configs go to JSON, MLflow and dataclasses)."""
    return value.item() if hasattr(value, "item") else value


# ---- dry run ------------------------------------------------------------------------------------------


def dry_run(sweep: Sweep) -> TrialConfig:
    """Build one sampled model on the CPU and run a forward pass; return the sampled config."""
    import torch

    from sweeper.models import build_model, split_outputs

    cfg = TrialConfig.from_flat(sample_config(sweep))
    if callable(sweep.resources):
        trial_resources(sweep, cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=_num_classes(cfg)).eval()
    from sweeper.data import resolution

    side = resolution(cfg.data)
    with torch.no_grad():
        logits = split_outputs(model(torch.zeros(2, 3, side, side)))[0]
    if logits.shape != (2, _num_classes(cfg)):
        raise ConfigError([f"dry run: {cfg.model.arch} produced logits of shape "
                           f"{tuple(logits.shape)}, expected (2, {_num_classes(cfg)})"])
    return cfg


def _num_classes(cfg: TrialConfig) -> int:
    from sweeper.data import num_classes

    return num_classes(cfg.data) or 10  # imagefolder: any count exercises the model
