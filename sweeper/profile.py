"""One trial's per-layer profile, init vs now, as one small PNG and a handful of scalars.

MLflow's UI draws each per-layer metric as its own autoscaled linear chart: a signal that shrinks ~10x
per layer reads 0 on every axis from the sixth layer on, and nothing lines the layers up. This module
puts the layers side by side instead, in network order on the x axis (``l00``, ``l01``, ... : the metric
suffixes), on a log scale where the quantity spans decades:

====================  ======  =====================================================================
panel                 scale   lines
====================  ======  =====================================================================
activation std        log     at init, now, and He et al.'s prediction at init (``act_std_pred``)
gradient norm         log     at init, now
update ratio          log     the first optimizer step (init), the last one (now)
dead fraction         linear  at init, now; 0..1
gain                  log     predicted and measured at init, measured now; 1 = signal preserved
summary               --      :func:`profile_summary`, as text
====================  ======  =====================================================================

Inputs are the flat metric dicts a trial reports: ``initial`` holds step 0 (either the first epoch's
report, whose step-0 values carry the prefix ``init/``, or those values with the prefix already
removed), ``last`` the last epoch's report. Missing families leave their panel saying so. Only the
main path (``lNN_*``) is drawn: auxiliary heads (``aNN_*``) are no place on a depth axis.

Rendering uses matplotlib's object API on the Agg canvas (no pyplot, no global state), so it is safe
in the tracker's delivery thread. This module imports neither Ray nor MLflow.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

__all__ = ["FAMILIES", "layer_keys", "layer_profile", "profile_summary"]

# The per-layer metric families the profile reads (what Tracker.log_figure spools, nothing more).
FAMILIES = ("act_std", "act_std_pred", "grad_norm", "update_ratio", "dead_frac", "gain_pred",
            "gain_meas")
_INIT = "init/"
_LAYER = re.compile(r"^l(\d+)_")  # main-path layers: l03_conv; a00_conv is an auxiliary head
_SIZE_IN, _DPI = (8.0, 6.0), 100  # 800 x 600 px: ~60-100 kB, cheap to upload per trial


# ---- inputs ---------------------------------------------------------------------------------------

def _step0(initial: Mapping[str, Any]) -> dict[str, Any]:
    """The step-0 values: the ``init/`` part of a first report, or the dict as it is."""
    stripped = {k[len(_INIT):]: v for k, v in initial.items() if k.startswith(_INIT)}
    return stripped or {k: v for k, v in initial.items()}


def _now(last: Mapping[str, Any]) -> dict[str, Any]:
    """The last epoch's own values (a first report also carries step 0 under ``init/``)."""
    return {k: v for k, v in last.items() if not k.startswith(_INIT)}


def layer_keys(*metric_dicts: Mapping[str, Any]) -> list[str]:
    """Main-path layer suffixes found in any per-layer family, in network (numeric) order:
    ``l9_conv`` < ``l10_conv`` < ``l100_fc`` whatever the dicts' order or the digits' width."""
    found: dict[str, int] = {}
    for metrics in metric_dicts:
        for key in metrics:
            family, _, layer = key.removeprefix(_INIT).partition("/")
            m = _LAYER.match(layer)
            if family in FAMILIES and m:
                found[layer] = int(m.group(1))
    return sorted(found, key=lambda k: (found[k], k))


def _number(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    try:  # the record writes NaN/inf as strings
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _series(metrics: Mapping[str, Any], family: str, keys: list[str]) -> list[float] | None:
    """Values per layer (NaN where a layer lacks it); None when the family is absent."""
    if not any(f"{family}/{k}" in metrics for k in keys):
        return None
    return [_number(metrics.get(f"{family}/{k}", math.nan)) for k in keys]


# ---- scalars --------------------------------------------------------------------------------------

def profile_summary(initial: Mapping[str, Any], last: Mapping[str, Any]) -> dict[str, float]:
    """A handful of scalars that say at a glance where a trial's signal went.

    ``profile/act_std_ratio_last_first``      act std of the last layer / the first, at init
                                              (~1e-10: the forward signal vanished; ~1: preserved)
    ``profile/act_std_ratio_last_first_now``  the same after the last epoch
    ``profile/grad_norm_ratio_first_last``    grad norm of the first layer / the last, at init
                                              (<< 1: the first layers get no gradient)
    ``profile/gain_meas_geomean``             geometric mean of the measured per-layer gain at init
                                              (the factor E[y^2]/E[x^2] per layer; 1 is preserved)
    ``profile/min_update_ratio``              the smallest per-layer update ratio now (a frozen layer)
    ``profile/max_update_ratio``              the largest (>~1e-2: steps too large for the weights)
    ``profile/max_dead_frac``                 the largest dead-unit fraction now

    A key is left out when its inputs are missing or not finite; values are plain floats.
    """
    init, now = _step0(initial), _now(last)
    keys = layer_keys(init, now)
    out: dict[str, float] = {}

    def finite(values: list[float] | None) -> list[float]:
        return [v for v in values or [] if math.isfinite(v)]

    def ratio(name: str, values: list[float] | None, first_over_last: bool) -> None:
        if not values or not math.isfinite(values[0]) or not math.isfinite(values[-1]):
            return
        num, den = (values[0], values[-1]) if first_over_last else (values[-1], values[0])
        if den > 0:
            out[name] = float(num / den)

    if len(keys) >= 1:
        ratio("profile/act_std_ratio_last_first", _series(init, "act_std", keys), False)
        ratio("profile/act_std_ratio_last_first_now", _series(now, "act_std", keys), False)
        ratio("profile/grad_norm_ratio_first_last", _series(init, "grad_norm", keys), True)
        gains = [g for g in finite(_series(init, "gain_meas", keys)) if g > 0]
        if gains:
            out["profile/gain_meas_geomean"] = float(math.exp(sum(map(math.log, gains)) / len(gains)))
        updates = finite(_series(now, "update_ratio", keys))
        if updates:
            out["profile/min_update_ratio"] = float(min(updates))
            out["profile/max_update_ratio"] = float(max(updates))
        dead = finite(_series(now, "dead_frac", keys))
        if dead:
            out["profile/max_dead_frac"] = float(max(dead))
    return out


# ---- the figure -----------------------------------------------------------------------------------

def _positive(values: list[float]) -> list[float]:
    """A log axis can show neither 0 nor a negative nor NaN: those become gaps."""
    return [v if math.isfinite(v) and v > 0 else math.nan for v in values]


def _figure(initial: Mapping[str, Any], last: Mapping[str, Any], *, title: str | None = None):
    """The profile as a matplotlib Figure on an Agg canvas (not saved; the tests inspect it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    init, now = _step0(initial), _now(last)
    keys = layer_keys(init, now)
    x = list(range(len(keys)))
    epoch = now.get("epoch")
    now_label = f"epoch {int(_number(epoch))}" if math.isfinite(_number(epoch)) else "now"

    # A fixed layout, not layout="constrained": delivery renders one profile per trial in the
    # driver's process, and the constrained solver's extra draw took half of a ~2 s render (measured
    # on the 2-core machine, 2026-11-27), time the GIL held Tune's controller ("process_trial_result
    # took 0.9 s"). The margins fit 90-degree layer names ("l16_fc") at the figure's fixed size.
    fig = Figure(figsize=_SIZE_IN, dpi=_DPI)
    fig.subplots_adjust(left=0.07, right=0.985, top=0.91, bottom=0.14, wspace=0.34, hspace=0.5)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3, sharex=True)
    fig.suptitle(title or f"per-layer profile: init vs {now_label}", fontsize=10)

    # (axes, title, log?, [(metrics, family, label, style)], reference line)
    panels = [
        (axes[0, 0], "activation std", True,
         [(init, "act_std", "init", "C0--"), (now, "act_std", now_label, "C0-"),
          (init, "act_std_pred", "predicted (init)", "k:")], None),
        (axes[0, 1], "gradient norm", True,
         [(init, "grad_norm", "init", "C1--"), (now, "grad_norm", now_label, "C1-")], None),
        (axes[0, 2], "update ratio |dW|/|W|", True,
         [(init, "update_ratio", "first step", "C2--"), (now, "update_ratio", now_label, "C2-")],
         None),
        (axes[1, 0], "dead fraction", False,
         [(init, "dead_frac", "init", "C3--"), (now, "dead_frac", now_label, "C3-")], None),
        (axes[1, 1], "gain E[y²]/E[x²]", True,
         [(init, "gain_pred", "predicted (init)", "k:"), (init, "gain_meas", "measured (init)", "C4--"),
          (now, "gain_meas", f"measured ({now_label})", "C4-")], 1.0),
    ]
    for ax, name, log, lines, reference in panels:
        ax.set_title(name, fontsize=9)
        drawn = 0
        for metrics, family, label, style in lines:
            values = _series(metrics, family, keys)
            if values is None:
                continue
            ax.plot(x, _positive(values) if log else values, style, marker=".", markersize=3,
                    linewidth=1, label=label)
            drawn += 1
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.02, 1.02)
        if reference is not None and drawn:
            ax.axhline(reference, color="0.6", linewidth=0.6, zorder=0)
        if drawn:
            ax.legend(fontsize=6, loc="best", frameon=False)
        else:
            ax.text(0.5, 0.5, "not reported", transform=ax.transAxes, ha="center", va="center",
                    fontsize=8, color="0.5")
        ax.grid(True, which="major", linewidth=0.3, alpha=0.5)
        ax.tick_params(labelsize=6)

    # The x axis: every layer's suffix while they fit, every k-th beyond (~24 labels at most).
    step = max(1, math.ceil(len(keys) / 24))
    for ax in (axes[1, 0], axes[1, 1], axes[0, 2]):  # the bottom of each column that has a chart
        ax.set_xticks(x[::step], [keys[i] for i in x[::step]], rotation=90, fontsize=6)
        ax.tick_params(labelbottom=True)
        ax.set_xlabel("layer (network order)", fontsize=7)
    if keys:
        axes[0, 0].set_xlim(-0.5, len(keys) - 0.5)

    summary = profile_summary(initial, last)
    text_ax = axes[1, 2]
    text_ax.axis("off")
    lines = [f"{k.split('/', 1)[1]}: {v:.3g}" for k, v in summary.items()]
    text_ax.text(-0.1, 1.0, "\n".join(["at a glance (profile/*):", *lines]) if lines
                 else "no per-layer metrics", va="top", ha="left",
                 fontsize=7, family="monospace", transform=text_ax.transAxes)
    return fig


def layer_profile(initial: Mapping[str, Any], last: Mapping[str, Any], path: str | Path, *,
                  title: str | None = None) -> Path:
    """Write the per-layer profile PNG to ``path`` (parents created, written atomically); returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure(initial, last, title=title)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png")
    finally:
        fig.clear()  # not pyplot-managed: nothing global to close, just drop the artists
    tmp.replace(path)
    return path
