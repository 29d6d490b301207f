"""One driver per sweep: a lease with a heartbeat, so that a dead driver is told from a live one.

A bare pid is no proof of life: after a SIGKILL the pid is reused by whatever process starts next,
and ``sweeper stop`` would signal it. The lease (``driver.json`` in the sweep's record) names the
driver by host, pid *and* the kernel's start time of that pid, and the driver rewrites its
``heartbeat`` every few seconds from a daemon thread:

- on the driver's own host, the lease is live while that pid exists with that start time;
- seen from another host, while the heartbeat is younger than :data:`STALE_AFTER_S`.

Nobody signals a driver from outside. ``sweeper stop`` writes ``stop_request.json`` beside the lease;
the driver's heartbeat thread sees it and interrupts its own process (SIGINT: Tune saves the
experiment state and returns, so the sweep stays resumable). That works from any machine that can
write the record, and can never reach a process that is not the driver.

A launch that finds a stale lease takes it over and says so; on the same host it first ends the Ray
processes the dead driver's local Ray left behind (found by the session directory their command
lines name, which the lease records).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


__all__ = ["DriverLease", "LEASE_FILE", "LeaseHeld", "LeaseInfo", "STALE_AFTER_S", "STOP_FILE",
           "clean_orphans", "died_holding", "read_lease", "request_stop"]

HEARTBEAT_S = 2.0
# Three missed heartbeats and a slow shared filesystem: past this, a remote driver is presumed dead.
STALE_AFTER_S = 30.0
LEASE_FILE = "driver.json"
STOP_FILE = "stop_request.json"


@contextlib.contextmanager
def _locked(directory: Path):
    """Two launches deciding at once: an exclusive flock on the record directory itself (no lock
    file is left behind, so a refused launch writes nothing)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of a pid (clock ticks since boot), or None if no such process.

    Field 22 of /proc/<pid>/stat; the command name before it may contain spaces and parentheses,
    so fields are counted from the last ')'.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


@dataclass(frozen=True)
class LeaseInfo:
    pid: int
    host: str
    start_time: str | None
    started: float
    heartbeat: float
    session_dir: str | None = None  # the local Ray this driver started, if any
    # Where the driver's record was, when this lease was read from a copy of that folder (cp -r of
    # a running sweep's storage; told by the folder's inode, not its path). Its driver runs the
    # original, never this copy: it is not this copy's live driver (status called the copy running;
    # stop asked it, to no effect), and while it runs its Ray is not this copy's to end (a launch of
    # the copy takes over as from a dead driver).
    copied_from: str | None = None

    @property
    def local(self) -> bool:
        return self.host == socket.gethostname()

    @property
    def alive(self) -> bool:
        return self.copied_from is None and self._running()

    @property
    def runs_the_original(self) -> bool:
        """Read from a copy, and its driver still runs the folder it was copied from."""
        return self.copied_from is not None and self._running()

    def _running(self) -> bool:
        if self.local:
            # The same pid with the same start time is the same process; a reused pid is not.
            return self.start_time is not None and process_start_time(self.pid) == self.start_time
        return time.time() - self.heartbeat < STALE_AFTER_S

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return f"pid {self.pid} on {self.host}, heartbeat {age:.0f}s ago"


def read_lease(record_dir: str | Path) -> LeaseInfo | None:
    path = Path(record_dir) / LEASE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        # Absent for a record mirrored from a URI (its local copy is this process's own).
        record, inode = data.get("record"), data.get("record_inode")
        copied = (isinstance(record, str) and isinstance(inode, list)
                  and data.get("host") == socket.gethostname() and _inode(record_dir) not in (None, inode))
        return LeaseInfo(pid=int(data["pid"]), host=str(data["host"]),
                         start_time=data.get("start_time"), started=float(data["started"]),
                         heartbeat=float(data.get("heartbeat", data["started"])),
                         session_dir=data.get("session_dir"), copied_from=record if copied else None)
    except (KeyError, TypeError, ValueError):
        return None  # an older record's driver.json: no start time, treated as stale below


def _inode(directory: str | Path) -> list[int] | None:
    """The folder's identity on this host: (device, inode). A copy gets a new one; the same folder
    reached by another path (a bind mount, NFS mounted twice, a symlink) keeps it, and so does a
    move within one file system."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return [st.st_dev, st.st_ino]


def died_holding(record_dir: str | Path, info: LeaseInfo | None) -> bool:
    """Whether a driver held this sweep and is gone without releasing it: no live driver holds the
    lease, yet its file is there (``info`` is what :func:`read_lease` read from it; an unreadable
    file, from an older version, counts)."""
    if info is not None and info.alive:
        return False
    return info is not None or (Path(record_dir) / LEASE_FILE).exists()


class LeaseHeld(Exception):
    """Another live driver holds the sweep."""

    def __init__(self, info: LeaseInfo):
        super().__init__(info.describe())
        self.info = info


class DriverLease:
    """The running driver's claim on a sweep; ``with`` it, or ``claim()`` then ``release()``."""

    def __init__(self, record_dir: str | Path, *, mirrored: bool = False):
        self.dir = Path(record_dir)
        # A record mirrored from a URI lives in a temporary folder of this process: no identity.
        self.mirrored = mirrored
        self.path = self.dir / LEASE_FILE
        self.session_dir: str | None = None
        self.previous: LeaseInfo | None = None  # a stale lease this one took over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stop_requested = False
        self._started = time.time()

    def claim(self) -> "DriverLease":
        """Take the lease, or raise :class:`LeaseHeld` naming the live driver that has it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.dir):
            current = read_lease(self.dir)
            if current is not None and current.alive:  # even this process: a second launch
                raise LeaseHeld(current)
            if current is None and self.path.exists():
                # Unreadable or from an older version: nobody can prove it alive.
                self.previous = LeaseInfo(pid=0, host="?", start_time=None, started=0, heartbeat=0)
            elif current is not None and not self._is_me(current):
                self.previous = current
            (self.dir / STOP_FILE).unlink(missing_ok=True)  # a request for the dead driver
            self._write()
        self._thread = threading.Thread(target=self._beat, name="sweeper-lease", daemon=True)
        self._thread.start()
        return self

    def set_session_dir(self, session_dir: str | None) -> None:
        self.session_dir = session_dir
        self._write()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = read_lease(self.dir)
        if current is not None and self._is_me(current):
            self.path.unlink(missing_ok=True)
        (self.dir / STOP_FILE).unlink(missing_ok=True)

    def __enter__(self) -> "DriverLease":
        return self.claim()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ---- internals ------------------------------------------------------------------------------

    @staticmethod
    def _is_me(info: LeaseInfo) -> bool:
        return info.local and info.pid == os.getpid() \
            and info.start_time == process_start_time(os.getpid())

    def _write(self) -> None:
        now = time.time()
        data = {"pid": os.getpid(), "host": socket.gethostname(),
                "start_time": process_start_time(os.getpid()),
                "started": self._started, "heartbeat": now, "session_dir": self.session_dir}
        if not self.mirrored:  # read_lease tells a copy of the folder by it (LeaseInfo.copied_from)
            data.update(record=str(self.dir.resolve()), record_inode=_inode(self.dir))
        tmp = self.path.with_name(f".{LEASE_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
                if not self.stop_requested and (self.dir / STOP_FILE).exists():
                    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
                        # A driver started in the background of a script (`sweeper launch ... &`)
                        # inherits SIGINT ignored until Tune installs its handler for the run: a
                        # signal now would be lost, so the request waits for a beat that can deliver.
                        continue
                    self.stop_requested = True
                    # Tune treats SIGINT as "save the experiment state and stop"; the signal goes to
                    # this very process, never to a pid read from a file.
                    os.kill(os.getpid(), signal.SIGINT)
            except OSError:
                continue  # a full or briefly unreachable disk: the next beat tries again


def request_stop(record_dir: str | Path) -> LeaseInfo | None:
    """Ask the driver holding the lease to stop; the live lease, or None if no driver is alive."""
    info = read_lease(record_dir)
    if info is None or not info.alive:
        return None
    path = Path(record_dir) / STOP_FILE
    tmp = path.with_name(f".{STOP_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"requested": time.time(), "by_host": socket.gethostname(),
                               "by_pid": os.getpid()}))
    os.replace(tmp, path)
    return info


def clean_orphans(info: LeaseInfo) -> list[int]:
    """End the processes a dead driver's local Ray left behind; the pids ended.

    Only on the dead driver's own host, only for a driver proven dead, and only processes whose
    command line names that driver's Ray session directory (Ray's agents carry it), so nothing but
    what that driver started can match.
    """
    if not info.session_dir or not info.local or info.alive or info.runs_the_original:
        return []
    # The directory itself or a path inside it, never a longer name that starts the same
    # (session_..._555 is a prefix of session_..._5556).
    needle = re.compile(re.escape(info.session_dir.rstrip("/").encode()) + rb"(?=/|\x00|$)")
    ended = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle.search(cmdline):
            try:
                os.kill(int(entry.name), signal.SIGKILL)  # Ray's agents ignore SIGTERM
                ended.append(int(entry.name))
            except OSError:
                continue
    return ended
