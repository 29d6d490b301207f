"""`sweeper ui`: the MLflow UI over the embedded store, opened in model-training mode, serving the
trials' profile figures, and stopped as a whole (server, its workers) by one signal to `sweeper ui`."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port
from sweeper.tracking import Tracker, default_tracking_uri

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc (Linux)")


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a live process; None when it is gone (or only a zombie)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid, pgid = text[text.rindex(")") + 2:].split()[:3]
    return None if state in ("Z", "X") else (state, int(ppid), int(pgid))


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            children.setdefault(st[1], []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, str]:
    """An embedded store with one sweep and one trial whose profile figure was delivered."""
    tmp_path = tmp_path_factory.mktemp("ui-store")
    t = Tracker(tmp_path / "rec", default_tracking_uri(tmp_path), "exp", "uid-1")
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    t.start_trial("t1", run_name="r", config={})
    t.log_figure("t1", {"init/act_std/l00_conv": 1.0, "init/act_std/l01_conv": 0.1},
                 {"epoch": 1, "act_std/l00_conv": 1.0, "act_std/l01_conv": 0.2})
    assert t.flush()
    return tmp_path, t.run_ids()["t1"]


@pytest.mark.mlflow
@pytest.mark.slow  # a real MLflow server, started and stopped twice
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_opens_in_training_mode_and_one_signal_stops_everything(store, stop):
    """SIGTERM as a supervisor sends it; SIGINT as Ctrl-C would (a terminal signals the foreground
    group, which the server is not in: `sweeper ui` must forward it)."""
    tmp_path, child_run = store
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sweeper.cli", "ui", "exp", "--storage",
                             str(tmp_path), "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: list[int] = []
    try:
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/#/experiments/1/runs?workflowType=machine_learning " \
            in first, first
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("the UI did not come up")
                time.sleep(0.5)
        artifact = (f"http://127.0.0.1:{port}/get-artifact?path=profile.png"
                    f"&run_uuid={child_run}")
        with urllib.request.urlopen(artifact, timeout=10) as r:
            assert r.read(8) == b"\x89PNG\r\n\x1a\n"  # the trial's profile, served by the UI

        seen = _descendants(proc.pid)
        server = [p for p in seen if _stat(p) and _stat(p)[1] == proc.pid]
        assert len(server) == 1, [_cmdline(p) for p in seen]
        assert _stat(server[0])[2] == server[0] != os.getpgid(proc.pid)  # its own process group
        if (os.cpu_count() or 1) <= 4:
            assert "--workers 1" in " ".join(_cmdline(server[0])), _cmdline(server[0])

        os.kill(proc.pid, stop)  # only `sweeper ui` itself, as a terminal or a supervisor would
        assert proc.wait(30) == 0
        deadline = time.time() + 20
        while (alive := [p for p in seen if _stat(p) is not None]) and time.time() < deadline:
            time.sleep(0.2)
        assert not alive, [_cmdline(p) for p in alive]
    finally:
        for pid in [proc.pid, *seen]:  # only what this test started, by pid
            if _stat(pid) is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait(10)
