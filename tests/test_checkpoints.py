"""Restore repair: a checkpoint Ray deleted before its state named the successor is put back."""

import json

import pytest

from sweeper.checkpoints import Repair, repair_restorable_checkpoints, restorable_checkpoints


def _runtime(exp, trial_id, latest, last_result):
    """A trial's runtime state as Ray 2.60 writes it: its checkpoint manager pickled inside."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    meta = _TrainingRunMetadata()
    meta.checkpoint_manager = _CheckpointManager(CheckpointConfig(num_to_keep=1))
    if latest is not None:
        path = exp / f"vgg11-he-lr0.01-{trial_id}" / latest
        meta.checkpoint_manager.register_checkpoint(
            _TrainingResult(checkpoint=Checkpoint(str(path)), metrics={"epoch": 1}))
    meta.last_result = {"checkpoint_dir_name": last_result} if last_result else {}
    return meta.get_json_state()


def _state(exp, name, trials, last_results=None):
    """An experiment state in Ray 2.60's layout: trial_data = [[trial json, runtime json], ...].

    ``trials`` maps trial id -> the checkpoint its manager holds; ``last_results`` optionally
    gives a different (newer) checkpoint name for the last result, as a kill can leave it.
    """
    last_results = last_results or {}
    data = [[json.dumps({"trial_id": tid, "stub": False}),
             _runtime(exp, tid, ckpt, last_results.get(tid, ckpt))]
            for tid, ckpt in trials.items()]
    (exp / name).write_text(json.dumps({"trial_data": data, "runner_data": {}}))


def _trial(exp, trial_id, indices):
    d = exp / f"vgg11-he-lr0.01-{trial_id}"
    d.mkdir()
    for i in indices:
        (d / f"checkpoint_{i:06d}").mkdir()
        (d / f"checkpoint_{i:06d}" / "state.pt").write_text(f"epoch {i + 1}")
    return d


def _left(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith("checkpoint_"))


def test_a_missing_named_checkpoint_is_replaced_by_the_next_newer_one(tmp_path):
    # Killed between Ray deleting checkpoint 1 (on registering 2) and saving the state naming 2.
    gone = _trial(tmp_path, "aaaa_00000", [2, 3])
    fine = _trial(tmp_path, "aaaa_00001", [4])
    _state(tmp_path, "experiment_state-2026-11-24_10-00-00.json",
           {"aaaa_00000": "checkpoint_000001", "aaaa_00001": "checkpoint_000004"})
    repairs = repair_restorable_checkpoints(str(tmp_path))
    assert repairs == [Repair(trial_dir=gone.name, restored="checkpoint_000001",
                              moved_from="checkpoint_000002",
                              discarded=("checkpoint_000002", "checkpoint_000003"))]
    assert repairs[0].rerun == ("checkpoint_000003",)
    assert (gone / "checkpoint_000001" / "state.pt").read_text() == "epoch 3"
    # Ray restores checkpoint 1 and never reads 2 or 3 (its numbering would leave them orphaned).
    assert _left(gone) == ["checkpoint_000001"]
    assert _left(fine) == ["checkpoint_000004"]
    assert repair_restorable_checkpoints(str(tmp_path)) == []  # nothing left to do


def test_the_checkpoint_manager_decides_not_the_last_result(tmp_path):
    # Seen in CI: the state was saved after the epoch-2 result but before checkpoint 1 was
    # registered; then checkpoint 1 deleted checkpoint 0. Ray restores checkpoint 0, not 1.
    d = _trial(tmp_path, "aaaa_00000", [1])
    _state(tmp_path, "experiment_state-2026-11-24_10-00-00.json",
           {"aaaa_00000": "checkpoint_000000"}, last_results={"aaaa_00000": "checkpoint_000001"})
    assert restorable_checkpoints(str(tmp_path)) == {"aaaa_00000": "checkpoint_000000"}
    assert repair_restorable_checkpoints(str(tmp_path)) == [
        Repair(trial_dir=d.name, restored="checkpoint_000000", moved_from="checkpoint_000001",
               discarded=("checkpoint_000001",))]
    assert (d / "checkpoint_000000" / "state.pt").read_text() == "epoch 2"
    assert _left(d) == ["checkpoint_000000"]


def test_checkpoints_the_driver_never_registered_are_removed(tmp_path):
    # The worker ran two epochs ahead of a driver that was then killed: Ray's state restores
    # checkpoint 1 (present) and would never read 2 and 3; the record lacks their epochs.
    ahead = _trial(tmp_path, "aaaa_00000", [1, 2, 3])
    done = _trial(tmp_path, "aaaa_00001", [3])
    _state(tmp_path, "experiment_state-2026-11-24_10-00-00.json",
           {"aaaa_00000": "checkpoint_000001", "aaaa_00001": "checkpoint_000003"})
    (fix,) = repair_restorable_checkpoints(str(tmp_path))
    assert fix == Repair(trial_dir=ahead.name, restored="checkpoint_000001",
                         discarded=("checkpoint_000002", "checkpoint_000003"))
    assert fix.rerun == ("checkpoint_000002", "checkpoint_000003")
    assert (ahead / "checkpoint_000001" / "state.pt").read_text() == "epoch 2"
    assert _left(ahead) == ["checkpoint_000001"] and _left(done) == ["checkpoint_000003"]


def test_the_newest_state_file_decides(tmp_path):
    d = _trial(tmp_path, "aaaa_00000", [3])
    _state(tmp_path, "experiment_state-2026-11-24_10-00-00.json", {"aaaa_00000": "checkpoint_000003"})
    _state(tmp_path, "experiment_state-2026-11-24_11-00-00.json", {"aaaa_00000": "checkpoint_000002"})
    assert restorable_checkpoints(str(tmp_path)) == {"aaaa_00000": "checkpoint_000002"}
    assert [r.moved_from for r in repair_restorable_checkpoints(str(tmp_path))] == ["checkpoint_000003"]
    assert _left(d) == ["checkpoint_000002"]


def test_a_lost_checkpoint_with_nothing_newer_restarts_its_trial_from_scratch(tmp_path):
    """No state is invented: the directory Ray will look for holds only a marker, which the trainable
    reads as "start again" (older checkpoints are not what Ray's state resumes, so they stay unused)."""
    from sweeper.trial import MISSING_CHECKPOINT_MARKER
    from sweeper.train import CHECKPOINT_FILE

    d = _trial(tmp_path, "aaaa_00000", [0])
    _state(tmp_path, "experiment_state-2026-11-24_10-00-00.json", {"aaaa_00000": "checkpoint_000002"})
    (repair,) = repair_restorable_checkpoints(str(tmp_path))
    assert repair.restarted and repair.restored == "checkpoint_000002" and repair.moved_from is None
    assert _left(d) == ["checkpoint_000000", "checkpoint_000002"]
    assert sorted(p.name for p in (d / "checkpoint_000002").iterdir()) == [MISSING_CHECKPOINT_MARKER]
    assert not (d / "checkpoint_000002" / CHECKPOINT_FILE).exists()
    assert repair_restorable_checkpoints(str(tmp_path)) == []  # present now: nothing more to do


def test_trials_without_a_checkpoint_or_a_directory_are_skipped(tmp_path):
    d = _trial(tmp_path, "aaaa_00000", [1])
    _state(tmp_path, "experiment_state-2026-11-24_10-00-00.json",
           {"aaaa_00000": None, "aaaa_00009": "checkpoint_000000"})
    assert restorable_checkpoints(str(tmp_path)) == {"aaaa_00009": "checkpoint_000000"}
    assert repair_restorable_checkpoints(str(tmp_path)) == []
    assert _left(d) == ["checkpoint_000001"]


@pytest.mark.parametrize("state", [None, "{\"trial_data\": [[\"{\\\"trial_id\\\"", "[]",
                                   json.dumps({"trial_data": "not a list"})])
def test_an_unreadable_state_changes_nothing(tmp_path, state):
    d = _trial(tmp_path, "aaaa_00000", [2])
    if state is not None:  # missing, torn, or another Ray's layout: leave it to Ray's own errors
        (tmp_path / "experiment_state-2026-11-24_10-00-00.json").write_text(state)
    assert restorable_checkpoints(str(tmp_path)) is None
    assert repair_restorable_checkpoints(str(tmp_path)) == []
    assert _left(d) == ["checkpoint_000002"]


def test_a_runtime_state_without_a_checkpoint_manager_is_left_to_ray(tmp_path):
    # Another Ray's layout (only a last result): no guess is made from the last result.
    d = _trial(tmp_path, "aaaa_00000", [2])
    data = [[json.dumps({"trial_id": "aaaa_00000"}),
             json.dumps({"last_result": {"checkpoint_dir_name": "checkpoint_000001"}})]]
    (tmp_path / "experiment_state-2026-11-24_10-00-00.json").write_text(
        json.dumps({"trial_data": data}))
    assert restorable_checkpoints(str(tmp_path)) == {}
    assert repair_restorable_checkpoints(str(tmp_path)) == []
    assert _left(d) == ["checkpoint_000002"]


def _state_keeping_two(exp, trial_id, names, status="RUNNING"):
    """A state whose checkpoint manager keeps two checkpoints (num_to_keep=2), the last the latest."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    meta = _TrainingRunMetadata()
    meta.checkpoint_manager = _CheckpointManager(CheckpointConfig(num_to_keep=2))
    d = exp / f"vgg11-he-lr0.01-{trial_id}"
    for name in names:
        meta.checkpoint_manager.register_checkpoint(
            _TrainingResult(checkpoint=Checkpoint(str(d / name)), metrics={"epoch": 1}))
    return [json.dumps({"trial_id": trial_id, "stub": False, "status": status}), meta.get_json_state()]


def test_an_older_kept_checkpoint_already_deleted_is_made_again_for_ray_to_delete(tmp_path):
    """Killed after Ray deleted checkpoint 2 (on registering 4) but before its state said so: the
    state keeps [2, 3]. Resumed, the trial registers a new checkpoint and Ray deletes 2 -- which
    raised FileNotFoundError inside Ray's result handling (a traceback on the console)."""
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    from sweeper.trial import MISSING_CHECKPOINT_MARKER

    running = _trial(tmp_path, "aaaa_00000", [3])
    finished = _trial(tmp_path, "aaaa_00001", [3])
    data = [_state_keeping_two(tmp_path, "aaaa_00000", ["checkpoint_000002", "checkpoint_000003"]),
            _state_keeping_two(tmp_path, "aaaa_00001", ["checkpoint_000002", "checkpoint_000003"],
                               status="TERMINATED")]
    (tmp_path / "experiment_state-2026-11-24_10-00-00.json").write_text(
        json.dumps({"trial_data": data, "runner_data": {}}))
    assert restorable_checkpoints(str(tmp_path)) == {"aaaa_00000": "checkpoint_000003",
                                                     "aaaa_00001": "checkpoint_000003"}
    assert repair_restorable_checkpoints(str(tmp_path)) == [
        Repair(trial_dir=running.name, restored="checkpoint_000003",
               placeholders=("checkpoint_000002",))]
    assert _left(running) == ["checkpoint_000002", "checkpoint_000003"]
    assert [p.name for p in (running / "checkpoint_000002").iterdir()] == [MISSING_CHECKPOINT_MARKER]
    assert _left(finished) == ["checkpoint_000003"]  # never runs again: Ray deletes nothing of it
    assert repair_restorable_checkpoints(str(tmp_path)) == []  # once

    # Ray's own manager, restored from that state, now deletes the stand-in without an error.
    from ray.train import Checkpoint
    from ray.train._internal.session import _TrainingResult

    manager = _TrainingRunMetadata.from_json_state(data[0][1]).checkpoint_manager
    (running / "checkpoint_000004").mkdir()
    manager.register_checkpoint(_TrainingResult(checkpoint=Checkpoint(str(running / "checkpoint_000004")),
                                                metrics={"epoch": 5}))
    assert _left(running) == ["checkpoint_000003", "checkpoint_000004"]
