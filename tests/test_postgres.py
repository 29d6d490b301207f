"""The production tracking recipe, for real: an `mlflow server` on a PostgreSQL backend (started here
in a temporary cluster on 127.0.0.1, by this test, and stopped by it) receives a whole sweep, a
replayed spool and a server restart without a duplicate point. Skips where PostgreSQL is not
installed (`.ci/run` installs Debian's package when it can).
"""

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port, run_sweeper

pytestmark = [pytest.mark.mlflow, pytest.mark.slow, pytest.mark.postgres]

_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


def _as_postgres(args: list[str], **kw) -> subprocess.CompletedProcess:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` user when we are root."""
    if os.geteuid() == 0:
        args = ["runuser", "-u", "postgres", "--", *args]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def postgres():
    if not _BIN or (os.geteuid() == 0 and shutil.which("runuser") is None):
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    bin_dir = Path(_BIN[-1]).parent
    # Not under pytest's tmp dir: that is private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="sweeper-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    port = free_port()
    out = _as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "--no-sync"])
    assert out.returncode == 0, out.stderr
    out = _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w",
                        "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"])
    assert out.returncode == 0, out.stderr + (root / "log").read_text()
    try:
        out = _as_postgres([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
                            "postgres", "mlflow"])
        assert out.returncode == 0, out.stderr
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(root, ignore_errors=True)


class _Server:
    def __init__(self, backend: str, root: Path):
        self.backend, self.root, self.port = backend, root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> "_Server":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(self.port), "--backend-store-uri", self.backend, "--artifacts-destination",
             str(self.root / "artifacts"), "--workers", "1"],
            stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        for _ in range(180):
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return self
            except OSError:
                assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        raise RuntimeError("mlflow server on PostgreSQL did not come up")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)


SPACE = """
from ray import tune
from sweeper.spaces import Sweep
SWEEP = Sweep(name="on_postgres", space={"model.arch": "smallcnn", "data.name": "digits",
              "data.limit": 256, "optim.lr": tune.grid_search([0.02, 0.05])},
              scheduler="fifo", max_epochs=3, seed=0)
"""


def test_a_sweep_tracked_on_postgresql_has_every_point_once(postgres, tmp_path):
    pytest.importorskip("psycopg2")
    server = _Server(postgres, tmp_path).start()
    try:
        space = tmp_path / "space.py"
        space.write_text(SPACE)
        out = run_sweeper("launch", str(space), "--local", "--num-cpus", "2", "--storage",
                          str(tmp_path / "store"), "--tracking-uri", server.url, "--quiet")
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        # A restarted server and a replayed spool (sync from the top) add nothing.
        server.stop()
        server.start()
        state = next((tmp_path / "store" / "on_postgres" / "sweeper").glob("mlflow_state-*.json"))
        state.unlink()  # as if this machine had never delivered: everything is sent again
        sync = run_sweeper("sync", "on_postgres", "--storage", str(tmp_path / "store"),
                           "--tracking-uri", server.url)
        assert sync.returncode == 0, sync.stdout + sync.stderr
        client = MlflowClient(server.url)
        exp = client.get_experiment_by_name("on_postgres")
        runs = client.search_runs([exp.experiment_id])
        assert sorted(r.data.tags["sweeper.role"] for r in runs) == ["sweep", "trial", "trial"]
        for run in (r for r in runs if r.data.tags["sweeper.role"] == "trial"):
            history = client.get_metric_history(run.info.run_id, "train_loss")
            assert [m.step for m in history] == [1, 2, 3]
            assert run.data.tags["sweeper.outcome"] and "profile.png" in {
                a.path for a in client.list_artifacts(run.info.run_id)}
    finally:
        server.stop()
