"""A sweep lives on its storage: the record beside Ray's experiment state, wherever that is.

On a local path (the default ``./sweeps``, or an NFS mount) the record is written in place. On a URI
(``s3://bucket/path?endpoint_override=...``, ``gs://...``, ``file:///mnt/nfs/...``), object stores
cannot append or rename, so the record is worked on in a local directory and mirrored:

- ``open_record(name, storage)`` pulls the sweep's record (``<storage>/<name>/sweeper/``) into a fresh
  temporary directory and returns a :class:`~sweeper.records.SweepRecord` on it, plus a
  :class:`Mirror` that knows where it came from. Readers (status, export, report, stop, resume, sync)
  read that copy: any machine that can read the storage can do everything the launching machine can.
- The driver starts the mirror's push loop once its lease is held: every few seconds it uploads the
  files that changed (its heartbeat included, so other machines see a live driver), removes those it
  deleted (a released lease), and fetches a ``stop_request.json`` that ``sweeper stop`` left on the
  storage from another machine, where the lease's heartbeat thread acts on it. Its last push runs
  when the driver ends. A driver killed between pushes loses at most the last few seconds of record,
  which the next launch trains again (the trials' checkpoints and Ray's state live on the storage).

A local index (``~/.cache/sweeper/index.json``) remembers where each sweep name was launched, so
``sweeper status NAME`` finds a sweep on s3 without ``--storage``.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from sweeper.config import ConfigError
from sweeper.lease import STOP_FILE  # the request `sweeper stop` leaves beside the lease
from sweeper.records import SweepRecord

__all__ = ["DEFAULT_STORAGE", "GCS_RETRY_S", "Mirror", "filesystem", "index_lookup", "index_remember",
           "is_uri", "join_uri", "open_record", "open_sweep_record", "record_root", "resume_command",
           "storage_error", "storage_problems", "storage_root"]

PUSH_S = 3.0  # how stale another machine's view of a running sweep may be (plus the heartbeat's 2 s)
LARGE_BYTES, LARGE_EVERY_S = 1 << 20, 30.0


DEFAULT_STORAGE = "sweeps"  # where sweeps live unless --storage says otherwise (relative to the cwd)


# The URI schemes pyarrow's FileSystem.from_uri opens that a sweep can live on (lower case only, as
# pyarrow reads them); any other reached the user as a pyarrow traceback.
_SCHEMES = ("s3", "gs", "gcs", "file")


def storage_root(storage: str | None) -> str:
    """An absolute local path or a URI (s3://, gs://, ...). Here, not in sweeper.tuner, so that readers
    of sweeps (``model.init_from='sweep:NAME/...'`` in ``sweeper debug``) need no Ray.

    A URI this tool cannot open is a ConfigError naming it (exit 2), for every command."""
    storage = storage or DEFAULT_STORAGE
    if "://" in storage:
        problems = storage_problems(storage)
        if problems:
            raise ConfigError(problems)
        return storage
    return str(Path(storage).expanduser().resolve())


def storage_problems(storage: str) -> list[str]:
    """Why a storage URI cannot be opened, before anything tries (a plain path: none)."""
    if "://" not in storage:
        return []
    parts, scheme = urlsplit(storage), storage.split("://", 1)[0]  # urlsplit lower-cases it
    shown = f"{scheme}://{parts.netloc}{parts.path}"  # without the query (keys, endpoints)
    if scheme not in _SCHEMES:
        return [f"storage {shown!r}: {scheme or '(none)'}:// is not a storage sweeper can use: "
                "give a directory, or an s3://BUCKET/PATH or gs://BUCKET/PATH URI"]
    if scheme != "file" and not parts.netloc:
        return [f"storage {shown!r} names no bucket: {scheme}://BUCKET/PATH"]
    return []


def is_uri(root: str) -> bool:
    return "://" in root


def join_uri(root: str, *parts: str) -> str:
    """Append path parts to a URI before its query (``s3://b/p?x=1`` + ``name`` -> ``s3://b/p/name?x=1``)."""
    base, sep, query = root.partition("?")
    path = "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return f"{path}{sep}{query}"


# How long sweeper's own reads and writes of a gs:// record retry before they fail (pyarrow's GCS
# client otherwise retries for 15 minutes: a machine without Google credentials sat in the first
# read for more than 400 s, where this gives "Could not create a OAuth2 access token" in seconds).
# A URI's own ?retry_limit_seconds= wins; Ray's filesystem for the same storage keeps its defaults.
GCS_RETRY_S = 30


def storage_error(exc: BaseException) -> str:
    """What went wrong reading or writing a storage URI, in a line: pyarrow's GCS errors carry the
    whole retry record, whose one useful part is the missing credentials."""
    text = str(exc)
    if "OAuth2 access token" in text:
        return ("no Google credentials on this machine (set GOOGLE_APPLICATION_CREDENTIALS to a "
                "service-account key file, or run `gcloud auth application-default login`)")
    return text


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``pyarrow.fs.FileSystem.from_uri`` for sweeper's own reads and writes (see GCS_RETRY_S)."""
    given = uri
    if uri.startswith("gs://") and "retry_limit_seconds=" not in uri:
        uri += ("&" if "?" in uri else "?") + f"retry_limit_seconds={GCS_RETRY_S}"
    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid as exc:  # a URI pyarrow cannot read: a misspelt query key, a bad value
        raise ConfigError([f"storage URI {redacted_root(given)}: {exc} (the query pyarrow reads: for "
                           "s3:// endpoint_override, scheme, region, allow_bucket_creation, ...; for "
                           "gs:// endpoint_override, scheme, retry_limit_seconds, ...)"]) from None


class Mirror:
    """A local working copy of a record that lives at a URI."""

    def __init__(self, local_dir: Path, remote: str):
        self.local, self.remote = Path(local_dir), remote
        self.fs, self.path = filesystem(remote)
        self._pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) pushed
        self._last_put: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    # ---- pull ---------------------------------------------------------------------------------

    def pull(self) -> int:
        """Copy the remote record into the local directory; the number of files."""
        self.local.mkdir(parents=True, exist_ok=True)
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True,
                                                        allow_not_found=True))
        count = 0
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            rel = info.path[len(self.path):].lstrip("/")
            target = self.local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(info.path) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            stat = target.stat()
            self._pushed[rel] = (stat.st_size, stat.st_mtime_ns)  # in sync with the remote
            count += 1
        return count

    # ---- push ---------------------------------------------------------------------------------

    def push(self) -> None:
        """Upload what changed since the last push; remove what was deleted here."""
        present: dict[str, tuple[int, int]] = {}
        for path in self.local.rglob("*"):
            if path.is_file() and not path.name.startswith("."):  # temp files mid-rename
                stat = path.stat()
                present[str(path.relative_to(self.local))] = (stat.st_size, stat.st_mtime_ns)
        now = time.monotonic()
        for rel, sig in present.items():
            if self._pushed.get(rel) == sig:
                continue
            # A large, growing file (the tracking spool: ~14 kB per trial and epoch with per-layer
            # diagnostics) goes up at most every LARGE_EVERY_S, not on every round; the last push
            # of a driver sends everything.
            if sig[0] > LARGE_BYTES and not self._stop.is_set() \
                    and now - self._last_put.get(rel, -1e9) < LARGE_EVERY_S:
                continue
            self._put(rel)
            self._pushed[rel], self._last_put[rel] = sig, now
        for rel in [r for r in self._pushed if r not in present]:
            try:
                self.fs.delete_file(f"{self.path}/{rel}")
            except (FileNotFoundError, OSError):
                pass
            del self._pushed[rel]

    def _put(self, rel: str) -> None:
        remote = f"{self.path}/{rel}"
        self.fs.create_dir(remote.rsplit("/", 1)[0], recursive=True)
        with open(self.local / rel, "rb") as src, self.fs.open_output_stream(remote) as dst:
            shutil.copyfileobj(src, dst)

    def put_remote(self, rel: str, data: bytes) -> None:
        """Write one file straight to the storage (``sweeper stop`` from another machine)."""
        remote = f"{self.path}/{rel}"
        self.fs.create_dir(remote.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(remote) as dst:
            dst.write(data)

    def _fetch_stop_request(self) -> None:
        info = self.fs.get_file_info(f"{self.path}/{STOP_FILE}")
        local = self.local / STOP_FILE
        if info.type == pafs.FileType.File and not local.exists():
            with self.fs.open_input_stream(info.path) as src:
                local.write_bytes(src.read())

    # ---- the driver's loop --------------------------------------------------------------------

    def start(self) -> None:
        try:  # a request left for a driver that died before it saw it is not for this one
            self.fs.delete_file(f"{self.path}/{STOP_FILE}")
        except (FileNotFoundError, OSError):
            pass
        self._thread = threading.Thread(target=self._loop, name="sweeper-mirror", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the loop, then push one last time (a released lease disappears from the storage)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.push()
        try:
            self.fs.delete_file(f"{self.path}/{STOP_FILE}")  # handled, or for a driver now gone
        except (FileNotFoundError, OSError):
            pass

    def _loop(self) -> None:
        while not self._stop.wait(PUSH_S):
            try:
                self.push()
                self._fetch_stop_request()
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 - storage down: the next round tries again
                self.last_error = f"{type(exc).__name__}: {exc}"


def open_record(name: str, root: str) -> tuple[SweepRecord, Mirror | None]:
    """The sweep's record: in place on a local path, else a fresh local copy of the remote one."""
    if not is_uri(root):
        return SweepRecord(Path(root) / name), None
    work = Path(tempfile.mkdtemp(prefix=f"sweeper-{name}-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    record = SweepRecord(work / name)
    mirror = Mirror(record.dir, join_uri(root, name, "sweeper"))
    mirror.pull()
    return record, mirror


# ---- the local index of where sweeps live ---------------------------------------------------------


def _index_path() -> Path:
    root = os.environ.get("SWEEPER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sweeper")
    return Path(root) / "index.json"


def index_remember(name: str, root: str) -> None:
    path = _index_path()
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        index = {}
    index[name] = {"storage": root, "time": time.time()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: --storage still works


def index_lookup(name: str) -> str | None:
    try:
        entry = json.loads(_index_path().read_text()).get(name)
    except (OSError, ValueError):
        return None
    return entry.get("storage") if isinstance(entry, dict) else None


def record_root(storage: str | None) -> str:
    """Where records (and the embedded MLflow store) live: the storage dir, or ./sweeps if remote."""
    root = storage_root(storage)
    return storage_root(DEFAULT_STORAGE) if "://" in root else root


def open_sweep_record(name: str, storage: str | None) -> tuple[SweepRecord, Mirror | None]:
    """The sweep's record where it lives; a Mirror when that is a URI."""
    root = storage_root(storage)
    try:
        return open_record(name, root)
    except OSError as exc:  # pyarrow: unreachable endpoint, no credentials, no such bucket...
        raise ConfigError([f"storage={redacted_root(root)!r} cannot be read: {storage_error(exc)}"]) from None


def resume_command(name: str, storage: str | None, *, verb: str = "resume",
                   cluster: str | None = None) -> str:
    """`sweeper resume NAME` (or another ``verb``), with ``--storage`` unless the sweep lives in this
    directory's ./sweeps: the bare hint, printed for a sweep on another storage, resumed a finished
    namesake in ./sweeps. ``cluster``: the Ray its last launch used (``--local``, ``--address A``,
    the record's ``cluster``), which `resume` needs as launch does: the hint without it was refused
    ("no Ray cluster given")."""
    import shlex

    root = storage_root(storage)
    where = "" if root == storage_root(DEFAULT_STORAGE) else f" --storage {shlex.quote(redacted_root(root))}"
    ray = f" {cluster}" if cluster and verb == "resume" else ""
    return f"`sweeper {verb} {shlex.quote(name)}{where}{ray}`"


def cluster_flag(local: bool, address: str | None, num_cpus: int | None = None) -> str | None:
    """How a launch reached Ray, as `resume` takes it (None: $RAY_ADDRESS, which the hint leaves
    to the environment); a local Ray's --num-cpus with it."""
    import shlex

    if local:
        return "--local" + (f" --num-cpus {num_cpus}" if num_cpus else "")
    return f"--address {shlex.quote(address)}" if address else None


# Query keys whose values are secrets (pyarrow's access_key, secret_key, session_token, ...).
_SECRET_QUERY_KEY = re.compile(r"key|secret|token|passw|credential|signature", re.IGNORECASE)


def redacted_root(root: str) -> str:
    """A storage URI for messages and the commands they suggest, without its secrets: the user part
    (``s3://KEY:SECRET@bucket``) and query values whose key names a secret are left out. What the
    URI needs to reach the store stays, as written (``endpoint_override``, ``scheme``, ``region``):
    a suggested ``--storage`` without a MinIO endpoint sent the user to AWS."""
    if not is_uri(root):
        return root
    parts = urlsplit(root)
    host = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(pair for pair in parts.query.split("&")
                     if pair and not _SECRET_QUERY_KEY.search(pair.split("=", 1)[0]))
    return f"{parts.scheme}://{host}{parts.path}" + (f"?{query}" if query else "")
