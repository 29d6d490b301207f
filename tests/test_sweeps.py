"""Sweeps on a real local Ray with a real MLflow server: the quick study end to end, export, status,
restore after a killed driver, retry from a checkpoint, Optuna pruning, a tracking-server outage.

Each test drives the real CLI in a subprocess that starts (and stops) its own Ray.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from conftest import MlflowServer, run_sweeper
from sweeper import outcomes
from sweeper.checkpoints import restorable_checkpoints
from sweeper.config import TrialConfig
from sweeper.records import SweepRecord

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
VGG_DEPTH = str(ROOT / "search_spaces" / "vgg_depth.py")
QUICK = ["dataset=digits", "width=1/8", "max_epochs=6", "num_samples=2"]
OUTCOMES = set(outcomes.OUTCOMES) - {"stopped"}  # every trial of a finished sweep ended


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory, mlflow_server):
    storage = tmp_path_factory.mktemp("quick")
    t0 = time.time()
    out = run_sweeper("launch", VGG_DEPTH, "--local", "--storage", str(storage), "--quiet",
                      "--tracking-uri", mlflow_server.url, *QUICK, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return SweepRecord(storage / "vgg_depth"), storage, out, time.time() - t0


def _cell(t):
    c = t["config"]
    return c["model.arch"], c["model.init"], c["model.batch_norm"]


def test_quick_study_runs_every_cell_and_asha_stops_trials(quick_study):
    record, _, out, seconds = quick_study
    trials = record.trials()
    assert len(trials) == 48
    assert len({_cell(t) for t in trials}) == 24  # every cell of 4 depths x 3 inits x BN on/off
    assert all(t["status"] == "finished" and t["outcome"] in OUTCOMES for t in trials)
    total_epochs = sum(t["epochs"] for t in trials)
    assert total_epochs < 48 * 6, total_epochs  # ASHA stopped some trials early
    stopped = [t for t in trials if t.get("prune")]
    assert stopped
    for t in stopped:  # explainable pruning: rung, cutoff, peers and the trial's value
        p = t["prune"]
        assert p["rung"] == 3 and p["peers"] >= 1 and p["value"] <= p["cutoff"]
        assert t["epochs"] == 3
    assert "48 trials" in out.stdout


def test_quick_study_labels_stalls_by_cause(quick_study):
    record, *_ = quick_study
    for t in record.trials():
        arch, init, bn = _cell(t)
        if init == "normal" and not bn:
            # At chance whether it ran on or ASHA cut it (then "pruned", with its state kept apart).
            assert t["outcome"] in ("stalled", "pruned") and t["at_chance"], (t["name"], t)
            assert t["cause"] in ("vanishing_signal", "vanishing_gradient"), t["cause"]
    for arch in ("vgg11", "vgg13", "vgg16", "vgg19"):
        best = max((t["best"] or {}).get("val_accuracy", 0) for t in record.trials()
                   if _cell(t) == (arch, "he", True))
        assert best > 0.5, (arch, best)  # He + BN trains at every depth


def test_status_and_export_round_trip(quick_study, tmp_path):
    record, storage, *_ = quick_study
    status = run_sweeper("status", "vgg_depth", "--storage", str(storage))
    assert status.returncode == 0, status.stderr
    assert "48/48 trials started" in status.stdout and "stalled" in status.stdout
    assert "MLflow: all delivered" in status.stdout

    out = run_sweeper("export", "vgg_depth", "--storage", str(storage), "--format", "parquet",
                      "--epochs", "--out", str(tmp_path / "vgg"))
    assert out.returncode == 0, out.stderr
    trials = pq.read_table(tmp_path / "vgg.trials.parquet")
    schema = {f.name: str(f.type) for f in trials.schema}
    assert trials.num_rows == 48
    for column, kind in [("trial_id", "string"), ("outcome", "string"), ("epochs", "int64"),
                         ("config.optim.lr", "double"), ("config.model.arch", "string"),
                         ("config.model.batch_norm", "bool"), ("best.val_accuracy", "double"),
                         ("last.train_loss", "double"), ("prune.rung", "int64"),
                         ("prune.cutoff", "double")]:
        assert schema.get(column) == kind, (column, schema.get(column))
    epochs = pq.read_table(tmp_path / "vgg.epochs.parquet")
    assert epochs.num_rows == sum(t["epochs"] for t in record.trials())
    assert "grad_norm/l00_conv" in epochs.column_names
    csv = run_sweeper("export", "vgg_depth", "--storage", str(storage), "--format", "csv",
                      "--out", str(tmp_path / "vgg"))
    assert csv.returncode == 0 and (tmp_path / "vgg.csv").read_text().count("\n") == 49


@pytest.mark.mlflow
def test_mlflow_has_one_parent_and_one_child_per_trial_with_layer_metrics(quick_study, mlflow_server):
    record, *_ = quick_study
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("vgg_depth")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweeper.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("sweeper.role") == "trial"]
    assert len(parents) == 1 and len(children) == 48
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert parent.data.tags["sweeper.git_sha"]
    # Each result carries the code it came from (its seed and config are its params).
    assert {(c.data.tags.get("sweeper.git_sha"), c.data.tags.get("sweeper.git_dirty")) for c in children} \
        == {(parent.data.tags["sweeper.git_sha"], parent.data.tags["sweeper.git_dirty"])}
    by_trial = {c.data.tags["sweeper.trial_id"]: c for c in children}
    assert set(by_trial) == {t["trial_id"] for t in record.trials()}
    for t in record.trials()[:12]:
        run = by_trial[t["trial_id"]]
        assert run.data.tags["sweeper.outcome"] == t["outcome"]
        assert run.data.params["model.init"] == t["config"]["model.init"]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "grad_norm/l00_conv")]
        assert steps == list(range(0, t["epochs"] + 1))  # step 0 = init, then one per epoch
        for key in ("act_std/l05_conv", "dead_frac/l03_conv", "update_ratio/l00_conv", "val_loss"):
            history = client.get_metric_history(run.info.run_id, key)
            assert len(history) == len({m.step for m in history}) >= t["epochs"]
        if t["outcome"] == "stalled":
            assert run.data.tags["sweeper.stall_reason"] == t["cause"]
        assert run.data.tags["sweeper.at_chance"] == str(t["at_chance"]).lower()
        assert run.data.tags["mlflow.note.content"].startswith(t["name"])  # the one-line diagnosis
    # The parent shows the sweep's result: the same counts as its children's sweeper.outcome tags.
    tagged = Counter(c.data.tags["sweeper.outcome"] for c in children)
    assert {k: int(parent.data.metrics[f"trials_{k}"]) for k in tagged} == dict(tagged)
    assert "report/report.html" in parent.data.tags["mlflow.note.content"]
    some = by_trial[record.trials()[0]["trial_id"]]
    assert {"profile.png", "config.json"} <= {a.path for a in client.list_artifacts(some.info.run_id)}
    # config.json goes through the server's artifact proxy (mlflow-artifacts:/), not a local path.
    with tempfile.TemporaryDirectory() as tmp:
        saved = json.loads(Path(client.download_artifacts(some.info.run_id, "config.json", tmp)).read_text())
    # The resolved config: every setting the trial ran with, defaults included (params: the sweep's).
    drawn = record.trials()[0]["config"]
    assert saved == json.loads(json.dumps(TrialConfig.from_flat(drawn).to_flat()))
    assert drawn.items() <= saved.items() and "optim.momentum" in saved and len(saved) > len(drawn)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/heatmap.png"} <= artifacts
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_file.py", "plan.json"} <= top

    # What the MLflow UI asks its server for to draw the run tree: children under the parent.
    import urllib.request

    body = json.dumps({"experiment_ids": [exp.experiment_id], "max_results": 1000,
                       "filter": f"tags.mlflow.parentRunId = '{parent.info.run_id}'"}).encode()
    request = urllib.request.Request(mlflow_server.url + "/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        nested = json.loads(response.read())["runs"]
    assert len(nested) == 48
    assert {r["info"]["run_name"] for r in nested} == {c.info.run_name for c in children}


def _grid_file(tmp_path, body: str) -> Path:
    path = tmp_path / "space.py"
    path.write_text(body)
    return path


SMALL = """
from ray import tune
from sweeper.spaces import Sweep
SWEEP = Sweep(
    name="small",
    space={"model.arch": "vgg11", "model.width": 0.125, "data.name": "digits",
           "data.limit": 512, "model.batch_norm": True,
           "model.init": tune.grid_search(["he", "xavier", "normal"]),
           "optim.lr": tune.grid_search([0.02, 0.05])},
    scheduler="fifo", max_epochs=4, max_failures=2, seed=1,
)
"""


def _flat_metric_steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def _runs(client, experiment: str, role: str) -> list:
    """The experiment's runs of one role: 'sweep' (parent) or 'trial' (child)."""
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("sweeper.role") == role]


def _start_launch(space: Path, storage: Path, tracking_uri: str) -> subprocess.Popen:
    """`sweeper launch` in the background, in its own session so that a test can kill it whole."""
    args = [sys.executable, "-m", "sweeper.cli", "launch", str(space), "--local", "--num-cpus", "2",
            "--storage", str(storage), "--tracking-uri", tracking_uri, "--quiet"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for_session_to_die(sid: int, timeout: float = 60.0) -> None:
    """Ray's workers lead their own process groups: killing the driver's group leaves them running
    for a second or two (until they notice their raylet is gone), long enough to persist one more
    checkpoint. They stay in the driver's session, so wait until nothing live is left in it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited while we looked
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # session id; Z: a zombie, already dead
                alive.append(stat.parent.name)
        if not alive:
            return
        time.sleep(0.2)
    pytest.fail(f"processes of the killed sweep still running after {timeout:.0f} s: {alive}")


@pytest.mark.mlflow
def test_driver_killed_mid_sweep_resumes_where_it_stopped(tmp_path, mlflow_server):
    space = _grid_file(tmp_path, SMALL.replace('name="small"', 'name="killed"'))
    storage = tmp_path / "store"
    driver = _start_launch(space, storage, mlflow_server.url)
    record = SweepRecord(storage / "killed")
    deadline = time.time() + 300
    while time.time() < deadline:
        trials = record.trials() if record.exists() else []
        done = [t for t in trials if t.get("status") == "finished"]
        mid = [t for t in trials if t.get("status") == "running" and t.get("epochs", 0) >= 2]
        # ...and Ray's saved state already names a checkpoint of one of them (it saves the
        # experiment state every few seconds: killed before that, no trial is resumed mid-way and
        # this test would have nothing to check -- seen once in CI).
        named = restorable_checkpoints(str(storage / "killed")) if mid else None
        if len(done) >= 2 and mid and any(t["trial_id"] in (named or {}) for t in mid):
            break
        time.sleep(0.5)
    else:
        driver.kill()
        pytest.fail("sweep did not get going: " + driver.stdout.read().decode()[-2000:])
    finished_before = {t["trial_id"]: t["finished"] for t in record.trials()
                       if t.get("status") == "finished"}
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    _wait_for_session_to_die(driver.pid)  # no worker writes a checkpoint behind the test's back
    # Make Ray's delete-then-save race certain for one running trial (it also happens on its own):
    # the checkpoint the saved state will restore is gone, only its successor exists.
    named = restorable_checkpoints(str(storage / "killed"))
    victim = next(t["trial_id"] for t in mid if t["trial_id"] in named)
    (trial_dir,) = (storage / "killed").glob(f"*-{victim}")
    successor = trial_dir / f"checkpoint_{int(named[victim].rsplit('_', 1)[1]) + 1:06d}"
    if (trial_dir / named[victim]).exists():
        # As if the driver had registered a successor holding the same state. (A successor already
        # on disk may be one the worker wrote but the driver never saw: its epoch is unrecorded, so
        # resuming from it would skip that epoch's metrics. In the real race the driver has seen it.)
        shutil.rmtree(successor, ignore_errors=True)
        (trial_dir / named[victim]).rename(successor)

    # The killed driver ended none of its MLflow runs: status says so, and sync ends them KILLED
    # (the trials labelled stopped, as an interrupted launch labels them) until the resume.
    cut = [t["trial_id"] for t in record.trials() if t.get("status") == "running"]
    status = run_sweeper("status", "killed", "--storage", str(storage))
    assert status.returncode == 0 and "died without finishing" in status.stdout, status.stdout
    assert (f"{len(cut)} trial(s) were running when the driver died (interrupted): shown as stopped, as "
            f"`sweeper sync killed --storage {storage}` labels them; until then their MLflow runs still "
            "say RUNNING") in " ".join(status.stdout.split())
    synced = run_sweeper("sync", "killed", "--storage", str(storage))
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert f"died with {len(cut)} trial(s) running" in synced.stdout, synced.stdout
    client = MlflowClient(mlflow_server.url)
    statuses = {r.data.tags["sweeper.trial_id"]: r.info.status for r in _runs(client, "killed", "trial")}
    assert {statuses[t] for t in cut} == {"KILLED"}, statuses
    assert {s for t, s in statuses.items() if t not in cut} <= {"FINISHED"}, statuses
    assert [r.info.status for r in _runs(client, "killed", "sweep")] == ["KILLED"]
    assert {record.trial(t)["outcome"] for t in cut} == {"stopped"}
    status = run_sweeper("status", "killed", "--storage", str(storage))
    assert f"{len(cut)} stopped" in status.stdout and "still say RUNNING" not in status.stdout

    again = run_sweeper("launch", str(space), "--local", "--num-cpus", "2", "--storage",
                        str(storage), "--tracking-uri", mlflow_server.url, "--quiet")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"{trial_dir.name}: {named[victim]} was pruned" in again.stdout, again.stdout[-3000:]
    trials = record.trials()
    assert len(trials) == 6 and all(t["outcome"] == "completed" for t in trials)
    for trial_id, finished in finished_before.items():  # completed trials were not re-run
        assert record.trial(trial_id)["finished"] == finished
    for t in trials:
        lines = [json.loads(l)["epoch"] for l in
                 (record.trials_dir / f"{t['trial_id']}.jsonl").read_text().splitlines()]
        if t["trial_id"] in named:
            # Resumed from the checkpoint Ray's state names: never back below that epoch. (A trial
            # whose checkpoint the last saved state did not know yet starts again; the record keeps
            # the last line per epoch and MLflow skips steps it has, so nothing is counted twice.)
            resumed_at = int(named[t["trial_id"]].rsplit("_", 1)[1]) + 1  # checkpoint_N = epoch N+1
            assert all(lines.count(e) == 1 for e in range(1, resumed_at + 1)), (lines, resumed_at)
        assert [row["epoch"] for row in record.epochs(t["trial_id"])] == [1, 2, 3, 4]
        assert lines[-1] == 4
        # Ray pruned superseded checkpoints (keep_checkpoints=2, the default), repaired ones included.
        ckpts = list((storage / "killed").glob(f"*-{t['trial_id']}/checkpoint_*"))
        assert 1 <= len(ckpts) <= 2, ckpts
    children = _runs(client, "killed", "trial")
    assert len(children) == 6 and len(_runs(client, "killed", "sweep")) == 1
    # the resume ran the KILLED ones again and ended every run
    assert {r.info.status for r in children} == {"FINISHED"}
    assert _runs(client, "killed", "sweep")[0].info.status == "FINISHED"
    for run in children:
        steps = _flat_metric_steps(client, run.info.run_id, "train_loss")
        assert steps == [1, 2, 3, 4], steps  # no (key, step) logged twice


@pytest.mark.mlflow
def test_a_trial_that_raises_is_retried_from_its_checkpoint(tmp_path, mlflow_server):
    space = _grid_file(tmp_path, SMALL.replace('name="small"', 'name="retry"').replace(
        'tune.grid_search(["he", "xavier", "normal"])', '"he"'))
    marker = tmp_path / "failed-once"
    out = run_sweeper("launch", str(space), "--local", "--num-cpus", "2", "--storage",
                      str(tmp_path / "store"), "--tracking-uri", mlflow_server.url, "--quiet",
                      env={"SWEEPER_TEST_FAIL_ONCE": f"{marker}:2"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert marker.exists()
    record = SweepRecord(tmp_path / "store" / "retry")
    trials = record.trials()
    assert len(trials) == 2 and all(t["outcome"] == "completed" for t in trials)
    retried = [t for t in trials if t["num_failures"] == 1]
    assert len(retried) == 1
    # said in one line, even with --quiet: which trial, where it stopped, what happens next
    said = [line.strip() for line in out.stderr.splitlines() if "from its last checkpoint" in line]
    assert said == [f"{retried[0]['name']}: failed after epoch 2 (RuntimeError: injected failure "
                    f"(SWEEPER_TEST_FAIL_ONCE); the retry must resume from a checkpoint); retry 1 of 2, "
                    "from its last checkpoint"], said
    epochs = [json.loads(l)["epoch"] for l in
              (record.trials_dir / f"{retried[0]['trial_id']}.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4], epochs  # resumed at epoch 3, not from scratch
    client = MlflowClient(mlflow_server.url)
    children = _runs(client, "retry", "trial")
    assert len(children) == 2
    for run in children:
        assert _flat_metric_steps(client, run.info.run_id, "val_accuracy") == [1, 2, 3, 4]


OPTUNA = """
from ray import tune
from sweeper.spaces import Sweep
SWEEP = Sweep(
    name="optuna_small",
    space={"model.arch": "smallcnn", "model.width": 0.125, "model.batch_norm": True,
           "data.name": "digits", "data.limit": 256, "diagnostics.enabled": False,
           "optim.lr": tune.loguniform(1e-5, 3e-1)},
    search="optuna", num_samples=10, max_concurrent=2, max_epochs=4, grace_period=1,
    reduction_factor=2, seed=3,
)
"""


def test_trials_stopped_by_asha_reach_optuna_as_pruned(tmp_path):
    from sweeper.schedulers import PrunedAwareOptunaSearch

    space = _grid_file(tmp_path, OPTUNA)
    storage = tmp_path / "store"
    out = run_sweeper("launch", str(space), "--local", "--num-cpus", "2", "--storage", str(storage),
                      "--quiet", "--tracking-uri", f"sqlite:///{tmp_path / 'ml.db'}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = SweepRecord(storage / "optuna_small")
    trials = record.trials()
    assert len(trials) == 10
    stopped = {t["trial_id"] for t in trials if t.get("prune")}
    assert stopped, "ASHA should stop some of 10 trials with lr spanning 4 decades"
    searcher = PrunedAwareOptunaSearch()
    searcher.restore_from_dir(str(storage / "optuna_small"))
    import optuna

    states = [t.state for t in searcher._ot_study.trials]
    pruned = states.count(optuna.trial.TrialState.PRUNED)
    complete = states.count(optuna.trial.TrialState.COMPLETE)
    assert pruned == len(stopped) and complete == 10 - len(stopped), (states, len(stopped))
    for t in searcher._ot_study.trials:
        if t.state == optuna.trial.TrialState.PRUNED:
            assert t.intermediate_values  # the value it was stopped with stays in the study


@pytest.mark.mlflow
def test_tracking_server_outage_mid_sweep_loses_nothing(tmp_path):
    server = MlflowServer(tmp_path / "server").start()
    space = _grid_file(tmp_path, SMALL.replace('name="small"', 'name="outage"').replace(
        '"data.limit": 512', '"data.limit": 1024'))
    storage = tmp_path / "store"
    driver = _start_launch(space, storage, server.url)
    record = SweepRecord(storage / "outage")
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if record.exists() and any(t.get("epochs", 0) >= 1 for t in record.trials()):
                break
            time.sleep(0.5)
        server.stop()  # down while trials keep reporting
        time.sleep(8)
        server.start()
        out, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, out.decode()[-3000:]
    client = MlflowClient(server.url)
    children = _runs(client, "outage", "trial")
    assert len(children) == 6
    for run in children:
        trial_id = run.data.tags["sweeper.trial_id"]
        epochs = [row["epoch"] for row in record.epochs(trial_id)]
        assert _flat_metric_steps(client, run.info.run_id, "train_loss") == epochs == [1, 2, 3, 4]
        assert run.data.tags["sweeper.outcome"] == "completed"
    server.stop()


@pytest.mark.mlflow
def test_mlflow_ui_shows_the_trials_nested_under_the_sweep(quick_study, mlflow_server, tmp_path):
    """Headless Chromium renders the experiment's runs page: one top-level row (the sweep's parent
    run, collapsed) stands for 49 matching runs; no trial is listed beside it."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (the REST check above covers the nesting)")
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("vgg_depth")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("sweeper.role") == "sweep")
    url = f"{mlflow_server.url}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1600,1000", "--virtual-time-budget=30000"]
    dom = subprocess.run([chromium, *flags, f"--user-data-dir={tmp_path / 'a'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180).stdout
    subprocess.run([chromium, *flags, f"--user-data-dir={tmp_path / 'b'}",
                    f"--screenshot={tmp_path / 'runs.png'}", url], capture_output=True, timeout=180)
    text = re.sub(r"<[^>]+>", "", dom)  # the count and its label sit in separate elements
    assert parent.info.run_name in text
    assert re.search(r"\b49\s*matching runs", text), text[-2000:]
    children = [r.info.run_name for r in runs if r.data.tags.get("sweeper.role") == "trial"]
    assert not any(name in dom for name in children)  # folded under the parent until expanded
    assert (tmp_path / "runs.png").stat().st_size > 10_000


CAPPED = """
from ray import tune
from sweeper.spaces import Sweep
SWEEP = Sweep(
    name="capped",
    space={"model.arch": "smallcnn", "data.name": "digits", "data.limit": 256,
           "diagnostics.enabled": False, "optim.lr": tune.grid_search([0.05, 0.02, 0.01])},
    scheduler="fifo", max_epochs=1, seed=0, max_concurrent=1,
)
"""


def test_max_concurrent_caps_a_random_grid_sweep(tmp_path):
    """Tune ignores TuneConfig.max_concurrent_trials (it only warns) when the search algorithm is a
    BasicVariantGenerator: the cap must reach the generator, or a user's GPU-memory cap is void."""
    space = tmp_path / "capped.py"
    space.write_text(CAPPED)
    out = run_sweeper("launch", str(space), "--local", "--num-cpus", "2", "--storage",
                      str(tmp_path / "store"), "--tracking-uri", f"sqlite:///{tmp_path / 'ml.db'}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "will be ignored" not in out.stdout + out.stderr
    lives = sorted((t["created"], t["finished"]) for t in SweepRecord(tmp_path / "store" / "capped").trials())
    assert len(lives) == 3
    assert all(end <= start for (_, end), (start, _) in zip(lives, lives[1:])), lives  # one at a time
