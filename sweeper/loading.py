"""Loading a search-space file: run it under a time limit, turn every way it fails into a ConfigError.

:func:`load_sweep` reads the file (not there, a directory, not Python, not UTF-8 are refused before
it runs), executes it with a SIGALRM time limit (an endless loop at import is refused, not waited on),
and turns anything it raises -- a syntax error, a missing module, a bad ``tune`` domain,
``sys.exit()``, ``KeyboardInterrupt`` -- into ``"{path}:{line}: {ErrorType}: {message}"`` with the line
of the failing statement in the file. Then it finds the one ``Sweep`` and applies command-line
overrides; :class:`sweeper.spaces.Sweep` checks the rest.

Ray's and torch's slow first imports happen before the timer starts, so they never count against a
file's limit (an alarm inside a half-finished import of torch crashed the process). Where Ray is not
installed, the file's ``from ray import tune`` gets :mod:`sweeper.tune_standin` for the time it
loads, so ``debug`` and ``validate`` work beside torch alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import os
import re
import signal
import sys
import threading
import time
import types
from pathlib import Path
from typing import Sequence

from sweeper.config import ConfigError

from sweeper.spaces import Sweep, apply_overrides, read_overrides, with_override_problems

__all__ = ["LOAD_TIMEOUT_ENV", "LOAD_TIMEOUT_S", "load_sweep"]

# Loading a search-space file may take this long (seconds) before it is refused as hung.
LOAD_TIMEOUT_S = 30.0
LOAD_TIMEOUT_ENV = "SWEEPER_LOAD_TIMEOUT"


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
    values, problems = read_overrides(overrides)
    return with_override_problems(problems, lambda: apply_overrides(sweep, values)), text


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


class _OsExit(BaseException):
    """os._exit called by a search-space file while it loads."""

    def __init__(self, code: object) -> None:
        super().__init__(code)
        self.code = code


def _refuse_os_exit(code: object = 0) -> None:
    raise _OsExit(code)


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
    for name in warm:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 -- Sweep validation or the file's import will say what is wrong
            pass
    standin = _ray_standin() if _RAY_IMPORT.search(data) else {}
    module = types.ModuleType(module_name)
    module.__file__ = filename
    timer = _AlarmTimer(limit)
    sys.modules[module_name] = module  # dataclasses and pickling look a class's module up here
    shadowed = {name: sys.modules.get(name, _ABSENT) for name in standin}
    sys.modules.update(standin)
    # os._exit ends the process with no exception to catch: `validate a.py b.py` once exited 0 in
    # silence, never checking b.py. While the file runs it raises instead; the file sees its own
    # path as argv, not sweeper's command line.
    real_exit, real_argv = os._exit, sys.argv
    os._exit = _refuse_os_exit
    sys.argv = [filename]
    try:
        try:
            timer.start()
            exec(code, module.__dict__)
        finally:
            timer.stop()
            os._exit, sys.argv = real_exit, real_argv
    except _OsExit as exc:
        raise ConfigError([f"{_where(path, _line_in(exc.__traceback__, filename))}called "
                           f"os._exit({exc.code!r}) while being loaded; a search-space file only "
                           "defines SWEEP"]) from None
    except _LoadTimeout as exc:
        raise ConfigError([f"{_where(path, _line_in(exc.__traceback__, filename))}TimeoutError: took "
                           f"longer than {limit:g} s to load (an endless loop at import?); "
                           f"{LOAD_TIMEOUT_ENV}=SECONDS allows more"]) from None
    except ConfigError as exc:
        raise ConfigError([f"{path}: {p}" for p in exc.problems]) from None
    except BaseException as exc:  # noqa: B036 -- SystemExit, KeyboardInterrupt: the file's, not ours
        raise ConfigError([_raised_problem(path, exc, ray_missing=bool(standin))]) from None
    finally:
        timer.stop()  # again: the alarm may have interrupted the first stop
        sys.modules.pop(module_name, None)
        for name, before in shadowed.items():  # the stand-in never outlives the file's loading
            if before is _ABSENT:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = before
    if timer.fired:  # the file caught our timeout and went on
        raise ConfigError([f"{path}: TimeoutError: took longer than {limit:g} s to load (an endless "
                           f"loop at import?); {LOAD_TIMEOUT_ENV}=SECONDS allows more"])
    return module


_ABSENT = object()
# Does the file import Ray: `from ray...`, `import ray...` (also `import os, ray.tune as tune`), or
# importlib.import_module("ray..."). A false match only costs Ray's import before the timer starts.
_RAY_IMPORT = re.compile(rb"^[ \t]*(from[ \t]+ray\b|import[ \t][^#\n]*\bray\b)"
                         rb"|import_module\([ \t]*[\"']ray\b", re.MULTILINE)


def _ray_standin() -> dict[str, types.ModuleType]:
    """Nothing where Ray imports; else the ``ray``/``ray.tune`` stand-ins for the file's loading.

    Importing ``ray.tune`` here is also the slow first import the file's time limit must not count.
    Only a Ray that is not there calls for the stand-in: one that is installed but broken (a missing
    dependency of its own) fails again in the file's own import, which names its line.
    """
    try:
        importlib.import_module("ray.tune")
    except ModuleNotFoundError as exc:
        if exc.name in ("ray", "ray.tune"):  # not installed (or import blocked: None in sys.modules)
            from sweeper import tune_standin
            return tune_standin.ray_modules()
    except Exception:  # noqa: BLE001 -- a broken Ray: the file's import says what is wrong
        pass
    return {}


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


def _key_of_failing_value(path: Path, tb: types.TracebackType | None) -> str | None:
    """The space's key whose value raised, as in ``"optim.lr": tune.loguniform(0, 1)``: Ray's own
    message ("LogUniform requires a lower bound greater than 0") names no field. Found from the
    failing expression's column in the file's innermost frame (Python 3.11's code positions) and
    the last ``"key":`` before it on its line, unless the value it begins has ended by then."""
    last = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == str(path):
            last = tb
        tb = tb.tb_next
    if last is None:
        return None
    positions = getattr(last.tb_frame.f_code, "co_positions", None)  # Python >= 3.11
    try:
        line, _, col, _ = list(positions())[last.tb_lasti // 2]
    except (TypeError, IndexError, ValueError):  # 3.10 (None), or no position for the instruction
        return None
    if line is None or col is None:
        return None
    import linecache

    text = linecache.getline(str(path), line)[:col]
    keys = list(re.finditer(r"""["']([A-Za-z_][\w.]*)["']\s*:""", text))
    if not keys:
        return None
    depth = 0
    for ch in text[keys[-1].end():]:  # a comma outside brackets: that key's value ended before
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth < 0 or (ch == "," and depth == 0):
            return None
    return keys[-1].group(1)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _syntax_problem(path: Path, exc: SyntaxError) -> str:
    name = type(exc).__name__  # SyntaxError, IndentationError, TabError
    if exc.filename in (str(path), None):
        line = f" `{exc.text.strip()[:60]}`" if exc.text and exc.text.strip() else ""
        col = f", column {exc.offset}" if exc.offset else ""
        return f"{_where(path, exc.lineno)}{name}: {exc.msg}{col}{line}"
    return f"{exc.filename}:{exc.lineno}: {name}: {exc.msg}"


def _raised_problem(path: Path, exc: BaseException, *, ray_missing: bool = False) -> str:
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
    if ray_missing and isinstance(exc, ImportError) and (exc.name or "").partition(".")[0] == "ray":
        # `from ray.tune import Tuner` hides the stand-in's own AttributeError behind "cannot import"
        from sweeper.tune_standin import SAMPLING

        message += (f" (Ray is not installed in this Python, {sys.executable}: without it a search-space "
                    f"file may use only ray.tune's {', '.join(SAMPLING)})")
    elif isinstance(exc, ModuleNotFoundError):
        message += f" (is it installed in this Python, {sys.executable}?)"
    if (key := _key_of_failing_value(path, exc.__traceback__)) is not None:
        message += f" (in the value given for {key!r})"
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
