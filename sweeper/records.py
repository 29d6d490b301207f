"""The sweep's own record on local disk, readable without Ray: what ran, how each trial ended, and why.

Layout of ``<root>/<sweep name>/sweeper/`` (beside Ray's experiment state when storage is local)::

    sweep.json             settings, overrides, git SHA, command line, Ray experiment path
    sweep_file.py          the search-space file's text, as launched
    driver.json            the running driver's lease: host, pid, start time, heartbeat (sweeper.lease)
    stop_request.json      `sweeper stop` asks the driver to save its state and exit
    decisions.jsonl        every ASHA stop: trial, rung, cutoff, peers, the trial's value
    trials/<id>.json       one trial: config, status, outcome, stop reason, best/last metrics
    trials/<id>.jsonl      one line per reported epoch (a restored sweep may run an epoch again:
                           the driver keeps its first copy, as MLflow does; see ``epochs``)

``sweeper status`` and ``sweeper export`` read only these files.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

__all__ = ["SweepRecord", "append_json_line", "complete_lines", "finite", "json_lines", "scalar_metrics"]


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Numbers and short strings of a result, without Tune's bookkeeping."""
    skip = {"config", "trial_id", "date", "hostname", "node_ip", "pid", "timestamp", "done",
            "checkpoint_dir_name", "should_checkpoint", "experiment_tag", "time_this_iter_s",
            "iterations_since_restore", "time_since_restore", "time_total_s",
            "training_iteration"}  # = epoch
    out = {}
    for k, v in metrics.items():
        if k in skip:
            continue
        if isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, (int, float, str)):
            out[k] = v
    return out


def finite(value: Any) -> float | None:
    """A finite float from a record value ("nan" strings, bools and non-numbers -> None)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class SweepRecord:
    def __init__(self, experiment_dir: str | Path):
        self.experiment_dir = Path(experiment_dir)
        self.dir = self.experiment_dir / "sweeper"
        self.trials_dir = self.dir / "trials"

    # ---- writing (driver only) ------------------------------------------------------------------

    def create(self, meta: Mapping[str, Any], file_text: str) -> None:
        self.trials_dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.dir / "sweep.json", meta)
        (self.dir / "sweep_file.py").write_text(file_text)

    def update_meta(self, **changes: Any) -> None:
        meta = self.meta()
        meta.update(changes)
        _write_json(self.dir / "sweep.json", meta)

    def append_epoch(self, trial_id: str, metrics: Mapping[str, Any]) -> None:
        append_json_line(self.trials_dir / f"{trial_id}.jsonl", _json_safe(scalar_metrics(metrics)))

    def write_trial(self, trial_id: str, record: Mapping[str, Any]) -> None:
        _write_json(self.trials_dir / f"{trial_id}.json", _json_safe(record))

    def append_decision(self, decision: Mapping[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        append_json_line(self.dir / "decisions.jsonl", _json_safe(decision))

    # ---- reading --------------------------------------------------------------------------------

    def exists(self) -> bool:
        return (self.dir / "sweep.json").is_file()

    def meta(self) -> dict[str, Any]:
        return _read_object(self.dir / "sweep.json")

    def trial(self, trial_id: str) -> dict[str, Any] | None:
        path = self.trials_dir / f"{trial_id}.json"
        return _read_object(path) if path.is_file() else None

    def trials(self) -> list[dict[str, Any]]:
        if not self.trials_dir.is_dir():
            return []
        records = [_read_object(p) for p in sorted(self.trials_dir.glob("*.json"))]
        return sorted(records, key=lambda r: (r.get("created", 0), r.get("trial_id", "")))

    def epochs(self, trial_id: str) -> list[dict[str, Any]]:
        """One trial's epoch rows in epoch order. An epoch recorded twice keeps its first copy.

        A second copy comes from an epoch run again after a resume (a driver died after recording
        it but before Ray saved its state: those epochs train again from the older checkpoint).
        MLflow holds the first copy, and never logs a step twice, so the record reads as MLflow does.
        The driver no longer writes second copies (SweepCallback); records written before may hold
        them. A line a killed driver left torn is skipped (:func:`json_lines`): its epoch was never
        recorded whole, and the resumed driver records it from the checkpoint."""
        by_epoch: dict[int, dict[str, Any]] = {}
        for _, row in json_lines(self.trials_dir / f"{trial_id}.jsonl"):
            epoch = row.get("epoch")
            if not (isinstance(epoch, (int, float)) and math.isfinite(epoch)):
                epoch = len(by_epoch) + 1
            by_epoch.setdefault(int(epoch), row)
        return [by_epoch[e] for e in sorted(by_epoch)]

    def find_trial(self, ref: str) -> dict[str, Any]:
        """One trial's record by its id or its name (``trial_label``); LookupError says what exists.
        (``best`` is :meth:`by_checkpoint`'s first: it depends on which weights are wanted.)"""
        trials = self.trials()
        if not trials:
            raise LookupError(f"sweep {self.experiment_dir.name!r} has no trials yet")
        matches = [t for t in trials if ref in (t["trial_id"], t.get("name"))]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise LookupError(f"{len(matches)} trials of sweep {self.experiment_dir.name!r} are named "
                              f"{ref!r}: use a trial id ({', '.join(t['trial_id'] for t in matches)})")
        known = ", ".join(t["trial_id"] for t in trials[:8]) + (" ..." if len(trials) > 8 else "")
        raise LookupError(f"sweep {self.experiment_dir.name!r} has no trial {ref!r} (a trial id, a "
                          f"trial name or 'best'; ids: {known})")

    def value_at(self, trial: Mapping[str, Any], epoch: int, metric: str) -> float | None:
        """``metric`` of one trial at one epoch (its ``last`` copy, else its epoch rows); None if
        absent or not finite."""
        last = trial.get("last") or {}
        if finite(last.get("epoch")) == epoch and finite(last.get(metric)) is not None:
            return finite(last.get(metric))
        for row in self.epochs(trial["trial_id"]):
            if finite(row.get("epoch")) == epoch:
                return finite(row.get(metric))
        return None

    def by_checkpoint(self, trials: list[dict[str, Any]] | None = None
                      ) -> tuple[list[tuple[float, dict[str, Any]]], dict[str, list[str]]]:
        """Trials with a checkpoint ranked best first by the sweep's metric *at their checkpoint
        epoch* -- the weights a copy or an ensemble gets: a checkpoint is a trial's latest epoch, not
        its best, and a trial that peaked and then diverged holds NaN weights. Ties go to the earlier
        trial. Also {reason: [trial names]} for those left out (no checkpoint, diverged, no finite
        value there). ``trials``: a subset of this sweep's (default: all)."""
        meta = self.meta()
        metric, mode = meta.get("metric", "val_accuracy"), meta.get("mode", "max")
        scored: list[tuple[float, dict[str, Any]]] = []
        excluded: dict[str, list[str]] = {}
        for t in self.trials() if trials is None else trials:
            label, epoch = t.get("name") or t["trial_id"], t.get("checkpoint_epoch")
            if not t.get("checkpoint") or epoch is None:
                excluded.setdefault("no checkpoint", []).append(label)
            elif t.get("outcome") == "diverged":
                excluded.setdefault("diverged", []).append(label)
            elif (value := self.value_at(t, int(epoch), metric)) is None:
                excluded.setdefault(f"no finite {metric} at its checkpoint epoch", []).append(label)
            else:
                scored.append((value, t))
        sign = -1.0 if mode == "max" else 1.0
        scored.sort(key=lambda c: (sign * c[0], c[1].get("created", 0), c[1]["trial_id"]))
        return scored, excluded

    def decisions(self) -> dict[str, dict[str, Any]]:
        """The latest ASHA stop decision per trial."""
        return self.decisions_from(0)[0]

    def decisions_from(self, offset: int) -> tuple[dict[str, dict[str, Any]], int]:
        """The decisions appended at or after byte ``offset``, and the offset after the last whole
        line: the driver reads each decision once, not the whole file at every trial's end."""
        out: dict[str, dict[str, Any]] = {}
        for offset, d in json_lines(self.dir / "decisions.jsonl", offset):
            if "trial_id" in d:
                out[d["trial_id"]] = d
        return out, offset


def complete_lines(path: Path, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(offset after it, line) for each whole line of an append-only file from byte ``offset``.
    A line without its newline is still being written: the read stops before it."""
    if not path.is_file():
        return
    with open(path, "rb") as f:
        f.seek(offset)
        for line in f:
            if not line.endswith(b"\n"):
                return
            offset += len(line)
            yield offset, line


def json_lines(path: Path, offset: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    """(offset after it, object) for each whole JSON-object line of an append-only file from byte
    ``offset``. A line that is not one -- the torn end of a writer killed mid-line, which
    :func:`append_json_line` closes before appending again -- is skipped."""
    for end, line in complete_lines(path, offset):
        if line.strip():
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                yield end, value


def append_json_line(path: Path, value: Any) -> None:
    """Append one JSON line. A writer killed mid-line leaves a line without its end: close it (readers
    skip it as unreadable) rather than glue this line onto it."""
    with open(path, "ab") as f:
        torn = f.tell() > 0 and _last_byte(path) != b"\n"
        f.write((b"\n" if torn else b"") + json.dumps(value, default=str).encode() + b"\n")


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _read_object(path: Path) -> dict[str, Any]:
    """A record file's JSON object; a damaged one is a ConfigError naming it (these files are written
    whole, by rename, so a torn or foreign one was edited or copied in by hand)."""
    from sweeper.config import ConfigError

    try:
        value = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError([f"{path}: the sweep record's file is damaged (not JSON: {exc}); restore it "
                           "from a copy, or remove it"]) from None
    if not isinstance(value, dict):
        raise ConfigError([f"{path}: the sweep record's file is damaged (a JSON "
                           f"{type(value).__name__}, not an object); restore it from a copy"])
    return value


def _write_json(path: Path, data: Any) -> None:
    """Write-then-rename, so a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=str))
    os.replace(tmp, path)


def _json_safe(value: Any) -> Any:
    """NaN/inf become strings: JSON has no spelling for them, and we must not lose that they happened."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return _json_safe(value.item())
    return value

