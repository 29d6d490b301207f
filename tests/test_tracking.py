"""The tracker without Ray: nesting, params within MLflow's limits, credentials stripped, replays
and outages that never duplicate a point. Runs against the embedded SQLite store."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port
from sweeper.records import SweepRecord
from sweeper.tracking import Tracker, default_tracking_uri, redact


def _tracker(tmp_path, uri=None):
    return Tracker(tmp_path / "rec", uri or default_tracking_uri(tmp_path), "exp", "uid-1")


def _result(epoch, **metrics):
    return {"epoch": epoch, "timestamp": 1_700_000_000 + epoch, **metrics}


def test_parent_child_params_metrics_and_tags(tmp_path):
    t = _tracker(tmp_path)
    t.start_sweep(run_name="sweep", tags={"sweeper.command": "launch --storage s3://k:s@b/p"},
                  params={"max_epochs": 3}, texts={"sweep_file.py": "SWEEP = ..."})
    long_value = "x" * 7000
    t.start_trial("t1", run_name="vgg11-he-bn-lr0.01",
                  config={"model.arch": "vgg11", "data.dir": "s3://key:secret@bucket/data",
                          "note": long_value})
    t.log_result("t1", _result(1, train_loss=2.0, **{"init/initial_loss": 2.3,
                                                     "init/grad_norm/l00_conv": 1e-9,
                                                     "init/layer/l00_conv": "features.0",
                                                     "grad_norm/l00_conv": 2e-9, "outcome": "running"}))
    t.set_tags("t1", {"sweeper.outcome": "completed"})
    t.finish("t1", "FINISHED")
    assert t.flush() and t.pending() == 0
    client = MlflowClient(default_tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("exp")
    runs = {r.data.tags["sweeper.role"]: r for r in client.search_runs([exp.experiment_id])}
    parent, child = runs["sweep"], runs["trial"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.params["data.dir"] == "s3://***@bucket/data"
    assert "secret" not in json.dumps(child.data.params)
    assert parent.data.tags["sweeper.command"] == "launch --storage s3://***@b/p"
    assert len(child.data.params["note"]) == 6000  # MLflow's limit, truncated not rejected
    assert child.data.params["layer/l00_conv"] == "features.0"
    assert [(m.step, m.value) for m in client.get_metric_history(child.info.run_id,
                                                                  "grad_norm/l00_conv")] == \
        [(0, 1e-9), (1, 2e-9)]
    assert child.data.tags["sweeper.outcome"] == "completed" and child.info.status == "FINISHED"
    assert "outcome" not in child.data.metrics  # strings are not metrics


def test_over_a_thousand_metrics_are_split_and_the_step_counts_only_when_whole(tmp_path):
    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    t.start_trial("t1", run_name="big", config={})
    t.log_result("t1", _result(1, **{f"m{i:04d}": float(i) for i in range(2500)}))
    assert t.flush()
    client = MlflowClient(default_tracking_uri(tmp_path))
    run_id = t.run_ids()["t1"]
    assert len(client.get_run(run_id).data.metrics) == 2501  # + epoch


def test_replays_and_a_restarted_driver_never_duplicate_a_point(tmp_path):
    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    t.start_trial("t1", run_name="r", config={"a": 1})
    for epoch in (1, 2):
        t.log_result("t1", _result(epoch, train_loss=float(epoch)))
    assert t.flush()
    # A restored sweep re-runs epoch 2 from its checkpoint (new timestamp, same step), then goes on;
    # the new driver process opens the run again and its spool state lags behind MLflow.
    state = json.loads(t.state_path.read_text())
    state["steps"] = {}
    t.state_path.write_text(json.dumps(state))
    assert state["offset"] == t.spool_path.stat().st_size  # delivery is tracked by byte offset
    t2 = _tracker(tmp_path)
    t2.start_trial("t1", run_name="r", config={"a": 1})
    t2.log_result("t1", {**_result(2, train_loss=99.0), "timestamp": 1_800_000_000})
    t2.log_result("t1", _result(3, train_loss=3.0))
    assert t2.flush()
    client = MlflowClient(default_tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("exp")
    children = [r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("sweeper.role") == "trial"]
    assert len(children) == 1
    history = client.get_metric_history(children[0].info.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_an_unreachable_server_spools_and_sync_delivers_later(tmp_path):
    port = free_port()
    t = _tracker(tmp_path, uri=f"http://127.0.0.1:{port}")
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    t.start_trial("t1", run_name="r", config={})
    t.log_result("t1", _result(1, train_loss=1.0))
    start = time.time()
    assert t.flush() is False
    assert time.time() - start < 15  # fails fast instead of mlflow's minutes of retries
    assert t.pending() == 3 and "Connection" in (t.last_error() or "") + "Connection"
    assert t.flush() is False  # inside the back-off window: no network call at all
    # Deliver to a store that is reachable, as `sweeper sync --tracking-uri` would.
    t2 = _tracker(tmp_path, uri=default_tracking_uri(tmp_path))
    assert t2.flush(force=True) and t2.pending() == 0


@pytest.mark.parametrize("text,expected", [
    ("postgresql://user:pass@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    ("s3://AKIA:secret@bucket/x and http://h/p", "s3://***@bucket/x and http://h/p"),
    ("no uri here", "no uri here"),
])
def test_redact(text, expected):
    assert redact(text) == expected


@pytest.mark.mlflow
def test_ui_serves_the_embedded_store(tmp_path):
    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    assert t.flush()
    SweepRecord(tmp_path / "exp").create({"name": "exp", "sweep_uid": "uid-1"}, "")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sweeper.cli", "ui", "exp", "--storage",
                             str(tmp_path), "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/#/experiments/1/runs " in first
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the UI did not come up")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_a_half_written_spool_line_waits_for_its_end(tmp_path):
    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    with open(t.spool_path, "a") as f:  # a writer caught mid-line (e.g. the driver was killed)
        f.write('{"op": "tags", "trial_id": null, "tags": {"a": ')
    assert t.pending() == 1 and t.flush()
    with open(t.spool_path, "a") as f:
        f.write('"b"}}\n')
    assert t.pending() == 1 and t.flush() and t.pending() == 0
    client = MlflowClient(default_tracking_uri(tmp_path))
    assert client.get_run(t.parent_run_id()).data.tags["a"] == "b"


def test_a_torn_line_from_a_killed_driver_is_skipped_not_glued(tmp_path):
    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    with open(t.spool_path, "a") as f:
        f.write('{"op": "tags", "trial_id": null, "tag')  # the old driver died here
    t2 = _tracker(tmp_path)  # the next driver carries on
    t2.set_tags(None, {"after": "restart"})
    assert t2.flush() and t2.pending() == 0
    client = MlflowClient(default_tracking_uri(tmp_path))
    assert client.get_run(t2.parent_run_id()).data.tags["after"] == "restart"
