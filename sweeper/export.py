"""``sweeper status`` tables and ``sweeper export`` files, from the sweep record alone (no Ray).

Export schema, one row per trial (``trials`` table):

    trial_id (string), name (string), status (string),
    outcome (string)        how it ended, exactly as recorded (= MLflow tag sweeper.outcome): completed,
                            pruned, stalled, late_start, val_collapse, diverged, failed, stopped
    reason (string)         the one-sentence stop reason (= sweeper.stop_reason)
    at_chance (bool)        no better than chance at its last epoch: training loss not below ln C - tol,
                            validation not past 2x chance (= sweeper.at_chance); a pruned
                            trial keeps outcome "pruned" and says it was at chance here
    cause (string)          why it sat at chance: vanishing_signal, dead_relu, ... (= sweeper.cause)
    chance_epochs (int64)   epochs at chance in total
    epochs (int64), num_failures (int64),
    best_val_accuracy (double)   val_accuracy of the best epoch (by the sweep's metric): the headline
    final_val_accuracy (double)  val_accuracy of the last reported epoch
    test_accuracy (double)       test_accuracy of the last epoch (only a trial that ran its budget
                                 is evaluated on the test split; null otherwise)
    config.<dotted key>     one column per trial setting, typed as sampled (e.g. config.optim.lr: double)
    best.<metric>           metrics of the epoch with the best sweep metric (double)
    last.<metric>           metrics of the last reported epoch (double): val/train summaries, and
                            after a trial's last epoch test_accuracy/top1/top5 error, plus
                            test_multicrop_* and test_views where data.test_scales asked for them
    prune.rung, prune.cutoff, prune.peers, prune.value   ASHA's stop decision (null if not pruned)

and with ``--epochs``, one row per (trial, epoch) (``epochs`` table): trial_id, name, epoch, and every
scalar metric reported that epoch (per-layer diagnostics included).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from sweeper.records import SweepRecord

__all__ = ["FORMATS", "epoch_rows", "export", "outcome_fields", "status_outcome", "trial_row",
           "trial_rows"]

FORMATS = ("parquet", "csv", "json")
_SUMMARY_METRICS = ("val_accuracy", "val_loss", "train_loss", "val_top1_error", "val_top5_error",
                    "test_accuracy", "test_top1_error", "test_top5_error",
                    # VGG's multi-crop test (data.test_scales), beside the single-crop test_*
                    "test_multicrop_accuracy", "test_multicrop_top1_error",
                    "test_multicrop_top5_error", "test_views", "epoch", "lr", "stalled")


def trial_rows(record: SweepRecord, *, all_metrics: bool = False) -> list[dict[str, Any]]:
    return [trial_row(t, record.epochs(t["trial_id"]), all_metrics=all_metrics)
            for t in record.trials()]


def trial_row(t: Mapping[str, Any], epochs: Sequence[Mapping[str, Any]], *,
              all_metrics: bool = False) -> dict[str, Any]:
    """One trial's export row from its record and its epoch rows (the study report reads these too,
    so every number it states about a trial is this row's)."""
    fields = outcome_fields(t, epochs)
    row: dict[str, Any] = {
        "trial_id": t["trial_id"], "name": t.get("name"), "status": t.get("status"),
        "outcome": fields["outcome"], "reason": t.get("reason"), "at_chance": fields["at_chance"],
        "cause": fields["cause"], "chance_epochs": fields["chance_epochs"],
        "epochs": int(t.get("epochs", 0)), "num_failures": int(t.get("num_failures", 0)),
        **accuracies(t, epochs),
    }
    for key, value in sorted(t.get("config", {}).items()):
        row[f"config.{key}"] = value
    for part in ("best", "last"):
        metrics = t.get(part) or {}
        keys = metrics if all_metrics else [k for k in _SUMMARY_METRICS if k in metrics]
        for key in keys:
            row[f"{part}.{key}"] = _number(metrics[key])
    prune = t.get("prune") or {}
    for key in ("rung", "cutoff", "peers", "value"):
        row[f"prune.{key}"] = prune.get(key)
    return row


def accuracies(t: Mapping[str, Any], epochs: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """best (best epoch by the sweep's metric), final (last epoch) and test accuracy of one trial.

    The record's ``best``/``last`` are the driver's copies of those epochs; the epoch rows stand in
    for a record written before either existed.
    """
    best = _acc((t.get("best") or {}).get("val_accuracy"))
    if best is None:
        accs = [a for a in (_acc(e.get("val_accuracy")) for e in epochs) if a is not None]
        best = max(accs) if accs else None
    last = t.get("last") or (epochs[-1] if epochs else {})
    if epochs and int(_num_or(epochs[-1].get("epoch"), 0)) > int(_num_or(last.get("epoch"), 0)):
        last = epochs[-1]  # the record's copy is behind its epoch rows
    return {"best_val_accuracy": best, "final_val_accuracy": _acc(last.get("val_accuracy")),
            "test_accuracy": _acc(last.get("test_accuracy"))}


def outcome_fields(t: Mapping[str, Any], epochs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """outcome, at_chance, cause and chance_epochs exactly as the driver recorded them
    (``sweeper.outcomes.classify``, written by the callback beside the same MLflow tags).

    A record from before at_chance/cause were written keeps its recorded outcome; the missing fields
    come from the same outcome model run on its epochs, except that a "stalled" trial of that era
    kept its cause in ``reason`` and was at chance by definition.
    """
    outcome = t.get("outcome") or None
    out = {"outcome": outcome, "at_chance": t.get("at_chance"), "cause": t.get("cause"),
           "chance_epochs": t.get("chance_epochs")}
    if "at_chance" in t or outcome is None:
        return out
    derived = _classify(t, epochs)
    if outcome == "stalled":
        out.update(at_chance=True, cause=t.get("reason") or (derived and derived.cause))
    elif outcome in ("diverged", "failed"):
        out.update(at_chance=False)
    elif derived is not None:
        out.update(at_chance=derived.at_chance, cause=derived.cause)
    if derived is not None:
        out["chance_epochs"] = derived.chance_epochs
    return out


def status_outcome(fields: Mapping[str, Any], status: str | None = None) -> str:
    """The outcome as ``sweeper status`` shows it: as recorded, "pruned (at chance)" when at chance."""
    outcome = fields.get("outcome")
    if not outcome:
        return status or "?"
    if outcome == "pruned" and fields.get("at_chance"):
        return "pruned (at chance)"
    return str(outcome)


def _classify(t: Mapping[str, Any], epochs: Sequence[Mapping[str, Any]]):
    if not epochs:
        return None
    from sweeper.outcomes import classify

    stall_epochs, tolerance = 3, 0.05
    try:
        from sweeper.config import TrialConfig

        diag = TrialConfig.from_flat(dict(t.get("config") or {})).diagnostics
        stall_epochs, tolerance = diag.stall_epochs, diag.stall_tolerance
    except Exception:  # noqa: BLE001 - an old or odd config: the diagnostics' defaults
        pass
    return classify(list(epochs), decision=t.get("prune"), stall_epochs=stall_epochs,
                    stall_tolerance=tolerance)


def _acc(value: Any) -> float | None:
    v = _number(value)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        else None


def _num_or(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else default


def epoch_rows(record: SweepRecord) -> list[dict[str, Any]]:
    rows = []
    for t in record.trials():
        for metrics in record.epochs(t["trial_id"]):
            row = {"trial_id": t["trial_id"], "name": t.get("name")}
            row.update({k: _number(v) for k, v in metrics.items()})
            rows.append(row)
    return rows


# Table formats a user may reach for that export does not write: such a suffix is a mistake, not
# a dotted stem like run.v2 (which gets the format's extension added).
_OTHER_TABLES = frozenset({"xlsx", "xls", "ods", "tsv", "txt", "feather", "arrow", "h5", "hdf5",
                           "pkl", "pickle", "orc", "avro", "jsonl", "ndjson"})


def export(record: SweepRecord, out: Path, *, fmt: str | None = None, epochs: bool = False) -> list[Path]:
    """Write the trials table (and the epochs table) to ``out`` (a file stem: ``out.csv``, or
    ``out.trials.csv`` and ``out.epochs.csv``; an existing folder gets ``<sweep>.csv`` in it);
    return the paths. ``fmt`` None: the format ``out`` names (``runs.csv``), else parquet."""
    import pyarrow as pa

    from sweeper.config import ConfigError

    named = out.suffix[1:].lower() if out.suffix[1:].lower() in FORMATS else None
    if fmt is None and out.suffix[1:].lower() in _OTHER_TABLES:  # a.xlsx wrote a.xlsx.parquet, exit 0
        raise ConfigError([f"--out {out}: export does not write .{out.suffix[1:]} files; it writes "
                           f"{list(FORMATS)}: give --out {out.with_suffix('')}.csv (or --format to "
                           "add its extension to this name)"])
    if fmt is None:
        fmt = named or "parquet"  # `--out runs.csv` wrote runs.csv.parquet
    if fmt not in FORMATS:
        raise ConfigError([f"--format={fmt!r} is not one of {list(FORMATS)}"])
    if named and named != fmt:
        raise ConfigError([f"--out {out} names a .{named} file but --format is {fmt}: drop one of "
                           f"them, or give --out {out.with_suffix('')}.{fmt}"])
    if out.is_dir():  # a folder: the files go in it, named after the sweep
        out = out / record.experiment_dir.name
    from sweeper.config import file_in_the_way

    if problems := file_in_the_way("--out", out.parent):
        raise ConfigError(problems)
    # The stem as given (run.v2 stays run.v2: with_suffix would make it run.csv), without the
    # format's own extension if the user wrote it (run.csv -> run.csv, not run.csv.csv).
    stem = out.name[:-len(f".{fmt}")] if out.name.lower().endswith(f".{fmt}") and out.name != f".{fmt}" \
        else out.name
    tables = {"trials": trial_rows(record)}
    if epochs:
        tables["epochs"] = epoch_rows(record)
    ext = out.name[len(stem) + 1:] if stem != out.name else fmt  # as the user spelled it (runs.JSON)
    paths = {name: out.with_name(f"{stem}.{name}.{ext}" if epochs else f"{stem}.{ext}")
             for name in tables}
    if taken := [str(p) for p in paths.values() if p.is_dir()]:
        raise ConfigError([f"--out {out}: {', '.join(taken)} is a directory, not a file"])
    written = []
    for name, rows in tables.items():
        path = paths[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(_uniform(rows))
        _write(table, path, fmt)
        written.append(path)
    return written


def _write(table, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif fmt == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path)
    else:
        import json

        path.write_text(json.dumps(table.to_pylist(), indent=1, default=str))


def _uniform(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Same keys in every row (None where absent), so Arrow infers one schema."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    out = []
    for row in rows:
        out.append({k: row.get(k) for k in keys})
    # A column that mixes ints and floats becomes float; mixed types elsewhere become strings.
    for k in keys:
        kinds = {type(r[k]) for r in out if r[k] is not None}
        if kinds <= {int, float} and float in kinds:
            for r in out:
                if r[k] is not None:
                    r[k] = float(r[k])
        elif len(kinds) > 1:
            for r in out:
                if r[k] is not None:
                    r[k] = str(r[k])
    return out


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            f = float(value)  # "nan"/"inf" were stored as strings
            return f if not math.isfinite(f) else value
        except ValueError:
            return value
    return value

