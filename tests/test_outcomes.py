"""sweeper.outcomes.classify on synthetic epoch histories: one outcome per trial, at_chance and cause apart.

ln 10 = 2.302585 is the loss of a 10-class net that has learned nothing; a training loss not below it
by more than the stall tolerance (0.05), with validation accuracy not past 2x chance, is "at chance".
"""

from __future__ import annotations

import math

import pytest

from sweeper.outcomes import NOT_TRAINED, OUTCOMES, classify, no_better_than_chance, trained_bar

LN10 = math.log(10)
assert abs(LN10 - 2.302585) < 1e-6
AT = LN10 + 0.001  # at chance
DECISION = {"trial_id": "t1", "rung": 2, "cutoff": 0.5, "peers": 4, "value": 0.1, "metric": "val_accuracy"}


def history(losses, accs=None, *, reasons=None, stalled=None, **last):
    """Epoch rows as train.py reports them: epoch, train_loss, val_accuracy, chance_loss (+ diagnostics)."""
    accs = accs or [0.1 if isinstance(l, float) and abs(l - LN10) < 0.05 else 0.8 for l in losses]
    rows = []
    for i, (loss, acc) in enumerate(zip(losses, accs)):
        row = {"epoch": i + 1, "train_loss": loss, "val_accuracy": acc, "chance_loss": LN10}
        if reasons and reasons[i]:
            row["stall_reason"] = reasons[i]
        if stalled:
            row["stalled"] = float(stalled[i])
        rows.append(row)
    rows[-1].update(last)
    return rows


def test_outcome_names():
    assert OUTCOMES == ("completed", "pruned", "stalled", "late_start", "val_collapse", "diverged", "failed",
                        "stopped")
    assert NOT_TRAINED == {"stalled", "val_collapse", "diverged", "failed"}


def test_completed():
    r = classify(history([2.0, 1.2, 0.6], [0.4, 0.7, 0.9]))
    assert (r.outcome, r.reason, r.at_chance, r.cause, r.chance_epochs) == ("completed", None, False, None, 0)


def test_stalled_names_its_cause():
    r = classify(history([AT] * 4, reasons=[None, None, "vanishing_signal", "vanishing_signal"],
                         stalled=[0, 0, 1, 1]))
    assert r.outcome == "stalled" and r.at_chance is True
    assert r.cause == "vanishing_signal" and r.chance_epochs == 4
    assert "vanishing_signal" in r.reason and "last 4 epoch" in r.reason


def test_late_start_is_its_own_outcome():
    """He et al.'s delayed start: 3 epochs at chance, then it learns."""
    r = classify(history([AT, AT, AT, 1.5, 0.8], [0.1, 0.1, 0.1, 0.5, 0.8],
                         reasons=["plateau", "plateau", "plateau", None, None]))
    assert r.outcome == "late_start"
    assert r.at_chance is False and r.chance_epochs == 3
    assert r.cause == "plateau"  # what was named while it sat at chance
    assert "3 epochs" in r.reason and "epoch 3" in r.reason


def test_a_late_start_states_the_epochs_at_chance_that_export_gives():
    """Two stretches at chance (3, then 2): the reason said "at chance for 3 epochs, then escaped
    after epoch 9" -- the first stretch's length with the second's end -- beside chance_epochs=5
    in export, status and MLflow's stop reason alike."""
    r = classify(history([AT, AT, AT, 2.2, 2.1, 2.05, 2.15, AT, AT, 1.4, 0.9, 0.7],
                         [.1, .1, .1, .22, .25, .27, .24, .12, .11, .5, .7, .78]))
    assert r.outcome == "late_start" and r.chance_epochs == 5
    assert r.reason == "at chance for 5 epochs (not all in a row), then escaped after epoch 9"


def test_two_epochs_at_chance_then_learning_is_completed():
    r = classify(history([AT, AT, 1.5, 0.8]))
    assert r.outcome == "completed" and r.chance_epochs == 2


def test_val_collapse():
    """Training loss far below ln C while validation accuracy stays at chance."""
    r = classify(history([2.0, 1.2, 1.0], [0.12, 0.1, 0.1]))
    assert r.outcome == "val_collapse"
    assert r.at_chance is False and r.cause is None
    assert "validation stayed at chance" in r.reason


def test_pruned_at_chance_stays_pruned():
    """ASHA ended it, not the trial: outcome pruned; at chance and its cause are separate fields."""
    r = classify(history([AT, AT], reasons=[None, "dead_relu"]), decision=DECISION)
    assert r.outcome == "pruned"
    assert r.at_chance is True and r.cause == "dead_relu" and r.chance_epochs == 2
    assert "ASHA rung 2" in r.reason and "cutoff 0.5 of 4 peers" in r.reason and "at chance (dead_relu)" in r.reason


def test_pruned_at_chance_with_no_cause_named_never_says_none():
    """"at chance (None)" reached the launch's progress lines and the status table."""
    r = classify(history([AT, AT], reasons=[None, None]), decision=DECISION)
    assert r.outcome == "pruned" and r.at_chance is True and r.cause is None
    assert r.reason.endswith("; at chance") and "None" not in r.reason, r.reason


def test_pruned_while_learning():
    r = classify(history([2.0, 1.5], [0.3, 0.4]), decision=DECISION)
    assert r.outcome == "pruned" and r.at_chance is False and r.cause is None
    assert "at chance" not in r.reason


def test_pruned_at_chance_even_after_three_epochs_there():
    """The old callback relabelled these "stalled"; the prune decision wins now."""
    r = classify(history([AT] * 3, reasons=[None, None, "vanishing_signal"], stalled=[0, 0, 1]),
                 decision=DECISION)
    assert r.outcome == "pruned" and r.at_chance is True and r.cause == "vanishing_signal"


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), "nan", "inf"])
def test_diverged(loss):
    r = classify(history([2.0, 1.5, loss]))
    assert r.outcome == "diverged" and r.at_chance is False and r.cause is None
    assert "non-finite training loss in epoch 3" in r.reason


def test_diverged_as_the_trial_reported_it():
    r = classify(history([2.0, 1.5], outcome="diverged", stop_reason="non-finite training loss in epoch 2"))
    assert r.outcome == "diverged" and r.reason == "non-finite training loss in epoch 2"


def test_failed_wins_over_everything():
    r = classify(history([AT] * 3), error="RuntimeError: CUDA out of memory", decision=DECISION)
    assert r.outcome == "failed" and r.reason == "RuntimeError: CUDA out of memory"
    assert r.at_chance is True  # still a fact about its last epoch
    assert classify([], error="boom").outcome == "failed"


def test_stopped_when_the_sweep_was_interrupted():
    r = classify(history([AT] * 4), finished=False)
    assert r.outcome == "stopped" and r.at_chance is True and r.chance_epochs == 4
    assert "interrupted" in r.reason


def test_learn_then_collapse_is_stalled_with_that_cause():
    """Learned (loss well below ln C), then fell back to chance: the diagnostics flag it at once."""
    r = classify(history([1.0, 0.6, AT], [0.7, 0.8, 0.1], reasons=[None, None, "learn_then_collapse"],
                         stalled=[0, 0, 1]))
    assert r.outcome == "stalled"
    assert r.cause == "learn_then_collapse" and r.at_chance is True and r.chance_epochs == 1
    assert "fell back to chance after learning" in r.reason


def test_old_rows_without_chance_loss_trust_the_trials_stall_flag():
    rows = [{"epoch": e, "train_loss": 2.3, "val_accuracy": 0.1, "stalled": float(e == 3),
             **({"stall_reason": "vanishing_signal"} if e == 3 else {})} for e in (1, 2, 3)]
    r = classify(rows)
    assert r.outcome == "stalled" and r.cause == "vanishing_signal" and r.chance_epochs == 1


def test_tolerance_and_stall_epochs_are_the_trials_settings():
    rows = history([LN10 - 0.08] * 3, [0.15] * 3)
    assert classify(rows).outcome == "completed"  # 0.08 below ln C is past the default 0.05
    assert classify(rows, stall_tolerance=0.1).outcome == "stalled"
    assert classify(history([AT, AT, 1.0]), stall_epochs=2).outcome == "late_start"


def test_late_starter_whose_validation_collapses_is_val_collapse():
    r = classify(history([AT, AT, AT, 1.0, 0.5], [0.1, 0.1, 0.1, 0.1, 0.1]))
    assert r.outcome == "val_collapse"


def test_a_loss_above_chance_is_no_learning_and_validation_past_the_bar_is_learning():
    """Seen in a seeds study (VGG, digits, width 1/8, 4 epochs). A dead He VGG-19 at lr 0.05 went 2.296,
    2.444, 2.308, 2.303 (validation 11.8% at best, deep units 75-98% dead): the epoch above the band
    broke a two-sided band's run, and it was "completed" with no cause. A VGG-16 whose training loss
    stayed near ln 10 while validation rose to 28.5% was "stalled (plateau)"."""
    dead = classify(history([2.296, 2.444, 2.308, 2.303], [0.10, 0.118, 0.104, 0.111],
                            reasons=[None, "dead_relu", "dead_relu", "dead_relu"]))
    assert (dead.outcome, dead.at_chance, dead.cause, dead.chance_epochs) == ("stalled", True, "dead_relu", 4)
    rising = classify(history([2.30, 2.29, 2.28, 2.29], [0.111, 0.125, 0.132, 0.285]))
    assert (rising.outcome, rising.at_chance, rising.chance_epochs) == ("late_start", False, 3)
    # Above the band, a loss falling by more than the tolerance is on its way down: a net recovering
    # from a huge first epoch (20.8, 2.69, 2.34 in a 3-epoch budget) ran out of epochs, it did not stall.
    recovering = classify(history([20.8, 2.689, 2.342], [0.104, 0.083, 0.125]))
    assert (recovering.outcome, recovering.at_chance, recovering.chance_epochs) == ("completed", True, 2)
    # The bar is 2x chance (20% for ten classes): 19% is not past it.
    assert classify(history([AT, AT, AT], [0.1, 0.15, 0.19])).outcome == "stalled"


def test_the_trained_bar_is_reachable_with_two_classes():
    """2x chance is 100% with two classes: no trial could pass it, so a 2-class study had nothing that
    trained and no collapse to name. Where 2x chance is out of reach the bar is halfway to 100%."""
    assert trained_bar(0.1) == pytest.approx(0.2)
    assert trained_bar(1 / 3) == pytest.approx(2 / 3)
    assert trained_bar(0.5) == pytest.approx(0.75)
    ln2 = math.log(2)
    assert no_better_than_chance(ln2, ln2, 0.05, val_accuracy=0.9) is False  # 90% of 2 classes learned
    assert no_better_than_chance(ln2, ln2, 0.05, val_accuracy=0.6) is True
    rows = [{"epoch": i + 1, "train_loss": ln2, "val_accuracy": 0.95, "chance_loss": ln2} for i in range(3)]
    assert classify(rows).outcome == "completed"
