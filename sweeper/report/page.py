"""The HTML page: the findings, the cells and outcome tables, the figures (as data URIs), every trial.

Tables state the study model's numbers (which are the export's); nothing here computes a finding.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any

from sweeper.records import SweepRecord
from sweeper.report.figures import DEPTH_AXIS
from sweeper.report.study import FLOOR_TEXT, Study, Trial, cell_label, num
from sweeper.report.text import lr_text, outcome_counts_text, pct, sci

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
figure { margin: 1em 0 2em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .88em; color: #555; } .skip { color: #8a6d00; background: #fff8e1; padding: .4em .8em; }
.meta { color: #555; font-size: .88em; } code { background: #f3f3f3; padding: 0 .25em; }
/* MLflow's artifact pane is ~600 px wide beside its side panel: wide tables scroll inside it. */
div.wide { overflow-x: auto; }
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _md_to_html(text: str) -> str:
    """The summary's small Markdown subset: headings, bullets, **bold**, `code`."""
    out, in_list = [], False

    def inline(s: str) -> str:
        s = _esc(s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        s = re.sub(r"\*([^*]+?)\*", r"<em>\1</em>", s)
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
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f"<div class=\"wide\">{table}</div>"


def _cells_table(study: Study) -> str:
    cells = study.cells
    if not cells:
        return "<p class=\"skip\">No cells: the record holds no trials.</p>"
    view = study.view
    extra = [a for a in study.axes if not (view and a in ("model.arch", "model.depth", "model.init",
                                                             "model.batch_norm"))]
    first = ([DEPTH_AXIS, "init", "BN"] if view else []) + [a.split(".")[-1] for a in extra]
    rows, classes = [], []
    for c in cells:
        signal = (f"{c.signal_layer} ({c.signal_source})" if c.signal_layer else
                  f"never (min {sci(c.signal_low)}, {c.signal_source})" if math.isfinite(c.signal_low) else "")
        mean, lo, hi, _ = c.stats("acc")
        per = ", ".join(pct(v) for v in c.per_seed("acc"))
        keys = ([f"{c.depth} ({c.model})" if c.depth is not None else c.model, c.init,
                 "yes" if c.bn else "no"] if view else []) + [c.values.get(a) for a in extra]
        lrs = ", ".join(lr_text(r.best.lr) if r.best else "?" for r in c.replicates)
        rows.append([*keys, c.n, f"{sum(not t.running for t in c.trials)}/{len(c.trials)}", c.verdict(),
                     pct(mean), per if c.n > 1 else "", f"{pct(lo)}–{pct(hi)}" if c.n > 1 else "",
                     pct(c.stats("final")[0]), pct(c.stats("test")[0]), lrs, c.outcome,
                     ", ".join(f"{r}×{n}" for r, n in c.reasons.most_common()), signal])
        classes.append("trained" if c.trained else "stalled" if c.stalled else "")
    k = len(first)
    return _table([*first, "n (seeds)", "finished/trials", "verdict", "best val acc" + (" (mean)" if any(
        c.n > 1 for c in cells) else ""), "per seed", "range", "final val acc", "test acc", "lr of best",
                   "outcome", "not-trained trials", f"signal < {FLOOR_TEXT} × l00 at"], rows, classes,
                  numeric={k, k + 3, k + 4, k + 5, k + 6, k + 7}, cell_classes={k + 2: "outcome"})


def _outcomes_table(study: Study) -> str:
    counts = study.outcome_counts()
    rows = [[o, n, study.pruned_at_chance() if o == "pruned" else sum(
        t.at_chance for t in study.trials if (t.outcome or "running") == o)] for o, n in counts.items()]
    return (f"<p>One outcome per trial, as recorded (= <code>outcome</code> in <code>sweeper export</code>, "
            f"MLflow tag <code>sweeper.outcome</code>): {_esc(outcome_counts_text(study))}. "
            "<em>at chance</em> (= <code>at_chance</code>, <code>sweeper.at_chance</code>) is a separate "
            "fact: a pruned trial at chance stays pruned.</p>"
            + _table(["outcome", "trials", "of them at chance"], rows, numeric={1, 2}))


def _decisions_table(study: Study) -> str:
    """ASHA's stops, from each trial's recorded ``prune`` (the same as the sweeper.prune.* tags)."""
    pruned = [t for t in study.trials if t.prune]
    if not pruned:
        return "<p>No ASHA stops recorded.</p>"
    ds = sorted(pruned, key=lambda t: (num(t.prune.get("rung")), num(t.prune.get("time")), t.id))
    rows = [[t.name, t.outcome, "yes" if t.at_chance else "no", t.cause, t.prune.get("rung", ""),
             t.prune.get("epoch", ""), f"{num(t.prune.get('value')):.4g}", f"{num(t.prune.get('cutoff')):.4g}",
             t.prune.get("peers", ""), t.prune.get("metric", "")] for t in ds]
    n_pruned = sum(t.outcome == "pruned" for t in pruned)
    other = len(pruned) - n_pruned
    text = (f"<p>{n_pruned} trials have outcome <em>pruned</em>: ASHA stopped each below its rung's cutoff "
            f"(the value the top 1/reduction_factor of its peers at that rung reached)"
            + (f", {study.pruned_at_chance()} of them at chance" if study.pruned_at_chance() else "") + ".")
    if other:
        text += (f" {other} more carry an ASHA decision but ended otherwise (their recorded outcome is in "
                 "the table).")
    return text + "</p>" + _table(["trial", "outcome", "at chance", "cause", "rung", "epoch", "its value",
                                   "cutoff", "peers", "metric"], rows, numeric={4, 5, 6, 7, 8})


def _trials_table(study: Study) -> str:
    def label(t: Trial) -> str:
        return t.label or ("trained" if t.outcome not in ("stalled", "val_collapse", "diverged", "failed")
                           and math.isfinite(t.acc) else "")

    rows = [[t.name, cell_label(c, study.view), t.seed if t.seed is not None else "", lr_text(t.lr), t.status,
             t.outcome or "", "yes" if t.at_chance else "no", t.cause, label(t), len(t.epochs), pct(t.acc),
             pct(t.final), pct(t.test)]
            for c in study.cells for t in c.trials]
    return ("<details><summary>All trials</summary>"
            + _table(["trial", "cell", "seed", "lr", "status", "outcome", "at chance", "cause", "label",
                      "epochs", "best val acc", "final val acc", "test acc"], rows,
                     numeric={3, 9, 10, 11, 12}) + "</details>")


_CAPTIONS = {
    "heatmap": "Best validation accuracy over the learning rates tried (the mean over seeds, with the range "
               "when n > 1), per depth × init, without and with BatchNorm. Rows: the weight layers the "
               "model really has, then the paper's configuration name (vgg19 with the compact head has 17: "
               "16 convs + 1 linear). The mark under each value is the cell's outcome (ok = trained, else "
               "the stall cause; k/n = seeds).",
    "layers_at_init": "Per-layer activation std and weight-gradient norm of the deepest VGG in the sweep, one "
                      "colour and marker per init, solid at init (before any update), dashed after epoch 1; "
                      "layers are numbered l00, l01, ... as the metrics name them. Gaps on the log axis are "
                      "exact zeros.",
    "predicted_vs_measured": "Measured activation std per layer beside He et al.'s prediction (dashed), plain "
                             "nets; right: their ratio (pooling and zero padding are outside the prediction). "
                             "Each init has its own colour and marker and is shifted sideways by a fraction "
                             "of a layer: where two inits' ratios are equal their lines would otherwise lie "
                             "on top of each other.",
    "curves": "Training loss per epoch, one panel per model (weight layers, then its name); colour = "
              "init, dashed = BatchNorm; the dotted line is ln C, where a stalled net sits.",
}


def _figure_html(name: str, title: str, path: Path | None, note: str) -> str:
    if path is None:
        return f"<h3>{_esc(title)}</h3><p class=\"skip\">Figure skipped: {_esc(note)}.</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    extra = f" <em>{_esc(note)}.</em>" if note else ""
    return (f"<h3>{_esc(title)}</h3><figure><img alt=\"{_esc(title)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{_esc(_CAPTIONS.get(name, ''))}{extra}</figcaption></figure>")


def page(study: Study, summary: str, record: SweepRecord,
         figures: list[tuple[str, str, Path | None, str]]) -> str:
    meta, trials = study.meta, study.trials
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
        "<h2>Cells</h2>", _cells_table(study),
        "<h2>Outcomes</h2>", _outcomes_table(study) if trials else "<p>No trials.</p>",
        "<h2>Figures</h2>",
        *(_figure_html(*f) for f in figures),
        "<h2>ASHA decisions</h2>", _decisions_table(study),
        "<h2>Trials</h2>", _trials_table(study) if trials else "<p>No trials.</p>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)
