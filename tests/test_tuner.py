"""The Ray-side pieces without a cluster: explainable ASHA decisions, ASHA state that survives a
restore, trial names, storage checks."""

import pickle
from types import SimpleNamespace

import pytest
from ray import tune
from ray.tune.schedulers import TrialScheduler

from sweeper.records import SweepRecord
from sweeper.spaces import Sweep
from sweeper.tracking import Tracker
from sweeper.tuner import ExplainedASHA, SweepCallback, _check_storage, trial_label


def _asha(tmp_path):
    return ExplainedASHA(record_dir=str(tmp_path), time_attr="training_iteration",
                         metric="val_accuracy", mode="max", max_t=9, grace_period=1,
                         reduction_factor=3)


def _feed(sched, trial_id, epoch, value):
    trial = SimpleNamespace(trial_id=trial_id)
    return sched.on_trial_result(None, trial, {"training_iteration": epoch, "val_accuracy": value})


def test_asha_stops_are_recorded_with_rung_cutoff_peers_and_value(tmp_path):
    sched = _asha(tmp_path)
    for i in range(4):
        sched.on_trial_add(None, SimpleNamespace(trial_id=f"t{i}"))
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


def test_asha_rungs_survive_a_restore_through_the_callback_state(tmp_path):
    sweep = Sweep(name="s", space={"model.arch": "vgg11"})
    sched = _asha(tmp_path)
    tracker = Tracker(tmp_path, "sqlite:///unused.db", "s", "uid")
    cb = SweepCallback(sweep, str(tmp_path), tracker, quiet=True, planned=3, scheduler=sched)
    for i in range(3):
        sched.on_trial_add(None, SimpleNamespace(trial_id=f"t{i}"))
        _feed(sched, f"t{i}", 1, 0.5 + i / 10)
    saved = pickle.dumps(cb.get_state())  # what Tune writes into the experiment checkpoint

    fresh_sched = _asha(tmp_path)  # as unpickled from tuner.pkl: empty rungs
    fresh = SweepCallback(sweep, str(tmp_path), tracker, quiet=True, planned=3,
                          scheduler=fresh_sched)
    fresh.set_state(pickle.loads(saved))
    rung1 = [r for m, r in fresh_sched._brackets[0]._rungs if m == 1][0]
    assert rung1 == {"t0": 0.5, "t1": 0.6, "t2": 0.7}
    assert fresh_sched._trial_info["t1"] is fresh_sched._brackets[0]  # shared references kept
    sched_trial = SimpleNamespace(trial_id="t0")
    assert fresh_sched.on_trial_result(None, sched_trial, {"training_iteration": 3,
                                                           "val_accuracy": 0.55}) in (
        TrialScheduler.CONTINUE, TrialScheduler.STOP)


@pytest.mark.parametrize("config,label", [
    ({"model.arch": "vgg16", "model.init": "normal", "model.batch_norm": False, "optim.lr": 0.0123},
     "vgg16-normal-plain-lr0.012"),
    ({"model.arch": "vgg", "model.depth": 30, "model.init": "he", "model.batch_norm": True,
      "optim.lr": 0.1}, "vgg30p-he-bn-lr0.1"),
])
def test_trial_labels_are_readable(config, label):
    assert trial_label(config) == label


def test_storage_check_accepts_a_writable_dir_and_names_an_unwritable_one(tmp_path):
    assert _check_storage(str(tmp_path / "new"), multi_node=False) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    problems = _check_storage(str(blocker / "sub"), multi_node=False)
    assert len(problems) == 1 and "is not writable" in problems[0]
