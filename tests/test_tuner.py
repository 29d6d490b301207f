"""The Ray-side pieces without a cluster: ASHA per grid cell with recorded reasons, rungs that survive
a restore, the Optuna internals we lean on, trial names, storage checks."""

import json
import os
import pickle
import re
import time
from types import SimpleNamespace

import optuna
import pytest
from ray import tune
from ray.tune.schedulers import TrialScheduler

from sweeper.callback import trial_label
from sweeper.records import SweepRecord
from sweeper.schedulers import (CellASHA, FinishingFIFO, PrunedAwareOptunaSearch, launch_order,
                                make_scheduler, make_searcher, milestones)
from sweeper.spaces import Sweep, trial_count
from sweeper.preflight import _check_storage
from sweeper.tuner import _cell_keys


def _asha(tmp_path, cell_keys=(), max_t=9, mode="max", metric="val_accuracy"):
    return CellASHA(record_dir=str(tmp_path), metric=metric, mode=mode, max_t=max_t,
                    grace_period=1, reduction_factor=3, cell_keys=cell_keys)


def _feed(sched, trial_id, epoch, value, config=None, metric="val_accuracy"):
    trial = SimpleNamespace(trial_id=trial_id, config=config or {})
    return sched.on_trial_result(None, trial, {"epoch": epoch, metric: value})


def test_rungs_sit_at_grace_times_powers_of_the_reduction_factor_below_max_t():
    assert milestones(3, 30, 3) == [3, 9, 27]
    assert milestones(1, 9, 3) == [1, 3]  # reaching 9 is finishing
    assert milestones(3, 6, 3) == [3]
    assert milestones(2, 2, 2) == []


def test_asha_stops_are_recorded_with_rung_cutoff_peers_and_value(tmp_path):
    sched = _asha(tmp_path)
    assert _feed(sched, "t0", 1, 0.5) == TrialScheduler.CONTINUE  # first at the rung: no peers
    assert _feed(sched, "t1", 1, 0.9) == TrialScheduler.CONTINUE  # above the cutoff of [0.5]
    assert SweepRecord(tmp_path).decisions() == {}
    assert _feed(sched, "t2", 1, 0.1) == TrialScheduler.STOP
    d = SweepRecord(tmp_path).decisions()["t2"]
    # The cutoff is the (1 - 1/3) quantile of the peers already at the rung: 0.5 + 2/3 * 0.4.
    assert d["rung"] == 1 and d["epoch"] == 1 and d["peers"] == 2 and d["value"] == 0.1
    assert d["cutoff"] == pytest.approx(0.5 + 2 / 3 * 0.4) and d["metric"] == "val_accuracy"
    assert _feed(sched, "t3", 9, 0.0) == TrialScheduler.STOP  # reaching max_t is finishing
    assert "t3" not in SweepRecord(tmp_path).decisions()
    assert _feed(sched, "t0", 1, 0.5) == TrialScheduler.CONTINUE  # a replay is not judged twice


def test_asha_for_a_loss_stops_the_higher_values(tmp_path):
    sched = _asha(tmp_path, mode="min", metric="val_loss")
    assert _feed(sched, "a", 1, 1.0, metric="val_loss") == TrialScheduler.CONTINUE
    assert _feed(sched, "b", 1, 0.5, metric="val_loss") == TrialScheduler.CONTINUE
    assert _feed(sched, "c", 1, 2.0, metric="val_loss") == TrialScheduler.STOP
    assert SweepRecord(tmp_path).decisions()["c"]["cutoff"] == pytest.approx(1.0 - 2 / 3 * 0.5)
    # A diverged trial's worst value (+inf for a loss) is stopped, and breaks no quantile.
    assert _feed(sched, "d", 1, float("inf"), metric="val_loss") == TrialScheduler.STOP
    assert _feed(sched, "e", 1, 0.1, metric="val_loss") == TrialScheduler.CONTINUE


def test_each_grid_cell_is_judged_only_against_its_own_trials(tmp_path):
    """A small factorial (2 cells x 3 lrs): one cell trains far better than the other, yet the weak
    cell still keeps its best trial to max_t -- across-cell ASHA would cut it at the first rung."""
    sched = _asha(tmp_path, cell_keys=["model.init"], max_t=9)
    strong = {"model.init": "he"}
    weak = {"model.init": "normal"}
    reached_max = {}
    values = {"he": [0.9, 0.8, 0.95], "normal": [0.15, 0.11, 0.12]}
    for i in range(3):
        for cell, cfg in (("he", strong), ("normal", weak)):
            trial_id = f"{cell}{i}"
            for epoch in range(1, 10):
                action = _feed(sched, trial_id, epoch, values[cell][i], cfg)
                if action == TrialScheduler.STOP:
                    break
            reached_max[trial_id] = epoch == 9
    assert any(reached_max[f"normal{i}"] for i in range(3))
    assert any(reached_max[f"he{i}"] for i in range(3))
    decisions = SweepRecord(tmp_path).decisions()
    assert decisions and all(d["cell"] in ([["model.init", "he"]], [["model.init", "normal"]])
                             for d in decisions.values())
    across = _asha(tmp_path / "across", max_t=9)
    for i in range(3):
        _feed(across, f"he{i}", 1, values["he"][i], strong)
    assert all(_feed(across, f"normal{i}", 1, values["normal"][i], weak) == TrialScheduler.STOP
               for i in range(3))


def test_a_tie_at_the_cutoff_is_broken_by_the_splits_loss(tmp_path):
    """Stalled trials share one chance accuracy: without a tie-break nobody at the cutoff is ever
    stopped and ASHA runs a rung full of stalls to max_t."""
    sched = _asha(tmp_path)

    def feed(trial_id, acc, loss):
        trial = SimpleNamespace(trial_id=trial_id, config={})
        return sched.on_trial_result(None, trial, {"epoch": 1, "val_accuracy": acc, "val_loss": loss})

    assert feed("a", 0.1, 2.30) == TrialScheduler.CONTINUE  # first at the rung
    assert feed("b", 0.1, 2.29) == TrialScheduler.CONTINUE  # tied, lower loss than a
    assert feed("c", 0.1, 2.31) == TrialScheduler.STOP  # tied, worse loss than the tied peers
    decision = SweepRecord(tmp_path).decisions()["c"]
    assert decision["value"] == decision["cutoff"] == 0.1
    assert decision["tie_break"]["metric"] == "val_loss" and decision["tie_break"]["value"] == 2.31
    assert feed("d", 0.5, 9.9) == TrialScheduler.CONTINUE  # above the cutoff: the loss is not asked
    # A rung table written before tie-breaks (plain floats) still judges: no tie-break, as before.
    old = _asha(tmp_path / "old")
    (tmp_path / "old" / "sweeper").mkdir(parents=True)
    (tmp_path / "old" / "sweeper" / "rungs.json").write_text(json.dumps({"[]": {"1": {"x": 0.1}}}))
    assert old.on_trial_result(None, SimpleNamespace(trial_id="y", config={}),
                               {"epoch": 1, "val_accuracy": 0.1, "val_loss": 5.0}) == TrialScheduler.CONTINUE
    from sweeper.outcomes import classify
    reason = classify([{"epoch": 1, "val_accuracy": 0.1, "val_loss": 2.31, "train_loss": 2.3,
                        "chance_loss": 2.302}], decision=decision, error=None, metric="val_accuracy",
                      finished=True, stall_epochs=3, stall_tolerance=0.05).reason
    assert "tied with the cutoff" in reason and "val_loss=2.31" in reason


def test_cell_keys_are_the_grid_axes_unless_pruning_across_the_sweep():
    space = {"model.init": tune.grid_search(["he", "normal"]), "model.batch_norm":
             tune.grid_search([False, True]), "optim.lr": tune.loguniform(1e-3, 1e-1)}
    assert _cell_keys(Sweep(name="s", space=space)) == ["model.init", "model.batch_norm"]
    assert _cell_keys(Sweep(name="s", space=space, prune_within="sweep")) == []


def test_asha_rungs_survive_a_restore_through_the_sweep_record(tmp_path):
    sched = _asha(tmp_path)
    for i in range(3):
        _feed(sched, f"t{i}", 1, 0.5 + i / 10)
    fresh = pickle.loads(pickle.dumps(sched))  # as Tune unpickles it from tuner.pkl
    # [metric, tie-break]: no val_loss was reported, so no tie-break value
    assert {t: v[0] for t, v in fresh.table()["[]"]["1"].items()} == {"t0": 0.5, "t1": 0.6, "t2": 0.7}
    assert json.loads((tmp_path / "sweeper" / "rungs.json").read_text()) == fresh.table()
    assert _feed(fresh, "t3", 1, 0.55) == TrialScheduler.STOP  # judged against the saved peers


def test_optuna_internals_the_pruned_handoff_relies_on_still_exist():
    """PrunedAwareOptunaSearch reads OptunaSearch's trial map and study (no public accessor in Ray
    2.60). If a Ray upgrade renames them this fails here, not silently in a sweep."""
    searcher = PrunedAwareOptunaSearch(space={"x": tune.uniform(0, 1)}, metric="m", mode="max",
                                       sampler=optuna.samplers.RandomSampler(seed=0))
    assert searcher.suggest("t1") is not None
    assert "t1" in searcher._ot_trials and isinstance(searcher._ot_study, optuna.Study)
    assert isinstance(searcher._completed_trials, set)
    searcher.on_trial_complete("t1", result={"m": 0.3, "epoch": 2, "outcome": "running"})
    (trial,) = searcher._ot_study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values == {2: 0.3}


@pytest.mark.parametrize("config,label", [
    ({"model.arch": "vgg16", "model.init": "normal", "model.batch_norm": False, "optim.lr": 0.0123},
     "vgg16-normal-plain-lr0.0123"),
    ({"model.arch": "vgg", "model.depth": 30, "model.init": "he", "model.batch_norm": True,
      "optim.lr": 0.1}, "vgg30p-he-bn-lr0.1"),
    ({"model.arch": "resnet18", "model.batch_norm": True, "model.pretrained": "/w.pt",
      "model.freeze": "all_but_last:2", "optim.lr": 0.03}, "resnet18-he-bn-pt-frz-last2-lr0.03"),
    ({"model.arch": "resnet18", "model.batch_norm": True, "model.pretrained": "/w.pt",
      "model.init_layers": "none", "model.freeze": "none", "optim.lr": 0.03},
     "resnet18-he-bn-scratch-lr0.03"),
    ({"model.arch": "vgg16", "model.init_from": "s3://b/src/t/checkpoint_000002",
      "model.init_layers": "vgg_paper", "optim.lr": 0.01}, "vgg16-he-plain-from-vggpaper-lr0.01"),
])
def test_trial_labels_are_readable(config, label):
    assert trial_label(config) == label


def test_close_learning_rates_of_one_cell_get_different_labels():
    base = {"model.arch": "vgg16", "model.init": "he"}
    assert trial_label({**base, "optim.lr": 0.1538}) == "vgg16-he-plain-lr0.154"
    assert trial_label({**base, "optim.lr": 0.1524}) == "vgg16-he-plain-lr0.152"


def test_storage_check_accepts_a_writable_dir_and_names_an_unwritable_one(tmp_path):
    assert _check_storage(str(tmp_path / "new"), multi_node=False) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    problems = _check_storage(str(blocker / "sub"), multi_node=False)
    assert len(problems) == 1 and "is not writable" in problems[0]


def test_grid_trials_start_in_seeded_rounds_not_in_grid_order():
    """Asynchronous ASHA judges a trial against the peers that reached its rung before it, so the
    start order must not be one corner of the factorial first (Ray's grid order puts every BN-free
    vgg_depth cell before any BN cell). Every cell once per round, each round shuffled by the seed."""
    space = {"model.arch": tune.grid_search(["vgg11", "vgg13", "vgg16", "vgg19"]),
             "model.init": tune.grid_search(["normal", "xavier", "he"]),
             "model.batch_norm": tune.grid_search([False, True]),
             "optim.lr": tune.loguniform(1e-3, 1e-1)}
    sweep = Sweep(name="order", space=space, num_samples=3, seed=0)
    order = launch_order(sweep)
    cells = [tuple(c[k] for k in ("model.arch", "model.init", "model.batch_norm")) for c in order]
    assert len(cells) == 72 == trial_count(sweep)  # the launch's TuneConfig.num_samples
    rounds = [cells[i:i + 24] for i in range(0, 72, 24)]
    assert all(len(set(r)) == 24 for r in rounds) and len({frozenset(r) for r in rounds}) == 1
    assert len({tuple(r) for r in rounds}) == 3  # each round its own order
    # the first half of the first round is not all BN-free, as Ray's grid order would have it
    assert {c[2] for c in rounds[0][:12]} == {False, True}
    assert launch_order(sweep) == order  # the seed fixes it
    assert launch_order(sweep.replace(seed=1)) != order
    assert all(set(c) == {"model.arch", "model.init", "model.batch_norm"} for c in order)
    assert make_searcher(sweep)._points_to_evaluate == order
    # no grid axes: Ray samples every trial; num_samples is the trial count
    plain = Sweep(name="plain", space={"optim.lr": tune.loguniform(1e-3, 1e-1)}, num_samples=5)
    assert launch_order(plain) == [] and trial_count(plain) == 5
    # seeds are a grid axis too: replicates are spread like any cell
    seeded = Sweep(name="seeded", space={"model.arch": tune.grid_search(["vgg11", "vgg13"])},
                   seeds=3, seed=7)
    assert sorted((c["model.arch"], c["seed"]) for c in launch_order(seeded)) == sorted(
        (a, s) for a in ("vgg11", "vgg13") for s in (7, 8, 9))


def test_a_trial_ends_on_the_report_that_says_it_finished(tmp_path):
    """Both schedulers answer STOP to a report whose outcome is not ``running`` (Tune would
    otherwise wait one more round trip for the function to return), after judging it as any other:
    a finished trial that ASHA would prune at its rung is still recorded as pruned."""
    def feed(sched, trial_id, epoch, value, outcome):
        trial = SimpleNamespace(trial_id=trial_id, config={})
        return sched.on_trial_result(None, trial, {"epoch": epoch, "val_accuracy": value,
                                                   "outcome": outcome})

    fifo = pickle.loads(pickle.dumps(FinishingFIFO()))
    assert feed(fifo, "a", 1, 0.5, "running") == TrialScheduler.CONTINUE
    for outcome in ("completed", "stalled", "diverged"):
        assert feed(fifo, "a", 3, 0.5, outcome) == TrialScheduler.STOP
    assert fifo.on_trial_result(None, SimpleNamespace(trial_id="x", config={}), {"epoch": 1}) \
        == TrialScheduler.CONTINUE  # no outcome (not a sweeper report): as Ray's FIFO

    asha = _asha(tmp_path)
    assert feed(asha, "t0", 1, 0.9, "running") == TrialScheduler.CONTINUE
    assert feed(asha, "t1", 1, 0.95, "running") == TrialScheduler.CONTINUE
    assert feed(asha, "t2", 2, 0.99, "diverged") == TrialScheduler.STOP  # above the cut: no decision
    assert "t2" not in SweepRecord(tmp_path).decisions()
    assert feed(asha, "t3", 1, 0.1, "stalled") == TrialScheduler.STOP  # at a rung, below the cut
    assert SweepRecord(tmp_path).decisions()["t3"]["rung"] == 1
    assert make_scheduler(SimpleNamespace(scheduler="fifo"), str(tmp_path), ()).__class__ \
        is FinishingFIFO


def test_decisions_are_read_from_where_the_last_read_stopped(tmp_path):
    record = SweepRecord(tmp_path)
    record.append_decision({"trial_id": "t1", "rung": 1})
    first, offset = record.decisions_from(0)
    assert list(first) == ["t1"] and offset == (record.dir / "decisions.jsonl").stat().st_size
    record.append_decision({"trial_id": "t2", "rung": 1})
    with open(record.dir / "decisions.jsonl", "a") as f:
        f.write('{"trial_id": "t3", "ru')  # still being written: waits for its end
    new, offset2 = record.decisions_from(offset)
    assert list(new) == ["t2"]
    with open(record.dir / "decisions.jsonl", "a") as f:
        f.write('ng": 2}\n')
    assert list(record.decisions_from(offset2)[0]) == ["t3"]
    assert list(record.decisions()) == ["t1", "t2", "t3"]


def test_a_cluster_address_is_checked_by_a_tcp_connection_before_ray(monkeypatch):
    import socket

    from sweeper.config import ConfigError
    from sweeper.preflight import _check_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        _check_reachable(f"127.0.0.1:{port}")  # answers: no error
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        _check_reachable(None)
    for left_to_ray in ("auto", "ray://head:10001"):
        _check_reachable(left_to_ray)
    with pytest.raises(ConfigError, match=r"could not reach the Ray cluster at '127.0.0.1:\d+' \(--address\)"):
        _check_reachable(f"127.0.0.1:{port}")  # closed now
    for malformed in ("127.0.0.1:99999", "::1", "head", ":6379", "head:", "[::1]:x"):
        with pytest.raises(ConfigError, match=rf"--address '{re.escape(malformed)}' is not a cluster address"):
            _check_reachable(malformed)
    with pytest.raises(ConfigError, match=r"an http:// address is the dashboard's"):
        _check_reachable("http://head:8265")
    with pytest.raises(ConfigError, match=r"--address local would start a fresh Ray on this machine"):
        _check_reachable("local")


@pytest.mark.ray
@pytest.mark.slow
def test_a_launch_refused_after_ray_started_leaves_no_directory_behind(tmp_path):
    """The cluster's own check (preflight) runs after Ray starts; a refusal there exits 2 and takes
    back what the launch made -- ./sweeps included, which the storage probe before Ray had made."""
    import subprocess
    import sys

    space = tmp_path / "space.py"
    space.write_text('"""q"""\nfrom sweeper.spaces import Sweep\n'
                     'SWEEP = Sweep(name="late", space={"model.arch": "smallcnn", "data.name": "digits"})\n')
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\nimport sweeper.tuner as tuner\n"
        "tuner.preflight = lambda *a, **k: ['refused by the cluster check']\n"
        "from sweeper.cli import main\n"
        f"sys.argv = ['sweeper', 'launch', {str(space)!r}, '--local', '--num-cpus', '1']\n"
        "main()\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, timeout=300,
                         cwd=cwd, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert out.returncode == 2, out.stderr
    assert "error: refused by the cluster check" in out.stderr
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("reply,refused", [
    (b"\x00\x00\x18\x04\x00\x00\x00\x00\x00", False),  # an HTTP/2 SETTINGS frame, as Ray's GCS sends
    (b"", False),  # says nothing (a TLS endpoint, say): Ray decides
    (b"HTTP/1.0 400 Bad request\r\n", True),
    (b"<!DOCTYPE HTML>\n<html>", True),  # python -m http.server's answer to the preface
])
def test_a_port_that_answers_but_not_as_a_gcs_is_refused(reply, refused):
    """Ray's retries took over 150 s to give up on a web server's port (e.g. the dashboard's 8265)."""
    import socket
    import threading

    from sweeper.config import ConfigError
    from sweeper.preflight import _check_reachable

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def answer():
        conn, _ = server.accept()
        with conn:
            conn.recv(64)  # the client's preface
            if reply:
                conn.sendall(reply)
            else:
                time.sleep(1.5)  # silent past the check's 1 s

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    try:
        if refused:
            with pytest.raises(ConfigError, match=rf"--address '{address}' answers, but not as Ray's GCS"):
                _check_reachable(address)
        else:
            _check_reachable(address)
    finally:
        thread.join(5)
        server.close()


def test_progress_lines_as_trials_end_come_at_most_once_a_second_and_always_for_the_last(
        tmp_path, monkeypatch):
    """A sweep of many short trials printed one progress line per trial that ended."""
    import sweeper.callback as callback_module
    from sweeper.callback import SweepCallback
    from sweeper.tracking import Tracker

    record = SweepRecord(tmp_path / "many")
    record.create({"name": "many", "metric": "val_accuracy", "mode": "max"}, "SWEEP = None\n")
    sweep = Sweep(name="many", space={"model.arch": "smallcnn"}, max_epochs=1, num_samples=50)
    tracker = Tracker(record.dir, f"sqlite:///{tmp_path / 'ml.db'}", "many", "uid")
    cb = SweepCallback(sweep, str(record.experiment_dir), tracker, quiet=False, planned=50)
    lines, clock = [], [time.time()]
    monkeypatch.setattr(callback_module.console, "print", lambda text, **kw: lines.append(text))
    monkeypatch.setattr(callback_module.time, "time", lambda: clock[0])
    trials = [SimpleNamespace(trial_id=f"t{i}", status="RUNNING") for i in range(50)]
    for i, trial in enumerate(trials):  # 50 trials end within 5 s
        clock[0] += 0.1
        cb.states[trial.trial_id] = "completed"
        cb._progress(trials[i:], ended=True)
    assert 4 <= len(lines) <= 6, lines
    assert "trials: 50/50 done" in lines[-1]
    printed = len(lines)
    clock[0] += 0.1
    cb._progress(trials, ended=False)  # a periodic line waits its 10 s
    assert len(lines) == printed
    clock[0] += 10.0
    cb._progress(trials, ended=False)
    assert len(lines) == printed + 1
    tracker.close()


def test_the_undelivered_tracking_hint_at_the_end_of_a_launch_names_the_sweeps_storage(tmp_path,
                                                                                        capsys):
    """A sweep on another storage told the user `sweeper sync NAME`, which looks in ./sweeps."""
    from sweeper.tuner import LaunchResult, _finish_tracking

    class Down:  # a tracker whose server is unreachable: everything stays in the spool
        def __getattr__(self, name):
            return lambda *a, **k: None

        def flush_until(self, wait_s):
            return False

        def pending(self):
            return 7

        def last_error(self):
            return "connection refused"

    storage = tmp_path / "elsewhere"
    sweep = Sweep(name="far", space={"optim.lr": 0.1}, storage=str(storage))
    record = SweepRecord(storage / "far")
    _finish_tracking(sweep, record, Down(), LaunchResult(name="far", experiment_dir=str(record.dir)),
                     wait_s=0, quiet=False)
    text = " ".join(capsys.readouterr().err.split())
    assert "7 tracking operation(s) not delivered (connection refused)" in text, text
    assert f"run `sweeper sync far --storage {storage}` when the tracking server is back" in text, text


def test_a_relative_sqlite_store_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    """The record is read from other working directories: a relative sqlite:///ml.db there named
    another file, and a resume from there split the runs between two stores."""
    from sweeper.tuner import _absolute

    monkeypatch.chdir(tmp_path)
    assert _absolute("sqlite:///ml.db") == f"sqlite:///{tmp_path / 'ml.db'}"
    assert _absolute(f"sqlite:///{tmp_path / 'a.db'}") == f"sqlite:///{tmp_path / 'a.db'}"
    assert _absolute("http://mlflow.lab:5000") == "http://mlflow.lab:5000"
