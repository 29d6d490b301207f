"""How close a finished sweep ran to its trials' own time: span vs the ideal, from its record alone.

    sweeper launch search_spaces/vgg_depth.py --local dataset=digits width=1/8 max_epochs=6
    python bench/study_span.py vgg_depth --workers 2

span  = last trial's finish - first trial's start (the driver's clock, in the record);
ideal = the sum of every epoch's training seconds (``epoch_seconds``, measured in the trial) divided
        by the workers. Evaluation, checkpoints, trial start-up and the driver's bookkeeping are left
        out of the ideal on purpose: they are what this ratio measures (goal in issue #9: <= 1.3x).
Writes bench/results/study_span.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from sweeper.records import SweepRecord

from _cli import at_least, machine, run  # noqa: E402 - bench/ is the script's directory

GOAL = 1.3  # issue #9
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--storage", default="sweeps")
    ap.add_argument("--workers", type=at_least(1), default=os.cpu_count())
    args = ap.parse_args()
    record = SweepRecord(Path(args.storage) / args.name)
    trials = record.trials()
    if not trials:
        raise SystemExit(f"no trials in {record.dir}")
    starts = [t["created"] for t in trials if "created" in t]
    ends = [t["finished"] for t in trials if "finished" in t]
    train = sum(float(e.get("epoch_seconds", 0.0)) for t in trials for e in record.epochs(t["trial_id"]))
    epochs = sum(len(record.epochs(t["trial_id"])) for t in trials)
    span = max(ends) - min(starts)
    ideal = train / args.workers
    row = {"sweep": args.name, "trials": len(trials), "epochs": epochs, "workers": args.workers,
           "span_s": span, "training_s": train, "ideal_s": ideal, "ratio": span / ideal,
           "machine": machine(), "goal": {"ratio_at_most": GOAL}}
    print(f"{args.name}: {len(trials)} trials, {epochs} epochs; span {span:.0f} s vs ideal {ideal:.0f} s "
          f"({train:.0f} training seconds / {args.workers} workers): {span / ideal:.2f}x")
    print(f"goal: <= {GOAL}x (issue #9, the README quick study)")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_span.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    run(main)
