"""The study report: one self-contained HTML page (plus CSV, PNGs and a Markdown summary) from a sweep record.

``build_report(SweepRecord(dir), out_dir)`` reads only the sweep's own record (no Ray, no MLflow) and
writes into ``out_dir``::

    cells.csv                one row per cell (a combination of the grid axes): seeds, verdict with its
                             count, best accuracy per seed / mean / range, final and test accuracy
    heatmap.png              best validation accuracy, depth x init, one panel per BatchNorm setting
                             (when the cells are model x init x BN)
    layers_at_init.png       per-layer activation std and gradient norm at init and after epoch 1,
                             for the deepest VGG in the sweep: where the signal dies
    predicted_vs_measured.png  He et al.'s predicted activation std beside the measured one (no BN)
    curves.png               training loss per epoch, small multiples by model, ln C marked
    summary.md               the generated text
    report.html              everything above in one file (figures as data URIs, inline CSS)

Where each concept lives:

- ``study``: the model -- trials (their facts are their ``sweeper export`` rows: outcome, at_chance,
  cause, best/final/test accuracy), the grid axes, cells and their seeds, the signal floor.
- ``figures``: the PNGs. ``text``: the findings. ``page``: the HTML.

Every number the report states is the export's number: the outcome counts are counts of the recorded
``outcome`` (= MLflow's ``sweeper.outcome``), a cell's per-seed best accuracy is the highest
``best_val_accuracy`` among that seed's trials. Depths are the weight layers the model really has
(``models.weight_depth``), with the paper's configuration name beside them; layers are l00, l01, ...
everywhere, as the metrics name them. A figure whose data is missing is skipped, and the HTML says why.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.records import SweepRecord
from sweeper.report.figures import (
    Skip,
    fig_curves,
    fig_heatmap,
    fig_layers,
    fig_predicted,
)
from sweeper.report.page import page
from sweeper.report.study import (
    SIGNAL_FLOOR,
    Cell,
    Study,
    cell_label,
    load_study,
    signal_floor_layer,
)
from sweeper.report.text import summary as summary_text

__all__ = [
    "SIGNAL_FLOOR",
    "Report",
    "Study",
    "build_report",
    "cell_label",
    "cell_row",
    "load_study",
    "signal_floor_layer",
]


@dataclass(frozen=True)
class Report:
    html: Path
    figures: list[Path]
    summary: str
    cells: list[dict[str, Any]]


def cell_row(cell: Cell, study: Study) -> dict[str, Any]:
    """A cell as a cells.csv row. ``best_val_accuracy`` is the mean over seeds of each seed's best
    trial's best-epoch accuracy (with n = 1, that trial's); final and test are those trials' too."""
    mean, lo, hi, _ = cell.stats("acc")
    final, _, _, _ = cell.stats("final")
    test, _, _, test_n = cell.stats("test")
    seeds = [r.seed for r in cell.replicates]
    per = cell.per_seed("acc")
    lrs = [r.best.lr if r.best else math.nan for r in cell.replicates]
    row: dict[str, Any] = {
        "cell": cell_label(cell, study.view), "model": cell.model, "depth": cell.depth, "init": cell.init,
        "batch_norm": cell.bn,
        **{f"axis.{k}": v for k, v in cell.values.items()},
        "n_seeds": cell.n, "seeds": ";".join("" if s is None else str(s) for s in seeds),
        "trials": len(cell.trials), "finished": sum(not t.running for t in cell.trials),
        "seeds_trained": cell.count("trained"), "seeds_stalled": cell.count("stalled"),
        "seeds_running": cell.count("running"), "verdict": cell.verdict(), "outcome": cell.outcome,
        "best_val_accuracy": mean, "best_val_accuracy_min": lo, "best_val_accuracy_max": hi,
        "best_val_accuracy_per_seed": ";".join(_g(v) for v in per),
        "final_val_accuracy": final, "test_accuracy": test, "test_seeds": test_n,
        "best_lr": lrs[0] if len(lrs) == 1 else ";".join(_g(v) for v in lrs),
        "best_trial": ";".join(r.best.name if r.best else "" for r in cell.replicates),
        "reasons": ", ".join(f"{r}×{n}" for r, n in cell.reasons.most_common()),
        "signal_below_floor_at": cell.signal_layer or "",
        "signal_source": cell.signal_source,
    }
    return row


def _g(x: float) -> str:
    return repr(float(x)) if math.isfinite(x) else ""


_CSV_FIELDS = ["cell", "model", "depth", "init", "batch_norm", "n_seeds", "seeds", "trials", "finished",
               "seeds_trained", "seeds_stalled", "seeds_running", "verdict", "outcome", "best_val_accuracy",
               "best_val_accuracy_min", "best_val_accuracy_max", "best_val_accuracy_per_seed",
               "final_val_accuracy", "test_accuracy", "test_seeds", "best_lr", "best_trial", "reasons",
               "signal_below_floor_at", "signal_source"]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(_CSV_FIELDS)
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None or isinstance(v, float) and math.isnan(v) else v)
                             for k, v in row.items()})


def build_report(record: SweepRecord, out_dir: Path) -> Report:
    """Write the study report of ``record`` into ``out_dir`` (see the module docstring); return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = load_study(record)
    trials = study.trials
    notes: list[str] = []
    if not record.exists():
        notes.append(f"no sweep.json under {record.dir}: the sweep's settings are unknown")
    empty = [t.name for t in trials if not t.epochs]
    if trials and empty:
        notes.append(f"{len(empty)} of {len(trials)} trials have no epochs yet")
    if trials and not any(t.init_vals for t in trials if t.epochs):
        notes.append("no step-0 (init/) values in this record: per-layer signal figures and the signal-floor "
                     "layer use the first epoch's measurement instead, which for a stalled net (whose weights "
                     "barely moved) is close to init")

    specs: list[tuple[str, str, Callable[[Path], Any]]] = [
        ("heatmap", "Best accuracy: depth (weight layers) × init × BatchNorm", lambda p: fig_heatmap(study, p)),
        ("layers_at_init", "Where the signal dies: per-layer statistics at init and after epoch 1",
         lambda p: fig_layers(study, p)),
        ("predicted_vs_measured", "Predicted vs measured activation std (no BN)",
         lambda p: fig_predicted(study, p)),
        ("curves", "Learning curves", lambda p: fig_curves(study, p)),
    ]
    figures: list[tuple[str, str, Path | None, str]] = []
    for name, title, draw in specs:
        path = out_dir / f"{name}.png"
        path.unlink(missing_ok=True)  # never embed a stale figure from an earlier report
        if not trials:
            figures.append((name, title, None, "the record holds no trials"))
            continue
        try:
            result = draw(path)
            made, note = result if isinstance(result, tuple) else (result, "")
            figures.append((name, title, made, note))
        except Skip as skip:
            figures.append((name, title, None, str(skip)))
        except Exception as exc:  # noqa: BLE001 - one broken figure must not cost the rest of the report
            figures.append((name, title, None, f"drawing failed ({type(exc).__name__}: {exc})"))
    for name, _, made, note in figures:
        if made is None and trials:
            notes.append(f"figure {name} skipped: {note}")

    text = summary_text(study, notes)
    rows = [cell_row(c, study) for c in study.cells]
    _write_csv(out_dir / "cells.csv", rows)
    (out_dir / "summary.md").write_text(text)
    html_path = out_dir / "report.html"
    html_path.write_text(page(study, text, record, figures))
    return Report(html=html_path, figures=[p for _, _, p, _ in figures if p is not None], summary=text,
                  cells=rows)
