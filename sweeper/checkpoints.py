"""Making a killed sweep restorable when Ray deleted the checkpoint its saved state names.

Ray's ``CheckpointConfig(num_to_keep=N)`` deletes a superseded checkpoint the moment its successor is
registered, and writes the experiment state that ``Tuner.restore`` reads just after (it forces a
save every N checkpoints per trial). A driver killed in that instant leaves a state naming a deleted
checkpoint, and the resumed trial fails with "Could not recover from checkpoint as it does not exist
on storage anymore" (seen in CI: the driver-kill test caught it about once in three runs).

Deletion only ever follows a newer checkpoint being written, so the fix is on disk, before restore:
where the named checkpoint is missing, copy its trial's next newer checkpoint under the missing name.
The trial resumes from that newer state (the checkpoint carries its own epoch; ASHA and the record
count the trial's epochs, not Tune's iterations), losing nothing. Keeping every checkpoint instead
would close the race too, but Ray's state stores each checkpoint's full result: with per-layer
diagnostics that is ~14 kB per trial and epoch, read and written on every state save.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from dataclasses import dataclass

import pyarrow.fs as pafs

__all__ = ["Repair", "repair_restorable_checkpoints", "restorable_checkpoints"]

log = logging.getLogger(__name__)

# Ray Tune's names (ray 2.60): TuneController.CKPT_FILE_TMPL and StorageContext's checkpoint dirs.
_STATE_GLOB = "experiment_state-*.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{6,})$")


@dataclass(frozen=True)
class Repair:
    trial_dir: str
    missing: str  # the checkpoint Ray's state names
    used: str  # the newer checkpoint copied under that name


def _names(fs: pafs.FileSystem, path: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [info.base_name for info in infos]


def restorable_checkpoints(experiment_uri: str) -> dict[str, str] | None:
    """trial_id -> the checkpoint dir a restore would resume the trial from, per the newest state.

    Trials without a checkpoint are left out; None when there is no readable experiment state.
    """
    fs, path = pafs.FileSystem.from_uri(experiment_uri)
    try:
        states = fnmatch.filter(_names(fs, path), _STATE_GLOB)
        if not states:
            return None
        # Ray restores from the greatest file name (its session timestamp): so do we.
        with fs.open_input_stream(f"{path}/{max(states)}") as f:
            state = json.loads(f.read())
        named: dict[str, str] = {}
        for trial_json, runtime_json in state["trial_data"]:
            trial_id = json.loads(trial_json)["trial_id"]
            last = json.loads(runtime_json).get("last_result") or {}
            # Every report carries a checkpoint (trial.py), so the last result's is the latest.
            name = last.get("checkpoint_dir_name")
            if isinstance(name, str) and _CHECKPOINT_RE.match(name):
                named[trial_id] = name
        return named
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("experiment state of %s unreadable: %s", experiment_uri, exc)
        return None


def repair_restorable_checkpoints(experiment_uri: str) -> list[Repair]:
    """Put a checkpoint back wherever the saved state names one that is gone; say what was done.

    Trial directories are named ``<label>-<trial_id>`` (``tuner.trial_label``).
    """
    named = restorable_checkpoints(experiment_uri)
    if not named:
        return []
    fs, path = pafs.FileSystem.from_uri(experiment_uri)
    repairs = []
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or "-" not in info.base_name:
            continue
        want = named.get(info.base_name.rsplit("-", 1)[1])
        if want is None:
            continue
        present = {int(m.group(1)): name for name in _names(fs, info.path)
                   if (m := _CHECKPOINT_RE.match(name))}
        index = int(_CHECKPOINT_RE.match(want).group(1))
        if index in present:
            continue
        newer = sorted(i for i in present if i > index)
        if not newer:  # nothing to resume from: Ray's own error will say so
            log.warning("%s: %s is missing and no newer checkpoint exists", info.path, want)
            continue
        used = present[newer[0]]
        _copy_dir(fs, f"{info.path}/{used}", f"{info.path}/{want}")
        repairs.append(Repair(trial_dir=info.base_name, missing=want, used=used))
    return repairs


def _copy_dir(fs: pafs.FileSystem, src: str, dst: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        # Copy under a temporary name, then rename: a repair cut short leaves no half checkpoint.
        staging = f"{dst}.repair"
        fs.delete_dir_contents(staging, missing_dir_ok=True)
        fs.create_dir(staging, recursive=True)
        pafs.copy_files(src, staging, source_filesystem=fs, destination_filesystem=fs)
        fs.move(staging, dst)
    else:  # object stores have no directories to rename: the prefix appears as it is written
        pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=fs)
