"""The report's figures, drawn from the study model (matplotlib's Agg canvas, no pyplot).

Each ``fig_*`` function writes one PNG and returns its path (and a note), or raises :class:`Skip`
with the reason the data cannot support it, which the report prints in the figure's place.
Layers are numbered as the metrics name them: l00 is the first weight layer.
"""

from __future__ import annotations

import math
from pathlib import Path

from sweeper.outcomes import trained_bar
from sweeper.report.study import (
    FLOOR_TEXT,
    Cell,
    Study,
    Trial,
    finite,
    init_sort,
    layer_series,
    model_label,
    num,
    row_sort,
    signal_floor_layer,
)

_INIT_COLORS = {"normal": "#d62728", "default": "#7f7f7f", "xavier": "#ff7f0e", "he": "#1f77b4"}
_OTHER_COLORS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_INIT_MARKERS = {"normal": "s", "default": "D", "xavier": "^", "he": "o"}
MARKS = {  # short outcome marks for the heatmap cells
    "trained": "ok", "vanishing_signal": "VS", "vanishing_gradient": "VG", "dead_relu": "DR",
    "lr_too_high": "LR+", "lr_too_small": "LR-", "learn_then_collapse": "LC", "exploding": "EX",
    "plateau": "PL", "at_chance": "AC", "slow": "SL", "diverged": "DV", "failed": "F", "running": "…",
    "val_collapse": "VC", "mixed": "±", "no_data": "?", "no_diagnostics": "ND",
}
LAYER_AXIS = "weight layer (l00 first, in execution order; last = classifier)"
DEPTH_AXIS = "depth (weight layers) and model"


class Skip(Exception):
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


def _offset(init: str, inits: list[str]) -> float:
    """A small x offset per init, so that coinciding per-layer lines stay visible side by side."""
    if len(inits) < 2:
        return 0.0
    return 0.24 * (inits.index(init) / (len(inits) - 1) - 0.5)


def row_label(model: str, depth: int | None) -> str:
    """A heatmap/curve row: the real weight-layer count first, the paper's name beside it."""
    return f"{depth} ({model})" if depth is not None else model


def mark(cell: Cell) -> str:
    """The heatmap's mark under a cell's value: its outcome, with the seed count when n > 1."""
    if cell.trained:
        text = MARKS["trained"]
    elif cell.outcome == "running":
        text = MARKS["running"]
    elif cell.mixed:
        text = MARKS["mixed"]
    else:
        text = MARKS.get(cell.reason, cell.reason[:3].upper())
    if cell.n > 1:
        judged = cell.count("trained") if cell.trained or cell.mixed else cell.count("stalled")
        text += f" {judged}/{cell.n}"
    return text


def _layer_ticks(ax) -> None:
    """Tick labels l00, l01, ... as the metrics name the layers."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"l{int(round(x)):02d}" if x >= 0 else ""))


def _viridis_with_bad():
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")  # missing cells in grey


def fig_heatmap(study: Study, path: Path) -> Path:
    """Mean (over seeds) of the best accuracy per (model, init), BN off beside BN on."""
    if not study.view:
        raise Skip(f"the sweep's cells are {', '.join(study.axes)}, not depth × init × BatchNorm "
                   "(the cells table has them all)")
    cells = study.cells
    if not cells:
        raise Skip("no cells")
    rows = sorted({(c.model, c.depth) for c in cells}, key=lambda r: row_sort(*r))
    inits = sorted({c.init for c in cells}, key=init_sort)
    panels = sorted({c.bn for c in cells})
    by_key = {c.view_key: c for c in cells}
    n_max = max(c.n for c in cells)
    import numpy as np

    # Constrained layout keeps labels, colour bar and the marks line apart for any grid size.
    fig = _new_figure(max(7.0, 1.5 + 1.3 * len(inits) * len(panels)), 1.9 + 0.55 * len(rows),
                      layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    cmap = _viridis_with_bad()
    used_marks = set()
    image = None
    for ax, bn in zip(axes, panels):
        grid = np.full((len(rows), len(inits)), np.nan)
        for i, (model, _) in enumerate(rows):
            for j, init in enumerate(inits):
                cell = by_key.get((model, init, bn))
                if cell is None:
                    ax.text(j, i, "–", ha="center", va="center", color="#444444", fontsize=9)
                    continue
                acc, lo, hi, _ = cell.stats("acc")
                grid[i, j] = acc
                m = mark(cell)
                used_marks.add(m.split(" ")[0])
                text = f"{acc:.0%}" if math.isfinite(acc) else "n/a"
                if cell.n > 1 and math.isfinite(lo):
                    text += f" ({lo:.0%}–{hi:.0%})"
                dark = not math.isfinite(acc) or acc < 0.6
                ax.text(j, i, f"{text}\n{m}", ha="center", va="center", fontsize=8.5 if n_max == 1 else 7,
                        color="white" if dark else "black", fontweight="bold" if cell.trained else "normal")
        image = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(inits)), inits)
        ax.set_yticks(range(len(rows)), [row_label(*r) for r in rows])
        ax.set_xlabel("init")
        if ax is axes[0]:
            ax.set_ylabel(DEPTH_AXIS)
        ax.set_title("with BatchNorm" if bn else "no BatchNorm (plain)")
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), shrink=0.85)
        bar.set_label("best val accuracy (over lr" + (", mean over seeds)" if n_max > 1 else ")"))
        bar.ax.axhline(study.chance, color="red", lw=1)
        bar.ax.axhline(trained_bar(study.chance), color="red", lw=1, ls="--")
    legend = [f"{m} = {name.replace('_', ' ')}" for name, m in MARKS.items() if m in used_marks]
    seeds = (f" k/n after a mark: seeds of the cell it holds for (n = {n_max})." if n_max > 1 else
             " n = 1 seed per cell.")
    fig.supxlabel("marks: " + "; ".join(legend) + "." + seeds + f"\nColour-bar lines: chance "
                  f"({study.chance:.0%}, solid) and the trained bar ({trained_bar(study.chance):.0%},"
                  " dashed).", fontsize=7.5)
    return _save(fig, path)


def representative(cell: Cell) -> Trial | None:
    """The trial that speaks for a cell in per-layer plots: the best, with step-0 values if any has them."""
    ranked = sorted(cell.trials, key=lambda t: (not t.init_vals, not t.epochs,
                                                -(t.acc if math.isfinite(t.acc) else -1)))
    return ranked[0] if ranked and ranked[0].epochs else None


def deepest(cells: list[Cell], bn: bool) -> list[Cell]:
    """Cells of the deepest VGG with this BN setting that have per-layer data."""
    usable = [c for c in cells if c.bn == bn and c.is_vgg and
              any(layer_series(t.first, "act_std") or layer_series(t.init_vals, "act_std")
                  for t in c.trials)]
    if not usable:
        return []
    model = max(((c.model, c.depth) for c in usable), key=lambda r: row_sort(*r))[0]
    return sorted((c for c in usable if c.model == model), key=lambda c: init_sort(c.init))


def _positive(series: list[tuple[int, str, float]], dx: float = 0.0) -> tuple[list[float], list[float]]:
    """Log axes cannot show zeros: they become gaps (an exact zero is a dead layer, said in captions)."""
    xs = [i + dx for i, _, _ in series]
    ys = [v if math.isfinite(v) and v > 0 else math.nan for _, _, v in series]
    return xs, ys


def fig_layers(study: Study, path: Path) -> tuple[Path, str]:
    """Per-layer act std and weight-gradient norm of the deepest VGG, init (solid) vs epoch 1 (dashed)."""
    rows = [(bn, deepest(study.cells, bn)) for bn in (False, True)]
    rows = [(bn, cs) for bn, cs in rows if cs]
    if not rows:
        has_vgg = any(c.is_vgg for c in study.cells)
        raise Skip("no trial of a VGG has per-layer diagnostics" if has_vgg else
                   "the sweep has no VGG: this figure compares layers along a VGG's depth")
    inits = sorted({c.init for _, cs in rows for c in cs}, key=init_sort)
    fig = _new_figure(11, 3.6 * len(rows))
    axes = fig.subplots(len(rows), 2, squeeze=False)
    any_init, marked, notes = False, False, []
    for r, (bn, cs) in enumerate(rows):
        for c in cs:
            t = representative(c)
            if t is None:
                continue
            color, dx = _color(c.init, inits), _offset(c.init, inits)
            lr = f"lr {t.lr:.3g}" if math.isfinite(t.lr) else ""
            for col, metric in enumerate(("act_std", "grad_norm")):
                ax = axes[r][col]
                at_init = layer_series(t.init_vals, metric)
                if at_init:
                    any_init = True
                    ax.plot(*_positive(at_init, dx), color=color, lw=1.8, marker=_INIT_MARKERS.get(c.init, "o"),
                            ms=3, label=f"{c.init} at init")
                after = layer_series(t.first, metric)
                if after:
                    ax.plot(*_positive(after, dx), color=color, lw=1.2, ls="--", marker=".",
                            label=f"{c.init} after epoch 1 ({lr})")
                # Mark the layer the text names: on the init curve, or on epoch 1 when that stands in.
                floor_series = at_init or after
                crossed = signal_floor_layer(floor_series)[0] if metric == "act_std" and not bn else None
                if crossed:
                    x, y = [(i, v) for i, k, v in floor_series if k == crossed][0]
                    if y > 0:
                        marked = True
                        ax.plot([x + dx], [y], marker="v", ms=10, color=color, mec="black", ls="none")
        where = model_label(cs[0].model, cs[0].depth)
        for col, (metric, what) in enumerate((("act_std", "activation std (conv/fc output)"),
                                               ("grad_norm", "weight-gradient norm ‖∇W‖"))):
            ax = axes[r][col]
            ax.set_yscale("log")
            ax.set_xlabel(LAYER_AXIS)
            _layer_ticks(ax)
            ax.set_ylabel(what)
            ax.set_title(f"{where}, {'BN' if bn else 'no BN'}: {metric}", fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
    if not any_init:
        notes.append("no step-0 (init/) values in this record: only the after-epoch-1 curves are drawn")
    if len(inits) > 1:
        notes.append("each init's points are shifted sideways by up to ±0.12 of a layer so that "
                     "coinciding lines stay visible")
    title = "Signal through the deepest VGG in the sweep"
    if marked:
        title += f" (▼: first layer below {FLOOR_TEXT} × l00's activation std)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path), "; ".join(notes)


def _predicted(t: Trial) -> tuple[list[tuple[int, str, float]], list[tuple[int, str, float]], str]:
    """(measured, predicted, how): step-0 values if recorded, else a chain of the logged gains.

    The fallback multiplies the per-layer gains g_l = n Var[w] / 2 (Var[y_l] = g_l Var[y_l-1] behind
    a ReLU) from the measured l00; it is measured after epoch 1, so it says so.
    """
    measured = layer_series(t.init_vals, "act_std")
    predicted = layer_series(t.init_vals, "act_std_pred")
    if measured and predicted:
        return measured, predicted, "init"
    measured = layer_series(t.init_vals, "act_std") or layer_series(t.first, "act_std")
    gain_rows = layer_series(t.init_vals, "gain_pred") or layer_series(t.first, "gain_pred")
    gains = {k: v for _, k, v in gain_rows}
    if not measured or not gains or not math.isfinite(measured[0][2]):
        return [], [], ""
    var = measured[0][2] ** 2
    chain = [measured[0]]
    for i, key, _ in measured[1:]:
        var *= gains.get(key, math.nan)
        chain.append((i, key, math.sqrt(var) if var >= 0 else math.nan))
    how = "init" if t.init_vals.get(f"act_std/{measured[0][1]}") is not None else "epoch 1"
    return measured, chain, f"{how}, predicted = chained gains from l00"


def _coinciding(ratios: dict[str, list[tuple[int, str, float]]], tol: float = 0.05) -> list[tuple[str, str]]:
    """Pairs of inits whose ratio lines agree within ``tol`` (relative) at every shared layer."""
    pairs = []
    names = list(ratios)
    for a_i, a in enumerate(names):
        for b in names[a_i + 1:]:
            va = {k: v for _, k, v in ratios[a] if math.isfinite(v) and v > 0}
            vb = {k: v for _, k, v in ratios[b] if math.isfinite(v) and v > 0}
            shared = set(va) & set(vb)
            if shared and all(abs(va[k] / vb[k] - 1) <= tol for k in shared):
                pairs.append((a, b))
    return pairs


def fig_predicted(study: Study, path: Path) -> tuple[Path, str]:
    """He et al.'s prediction against the measurement for the deepest plain VGG, and their ratio.

    The ratio panel is where the prediction's blind spots show: max-pooling (x1.8-2.6 in variance)
    and zero padding on small maps (x0.44 at 2x2), which the per-layer gain formula ignores.
    """
    series = []
    for c in deepest(study.cells, bn=False):
        t = representative(c)
        if t is not None:
            measured, predicted, how = _predicted(t)
            if measured and predicted:
                series.append((c, t, measured, predicted, how))
    if not series:
        raise Skip("no plain (no-BN) VGG trial has measured and predicted per-layer activation std")
    inits = sorted({c.init for c, *_ in series}, key=init_sort)
    fig = _new_figure(11, 3.8)
    ax, ax_ratio = fig.subplots(1, 2)
    hows, ratios = set(), {}
    for c, t, measured, predicted, how in series:
        hows.add(how)
        color, dx, marker = _color(c.init, inits), _offset(c.init, inits), _INIT_MARKERS.get(c.init, "o")
        ax.plot(*_positive(measured, dx), color=color, lw=1.8, marker=marker, ms=3, label=f"{c.init} measured")
        ax.plot(*_positive(predicted, dx), color=color, lw=1.2, ls="--", label=f"{c.init} predicted")
        pred = {k: v for _, k, v in predicted}
        ratio = [(i, k, v / pred[k] if math.isfinite(pred.get(k, math.nan)) and pred[k] > 0 else math.nan)
                 for i, k, v in measured]
        ratios[c.init] = ratio
        ax_ratio.plot(*_positive(ratio, dx), color=color, lw=1.5, marker=marker, ms=4, label=c.init,
                      alpha=0.85)
    where = model_label(series[0][0].model, series[0][0].depth)
    ax.set_yscale("log")
    when = "at init" if hows == {"init"} else "after epoch 1 (no step-0 values)"
    ax.set_title(f"{where}, no BN: activation std per layer, measured {when}", fontsize=10)
    ax.set_ylabel("std of the layer's output")
    ax_ratio.set_yscale("log")
    ax_ratio.axhline(1.0, color="black", lw=0.8)
    ax_ratio.set_title("measured / predicted")
    for a in (ax, ax_ratio):
        a.set_xlabel(LAYER_AXIS)
        _layer_ticks(a)
        a.grid(True, which="major", alpha=0.3)
        a.legend(fontsize=7, loc="best")
    fig.tight_layout()
    notes = [] if hows == {"init"} else ["measured values from: " + "; ".join(sorted(hows))]
    same = _coinciding(ratios)
    if same:
        notes.append("the measured/predicted ratio of " + "; ".join(f"{a} and {b}" for a, b in same)
                     + " agree within 5% at every layer: their lines coincide (each init is shifted "
                     "sideways by up to ±0.12 of a layer and has its own marker, so both stay visible)")
    elif len(inits) > 1:
        notes.append("each init is shifted sideways by up to ±0.12 of a layer so that no line hides another")
    return _save(fig, path), "; ".join(notes)


def fig_curves(study: Study, path: Path) -> Path:
    """Training loss per epoch, one panel per model: a stall is a flat line on ln C."""
    with_data = [c for c in study.cells if any(finite(e.get("train_loss")) for t in c.trials for e in t.epochs)]
    if not with_data:
        raise Skip("no trial has reported an epoch yet")
    ln_c = study.ln_c
    groups = sorted({(c.model, c.depth) for c in with_data}, key=lambda r: row_sort(*r))
    inits = sorted({c.init for c in with_data}, key=init_sort)
    ncols = min(4, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = _new_figure(3.4 * ncols + 0.5, 3.0 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    top = ln_c * 1.6
    for ax, (model, depth) in zip(axes.flat, groups):
        for c in (c for c in with_data if c.model == model):
            color, style = _color(c.init, inits), "--" if c.bn else "-"
            best_of_seed = {id(r.best) for r in c.replicates if r.best is not None}
            for t in c.trials:
                xs = [int(num(e.get("epoch", n + 1))) for n, e in enumerate(t.epochs)]
                ys = [num(e.get("train_loss")) for e in t.epochs]
                ys = [min(y, top) if math.isfinite(y) else math.nan for y in ys]
                best = id(t) in best_of_seed
                # Each seed's best lr carries the line; the other lrs stay faint, for the spread.
                ax.plot(xs, ys, color=color, ls=style, lw=1.8 if best else 0.8, alpha=1.0 if best else 0.3,
                        marker="o" if best and len(xs) == 1 else None)
        ax.axhline(ln_c, color="black", lw=0.8, ls=":")
        ax.text(1.0, ln_c / top, "ln C ", transform=ax.transAxes, va="bottom", ha="right", fontsize=7)
        ax.set_title(model_label(model, depth), fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, top)
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("train loss")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=_color(i, inits), lw=2, label=i) for i in inits]
    handles += [Line2D([], [], color="gray", ls="-", label="no BN"),
                Line2D([], [], color="gray", ls="--", label="BN")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("Training loss (bold: each seed's best lr in the cell; faint: the other lrs; clipped at "
                 "1.6 ln C)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, path)
