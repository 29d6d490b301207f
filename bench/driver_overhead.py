"""Ray bookkeeping: many short trials through the real launch path vs the ideal.

The ideal span is (sum of the trials' own time) / concurrency: what a sweep would take if starting,
reporting, checkpointing, recording and tracking trials cost nothing. A trial's own time is measured
in this process, side by side in the same run: the same config through ``fit()`` with nothing around
it (data already decoded, as a reused worker has it). Goal (issue #9): launch span <= 1.15x ideal.

    python bench/driver_overhead.py --trials 200 --num-cpus 2                # ~0.45 s: the issue's ~0.5 s
    python bench/driver_overhead.py --trials 200 --num-cpus 2 --width 0.125  # ~0.23 s trials
    python bench/driver_overhead.py --num-cpus 1   # one trial slot: the driver has a core of its own
    python bench/driver_overhead.py --rounds 3     # the median of 3 whole measurements

With ``--num-cpus 2`` on a 2-core machine the driver (Tune's loop, sweeper's callback, MLflow
delivery) runs on the trials' cores, so every CPU second it spends is taken from them; with
``--num-cpus 1`` it has the other core, as a cluster's driver has its own node, and what is left is
the bookkeeping's latency alone (start, report, checkpoint, stop, reuse of the worker).

Writes bench/results/driver_overhead.json (``_w<width>``, ``_cpus<n>`` added for other widths and
slot counts) and prints the ratio, then where the span's worker-seconds went: training epochs (vs
the same epochs solo), the rest of each trial's life as the driver saw it, and worker slots that
held no trial.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

from _cli import at_least, machine, positive, run  # noqa: E402 - bench/ is the script's directory

ROOT = Path(__file__).resolve().parent.parent
# The workload is 200 trials of ~0.5 s: smallcnn at width 1/4 on digits is ~0.45 s here.
DEFAULT_WIDTH = 0.25
GOAL = 1.15

SPACE = '''
"""Many tiny trials: the driver, not training, is what this measures."""
from ray import tune
from sweeper.spaces import Sweep
SWEEP = Sweep(
    name="overhead",
    space={{"model.arch": "smallcnn", "model.width": {width!r}, "data.name": "digits",
            "data.limit": {limit!r}, "diagnostics.enabled": False,
            "optim.lr": tune.loguniform(1e-3, 1e-1)}},
    scheduler="fifo", max_epochs=1, num_samples={trials}, seed=0,
)
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=at_least(1), default=200)
    ap.add_argument("--num-cpus", type=at_least(1), default=2)
    ap.add_argument("--limit", type=at_least(1), default=None,
                    help="training images per trial (default: all of digits' ~1300)")
    ap.add_argument("--width", type=positive, default=DEFAULT_WIDTH,
                    help="smallcnn width: 0.25 (default) is a ~0.45 s trial on this 2-core machine, "
                         "the issue's ~0.5 s; 0.125 a ~0.23 s one")
    ap.add_argument("--rounds", type=at_least(1), default=1,
                    help="repeat the whole measurement (solo fits, sweep, solo fits) this many times "
                         "and give the median ratio: one round's ratio moves by +-15%% with this "
                         "machine's speed, as much as the goal's margin")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # one CPU per trial, as the sweep gives each
    rows = []
    for r in range(args.rounds):
        if args.rounds > 1:
            print(f"round {r + 1} of {args.rounds}")
        rows.append(one_round(args))
    row = dict(rows[-1]) if args.rounds == 1 else {
        "rounds": rows, "ratio_trials_median": statistics.median(x["ratio_trials"] for x in rows),
        "ratio_trials_each": [x["ratio_trials"] for x in rows]}
    if args.rounds > 1:
        each = ", ".join(f"{x:.2f}x" for x in row["ratio_trials_each"])
        print(f"median of {args.rounds} rounds: {row['ratio_trials_median']:.2f}x the ideal ({each})")
    print(f"goal: first trial start to last finish <= {GOAL}x the ideal (issue #9; the launch figure "
          "adds Ray's start and shutdown, which no trial waits on)")
    row["goal"] = {"ratio_trials_at_most": GOAL}
    row["machine"] = machine()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = ("driver_overhead" + ("" if args.width == DEFAULT_WIDTH else f"_w{args.width:g}")
            + ("" if args.num_cpus == 2 else f"_cpus{args.num_cpus}")
            + ("" if args.rounds == 1 else f"_rounds{args.rounds}"))
    (out / f"{name}.json").write_text(json.dumps(row, indent=1))


def one_round(args: argparse.Namespace) -> dict:
    """Solo fits, the sweep, solo fits again: one ratio, printed, and its figures as a dict."""
    from sweeper.config import TrialConfig
    from sweeper.loading import load_sweep
    from sweeper.records import SweepRecord
    from sweeper.spaces import sample_config
    from sweeper.train import fit
    from sweeper.tuner import launch

    with tempfile.TemporaryDirectory() as tmp:
        space = Path(tmp) / "overhead.py"
        space.write_text(SPACE.format(trials=args.trials, limit=args.limit, width=args.width))
        sweep, text = load_sweep(space, [f"storage={tmp}/store"])
        cfg = TrialConfig.from_flat(sample_config(sweep))
        fit(cfg)  # decode the data once, as a reused worker has it
        solo, solo_epoch = [], []

        def time_solo(n: int) -> None:
            for _ in range(n):
                t0 = time.perf_counter()
                solo_epoch.append(fit(cfg).history[-1]["epoch_seconds"])
                solo.append(time.perf_counter() - t0)

        # Half before the sweep and half after: the solo time drifts by ~10% between minutes on a
        # shared machine, which moved the ratio more than what it measures.
        time_solo(5)

        t0 = time.time()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = launch(sweep, text, local=True, num_cpus=args.num_cpus, quiet=True,
                        tracking_uri=f"sqlite:///{tmp}/ml.db", tracking_wait_s=60)
        span = time.time() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        time_solo(5)
        per_trial = statistics.median(solo)
        # On 2 cores every CPU second the driver spends (Tune's loop, sweeper's callback, record,
        # tracking thread) is taken from the trials; Ray's own processes (raylet, GCS, workers) are
        # children, counted once they have exited (after launch shut Ray down).
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        driver_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        ray_cpu = (children1.ru_utime - children0.ru_utime) + (children1.ru_stime - children0.ru_stime)

        record = SweepRecord(Path(tmp) / "store" / "overhead")
        created = sorted(t["created"] for t in record.trials())
        finished = sorted(t["finished"] for t in record.trials() if t.get("finished"))
        trial_span = finished[-1] - created[0] if created and finished else float("nan")
        # Where the span went, in worker-seconds: the trials' training epochs (slower than solo
        # when the driver takes CPU from them), the rest of each trial's life as the driver saw it
        # (start, report, checkpoint, stop), and the time a worker slot held no trial.
        trained = sum(e["epoch_seconds"] for t in record.trials()
                      for e in record.epochs(t["trial_id"]) if "epoch_seconds" in e)
        lived = sum(t["finished"] - t["created"] for t in record.trials() if t.get("finished"))

    ideal = args.trials * per_trial / args.num_cpus
    # The solo fits drift by 10-25% between minutes on a shared machine (1.25-1.63 s for the same
    # fit within one minute, 2026-11-27), as much as the goal's margin: the ratio is also given at
    # the fastest and the slowest solo fit, so one run shows how far its figure can be trusted.
    spread = [trial_span / (args.trials * t / args.num_cpus) for t in (max(solo), min(solo))]
    row = {"trials": args.trials, "num_cpus": args.num_cpus, "width": args.width, "fit_seconds_per_trial": per_trial,
           "ideal_seconds": ideal, "launch_seconds": span, "first_start_to_last_finish": trial_span,
           "ratio_launch": span / ideal, "ratio_trials": trial_span / ideal,
           "ratio_trials_at_solo_extremes": spread, "solo_seconds": solo,
           "driver_cpu_seconds": driver_cpu,
           "solo_epoch_seconds": statistics.median(solo_epoch),
           "worker_seconds": {"training": trained, "rest_of_trial_life": lived - trained,
                              "idle_slots": args.num_cpus * trial_span - lived,
                              "training_if_solo": args.trials * statistics.median(solo_epoch)},
           "ray_processes_cpu_seconds": ray_cpu,
           "outcomes": result.outcomes}
    print(f"{args.trials} trials of {per_trial:.2f} s on {args.num_cpus} CPUs: ideal {ideal:.0f} s; "
          f"launch took {span:.0f} s ({span / ideal:.2f}x), first trial start to last finish "
          f"{trial_span:.0f} s ({trial_span / ideal:.2f}x; {spread[0]:.2f}-{spread[1]:.2f}x at the "
          f"slowest and fastest of the {len(solo)} solo fits, {max(solo):.2f} and {min(solo):.2f} s)")
    print(f"CPU seconds: driver process {driver_cpu:.1f} ({1000 * driver_cpu / args.trials:.0f} ms per "
          f"trial), Ray's processes incl. workers {row['ray_processes_cpu_seconds']:.1f}, trials' own "
          f"{args.trials * per_trial:.1f}")
    ws = row["worker_seconds"]
    print(f"worker-seconds: training {ws['training']:.1f} (solo would be "
          f"{ws['training_if_solo']:.1f}), rest of the trials' lives {ws['rest_of_trial_life']:.1f}, "
          f"idle slots {ws['idle_slots']:.1f}")
    return row


if __name__ == "__main__":
    run(main)
