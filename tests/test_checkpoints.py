"""Restore repair: a checkpoint Ray deleted before its state named the successor is put back."""

import json

import pytest

from sweeper.checkpoints import Repair, repair_restorable_checkpoints, restorable_checkpoints


def _state(exp, name, trials):
    """An experiment state in Ray 2.60's layout: trial_data = [[trial json, runtime json], ...]."""
    data = [[json.dumps({"trial_id": tid, "stub": False}),
             json.dumps({"last_result": {"checkpoint_dir_name": ckpt} if ckpt else {}})]
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
    assert repairs == [Repair(trial_dir=gone.name, missing="checkpoint_000001",
                              used="checkpoint_000002")]
    assert (gone / "checkpoint_000001" / "state.pt").read_text() == "epoch 3"
    assert _left(gone) == ["checkpoint_000001", "checkpoint_000002", "checkpoint_000003"]
    assert _left(fine) == ["checkpoint_000004"]
    assert repair_restorable_checkpoints(str(tmp_path)) == []  # nothing left to do


def test_the_newest_state_file_decides(tmp_path):
    d = _trial(tmp_path, "aaaa_00000", [3])
    _state(tmp_path, "experiment_state-2026-11-24_10-00-00.json", {"aaaa_00000": "checkpoint_000003"})
    _state(tmp_path, "experiment_state-2026-11-24_11-00-00.json", {"aaaa_00000": "checkpoint_000002"})
    assert restorable_checkpoints(str(tmp_path)) == {"aaaa_00000": "checkpoint_000002"}
    assert [r.missing for r in repair_restorable_checkpoints(str(tmp_path))] == ["checkpoint_000002"]
    assert _left(d) == ["checkpoint_000002", "checkpoint_000003"]


def test_nothing_newer_means_nothing_is_invented(tmp_path):
    d = _trial(tmp_path, "aaaa_00000", [0])
    _state(tmp_path, "experiment_state-2026-11-24_10-00-00.json", {"aaaa_00000": "checkpoint_000002"})
    assert repair_restorable_checkpoints(str(tmp_path)) == []
    assert _left(d) == ["checkpoint_000000"]


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
