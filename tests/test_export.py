"""`sweeper export`, `sweeper status` and the study report state the same outcomes and the same numbers.

The record is built as the driver writes it (sweeper.callback._finish): per-epoch rows, the ASHA
decision, and the outcome fields computed once by sweeper.outcomes.classify. Every outcome occurs,
including a pruned trial at chance, a late start and a validation collapse, and every cell has 3 seeds.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from sweeper.export import export, outcome_fields, status_outcome, trial_rows
from sweeper.outcomes import OUTCOMES, classify
from sweeper.records import SweepRecord
from sweeper.report import build_report

LN10 = math.log(10)
AT = LN10 + 0.001  # a training loss at chance
SEEDS = (0, 1, 2)
LEARN = ([2.0, 1.2, 0.6], [0.4, 0.7, 0.9])  # (train losses, val accuracies) of a net that learns


def _rows(losses, accs, *, reasons=None, test=None):
    rows = []
    for i, (loss, acc) in enumerate(zip(losses, accs)):
        row = {"epoch": i + 1, "train_loss": loss, "val_loss": loss if isinstance(loss, float) else 9.0,
               "val_accuracy": acc, "chance_loss": LN10, "lr": 0.01}
        if reasons and reasons[i]:
            row["stall_reason"] = reasons[i]
            row["stalled"] = 1.0
        rows.append(row)
    if test is not None:
        rows[-1]["test_accuracy"] = test
    return rows


def _finish(record, n, config, rows, *, pruned=False, error=None, finished=True, old=False):
    """Write one trial as SweepCallback._finish does (old=True: as before at_chance/cause existed)."""
    trial_id = f"t{n:03d}"
    for row in rows:
        record.append_epoch(trial_id, row)
    decision = None
    if pruned:
        decision = {"trial_id": trial_id, "rung": len(rows), "epoch": len(rows), "cutoff": 0.5, "peers": 6,
                    "value": rows[-1]["val_accuracy"], "metric": "val_accuracy", "time": float(n)}
        record.append_decision(decision)
    result = classify(rows, decision=decision, error=error, finished=finished)
    best = max(rows, key=lambda r: r["val_accuracy"]) if rows else None
    name = f"{config['model.arch']}-{config['model.init']}-{'bn' if config['model.batch_norm'] else 'plain'}" \
           f"-lr{config['optim.lr']:.2g}-s{config['seed']}"
    rec = {"trial_id": trial_id, "name": name, "config": config, "created": float(n), "num_failures": 0,
           "status": "finished", "outcome": result.outcome, "reason": result.reason, "prune": decision,
           "epochs": len(rows), "best": dict(best) if best else {}, "last": dict(rows[-1]) if rows else {}}
    if old:  # a record from before the one outcome model: a stall's cause lived in "reason"
        rec["reason"] = result.cause if result.outcome == "stalled" else result.reason
    else:
        rec.update(at_chance=result.at_chance, cause=result.cause, chance_epochs=result.chance_epochs)
    record.write_trial(trial_id, rec)
    return result


# Per (arch, init, BN) cell and seed: the two lr samples' histories and how each ended.
def _plan(arch, init, bn, seed):
    good = lambda acc, test: dict(rows=_rows(LEARN[0], [0.4, 0.7, acc], test=test))
    if not bn and init == "normal":  # stalls in 2 of 3 seeds, a late start in the third
        stall = dict(rows=_rows([AT] * 3, [0.1] * 3, reasons=[None, None, "vanishing_signal"]))
        pruned_at_chance = dict(rows=_rows([AT] * 2, [0.1, 0.11], reasons=[None, "vanishing_signal"]),
                                pruned=True)
        if seed == 0:
            return [stall, pruned_at_chance]
        if seed == 1:
            return [stall, dict(rows=_rows([AT], [0.1]), error="RuntimeError: worker died")]
        late = dict(rows=_rows([AT, AT, AT, 1.4, 0.9], [0.1, 0.1, 0.1, 0.5, 0.72 if arch == "vgg11" else 0.66],
                               reasons=["vanishing_signal"] * 3 + [None, None], test=0.69))
        return [late, pruned_at_chance]
    if not bn:  # he, plain
        if arch == "vgg13" and seed == 0:
            collapse = dict(rows=_rows([2.0, 1.0, 0.8], [0.15, 0.1, 0.1]))
            return [collapse, good(0.86, 0.84)]
        other = [dict(rows=_rows([2.0, 1.9], [0.3, 0.35]), pruned=True),
                 dict(rows=_rows([2.0, float("nan")], [0.3, 0.1])),
                 dict(rows=_rows([2.0, 1.5], [0.4, 0.5]), finished=False)][seed]
        return [good(0.9 - 0.02 * seed - (0.03 if arch == "vgg13" else 0), 0.88 - 0.01 * seed), other]
    return [good(0.95 - 0.01 * seed, 0.93 - 0.01 * seed),
            dict(rows=_rows([AT, AT], [0.1, 0.1], reasons=[None, "dead_relu"]), pruned=True)]


def _study(tmp_path) -> SweepRecord:
    record = SweepRecord(tmp_path / "toy_seeds")
    record.create({"name": "toy_seeds", "metric": "val_accuracy", "mode": "max", "max_epochs": 5,
                   "planned_trials": 48, "question": "Which plain VGGs stall, in how many seeds?",
                   "space": {"model.arch": "grid_search(['vgg11', 'vgg13'])",
                             "model.init": "grid_search(['normal', 'he'])",
                             "model.batch_norm": "grid_search([False, True])",
                             "optim.lr": "loguniform(0.001, 0.1)", "sweep.seeds": "3"}}, "SWEEP = ...\n")
    n = 0
    for arch in ("vgg11", "vgg13"):
        for bn in (False, True):
            for init in ("normal", "he"):
                for seed in SEEDS:
                    for k, spec in enumerate(_plan(arch, init, bn, seed)):
                        n += 1
                        config = {"model.arch": arch, "model.init": init, "model.batch_norm": bn,
                                  "model.width": 0.125, "optim.lr": round(0.003 * (k + 1) * (seed + 1), 5),
                                  "data.name": "digits", "seed": seed, "epochs": 5}
                        _finish(record, n, config, spec.pop("rows"), **spec)
    return record


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("seeds")
    record = _study(tmp_path)
    return record, trial_rows(record), build_report(record, tmp_path / "out"), tmp_path


def _cell_key(row):
    return row["config.model.arch"], row["config.model.init"], row["config.model.batch_norm"]


def test_every_outcome_occurs_and_export_carries_the_new_columns(built):
    record, rows, _, tmp_path = built
    assert {r["outcome"] for r in rows} == set(OUTCOMES)
    for key in ("trial_id", "name", "status", "outcome", "reason", "at_chance", "cause", "chance_epochs",
                "epochs", "num_failures", "best_val_accuracy", "final_val_accuracy", "test_accuracy",
                "config.optim.lr", "config.seed", "best.val_accuracy", "last.val_accuracy", "prune.rung",
                "prune.cutoff", "prune.peers", "prune.value"):
        assert all(key in r for r in rows), key
    at_chance_pruned = [r for r in rows if r["outcome"] == "pruned" and r["at_chance"]]
    assert at_chance_pruned and {r["cause"] for r in at_chance_pruned} == {"vanishing_signal", "dead_relu"}
    late = [r for r in rows if r["outcome"] == "late_start"]
    assert late and all(r["chance_epochs"] == 3 and not r["at_chance"] for r in late)
    for r in rows:  # final = last epoch's val_accuracy, test = last epoch's test_accuracy
        last = record.epochs(r["trial_id"])[-1]
        assert r["final_val_accuracy"] == (last["val_accuracy"] if math.isfinite(last["val_accuracy"]) else None)
        assert r["test_accuracy"] == last.get("test_accuracy")
        assert r["best_val_accuracy"] == r["best.val_accuracy"]
    assert all(r["test_accuracy"] is not None for r in rows if r["outcome"] == "completed")

    # Written files carry the same values (parquet and csv).
    import pyarrow.parquet as pq

    (path,) = export(record, tmp_path / "export" / "toy", fmt="parquet")
    table = pq.read_table(path).to_pylist()
    assert [t["outcome"] for t in table] == [r["outcome"] for r in rows]
    assert [t["at_chance"] for t in table] == [r["at_chance"] for r in rows]
    assert [t["test_accuracy"] for t in table] == [r["test_accuracy"] for r in rows]
    (path,) = export(record, tmp_path / "export" / "toy", fmt="csv")
    with open(path) as f:
        assert Counter(r["outcome"] for r in csv.DictReader(f)) == Counter(r["outcome"] for r in rows)


def _summary_counts(summary: str) -> tuple[Counter, int]:
    line = next(l for l in summary.splitlines() if l.startswith("Outcomes, one per trial"))
    listed = line.split(": ", 1)[1].rstrip(".")
    counts, at_chance = Counter(), 0
    for n, outcome, chance in re.findall(r"(\d+) (\w+)(?: \((\d+) at chance\))?", listed):
        counts[outcome] = int(n)
        at_chance += int(chance or 0)
    return counts, at_chance


def test_report_counts_are_the_exports(built):
    _, rows, report, _ = built
    counts, at_chance = _summary_counts(report.summary)
    assert counts == Counter(r["outcome"] for r in rows)
    assert at_chance == sum(1 for r in rows if r["outcome"] == "pruned" and r["at_chance"])
    html = report.html.read_text()
    n_pruned = counts["pruned"]
    assert f"{n_pruned} trials have outcome <em>pruned</em>" in html  # not the number of decisions alone


def test_report_cells_group_seeds_with_the_exports_numbers(built):
    _, rows, report, tmp_path = built
    per_seed: dict[tuple, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        per_seed[_cell_key(r)][r["config.seed"]].append(r)
    by_cell = {(c["model"], c["init"], c["batch_norm"]): c for c in report.cells}
    assert set(by_cell) == set(per_seed)
    with open(tmp_path / "out" / "cells.csv") as f:
        csv_cells = {(c["model"], c["init"], c["batch_norm"] == "True"): c for c in csv.DictReader(f)}
    for key, seeds in per_seed.items():
        cell = by_cell[key]
        assert cell["n_seeds"] == len(seeds) == 3
        best_trials = [max((r for r in seeds[s] if r["best_val_accuracy"] is not None),
                           key=lambda r: r["best_val_accuracy"]) for s in sorted(seeds)]
        bests = [r["best_val_accuracy"] for r in best_trials]
        assert [float(v) for v in cell["best_val_accuracy_per_seed"].split(";")] == bests
        assert cell["best_val_accuracy"] == pytest.approx(sum(bests) / 3)
        assert (cell["best_val_accuracy_min"], cell["best_val_accuracy_max"]) == (min(bests), max(bests))
        tests = [r["test_accuracy"] for r in best_trials if r["test_accuracy"] is not None]
        if tests:
            assert cell["test_accuracy"] == pytest.approx(sum(tests) / len(tests))
        assert float(csv_cells[key]["best_val_accuracy"]) == pytest.approx(cell["best_val_accuracy"])
        assert int(csv_cells[key]["n_seeds"]) == 3
        assert cell["depth"] == {"vgg11": 9, "vgg13": 11}[key[0]]  # compact head: convs + 1 linear

    summary = report.summary
    # Verdicts carry their counts; test accuracy is reported beside best-epoch accuracy.
    normal = next(l for l in summary.splitlines() if l.startswith("- **vgg11 (9 weight layers), normal, no BN**"))
    assert "(n=3)" in normal and "trains in 1/3 seeds" in normal
    assert "stalls in 2/3 seeds (vanishing_signal)" in normal
    he_bn = next(l for l in summary.splitlines() if l.startswith("- **vgg11 (9 weight layers), he, BN**"))
    cell = by_cell[("vgg11", "he", True)]
    assert "trains in 3/3 seeds" in he_bn
    assert f"mean {cell['best_val_accuracy']:.1%}" in he_bn
    assert f"test mean {cell['test_accuracy']:.1%}" in he_bn
    assert "best per seed 95.0%, 94.0%, 93.0%" in he_bn
    html = report.html.read_text()
    assert "test acc" in html and f"{cell['test_accuracy']:.1%}" in html
    assert "9 (vgg11)" in html  # the depth column: real weight layers, the paper's name beside
    assert "n = 3 seeds per cell" in summary


def test_old_records_fall_back_without_rederiving_the_outcome(tmp_path):
    record = SweepRecord(tmp_path / "old")
    record.create({"name": "old"}, "")
    base = {"model.arch": "vgg11", "model.init": "normal", "model.batch_norm": False, "optim.lr": 0.01,
            "seed": 0}
    stalled = _finish(record, 1, base, _rows([AT] * 3, [0.1] * 3, reasons=[None, None, "dead_relu"]), old=True)
    pruned = _finish(record, 2, {**base, "optim.lr": 0.02}, _rows([AT] * 2, [0.1] * 2, reasons=[None, "dead_relu"]),
                     pruned=True, old=True)
    assert stalled.outcome == "stalled" and pruned.outcome == "pruned"
    rows = {r["trial_id"]: r for r in trial_rows(record)}
    assert rows["t001"]["outcome"] == "stalled" and rows["t001"]["at_chance"] is True
    assert rows["t001"]["cause"] == "dead_relu"  # from "reason", where old records kept it
    assert rows["t002"]["outcome"] == "pruned" and rows["t002"]["at_chance"] is True
    assert rows["t002"]["cause"] == "dead_relu" and rows["t002"]["chance_epochs"] == 2
    # An old record that called a pruned trial "stalled" stays stalled: the recorded outcome is the one
    # MLflow's sweeper.outcome tag carries, and no reader re-derives it.
    t = json.loads((record.trials_dir / "t002.json").read_text())
    t["outcome"] = "stalled"
    assert outcome_fields(t, record.epochs("t002"))["outcome"] == "stalled"


def test_status_shows_the_recorded_outcome_and_pruned_at_chance(built, capsys):
    from sweeper.local import print_status

    _, rows, _, tmp_path = built
    assert status_outcome({"outcome": "pruned", "at_chance": True}) == "pruned (at chance)"
    assert status_outcome({"outcome": "pruned", "at_chance": False}) == "pruned"
    assert status_outcome({"outcome": None}, "running") == "running"
    print_status("toy_seeds", str(tmp_path))
    out = capsys.readouterr().out
    counts = Counter(r["outcome"] for r in rows)
    head = out.splitlines()[0]
    for outcome, n in counts.items():
        assert f"{n} {outcome}" in head
    assert out.count("pruned (at chance)") == sum(1 for r in rows if r["outcome"] == "pruned" and r["at_chance"])


def test_export_paths_keep_the_stem_and_go_into_a_folder(tmp_path):
    from sweeper.config import ConfigError

    record = SweepRecord(tmp_path / "paths")
    record.create({"name": "paths"}, "")
    record.write_trial("t1", {"trial_id": "t1", "status": "finished", "outcome": "completed", "epochs": 1})
    out = tmp_path / "out"
    assert export(record, out / "run.v2", fmt="csv") == [out / "run.v2.csv"]  # not run.csv
    assert export(record, out / "run.v3", fmt="csv", epochs=True) == [
        out / "run.v3.trials.csv", out / "run.v3.epochs.csv"]
    assert export(record, out / "named.csv", fmt="csv") == [out / "named.csv"]  # not named.csv.csv
    # no --format: the one --out names (runs.csv was written as runs.csv.parquet), else parquet
    assert export(record, out / "runs.csv") == [out / "runs.csv"]
    assert "trial_id" in (out / "runs.csv").read_text().splitlines()[0]  # CSV text, not parquet
    assert export(record, out / "runs.JSON") == [out / "runs.JSON"]
    assert export(record, out / "plain") == [out / "plain.parquet"]
    with pytest.raises(ConfigError, match=r"names a \.json file but --format is csv"):
        export(record, out / "clash.json", fmt="csv")
    # A table format export does not write is a mistake, not a dotted stem (a.xlsx.parquet, exit 0).
    with pytest.raises(ConfigError, match=r"a\.xlsx: export does not write \.xlsx files; it writes "
                                          r"\['parquet', 'csv', 'json'\]: give --out .*/a\.csv"):
        export(record, out / "a.xlsx")
    assert not (out / "a.xlsx.parquet").exists()
    assert export(record, out / "a.xlsx", fmt="csv") == [out / "a.xlsx.csv"]  # --format: as asked
    assert export(record, out, fmt="json") == [out / "paths.json"]  # a folder: <sweep>.json in it
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="afile is a file, not a directory"):
        export(record, tmp_path / "afile" / "x", fmt="csv")
    # Where nothing can be written (root passes os.access there) or a directory holds the name:
    # a ConfigError (exit 2), not a FileNotFoundError / PermissionError / pyarrow traceback.
    with pytest.raises(ConfigError, match=r"/proc/nope cannot be made in /proc \(files cannot be created"):
        export(record, Path("/proc/nope/x"), fmt="csv")
    # /proc exists: "No such file or directory" was the wrong reason to give for it.
    with pytest.raises(ConfigError, match=r"/proc is not writable \(files cannot be created there\)"):
        export(record, Path("/proc/x"), fmt="csv")
    (out / "taken.csv").mkdir()
    with pytest.raises(ConfigError, match="taken.csv is a directory, not a file"):
        export(record, out / "taken", fmt="csv")
    assert not list(Path("/proc").glob(".sweeper-probe-*"))


def test_report_to_a_place_nothing_can_be_written_is_exit_2(tmp_path):
    from conftest import run_sweeper

    record = SweepRecord(tmp_path / "rep")
    record.create({"name": "rep"}, "")
    out = run_sweeper("report", "rep", "--storage", str(tmp_path), "--out", "/proc/nope/report")
    assert out.returncode == 2, out.stderr
    assert "--out /proc/nope/report cannot be made in /proc" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("text,why", [("{\"trial_id\": ", "not JSON"), ("[1, 2]", "a JSON list")])
def test_a_damaged_record_file_is_named_not_a_traceback(tmp_path, text, why):
    from sweeper.config import ConfigError

    record = SweepRecord(tmp_path / "hurt")
    record.create({"name": "hurt"}, "")
    (record.trials_dir).mkdir(parents=True, exist_ok=True)
    (record.trials_dir / "t1.json").write_text(text)
    with pytest.raises(ConfigError, match=f"t1.json: the sweep record's file is damaged \\({why}"):
        trial_rows(record)
    (record.dir / "sweep.json").write_text(text)
    with pytest.raises(ConfigError, match="sweep.json: the sweep record's file is damaged"):
        record.meta()


def test_a_line_a_killed_driver_left_torn_is_skipped_and_the_next_append_starts_afresh(tmp_path):
    """A driver killed mid-append leaves a trial's epoch file (or decisions.jsonl) ending in half a
    line. Export crashed on it with a JSONDecodeError; the resumed driver's next line was glued on."""
    record = SweepRecord(tmp_path / "torn")
    record.create({"name": "torn"}, "")
    record.write_trial("t1", {"trial_id": "t1", "status": "running", "epochs": 1, "config": {}})
    record.append_epoch("t1", {"epoch": 1, "train_loss": 2.0, "val_accuracy": 0.3})
    with open(record.trials_dir / "t1.jsonl", "a") as f:
        f.write('{"epoch": 2, "val_acc')
    assert [e["epoch"] for e in record.epochs("t1")] == [1]
    files = export(record, tmp_path / "out", fmt="csv", epochs=True)
    with open(files[1]) as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1]
    record.append_epoch("t1", {"epoch": 2, "train_loss": 1.5, "val_accuracy": 0.5})  # the resumed driver
    assert [(e["epoch"], e["val_accuracy"]) for e in record.epochs("t1")] == [(1, 0.3), (2, 0.5)]

    record.append_decision({"trial_id": "t1", "rung": 1})
    with open(record.dir / "decisions.jsonl", "a") as f:
        f.write('{"trial_id": "t2", "ru')
    assert set(record.decisions()) == {"t1"}
    record.append_decision({"trial_id": "t3", "rung": 2})
    assert set(record.decisions()) == {"t1", "t3"}


@pytest.mark.parametrize("damage", ["truncated", "list", "directory"])
def test_every_verb_refuses_a_damaged_sweep_json_alike(tmp_path, damage):
    """status and report refused a damaged sweep.json while export wrote files from the rest."""
    from typer.testing import CliRunner

    from sweeper.cli import app

    record = SweepRecord(tmp_path / "hurt")
    record.create({"name": "hurt"}, "")
    record.write_trial("t1", {"trial_id": "t1", "status": "finished", "epochs": 0, "config": {}})
    path = record.dir / "sweep.json"
    if damage == "directory":
        path.unlink()
        path.mkdir()
    else:
        path.write_text('{"name": "hu' if damage == "truncated" else "[]")
    for verb in (["export", "hurt", "-f", "csv", "-o", str(tmp_path / "out")], ["status", "hurt"]):
        result = CliRunner().invoke(app, [*verb, "--storage", str(tmp_path)])
        assert result.exit_code == 2, (verb, result.output)
        assert "sweep.json: the sweep record's file is damaged" in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    if damage != "directory":  # stop needs only the driver's lease: "not running", not "damaged"
        result = CliRunner().invoke(app, ["stop", "hurt", "--storage", str(tmp_path)])
        assert "damaged" not in result.output and "not running" in " ".join(result.output.split()), result.output


def test_status_says_who_delivers_what_tracking_has_not_received(built, capsys, monkeypatch):
    """A running sweep's status read "5 operation(s) not yet delivered ... (None); `sweeper sync`
    retries": an empty reason, and the wrong tool while the live driver is delivering them."""
    import sweeper.local as local
    from sweeper.records import SweepRecord as Record

    class Pending:
        tracking_uri = "sqlite:///m.db"

        def __init__(self, error):
            self.error = error

        def pending(self):
            return 5

        def last_error(self):
            return self.error

    _, _, _, tmp_path = built
    meta = Record.meta
    monkeypatch.setattr(Record, "meta", lambda self: {**meta(self), "sweep_uid": "u1",
                                                      "tracking_uri": "sqlite:///m.db"})
    for live, error, expected in [
            (True, None, "MLflow: 5 operation(s) on their way to sqlite:///m.db "
                         "(the running driver delivers them)"),
            (False, None, "MLflow: 5 operation(s) not yet delivered to sqlite:///m.db; "
                          f"`sweeper sync toy_seeds --storage {tmp_path}` delivers them"),
            (False, "server down", "not yet delivered to sqlite:///m.db (server down); `sweeper sync")]:
        monkeypatch.setattr(local, "_tracker_for", lambda *a, e=error: Pending(e))
        monkeypatch.setattr(local, "_driver_state", lambda *a, l=live: ("running" if l else "not running", l))
        print_status = local.print_status
        print_status("toy_seeds", str(tmp_path))
        captured = capsys.readouterr()
        text = " ".join((captured.out + captured.err).split())
        assert expected in text and "(None)" not in text, text


def test_status_of_a_sweep_whose_trials_have_not_started_says_so(tmp_path, capsys):
    """A sweep stopped before its first trial: its header ended in a stray "; " above an empty
    table (found by a hostile pass)."""
    from sweeper.local import print_status
    from sweeper.records import SweepRecord as Record

    record = Record(tmp_path / "early")
    record.create({"name": "early", "metric": "val_accuracy", "planned_trials": 8}, "SWEEP = None\n")
    print_status("early", str(tmp_path))
    out = " ".join(capsys.readouterr().out.split())
    assert "sweep 'early': not running; 0/8 trials started no trial has started yet" in out, out
