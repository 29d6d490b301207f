"""The generated findings (summary.md), every sentence computed from the study model.

Counts are the export's: outcomes are counted by the recorded ``outcome`` (a pruned trial at chance is
"pruned", and said to be at chance); accuracies are the seeds' best trials' export numbers. A verdict
is never stated without its count ("trains in 3/3 seeds"), and layers are named as the metrics name
them (l00 is the first weight layer).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

from sweeper.outcomes import NOT_TRAINED, OUTCOMES, SIGNAL_COLLAPSE, TRAINED_OVER_CHANCE, trained_bar
from sweeper.report.study import (
    DERIVED,
    FLOOR_TEXT,
    LAYER_KEY,
    Cell,
    Study,
    cell_label,
    init_sort,
    model_label,
    row_sort,
)

# ---- formatting ----------------------------------------------------------------------------------------


def pct(x: float) -> str:
    return f"{x:.1%}" if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def bar_text(chance: float) -> str:
    """The trained bar in words (:func:`sweeper.outcomes.trained_bar`): "2× chance (20%)"."""
    bar = trained_bar(chance)
    if bar < TRAINED_OVER_CHANCE * chance:
        return f"halfway from chance to 100% ({bar:.0%})"
    return f"{TRAINED_OVER_CHANCE:g}× chance ({bar:.0%})"


def lr_text(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else "?"  # as trial names: 0.1538 and 0.1524 differ


def join(items: Iterable[Any]) -> str:
    items = [str(i) for i in items]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


COLLAPSE_TEXT = f"{SIGNAL_COLLAPSE:.0e}".replace("e-0", "e-")  # 1e-3, as the science notes write it


def sci(x: float) -> str:
    """1.6e-5 rather than 1.6e-05: the way the science notes write small numbers."""
    if not math.isfinite(x) or x == 0:
        return str(x)
    if 1e-3 <= abs(x) < 100:
        return f"{x:.2g}"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def layer_range(n: int) -> str:
    """``l00–l08`` for 9 measured layers: the metrics' own numbering."""
    return f"l00–l{n - 1:02d}" if n > 1 else "l00"


def outcome_counts_text(study: Study) -> str:
    """``10 completed, 5 pruned (2 at chance), 3 stalled``: export's `outcome` column, counted."""
    counts = study.outcome_counts()
    order = [o for o in OUTCOMES if counts[o]] + sorted(o for o in counts if o not in OUTCOMES)
    parts = []
    for o in order:
        text = f"{counts[o]} {o}"
        if o == "pruned" and study.pruned_at_chance():
            text += f" ({study.pruned_at_chance()} at chance)"
        parts.append(text)
    return ", ".join(parts)


def lr_clause(study: Study) -> str:
    """How lr varies, as the header's aside: sampled within cells, a grid axis (said by the axes
    already), or one value throughout."""
    if any(len({t.lr for t in c.trials if math.isfinite(t.lr)}) > 1 for c in study.cells):
        return "; lr sampled within each"
    if "optim.lr" in study.axes:
        return ""
    lrs = {t.lr for t in study.trials if math.isfinite(t.lr)}
    return f"; lr {lr_text(lrs.pop())} throughout" if len(lrs) == 1 else ""


def seeds_text(c: Cell, verdict: str) -> str:
    return f"{c.count(verdict)}/{c.n} seed{'s' if c.n > 1 else ''}"


def accuracy_text(c: Cell) -> str:
    """Best (per seed, mean and range), final and test accuracy of the seeds' best trials."""
    per = c.per_seed("acc")
    mean, lo, hi, _ = c.stats("acc")
    if c.n == 1:
        text = f"best {pct(per[0])}"
    else:
        text = (f"best per seed {', '.join(pct(v) for v in per)} (mean {pct(mean)}, range "
                f"{pct(lo)}–{pct(hi)})")
    avg = "" if c.n == 1 else "mean "
    final, _, _, final_n = c.stats("final")
    test, _, _, test_n = c.stats("test")
    if final_n:
        text += f"; final {avg}{pct(final)}"
    if test_n:
        text += f"; test {avg}{pct(test)}" + (f" ({test_n}/{c.n} seeds)" if test_n < c.n else "")
    else:
        text += "; test n/a (none recorded for the seeds' best trials)"
    return text


def _where(c: Cell) -> str:
    return model_label(c.model, c.depth)


def _unique_rows(cells: list[Cell]) -> list[Cell]:
    seen, out = set(), []
    for c in sorted(cells, key=lambda c: row_sort(c.model, c.depth)):
        if c.model not in seen:
            seen.add(c.model)
            out.append(c)
    return out


# ---- sections ------------------------------------------------------------------------------------------


def verdict_lines(study: Study) -> list[str]:
    """One line per cell: its verdict with its count, its accuracies (best, final, test)."""
    # Outside the depth x init x BN view there is no "Stalled cells" section: say here whether an
    # intervention checked a stalled cell's cause (a lr sweep's report never said it).
    return [f"- **{cell_label(c, study.view)}** (n={c.n}): {c.verdict()}; {accuracy_text(c)}."
            + ("" if study.view or not (c.stalled or c.mixed) else cause_check_text(c))
            for c in study.cells]


def stalled_lines(study: Study) -> list[str]:
    lines = []
    for c in (c for c in study.cells if c.stalled or c.mixed):
        lrs = sorted(t.lr for t in c.trials if math.isfinite(t.lr))
        lr_span = (f" at every lr tried ({lr_text(lrs[0])}–{lr_text(lrs[-1])})" if len(lrs) > 1 and c.stalled
                   else f" at lr {lr_text(lrs[0])}" if len(lrs) == 1 else "")
        counts = ", ".join(f"{r} ×{n}" if n > 1 else r for r, n in c.reasons.most_common())
        line = (f"- **{cell_label(c, study.view)}**: stalls in {seeds_text(c, 'stalled')} ({c.reason}; "
                f"trials: {counts}){lr_span}; best {pct(c.stats('acc')[0])}"
                + (" (mean over seeds)" if c.n > 1 else "") + ".")
        if not c.bn and c.signal_source:
            when = "at init" if c.signal_source == "init" else "after epoch 1 (no step-0 values recorded)"
            measured = f"{layer_range(c.signal_layers)} measured"
            if c.signal_layer:
                line += (f" {when.capitalize()} the activation std falls below {FLOOR_TEXT} of l00's at "
                         f"`{c.signal_layer}` ({measured}).")
            elif math.isfinite(c.signal_low) and c.signal_low > 0:
                line += (f" {when.capitalize()} the activation std stays above {FLOOR_TEXT} of l00's; its "
                         f"lowest is {sci(c.signal_low)} of it at `{c.signal_low_layer}`"
                         + (f" (a {sci(1 / c.signal_low)}-fold loss, past the {COLLAPSE_TEXT} at "
                            f"which the diagnostics call the signal vanished; {measured})."
                            if c.signal_low < SIGNAL_COLLAPSE
                            else f" ({measured})."))
        lines.append(line + cause_check_text(c))
    return lines


def cause_check_text(c: Cell) -> str:
    """Whether the cell's named cause was checked by intervention (sweeper.counterfactual), from the
    trials that carry that cause: the runs' own sentence, or why none ran."""
    if c.reason in DERIVED:
        return ""
    checks = [t.cause_check for t in c.trials if t.label == c.reason and t.cause_check]
    if not checks:
        return " The cause is named from the measurements only (no intervention recorded)."
    check = checks[0]
    if check.startswith("no counterfactuals: "):
        return (f" The cause is named from the measurements only: no intervention ran "
                f"({check[len('no counterfactuals: '):]}).")
    return f" Checked by intervention: {check}."


def by_init_lines(study: Study) -> list[str]:
    """Per BN setting and init: at which models it trains, in how many seeds, with the mean best."""
    cells, lines = study.cells, []
    for bn in sorted({c.bn for c in cells}):
        parts = []
        group = [c for c in cells if c.bn == bn]
        for init in sorted({c.init for c in group}, key=init_sort):
            own = sorted((c for c in group if c.init == init), key=lambda c: row_sort(c.model, c.depth))
            ok = [c for c in own if c.trained]
            bad = [c for c in own if c.stalled]
            mixed = [c for c in own if c.mixed]
            run = [c for c in own if c.outcome == "running" and not c.stopped]
            halted = [c for c in own if c.stopped]
            accs = join(f"{_where(c)}: {pct(c.stats('acc')[0])} in {seeds_text(c, 'trained')}" for c in ok)
            every = "every depth" if len({c.model for c in own}) > 1 else "its one depth"
            if ok and not bad and not run and not mixed and not halted:
                text = f"{init} trains at {every} ({accs})"
            elif bad and not ok and not run and not mixed and not halted:
                text = (f"{init} stalls at {every} (" + join(f"{_where(c)} in {seeds_text(c, 'stalled')}: "
                                                             f"{c.reason}" for c in bad) + ")")
            else:
                bits = []
                if ok:
                    bits.append(f"trains at {accs}")
                if mixed:
                    bits.append("depends on the seed at " + join(
                        f"{_where(c)} (trains in {seeds_text(c, 'trained')}, stalls in "
                        f"{seeds_text(c, 'stalled')})" for c in mixed))
                if bad:
                    bits.append("stalls at " + join(f"{_where(c)} in {seeds_text(c, 'stalled')}: {c.reason}"
                                                    for c in bad))
                if run:
                    bits.append(f"is still running at {join(_where(c) for c in run)}")
                if halted:
                    bits.append(f"was stopped before its end at {join(_where(c) for c in halted)}")
                text = f"{init} " + " but ".join(bits)
            parts.append(text)
        lines.append(f"- {'With BN' if bn else 'Without BN'}: " + ". ".join(parts) + ".")
    return lines


def _each(cells: list[Cell]) -> str:
    """``3/3 seeds each`` when every cell trained in all of its n seeds, else each cell's count."""
    ns = {(c.count("trained"), c.n) for c in cells}
    if len(ns) == 1:
        k, n = ns.pop()
        return f"{k}/{n} seed{'s' if n > 1 else ''} each"
    return "; ".join(f"{_where(c)} {seeds_text(c, 'trained')}" for c in cells)


def fix_lines(study: Study) -> list[str]:
    """What made stalled plain cells train, read from the cells only (never assumed)."""
    cells = study.cells
    by_key = {c.view_key: c for c in cells}
    plain = [c for c in cells if not c.bn]
    stalled = [c for c in plain if c.stalled]
    lines = []
    if not plain:
        return ["- The sweep has no plain (no-BN) cells, so there is no stall without BN to fix."]
    if not stalled:
        mixed = [c for c in plain if c.mixed]
        if mixed:
            return ["- No plain cell stalled in every seed, so no fix can be read off whole cells; "
                    + "; ".join(f"{cell_label(c)} trains in {seeds_text(c, 'trained')} and stalls in "
                                f"{seeds_text(c, 'stalled')} ({c.reason})" for c in mixed) + "."]
        return ["- No plain cell stalled, so there was nothing to fix."]
    plain_rows = _unique_rows(plain)
    # Another init, same model, still without BN.
    for init in sorted({c.init for c in plain}, key=init_sort):
        own = {c.model: c for c in plain if c.init == init}
        rescued = [s for s in stalled if s.init != init and s.model in own and own[s.model].trained]
        if not rescued:
            continue
        others = join(sorted({s.init for s in rescued}, key=init_sort))
        if all(r.model in own and own[r.model].trained for r in plain_rows):
            every = "every depth" if len(plain_rows) > 1 else "the sweep's one depth"
            lines.append(f"- **{init} init trains at {every}** in the sweep without BN "
                         f"({join(_where(r) for r in plain_rows)}; in {_each(list(own.values()))}), "
                         f"including where {others} stalled.")
        else:
            fails = [_where(r) for r in plain_rows if r.model in own and own[r.model].stalled]
            tail = f", but itself stalls at {join(fails)}" if fails else ""
            where = join(_where(s) for s in _unique_rows(rescued))
            lines.append(f"- {init} init (no BN) trains at {where} where {others} stalled{tail}.")
    # The same cell with BatchNorm.
    bn_cells = [c for c in cells if c.bn]
    if not bn_cells:
        lines.append("- The sweep has no BatchNorm cells: whether BN fixes the stalls is not tested here.")
    else:
        counterpart = [(s, by_key.get((s.model, s.init, True))) for s in stalled]
        tested = [(s, b) for s, b in counterpart if b is not None]
        fixed = [s for s, b in tested if b.trained]
        still = [b for b in bn_cells if b.stalled]
        inits = sorted({c.init for c in cells}, key=init_sort)
        every_init = all((r.model, i, True) in by_key for r in plain_rows for i in inits)
        if not still and every_init and all(b.trained for b in bn_cells):
            every = "every depth" if len(plain_rows) > 1 else "the sweep's one depth"
            which = "every init" if len(inits) > 1 else f"{inits[0]} init"  # one init: no "every"
            lines.append(f"- **BatchNorm trains {which} at {every}** ({join(inits)}; "
                         f"{join(_where(r) for r in plain_rows)}; in {_each(bn_cells)})"
                         + (f": it fixed all {len(fixed)} stalled plain cells it was tested on."
                            if len(fixed) > 1 else
                            ": it fixed the one stalled plain cell it was tested on." if fixed
                            else "."))
        elif tested:
            lines.append(f"- BatchNorm made {len(fixed)} of {len(tested)} stalled plain cells train in every "
                         "seed" + (f" ({'; '.join(cell_label(s) for s in fixed)})" if fixed else "") + ".")
        if still:
            lines.append("- With BatchNorm still stalled: "
                         + "; ".join(f"{cell_label(b)} ({b.reason}; {seeds_text(b, 'stalled')})" for b in still)
                         + ".")
        untested = [s for s, b in counterpart if b is None]
        if untested:
            lines.append("- Not run with BN: " + "; ".join(cell_label(s) for s in untested) + ".")
    # A cell that trained in some seeds (mixed) trained there too: "nothing trained at vgg16" beside
    # "vgg16, he: trains in 1/2 seeds" contradicted it.
    unfixed = [s for s in stalled
               if not any(c.trained or c.mixed for c in cells if c.model == s.model and c is not s)]
    if unfixed:
        lines.append("- Nothing in the sweep trained at: " + "; ".join(_where(s) for s in _unique_rows(unfixed))
                     + ".")
    return lines


def lr_lines(study: Study, limit: int = 8) -> list[str]:
    """Trained cells in which some lr stalled with a named cause: the lr, not the init, failed there."""
    lines = []
    for c in (c for c in study.cells if c.trained):
        failed = [t for t in c.trials if t.label and t.label not in ("at_chance", "slow", "no_data")]
        best = c.best
        if failed and best:
            def seed(t, n=c.n):
                return f", seed {t.seed}" if n > 1 else ""

            lines.append(f"- {cell_label(c, study.view)}: trains at lr {lr_text(best.lr)}{seed(best)} "
                         f"({pct(best.acc)}) but "
                         + join(f"lr {lr_text(t.lr)}{seed(t)} did not ({t.label})"
                                for t in sorted(failed, key=lambda t: t.lr))
                         + ".")
    if len(lines) > limit:
        lines = lines[:limit] + [f"- … and {len(lines) - limit} more cells."]
    return lines


def lr_effect_lines(study: Study, limit: int = 8) -> list[str]:
    """Where lr varies between trials of the same other settings, at which lrs they trained.

    For sweeps outside the depth × init × BN view, and for an lr grid axis (each lr its own cell, so
    :func:`lr_lines`, which looks within a cell, sees one lr each): cells that differ only in lr are
    read together. A trial trained when it has no label (the verdicts' own bar)."""
    groups: dict[tuple, list[Cell]] = {}
    for c in study.cells:
        groups.setdefault(tuple((k, repr(v)) for k, v in c.values.items() if k != "optim.lr"), []).append(c)
    lines = []
    for cells in groups.values():
        trials = [t for c in cells for t in c.trials if math.isfinite(t.lr) and not t.running]
        by_lr: dict[str, list] = {}
        for t in sorted(trials, key=lambda t: t.lr):
            by_lr.setdefault(lr_text(t.lr), []).append(t)
        if len(by_lr) < 2:
            continue
        good = [lr for lr, ts in by_lr.items() if any(not t.label for t in ts)]
        bad = {lr: sorted({t.label for t in ts}) for lr, ts in by_lr.items() if lr not in good}
        scored = [t for t in trials if math.isfinite(t.acc) and not t.label]
        best = max(scored, key=lambda t: t.acc) if scored else None
        # the group as one cell without its lr: model, init and BN as the first cell has them
        where = cell_label(dataclasses.replace(
            cells[0], values={k: v for k, v in cells[0].values.items() if k != "optim.lr"}), study.view)
        span = f"{next(iter(by_lr))}–{list(by_lr)[-1]}"
        if not good:
            causes = sorted({label for labels in bad.values() for label in labels})
            lines.append(f"- {where}: trained at no lr tried ({len(by_lr)} lrs, {span}): {join(causes)}.")
            continue
        best_text = f"best {pct(best.acc)} at lr {lr_text(best.lr)}" if best else ""
        if not bad:
            lines.append(f"- {where}: trained at every lr tried ({len(by_lr)} lrs, {span}); {best_text}.")
            continue
        lines.append(f"- {where}: trained at lr {join(good)} ({best_text}); not at lr "
                     + join(f"{lr} ({', '.join(labels)})" for lr, labels in bad.items()) + ".")
    if len(lines) > limit:
        lines = lines[:limit] + [f"- … and {len(lines) - limit} more."]
    return lines


def best_by_depth_line(study: Study) -> str:
    parts = []
    for r in _unique_rows(study.cells):
        ok = [c for c in study.cells if c.model == r.model and c.trained]
        if ok:
            best = max(ok, key=lambda c: c.stats("acc")[0])
            parts.append(f"{_where(best)}: {pct(best.stats('acc')[0])}"
                         + (f" mean of {best.n} seeds" if best.n > 1 else "")
                         + f" ({best.init}{', BN' if best.bn else ''})")
    return ("- Best trained cell per model, best-epoch validation accuracy (trainable is not the same as "
            "better): " + "; ".join(parts) + "." if parts else "")


def _label_of(t) -> str:
    return t.label or ("trained" if t.outcome not in NOT_TRAINED and math.isfinite(t.acc) else "")


# ---- the summary ---------------------------------------------------------------------------------------


def summary(study: Study, notes: list[str]) -> str:
    meta, trials, cells = study.meta, study.trials, study.cells
    out = [f"# Report: {meta.get('name') or 'sweep'}", ""]
    if not trials:
        out += ["Nothing to show: the record holds no trials yet.", ""]
        return "\n".join(out + [f"- {n}" for n in notes])
    chance, ln_c = study.chance, study.ln_c
    finished = sum(not t.running for t in trials)
    planned = meta.get("planned_trials")
    of_planned = f" of {planned} planned" if planned else ""
    axes = " × ".join(a.split(".")[-1] for a in study.axes) or "none: one cell"
    ns = sorted({c.n for c in cells})
    seeds = (f"n = {ns[0]} seed{'s' if ns[0] > 1 else ''} per cell" if len(ns) == 1
             else f"n = {ns[0]}–{ns[-1]} seeds per cell")
    if ns == [1]:
        seeds += " (every verdict below is a single run)"
    out.append(f"{len(trials)} trials recorded ({finished} finished{of_planned}) in {len(cells)} "
               f"cell{'s' if len(cells) != 1 else ''} "
               f"(grid axes: {axes}{lr_clause(study)}), {seeds}. Chance is {chance:.0%} "
               f"({study.num_classes} classes from {study.classes_from}; ln C = {ln_c:.4f}); a seed of a "
               f"cell trains when one of its trials whose outcome is not "
               f"{'/'.join(sorted(NOT_TRAINED))} reached more than {bar_text(chance)} "
               f"validation accuracy at any lr; a cell's verdict "
               f"counts its seeds.")
    out += ["", f"Outcomes, one per trial as recorded (the `outcome` column of `sweeper export`, MLflow's "
                f"`sweeper.outcome`): {outcome_counts_text(study)}.", "",
            "Accuracy: *best* is the validation accuracy of a trial's best epoch (what lr and seeds are "
            "selected on), *final* its last epoch's, *test* the test split's after the last epoch of a "
            "trial that ran its budget; per cell, each seed's best trial speaks for the seed."]
    if not any(t.epochs for t in trials):
        out += ["", "Nothing to show yet: no trial has reported an epoch."]
    out += ["", "## Verdict per cell", ""] + verdict_lines(study)
    if study.view:
        out += ["", "## Stalled cells", ""]
        out += stalled_lines(study) or ["- No cell stalled: every finished cell has a trial above the "
                                        "trained bar in every seed."]
        running = [c for c in cells if c.outcome == "running" and not c.stopped]
        if running:
            out.append("- Not judged yet (still running, not above the bar): "
                       + "; ".join(cell_label(c) for c in running) + ".")
        halted = [c for c in cells if c.stopped]
        if halted:
            out.append("- Not judged (stopped before its end: the sweep was interrupted, and a resume "
                       "runs it again): " + "; ".join(cell_label(c) for c in halted) + ".")
        out += ["", "## Which cells train", ""] + by_init_lines(study)
        best_line = best_by_depth_line(study)
        if best_line:
            out.append(best_line)
        out += ["", "## What fixed it", ""] + fix_lines(study)
        lines = lr_lines(study)
        if lines:
            out += ["", "## Learning rate within trained cells", ""] + lines
    else:
        out += ["", f"The depth × init × BatchNorm findings need those axes; this sweep's cells vary "
                    f"{', '.join(study.axes) or 'nothing (one cell)'}."]
    if not study.view or "optim.lr" in study.axes:
        lines = lr_effect_lines(study)
        if lines:
            out += ["", "## Learning rate", ""] + lines
    if notes:
        out += ["", "## Notes on the data", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def layer_number(key: str | None) -> str:
    """``l06`` for ``l06_conv``: the metrics' numbering, from 0."""
    match = LAYER_KEY.match(key or "")
    return f"l{int(match.group(1)):02d}" if match else "?"
