"""``sweeper status`` tables and ``sweeper export`` files, from the sweep record alone (no Ray).

Export schema, one row per trial (``trials`` table):

    trial_id (string), name (string), status (string), outcome (string), reason (string),
    epochs (int64), num_failures (int64),
    config.<dotted key>     one column per trial setting, typed as sampled (e.g. config.optim.lr: double)
    best.<metric>           metrics of the epoch with the best sweep metric (double)
    last.<metric>           metrics of the last reported epoch (double)
    prune.rung, prune.cutoff, prune.peers, prune.value   ASHA's stop decision (null if not pruned)

and with ``--epochs``, one row per (trial, epoch) (``epochs`` table): trial_id, name, epoch, and every
scalar metric reported that epoch (per-layer diagnostics included).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sweeper.records import SweepRecord

__all__ = ["FORMATS", "epoch_rows", "export", "trial_rows"]

FORMATS = ("parquet", "csv", "json")
_SUMMARY_METRICS = ("val_accuracy", "val_loss", "train_loss", "val_top1_error", "val_top5_error",
                    "test_accuracy", "epoch", "lr", "stalled")


def trial_rows(record: SweepRecord, *, all_metrics: bool = False) -> list[dict[str, Any]]:
    rows = []
    for t in record.trials():
        row: dict[str, Any] = {
            "trial_id": t["trial_id"], "name": t.get("name"), "status": t.get("status"),
            "outcome": t.get("outcome"), "reason": t.get("reason"),
            "epochs": int(t.get("epochs", 0)), "num_failures": int(t.get("num_failures", 0)),
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
        rows.append(row)
    return rows


def epoch_rows(record: SweepRecord) -> list[dict[str, Any]]:
    rows = []
    for t in record.trials():
        for metrics in record.epochs(t["trial_id"]):
            row = {"trial_id": t["trial_id"], "name": t.get("name")}
            row.update({k: _number(v) for k, v in metrics.items()})
            rows.append(row)
    return rows


def export(record: SweepRecord, out: Path, *, fmt: str = "parquet", epochs: bool = False) -> list[Path]:
    """Write the trials table (and the epochs table) to ``out`` (a file stem); return the paths."""
    import pyarrow as pa

    if fmt not in FORMATS:
        from sweeper.config import ConfigError

        raise ConfigError([f"--format={fmt!r} is not one of {list(FORMATS)}"])
    tables = {"trials": trial_rows(record)}
    if epochs:
        tables["epochs"] = epoch_rows(record)
    written = []
    for name, rows in tables.items():
        path = out.with_name(f"{out.name}.{name}.{fmt}") if epochs else out.with_suffix(f".{fmt}")
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

