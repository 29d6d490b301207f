"""How a running launch is interrupted: Ctrl-C, ``sweeper stop`` (see :mod:`sweeper.lease`), SIGTERM.

Each ends a sweep the same way: Tune saves the experiment state one last time, the trials it was
running are labelled ``stopped`` (their MLflow runs end KILLED, the sweep's too), and the launch exits
3 with the resume command. A second signal skips that last save.

SIGTERM is what schedulers and tools send before their SIGKILL: Slurm at a time limit or on
preemption, Kubernetes and ``docker stop`` (30 s and 10 s of grace by default), ``timeout``, ``kill
PID``. Ray's own handlers (ray.init's, then the core worker's in C++; ray 2.60) ended the driver at
once: seen, exit -6 after a C++ stack dump, every run of the sweep left RUNNING, the last tracking
operations undelivered, no hint. :class:`SigtermStops` turns it into the stop above.

Sent to the whole process group (``timeout``, a batch job step, ``kill -- -PGID``), the SIGTERM also
reaches the local Ray this driver started (Ray blocks SIGINT in its processes, not SIGTERM). Tune
then waited on a dead cluster until Ray's core worker aborted the driver 60 s later (seen: the lease
held, the runs RUNNING, no hint). Ray's Python services die at once on the signal (its GCS and raylet
take ~10 s to drain), so their end tells a driver that its Ray is going: a watchdog then ends the
launch itself within a second -- the trials labelled stopped, the runs ended, the lease released --
and the sweep resumes from Ray's last saved state, as after a killed driver. The same watchdog ends a
launch still running ``GRACE_S`` after a SIGTERM.

Linux tells a child's end through /proc; elsewhere only the deadline applies. Nothing here imports Ray.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from typing import Any, Callable

from sweeper.console import error_console

__all__ = ["GRACE_S", "SigtermStops", "StopNotice", "ray_children"]

# Slurm (KillWait), Kubernetes and Ray's own drain allow 30 s between SIGTERM and SIGKILL: a stop still
# going after 20 s is cut short, leaving time to end the runs and release the sweep.
GRACE_S = 20.0
_CLEANUP_S = 8.0  # what the cut-short end may take: a tracking delivery, the record's last push
EXIT_INTERRUPTED = 3  # interrupted, resumable: sweeper.cli's exit code, defined here for both


def ray_children() -> tuple[int, ...]:
    """This process's children that belong to the local Ray it started (its GCS, raylet and Python
    services: log monitor, autoscaler monitor, dashboard), from /proc; () elsewhere."""
    me, found = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return ()
    for entry in entries:
        stat = _proc_stat(int(entry)) if entry.isdigit() else None
        if stat is None or stat[2] != me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat[0] in ("gcs_server", "raylet") or "/ray/" in command:
            found.append(int(entry))
    return tuple(found)


def _proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(name, state, parent pid) from /proc/PID/stat; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2:].split()  # the name, in parentheses, may hold spaces
    return text[text.index("(") + 1:text.rindex(")")], rest[0], int(rest[1])


def _gone(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is None or stat[1] in ("Z", "X")  # a child of ours not yet reaped is a zombie


class SigtermStops:
    """SIGTERM as a stop, from ``install`` (once Ray is connected) to ``uninstall``.

    - During ``tuner.fit``: Tune's SIGINT handler is called (ray 2.60 tune/tune.py
      ``_setup_signal_catching``): it asks the run to save and return, then puts back the handler
      it replaced, so a second signal is a KeyboardInterrupt that skips the save.
    - Before fit: a KeyboardInterrupt, as Ctrl-C -- even where SIGINT is ignored (a backgrounded
      launch): the launch removes what it started.
    - After fit (the report, the last tracking delivery): the first lets the sweep end, its tracking
      wait cut to seconds (``hurry``); a second is a KeyboardInterrupt.

    From the first SIGTERM a watchdog thread ends the launch itself (``first``, then ``then``, then
    exit 3) when the local Ray's processes die before fit has returned, or when the launch is still
    running ``GRACE_S`` later.
    """

    def __init__(self) -> None:
        self.received = 0
        self.ray_pids: tuple[int, ...] = ()
        # How the watchdog ends a launch, in order: ``cut_short`` (the record, the runs' ends
        # spooled, the resume command; its argument says whether ``then`` delivers them), ``first``
        # (quick: the lease), ``then`` (what may wait on a server: the tracking delivery, the
        # record's push to the storage). A launch ending on a KeyboardInterrupt (a second signal)
        # calls ``cut_short(False)`` itself.
        self.cut_short: Callable[[bool], None] | None = None
        self.first: list[Callable[[], None]] = []
        self.then: list[Callable[[], None]] = []
        self._fit_over = threading.Event()
        self._done = threading.Event()
        self._signalled = threading.Event()  # set by the handler (and by uninstall, to wake)
        self._watchdog: threading.Thread | None = None
        self._previous: Any = None
        self._wake: tuple[int, int] | None = None
        self._installed = False

    @property
    def hurry(self) -> bool:
        return self.received > 0

    def install(self, ray_pids: tuple[int, ...] = ()) -> None:
        if threading.current_thread() is not threading.main_thread():  # signal.signal's rule
            return
        self.ray_pids = ray_pids
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True
        # Python runs a handler in the main thread, between bytecodes: not while that thread waits
        # inside Ray on a dead cluster. The wakeup fd hears the signal at the C level, so the watchdog
        # knows of it even then (only where nothing else in the process uses the fd).
        r, w = os.pipe()
        os.set_blocking(w, False)
        previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        if previous == -1:
            self._wake = (r, w)
        else:  # someone's (an event loop's): theirs stays; the handler alone starts the clock
            signal.set_wakeup_fd(previous)
            os.close(r)
            os.close(w)
        self._watchdog = threading.Thread(target=self._watch, name="sweeper-sigterm", daemon=True)
        self._watchdog.start()

    def reinstall(self) -> None:
        """After ``ray.shutdown()``: Ray's C++ teardown puts SIGTERM's default action back under
        Python's handler table, which still names this one (seen: exit 143 while the report ran)."""
        if self._installed:
            signal.signal(signal.SIGTERM, self._handle)

    def fit_over(self) -> None:
        """``tuner.fit`` has returned or raised: Ray's processes may now end by design."""
        self._fit_over.set()

    def uninstall(self) -> None:
        self._done.set()
        self._signalled.set()
        if not self._installed:
            return
        if self._wake is not None:
            os.write(self._wake[1], b"\0")  # wakes the watchdog's select
        signal.signal(signal.SIGTERM, self._previous)
        self._installed = False
        if self._watchdog is not None:
            self._watchdog.join(1.0)
        if self._wake is not None:
            signal.set_wakeup_fd(-1)
            for fd in self._wake:
                os.close(fd)
            self._wake = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.received += 1
        self._signalled.set()
        on_sigint = signal.getsignal(signal.SIGINT)
        if callable(on_sigint) and on_sigint is not signal.default_int_handler:
            on_sigint(signal.SIGINT, frame)  # Tune's
        elif self._fit_over.is_set() and self.received == 1:
            return  # the sweep ends by itself, hurried; the watchdog bounds it
        else:
            raise KeyboardInterrupt

    def _heard(self, timeout: float | None) -> bool:
        """Whether a SIGTERM has arrived (the wakeup fd), or been handled; waits up to ``timeout``
        (None: until a signal or the uninstall), so an undisturbed sweep costs no wakeups."""
        if self._wake is None:
            self._signalled.wait(timeout)
        else:
            ready, _, _ = select.select([self._wake[0]], [], [], timeout)
            if ready and signal.SIGTERM in os.read(self._wake[0], 512):
                return True
        return self.received > 0

    def _watch(self) -> None:
        since = None
        while not self._done.is_set():
            try:
                heard = self._heard(None if since is None else 0.1)
            except OSError:  # the fds closed by uninstall: the launch has ended
                return
            if since is None:
                if not heard:
                    continue
                since = time.monotonic()
            if (not self._fit_over.is_set() and self.ray_pids
                    and any(_gone(pid) for pid in self.ray_pids)):
                # Ray's core worker ends this process by itself (exit 1) once its raylet closes the
                # object store, within a fraction of a second (seen): only the quick steps, no
                # delivery (the spool keeps it for `sweeper sync`, and the next launch sends it).
                why, deliver = ("Ray's processes on this machine ended with the SIGTERM (it went "
                                "to the whole process group), so Tune cannot finish stopping the "
                                "trials"), False
            elif time.monotonic() > since + GRACE_S:
                why = f"the launch was still running {GRACE_S:.0f} s after the SIGTERM"
                deliver = True
            else:
                continue
            if self._done.is_set():
                return
            error_console.print(f"{why}: ending it here", style="yellow")
            # In a thread of its own, joined with a limit: a delivery or a push to the storage may
            # wait on the network, and the main thread may hold the tracking lock.
            ending = threading.Thread(target=self._end, args=(deliver,), daemon=True,
                                      name="sweeper-sigterm-end")
            ending.start()
            ending.join(_CLEANUP_S)
            os._exit(EXIT_INTERRUPTED)  # the main thread may be stuck in a wait on the dead Ray

    def _end(self, deliver: bool) -> None:
        steps = [(lambda: self.cut_short(deliver))] if self.cut_short is not None else []
        for step in [*steps, *self.first, *(self.then if deliver else ())]:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - the next one still runs, then the exit
                error_console.print(f"warning: {type(exc).__name__}: {exc}")


class StopNotice(logging.Filter):
    """After ``sweeper stop`` the driver interrupts itself (SIGINT, see sweeper.lease), and Tune's
    handler says "Stop signal received (e.g. via SIGINT/Ctrl+C) ... Press CTRL+C ... to skip": no
    one pressed anything. After a SIGTERM neither. That record is reworded to what happened (ray
    2.60 tune/tune.py ``_setup_signal_catching``; the stop tests fail if its wording moves and it
    shows again)."""

    def __init__(self, lease, sigterm: SigtermStops):
        super().__init__()
        self.lease = lease
        self.sigterm = sigterm

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Stop signal received"):
            return True
        if self.sigterm.received:
            record.msg, record.args = ("SIGTERM: stopping this sweep: saving its state one last "
                                       "time, then exiting (resumable; a second SIGTERM or Ctrl-C "
                                       "skips the save)"), ()
        elif self.lease.stop_requested:
            record.msg, record.args = ("`sweeper stop` asked this sweep to stop: saving its state "
                                       "one last time, then exiting (resumable)"), ()
        return True
