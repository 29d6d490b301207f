"""MLflow tracking for a sweep: one parent run per sweep, exactly one child run per trial.

Nothing talks to MLflow directly from the sweep's event loop. Every intent (open the parent run, open a
trial's run, log an epoch, tag an outcome, close a run, upload the report) is appended to a spool file
in the sweep record, and :meth:`Tracker.flush` delivers the spool in order. So:

* a tracking server that is down never ends a sweep: delivery stops at the first failure, backs off,
  and resumes where it stopped when the server is back (``sweeper sync NAME`` delivers by hand);
* a replay never duplicates anything: a trial's run is found again by its ``sweeper.trial_id`` tag
  (after a retry, a driver crash or a restore), and an epoch whose step the run already has is skipped.
  Each step's sentinel metric (``epoch``; ``initial_loss`` at step 0) is logged in the step's last
  request, so a step counts as delivered only when all of it was. Every point carries the trial's own
  timestamp, so a request repeated after a crash is an exact duplicate, which MLflow's SQL store drops.

Two intents attach the *why* where the run is: :meth:`Tracker.log_figure` spools a trial's per-layer
profile, which delivery renders (:mod:`sweeper.profile`) into ``<record>/figures/<trial_id>.png`` and
uploads as the child run's ``profile.png`` artifact, with its ``profile/*`` scalars as child metrics;
:meth:`Tracker.log_parent_metrics` gives the sweep's parent run summary metrics at step 0. Both are
idempotent on replay: a figure is marked done by the run tag ``sweeper.profile`` (the digest of its
inputs, set after the upload), and a parent metric whose latest value already matches is not re-sent.

Delivery runs off the sweep's event loop: the driver callback only appends to the spool and calls
:meth:`Tracker.deliver_soon`, which wakes one background thread; Tune's controller never waits on the
tracking server (a synchronous flush per result cost ~0.5 s each and set the pace of short trials).
The thread gathers for half a second after a wake-up, and a flush sends a trial's pending metrics
and tags, with its new run's params, as one ``log_batch`` (:func:`_plan`): on the SQL store each call
costs a few transactions whatever it carries, and the driver shares its cores with the trials.
The delivery state is saved once per chunk of operations; a chunk cut short is sent again whole,
which every operation allows.
:meth:`Tracker.close` stops that thread before the last, synchronous delivery of a sweep. One delivery of
a spool runs at a time across processes too (an ``flock`` beside it): ``sweeper sync`` may run while
the driver's thread delivers.

This module imports MLflow, never Ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import unquote

from sweeper.records import append_json_line, json_lines, scalar_metrics

__all__ = ["SENTINELS", "Tracker", "check_tracking_uri", "default_tracking_uri", "launch_tracking_uri",
           "redact", "sweep_tracking_uri", "write_artifact", "artifact_relocation"]

SENTINELS = {0: "initial_loss"}  # step -> the key logged last; "epoch" for every other step
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100  # MLflow's log_batch limits
_MAX_PARAM_VALUE, _MAX_TAG_VALUE, _MAX_KEY = 6000, 8000, 250
_MAX_REQUEST_BYTES = 900_000  # under the MLflow server's 1 MB cap on a log_batch body
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_INIT = "init/"
_PROFILE_TAG = "sweeper.profile"  # digest of the profile inputs whose figure the run holds
_BATCHED = {"metrics", "tags"}  # a trial's run of these is one log_batch (see _plan)
_CHUNK = 500  # operations delivered between two saves of the delivery state
_UNSET = "not asked yet"  # a string: it survives pickling as itself
_GATHER_S = 0.5  # the delivery thread waits this long after a wake-up, so that ops arrive together


def redact(value: Any) -> Any:
    """Strip ``user:pass@`` from URIs inside strings; never log credentials."""
    if isinstance(value, str):
        return _CREDENTIALS.sub(r"\g<scheme>***@", value)
    return value


def default_tracking_uri(storage_root: str | Path) -> str:
    """The embedded store: SQLite beside the sweeps (no server needed on one machine)."""
    return f"sqlite:///{Path(storage_root).resolve() / 'mlflow.db'}"


def sweep_tracking_uri(meta: Mapping[str, Any], storage: str | None) -> str:
    """Where a sweep's MLflow runs are, for the verbs that read its record (status, sync, ensemble).

    The URI its launch recorded, except for the embedded store: a local storage folder that was
    moved or copied takes its ``mlflow.db`` with it, and the absolute path the launch recorded names
    the old place (status said "all delivered to" it and sync delivered there). So the default store
    is found beside the storage as it is now. A launch marks it (``tracking_default``); an older
    record is recognised by the recorded path being the default beside its ``experiment_dir``.
    """
    from sweeper.store import is_uri, record_root, storage_root

    here = default_tracking_uri(record_root(storage))
    uri = meta.get("tracking_uri")
    if not uri:
        return here
    if is_uri(storage_root(storage)):  # the default is ./sweeps where the launch ran: keep its path
        return uri
    exp_dir = meta.get("experiment_dir")
    was_default = meta.get("tracking_default")
    if was_default is None and isinstance(exp_dir, str) and not is_uri(exp_dir):
        was_default = uri == default_tracking_uri(Path(exp_dir).parent)
    return here if was_default else uri


def launch_tracking_uri(meta: Mapping[str, Any], storage: str | None,
                        given: str | None) -> tuple[str, str | None]:
    """The store a launch delivers to, and a note when a resumed sweep's runs change store.

    ``given``: --tracking-uri, else $MLFLOW_TRACKING_URI. A resume given neither keeps the store its
    runs are in (:func:`sweep_tracking_uri`): it took the default, and a sweep launched with
    --tracking-uri, or on a URI storage from another working directory, had its runs split between
    two stores (the first left with KILLED runs). Where that store cannot be reached from here (an
    embedded one on another machine, a recorded URI whose credentials were not kept), the default
    is used, and said.
    """
    from sweeper.store import record_root

    default = default_tracking_uri(record_root(storage))
    if not meta.get("tracking_uri"):  # a new sweep
        return given or default, None
    where = sweep_tracking_uri(meta, storage)
    uri = given or where
    reason = ""
    if not given and "***@" in where:
        uri, reason = default, " (its credentials are not kept: pass --tracking-uri to keep it)"
    elif not given and (db := _sqlite_path(where)) is not None and not db.parent.is_dir():
        uri, reason = default, " (not on this machine)"
    if uri == where:
        return uri, None
    return uri, (f"MLflow: this sweep's runs so far are in {redact(where)}{reason}; this launch records "
                 f"to {redact(uri)}, where its runs are made anew from the sweep's record")


def moved_store(meta: Mapping[str, Any], storage: str | None, uri: str) -> str | None:
    """The path a launch recorded for the embedded store ``uri`` is now, if its folder has moved
    since (see :func:`sweep_tracking_uri`); else None."""
    recorded = meta.get("tracking_uri")
    if recorded and recorded != uri and sweep_tracking_uri(meta, storage) == uri:
        return recorded
    return None


def is_default_tracking_uri(uri: str, storage: str | None) -> bool:
    """Whether ``uri`` is the embedded store beside a local storage (what a move carries along)."""
    from sweeper.store import is_uri, record_root, storage_root

    return not is_uri(storage_root(storage)) and uri == default_tracking_uri(record_root(storage))


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` URI (SQLAlchemy's form: three slashes then the path, so
    an absolute path has four); None for anything else, and for an in-memory database."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///"):].split("?", 1)[0])  # as SQLAlchemy decodes it
    return Path(path) if path and path != ":memory:" else None


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a plain ``sqlite:`` URI, which sweeper may create; None for anything
    else. A URI with options (``?mode=ro``, ``sqlite:///file:...?uri=true``) is SQLite's own URI
    form: what it opens, and how, is the user's to say."""
    path = _sqlite_path(uri)
    return None if path is None or "?" in uri or str(path).startswith("file:") else path


# The first 16 bytes of every SQLite 3 database file (sqlite.org/fileformat.html, 1.3).
_SQLITE_HEADER = b"SQLite format 3\x00"


def _not_sqlite(db: Path) -> str | None:
    """Why an existing file cannot be an SQLite database; None when it can (or is not there yet:
    an empty file is one SQLite makes into a database too)."""
    if not db.exists():
        return None
    if db.is_dir():
        return "is a directory, not an SQLite database"
    try:
        with open(db, "rb") as f:
            head = f.read(len(_SQLITE_HEADER))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if head and head != _SQLITE_HEADER:
        return "is not an SQLite database (its first bytes are not SQLite's header)"
    return None


def _create_sqlite_in_wal_mode(uri: str) -> None:
    """A SQLite store this process is about to create starts in write-ahead-log mode.

    In SQLite's default rollback-journal mode every commit syncs a journal file and the database,
    and a reader (``sweeper ui``, the MLflow UI, ``sweeper report``) locks writers out while it
    reads: the delivery thread then waits on the reader, up to MLflow's 20 s busy timeout. In WAL
    mode readers and the writer do not block each other, and MLflow's calls cost 20-30% less CPU
    (a trial's create_run + log_batch + set_terminated: 8.6-11.8 against 10.5-16.6 ms in runs
    here), CPU that a small machine's driver takes from its trials. Commits stay as durable
    (synchronous=FULL, the default of SQLite as Python ships it). The mode is a property of the
    file, so it is set once, when the file is new: a database that already exists (one the user
    made, or one from an older sweeper) is left in the mode its owner chose. WAL keeps two
    companion files (``-wal``, ``-shm``) beside the database: copy the three together (after a
    killed driver, ``-wal`` holds committed runs until the next open folds it back). A reader
    creates them too, so before putting a copy on read-only media, run
    ``sqlite3 mlflow.db 'PRAGMA journal_mode=DELETE'`` on it (with nothing else holding it open).
    """
    path = _sqlite_file(uri)
    if path is None or path.exists():
        return
    import sqlite3

    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()


# Schemes MLflow 3 has a tracking store for (a path without a scheme is a file store); the SQL ones
# may name a driver ("postgresql+psycopg2"). Installed plugins add theirs (entry points).
_URI_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                "databricks-uc", "uc")


def check_tracking_uri(uri: str | None, *, option: str = "--tracking-uri") -> None:
    """A tracking URI whose scheme MLflow has no store for is refused up front (ConfigError, exit 2):
    otherwise a sweep ran its trials and then retried delivery for minutes, and the bad URI stayed
    in its record."""
    from urllib.parse import urlsplit

    from sweeper.config import ConfigError

    if not uri:
        return
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    shown = f"{option} {redact(uri)!r}"
    if uri.strip().lower() in ("databricks", "databricks-uc", "uc"):  # MLflow's own names
        return
    if len(scheme) <= 1 or scheme == "file":  # "" or a Windows drive: a path, MLflow's file store
        # MLflow 3 refuses its file store unless told to (every call raised, so a sweep trained and
        # then retried delivery for minutes, as if a server were down).
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() not in ("true", "1"):
            raise ConfigError([f"{shown}: MLflow 3 keeps its file store (a path or file: URI) in "
                               "maintenance mode and refuses it; use sqlite:///PATH/mlflow.db (the "
                               "default: SQLite beside the sweeps), a server's http(s): URI, or set "
                               "MLFLOW_ALLOW_FILE_STORE=true"])
        return
    if scheme in ("http", "https") and not parts.hostname:
        raise ConfigError([f"{shown}: no host (e.g. http://127.0.0.1:5000)"])
    if scheme == "sqlite" and (db := _sqlite_file(uri)) is not None:
        from sweeper.config import unwritable_directory

        problem = unwritable_directory(db.parent)
        if problem:
            raise ConfigError([f"{shown}: the database's directory {problem}"])
        problem = _not_sqlite(db)
        if problem:
            raise ConfigError([f"{shown}: {db} {problem}: MLflow cannot open it, and a sweep would "
                               "train and then retry delivery for ever; point it at another file, or "
                               "move this one aside (a new store is made where none is)"])
    if scheme.split("+", 1)[0] in _URI_SCHEMES:
        return
    from importlib.metadata import entry_points

    if scheme in {e.name for e in entry_points(group="mlflow.tracking_store")}:
        return
    raise ConfigError([f"{option} {redact(uri)!r}: MLflow has no tracking store for the scheme "
                       f"{scheme!r}; use a sqlite:, postgresql:, mysql:, mssql:, http: or https: "
                       "URI (or a scheme an installed MLflow plugin adds)"])



def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class Tracker:
    """Spools tracking intents for one sweep and delivers them to MLflow."""

    def __init__(self, record_dir: str | Path, tracking_uri: str, experiment: str, sweep_uid: str):
        # MLflow's "Creating initial MLflow database tables..." / "Updating database tables" INFO
        # lines opened every first launch on a storage, above sweeper's own first line.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self.dir = Path(record_dir)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.sweep_uid = sweep_uid
        # The embedded store's path as a launch recorded it, when its storage folder has moved
        # since (sweep_tracking_uri): the delivery state kept under that path is this store's.
        self.moved_from: str | None = None
        self._relocation: Any = _UNSET  # artifact_relocation's answer, once asked
        self._client = None
        self._verified: set[str] = set()  # runs whose logged steps were read back in this process
        # trial_id -> run id of every trial run of this sweep on the server, read once per process
        # (see _existing_trial_run); None until a trial without a known run needs it.
        self._existing: dict[str, str] | None = None
        # run id -> artifact URI of the runs this process created (create_run returns it), so
        # config.json goes straight to the run's artifact store (see _log_config).
        self._artifact_uris: dict[str, str] = {}
        self._next_try = 0.0
        self._backoff = 1.0
        self._lock = _spool_lock(self.dir)  # one delivery at a time: the state is read-modify-write
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._offset_seen: int | None = None  # the spool offset this process's last flush left

    def __getstate__(self):  # the client holds sockets, the thread and lock are this process's
        state = dict(self.__dict__)
        state.update(_client=None, _verified=set(), _existing=None, _artifact_uris={},
                     _next_try=0.0, _backoff=1.0,
                     _lock=None, _wake=None, _closing=None, _thread=None, _offset_seen=None,
                     _relocation=_UNSET)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("_offset_seen", None)  # pickled before it existed
        self.__dict__.setdefault("_artifact_uris", {})  # likewise
        self.__dict__.setdefault("moved_from", None)  # likewise
        self.__dict__.setdefault("_relocation", _UNSET)  # likewise
        self._lock, self._wake, self._closing = (_spool_lock(self.dir), threading.Event(),
                                                 threading.Event())

    # ---- background delivery ----------------------------------------------------------------------

    def deliver_soon(self) -> None:
        """Have the background thread deliver what is spooled; returns at once."""
        if self._thread is None or not self._thread.is_alive():
            self._closing.clear()
            self._thread = threading.Thread(target=self._deliver_loop, name="sweeper-tracking",
                                            daemon=True)
            self._thread.start()
        self._wake.set()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the background thread (after the delivery it is in, if any)."""
        if self._thread is not None:
            self._closing.set()
            self._wake.set()
            self._thread.join(timeout)
            self._thread = None

    def _deliver_loop(self) -> None:
        while not self._closing.is_set():
            # Woken by new work, or every few seconds to retry after a failure (flush backs off).
            self._wake.wait(5.0)
            # Then a moment for what comes with it (a trial's tags and end follow its last result),
            # so that one flush sends them together, and Tune's controller, on the same cores and
            # the same GIL, is interrupted twice a second at most, not at every event.
            self._closing.wait(_GATHER_S)
            self._wake.clear()
            if self._closing.is_set():
                return
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - flush records its errors; never die silently twice
                time.sleep(1.0)

    # ---- files ----------------------------------------------------------------------------------

    @property
    def spool_path(self) -> Path:
        return self.dir / "mlflow_spool.jsonl"

    @property
    def state_path(self) -> Path:
        """Delivery state per tracking server: the spool is one, the servers may be several.

        Resuming or syncing a sweep against another server starts that server's state at the top of
        the spool, so its runs are created there (found again by tag, never twice), and neither
        server's run ids are ever sent to the other. An embedded SQLite store is keyed by its file
        and host as well: the same relative path on two machines is two stores.
        """
        return self._state_path_for(self.tracking_uri)

    def _state_path_for(self, uri: str) -> Path:
        key = redact(uri)
        if key.startswith("sqlite:"):
            key = f"{key}@{socket.gethostname()}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return self.dir / f"mlflow_state-{digest}.json"

    def _state(self) -> dict[str, Any]:
        if self.state_path.is_file():
            return json.loads(self.state_path.read_text())
        if self.moved_from is not None and (before := self._state_path_for(self.moved_from)).is_file():
            # The same store under its new path (its storage folder moved): what was delivered
            # stays delivered, rather than every operation sent again and found again by tag --
            # once delivery has seen the store hold the state's runs (_flush): a sweep's folder
            # copied on its own into another storage finds no store, or another one, there.
            return {**json.loads(before.read_text()), "tracking_uri": redact(self.tracking_uri),
                    "carried_from": redact(self.moved_from)}
        return self._fresh_state()

    def _fresh_state(self) -> dict[str, Any]:
        legacy = self.dir / "mlflow_state.json"  # one unkeyed state, from before servers were keyed
        if legacy.is_file():
            state = json.loads(legacy.read_text())
            if state.get("tracking_uri") in (None, redact(self.tracking_uri)):
                return state
        return {"tracking_uri": redact(self.tracking_uri), "offset": 0, "delivered": 0,
                "experiment_id": None, "parent": None, "runs": {}, "steps": {}, "last_error": None}

    def _save_state(self, state: Mapping[str, Any]) -> None:
        tmp = self.state_path.with_name(f".{self.state_path.name}.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)

    def _enqueue(self, op: Mapping[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        append_json_line(self.spool_path, op)

    def _undelivered(self, state: Mapping[str, Any]) -> list[tuple[int, dict[str, Any]]]:
        """(end offset, operation) for each spooled line past the delivered offset.

        Reading from a byte offset keeps each flush proportional to what is new, not to the
        sweep's whole history. A line without its newline is still being written: it waits.
        """
        return list(json_lines(self.spool_path, state["offset"]))

    def pending(self) -> int:
        return len(self._undelivered(self._state()))

    def last_error(self) -> str | None:
        return self._state().get("last_error")

    def run_ids(self) -> dict[str, str]:
        """trial_id -> MLflow run id, for runs delivered so far."""
        return dict(self._state()["runs"])

    def parent_run_id(self) -> str | None:
        return self._state()["parent"]

    def figure_errors(self) -> dict[str, str]:
        """trial_id -> why its profile could not be drawn (delivery skipped it and went on)."""
        return dict(self._state().get("figure_errors", {}))

    # ---- intents (cheap, never raise on the network) ---------------------------------------------

    def start_sweep(self, *, run_name: str, tags: Mapping[str, Any], params: Mapping[str, Any],
                    texts: Mapping[str, str]) -> None:
        self._enqueue({"op": "parent", "run_name": run_name, "time": _now_ms(), "tags": dict(tags),
                       "params": dict(params), "texts": dict(texts)})

    def start_trial(self, trial_id: str, *, run_name: str, config: Mapping[str, Any],
                    resolved: Mapping[str, Any] | None = None,
                    tags: Mapping[str, Any] | None = None) -> None:
        """The trial's child run: created with ``tags`` (e.g. the code's git SHA) the first time.
        ``config`` (the sweep's values for this trial) become its params; ``resolved`` (every
        setting the trial runs with, defaults included), or else ``config``, its ``config.json``."""
        op = {"op": "child", "trial_id": trial_id, "run_name": run_name, "time": _now_ms(),
              "config": dict(config)}
        if resolved is not None:
            op["resolved"] = dict(resolved)
        if tags:
            op["tags"] = {k: v for k, v in tags.items() if v is not None}
        self._enqueue(op)

    def log_result(self, trial_id: str, result: Mapping[str, Any]) -> None:
        """One Tune result = one MLflow step (the epoch); its init/ part is step 0."""
        timestamp = int(float(result.get("timestamp", time.time())) * 1000)
        result = scalar_metrics(result)  # without Tune's bookkeeping (pid, timestamp, ...)
        init = {k[len(_INIT):]: v for k, v in result.items() if k.startswith(_INIT)}
        if init:
            numbers, strings = _split(init)
            self._enqueue({"op": "metrics", "trial_id": trial_id, "step": 0,
                           "timestamp": timestamp, "metrics": numbers})
            layers = {k: v for k, v in strings.items() if k.startswith("layer/")}
            if layers:
                self._enqueue({"op": "params", "trial_id": trial_id, "params": layers})
        epoch = result.get("epoch")
        if isinstance(epoch, (int, float)):
            numbers, _ = _split({k: v for k, v in result.items() if not k.startswith(_INIT)})
            self._enqueue({"op": "metrics", "trial_id": trial_id, "step": int(epoch),
                           "timestamp": timestamp, "metrics": numbers})

    def set_tags(self, trial_id: str | None, tags: Mapping[str, Any]) -> None:
        self._enqueue({"op": "tags", "trial_id": trial_id, "tags": dict(tags)})

    def finish(self, trial_id: str | None, status: str) -> None:
        self._enqueue({"op": "terminate", "trial_id": trial_id, "status": status, "time": _now_ms()})

    def log_artifacts(self, trial_id: str | None, local_dir: str | Path, artifact_path: str) -> None:
        self._enqueue({"op": "artifacts", "trial_id": trial_id, "local_dir": str(local_dir),
                       "artifact_path": artifact_path})

    def log_figure(self, trial_id: str, initial: Mapping[str, Any], last: Mapping[str, Any], *,
                   title: str | None = None) -> None:
        """Attach the trial's per-layer profile to its run: spools op ``figure``, returns at once.

        ``initial``: step 0 (the first epoch's report, ``init/`` keys, or those values unprefixed);
        ``last``: the last epoch's report. Only the per-layer families the profile draws and
        ``epoch`` are spooled (a few kB). Delivery renders ``<record>/figures/<trial_id>.png``,
        uploads it as artifact ``profile.png`` and logs :func:`sweeper.profile.profile_summary` on
        the child run at the last epoch's step. Calling it again with newer metrics replaces the
        artifact; the same inputs again (a replay) upload nothing.
        """
        self._enqueue({"op": "figure", "trial_id": trial_id, "title": title,
                       "timestamp": int(time.time() * 1000),
                       "initial": _profile_inputs(initial), "last": _profile_inputs(last)})

    def log_parent_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Summary metrics on the sweep's parent run, at step 0: spools op ``parent_metrics``.

        Numbers only (bools count, strings and None are dropped). A later call with new values adds
        newer points, which the UI shows as the latest; a replay re-sends nothing.
        """
        numbers, _ = _split({k: v for k, v in metrics.items() if v is not None})
        self._enqueue({"op": "parent_metrics", "timestamp": int(time.time() * 1000),
                       "metrics": numbers})

    # ---- delivery -------------------------------------------------------------------------------

    def flush(self, *, force: bool = False, wait_s: float | None = None) -> bool:
        """Deliver what is pending, in order; False (and the error recorded) at the first failure.

        After a failure, calls within the back-off window return at once, so a dead server costs the
        sweep's event loop nothing. ``wait_s``: how long to wait for another process's delivery of
        this spool (``sweeper sync`` beside a running driver) to end (None: as long as it takes);
        False when it has not ended.
        """
        with self._lock, _spool_flock(self.dir, wait_s) as held:
            if not held:
                return False
            return self._flush(force=force)

    def _flush(self, *, force: bool) -> bool:
        if not force and time.time() < self._next_try:
            return False
        state = self._state()
        if state.get("carried_from") is not None:
            state = self._carried_if_here(state)
        if state["offset"] != self._offset_seen:
            # Another process (`sweeper sync`, a previous driver) delivered since this one last did:
            # the runs it created are not in this process's list of the sweep's runs.
            self._existing = None
        try:
            for chunk in _chunks(self._undelivered(state), _CHUNK):
                for group in _plan([op for _, op in chunk]):
                    self._apply_group(group, state)
                # The state is saved once a chunk: a chunk cut short by a failure is delivered
                # again from its start, which every operation allows (see the module docstring).
                state["offset"] = chunk[-1][0]
                state["delivered"] += len(chunk)
                state["last_error"] = None
                self._save_state(state)
        except Exception as exc:  # the tracking server, the network, a full disk...
            state["last_error"] = f"{type(exc).__name__}: {_truncate(str(exc), 300)}"
            self._save_state(state)
            self._offset_seen = state["offset"]
            self._next_try = time.time() + self._backoff
            self._backoff = min(self._backoff * 2, 30.0)
            return False
        self._backoff = 1.0
        self._offset_seen = state["offset"]
        return True

    def _carried_if_here(self, state: dict[str, Any]) -> dict[str, Any]:
        """The state carried from the store's old path if this store holds its sweep run, else a
        fresh one (every operation delivered again; runs made by an earlier delivery here are found
        by tag, never made twice)."""
        from mlflow.exceptions import MlflowException

        try:
            held = state.get("parent") is not None and self.client.get_run(state["parent"]) is not None
        except MlflowException:
            held = False
        if not held:
            return self._fresh_state()
        state.pop("carried_from")
        return state

    def flush_until(self, deadline_s: float) -> bool:
        """Keep trying for up to ``deadline_s`` seconds (end of a sweep: give a restart a chance)."""
        end = time.time() + deadline_s
        while True:
            if self.flush(force=True, wait_s=max(0.0, end - time.time())):
                return True
            if time.time() >= end:
                return False
            time.sleep(min(2.0, max(0.0, end - time.time())))

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            # One "View run" line per trial would drown the sweep's own progress output.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
            if self.tracking_uri.startswith(("http://", "https://")):
                # Fail fast (the spool retries) instead of mlflow's ~4 minutes of retries per call.
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            _create_sqlite_in_wal_mode(self.tracking_uri)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _experiment_id(self, state: dict[str, Any]) -> str:
        if state["experiment_id"] is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                location = None
                if (db := _sqlite_path(self.tracking_uri)) is not None:
                    location = (db.parent / "mlartifacts" / self.experiment).resolve().as_uri()
                # The MLflow 3 UI opens "GenAI" experiments on a traces overview; ours are training.
                exp_id = self.client.create_experiment(
                    self.experiment, artifact_location=location,
                    tags={"mlflow.experimentKind": "custom_model_development"})
            else:
                exp_id = exp.experiment_id
            state["experiment_id"] = exp_id
        return state["experiment_id"]

    def _find_run(self, state: dict[str, Any], tag: str, value: str) -> str | None:
        runs = self.client.search_runs(
            [self._experiment_id(state)],
            filter_string=f"tags.`sweeper.sweep_uid` = '{self.sweep_uid}' and tags.`{tag}` = '{value}'",
            max_results=1)
        return runs[0].info.run_id if runs else None

    def _existing_trial_run(self, state: dict[str, Any], trial_id: str) -> str | None:
        """A run the server already has for this trial although the delivery state does not name it
        (a driver died between creating it and saving the state; a state file lost or new).

        One search per process lists every trial run of the sweep, instead of one search per trial:
        those grew with the experiment and were a tenth of a 200-trial sweep's driver CPU. Runs this
        process creates go into the state as they are made, so the list never needs refreshing
        (one driver at a time holds a sweep: sweeper.lease)."""
        if self._existing is None:
            found: dict[str, str] = {}
            token = None
            while True:
                page = self.client.search_runs(
                    [self._experiment_id(state)],
                    filter_string=f"tags.`sweeper.sweep_uid` = '{self.sweep_uid}'",
                    max_results=1000, page_token=token)
                for run in page:
                    tid = run.data.tags.get("sweeper.trial_id")
                    if tid and run.data.tags.get("sweeper.role", "trial") == "trial":
                        found.setdefault(tid, run.info.run_id)
                token = page.token
                if not token:
                    break
            self._existing = found
        return self._existing.get(trial_id)

    def _run_for(self, state: dict[str, Any], trial_id: str | None) -> str:
        run_id = state["parent"] if trial_id is None else state["runs"].get(trial_id)
        if run_id is None:
            raise RuntimeError(f"no MLflow run for {trial_id or 'the sweep'} yet (spool out of order)")
        return run_id

    def _apply_group(self, group: list[dict[str, Any]], state: dict[str, Any]) -> None:
        """One operation, or a trial's run of metrics/tags operations (see :func:`_plan`) sent as
        one ``log_batch`` with the params its run still lacks: on the SQL store every call is a
        few transactions and a read of the run, whatever it carries."""
        if len(group) == 1 and group[0]["op"] not in _BATCHED:
            self._apply(group[0], state)
        else:
            self._log_batched(group, state)

    def _log_batched(self, ops: list[dict[str, Any]], state: dict[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        trial_id = ops[0]["trial_id"]
        run_id = self._run_for(state, trial_id)
        if trial_id is not None:
            self._verify_steps(state, trial_id, run_id)
        done = state["steps"].get(trial_id, -1) if trial_id is not None else -1
        metrics, tags, last_step = [], {}, done
        for op in ops:
            if op["op"] == "metrics":
                step = int(op["step"])
                if step <= last_step:
                    continue  # this step is already in the run: a replay
                sentinel = SENTINELS.get(step, "epoch")
                # A step's sentinel goes after its other metrics, and steps in order, so a request
                # cut short never delivers a sentinel without the rest of its step.
                items = sorted(op["metrics"].items(), key=lambda kv: kv[0] == sentinel)
                metrics += [Metric(_truncate(k, _MAX_KEY), float(v), op["timestamp"], step)
                            for k, v in items]
                last_step = max(last_step, step)
            else:  # tags: a later value of a key wins, as separate calls would leave it
                tags.update(_tag_values({k: redact(v) for k, v in op["tags"].items()
                                         if v is not None}))
        params = []
        unconfigured = state.setdefault("unconfigured", {})
        if trial_id in unconfigured:
            params = self._params(unconfigured[trial_id])
        for p, t, m in _requests(params, [RunTag(k, v) for k, v in tags.items()], metrics):
            self.client.log_batch(run_id, metrics=m, params=p, tags=t)
        unconfigured.pop(trial_id, None)
        if trial_id is not None and last_step > done:
            state["steps"][trial_id] = last_step

    def _apply(self, op: dict[str, Any], state: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        kind = op["op"]
        if kind == "parent":
            run_id = state["parent"]
            if run_id is None and (run_id := self._find_run(state, "sweeper.role", "sweep")):
                # Not in this state: a driver died between creating it and logging its params
                # and texts, or the state is new. Fill in what is missing; a param already there
                # keeps its value (MLflow refuses a changed one, and the sweep's are bound to it).
                existing = self.client.get_run(run_id).data.params
                self._log_params(run_id, {k: v for k, v in op["params"].items()
                                          if _truncate(str(k), _MAX_KEY) not in existing})
                for name, text in op["texts"].items():
                    self._write(state, run_id, text=redact(text), name=name)
            if run_id is not None:
                # A resumed sweep: the interrupted launch ended its run KILLED (or a killed driver
                # left it RUNNING); it runs again until this launch ends it.
                self.client.update_run(run_id, status="RUNNING")
            else:
                tags = {"sweeper.sweep_uid": self.sweep_uid, "sweeper.role": "sweep",
                        **{k: str(redact(v)) for k, v in op["tags"].items()}}
                info = self.client.create_run(self._experiment_id(state), run_name=op["run_name"],
                                              start_time=op.get("time"), tags=_tag_values(tags)).info
                run_id = info.run_id
                self._started_at_delivery(state, run_id, op)
                self._log_params(run_id, op["params"])
                for name, text in op["texts"].items():
                    self._write(state, run_id, text=redact(text), name=name, artifact_uri=info.artifact_uri)
            state["parent"] = run_id
        elif kind == "child":
            trial_id = op["trial_id"]
            unconfigured = state.setdefault("unconfigured", {})
            run_id = state["runs"].get(trial_id)
            if run_id is None:
                run_id = self._existing_trial_run(state, trial_id)
                if run_id is not None:
                    # Made by a driver that died before its state said so: whether its params and
                    # config.json made it is unknown, and logging them again changes nothing.
                    unconfigured[trial_id] = op["config"]
            if run_id is not None:
                # The trial starts again (a resumed sweep, a retry): its run was ended KILLED by
                # the interruption, or FAILED before the retry. It runs until the trial ends again.
                self.client.update_run(run_id, status="RUNNING")
            else:
                tags = {**_tag_values({k: redact(v) for k, v in op.get("tags", {}).items()}),
                        "mlflow.parentRunId": self._run_for(state, None),
                        "sweeper.sweep_uid": self.sweep_uid, "sweeper.trial_id": trial_id,
                        "sweeper.role": "trial", "sweeper.outcome": "running"}
                info = self.client.create_run(self._experiment_id(state), run_name=op["run_name"],
                                              start_time=op.get("time"), tags=tags).info
                run_id = info.run_id
                self._existing[trial_id] = run_id
                self._started_at_delivery(state, run_id, op)
                # A run made just now has no step yet: nothing to read back.
                state["steps"][trial_id] = -1
                self._verified.add(trial_id)
                unconfigured[trial_id] = op["config"]
                state["runs"][trial_id] = run_id
                # Saved at once, not with the chunk: another process (`sweeper sync`) killed before
                # its chunk's end would otherwise leave runs that no state names, and a process
                # whose list of the sweep's runs predates them would create them a second time.
                self._save_state(state)
                # Only now: nothing between create_run and the save above may fail.
                self._artifact_uris[run_id] = info.artifact_uri
            # With the state, so a failure from here on cannot leave the run without its params.
            state["runs"][trial_id] = run_id
            self._verify_steps(state, trial_id, run_id)
            if trial_id in unconfigured:
                saved = op.get("resolved") or op["config"]  # the resolved config, where given
                self._log_config(state, run_id, {k: redact(v) for k, v in saved.items()})
                if not op.get("params_later"):  # else the trial's next log_batch carries them
                    self._log_params(run_id, op["config"])
                    unconfigured.pop(trial_id)
        elif kind == "params":
            run_id = self._run_for(state, op["trial_id"])
            existing = self.client.get_run(run_id).data.params
            self._log_params(run_id, {k: v for k, v in op["params"].items() if k not in existing})
        elif kind == "terminate":
            # The spooled time, not the delivery's: a run's duration is the trial's even when it
            # reaches MLflow late (an outage, `sweeper sync`), and a replay changes nothing.
            run_id = self._run_for(state, op["trial_id"])
            late = run_id in state.get("started_at_delivery", ())
            self.client.set_terminated(run_id, status=op["status"],
                                       end_time=None if late else op.get("time"))
        elif kind == "artifacts":
            local = Path(op["local_dir"])
            if local.is_dir():
                self._write(state, self._run_for(state, op["trial_id"]), local=local,
                            artifact_path=op["artifact_path"])
        elif kind == "figure":
            self._deliver_figure(op, state)
        elif kind == "parent_metrics":
            run_id = self._run_for(state, None)
            latest = self.client.get_run(run_id).data.metrics
            metrics = [Metric(_truncate(k, _MAX_KEY), float(v), op["timestamp"], 0)
                       for k, v in op["metrics"].items()
                       if not _same(latest.get(_truncate(k, _MAX_KEY)), float(v))]
            for chunk in _chunks(metrics, _MAX_METRICS):
                self.client.log_batch(run_id, metrics=chunk)
        else:
            raise ValueError(f"unknown spool operation {kind!r}")

    def _log_config(self, state: dict[str, Any], run_id: str, config: dict[str, Any]) -> None:
        """``config.json`` in a trial's run, as ``MlflowClient.log_dict`` writes it.

        ``log_dict`` reads the whole run back to find its artifact store (on the SQL store ~3 of
        the ~20 ms of CPU a trial's run costs the driver, on the trials' cores in a local sweep).
        For a run this process created, create_run already said where that store is. A run found
        again by tag, or an MLflow without the artifact-repository registry, goes through the
        client (``log_text`` of the same text: ``log_dict``'s file)."""
        self._write(state, run_id, name="config.json", artifact_uri=self._artifact_uris.pop(run_id, None),
                    text=json.dumps(config, indent=2, default=str))  # log_dict's format

    def _write(self, state: dict[str, Any], run_id: str, **file: Any) -> None:
        """A run's file (:func:`write_artifact`), beside the store where it was moved or copied:
        asked of the experiment once per process."""
        if self._relocation == _UNSET:
            self._relocation = artifact_relocation(self.client, self.tracking_uri,
                                                   self._experiment_id(state))
        write_artifact(self.client, self.tracking_uri, run_id, relocation=self._relocation, **file)

    @staticmethod
    def _started_at_delivery(state: dict[str, Any], run_id: str, op: Mapping[str, Any]) -> None:
        """A spool line written before ops carried their time (an upgrade mid-sweep) starts its run
        at delivery; that run then ends at delivery too, never before it started."""
        if op.get("time") is None:
            state.setdefault("started_at_delivery", []).append(run_id)

    def figure_path(self, trial_id: str) -> Path:
        """Where delivery renders a trial's profile: ``<record>/figures/<trial_id>.png``."""
        return self.dir / "figures" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', trial_id)}.png"

    def _deliver_figure(self, op: dict[str, Any], state: dict[str, Any]) -> None:
        """Render, upload as ``profile.png``, log the summary, then tag the run as done.

        The tag comes last, so a crash anywhere before it repeats the whole delivery: the
        artifact is overwritten with the same bytes (one file, not two) and the summary points
        carry the op's timestamp, so the SQL store drops them as exact duplicates.
        """
        from mlflow.entities import Metric

        from sweeper.profile import layer_profile, profile_summary

        trial_id = op["trial_id"]
        run_id = self._run_for(state, trial_id)
        digest = hashlib.sha1(json.dumps([op["initial"], op["last"], op.get("title")],
                                         sort_keys=True, default=str).encode()).hexdigest()[:16]
        done = state.setdefault("figures", {})
        if done.get(trial_id) == digest:
            return
        run = self.client.get_run(run_id)
        if run.data.tags.get(_PROFILE_TAG) != digest:
            path = self.figure_path(trial_id)
            try:
                layer_profile(op["initial"], op["last"], path, title=op.get("title"))
            except Exception as exc:  # noqa: BLE001 - a bad figure is no outage: never block the spool
                state.setdefault("figure_errors", {})[trial_id] = (
                    f"{type(exc).__name__}: {_truncate(str(exc), 300)}")
                done[trial_id] = digest
                return
            step = op["last"].get("epoch", 0)
            step = int(step) if isinstance(step, (int, float)) and math.isfinite(step) else 0
            summary = [Metric(k, float(v), op["timestamp"], step)
                       for k, v in profile_summary(op["initial"], op["last"]).items()]
            if summary:
                self.client.log_batch(run_id, metrics=summary)
            with tempfile.TemporaryDirectory() as tmp:
                upload = Path(tmp) / "profile.png"
                shutil.copyfile(path, upload)
                self._write(state, run_id, local=upload, artifact_uri=run.info.artifact_uri)
            self.client.set_tag(run_id, _PROFILE_TAG, digest)
        done[trial_id] = digest

    def _verify_steps(self, state: dict[str, Any], trial_id: str, run_id: str) -> None:
        """Read back the last complete step of a run once per process: the spool state may lag."""
        if trial_id in self._verified:
            return
        steps = [m.step for m in self.client.get_metric_history(run_id, "epoch")]
        if not steps and self.client.get_metric_history(run_id, SENTINELS[0]):
            steps = [0]
        state["steps"][trial_id] = max(steps, default=-1)
        self._verified.add(trial_id)

    @staticmethod
    def _params(params: Mapping[str, Any]) -> list:
        from mlflow.entities import Param

        return [Param(_truncate(str(k), _MAX_KEY), _truncate(str(redact(v)), _MAX_PARAM_VALUE))
                for k, v in params.items()]

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        for chunk in _chunks(self._params(params), _MAX_PARAMS):
            self.client.log_batch(run_id, params=chunk)


_LOCKS: dict[str, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()


def _spool_lock(record_dir: Path) -> threading.RLock:
    """One lock per spool in this process, shared by every Tracker of that sweep (a restored
    callback's and the launch's): two deliveries of one spool at once would send ops twice."""
    key = str(Path(record_dir).resolve())
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.RLock())


class _spool_flock:
    """Across processes, one delivery of a spool at a time (a driver's delivery thread and ``sweeper
    sync`` run beside it on a local record): the delivery state is read-modify-write. Entered
    under the spool's in-process RLock, so a nested flush in one process finds the lock its
    caller holds (a second ``flock`` on a new descriptor would wait for itself). Where the
    storage cannot lock (no fcntl, or a file system without locks) the in-process lock alone
    guards, as before. ``as held``: False when ``wait_s`` passed while another process
    delivered."""

    _held: dict[str, int] = {}  # record dir -> nesting depth in this process (under its RLock)

    def __init__(self, record_dir: Path, wait_s: float | None = None):
        self.key = str(Path(record_dir).resolve())
        self.path = Path(record_dir) / ".mlflow_delivery.lock"
        self.wait_s = wait_s
        self.fd: int | None = None

    def __enter__(self) -> bool:
        depth = self._held.get(self.key, 0)
        if depth == 0 and not self._lock():
            return False
        self._held[self.key] = depth + 1
        return True

    def _lock(self) -> bool:
        try:
            import fcntl
        except ImportError:  # Windows
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a read-only record: nothing to deliver into its state either
            return True
        end = None if self.wait_s is None else time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if end is not None else 0))
                return True
            except BlockingIOError:
                if time.monotonic() >= end:
                    os.close(self.fd)
                    self.fd = None
                    return False
                time.sleep(0.1)
            except OSError:  # ENOLCK, EOPNOTSUPP: a file system without locks
                os.close(self.fd)
                self.fd = None
                return True

    def __exit__(self, *exc):
        depth = self._held.get(self.key, 0)
        if depth <= 1:
            self._held.pop(self.key, None)
            if self.fd is not None:
                os.close(self.fd)  # closing releases the lock
                self.fd = None
        else:
            self._held[self.key] = depth - 1


def _requests(params: list, tags: list, metrics: list) -> Iterable[tuple[list, list, list]]:
    """Split one log_batch into requests within MLflow's limits: 1000 entities, of which at most
    100 params and 100 tags, and a body under 1 MB (the REST server's cap; 100 long params and 100
    long tags together exceed it). Metrics keep their order: a step's sentinel is never sent before
    the rest of its step."""
    kinds = [(params, _MAX_PARAMS), (tags, _MAX_TAGS), (metrics, _MAX_METRICS)]
    while any(items for items, _ in kinds):
        request: list[list] = [[], [], []]
        size = entities = 0
        for i, (items, cap) in enumerate(kinds):
            while items and len(request[i]) < cap and entities < _MAX_METRICS:
                cost = _size(items[0])
                if request != [[], [], []] and size + cost > _MAX_REQUEST_BYTES:
                    break
                request[i].append(items.pop(0))
                size, entities = size + cost, entities + 1
            if size >= _MAX_REQUEST_BYTES:
                break
        yield request[0], request[1], request[2]


def _size(entity: Any) -> int:
    """A generous estimate of an entity's share of a JSON request body."""
    value = getattr(entity, "value", "")
    # As JSON writes them: a non-ASCII character is six bytes (\uXXXX), not one.
    text = json.dumps(entity.key) + (json.dumps(value) if isinstance(value, str) else "0" * 24)
    return 64 + len(text)


def artifact_relocation(client, tracking_uri: str, experiment_id: str) -> tuple[str, str] | None:
    """(old root, new root) of an embedded store's files when the store was moved or copied with
    its storage folder; None where nothing moved, or the store is not an embedded one.

    MLflow keeps the absolute artifact path an experiment and its runs were made with
    (``file:///OLD/mlartifacts/EXP``; new runs take the experiment's, as old). Writing there from a
    copy's resume or sync wrote into the original folder: it overwrote the original sweep's report,
    and after a move it made the old folder again. Told by the experiment's location not being
    where sweeper lays it out beside the store now (``Tracker._experiment_id``).
    """
    db = _sqlite_path(tracking_uri)
    if db is None:
        return None
    exp = client.get_experiment(experiment_id)
    location = exp.artifact_location or ""
    here = (db.parent / "mlartifacts" / exp.name).resolve().as_uri()
    if location == here or not location.startswith("file:"):
        return None
    old_root, _, old_name = location.rpartition("/")
    new_root, _, new_name = here.rpartition("/")
    if old_name != new_name or not old_root.endswith("/mlartifacts"):  # not laid out by sweeper
        return None
    return old_root + "/", new_root + "/"


def write_artifact(client, tracking_uri: str, run_id: str, *, text: str | None = None,
                   name: str | None = None, local: str | Path | None = None,
                   artifact_path: str | None = None, artifact_uri: str | None = None,
                   relocation: tuple[str, str] | None = None) -> None:
    """A run's file: ``text`` as ``name`` (as ``log_text`` writes it), or the file or folder
    ``local`` under ``artifact_path``; under the new root where ``relocation``
    (:func:`artifact_relocation`) says the store moved, else where MLflow says. ``artifact_uri``:
    the run's, where the caller already has it (create_run returned it): no reading it back."""
    repo = None
    if relocation is not None:
        uri = artifact_uri or client.get_run(run_id).info.artifact_uri
        if uri.startswith(relocation[0]):
            repo = _artifact_repository(relocation[1] + uri[len(relocation[0]):], tracking_uri)
    elif artifact_uri is not None:
        repo = _artifact_repository(artifact_uri, tracking_uri)
    if repo is None:
        if text is not None:
            client.log_text(run_id, text, name)
        elif Path(local).is_dir():
            client.log_artifacts(run_id, str(local), artifact_path)
        else:
            client.log_artifact(run_id, str(local), artifact_path)
        return
    if text is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            path.write_text(text, encoding="utf-8")  # log_text's encoding
            parent = str(Path(name).parent)
            repo.log_artifact(str(path), None if parent == "." else parent)
    elif Path(local).is_dir():
        repo.log_artifacts(str(local), artifact_path)
    else:
        repo.log_artifact(str(local), artifact_path)


def _artifact_repository(artifact_uri: str, tracking_uri: str):
    """MLflow's artifact repository for a run's artifact URI, or None where this MLflow does not
    offer the registry (mlflow 3.17: ``mlflow.store.artifact.artifact_repository_registry``, what
    ``MlflowClient`` itself uses; ``tests/test_tracking.py`` fails loudly if it moves) or the
    tracking URI is Databricks' (whose artifact URIs need the profile ``log_dict`` adds)."""
    if tracking_uri.startswith("databricks"):
        return None
    try:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    except ImportError:
        return None
    return get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)


def _plan(ops: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Pending operations as the groups delivery sends, in the order of each group's first op.

    A trial's metrics and tags operations that follow one another *in that trial's own sequence*
    (other trials' operations may come between) form one group, sent as one ``log_batch``; any
    other operation of the trial ends the group. A new run's params ride on that group when it
    follows the run's creation directly (``params_later``). Operations of one trial keep their
    order; those of different trials touch different runs, and the parent run is created before
    any child (its op comes first). A 200-trial sweep of one-epoch trials sent six calls per trial
    this way four.
    """
    groups: list[list[dict[str, Any]]] = []
    open_group: dict[str | None, list[dict[str, Any]]] = {}  # trial -> the group its next op joins
    new_run: dict[str | None, dict[str, Any]] = {}  # trial -> its child op, if the last of its ops
    for op in ops:
        trial = op.get("trial_id")
        if op["op"] in _BATCHED:
            group = open_group.get(trial)
            if group is None:
                group = open_group[trial] = []
                groups.append(group)
                child = new_run.pop(trial, None)
                if child is not None:
                    child["params_later"] = True
            group.append(op)
        else:
            open_group.pop(trial, None)
            new_run.pop(trial, None)
            groups.append([op])
            if op["op"] == "child":
                new_run[trial] = op
    return groups


def _now_ms() -> int:
    return int(time.time() * 1000)


def _split(values: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """Numbers become metrics (NaN and inf too: a diverged reading is a reading); strings go apart."""
    numbers, strings = {}, {}
    for k, v in values.items():
        if isinstance(v, (bool, int, float)):
            numbers[k] = float(v)
        elif isinstance(v, str):
            strings[k] = v
    return numbers, strings


def _profile_inputs(metrics: Mapping[str, Any]) -> dict[str, float]:
    """What the profile reads of a report: its per-layer families (``init/`` ones too) and the
    epoch, as floats (the record's "nan"/"inf" strings included); nothing else is spooled."""
    from sweeper.profile import FAMILIES

    out = {}
    for key, value in metrics.items():
        family = key.removeprefix(_INIT).split("/", 1)[0]
        if key == "epoch" or ("/" in key and family in FAMILIES):
            try:
                out[key] = float(value)
            except (TypeError, ValueError):
                continue
    return out


def _same(old: float | None, new: float) -> bool:
    """The run's latest value already is this one (NaN equals NaN here)."""
    if old is None:
        return False
    return old == new or (math.isnan(old) and math.isnan(new))


def _tag_values(tags: Mapping[str, Any]) -> dict[str, str]:
    return {_truncate(k, _MAX_KEY): _truncate(str(v), _MAX_TAG_VALUE) for k, v in tags.items()}
