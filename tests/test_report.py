"""The study report from hand-made sweep records: files, tables, and text that follows the data."""

from __future__ import annotations

import csv
import math

import pytest

from sweeper.records import SweepRecord
from sweeper.report import Report, build_report

LN10 = math.log(10)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = {"vgg11": 9, "vgg13": 11, "smallcnn": 5}  # 8 / 10 convs + the compact head's linear layer
# The report's depth is the weight layers the model really has. These records use the compact head
# (global pool + ONE linear), so vgg11/vgg13 have 9/11 layers, not the 11/13 the paper counts with
# its 3-FC head: the old tests asserted 11/13 (weight_depth added 3 FC layers regardless of head).
DEPTH = LAYERS
DECAY = 0.08  # per-layer factor of the normal-init plain nets' activation std at init


def _layer_keys(arch: str) -> list[str]:
    n = LAYERS[arch]
    return [f"l{i:02d}_{'fc' if i == n - 1 else 'conv'}" for i in range(n)]


def _per_layer(arch: str, init: str, bn: bool) -> tuple[dict, dict]:
    """(step-0 values, epoch values): the small-init plain net's signal decays DECAY per layer."""
    vanishing = init == "normal" and not bn
    init_vals, epoch_vals = {}, {}
    for i, key in enumerate(_layer_keys(arch)):
        std = 0.5 * DECAY ** i if vanishing else 0.9 ** i
        init_vals[f"init/act_std/{key}"] = std
        init_vals[f"init/act_std_pred/{key}"] = std * (1.1 if vanishing else 1.3)
        init_vals[f"init/grad_norm/{key}"] = 1e-9 * DECAY ** (LAYERS[arch] - i) if vanishing else 0.1
        epoch_vals[f"act_std/{key}"] = std * 1.01
        epoch_vals[f"grad_norm/{key}"] = 1e-9 if vanishing else 0.05
        epoch_vals[f"gain_pred/{key}"] = DECAY ** 2 if vanishing else 1.0
    init_vals["init/initial_loss"] = LN10 if vanishing else LN10 + 0.4
    return init_vals, epoch_vals


def _add_trial(record: SweepRecord, n: int, arch: str, init: str, bn: bool, lr: float, outcome: str,
               accs: list[float], losses: list[float], reason: str | None = None,
               last: dict | None = None) -> str:
    trial_id = f"t_{n:05d}"
    init_vals, epoch_vals = _per_layer(arch, init, bn)
    for e, (acc, loss) in enumerate(zip(accs, losses), start=1):
        row = {"epoch": e, "train_loss": loss, "val_loss": loss, "val_accuracy": acc, "lr": lr,
               **epoch_vals, "stalled": float(outcome == "stalled" and e == len(accs))}
        if outcome == "stalled" and e == len(accs):
            row["stall_reason"] = reason
        if e == len(accs):
            row.update(last or {})
        if e == 1:
            row.update(init_vals)
        record.append_epoch(trial_id, row)
    prune = None
    if outcome == "pruned":
        prune = {"rung": len(accs), "cutoff": 0.5, "peers": 4, "value": accs[-1], "metric": "val_accuracy",
                 "epoch": len(accs)}
        record.append_decision({"trial_id": trial_id, **prune, "time": float(n)})
    best = max(range(len(accs)), key=lambda i: accs[i]) if accs else None
    record.write_trial(trial_id, {
        "trial_id": trial_id, "name": f"{arch}-{init}-{'bn' if bn else 'plain'}-lr{lr:.2g}",
        "config": {"model.arch": arch, "model.init": init, "model.batch_norm": bn, "model.width": 0.125,
                   "optim.lr": lr, "data.name": "digits", "epochs": 3},
        "created": float(n), "status": "finished", "outcome": outcome,
        "reason": reason if outcome == "stalled" else None, "prune": prune, "epochs": len(accs),
        "best": {"val_accuracy": accs[best]} if best is not None else {},
        "last": {"val_accuracy": accs[-1]} if accs else {},
    })
    return trial_id


def _meta(**extra) -> dict:
    return {"name": "toy_depth", "question": "Which deep plain VGGs stall, and why?", "metric": "val_accuracy",
            "mode": "max", "max_epochs": 3, "planned_trials": 16, "git_sha": "abc123", **extra}


FLAT = [LN10 + 0.0004, LN10 + 0.0001, LN10]
FALLING = [2.0, 1.0, 0.5]


def _study(tmp_path, *, fixed: bool) -> SweepRecord:
    """2 depths x {normal, he} x BN off/on, 2 lrs per cell. normal without BN stalls everywhere.

    fixed=True: he and BN train every cell. fixed=False: at depth 13 he stalls without BN and with BN.
    """
    record = SweepRecord(tmp_path / "toy_depth")
    record.create(_meta(), "SWEEP = ...\n")
    n = 0
    for arch in ("vgg11", "vgg13"):
        for bn in (False, True):
            for init in ("normal", "he"):
                for lr, scale in ((0.01, 1.0), (0.05, 0.5)):
                    n += 1
                    broken = (init == "normal" and not bn) or (not fixed and arch == "vgg13" and init == "he")
                    if broken:
                        reason = ("vanishing_signal" if init == "normal" else
                                  "dead_relu" if bn else "lr_too_high")
                        _add_trial(record, n, arch, init, bn, lr, "stalled", [0.1, 0.1, 0.1], FLAT, reason)
                    elif scale < 1:  # the high lr does worse: ASHA prunes it after one epoch
                        _add_trial(record, n, arch, init, bn, lr, "pruned", [0.3], [1.9])
                    else:
                        acc = ({"he": 0.9, "normal": 0.8}[init] + (0.05 if bn else 0.0)
                               - (0.02 if arch == "vgg13" else 0.0))
                        _add_trial(record, n, arch, init, bn, lr, "completed", [0.4, 0.7, acc], FALLING)
    return record


def _read_csv(path) -> dict[tuple, dict]:
    with open(path) as f:
        return {(int(r["depth"]), r["init"], r["batch_norm"] == "True"): r for r in csv.DictReader(f)}


def _cell(arch: str, init: str, bn: bool) -> str:
    """A cell as the text names it: the paper's name, the real weight layers, init, BN."""
    return f"{arch} ({DEPTH[arch]} weight layers), {init}, {'BN' if bn else 'no BN'}"


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, (path, len(data))


def test_report_files_tables_and_text(tmp_path):
    record = _study(tmp_path, fixed=True)
    report = build_report(record, tmp_path / "out")

    assert isinstance(report, Report)
    names = {p.name for p in report.figures}
    assert names == {"heatmap.png", "layers_at_init.png", "predicted_vs_measured.png", "curves.png"}
    for p in report.figures:
        assert p.parent == tmp_path / "out"
        _assert_png(p)

    text = report.html.read_text()
    assert report.html == tmp_path / "out" / "report.html"
    assert text.count("data:image/png;base64,") == 4
    assert "Which deep plain VGGs stall, and why?" in text  # the question from meta, at the top
    assert text.index("Which deep plain VGGs stall") < text.index("<h2>Cells</h2>")
    assert "<table>" in text and "best val acc" in text and "stalled: vanishing_signal" in text
    assert "<h2>ASHA decisions</h2>" in text and "vgg11-he-plain-lr0.05" in text
    assert "Figure skipped" not in text
    # MLflow's artifact pane is ~600 px wide: every table scrolls inside its own box, not the page.
    assert text.count("<table>") == text.count('<div class="wide"><table>') > 0
    assert (tmp_path / "out" / "summary.md").read_text() == report.summary

    # cells.csv: one row per (depth, init, BN), best accuracy over lr and the lr that reached it.
    cells = _read_csv(tmp_path / "out" / "cells.csv")
    assert len(cells) == len(report.cells) == 8
    # Keyed by real weight layers (9 = vgg11, 11 = vgg13 with the compact head; was 11/13).
    expected = {
        (9, "normal", False): (0.1, "stalled: vanishing_signal"),
        (11, "normal", False): (0.1, "stalled: vanishing_signal"),
        (9, "he", False): (0.9, "trained"), (11, "he", False): (0.88, "trained"),
        (9, "normal", True): (0.85, "trained"), (11, "normal", True): (0.83, "trained"),
        (9, "he", True): (0.95, "trained"), (11, "he", True): (0.93, "trained"),
    }
    for key, (acc, outcome) in expected.items():
        row = cells[key]
        assert float(row["best_val_accuracy"]) == pytest.approx(acc), key
        assert row["outcome"] == outcome, key
        assert int(row["trials"]) == 2
        assert int(row["n_seeds"]) == 1 and row["verdict"].endswith("1/1 seed" if outcome == "trained"
                                                                      else f"1/1 seed ({outcome[9:]})")
        if outcome == "trained":
            assert float(row["best_lr"]) == pytest.approx(0.01)  # the lr 0.05 trial was pruned at 30%

    # The summary names each stalled cell, its reason and where the init signal fell below 1e-6:
    # std_l / std_0 = DECAY**l, first below 1e-6 at l = 6 (0.08**5 = 3.3e-6, 0.08**6 = 2.6e-7).
    layer = next(l for l in range(1, 20) if DECAY ** l < 1e-6)
    assert layer == 6
    summary = report.summary
    stalled = summary.split("## Stalled cells")[1].split("##")[0]
    for arch in ("vgg11", "vgg13"):
        n_layers = LAYERS[arch]
        line = next(l for l in stalled.splitlines() if _cell(arch, "normal", False) in l)
        assert "vanishing_signal" in line and "stalls in 1/1 seed" in line
        assert f"l{layer:02d}_conv" in line and "1e-6" in line and "at init" in line.lower()
        # Layers are numbered from l00 in the text as in the metrics and figures (it used to say
        # "weight layer 7 of 9", counting from 1).
        assert f"l00–l{n_layers - 1:02d} measured" in line and "weight layer 7" not in line
        assert cells[(DEPTH[arch], "normal", False)]["signal_below_floor_at"] == f"l{layer:02d}_conv"
    # Only plain normal cells stalled; he and BN fixed them, and the text says so because the data does.
    assert "vgg11 (9 weight layers), he" not in stalled
    lower = summary.lower()
    assert "he init trains at every depth" in lower
    assert "batchnorm trains every init at every depth" in lower
    assert "10 classes" in summary


def test_report_does_not_claim_a_fix_the_data_does_not_show(tmp_path):
    record = _study(tmp_path, fixed=False)
    report = build_report(record, tmp_path / "out")
    lower = report.summary.lower()

    assert "he init trains at every depth" not in lower
    assert "batchnorm trains every init" not in lower
    stalled = report.summary.split("## Stalled cells")[1].split("\n## ")[0]
    assert _cell("vgg13", "he", False) in stalled and "lr_too_high" in stalled
    assert _cell("vgg13", "he", True) in stalled and "dead_relu" in stalled
    assert "vgg11 (9 weight layers), he" not in stalled
    # He rescues vgg11 only, BN rescues the normal cells but not he at vgg13: both are said.
    # (Depths are the real weight layers now: vgg11 has 9, vgg13 11 with the compact head.)
    assert ("he init (no bn) trains at vgg11 (9 weight layers) where normal stalled, but itself stalls "
            "at vgg13 (11 weight layers)") in lower
    assert f"with batchnorm still stalled: {_cell('vgg13', 'he', True).lower()} (dead_relu; 1/1 seed)" in lower
    assert "nothing in the sweep trained at: vgg13" not in lower  # normal+BN does train at vgg13
    cells = _read_csv(tmp_path / "out" / "cells.csv")
    assert cells[(11, "he", True)]["outcome"] == "stalled: dead_relu"
    assert cells[(11, "he", False)]["outcome"] == "stalled: lr_too_high"
    # The he cell at vgg13 has a healthy signal at init: the text must not invent a layer for it.
    line = next(l for l in stalled.splitlines() if _cell("vgg13", "he", False) in l)
    assert "stays above 1e-6" in line


def test_the_text_says_how_each_cause_was_checked_and_only_what_one_depth_and_one_lr_show(tmp_path):
    """One depth, one lr: no "every depth", no "lr sampled"; each stalled cell says whether an
    intervention checked its cause, and a trial that ran its budget below the bar is not "stalled"."""
    record = SweepRecord(tmp_path / "one_depth")
    record.create(_meta(name="one_depth", planned_trials=4), "SWEEP = ...\n")
    skipped = ("no counterfactuals: 6 runs x 50 steps = 300 steps exceed the 3 steps allowed, 10% of the "
               "trial's budget of 33 steps (3 epochs x 11 steps); diagnostics.counterfactual_budget sets "
               "that share")
    checked = "lr/10 escaped chance in 50 steps; lr x10 did not -> lr_too_high (measured: dead_relu)"
    _add_trial(record, 1, "vgg11", "normal", False, 0.01, "stalled", [0.1] * 3, FLAT, "vanishing_signal",
               last={"cf_evidence": skipped, "cf_skipped": skipped[len("no counterfactuals: "):]})
    _add_trial(record, 2, "vgg11", "he", False, 0.01, "stalled", [0.1] * 3, FLAT, "lr_too_high",
               last={"cf_evidence": checked})
    _add_trial(record, 3, "vgg11", "xavier", False, 0.01, "stalled", [0.1] * 3, FLAT, "dead_relu")
    _add_trial(record, 4, "vgg11", "he", True, 0.01, "completed", [0.09, 0.1, 0.12], [2.6, 2.5, 2.45])
    summary = build_report(record, tmp_path / "out").summary

    assert "lr 0.01 throughout" in summary and "lr sampled" not in summary
    assert "every depth" not in summary
    assert "normal stalls at its one depth (vgg11 (9 weight layers) in 1/1 seed: vanishing_signal)" in summary
    lines = summary.splitlines()
    line = next(l for l in lines if l.startswith(f"- **{_cell('vgg11', 'normal', False)}**: stalls"))
    assert line.endswith(f"The cause is named from the measurements only: no intervention ran "
                         f"({skipped[len('no counterfactuals: '):]}).")
    line = next(l for l in lines if l.startswith(f"- **{_cell('vgg11', 'he', False)}**: stalls"))
    assert line.endswith(f"Checked by intervention: {checked}.")
    line = next(l for l in lines if l.startswith(f"- **{_cell('vgg11', 'xavier', False)}**: stalls"))
    assert line.endswith("The cause is named from the measurements only (no intervention recorded).")
    # Ran its budget without reaching 2x chance, never at chance: outcome completed, not a stall.
    assert "1 completed, 3 stalled" in summary
    line = next(l for l in lines if l.startswith(f"- **{_cell('vgg11', 'he', True)}** (n=1)"))
    assert "stays below the bar in 1/1 seed (slow)" in line and "stalls" not in line
    # Sampled within cells, or a grid axis: said as such.
    other = SweepRecord(tmp_path / "lrs")
    other.create(_meta(name="lrs", planned_trials=2), "SWEEP = ...\n")
    for n, lr in ((1, 0.01), (2, 0.05)):
        _add_trial(other, n, "vgg11", "he", False, lr, "completed", [0.4, 0.7, 0.9], FALLING)
    assert "; lr sampled within each)" in build_report(other, tmp_path / "out2").summary
    # Without the depth x init x BN view (an lr axis) there is no "Stalled cells" section: the verdict
    # line says how the cause was named (an lr sweep's report never did).
    lrs = SweepRecord(tmp_path / "lr_axis")
    lrs.create(_meta(name="lr_axis", planned_trials=2, space={"optim.lr": "grid_search([1e-05, 0.5])"}),
               "SWEEP = ...\n")
    _add_trial(lrs, 1, "vgg11", "he", False, 0.5, "stalled", [0.1] * 3, FLAT, "dead_relu",
               last={"cf_evidence": skipped})
    _add_trial(lrs, 2, "vgg11", "he", False, 1e-5, "completed", [0.09, 0.1, 0.12], [2.6, 2.5, 2.45])
    summary = build_report(lrs, tmp_path / "out3").summary
    assert "(grid axes: lr)" in summary and "## Stalled cells" not in summary
    line = next(l for l in summary.splitlines() if l.startswith("- **lr=0.5** (n=1)"))
    assert "stalls in 1/1 seed (dead_relu)" in line
    assert line.endswith(f"The cause is named from the measurements only: no intervention ran "
                         f"({skipped[len('no counterfactuals: '):]}).")
    line = next(l for l in summary.splitlines() if l.startswith("- **lr=1e-05** (n=1)"))
    assert "stays below the bar" in line and "intervention" not in line


def test_empty_record_says_there_is_nothing_to_show(tmp_path):
    record = SweepRecord(tmp_path / "empty")
    record.create(_meta(name="empty"), "")
    report = build_report(record, tmp_path / "out")

    assert report.figures == [] and report.cells == []
    assert "nothing to show" in report.summary.lower()
    text = report.html.read_text()
    assert "nothing to show" in text.lower() and "Figure skipped" in text
    assert (tmp_path / "out" / "cells.csv").read_text().startswith("cell,model,depth,init,batch_norm")

    # Not even a sweep.json: still a report, not a traceback.
    report = build_report(SweepRecord(tmp_path / "missing"), tmp_path / "out2")
    assert "nothing to show" in report.summary.lower()


def test_partial_record_skips_figures_instead_of_crashing(tmp_path):
    """Trials without epochs, a non-VGG arch, non-finite losses, no per-layer data, no BN cells."""
    record = SweepRecord(tmp_path / "partial")
    record.create(_meta(name="partial"), "")
    record.write_trial("r0", {"trial_id": "r0", "name": "resnet18-he", "status": "running", "outcome": None,
                              "config": {"model.arch": "resnet18", "model.init": "he", "optim.lr": 0.1}})
    record.write_trial("r1", {"trial_id": "r1", "name": "resnet18-normal", "status": "finished",
                              "outcome": "diverged",
                              "config": {"model.arch": "resnet18", "model.init": "normal", "optim.lr": 1.0}})
    record.append_epoch("r1", {"epoch": 1, "train_loss": float("nan"), "val_accuracy": 0.1})
    with open(record.trials_dir / "r1.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')  # the driver is mid-append: a torn last line
    report = build_report(record, tmp_path / "out")

    text = report.html.read_text()
    assert {p.name for p in report.figures} <= {"heatmap.png", "curves.png"}
    assert "Figure skipped" in text  # the per-layer figures, with the reason
    assert "per-layer" in text
    # Keyed by model name: a non-VGG's depth is now its weight-layer count (resnet18: 18), not its name.
    rows = {(r["model"], r["init"]): r for r in report.cells}
    assert rows[("resnet18", "he")]["depth"] == 18
    assert rows[("resnet18", "he")]["outcome"] == "running"
    assert rows[("resnet18", "normal")]["outcome"] == "stalled: diverged"
    assert "1 of 2 trials have no epochs yet" in report.summary


@pytest.mark.parametrize("arch,depth,head,layers", [
    ("vgg11", None, "compact", 9), ("vgg11", None, "paper", 11), ("vgg19", None, "compact", 17),
    ("vgg19", None, "paper", 19), ("vgg16c", None, "compact", 14), ("vgg", 30, "compact", 28),
    ("vgg", 30, "paper", 30),
])
def test_depth_is_the_weight_layers_the_model_has(arch, depth, head, layers):
    """The heatmap's "depth (weight layers)" axis: compact head = 1 linear, the paper's head = 3."""
    from torch import nn

    from sweeper.config import ModelConfig
    from sweeper.models import ARCHITECTURES, weight_depth
    from sweeper.report.study import weight_layers

    cfg = ModelConfig(arch=arch, depth=depth, head=head, width=1 / 16)
    model = ARCHITECTURES[arch](cfg, num_classes=10)
    assert weight_depth(cfg) == layers == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    flat = {"model.arch": arch, "model.head": head, **({"model.depth": depth} if depth else {})}
    assert weight_layers(flat) == layers


def test_a_location_valued_axis_is_named_by_its_source_not_its_whole_path():
    # model.init_from=sweep:vgg_a/best reaches the record resolved to a checkpoint location.
    from sweeper.report.study import axis_value

    where = "s3://bucket/team/sweeps/vgg_a/vgg11-he-plain-lr0.0035-1e4b8_00001/checkpoint_000005?endpoint_override=h:9"
    assert axis_value(where) == ".../vgg_a/vgg11-he-plain-lr0.0035-1e4b8_00001/checkpoint_000005"
    assert axis_value(None) == "None" and axis_value("he") == "he" and axis_value(0.5) == "0.5"


def test_verdicts_agree_with_the_outcomes_export_gives(tmp_path):
    """A trial that ran its budget and ended at chance with no stall named (outcome completed) is
    not "stalls (at_chance)"; one over the bar once that ended at chance is not "trains" alone."""
    from sweeper.export import trial_rows

    record = SweepRecord(tmp_path / "ends")
    record.create(_meta(name="ends", planned_trials=3,
                        space={"optim.lr": "grid_search([0.001, 0.01, 0.1])"}), "SWEEP = ...\n")
    # At chance at the last epoch only (the loss came down to ln C late): no stall run, completed.
    at_end = {"chance_loss": LN10}
    _add_trial(record, 1, "vgg11", "he", False, 0.001, "completed", [0.09, 0.1, 0.1], FLAT, last=at_end)
    _add_trial(record, 2, "vgg11", "he", False, 0.01, "completed", [0.23, 0.19, 0.1], FLAT, last=at_end)
    _add_trial(record, 3, "vgg11", "he", False, 0.1, "stalled", [0.1] * 3, FLAT, "dead_relu")
    rows = {r["trial_id"]: r for r in trial_rows(record)}
    assert [(rows[t]["outcome"], rows[t]["at_chance"]) for t in ("t_00001", "t_00002")] == [
        ("completed", True), ("completed", True)]
    lines = build_report(record, tmp_path / "out").summary.splitlines()
    line = next(l for l in lines if l.startswith("- **lr=0.001** (n=1)"))
    assert "ends at chance in 1/1 seed (no stall named)" in line and "stalls" not in line
    line = next(l for l in lines if l.startswith("- **lr=0.01** (n=1)"))
    assert "trains in 1/1 seed, then ends at chance in 1;" in line
    line = next(l for l in lines if l.startswith("- **lr=0.1** (n=1)"))
    assert "stalls in 1/1 seed (dead_relu)" in line


def test_one_init_and_one_fix_are_said_as_such_and_a_sweep_without_vggs_skips_the_depth_figure(tmp_path):
    record = SweepRecord(tmp_path / "bn_only")
    record.create(_meta(name="bn_only", planned_trials=2), "SWEEP = ...\n")
    _add_trial(record, 1, "vgg11", "normal", False, 0.01, "stalled", [0.1] * 3, FLAT, "vanishing_signal")
    _add_trial(record, 2, "vgg11", "normal", True, 0.01, "completed", [0.4, 0.7, 0.9], FALLING)
    summary = build_report(record, tmp_path / "out").summary
    assert ("BatchNorm trains normal init at the sweep's one depth" in summary
            and "every init" not in summary)
    assert "it fixed the one stalled plain cell it was tested on." in summary
    cnn = SweepRecord(tmp_path / "cnn")
    cnn.create(_meta(name="cnn", planned_trials=1), "SWEEP = ...\n")
    _add_trial(cnn, 1, "smallcnn", "he", False, 0.05, "completed", [0.4, 0.7, 0.9], FALLING)
    summary = build_report(cnn, tmp_path / "out2").summary
    assert "the sweep has no VGG: this figure compares layers along a VGG's depth" in summary
    assert "no trial of a VGG has" not in summary


def test_a_trial_of_an_interrupted_sweep_is_stopped_not_still_running(tmp_path):
    """After `sweeper stop`, the report said "still running in 1/1" beside "1 stopped"."""
    record = SweepRecord(tmp_path / "halted")
    record.create(_meta(name="halted", planned_trials=2,
                        space={"optim.lr": "grid_search([0.01, 0.05])"}), "SWEEP = ...\n")
    _add_trial(record, 1, "vgg11", "he", False, 0.01, "completed", [0.4, 0.7, 0.9], FALLING)
    tid = _add_trial(record, 2, "vgg11", "he", False, 0.05, "stopped", [0.15], [2.2])
    record.write_trial(tid, {**next(t for t in record.trials() if t["trial_id"] == tid),
                             "status": "running", "epochs": 1})
    summary = build_report(record, tmp_path / "out").summary
    line = next(l for l in summary.splitlines() if l.startswith("- **lr=0.05** (n=1)"))
    assert "stopped before its end in 1/1 (the sweep was interrupted)" in line, line
    assert "still running" not in summary


def test_a_depth_where_one_seed_trained_is_not_a_depth_where_nothing_trained(tmp_path):
    """He VGG-16 trained in 1 of 2 seeds (a mixed cell) while normal init stalled: the report said both
    "trains in 1/2 seeds" and "Nothing in the sweep trained at: vgg16"."""
    record = SweepRecord(tmp_path / "seeds")
    record.create(_meta(name="seeds", planned_trials=4, space={
        "model.init": "grid_search(['normal', 'he'])", "seed": "grid_search([0, 1])"}), "SWEEP = ...\n")
    runs = [("normal", 0, "stalled"), ("normal", 1, "stalled"), ("he", 0, "completed"), ("he", 1, "stalled")]
    for n, (init, seed, outcome) in enumerate(runs, start=1):
        trained = outcome == "completed"
        tid = _add_trial(record, n, "vgg13", init, False, 0.01, outcome,
                         [0.4, 0.7, 0.8] if trained else [0.1] * 3, FALLING if trained else FLAT,
                         None if trained else "vanishing_signal" if init == "normal" else "dead_relu")
        row = next(t for t in record.trials() if t["trial_id"] == tid)
        record.write_trial(tid, {**row, "config": {**row["config"], "seed": seed}})
    summary = build_report(record, tmp_path / "out").summary
    assert "trains in 1/2 seeds" in summary
    assert "Nothing in the sweep trained at" not in summary, summary


@pytest.mark.parametrize("space", [{"optim.lr": "grid_search([0.001, 0.01, 0.1])"},
                                   {"optim.lr": "loguniform(0.001, 0.1)"}])
def test_an_lr_only_sweep_says_at_which_lrs_it_trained(tmp_path, space):
    """An lr sweep (an lr grid axis, or lr sampled in one cell) got verdicts per cell and no word on
    which learning rates trained: lr_lines looks inside trained cells of the depth x init x BN view."""
    record = SweepRecord(tmp_path / "lr_only")
    record.create(_meta(name="lr_only", planned_trials=4, space=space), "SWEEP = ...\n")
    _add_trial(record, 1, "vgg11", "he", False, 0.001, "stalled", [0.1] * 3, FLAT, None)  # diagnostics off
    _add_trial(record, 2, "vgg11", "he", False, 0.01, "completed", [0.4, 0.7, 0.9], FALLING)
    _add_trial(record, 3, "vgg11", "he", False, 0.0101, "completed", [0.4, 0.6, 0.8], FALLING)
    _add_trial(record, 4, "vgg11", "he", False, 0.1, "stalled", [0.1] * 3, FLAT, "lr_too_high")
    summary = build_report(record, tmp_path / "out").summary
    if "grid_search" in space["optim.lr"]:  # four cells of one lr each, outside the depth x init x BN view
        section = summary.split("## Learning rate\n\n")[1].split("\n\n")[0]
        assert section == ("- all trials: trained at lr 0.01 and 0.0101 (best 90.0% at lr 0.01); not at lr "
                           "0.001 (no_diagnostics) and 0.1 (lr_too_high).")
        assert "in 4 cells (grid axes: lr)" in summary
        # a stall without a recorded cause is not given one ("plateau" was a diagnostics' verdict)
        line = next(l for l in summary.splitlines() if l.startswith("- **lr=0.001**"))
        assert "stalls in 1/1 seed (no_diagnostics)" in line and "named from the measurements" not in line
    else:  # one cell, which the view reads within
        section = summary.split("## Learning rate within trained cells\n\n")[1].split("\n\n")[0]
        assert section.startswith("- vgg11 (9 weight layers), he, no BN: trains at lr 0.01 (90.0%) but "
                                  "lr 0.001 did not (no_diagnostics) and lr 0.1 did not (lr_too_high)")
        assert "in 1 cell (grid axes: none" in summary
