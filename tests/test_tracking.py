"""The tracker without Ray: nesting, params within MLflow's limits, credentials stripped, replays
and outages that never duplicate a point. Runs against the embedded SQLite store."""

import json
import math
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port
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


def test_a_run_ended_killed_by_an_interruption_runs_again_when_its_sweep_resumes(tmp_path):
    t = _tracker(tmp_path)
    t.start_sweep(run_name="sweep", tags={}, params={"max_epochs": 3}, texts={})
    t.start_trial("t1", run_name="a", config={"optim.lr": 0.1})
    t.start_trial("t2", run_name="b", config={"optim.lr": 0.2})
    t.log_result("t1", _result(1, train_loss=2.0))
    t.finish("t2", "FINISHED")
    t.finish("t1", "KILLED")  # what an interrupted launch does (callback.mark_stopped, the tuner)
    t.finish(None, "KILLED")
    assert t.flush()
    client = MlflowClient(default_tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("exp").experiment_id

    def statuses():
        return {r.data.tags.get("sweeper.trial_id", "sweep"): r.info.status
                for r in client.search_runs([exp])}

    assert statuses() == {"t1": "KILLED", "t2": "FINISHED", "sweep": "KILLED"}
    resumed = _tracker(tmp_path)  # the next launch: same record, same runs
    resumed.start_sweep(run_name="sweep", tags={}, params={"max_epochs": 3}, texts={})
    resumed.start_trial("t1", run_name="a", config={"optim.lr": 0.1})
    assert resumed.flush()
    assert statuses() == {"t1": "RUNNING", "t2": "FINISHED", "sweep": "RUNNING"}
    assert len(client.search_runs([exp])) == 3  # the same runs, none made again
    resumed.log_result("t1", _result(2, train_loss=1.0))
    resumed.finish("t1", "FINISHED")
    resumed.finish(None, "FINISHED")
    assert resumed.flush()
    assert statuses() == {"t1": "FINISHED", "t2": "FINISHED", "sweep": "FINISHED"}
    run = next(r for r in client.search_runs([exp]) if r.data.tags.get("sweeper.trial_id") == "t1")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]


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


def test_trial_runs_are_looked_up_once_per_process_and_a_dead_drivers_run_is_reused(tmp_path,
                                                                                     monkeypatch):
    """A driver killed between creating a trial's run and saving its delivery state left a run the
    state does not name: the next driver finds it instead of making a second. The lookup is one
    search per process, not one per trial (those grew with the experiment)."""
    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    t.start_trial("t1", run_name="r1", config={"a": 1})
    assert t.flush()
    state = json.loads(t.state_path.read_text())
    del state["runs"]["t1"]  # as if the driver died before saving the new run's id
    t.state_path.write_text(json.dumps(state))
    t2 = _tracker(tmp_path)
    searches = []
    real = MlflowClient.search_runs
    monkeypatch.setattr(MlflowClient, "search_runs",
                        lambda self, *a, **k: searches.append(k.get("filter_string")) or real(self, *a, **k))
    t2.start_trial("t1", run_name="r1", config={"a": 1})
    for i in range(2, 6):
        t2.start_trial(f"t{i}", run_name=f"r{i}", config={"a": i})
        t2.log_result(f"t{i}", _result(1, train_loss=1.0))
    assert t2.flush()
    assert len(searches) == 1
    client = MlflowClient(default_tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("exp")
    by_trial = {}
    for run in client.search_runs([exp.experiment_id]):
        if run.data.tags.get("sweeper.role") == "trial":
            by_trial.setdefault(run.data.tags["sweeper.trial_id"], []).append(run.info.run_id)
    assert sorted(by_trial) == ["t1", "t2", "t3", "t4", "t5"]
    assert all(len(runs) == 1 for runs in by_trial.values())
    assert json.loads(t2.state_path.read_text())["runs"]["t1"] == by_trial["t1"][0]


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


# ---- the why where the run is: profile figure on the child, summary metrics on the parent -------

def _first_and_last(n_layers=6):
    keys = [f"l{i:02d}_conv" for i in range(n_layers)]
    first = _result(1, train_loss=2.3, **{"init/initial_loss": 2.3})
    last = _result(3, train_loss=2.3)
    for i, k in enumerate(keys):
        first |= {f"act_std/{k}": 10.0 ** -i, f"init/act_std/{k}": 10.0 ** -i,
                  f"init/act_std_pred/{k}": 10.0 ** -i, f"init/grad_norm/{k}": 1e-9,
                  f"init/gain_meas/{k}": 0.01, f"init/gain_pred/{k}": 0.01}
        last |= {f"act_std/{k}": 10.0 ** -i, f"update_ratio/{k}": 1e-7, f"dead_frac/{k}": 0.5}
    return first, last


def _lag_behind(t):
    """A restarted driver whose spool state lost everything after the parent: all is replayed."""
    state = json.loads(t.state_path.read_text())
    state.update(offset=0, delivered=0, steps={}, figures={})
    t.state_path.write_text(json.dumps(state))


def test_the_profile_is_rendered_into_the_record_and_uploaded_once(tmp_path):
    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    t.start_trial("t1", run_name="vgg11-normal-plain", config={})
    first, last = _first_and_last()
    t.log_result("t1", first)
    t.log_result("t1", last)
    t.log_figure("t1", first, {**last, "not_a_layer_metric": 1.0, "outcome": "stalled"},
                 title="vgg11-normal-plain")
    op = json.loads(t.spool_path.read_text().splitlines()[-1])
    assert op["op"] == "figure" and "not_a_layer_metric" not in op["last"]
    assert "train_loss" not in op["initial"] and op["last"]["epoch"] == 3.0
    assert t.flush() and t.pending() == 0 and t.figure_errors() == {}
    assert t.figure_path("t1") == tmp_path / "rec" / "figures" / "t1.png"
    assert t.figure_path("t1").stat().st_size > 10_000
    client = MlflowClient(default_tracking_uri(tmp_path))
    run_id = t.run_ids()["t1"]
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.json", "profile.png"]
    run = client.get_run(run_id)
    assert run.data.metrics["profile/act_std_ratio_last_first"] == pytest.approx(1e-5)
    assert run.data.metrics["profile/max_dead_frac"] == pytest.approx(0.5)
    assert [m.step for m in client.get_metric_history(run_id, "profile/min_update_ratio")] == [3]
    assert run.data.tags["sweeper.profile"]

    # A new driver replays the whole spool: nothing is uploaded again, no point is duplicated.
    _lag_behind(t)
    t2 = _tracker(tmp_path)

    def no_upload(*args, **kwargs):
        raise AssertionError("uploaded again on a replay")

    t2.client.log_artifact = no_upload
    assert t2.flush() and t2.pending() == 0
    assert len(client.get_metric_history(run_id, "profile/min_update_ratio")) == 1
    assert len(client.get_metric_history(run_id, "train_loss")) == 2

    # Newer metrics are a new figure: the artifact is replaced, still one file.
    t2.client.log_artifact = MlflowClient(default_tracking_uri(tmp_path)).log_artifact
    t2.log_figure("t1", first, {**last, "epoch": 4, "dead_frac/l00_conv": 0.9})
    assert t2.flush()
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.json", "profile.png"]
    assert client.get_run(run_id).data.metrics["profile/max_dead_frac"] == pytest.approx(0.9)


def test_a_crash_between_upload_and_tag_repeats_the_delivery_harmlessly(tmp_path):
    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    t.start_trial("t1", run_name="r", config={})
    first, last = _first_and_last()
    t.log_figure("t1", first, last)
    real_set_tag = t.client.set_tag
    t.client.set_tag = lambda *a, **k: (_ for _ in ()).throw(ConnectionError("server went away"))
    assert t.flush() is False and "server went away" in t.last_error()
    t.client.set_tag = real_set_tag
    assert t.flush(force=True) and t.pending() == 0
    client = MlflowClient(default_tracking_uri(tmp_path))
    run_id = t.run_ids()["t1"]
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.json", "profile.png"]
    assert len(client.get_metric_history(run_id, "profile/max_dead_frac")) == 1  # exact duplicate


def test_a_figure_that_cannot_be_drawn_never_blocks_the_spool(tmp_path, monkeypatch):
    import sweeper.profile

    def broken(*args, **kwargs):
        raise ValueError("no good")

    monkeypatch.setattr(sweeper.profile, "layer_profile", broken)
    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    t.start_trial("t1", run_name="r", config={})
    t.log_figure("t1", *_first_and_last())
    t.set_tags("t1", {"after": "figure"})
    assert t.flush() and t.pending() == 0
    assert t.figure_errors() == {"t1": "ValueError: no good"}
    client = MlflowClient(default_tracking_uri(tmp_path))
    assert client.get_run(t.run_ids()["t1"]).data.tags["after"] == "figure"


def test_parent_metrics_at_step_0_and_replays_add_no_point(tmp_path):
    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    t.log_parent_metrics({"trials_stalled": 3, "profile/max_dead_frac": 0.25, "best_ok": True,
                          "nan_reading": math.nan, "note": "strings are no metrics", "none": None})
    assert t.flush() and t.pending() == 0
    client = MlflowClient(default_tracking_uri(tmp_path))
    parent = t.parent_run_id()
    metrics = client.get_run(parent).data.metrics
    assert set(metrics) == {"trials_stalled", "profile/max_dead_frac", "best_ok", "nan_reading"}
    assert metrics["trials_stalled"] == 3.0 and math.isnan(metrics["nan_reading"])
    assert [(m.step, m.value) for m in client.get_metric_history(parent, "trials_stalled")] == \
        [(0, 3.0)]
    _lag_behind(t)
    t2 = _tracker(tmp_path)
    assert t2.flush() and t2.pending() == 0
    for key in metrics:
        assert len(client.get_metric_history(parent, key)) == 1, key
    time.sleep(0.01)  # a later summary is a newer point, and the latest value
    t2.log_parent_metrics({"trials_stalled": 4})
    assert t2.flush()
    assert client.get_run(parent).data.metrics["trials_stalled"] == 4.0
    assert len(client.get_metric_history(parent, "trials_stalled")) == 2


def test_one_delivery_of_a_spool_at_a_time_across_processes(tmp_path):
    """A driver's delivery thread and `sweeper sync` beside it share one flock: a flush waits for
    another process's (here, bounded by wait_s), and a nested flush in one process does not wait
    for itself."""
    import fcntl
    import os

    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    t.dir.mkdir(parents=True, exist_ok=True)
    other = os.open(t.dir / ".mlflow_delivery.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)  # another process delivering (a second open file counts)
    try:
        t0 = time.time()
        assert t.flush(wait_s=0.5) is False
        assert 0.4 < time.time() - t0 < 10 and t.pending() == 1
    finally:
        os.close(other)
    nested = []
    real_apply = Tracker._apply

    def apply(self, op, state):
        nested.append(_tracker(tmp_path).flush(wait_s=5))  # same spool, same process, inside
        return real_apply(self, op, state)

    t._apply = apply.__get__(t)
    assert t.flush(wait_s=5) is True and t.pending() == 0
    assert nested == [True]


# ---- delivery sends a trial's pending operations together ----------------------------------------

def _count_calls(client, monkeypatch):
    calls = []
    for name in ("create_run", "log_batch", "set_terminated", "log_dict", "get_run"):
        real = getattr(client, name)
        monkeypatch.setattr(client, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


def test_a_trials_pending_metrics_tags_and_params_go_in_one_request(tmp_path, monkeypatch):
    """Two trials whose operations interleave in the spool: each trial's run of metrics and tags,
    with its new run's params, is one log_batch; each trial's own order holds (the later tag value
    wins, the step sentinel arrives with its step)."""
    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    assert t.flush()
    calls = _count_calls(t.client, monkeypatch)
    for tid in ("a", "b"):
        t.start_trial(tid, run_name=tid, config={"optim.lr": 0.1, "trial": tid})
    for tid in ("a", "b"):
        t.log_result(tid, _result(1, train_loss=1.0, **{"init/initial_loss": 2.3}))
        t.set_tags(tid, {"sweeper.outcome": "running"})
    for tid in ("b", "a"):
        t.log_result(tid, _result(2, train_loss=0.5))
        t.set_tags(tid, {"sweeper.outcome": "completed", "unset": None})
        t.finish(tid, "FINISHED")
    assert t.flush() and t.pending() == 0
    # config.json goes to each new run's artifact store directly (no log_dict, no read back).
    assert sorted(calls) == sorted(["create_run", "log_batch", "set_terminated"] * 2)
    client = MlflowClient(default_tracking_uri(tmp_path))
    for tid in ("a", "b"):
        run = client.get_run(t.run_ids()[tid])
        assert run.data.params == {"optim.lr": "0.1", "trial": tid}
        assert run.data.tags["sweeper.outcome"] == "completed" and "unset" not in run.data.tags
        assert run.info.status == "FINISHED"
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.json"]
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")] \
            == [(1, 1.0), (2, 0.5)]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch")] == [1, 2]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "initial_loss")] == [0]
    assert json.loads(t.state_path.read_text())["steps"] == {"a": 2, "b": 2}


def test_a_batch_cut_short_is_delivered_again_whole_and_once(tmp_path):
    """The server fails the request that carries a new run's params, metrics and tags: the retry
    (a new process, as after a crash) still gives the run its params and every point exactly once."""
    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    t.start_trial("t1", run_name="r", config={"a": 1, "b": "x"})
    t.log_result("t1", _result(1, train_loss=1.0))
    t.set_tags("t1", {"sweeper.outcome": "completed"})
    real = t.client.log_batch
    t.client.log_batch = lambda *a, **k: (_ for _ in ()).throw(ConnectionError("server went away"))
    assert t.flush() is False and "server went away" in t.last_error()
    assert t.pending() == 4  # nothing past the parent counts as delivered
    t.client.log_batch = real
    t2 = _tracker(tmp_path)
    assert t2.flush() and t2.pending() == 0
    client = MlflowClient(default_tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("exp")
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("sweeper.role") == "trial"]
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params == {"a": "1", "b": "x"}
    assert run.data.tags["sweeper.outcome"] == "completed"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 1
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.json"]


def test_a_run_found_again_by_tag_gets_its_params(tmp_path):
    """A driver died after creating a trial's run, before its params were logged or its state
    saved: the next delivery finds the run by tag and logs the params it may lack."""
    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    assert t.flush()
    exp_id = t._experiment_id(t._state())
    orphan = t.client.create_run(exp_id, run_name="r", tags={
        "mlflow.parentRunId": t.parent_run_id(), "sweeper.sweep_uid": "uid-1",
        "sweeper.trial_id": "t1", "sweeper.role": "trial"}).info.run_id
    t2 = _tracker(tmp_path)
    t2.start_trial("t1", run_name="r", config={"a": 1})
    t2.set_tags("t1", {"sweeper.outcome": "completed"})
    assert t2.flush() and t2.run_ids()["t1"] == orphan
    client = MlflowClient(default_tracking_uri(tmp_path))
    assert client.get_run(orphan).data.params == {"a": "1"}
    assert client.get_run(orphan).data.tags["sweeper.outcome"] == "completed"


def test_config_json_of_a_new_run_skips_reading_the_run_back_and_reads_as_log_dicts(tmp_path,
                                                                                    monkeypatch):
    """A run this process created gets config.json straight from its artifact store (no get_run:
    a fifth of a trial's delivery); a run found again by tag goes through log_dict. Both files
    read exactly as MlflowClient.log_dict writes them."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository  # noqa: F401 - the fast path's import: fails loudly if MLflow moves it

    config = {"model.arch": "vgg11", "optim.lr": 0.01, "data.dir": "s3://k:secret@b/d", "n": None}
    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    assert t.flush()
    calls = _count_calls(t.client, monkeypatch)  # log_dict reads the run back to find its store
    t.start_trial("t1", run_name="r", config=config)
    t.log_result("t1", _result(1, train_loss=1.0))
    assert t.flush() and sorted(calls) == ["create_run", "log_batch"]
    client = MlflowClient(default_tracking_uri(tmp_path))
    fresh = t.run_ids()["t1"]
    # The same dict through MlflowClient.log_dict, into a run of its own, as the reference.
    reference = client.create_run(t._experiment_id(t._state())).info.run_id
    client.log_dict(reference, {k: redact(v) for k, v in config.items()}, "config.json")
    expected = client.download_artifacts(reference, "config.json", str(tmp_path / "ref"))
    got = client.download_artifacts(fresh, "config.json", str(tmp_path / "got"))
    assert open(got).read() == open(expected).read()
    assert "secret" not in open(got).read()

    # A run made by a driver that died before saving its state: found by tag, through log_dict.
    orphan = client.create_run(t._experiment_id(t._state()), run_name="r2", tags={
        "mlflow.parentRunId": t.parent_run_id(), "sweeper.sweep_uid": "uid-1",
        "sweeper.trial_id": "t2", "sweeper.role": "trial"}).info.run_id
    t2 = _tracker(tmp_path)
    t2.start_trial("t2", run_name="r2", config=config)
    assert t2.flush() and t2.run_ids()["t2"] == orphan
    again = client.download_artifacts(orphan, "config.json", str(tmp_path / "again"))
    assert open(again).read() == open(expected).read()


def test_a_tracker_pickled_before_the_artifact_uri_cache_existed_still_makes_one_run(tmp_path):
    """Tune pickles the callback and its tracker: one pickled by the previous version has no
    ``_artifact_uris``. It must deliver as before -- one run per trial, with config.json -- and not
    fail after create_run (each retry would have made another run)."""
    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    assert t.flush()
    state = t.__getstate__()
    del state["_artifact_uris"]
    old = Tracker.__new__(Tracker)
    old.__setstate__(state)
    old.start_trial("t1", run_name="r", config={"a": 1})
    assert old.flush() and old.flush()
    client = MlflowClient(default_tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("exp")
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("sweeper.role") == "trial"]
    assert len(runs) == 1
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id)] == ["config.json"]


def test_long_params_and_tags_with_many_metrics_split_under_the_servers_request_cap():
    """100 params of 6,000 characters and 100 tags of 8,000 would be 1.4 MB in one log_batch (the
    MLflow server refuses bodies over 1 MB, on every retry): they split, each entity sent once,
    within the count limits, metrics in order."""
    from mlflow.entities import Metric, Param, RunTag

    from sweeper.tracking import _requests

    params = [Param(f"p{i}", "x" * 6000) for i in range(100)]
    tags = [RunTag(f"t{i}", "y" * 8000) for i in range(100)]
    metrics = [Metric(f"m{i}", float(i), 0, 1) for i in range(1500)]
    requests = list(_requests(list(params), list(tags), list(metrics)))
    assert len(requests) > 2
    for p, t, m in requests:
        assert len(p) <= 100 and len(t) <= 100 and len(p) + len(t) + len(m) <= 1000
        body = sum(len(e.key) + len(e.value) for e in p + t) + sum(len(e.key) + 24 for e in m)
        assert body < 1_000_000
    assert [e.key for r in requests for e in r[0]] == [e.key for e in params]
    assert [e.key for r in requests for e in r[1]] == [e.key for e in tags]
    assert [e.key for r in requests for e in r[2]] == [e.key for e in metrics]


def test_runs_keep_the_trials_own_start_and_end_times_when_delivered_late(tmp_path):
    """A run reaching MLflow after an outage (or through `sweeper sync`) shows when its trial ran,
    not when it was delivered; a replay of its end changes nothing."""
    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    before = int(time.time() * 1000)
    t.start_trial("t1", run_name="r", config={})
    t.finish("t1", "FINISHED")
    ended = int(time.time() * 1000)
    time.sleep(1.2)  # the server was away
    assert t.flush()
    client = MlflowClient(default_tracking_uri(tmp_path))
    info = client.get_run(t.run_ids()["t1"]).info
    assert before <= info.start_time <= info.end_time <= ended
    _lag_behind(t)
    t2 = _tracker(tmp_path)
    assert t2.flush() and t2.pending() == 0
    assert client.get_run(t.run_ids()["t1"]).info.end_time == info.end_time


def test_a_spool_line_from_before_times_were_spooled_never_ends_its_run_before_its_start(tmp_path):
    """An upgrade mid-sweep: the trial's start was spooled by the old code (no time: the run starts
    at delivery), its end by the new code: the run ends at delivery too, not before its start."""
    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    t.start_trial("t1", run_name="r", config={})
    lines = t.spool_path.read_text().splitlines()
    old = json.loads(lines[-1])
    del old["time"]
    t.spool_path.write_text("\n".join(lines[:-1] + [json.dumps(old)]) + "\n")
    t.finish("t1", "FINISHED")
    time.sleep(0.3)  # delivered late
    assert t.flush()
    info = MlflowClient(default_tracking_uri(tmp_path)).get_run(t.run_ids()["t1"]).info
    assert info.end_time >= info.start_time


def test_a_parent_run_found_again_by_tag_gets_the_params_and_texts_it_lacks(tmp_path):
    """A driver died between creating the sweep's run and logging its params and texts: the next
    delivery fills in what is missing and leaves a param already there as it is."""
    from mlflow.entities import Param

    t = _tracker(tmp_path)
    exp_id = t._experiment_id(t._state())
    orphan = t.client.create_run(exp_id, run_name="s", tags={
        "sweeper.sweep_uid": "uid-1", "sweeper.role": "sweep"}).info.run_id
    t.client.log_batch(orphan, params=[Param("metric", "val_loss")])
    t.start_sweep(run_name="s", tags={}, params={"metric": "val_accuracy", "max_epochs": 3},
                  texts={"sweep_file.py": "SWEEP = ..."})
    assert t.flush() and t.parent_run_id() == orphan
    client = MlflowClient(default_tracking_uri(tmp_path))
    assert client.get_run(orphan).data.params == {"metric": "val_loss", "max_epochs": "3"}
    assert [a.path for a in client.list_artifacts(orphan)] == ["sweep_file.py"]


@pytest.mark.parametrize("uri", [None, "", "sqlite:////tmp/x/mlflow.db", "postgresql+psycopg2://u:p@db/mlflow",
                                 "mysql://db/mlflow", "http://127.0.0.1:5000", "HTTPS://host",
                                 "databricks"])
def test_tracking_uris_mlflow_has_a_store_for_pass(uri):
    from sweeper.tracking import check_tracking_uri

    check_tracking_uri(uri)


@pytest.mark.parametrize("uri", ["mlruns", "/tmp/x/mlruns", "file:///tmp/mlruns", r"C:\runs\mlruns"])
def test_mlflows_file_store_is_refused_up_front_unless_mlflow_is_told_to_allow_it(uri, monkeypatch):
    """MLflow 3 raises on every call to its file store: a sweep trained, then retried delivery for
    two minutes and exited 4 as if a server were down."""
    from sweeper.config import ConfigError
    from sweeper.tracking import check_tracking_uri

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError) as err:
        check_tracking_uri(uri)
    (problem,) = err.value.problems
    assert "file store" in problem and "sqlite:///PATH/mlflow.db" in problem
    assert "MLFLOW_ALLOW_FILE_STORE=true" in problem
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_tracking_uri(uri)


def test_a_tracking_uri_that_cannot_work_is_refused_before_the_sweep(tmp_path):
    from sweeper.config import ConfigError
    from sweeper.tracking import check_tracking_uri

    afile = tmp_path / "afile"
    afile.write_text("")
    for uri, message in (("http://", "no host"), ("https:///api", "no host"),
                         (f"sqlite:///{afile}/x.db", f"{afile} is not a directory"),
                         ("sqlite:////proc/nope/x.db", "/proc/nope cannot be made in /proc")):
        with pytest.raises(ConfigError) as err:
            check_tracking_uri(uri)
        assert message in err.value.problems[0], (uri, err.value.problems)
    check_tracking_uri(f"sqlite:///{tmp_path}/new/dir/mlflow.db")  # made on first use
    assert not (tmp_path / "new").exists()  # the check itself leaves nothing behind


def test_a_tracking_uri_without_a_store_names_the_scheme_without_its_password():
    from sweeper.config import ConfigError
    from sweeper.tracking import check_tracking_uri

    with pytest.raises(ConfigError) as err:
        check_tracking_uri("s3://key:secret@bucket/mlflow", option="--tracking-uri")
    assert err.value.problems == [
        "--tracking-uri 's3://***@bucket/mlflow': MLflow has no tracking store for the scheme "
        "'s3'; use a sqlite:, postgresql:, mysql:, mssql:, http: or https: URI "
        "(or a scheme an installed MLflow plugin adds)"]


def _journal_mode(db) -> str:
    import sqlite3

    connection = sqlite3.connect(db)
    try:
        return connection.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        connection.close()


def test_a_new_sqlite_store_is_made_in_wal_mode_and_an_existing_one_keeps_its_mode(tmp_path):
    import sqlite3

    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    assert t.flush()
    assert _journal_mode(tmp_path / "mlflow.db") == "wal"

    theirs = tmp_path / "theirs" / "mlflow.db"  # a store the user made: their choice of mode stands
    theirs.parent.mkdir()
    sqlite3.connect(theirs).close()
    t2 = Tracker(tmp_path / "rec2", f"sqlite:///{theirs}", "exp", "uid-2")
    t2.start_sweep(run_name="s", tags={}, params={}, texts={})
    assert t2.flush()
    assert _journal_mode(theirs) == "delete"


def test_sqlites_own_uri_form_and_percent_escapes_are_read_as_sqlalchemy_reads_them(tmp_path,
                                                                                    monkeypatch):
    import sqlite3

    from sweeper.tracking import _create_sqlite_in_wal_mode, _sqlite_path

    monkeypatch.chdir(tmp_path)
    theirs = tmp_path / "x.db"
    sqlite3.connect(theirs).close()
    # SQLite's URI form opens what the user says, how they say it (here: read-only): left alone.
    _create_sqlite_in_wal_mode(f"sqlite:///file:{theirs}?mode=ro&uri=true")
    assert _journal_mode(theirs) == "delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.db"]  # no stray "file:" folder
    assert _sqlite_path("sqlite:///%20sp.db") == Path(" sp.db")
    _create_sqlite_in_wal_mode("sqlite:///%20sp.db")
    assert _journal_mode(tmp_path / " sp.db") == "wal"
    assert _sqlite_path("sqlite://") is None and _sqlite_path("sqlite:///:memory:") is None


def test_a_reader_in_the_store_does_not_hold_up_delivery(tmp_path):
    """`sweeper ui` or `sweeper report` reading the embedded store while a sweep delivers: in
    SQLite's rollback-journal mode the writer waits for the reader (up to MLflow's 20 s busy
    timeout, then fails); in WAL mode neither waits."""
    import sqlite3

    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    t.start_trial("t1", run_name="a", config={"optim.lr": 0.1})
    assert t.flush()
    reader = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM runs").fetchone()[0] == 2  # holds its snapshot
        t.log_result("t1", _result(1, val_accuracy=0.5))
        t.finish("t1", "FINISHED")
        start = time.monotonic()
        assert t.flush() and t.pending() == 0
        assert time.monotonic() - start < 5.0
    finally:
        reader.execute("COMMIT")
        reader.close()
    run = MlflowClient(default_tracking_uri(tmp_path)).search_runs(
        [MlflowClient(default_tracking_uri(tmp_path)).get_experiment_by_name("exp").experiment_id],
        filter_string="tags.`sweeper.role` = 'trial'")[0]
    assert run.data.metrics["val_accuracy"] == 0.5 and run.info.status == "FINISHED"


def test_params_are_the_sweeps_values_and_config_json_the_resolved_config(tmp_path):
    """Save the resolved config with every result: params keep what the sweep set (what a user
    filters on), config.json every setting the trial ran with, defaults included."""
    t = _tracker(tmp_path)
    t.start_sweep(run_name="s", tags={}, params={}, texts={})
    t.start_trial("t1", run_name="r", config={"optim.lr": 0.01},
                  resolved={"optim.lr": 0.01, "optim.momentum": 0.9, "data.dir": "s3://k:secret@b/d"})
    t.log_result("t1", _result(1, train_loss=1.0))
    assert t.flush()
    client = MlflowClient(default_tracking_uri(tmp_path))
    run_id = t.run_ids()["t1"]
    assert client.get_run(run_id).data.params == {"optim.lr": "0.01"}
    saved = json.loads(Path(client.download_artifacts(run_id, "config.json", str(tmp_path / "got"))).read_text())
    assert saved["optim.momentum"] == 0.9 and saved["optim.lr"] == 0.01
    assert "secret" not in json.dumps(saved)


def test_a_moved_storage_folder_keeps_its_embedded_store_for_status_and_sync(tmp_path):
    """A storage folder moved elsewhere takes its mlflow.db along, but the record named the old
    absolute path: status said "all delivered to" it and sync delivered there (re-creating it)."""
    import shutil

    from conftest import run_sweeper
    from sweeper.records import SweepRecord
    from sweeper.tracking import sweep_tracking_uri

    old, new = tmp_path / "old", tmp_path / "moved"
    record = SweepRecord(old / "mv")
    # As a launch writes it, before `tracking_default` was recorded: recognised by its path.
    record.create({"name": "mv", "sweep_uid": "uid-mv", "planned_trials": 1, "experiment_dir": str(old / "mv"),
                   "tracking_uri": default_tracking_uri(old)}, "")
    t = Tracker(record.dir, default_tracking_uri(old), "mv", "uid-mv")
    t.start_sweep(run_name="mv", tags={}, params={}, texts={})
    t.start_trial("t1", run_name="r", config={"optim.lr": 0.1})
    assert t.flush()
    t.log_result("t1", _result(1, train_loss=1.0))  # spooled, not delivered before the move
    t.finish("t1", "FINISHED")
    report = tmp_path / "report"
    report.mkdir()
    (report / "summary.md").write_text("after the move")
    t.log_artifacts(None, report, "report")
    shutil.move(old, new)

    moved = SweepRecord(new / "mv")
    assert sweep_tracking_uri(moved.meta(), str(new)) == default_tracking_uri(new)
    # Another store named by the launch stays what it named, moved folder or not.
    assert sweep_tracking_uri({"tracking_uri": "http://h:5000", "tracking_default": False}, str(new)) \
        == "http://h:5000"
    assert sweep_tracking_uri({"tracking_uri": "sqlite:////elsewhere/mlflow.db",
                               "experiment_dir": str(old / "mv")}, str(new)) == "sqlite:////elsewhere/mlflow.db"
    out = run_sweeper("status", "mv", "--storage", str(new))
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 0, text
    # What was delivered before the move stays delivered: only the epoch, the end and the report.
    assert f"3 operation(s) not yet delivered to {default_tracking_uri(new)}" in text, text
    out = run_sweeper("sync", "mv", "--storage", str(new))
    assert out.returncode == 0, out.stdout + out.stderr
    assert not old.exists()  # nothing was delivered to, or made at, the old place
    client = MlflowClient(default_tracking_uri(new))
    run = client.search_runs([client.get_experiment_by_name("mv").experiment_id],
                             "tags.`sweeper.role` = 'trial'")[0]
    assert run.info.status == "FINISHED" and run.data.metrics["train_loss"] == 1.0
    # MLflow keeps the runs' artifact paths as made (under old/): the files go beside the store now.
    parent = run.data.tags["mlflow.parentRunId"]
    assert (new / "mlartifacts" / "mv" / parent / "artifacts" / "report" / "summary.md").read_text() == "after the move"
    out = run_sweeper("status", "mv", "--storage", str(new))
    assert f"MLflow: all delivered to {default_tracking_uri(new)}" in " ".join(out.stdout.split()), out.stdout


def test_a_resume_keeps_the_store_its_runs_are_in_and_says_when_it_cannot(tmp_path):
    """`sweeper resume NAME` (the command sweeper suggests) took the default store: a sweep launched
    with --tracking-uri, or on a URI storage from another directory, was split between two stores,
    the first left with KILLED runs and the second given a full copy, without a word."""
    from sweeper.tracking import launch_tracking_uri

    storage = str(tmp_path / "store")
    default = default_tracking_uri(tmp_path / "store")
    custom = f"sqlite:///{tmp_path / 'track' / 'custom.db'}"
    (tmp_path / "track").mkdir()
    assert launch_tracking_uri({}, storage, None) == (default, None)  # a new sweep
    assert launch_tracking_uri({}, storage, custom) == (custom, None)
    meta = {"tracking_uri": custom, "experiment_dir": f"{storage}/s", "tracking_default": False}
    assert launch_tracking_uri(meta, storage, None) == (custom, None)
    assert launch_tracking_uri(meta, storage, custom) == (custom, None)
    uri, note = launch_tracking_uri(meta, storage, default)  # told to change: done, and said
    assert uri == default and note == (f"MLflow: this sweep's runs so far are in {custom}; this launch "
                                       f"records to {default}, where its runs are made anew from the "
                                       "sweep's record")
    gone = {**meta, "tracking_uri": "sqlite:////no/such/machine/dir/mlflow.db"}
    uri, note = launch_tracking_uri(gone, storage, None)
    assert uri == default and "/no/such/machine/dir/mlflow.db (not on this machine)" in note
    secret = {**meta, "tracking_uri": "http://***@mlflow.lab:5000"}
    uri, note = launch_tracking_uri(secret, storage, None)
    assert uri == default and "credentials are not kept: pass --tracking-uri" in note
    # The embedded store of a moved storage folder is the one beside it now: no note.
    moved = {"tracking_uri": default_tracking_uri(tmp_path / "old"), "experiment_dir": str(tmp_path / "old" / "s")}
    assert launch_tracking_uri(moved, storage, None) == (default, None)


def _sweep_with_a_report(tmp_path, store, name, text):
    """A sweep run, a trial run, the sweep file and report/summary.md (``text``), all delivered to
    the embedded store in ``store``; the report's folder."""
    t = Tracker(store / "rec", default_tracking_uri(store), name, f"uid-{name}")
    t.start_sweep(run_name=name, tags={}, params={}, texts={"sweep_file.py": "SWEEP = ..."})
    t.start_trial("t1", run_name="r", config={"optim.lr": 0.1})
    report = tmp_path / "report"
    report.mkdir(exist_ok=True)
    (report / "summary.md").write_text(text)
    t.log_artifacts(None, report, "report")
    assert t.flush() and t.pending() == 0
    return report


def test_a_copy_of_a_storage_folder_never_writes_into_the_original(tmp_path):
    """A copy's resume wrote its report and figures through the runs' recorded artifact paths,
    into the original folder: it overwrote the original sweep's report/summary.md."""
    import shutil

    orig, copy = tmp_path / "orig", tmp_path / "copy"
    report = _sweep_with_a_report(tmp_path, orig, "cp", "the original's")
    shutil.copytree(orig, copy)
    before = {p: p.read_bytes() for p in orig.rglob("*") if p.is_file() and p.suffix != ".db"}

    c = Tracker(copy / "rec", default_tracking_uri(copy), "cp", "uid-cp")
    c.moved_from = default_tracking_uri(orig)
    (report / "summary.md").write_text("the copy's")
    c.log_artifacts(None, report, "report")
    c.log_figure("t1", {"init/act_std/l00_conv": 1.0, "init/act_std/l01_conv": 0.1},
                 {"epoch": 1, "act_std/l00_conv": 1.0, "act_std/l01_conv": 0.2})
    assert c.flush() and c.pending() == 0
    after = {p: p.read_bytes() for p in orig.rglob("*") if p.is_file() and p.suffix != ".db"}
    assert after == before  # nothing written into, or added to, the original
    runs = copy / "mlartifacts" / "cp"
    assert [p.read_text() for p in runs.glob("*/artifacts/report/summary.md")] == ["the copy's"]
    assert len(list(runs.glob("*/artifacts/profile.png"))) == 1


def test_a_sweeps_folder_copied_alone_into_another_storage_gets_a_store_of_its_own(tmp_path):
    """`cp -r sweeps/cp /archive/sweeps/`: no mlflow.db came along, and the delivery state carried
    from the old path named runs the new store lacks: sync failed for good ("Run ... not found")."""
    import shutil

    from conftest import run_sweeper
    from sweeper.records import SweepRecord

    orig, archive = tmp_path / "orig", tmp_path / "archive"
    record = SweepRecord(orig / "cp")
    record.create({"name": "cp", "sweep_uid": "uid-cp", "planned_trials": 1, "experiment_dir": str(orig / "cp"),
                   "tracking_uri": default_tracking_uri(orig), "tracking_default": True}, "")
    t = Tracker(record.dir, default_tracking_uri(orig), "cp", "uid-cp")
    t.start_sweep(run_name="cp", tags={}, params={}, texts={})
    t.start_trial("t1", run_name="r", config={"optim.lr": 0.1})
    t.log_result("t1", _result(1, train_loss=1.0))
    t.finish("t1", "FINISHED")
    assert t.flush() and t.pending() == 0
    archive.mkdir()
    shutil.copytree(orig / "cp", archive / "cp")
    db_before = (orig / "mlflow.db").read_bytes()

    out = run_sweeper("sync", "cp", "--storage", str(archive))
    assert out.returncode == 0, out.stdout + out.stderr
    out = run_sweeper("status", "cp", "--storage", str(archive))
    assert f"MLflow: all delivered to {default_tracking_uri(archive)}" in " ".join(out.stdout.split()), out.stdout
    client = MlflowClient(default_tracking_uri(archive))
    runs = client.search_runs([client.get_experiment_by_name("cp").experiment_id])
    assert sorted(r.data.tags["sweeper.role"] for r in runs) == ["sweep", "trial"]
    trial = next(r for r in runs if r.data.tags["sweeper.role"] == "trial")
    assert trial.data.metrics["train_loss"] == 1.0 and trial.info.status == "FINISHED"
    assert (orig / "mlflow.db").read_bytes() == db_before  # the original's store is not touched


def test_files_of_a_store_under_a_folder_named_mlartifacts_go_where_mlflow_reads_them(tmp_path):
    """Nothing moved, but the storage path holds 'mlartifacts' itself: the files must land at the
    runs' own artifact paths (a split at the first '/mlartifacts/' sent them elsewhere)."""
    store = tmp_path / "mlartifacts" / "sweeps"
    _sweep_with_a_report(tmp_path, store, "exp", "here")
    t = Tracker(store / "rec", default_tracking_uri(store), "exp", "uid-exp")
    client = MlflowClient(default_tracking_uri(store))
    parent, child = t.parent_run_id(), t.run_ids()["t1"]
    assert [f.path for f in client.list_artifacts(parent, "report")] == ["report/summary.md"]
    assert "sweep_file.py" in [f.path for f in client.list_artifacts(parent)]
    assert [f.path for f in client.list_artifacts(child)] == ["config.json"]
