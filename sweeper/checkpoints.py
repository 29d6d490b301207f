"""Making a killed sweep restorable when Ray deleted the checkpoint its saved state names.

Ray's ``CheckpointConfig(num_to_keep=N)`` deletes a superseded checkpoint the moment its successor is
registered, but writes the experiment state that ``Tuner.restore`` reads only later (a forced save
every N checkpoints per trial, after the deletion). A driver killed in that window leaves a state
whose checkpoint manager names a deleted checkpoint, and the resumed trial fails with "Could not
recover from checkpoint as it does not exist on storage anymore" (seen in CI about once in three
runs of the driver-kill test). The state's ``last_result`` is no guide: it is updated before the
checkpoint is registered, so it can name a newer checkpoint than the one Ray restores from.

Deletion only ever follows a newer checkpoint being written, so the fix is on disk, before restore:
where the checkpoint Ray will restore is missing, move its trial's next newer checkpoint to the
missing name. The trial resumes from that newer state (the checkpoint carries its own epoch; ASHA and
the record count the trial's epochs, not Tune's iterations), losing nothing. Keeping every checkpoint
instead would close the race too, but Ray's state stores each checkpoint's full result: with
per-layer diagnostics that is ~14 kB per trial and epoch, read and written on every state save.

Checkpoints newer than the one the state restores are then removed. Ray never reads them: a worker
runs ahead of the driver and persists checkpoints whose results the driver never processed (so no
record or MLflow metric has those epochs, and they are trained again), and Ray's restored numbering
lags, so they would outlive the trial as orphans -- a full model and optimizer state each.

Ray's state also lists the older checkpoints it keeps (``num_to_keep``), and deletes the oldest when
the resumed trial registers its next one. A kill can leave one of those already deleted; Ray's delete
then raises inside its result handling (a traceback and a ~40 kB result dump on the console, and
that checkpoint's bookkeeping skipped). Where a trial will run again, such a checkpoint's directory is
made again as an empty placeholder (the marker below), for Ray to delete in its turn.

A checkpoint that is gone with nothing newer to stand in for it (deleted by hand, a lifecycle rule on
the bucket) would fail the trial on every relaunch. Its directory is made again holding only a marker
file (Ray checks that the path exists), and the trainable, finding no trial state in it, starts the
trial again from scratch; the launch says so in yellow.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from sweeper.store import filesystem

__all__ = ["Repair", "load_trial_state", "trial_checkpoint_location", "repair_restorable_checkpoints",
           "restorable_checkpoints", "tune_state_problems"]

log = logging.getLogger(__name__)

# Ray Tune's names (ray 2.60): TuneController.CKPT_FILE_TMPL and StorageContext's checkpoint dirs,
# and what ``Tuner.restore`` unpickles first (ray/tune/impl/tuner_internal.py, _TUNER_PKL).
_STATE_GLOB = "experiment_state-*.json"
_TUNER_PKL = "tuner.pkl"
_CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{6,})$")


@dataclass(frozen=True)
class Repair:
    """What was done to one trial's directory before restore."""

    trial_dir: str
    restored: str  # the checkpoint Ray's state resumes the trial from
    moved_from: str | None = None  # `restored` was gone: this newer checkpoint was moved there
    discarded: tuple[str, ...] = ()  # newer checkpoints Ray's state does not know (removed)
    restarted: bool = False  # `restored` was gone with nothing newer: the trial starts from scratch
    placeholders: tuple[str, ...] = ()  # older kept ones already deleted: made again, empty, for Ray

    @property
    def rerun(self) -> tuple[str, ...]:
        """Discarded checkpoints whose epochs the trial trains again."""
        return tuple(name for name in self.discarded if name != self.moved_from)


def _names(fs: pafs.FileSystem, path: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [info.base_name for info in infos]


@dataclass(frozen=True)
class _Named:
    """What Ray's saved state says of one trial's checkpoints."""

    latest: str  # the one a restore resumes from
    older: tuple[str, ...]  # the others its checkpoint manager keeps (and deletes in turn)
    runs_again: bool  # not TERMINATED: a restore runs it on, registering new checkpoints


def restorable_checkpoints(experiment_uri: str) -> dict[str, str] | None:
    """trial_id -> the checkpoint dir a restore would resume the trial from, per the newest state.

    Trials without a checkpoint are left out; None when there is no readable experiment state.
    """
    named = _named_checkpoints(experiment_uri)
    return None if named is None else {tid: n.latest for tid, n in named.items()}


def _named_checkpoints(experiment_uri: str) -> dict[str, _Named] | None:
    fs, path = filesystem(experiment_uri)
    try:
        states = fnmatch.filter(_names(fs, path), _STATE_GLOB)
        if not states:
            return None
        # Ray restores from the greatest file name (its session timestamp): so do we.
        with fs.open_input_stream(f"{path}/{max(states)}") as f:
            state = json.loads(f.read())
        named: dict[str, _Named] = {}
        for trial_json, runtime_json in state["trial_data"]:
            trial = json.loads(trial_json)
            names = _checkpoint_names(runtime_json)
            if names is not None:
                named[trial["trial_id"]] = _Named(names[0], names[1],
                                                  trial.get("status") != "TERMINATED")
        return named
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("experiment state of %s unreadable: %s", experiment_uri, exc)
        return None


def tune_state_problems(experiment_uri: str) -> list[str]:
    """What stops ``Tuner.restore`` from resuming the experiment at ``experiment_uri``: its
    ``tuner.pkl`` or its newest ``experiment_state-*.json`` missing or unreadable. Ray finds out only
    after it has started (an UnpicklingError or ValueError traceback), and with ``tuner.pkl`` gone
    ``Tuner.can_restore`` is False and a launch started every trial again beside the recorded ones.
    Read here, before Ray starts, as Ray reads them: each problem names the file and why."""
    import ray.cloudpickle

    fs, path = filesystem(experiment_uri)
    problems = []
    names = _names(fs, path)
    if _TUNER_PKL not in names:
        problems.append(f"{_TUNER_PKL} is missing")
    else:
        try:
            with fs.open_input_stream(f"{path}/{_TUNER_PKL}") as f:
                ray.cloudpickle.loads(f.read())
        except Exception as exc:  # noqa: BLE001 - any failure to load is what Ray's restore would hit
            problems.append(f"{_TUNER_PKL} cannot be read ({type(exc).__name__}: {exc})")
    states = fnmatch.filter(names, _STATE_GLOB)
    if not states:
        problems.append(f"no {_STATE_GLOB} is there")
    else:
        try:  # Ray restores from the greatest name (its session timestamp)
            with fs.open_input_stream(f"{path}/{max(states)}") as f:
                state = json.loads(f.read())
            if not isinstance(state, dict) or "trial_data" not in state:
                raise ValueError("no trial_data in it")
        except (OSError, ValueError) as exc:
            problems.append(f"{max(states)} cannot be read ({type(exc).__name__}: {exc})")
    return problems


def _checkpoint_names(runtime_json: str) -> tuple[str, tuple[str, ...]] | None:
    """The checkpoint a restored trial resumes from -- its checkpoint manager's latest (Ray 2.60)
    -- and the older ones the manager keeps.

    Ray stores the manager pickled inside the runtime JSON, so it is decoded with Ray's own loader
    (an internal one: ``Trial.restore_run_metadata`` does the same). Undecodable → None, and the
    trial is left to Ray's own error.
    """
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    try:
        manager = _TrainingRunMetadata.from_json_state(runtime_json).checkpoint_manager
        latest = manager.latest_checkpoint_result
        kept = list(manager.best_checkpoint_results)
    except Exception as exc:  # noqa: BLE001 - any decoding failure means "cannot tell"
        log.debug("trial runtime state undecodable: %s", exc)
        return None
    if latest is None or latest.checkpoint is None:
        return None
    name = _dir_name(latest.checkpoint.path)
    if not _CHECKPOINT_RE.match(name):
        return None
    older = [_dir_name(r.checkpoint.path) for r in kept if r is not latest and r.checkpoint is not None]
    return name, tuple(n for n in older if _CHECKPOINT_RE.match(n) and n != name)


def _dir_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def repair_restorable_checkpoints(experiment_uri: str) -> list[Repair]:
    """Make each trial's checkpoints match the saved state Ray restores from; say what was done.

    Trial directories are named ``<label>-<trial_id>`` (``tuner.trial_label``).
    """
    named = _named_checkpoints(experiment_uri)
    if not named:
        return []
    fs, path = filesystem(experiment_uri)
    repairs = []
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or "-" not in info.base_name:
            continue
        trial = named.get(info.base_name.rsplit("-", 1)[1])
        if trial is None:
            continue
        want = trial.latest
        present = {int(m.group(1)): name for name in _names(fs, info.path)
                   if (m := _CHECKPOINT_RE.match(name))}
        placeholders = ()
        if trial.runs_again:
            placeholders = tuple(n for n in trial.older if int(_CHECKPOINT_RE.match(n).group(1))
                                 not in present)
            for name in placeholders:
                _write_marker(fs, f"{info.path}/{name}", _PLACEHOLDER_TEXT)
        index = int(_CHECKPOINT_RE.match(want).group(1))
        # Ray's state knows none of the newer ones: the first may stand in for a missing one.
        discarded = tuple(present[i] for i in sorted(present) if i > index)
        moved_from = None
        if index not in present:
            if not discarded:  # nothing to resume from: the trial starts again
                _write_marker(fs, f"{info.path}/{want}", _RESTART_TEXT)
                repairs.append(Repair(trial_dir=info.base_name, restored=want, restarted=True,
                                      placeholders=placeholders))
                continue
            moved_from = discarded[0]
            _move_dir(fs, f"{info.path}/{moved_from}", f"{info.path}/{want}")
        for name in discarded:
            if name != moved_from:
                fs.delete_dir(f"{info.path}/{name}")
        if discarded or placeholders:
            repairs.append(Repair(trial_dir=info.base_name, restored=want, moved_from=moved_from,
                                  discarded=discarded, placeholders=placeholders))
    return repairs


_RESTART_TEXT = b"this checkpoint was missing from storage; the trial restarted from scratch\n"
_PLACEHOLDER_TEXT = (b"an older checkpoint Ray's saved state still listed was already deleted; this "
                     b"empty stand-in is what Ray deletes when the trial saves its next one\n")


def _write_marker(fs: pafs.FileSystem, directory: str, text: bytes) -> None:
    from sweeper.trial import MISSING_CHECKPOINT_MARKER

    fs.create_dir(directory, recursive=True)
    with fs.open_output_stream(f"{directory}/{MISSING_CHECKPOINT_MARKER}") as f:
        f.write(text)


def _move_dir(fs: pafs.FileSystem, src: str, dst: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(src, dst)  # a rename: a repair cut short leaves no half checkpoint
    else:  # object stores cannot rename a prefix: copy it (it appears as written), then delete
        pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(src)


def load_trial_state(location: str, *, map_location: str = "cpu") -> dict:
    """The trial state (``sweeper.train.CHECKPOINT_FILE``) saved in a checkpoint, from a local
    directory or file, or a storage URI (``s3://...?endpoint_override=...``, ``file:///...``).

    A checkpoint directory written by Ray holds the file; a path to the file itself works too.
    FileNotFoundError names what was looked for.
    """
    import io

    import torch

    from sweeper.train import CHECKPOINT_FILE

    if "://" in location:
        fs, path = filesystem(location)
    else:
        fs, path = pafs.LocalFileSystem(), str(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        path = f"{path.rstrip('/')}/{CHECKPOINT_FILE}"
        info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no checkpoint at {location!r} (looked for a directory holding "
                                f"{CHECKPOINT_FILE}, or that file)")
    with fs.open_input_stream(path) as f:
        data = f.read()
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def trial_checkpoint_location(root: str, sweep_name: str, trial: dict) -> str:
    """Where a trial's latest checkpoint lives: its record's ``checkpoint`` (relative to the sweep's
    experiment dir, written by the driver at each report that saved one) joined to the storage root."""
    rel = trial.get("checkpoint")
    if not rel:
        raise LookupError(f"trial {trial.get('trial_id')!r} of sweep {sweep_name!r} has no recorded "
                          "checkpoint (it saved none, or ran before sweeper recorded checkpoints)")
    if "://" in root:
        from sweeper.store import join_uri

        return join_uri(root, sweep_name, rel)
    return str(Path(root) / sweep_name / rel)
