"""The study report: one self-contained HTML page (plus CSV, PNGs and a Markdown summary) from a sweep record.

``build_report(SweepRecord(dir), out_dir)`` reads only the sweep's own record (no Ray, no MLflow) and
writes into ``out_dir``::

    cells.csv                one row per (depth, init, batch_norm) cell: best accuracy over lr, outcome
    heatmap.png              best validation accuracy, depth x init, one panel per BatchNorm setting
    layers_at_init.png       per-layer activation std and gradient norm at init and after epoch 1,
                             for the deepest VGG in the sweep: where the signal dies
    predicted_vs_measured.png  He et al.'s predicted activation std beside the measured one (no BN)
    curves.png               training loss per epoch, small multiples by depth, ln C marked
    summary.md               the generated text
    report.html              everything above in one file (figures as data URIs, inline CSS)

Every conclusion in the text is computed from the record: which cells stalled and why, where the
forward signal fell below 1e-6 of the first layer's, which init or BatchNorm made a stalled cell train.
If the data disagrees with the study's prediction, the text says what the data says.

A figure whose data is missing (a sweep without VGG depths, trials with no epochs yet, a record from
before step-0 values were logged) is skipped, and the HTML says why.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from sweeper.records import SweepRecord

__all__ = ["Report", "SIGNAL_FLOOR", "build_report", "cell_label", "signal_floor_layer"]

# A layer whose activation std is below this fraction of the first layer's carries no usable signal:
# with float32 and inputs of std ~1 it is at the level of rounding noise after a few more layers.
SIGNAL_FLOOR = 1e-6
_FLOOR_TEXT = "1e-6"
TRAINED_OVER_CHANCE = 2.0  # a cell "trained" when a trial beat chance accuracy by this factor
_AT_CHANCE_TOL = 0.05  # |train loss - ln C| within this is "at chance" (as the diagnostics' default)
_NOT_TRAINED = {"stalled", "diverged", "failed"}  # outcomes whose best accuracy does not count as trained
_INIT_ORDER = ("normal", "default", "xavier", "he")  # from the problem to the fix, left to right
_INIT_COLORS = {"normal": "#d62728", "default": "#7f7f7f", "xavier": "#ff7f0e", "he": "#1f77b4"}
_OTHER_COLORS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_MARKS = {  # short outcome marks for the heatmap cells
    "trained": "ok", "vanishing_signal": "VS", "vanishing_gradient": "VG", "dead_relu": "DR",
    "lr_too_high": "LR+", "lr_too_small": "LR-", "learn_then_collapse": "LC", "exploding": "EX",
    "plateau": "PL", "at_chance": "AC", "slow": "SL", "diverged": "DV", "failed": "F", "running": "…",
    "no_data": "?",
}
_LAYER_KEY = re.compile(r"^l(\d+)_(conv|fc)$")
_KNOWN_DATASET_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000, "mnist": 10}


@dataclass(frozen=True)
class Report:
    html: Path
    figures: list[Path]
    summary: str
    cells: list[dict[str, Any]]


# ---- reading the record ---------------------------------------------------------------------------


def _num(value: Any) -> float:
    """A float from a record value; the record spells non-finite numbers as strings ("nan", "inf")."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


def _finite(value: Any) -> bool:
    return math.isfinite(_num(value))


@dataclass(eq=False)  # identity: two trials are never "equal"
class _Trial:
    id: str
    name: str
    config: dict[str, Any]
    status: str
    outcome: str
    reason_text: str
    prune: dict[str, Any] | None
    epochs: list[dict[str, Any]]
    depth: int | str = 0
    init: str = "?"
    bn: bool = False
    lr: float = math.nan
    acc: float = math.nan
    label: str = ""  # why it did not train (a stall reason or a derived one); "" if it trained
    init_vals: dict[str, Any] = field(default_factory=dict)  # step-0 values, "init/" stripped

    @property
    def first(self) -> dict[str, Any]:
        return self.epochs[0] if self.epochs else {}

    @property
    def running(self) -> bool:
        return self.status != "finished"


_DEPTHS: dict[tuple[str, Any], int | str] = {}


def _depth(config: dict[str, Any]) -> int | str:
    """Weight layers as the VGG paper counts them for VGGs; any other architecture is its own name.

    Non-VGG nets keep their name so that, say, ResNet-18 never shares a row with an 18-layer plain net.
    """
    arch = str(config.get("model.arch", "?"))
    key = (arch, config.get("model.depth"))
    if key in _DEPTHS:
        return _DEPTHS[key]
    value: int | str = arch
    if arch.startswith("vgg"):
        try:
            from sweeper.config import TrialConfig
            from sweeper.models import weight_depth

            model = {k: v for k, v in config.items() if k.startswith("model.")}
            value = weight_depth(TrialConfig.from_flat(model).model)
        except Exception:  # noqa: BLE001 - an odd config must not sink the report
            match = re.fullmatch(r"vgg(\d+)\w*", arch)
            if match:
                value = int(match.group(1))
            elif config.get("model.depth") is not None:
                value = int(_num(config["model.depth"])) if _finite(config["model.depth"]) else arch
    _DEPTHS[key] = value
    return value


def _epochs(record: SweepRecord, trial_id: str) -> list[dict[str, Any]]:
    """The trial's epochs; a line the driver is still appending (torn JSON) is skipped, not fatal."""
    try:
        return record.epochs(trial_id)
    except ValueError:
        rows: dict[int, dict[str, Any]] = {}
        for line in (record.trials_dir / f"{trial_id}.jsonl").read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                epoch = _num(row.get("epoch"))
                rows[int(epoch) if math.isfinite(epoch) else len(rows) + 1] = row
        return [rows[e] for e in sorted(rows)]


def _load(record: SweepRecord) -> list[_Trial]:
    trials = []
    for t in record.trials():
        config = dict(t.get("config") or {})
        epochs = _epochs(record, t["trial_id"])
        trial = _Trial(id=t["trial_id"], name=str(t.get("name") or t["trial_id"]), config=config,
                       status=str(t.get("status") or "running"), outcome=str(t.get("outcome") or ""),
                       reason_text=str(t.get("reason") or ""), prune=t.get("prune"), epochs=epochs)
        trial.depth = _depth(config)
        trial.init = str(config.get("model.init", "?"))
        trial.bn = bool(config.get("model.batch_norm", False))
        trial.lr = _num(config.get("optim.lr"))
        accs = [_num(e.get("val_accuracy")) for e in epochs]
        accs += [_num((t.get(part) or {}).get("val_accuracy")) for part in ("best", "last")]
        accs = [a for a in accs if math.isfinite(a)]
        trial.acc = max(accs) if accs else math.nan
        trial.init_vals = {k[5:]: v for k, v in trial.first.items() if k.startswith("init/")}
        trials.append(trial)
    return trials


def _num_classes(trials: list[_Trial]) -> tuple[int, str]:
    """(C, how it was found): the dataset's class count, else e^(smallest initial loss), else 10.

    The smallest initial loss is used because a small-init net starts exactly at ln C while He init
    starts above it (science note 1).
    """
    for t in trials:
        name = t.config.get("data.name")
        if name is None:
            continue
        try:
            from sweeper.config import TrialConfig
            from sweeper.data import num_classes

            data = {k: v for k, v in t.config.items() if k.startswith("data.")}
            n = num_classes(TrialConfig.from_flat(data).data)
            if n:
                return int(n), f"dataset {name}"
        except Exception:  # noqa: BLE001
            if name in _KNOWN_DATASET_CLASSES:
                return _KNOWN_DATASET_CLASSES[name], f"dataset {name}"
    losses = [_num(t.init_vals.get("initial_loss")) for t in trials]
    losses = [v for v in losses if math.isfinite(v) and 0.5 < v < 12]
    if losses:
        n = round(math.exp(min(losses)))
        if n >= 2:
            return n, "the smallest initial loss (ln C)"
    return 10, "default (no dataset or initial loss recorded)"


def _layer_series(row: dict[str, Any], name: str) -> list[tuple[int, str, float]]:
    """[(index, 'l03_conv', value)] for ``name/lNN_*`` keys of a metrics row, in execution order."""
    out = []
    prefix = name + "/"
    for key, value in row.items():
        if key.startswith(prefix):
            layer = key[len(prefix):]
            match = _LAYER_KEY.match(layer)
            if match:
                out.append((int(match.group(1)), layer, _num(value)))
    return sorted(out)


def signal_floor_layer(stds: list[tuple[int, str, float]], floor: float = SIGNAL_FLOOR
                       ) -> tuple[str | None, float, str | None]:
    """(first layer whose std < floor x the first layer's, the smallest ratio seen, its layer).

    The first layer is the reference because its input is the data itself: anything lost after it
    was lost to the weights.
    """
    finite = [(i, k, v) for i, k, v in stds if math.isfinite(v)]
    if len(finite) < 2 or finite[0][2] <= 0:
        return None, math.nan, None
    ref = finite[0][2]
    crossed, low, low_key = None, math.inf, None
    for _, key, value in finite[1:]:
        ratio = value / ref
        if ratio < low:
            low, low_key = ratio, key
        if crossed is None and ratio < floor:
            crossed = key
    return crossed, low, low_key


# ---- cells ------------------------------------------------------------------------------------------


def _depth_sort(depth: int | str) -> tuple[int, Any]:
    return (0, depth) if isinstance(depth, int) else (1, str(depth))


def _init_sort(init: str) -> tuple[int, str]:
    return (_INIT_ORDER.index(init), init) if init in _INIT_ORDER else (len(_INIT_ORDER), init)


def cell_label(depth: int | str, init: str, bn: bool) -> str:
    where = f"depth {depth}" if isinstance(depth, int) else str(depth)
    return f"{where}, {init}, {'BN' if bn else 'no BN'}"


def _trial_label(t: _Trial, ln_c: float) -> str:
    """Why a trial did not train: its stall reason, else one read from its outcome and losses."""
    if t.outcome == "stalled":
        return t.reason_text or _last_stall_label(t) or "plateau"
    if t.outcome in ("diverged", "failed"):
        return t.outcome
    label = _last_stall_label(t)
    if label:  # ASHA stopped it first, but the diagnostics had already named the stall
        return label
    losses = [_num(e.get("train_loss")) for e in t.epochs if "train_loss" in e]
    if not losses:
        return "no_data"
    if not math.isfinite(losses[-1]):
        return "exploding"  # a loss that went to inf/nan without the run being labelled diverged
    return "slow" if losses[-1] < ln_c - _AT_CHANCE_TOL else "at_chance"


def _last_stall_label(t: _Trial) -> str:
    labels = [str(e["stall_reason"]) for e in t.epochs if e.get("stall_reason")]
    return labels[-1] if labels else ""


# Labels that the diagnostics assign (evidence) rank above those read off the loss alone.
_DERIVED = {"at_chance", "slow", "no_data", "diverged", "failed"}


@dataclass
class _Cell:
    depth: int | str
    init: str
    bn: bool
    trials: list[_Trial]
    best: _Trial | None
    outcome: str  # "trained", "running", "stalled: <reason>"
    reasons: Counter
    signal_layer: str | None = None  # plain cells: where the init signal fell below the floor
    signal_low: float = math.nan
    signal_low_layer: str | None = None
    signal_layers: int = 0
    signal_source: str = ""  # "init" or "epoch 1"

    @property
    def key(self) -> tuple[int | str, str, bool]:
        return self.depth, self.init, self.bn

    @property
    def trained(self) -> bool:
        return self.outcome == "trained"

    @property
    def stalled(self) -> bool:
        return self.outcome.startswith("stalled")

    @property
    def reason(self) -> str:
        return self.outcome.split(": ", 1)[1] if ": " in self.outcome else ""

    def row(self) -> dict[str, Any]:
        best = self.best
        return {
            "depth": self.depth, "init": self.init, "batch_norm": self.bn,
            "trials": len(self.trials),
            "finished": sum(not t.running for t in self.trials),
            "best_val_accuracy": best.acc if best else math.nan,
            "best_lr": best.lr if best else math.nan,
            "best_trial": best.name if best else "",
            "outcome": self.outcome,
            "reasons": ", ".join(f"{r}×{n}" for r, n in self.reasons.most_common()),
            "signal_below_floor_at": self.signal_layer or "",
            "signal_source": self.signal_source,
        }


def _cells(trials: list[_Trial], chance: float, ln_c: float) -> list[_Cell]:
    groups: dict[tuple, list[_Trial]] = {}
    for t in trials:
        groups.setdefault((t.depth, t.init, t.bn), []).append(t)
    cells = []
    for (depth, init, bn), ts in sorted(groups.items(), key=lambda kv: (_depth_sort(kv[0][0]), kv[0][2],
                                                                        _init_sort(kv[0][1]))):
        scored = [t for t in ts if math.isfinite(t.acc)]
        best = max(scored, key=lambda t: t.acc) if scored else None
        # A running trial above the bar counts: it has shown the net can learn. A stalled one does not:
        # a learn-then-collapse trial's best epoch came before it fell back to chance.
        trained = [t for t in scored if t.outcome not in _NOT_TRAINED and t.acc > TRAINED_OVER_CHANCE * chance]
        for t in ts:
            t.label = "" if t in trained else _trial_label(t, ln_c)
        done = [t for t in ts if t not in trained and not t.running]
        evidence = Counter(t.label for t in done if t.label not in _DERIVED)
        reasons = evidence or Counter(t.label for t in done)
        if trained:
            outcome = "trained"
        elif any(t.running for t in ts):
            outcome = "running"
        elif reasons:
            outcome = f"stalled: {reasons.most_common(1)[0][0]}"
        else:
            outcome = "stalled: no_data"
        cell = _Cell(depth, init, bn, ts, best, outcome, Counter(t.label for t in done))
        if not bn:
            _signal(cell)
        cells.append(cell)
    return cells


def _signal(cell: _Cell) -> None:
    """Where the forward signal of a plain cell fell below SIGNAL_FLOOR of the first layer's, at init.

    Every trial of a cell starts from the same weights when seeds match; step-0 values are preferred,
    and without them the epoch-1 row of the smallest-lr trial (which moved least) stands in.
    """
    with_init = [t for t in cell.trials if _layer_series(t.init_vals, "act_std")]
    if with_init:
        stds, source = _layer_series(with_init[0].init_vals, "act_std"), "init"
    else:
        fallback = sorted((t for t in cell.trials if _layer_series(t.first, "act_std")),
                          key=lambda t: t.lr if math.isfinite(t.lr) else math.inf)
        if not fallback:
            return
        stds, source = _layer_series(fallback[0].first, "act_std"), "epoch 1"
    crossed, low, low_key = signal_floor_layer(stds)
    cell.signal_layer, cell.signal_low, cell.signal_low_layer = crossed, low, low_key
    cell.signal_layers, cell.signal_source = len(stds), source


# ---- figures ------------------------------------------------------------------------------------------


class _Skip(Exception):
    """A figure that the data cannot support; the message says why, in the report."""


def _new_figure(width: float, height: float, layout: str | None = None):
    """A Figure on the Agg canvas, without pyplot: no global backend state, safe in any process."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _color(init: str, inits: list[str]) -> str:
    if init in _INIT_COLORS:
        return _INIT_COLORS[init]
    others = [i for i in inits if i not in _INIT_COLORS]
    return _OTHER_COLORS[others.index(init) % len(_OTHER_COLORS)] if init in others else "#000000"


def _mark(cell: _Cell) -> str:
    if cell.trained:
        return _MARKS["trained"]
    if cell.outcome == "running":
        return _MARKS["running"]
    return _MARKS.get(cell.reason, cell.reason[:3].upper())


def _fig_heatmap(cells: list[_Cell], chance: float, path: Path) -> Path:
    """Best accuracy per (depth, init), BN off beside BN on: the whole factorial at a glance."""
    if not cells:
        raise _Skip("no cells")
    depths = sorted({c.depth for c in cells}, key=_depth_sort)
    inits = sorted({c.init for c in cells}, key=_init_sort)
    panels = sorted({c.bn for c in cells})
    by_key = {c.key: c for c in cells}
    import numpy as np

    # Constrained layout keeps labels, colour bar and the marks line apart for any grid size.
    fig = _new_figure(max(7.0, 1.5 + 1.3 * len(inits) * len(panels)), 1.9 + 0.55 * len(depths),
                      layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    cmap = _viridis_with_bad()
    used_marks = set()
    image = None
    for ax, bn in zip(axes, panels):
        grid = np.full((len(depths), len(inits)), np.nan)
        for i, d in enumerate(depths):
            for j, init in enumerate(inits):
                cell = by_key.get((d, init, bn))
                if cell is None:
                    ax.text(j, i, "–", ha="center", va="center", color="#444444", fontsize=9)
                    continue
                acc = cell.best.acc if cell.best else math.nan
                grid[i, j] = acc
                mark = _mark(cell)
                used_marks.add(mark)
                text = f"{acc:.0%}" if math.isfinite(acc) else "n/a"
                dark = not math.isfinite(acc) or acc < 0.6
                ax.text(j, i, f"{text}\n{mark}", ha="center", va="center", fontsize=8.5,
                        color="white" if dark else "black", fontweight="bold" if cell.trained else "normal")
        image = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(inits)), inits)
        ax.set_yticks(range(len(depths)), [str(d) for d in depths])
        ax.set_xlabel("init")
        if ax is axes[0]:
            ax.set_ylabel("depth (weight layers)")
        ax.set_title("with BatchNorm" if bn else "no BatchNorm (plain)")
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), shrink=0.85)
        bar.set_label("best val accuracy (over lr)")
        bar.ax.axhline(chance, color="red", lw=1)
        bar.ax.axhline(TRAINED_OVER_CHANCE * chance, color="red", lw=1, ls="--")
    legend = [f"{m} = {name.replace('_', ' ')}" for name, m in _MARKS.items() if m in used_marks]
    fig.supxlabel("marks: " + "; ".join(legend) + f".\nColour-bar lines: chance ({chance:.0%}, solid) and "
                  f"the trained bar ({TRAINED_OVER_CHANCE * chance:.0%}, dashed).", fontsize=7.5)
    return _save(fig, path)


def _viridis_with_bad():
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")  # missing cells in grey


def _representative(cell: _Cell) -> _Trial | None:
    """The trial that speaks for a cell in per-layer plots: the best, with step-0 values if any has them."""
    ranked = sorted(cell.trials, key=lambda t: (not t.init_vals, not t.epochs,
                                                -(t.acc if math.isfinite(t.acc) else -1)))
    return ranked[0] if ranked and ranked[0].epochs else None


def _deepest(cells: list[_Cell], bn: bool) -> list[_Cell]:
    """Cells of the deepest numeric depth (a VGG) with this BN setting that have per-layer data."""
    usable = [c for c in cells if c.bn == bn and isinstance(c.depth, int) and
              any(_layer_series(t.first, "act_std") or _layer_series(t.init_vals, "act_std")
                  for t in c.trials)]
    if not usable:
        return []
    deepest = max(c.depth for c in usable)
    return sorted((c for c in usable if c.depth == deepest), key=lambda c: _init_sort(c.init))


def _positive(series: list[tuple[int, str, float]]) -> tuple[list[int], list[float]]:
    """Log axes cannot show zeros: they become gaps (an exact zero is a dead layer, said in captions)."""
    xs = [i for i, _, _ in series]
    ys = [v if math.isfinite(v) and v > 0 else math.nan for _, _, v in series]
    return xs, ys


def _fig_layers(cells: list[_Cell], path: Path) -> tuple[Path, str]:
    """Per-layer act std and weight-gradient norm of the deepest VGG, init (solid) vs epoch 1 (dashed).

    The activation panel shows the forward signal decaying layer by layer (the product of He et al.'s
    gains); the gradient panel shows whether the weights get any gradient to recover with.
    """
    rows = [(bn, _deepest(cells, bn)) for bn in (False, True)]
    rows = [(bn, cs) for bn, cs in rows if cs]
    if not rows:
        raise _Skip("no trial of a VGG depth has per-layer diagnostics")
    inits = sorted({c.init for _, cs in rows for c in cs}, key=_init_sort)
    fig = _new_figure(11, 3.6 * len(rows))
    axes = fig.subplots(len(rows), 2, squeeze=False)
    any_init, marked, notes = False, False, []
    for r, (bn, cs) in enumerate(rows):
        for c in cs:
            t = _representative(c)
            if t is None:
                continue
            color = _color(c.init, inits)
            lr = f"lr {t.lr:.2g}" if math.isfinite(t.lr) else ""
            for col, metric in enumerate(("act_std", "grad_norm")):
                ax = axes[r][col]
                at_init = _layer_series(t.init_vals, metric)
                if at_init:
                    any_init = True
                    ax.plot(*_positive(at_init), color=color, lw=1.8, marker="o", ms=3,
                            label=f"{c.init} at init")
                after = _layer_series(t.first, metric)
                if after:
                    ax.plot(*_positive(after), color=color, lw=1.2, ls="--", marker=".",
                            label=f"{c.init} after epoch 1 ({lr})")
                # Mark the layer the text names: on the init curve, or on epoch 1 when that stands in.
                floor_series = at_init or after
                crossed = signal_floor_layer(floor_series)[0] if metric == "act_std" and not bn else None
                if crossed:
                    x, y = [(i, v) for i, k, v in floor_series if k == crossed][0]
                    if y > 0:
                        marked = True
                        ax.plot([x], [y], marker="v", ms=10, color=color, mec="black", ls="none")
        depth = cs[0].depth
        for col, (metric, what) in enumerate((("act_std", "activation std (conv/fc output)"),
                                               ("grad_norm", "weight-gradient norm ‖∇W‖"))):
            ax = axes[r][col]
            ax.set_yscale("log")
            ax.set_xlabel("weight layer (execution order; last = classifier)")
            ax.set_ylabel(what)
            ax.set_title(f"depth {depth}, {'BN' if bn else 'no BN'}: {metric}")
            ax.grid(True, which="major", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
    if not any_init:
        notes.append("no step-0 (init/) values in this record: only the after-epoch-1 curves are drawn")
    title = "Signal through the deepest VGG in the sweep"
    if marked:
        title += f" (▼: first layer below {_FLOOR_TEXT} × layer 0's activation std)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path), "; ".join(notes)


def _predicted(t: _Trial) -> tuple[list[tuple[int, str, float]], list[tuple[int, str, float]], str]:
    """(measured, predicted, how): step-0 values if recorded, else a chain of the logged gains.

    The fallback multiplies the per-layer gains g_l = n Var[w] / 2 (Var[y_l] = g_l Var[y_l-1] behind
    a ReLU) from the measured first layer; it is measured after epoch 1, so it says so.
    """
    measured = _layer_series(t.init_vals, "act_std")
    predicted = _layer_series(t.init_vals, "act_std_pred")
    if measured and predicted:
        return measured, predicted, "init"
    measured = _layer_series(t.init_vals, "act_std") or _layer_series(t.first, "act_std")
    gain_rows = _layer_series(t.init_vals, "gain_pred") or _layer_series(t.first, "gain_pred")
    gains = {k: v for _, k, v in gain_rows}
    if not measured or not gains or not math.isfinite(measured[0][2]):
        return [], [], ""
    var = measured[0][2] ** 2
    chain = [measured[0]]
    for i, key, _ in measured[1:]:
        var *= gains.get(key, math.nan)
        chain.append((i, key, math.sqrt(var) if var >= 0 else math.nan))
    how = "init" if t.init_vals.get(f"act_std/{measured[0][1]}") is not None else "epoch 1"
    return measured, chain, f"{how}, predicted = chained gains from layer 0"


def _fig_predicted(cells: list[_Cell], path: Path) -> tuple[Path, str]:
    """He et al.'s prediction against the measurement for the deepest plain VGG, and their ratio.

    The ratio panel is where the prediction's blind spots show: max-pooling (x1.8-2.6 in variance)
    and zero padding on small maps (x0.44 at 2x2), which the per-layer gain formula ignores.
    """
    cs = _deepest(cells, bn=False)
    series = []
    for c in cs:
        t = _representative(c)
        if t is not None:
            measured, predicted, how = _predicted(t)
            if measured and predicted:
                series.append((c, t, measured, predicted, how))
    if not series:
        raise _Skip("no plain (no-BN) VGG trial has measured and predicted per-layer activation std")
    inits = sorted({c.init for c, *_ in series}, key=_init_sort)
    fig = _new_figure(11, 3.8)
    ax, ax_ratio = fig.subplots(1, 2)
    hows = set()
    for c, t, measured, predicted, how in series:
        hows.add(how)
        color = _color(c.init, inits)
        ax.plot(*_positive(measured), color=color, lw=1.8, marker="o", ms=3, label=f"{c.init} measured")
        ax.plot(*_positive(predicted), color=color, lw=1.2, ls="--", label=f"{c.init} predicted")
        pred = {k: v for _, k, v in predicted}
        ratio = [(i, k, v / pred[k] if math.isfinite(pred.get(k, math.nan)) and pred[k] > 0 else math.nan)
                 for i, k, v in measured]
        ax_ratio.plot(*_positive(ratio), color=color, lw=1.5, marker="o", ms=3, label=c.init)
    depth = series[0][0].depth
    ax.set_yscale("log")
    when = "at init" if hows == {"init"} else "after epoch 1 (no step-0 values)"
    ax.set_title(f"depth {depth}, no BN: activation std per layer, measured {when}", fontsize=10)
    ax.set_ylabel("std of the layer's output")
    ax_ratio.set_yscale("log")
    ax_ratio.axhline(1.0, color="black", lw=0.8)
    ax_ratio.set_title("measured / predicted")
    for a in (ax, ax_ratio):
        a.set_xlabel("weight layer (execution order; last = classifier)")
        a.grid(True, which="major", alpha=0.3)
        a.legend(fontsize=7, loc="best")
    fig.tight_layout()
    note = "" if hows == {"init"} else "measured values from: " + "; ".join(sorted(hows))
    return _save(fig, path), note


def _fig_curves(cells: list[_Cell], ln_c: float, path: Path) -> Path:
    """Training loss per epoch, one panel per depth: a stall is a flat line on ln C."""
    with_data = [c for c in cells if any(_finite(e.get("train_loss")) for t in c.trials for e in t.epochs)]
    if not with_data:
        raise _Skip("no trial has reported an epoch yet")
    depths = sorted({c.depth for c in with_data}, key=_depth_sort)
    inits = sorted({c.init for c in with_data}, key=_init_sort)
    ncols = min(4, len(depths))
    nrows = math.ceil(len(depths) / ncols)
    fig = _new_figure(3.4 * ncols + 0.5, 3.0 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    top = ln_c * 1.6
    for ax, depth in zip(axes.flat, depths):
        for c in (c for c in with_data if c.depth == depth):
            color, style = _color(c.init, inits), "--" if c.bn else "-"
            for t in c.trials:
                xs = [int(_num(e.get("epoch", n + 1))) for n, e in enumerate(t.epochs)]
                ys = [_num(e.get("train_loss")) for e in t.epochs]
                ys = [min(y, top) if math.isfinite(y) else math.nan for y in ys]
                best = t is c.best
                # The cell's best lr carries the line; its other lrs stay faint, for the spread.
                ax.plot(xs, ys, color=color, ls=style, lw=1.8 if best else 0.8, alpha=1.0 if best else 0.3,
                        marker="o" if best and len(xs) == 1 else None)
        ax.axhline(ln_c, color="black", lw=0.8, ls=":")
        ax.text(1.0, ln_c / top, "ln C ", transform=ax.transAxes, va="bottom", ha="right", fontsize=7)
        ax.set_title(f"depth {depth}" if isinstance(depth, int) else str(depth))
        ax.set_xlabel("epoch")
        ax.set_ylim(0, top)
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[len(depths):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("train loss")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=_color(i, inits), lw=2, label=i) for i in inits]
    handles += [Line2D([], [], color="gray", ls="-", label="no BN"),
                Line2D([], [], color="gray", ls="--", label="BN")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("Training loss (bold: the cell's best lr; faint: its other lrs; clipped at 1.6 ln C)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, path)


# ---- text ---------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{x:.1%}" if math.isfinite(x) else "n/a"


def _lr(x: float) -> str:
    return f"{x:.2g}" if math.isfinite(x) else "?"


def _join(items: Iterable[Any]) -> str:
    items = [str(i) for i in items]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _sci(x: float) -> str:
    """1.6e-5 rather than 1.6e-05: the way the science notes write small numbers."""
    if not math.isfinite(x) or x == 0:
        return str(x)
    if 1e-3 <= abs(x) < 100:
        return f"{x:.2g}"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def _layer_number(key: str | None) -> str:
    match = _LAYER_KEY.match(key or "")
    return str(int(match.group(1)) + 1) if match else "?"


def _stalled_lines(cells: list[_Cell]) -> list[str]:
    lines = []
    for c in (c for c in cells if c.stalled):
        lrs = sorted(t.lr for t in c.trials if math.isfinite(t.lr))
        lr_text = (f" at every lr tried ({_lr(lrs[0])}–{_lr(lrs[-1])})" if len(lrs) > 1 else
                   f" at lr {_lr(lrs[0])}" if lrs else "")
        counts = ", ".join(f"{r} ×{n}" if n > 1 else r for r, n in c.reasons.most_common())
        best = _pct(c.best.acc) if c.best else "n/a"
        line = f"- **{cell_label(*c.key)}**: stalled ({c.reason}; trials: {counts}){lr_text}; best {best}."
        if not c.bn and c.signal_source:
            when = "at init" if c.signal_source == "init" else "after epoch 1 (no step-0 values recorded)"
            if c.signal_layer:
                line += (f" {when.capitalize()} the activation std falls below {_FLOOR_TEXT} of the first "
                         f"layer's at `{c.signal_layer}` (weight layer {_layer_number(c.signal_layer)} of "
                         f"{c.signal_layers} measured).")
            elif math.isfinite(c.signal_low) and c.signal_low > 0:
                line += (f" {when.capitalize()} the activation std stays above {_FLOOR_TEXT} of the first "
                         f"layer's; its lowest is {_sci(c.signal_low)} of it at "
                         f"`{c.signal_low_layer}`" + (f" (a {_sci(1 / c.signal_low)}-fold loss)."
                                                      if c.signal_low < 1e-3 else "."))
        lines.append(line)
    return lines


def _by_init_lines(cells: list[_Cell]) -> list[str]:
    """Per BN setting and init: at which depths it trains, with the best accuracy where it does."""
    lines = []
    for bn in sorted({c.bn for c in cells}):
        parts = []
        group = [c for c in cells if c.bn == bn]
        for init in sorted({c.init for c in group}, key=_init_sort):
            own = sorted((c for c in group if c.init == init), key=lambda c: _depth_sort(c.depth))
            ok = [c for c in own if c.trained]
            bad = [c for c in own if c.stalled]
            run = [c for c in own if c.outcome == "running"]
            accs = _join(f"{_pct(c.best.acc)} at {c.depth}" if len(ok) > 1 else _pct(c.best.acc)
                         for c in ok if c.best)
            if ok and not bad and not run:
                text = f"{init} trains at every depth ({accs})"
            elif not ok and bad and not run:
                text = f"{init} stalls at every depth ({_join(c.depth for c in bad)})"
            else:
                bits = []
                if ok:
                    bits.append(f"trains at {_join(c.depth for c in ok)} ({accs})")
                if bad:
                    bits.append(f"stalls at {_join(c.depth for c in bad)}")
                if run:
                    bits.append(f"is still running at {_join(c.depth for c in run)}")
                text = f"{init} " + " but ".join(bits)
            parts.append(text)
        lines.append(f"- {'With BN' if bn else 'Without BN'}: " + ". ".join(parts) + ".")
    return lines


def _fix_lines(cells: list[_Cell]) -> list[str]:
    """What made stalled plain cells train, read from the cells only (never assumed)."""
    by_key = {c.key: c for c in cells}
    plain = [c for c in cells if not c.bn]
    stalled = [c for c in plain if c.stalled]
    lines = []
    if not plain:
        return ["- The sweep has no plain (no-BN) cells, so there is no stall without BN to fix."]
    if not stalled:
        return ["- No plain cell stalled, so there was nothing to fix."]
    plain_depths = sorted({c.depth for c in plain}, key=_depth_sort)
    # Another init, same depth, still without BN.
    for init in sorted({c.init for c in plain}, key=_init_sort):
        own = {c.depth: c for c in plain if c.init == init}
        rescued = [s for s in stalled
                   if s.init != init and own.get(s.depth) is not None and own[s.depth].trained]
        if not rescued:
            continue
        others = _join(sorted({s.init for s in rescued}, key=_init_sort))
        if all(d in own and own[d].trained for d in plain_depths):
            lines.append(f"- **{init} init trains at every depth** in the sweep without BN "
                         f"({_join(plain_depths)}), including where {others} stalled.")
        else:
            fails = [d for d in plain_depths if d in own and own[d].stalled]
            tail = f", but itself stalls at {_join(fails)}" if fails else ""
            depths = _join(sorted({s.depth for s in rescued}, key=_depth_sort))
            lines.append(f"- {init} init (no BN) trains at {depths} where {others} stalled{tail}.")
    # The same cell with BatchNorm.
    bn_cells = [c for c in cells if c.bn]
    if not bn_cells:
        lines.append("- The sweep has no BatchNorm cells: whether BN fixes the stalls is not tested here.")
    else:
        counterpart = [(s, by_key.get((s.depth, s.init, True))) for s in stalled]
        tested = [(s, b) for s, b in counterpart if b is not None]
        fixed = [s for s, b in tested if b.trained]
        still = [b for b in bn_cells if b.stalled]
        inits = sorted({c.init for c in cells}, key=_init_sort)
        every_init = all((d, i, True) in by_key for d in plain_depths for i in inits)
        if not still and every_init and all(b.trained for b in bn_cells):
            lines.append(f"- **BatchNorm trains every init at every depth** ({_join(inits)}; depths "
                         f"{_join(plain_depths)}): it fixed all {len(fixed)} stalled plain cells it was "
                         f"tested on.")
        elif tested:
            lines.append(f"- BatchNorm made {len(fixed)} of {len(tested)} stalled plain cells train"
                         + (f" ({_join(cell_label(*s.key) for s in fixed)})" if fixed else "") + ".")
        if still:
            lines.append("- With BatchNorm still stalled: "
                         + "; ".join(f"{cell_label(*b.key)} ({b.reason})" for b in still) + ".")
        untested = [s for s, b in counterpart if b is None]
        if untested:
            lines.append("- Not run with BN: " + "; ".join(cell_label(*s.key) for s in untested) + ".")
    unfixed = [s for s in stalled
               if not any(c.trained for c in cells if c.depth == s.depth and c is not s)]
    if unfixed:
        lines.append("- Nothing in the sweep trained at: "
                     + "; ".join(f"depth {s.depth}" if isinstance(s.depth, int) else str(s.depth)
                                 for s in _unique_depths(unfixed)) + ".")
    return lines


def _unique_depths(cells: list[_Cell]) -> list[_Cell]:
    seen, out = set(), []
    for c in cells:
        if c.depth not in seen:
            seen.add(c.depth)
            out.append(c)
    return out


def _lr_lines(cells: list[_Cell], limit: int = 8) -> list[str]:
    """Trained cells in which some lr stalled with a named reason: the lr, not the init, failed there."""
    lines = []
    for c in (c for c in cells if c.trained):
        failed = [t for t in c.trials if t.label and t.label not in _DERIVED]
        if failed and c.best:
            lines.append(f"- {cell_label(*c.key)}: trains at lr {_lr(c.best.lr)} ({_pct(c.best.acc)}) but "
                         + _join(f"lr {_lr(t.lr)} stalled ({t.label})"
                                 for t in sorted(failed, key=lambda t: t.lr))
                         + ".")
    if len(lines) > limit:
        lines = lines[:limit] + [f"- … and {len(lines) - limit} more cells."]
    return lines


def _best_by_depth_line(cells: list[_Cell]) -> str:
    parts = []
    for depth in sorted({c.depth for c in cells}, key=_depth_sort):
        ok = [c for c in cells if c.depth == depth and c.trained and c.best]
        if ok:
            best = max(ok, key=lambda c: c.best.acc)
            parts.append(f"{depth}: {_pct(best.best.acc)} ({best.init}{', BN' if best.bn else ''})")
    return ("- Best trained cell per depth (trainable is not the same as better): " + "; ".join(parts) + "."
            if parts else "")


def _summary(meta: dict[str, Any], trials: list[_Trial], cells: list[_Cell], num_classes: int,
             classes_from: str, notes: list[str]) -> str:
    name = meta.get("name") or "sweep"
    out = [f"# Report: {name}", ""]
    if not trials:
        out += ["Nothing to show: the record holds no trials yet.", ""]
        return "\n".join(out + [f"- {n}" for n in notes])
    chance, ln_c = 1.0 / num_classes, math.log(num_classes)
    finished = sum(not t.running for t in trials)
    planned = meta.get("planned_trials")
    of_planned = f" of {planned} planned" if planned else ""
    out.append(f"{len(trials)} trials recorded ({finished} finished{of_planned}) in {len(cells)} cells "
               f"(depth × init × BatchNorm). Chance is {chance:.0%} ({num_classes} classes from "
               f"{classes_from}; ln C = {ln_c:.4f}); a cell counts as trained when a trial that did not stall "
               f"reached more than {TRAINED_OVER_CHANCE:g}× chance ({TRAINED_OVER_CHANCE * chance:.0%}) "
               f"validation accuracy at any lr.")
    if not any(t.epochs for t in trials):
        out += ["", "Nothing to show yet: no trial has reported an epoch."]
    out += ["", "## Stalled cells", ""]
    stalled = _stalled_lines(cells)
    out += stalled or ["- No cell stalled: every finished cell has a trial above the trained bar."]
    running = [c for c in cells if c.outcome == "running"]
    if running:
        out.append(f"- Not judged yet (still running, not above the bar): "
                   + "; ".join(cell_label(*c.key) for c in running) + ".")
    out += ["", "## Which cells train", ""] + _by_init_lines(cells)
    best_line = _best_by_depth_line(cells)
    if best_line:
        out.append(best_line)
    out += ["", "## What fixed it", ""] + _fix_lines(cells)
    lr_lines = _lr_lines(cells)
    if lr_lines:
        out += ["", "## Learning rate within trained cells", ""] + lr_lines
    if notes:
        out += ["", "## Notes on the data", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


# ---- HTML -----------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto; max-width: 1150px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
pre.question { background: #f6f8fa; padding: .8em 1em; white-space: pre-wrap; border-left: 4px solid #1f77b4; }
table { border-collapse: collapse; font-size: .88em; margin: .6em 0 1.2em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.trained td.outcome { color: #17652a; font-weight: 600; }
tr.stalled td.outcome { color: #a51d1d; font-weight: 600; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .88em; color: #555; } .skip { color: #8a6d00; background: #fff8e1; padding: .4em .8em; }
.meta { color: #555; font-size: .88em; } code { background: #f3f3f3; padding: 0 .25em; }
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _md_to_html(text: str) -> str:
    """The summary's small Markdown subset: headings, bullets, **bold**, `code`."""
    out, in_list = [], False

    def inline(s: str) -> str:
        s = _esc(s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

    for line in text.splitlines():
        if line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{inline(line[2:])}</li>")
            continue
        if in_list:
            out.append("</ul>")
            in_list = False
        if line.startswith("# "):
            continue  # the page has its own title
        if line.startswith("## "):
            out.append(f"<h3>{inline(line[3:])}</h3>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    if in_list:
        out.append("</ul>")
    return "\n".join(out)


def _table(headers: list[str], rows: list[list[Any]], classes: list[str] | None = None,
           numeric: set[int] | None = None, cell_classes: dict[int, str] | None = None) -> str:
    numeric, cell_classes = numeric or set(), cell_classes or {}
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for n, row in enumerate(rows):
        tds = []
        for i, value in enumerate(row):
            cls = " ".join(filter(None, ["num" if i in numeric else "", cell_classes.get(i, "")]))
            tds.append(f"<td class=\"{cls}\">{_esc(value)}</td>" if cls else f"<td>{_esc(value)}</td>")
        row_cls = f" class=\"{classes[n]}\"" if classes else ""
        body.append(f"<tr{row_cls}>{''.join(tds)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _cells_table(cells: list[_Cell]) -> str:
    if not cells:
        return "<p class=\"skip\">No cells: the record holds no trials.</p>"
    rows, classes = [], []
    for c in cells:
        r = c.row()
        signal = (f"{r['signal_below_floor_at']} ({r['signal_source']})" if r["signal_below_floor_at"] else
                  f"never (min {_sci(c.signal_low)}, {c.signal_source})" if math.isfinite(c.signal_low) else "")
        rows.append([c.depth, c.init, "yes" if c.bn else "no", f"{r['finished']}/{r['trials']}",
                     _pct(r["best_val_accuracy"]), _lr(r["best_lr"]), r["outcome"], r["reasons"], signal])
        classes.append("trained" if c.trained else "stalled" if c.stalled else "")
    return _table(["depth", "init", "BN", "finished/trials", "best val acc", "lr of best", "outcome",
                   "not-trained trials", f"signal < {_FLOOR_TEXT} × layer 0 at"], rows, classes,
                  numeric={4, 5}, cell_classes={6: "outcome"})


def _decisions_table(record: SweepRecord, trials: list[_Trial]) -> str:
    try:
        decisions = record.decisions()
    except Exception as exc:  # noqa: BLE001 - a torn line must not sink the report
        return f"<p class=\"skip\">ASHA decisions unreadable: {_esc(exc)}</p>"
    if not decisions:
        return "<p>No ASHA stops recorded.</p>"
    names = {t.id: t.name for t in trials}
    ds = sorted(decisions.values(),
                key=lambda d: (_num(d.get("rung")), _num(d.get("time")), str(d.get("trial_id", ""))))
    rows = [[names.get(d.get("trial_id"), d.get("trial_id")), d.get("rung", ""), d.get("epoch", ""),
             f"{_num(d.get('value')):.4g}", f"{_num(d.get('cutoff')):.4g}", d.get("peers", ""),
             d.get("metric", "")] for d in ds]
    return (f"<p>{len(rows)} trials stopped by ASHA: each was below the rung's cutoff (the value the top "
            f"1/reduction_factor of its peers at that rung reached).</p>"
            + _table(["trial", "rung", "epoch", "its value", "cutoff", "peers", "metric"], rows,
                     numeric={1, 2, 3, 4, 5}))


def _trials_table(trials: list[_Trial]) -> str:
    rows = [[t.name, t.depth, t.init, "yes" if t.bn else "no", _lr(t.lr), t.status, t.outcome or "",
             t.label or ("trained" if t.outcome not in _NOT_TRAINED and math.isfinite(t.acc) else ""),
             len(t.epochs), _pct(t.acc)] for t in trials]
    return ("<details><summary>All trials</summary>"
            + _table(["trial", "depth", "init", "BN", "lr", "status", "outcome", "label", "epochs",
                      "best val acc"], rows, numeric={4, 8, 9}) + "</details>")


_CAPTIONS = {
    "heatmap": "Best validation accuracy over the learning rates tried, per depth × init, without and with "
               "BatchNorm. The mark under each value is the cell's outcome (ok = trained, else the stall "
               "reason).",
    "layers_at_init": "Per-layer activation std and weight-gradient norm of the deepest VGG in the sweep, one "
                      "colour per init, solid at init (before any update), dashed after epoch 1. Gaps on the "
                      "log axis are exact zeros.",
    "predicted_vs_measured": "Measured activation std per layer beside He et al.'s prediction (dashed), plain "
                             "nets; right: their ratio (pooling and zero padding are outside the prediction).",
    "curves": "Training loss per epoch, one panel per depth; colour = init, dashed = BatchNorm; the dotted "
              "line is ln C, where a stalled net sits.",
}


def _figure_html(name: str, title: str, path: Path | None, note: str) -> str:
    if path is None:
        return f"<h3>{_esc(title)}</h3><p class=\"skip\">Figure skipped: {_esc(note)}.</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    extra = f" <em>{_esc(note)}.</em>" if note else ""
    return (f"<h3>{_esc(title)}</h3><figure><img alt=\"{_esc(title)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{_esc(_CAPTIONS.get(name, ''))}{extra}</figcaption></figure>")


def _html(meta: dict[str, Any], summary: str, cells: list[_Cell], trials: list[_Trial], record: SweepRecord,
          figures: list[tuple[str, str, Path | None, str]]) -> str:
    name = meta.get("name") or record.experiment_dir.name
    question = meta.get("question") or "(no question recorded)"
    facts = [f"metric {meta.get('metric', '?')} ({meta.get('mode', '?')})",
             f"max_epochs {meta.get('max_epochs', '?')}",
             f"trials {len(trials)} recorded / {meta.get('planned_trials', '?')} planned",
             f"git {meta.get('git_sha') or 'unknown'}{' (dirty)' if meta.get('git_dirty') else ''}",
             f"record {record.experiment_dir}"]
    command = meta.get("command")
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{_esc(name)}: study report</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(name)}: study report</h1>",
        f"<pre class=\"question\">{_esc(question)}</pre>",
        f"<p class=\"meta\">{' · '.join(_esc(f) for f in facts)}</p>",
        f"<p class=\"meta\">command: <code>{_esc(command)}</code></p>" if command else "",
        "<h2>Findings</h2>", _md_to_html(summary),
        "<h2>Cells</h2>", _cells_table(cells),
        "<h2>Figures</h2>",
        *(_figure_html(*f) for f in figures),
        "<h2>ASHA decisions</h2>", _decisions_table(record, trials),
        "<h2>Trials</h2>", _trials_table(trials) if trials else "<p>No trials.</p>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


# ---- the entry point -------------------------------------------------------------------------------------

_CSV_FIELDS = ["depth", "init", "batch_norm", "trials", "finished", "best_val_accuracy", "best_lr",
               "best_trial", "outcome", "reasons", "signal_below_floor_at", "signal_source"]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def build_report(record: SweepRecord, out_dir: Path) -> Report:
    """Write the study report of ``record`` into ``out_dir`` (see the module docstring); return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = record.meta() if record.exists() else {}
    trials = _load(record)
    num_classes, classes_from = _num_classes(trials)
    chance, ln_c = 1.0 / num_classes, math.log(num_classes)
    cells = _cells(trials, chance, ln_c)
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
        ("heatmap", "Best accuracy: depth × init × BatchNorm", lambda p: _fig_heatmap(cells, chance, p)),
        ("layers_at_init", "Where the signal dies: per-layer statistics at init and after epoch 1",
         lambda p: _fig_layers(cells, p)),
        ("predicted_vs_measured", "Predicted vs measured activation std (no BN)",
         lambda p: _fig_predicted(cells, p)),
        ("curves", "Learning curves", lambda p: _fig_curves(cells, ln_c, p)),
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
        except _Skip as skip:
            figures.append((name, title, None, str(skip)))
        except Exception as exc:  # noqa: BLE001 - one broken figure must not cost the rest of the report
            figures.append((name, title, None, f"drawing failed ({type(exc).__name__}: {exc})"))
    for name, _, made, note in figures:
        if made is None and trials:
            notes.append(f"figure {name} skipped: {note}")

    summary = _summary(meta, trials, cells, num_classes, classes_from, notes)
    rows = [c.row() for c in cells]
    _write_csv(out_dir / "cells.csv", rows)
    (out_dir / "summary.md").write_text(summary)
    html_path = out_dir / "report.html"
    html_path.write_text(_html(meta, summary, cells, trials, record, figures))
    return Report(html=html_path, figures=[p for _, _, p, _ in figures if p is not None], summary=summary,
                  cells=rows)
