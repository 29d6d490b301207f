"""A sweep on a real 3-node Ray cluster with its storage on an S3 server: the path a user takes.

Launched with --address on s3:// storage from one directory; read (status, export, report), stopped,
refused a second driver, and resumed from other directories with nothing local in common (another
working directory and another cache, so not even the local index of sweep names helps). Checked
through the record, the export and the MLflow client: trials on both worker nodes, no epoch missing
and none twice, one parent run, one child per trial.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from _cluster import AWS, cluster, pids_naming, s3  # noqa: F401 - fixtures
from conftest import run_sweeper

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SPACE = """
\"\"\"Two learning rates of a small CNN, long enough to stop and resume mid-sweep.\"\"\"
from ray import tune
from sweeper.spaces import Sweep
SWEEP = Sweep(
    name="on_s3",
    space={"model.arch": "smallcnn", "model.batch_norm": True, "data.name": "digits",
           "data.limit": 1024, "diagnostics.enabled": False,
           "optim.lr": tune.grid_search([0.01, 0.02])},
    scheduler="fifo", max_epochs=EPOCHS, seed=0,
)
"""
EPOCHS = 12


def _env(cluster_env: dict, cache: Path) -> dict:
    keep = {k: cluster_env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    return {**keep, **AWS, "SWEEPER_CACHE_DIR": str(cache)}


def _fresh_dir(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A working directory and a cache of its own: another machine, as far as sweeper can tell."""
    work, cache = tmp_path / name / "work", tmp_path / name / "cache"
    work.mkdir(parents=True)
    cache.mkdir(parents=True)
    return work, cache


def _epochs_done(storage: str, env: dict, cwd: Path) -> int:
    """Epochs run so far by all trials, as the storage shows them (status, from another machine)."""
    out = run_sweeper("export", "on_s3", "--storage", storage, "-f", "json", "-o",
                      str(cwd / "progress"), env=env, cwd=cwd)
    if out.returncode != 0:
        return 0
    import json

    return sum(int(t.get("epochs") or 0) for t in json.loads((cwd / "progress.json").read_text()))


def _status(storage: str, env: dict, cwd: Path) -> str:
    out = run_sweeper("status", "on_s3", "--storage", storage, env=env, cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_a_sweep_on_s3_is_driven_read_stopped_and_resumed_from_anywhere(cluster, s3, tmp_path):
    address, cluster_env = cluster.address, cluster.env
    storage = s3.uri()
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = tmp_path / "on_s3.py"
    space.write_text(SPACE.replace("EPOCHS", str(EPOCHS)))
    launch = ["launch", str(space), "--address", address, "--storage", storage,
              "--tracking-uri", tracking, "--quiet"]

    # ---- machine A launches, in the background ---------------------------------------------------
    work_a, cache_a = _fresh_dir(tmp_path, "a")
    env_a = {**os.environ, **_env(cluster_env, cache_a)}
    env_a.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen([sys.executable, "-m", "sweeper.cli", *launch], cwd=work_a,
                              env=env_a, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        # ---- machine B watches it through the storage alone ------------------------------------
        work_b, cache_b = _fresh_dir(tmp_path, "b")
        env_b = _env(cluster_env, cache_b)
        deadline = time.time() + 300
        while time.time() < deadline:
            out = run_sweeper("status", "on_s3", "--storage", storage, env=env_b, cwd=work_b)
            if out.returncode == 0 and "on_s3': running (driver pid" in out.stdout \
                    and " 2/2 trials started" in out.stdout:
                break
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
            time.sleep(2)
        else:
            pytest.fail("the running sweep never showed on the storage: " + out.stdout + out.stderr)

        # ---- a second driver is refused; B stops the sweep ---------------------------------------
        second = run_sweeper(*launch, env=env_b, cwd=work_b)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "sweep 'on_s3' is already running (driver pid" in second.stderr.splitlines()[0]
        stop = run_sweeper("stop", "on_s3", "--storage", storage, env=env_b, cwd=work_b)
        assert "asked sweep 'on_s3'" in stop.stdout, stop.stdout + stop.stderr
        out, _ = driver.communicate(timeout=300)
        assert driver.returncode == 3, out.decode()[-3000:]  # interrupted, resumable
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert list(work_a.iterdir()) == [], list(work_a.iterdir())  # nothing of the sweep stayed on A
    assert "on_s3': not running" in _status(storage, env_b, work_b)

    # ---- machine C resumes it, and its driver is killed (SIGKILL, no goodbye) -------------------
    work_c, cache_c = _fresh_dir(tmp_path, "c")
    before = _epochs_done(storage, env_b, work_b)
    env_c = {**os.environ, **_env(cluster_env, cache_c)}
    env_c.pop("RAY_ADDRESS", None)
    killed = subprocess.Popen([sys.executable, "-m", "sweeper.cli", *launch], cwd=work_c,
                              env=env_c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and _epochs_done(storage, env_b, work_b) < before + 2:
            assert killed.poll() is None, killed.stdout.read().decode()[-3000:]
            time.sleep(1)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    # Its trials were actors of the dead driver's job: Ray ends them; wait until none is left, so no
    # late checkpoint lands behind the next driver's back.
    deadline = time.time() + 120
    while pids_naming("ray::ImplicitFunc") and time.time() < deadline:
        time.sleep(0.5)

    # ---- machine D takes the sweep over and finishes it -----------------------------------------
    work_dd, cache_dd = _fresh_dir(tmp_path, "d2")
    resumed = run_sweeper(*launch, env=_env(cluster_env, cache_dd), cwd=work_dd, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming sweep 'on_s3'" in resumed.stdout
    assert "died without releasing the sweep: taking it over" in resumed.stdout

    # ---- machine E reads the result: status, export and report agree ----------------------------
    work_d, cache_d = _fresh_dir(tmp_path, "d")
    env_d = _env(cluster_env, cache_d)
    status = _status(storage, env_d, work_d)
    assert "2/2 trials started" in status and "2 completed" in status, status
    export = run_sweeper("export", "on_s3", "--storage", storage, "--epochs", "-o",
                         str(work_d / "on_s3"), env=env_d, cwd=work_d)
    assert export.returncode == 0, export.stdout + export.stderr
    trials = pq.read_table(work_d / "on_s3.trials.parquet").to_pylist()
    epochs = pq.read_table(work_d / "on_s3.epochs.parquet").to_pylist()
    assert len(trials) == 2 and {t["outcome"] for t in trials} == {"completed"}
    for t in trials:
        mine = sorted(e["epoch"] for e in epochs if e["trial_id"] == t["trial_id"])
        assert mine == list(range(1, EPOCHS + 1)), mine  # no epoch missing, none twice
    report = run_sweeper("report", "on_s3", "--storage", storage, env=env_d, cwd=work_d)
    assert report.returncode == 0, report.stdout + report.stderr
    assert (work_d / "on_s3-report" / "report.html").is_file()

    # Both worker nodes trained (the head runs none): the node id each epoch reported.
    nodes = {row.get("node_id") for row in epochs}
    assert len(nodes - {None}) == 2, nodes

    # One parent run across four drivers on four "machines", one child per trial, no step twice.
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("on_s3")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("sweeper.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("sweeper.role") == "trial"]
    assert len(parents) == 1 and len(children) == 2
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert steps == list(range(1, EPOCHS + 1)), steps
        assert run.data.tags["sweeper.outcome"] == "completed"
