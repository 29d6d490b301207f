"""ASHA vs FIFO on the quick vgg_depth study: epochs run, wall time, and the best accuracy each found.

Both sweeps run here, one after the other, on a fresh local Ray with the same sampled configurations
(same seed), so the ratios compare like with like. The defaults are issue #9's case: the 24 cells x 15
epochs, ASHA across the sweep with its first rung at epoch 1 (rungs 1, 3, 9):

    python bench/asha_vs_fifo.py                               # ~3 min on 2 quiet cores
    python bench/asha_vs_fifo.py --grace-period 3              # the study's own first rung
    python bench/asha_vs_fifo.py --num-samples 3 --prune-within cell   # per-cell rungs need peers

With the study's grace period of 3 no successive halving can reach 0.35x: every trial runs 3 of its 15
epochs before any rung (0.2x), and synchronous halving would run 0.38x in all.

Writes bench/results/asha_vs_fifo.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from sweeper.loading import load_sweep
from sweeper.tuner import launch

from _cli import at_least, machine, run  # noqa: E402 - bench/ is the script's directory

GOAL_EPOCHS, GOAL_POINTS = 0.35, 0.5  # issue #9
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=at_least(1), default=1)
    ap.add_argument("--max-epochs", type=at_least(1), default=15)
    ap.add_argument("--num-cpus", type=at_least(1), default=None)
    ap.add_argument("--grace-period", type=at_least(0), default=1,
                    help="ASHA's first rung (0: the study's own, 3 for vgg_depth)")
    ap.add_argument("--prune-within", choices=["cell", "sweep"], default="sweep",
                    help="ASHA's peers: the trial's grid cell (the study's default) or the sweep")
    args = ap.parse_args()

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scheduler in ("asha", "fifo"):
            overrides = ["dataset=digits", "width=1/8", f"max_epochs={args.max_epochs}",
                         f"num_samples={args.num_samples}", f"scheduler={scheduler}",
                         f"prune_within={args.prune_within}",
                         *([f"grace_period={args.grace_period}"] if args.grace_period else []),
                         f"storage={tmp}/{scheduler}", f"name=bench_{scheduler}"]
            sweep, text = load_sweep(ROOT / "search_spaces" / "vgg_depth.py", overrides)
            t0 = time.time()
            result = launch(sweep, text, local=True, num_cpus=args.num_cpus, quiet=True,
                            tracking_uri=f"sqlite:///{tmp}/{scheduler}.db")
            rows[scheduler] = {"seconds": time.time() - t0, "epochs": result.epochs,
                               "trials": result.trials, "outcomes": result.outcomes,
                               "best_val_accuracy": result.best["best"]["val_accuracy"]
                               if result.best else None,
                               "best_trial": result.best["name"] if result.best else None}
    a, f = rows["asha"], rows["fifo"]
    print(f"{'':6} {'trials':>6} {'epochs':>6} {'seconds':>8} {'best val_acc':>12}  best trial")
    for name, r in rows.items():
        print(f"{name:6} {r['trials']:>6} {r['epochs']:>6} {r['seconds']:>8.0f} "
              f"{r['best_val_accuracy']:>12.4f}  {r['best_trial']}")
    gap = 100 * (a["best_val_accuracy"] - f["best_val_accuracy"])
    print(f"ASHA/FIFO: epochs {a['epochs'] / f['epochs']:.2f}x, wall time {a['seconds'] / f['seconds']:.2f}x, "
          f"best val accuracy {gap:+.1f} points")
    print(f"goal: ASHA <= {GOAL_EPOCHS}x FIFO's epochs, its best within {GOAL_POINTS} points of FIFO's")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "asha_vs_fifo.json").write_text(json.dumps(
        {"config": vars(args), "epochs_ratio": a["epochs"] / f["epochs"],
         "seconds_ratio": a["seconds"] / f["seconds"], "best_gap_points": gap,
         "goal": {"epochs_ratio_at_most": GOAL_EPOCHS, "best_gap_points_within": GOAL_POINTS},
         **rows, "machine": machine()}, indent=1))


if __name__ == "__main__":
    run(main)
