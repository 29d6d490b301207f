"""One outcome model: how a trial ended, computed once from its record and used everywhere.

The sweep record, the MLflow tags (``sweeper.outcome``, ``sweeper.at_chance``, ``sweeper.cause``),
``sweeper status``, ``sweeper export`` and the study report all read the fields this module computes,
so a filter in the MLflow UI and a count in the report always agree.

Outcomes (each trial has exactly one):

- ``completed``: ran its budget and learned.
- ``pruned``: cut by ASHA before its budget (rung, cutoff, peers and value are in ``prune``). Whether it
  sat at chance when cut is the separate field ``at_chance``, with its ``cause``: a pruned trial is
  never relabelled "stalled", because ASHA, not the trial, ended it.
- ``stalled``: at chance through its last ``stall_epochs`` epochs (or learned, then fell back to chance
  or past it: cause ``learn_then_collapse``, as the diagnostics label it), having run its budget or
  been stopped for it.
- ``late_start``: at chance for at least ``stall_epochs`` epochs in a row, then escaped and learned.
  He et al.'s delayed start of deep Xavier nets is a finding, not noise.
- ``val_collapse``: training learned (loss well below ln C) while validation accuracy stayed at chance.
- ``diverged``: a non-finite training loss ended it.
- ``failed``: it raised after its retries.
- ``stopped``: the sweep was interrupted before this trial ended (it resumes with the sweep).

"At chance" means no better than chance (:func:`no_better_than_chance`, which the diagnostics' stall
test uses too): the training loss not below ln C - ``stall_tolerance`` (C classes; ln C comes from each
epoch's ``chance_loss``), and validation accuracy, where measured, not past the report's "trains" bar.
A loss above ln C is worse than guessing, not learning: a dead VGG-19 that went 2.296, 2.444, 2.308,
2.303 (validation 11.8%) was "completed" while the band was two-sided. Validation past the bar is
learning whatever the training loss says: a VGG-16 at loss 2.27-2.31 reached 28.5% and was "stalled".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

__all__ = ["OUTCOMES", "Outcome", "classify", "NOT_TRAINED", "SIGNAL_COLLAPSE", "TRAINED_OVER_CHANCE",
           "run_at_end", "trained_bar",
           "no_better_than_chance"]

OUTCOMES = ("completed", "pruned", "stalled", "late_start", "val_collapse", "diverged", "failed",
            "stopped")
# Outcomes whose best accuracy does not count as "this configuration trains".
NOT_TRAINED = frozenset({"stalled", "val_collapse", "diverged", "failed"})
# A trial "trained" when its validation accuracy beat chance (1/C) by this factor: the report's bar for
# "trains", and the diagnostics' for having learned something a collapse then lost.
TRAINED_OVER_CHANCE = 2.0


def trained_bar(chance: float) -> float:
    """The validation accuracy a trial must pass to have trained, for chance accuracy 1/C:
    TRAINED_OVER_CHANCE x chance, or halfway from chance to 100% where that is lower (C <= 3; with
    two classes 2x chance is 100%, which no trial passes, so none would ever have trained)."""
    return min(TRAINED_OVER_CHANCE * chance, (1.0 + chance) / 2)


# The smallest main-path activation std over the first layer's below this: the forward signal died
# (the diagnostics' cause vanishing_signal, and the report's account of it).
SIGNAL_COLLAPSE = 1e-3
# Training loss this far below ln C is "learning" (validation collapse needs it).
_LEARNED_MARGIN = 0.5
# Validation accuracy within this many points of 1/C is "at chance" for validation collapse.
_VAL_CHANCE_MARGIN = 0.05


@dataclass(frozen=True)
class Outcome:
    outcome: str
    reason: str | None  # one sentence, for people (status table, MLflow description)
    at_chance: bool  # no better than chance at the trial's last epoch (see no_better_than_chance)
    cause: str | None  # why it sat at chance (vanishing_signal, dead_relu, lr_too_high, ...)
    chance_epochs: int  # epochs at chance in total

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def classify(epochs: Sequence[Mapping[str, Any]], *, decision: Mapping[str, Any] | None = None,
             error: str | None = None, finished: bool = True, stall_epochs: int = 3, stall_tolerance: float = 0.05,
             metric: str = "val_accuracy") -> Outcome:
    """The outcome of one trial from its per-epoch results (in epoch order) and how it ended."""
    last = epochs[-1] if epochs else {}
    flags = [_at_chance(e, stall_tolerance, epochs[i - 1] if i else None) for i, e in enumerate(epochs)]
    chance_epochs = sum(1 for f in flags if f)
    at_chance = bool(flags and flags[-1])
    cause = _cause(epochs) if at_chance else None
    longest = _longest_run(flags)

    if error is not None:
        return Outcome("failed", error, at_chance, cause, chance_epochs)
    if last.get("outcome") == "diverged" or _nonfinite(last.get("train_loss")):
        reason = last.get("stop_reason") or f"non-finite training loss in epoch {last.get('epoch')}"
        return Outcome("diverged", reason, False, None, chance_epochs)
    if decision is not None:
        state = (f"; at chance ({cause})" if cause else "; at chance") if at_chance else ""  # never "(None)"
        tie = decision.get("tie_break")
        if tie:
            reason = (f"ASHA rung {decision.get('rung')}: {metric}={_fmt(decision.get('value'))} tied "
                      f"with the cutoff of {decision.get('peers')} peers, and {tie.get('metric')}="
                      f"{_fmt(tie.get('value'))} worse than the tied peers' cutoff "
                      f"{_fmt(tie.get('cutoff'))}{state}")
        else:
            reason = (f"ASHA rung {decision.get('rung')}: {metric}={_fmt(decision.get('value'))} "
                      f"below cutoff {_fmt(decision.get('cutoff'))} of {decision.get('peers')} "
                      f"peers{state}")
        return Outcome("pruned", reason, at_chance, cause, chance_epochs)
    if not finished:
        return Outcome("stopped", "stopped before its budget (the sweep was interrupted)",
                       at_chance, cause, chance_epochs)
    if at_chance and (run_at_end(flags) >= min(stall_epochs, len(flags))
                      or last.get("stalled")):
        what = "fell back to chance after learning" if cause == "learn_then_collapse" else \
            f"at chance through its last {run_at_end(flags)} epoch(s)"
        return Outcome("stalled", f"{what} ({cause})" if cause else what, True, cause,
                       chance_epochs)
    if last.get("stalled") and last.get("stall_reason") == "learn_then_collapse":
        return Outcome("stalled", "fell back to chance after learning (learn_then_collapse)", True,
                       "learn_then_collapse", chance_epochs)
    if _val_collapsed(last, stall_tolerance):  # before late_start: what it ended as comes first
        return Outcome("val_collapse", "training learned (loss "
                       f"{_fmt(last.get('train_loss'))}) while validation stayed at chance "
                       f"(accuracy {_fmt(last.get('val_accuracy'))})", False, None, chance_epochs)
    if longest >= stall_epochs and not at_chance:
        start = _run_end_epoch(epochs, flags)
        # The count is chance_epochs, export's column (all epochs at chance): the longest stretch
        # alone, which decides late_start, read "3" beside an exported 5 when there were two.
        apart = "" if longest == chance_epochs else " (not all in a row)"
        return Outcome("late_start", f"at chance for {chance_epochs} epochs{apart}, then escaped "
                       f"after epoch {start}", False, _cause_of_run(epochs, flags), chance_epochs)
    return Outcome("completed", None, at_chance, cause, chance_epochs)


# ---- helpers ----------------------------------------------------------------------------------------


def _chance(epoch: Mapping[str, Any]) -> float | None:
    value = epoch.get("chance_loss")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def no_better_than_chance(train_loss: float, chance_loss: float, tolerance: float,
                          val_accuracy: Any = None, previous_loss: Any = None) -> bool:
    """An epoch that shows no learning: its training loss (finite) not below ln C - tolerance, and its
    validation accuracy, where measured, not past :func:`trained_bar` (chance 1/C = exp(-ln C)).

    Above the band, an epoch whose loss fell by more than the tolerance since ``previous_loss`` (the
    epoch before) is on its way down, not stalled: a net recovering from a huge first epoch went
    20.8, 2.69, 2.34 in its 3-epoch budget, and a run of such epochs is no plateau."""
    if not math.isfinite(train_loss) or train_loss < chance_loss - tolerance:
        return False
    if (train_loss > chance_loss + tolerance and isinstance(previous_loss, (int, float))
            and math.isfinite(previous_loss) and previous_loss - train_loss > tolerance):
        return False
    return not (isinstance(val_accuracy, (int, float)) and math.isfinite(val_accuracy)
                and val_accuracy > trained_bar(math.exp(-chance_loss)))


def _at_chance(epoch: Mapping[str, Any], tolerance: float,
               previous: Mapping[str, Any] | None = None) -> bool:
    chance, loss = _chance(epoch), epoch.get("train_loss")
    if chance is None or not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return bool(epoch.get("stalled"))  # no ln C recorded: trust the trial's own verdict
    return no_better_than_chance(float(loss), chance, tolerance, epoch.get("val_accuracy"),
                                 (previous or {}).get("train_loss"))


def _nonfinite(value: Any) -> bool:
    if isinstance(value, str):  # the JSON record spells NaN/inf as strings
        return value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity")
    return isinstance(value, float) and not math.isfinite(value)


def _cause(epochs: Sequence[Mapping[str, Any]]) -> str | None:
    for e in reversed(epochs):
        if e.get("stall_reason"):
            return str(e["stall_reason"])
    return None


def _cause_of_run(epochs, flags) -> str | None:
    """The cause named while a late starter sat at chance."""
    for e, f in zip(epochs, flags):
        if f and e.get("stall_reason"):
            return str(e["stall_reason"])
    return None


def _longest_run(flags: Sequence[bool]) -> int:
    best = run = 0
    for f in flags:
        run = run + 1 if f else 0
        best = max(best, run)
    return best


def run_at_end(flags: Sequence[bool]) -> int:
    """How many epochs in a row, counted back from the last, the flags hold (at chance)."""
    n = 0
    for f in reversed(flags):
        if not f:
            break
        n += 1
    return n


def _run_end_epoch(epochs, flags) -> Any:
    """The epoch at which the last run at chance ended."""
    last = None
    for e, f in zip(epochs, flags):
        if f:
            last = e.get("epoch")
    return last


def _val_collapsed(last: Mapping[str, Any], tolerance: float) -> bool:
    chance, loss, acc = _chance(last), last.get("train_loss"), last.get("val_accuracy")
    if chance is None or not all(isinstance(v, (int, float)) for v in (loss, acc)):
        return False
    learned = loss < chance - _LEARNED_MARGIN
    return learned and acc <= math.exp(-chance) + _VAL_CHANCE_MARGIN


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
