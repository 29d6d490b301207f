"""One epoch of a sweeper trial vs a bare PyTorch loop: same model, init, data, batch size, threads.

Three variants, alternated rep by rep in one run (bare, fit, Ray trial, bare, fit, ...), so that drift
in machine load hits all three; every figure is a median of per-rep medians.

(a) bare: ``build_model`` under the same seed, the same uint8 splits (``load_splits``) batched and
    augmented by the same ``DeviceData.train_batches`` (so data cost is identical and the ratio is
    the loop's own overhead), an SGD step with the trial's settings, a plain ``no_grad`` validation
    pass; no per-step stats, no reporting, no checkpoint.
(b) fit: ``sweeper.train.fit`` with diagnostics off and a report callback that saves a checkpoint to a
    temporary directory each epoch, as ``sweeper/trial.py`` does (minus ``tune.report``).
(c) ray: the same config as a 1-trial sweep through ``sweeper.tuner.launch`` (``--local`` Ray with
    ``num_cpus=1``, FIFO, tracking to a temporary sqlite store). Its training time is the trial's own
    ``epoch_seconds`` from the sweep record (``SweepRecord.epochs``); its epoch time is the wall time
    between its results reaching the driver. sweeper turns Tune's file loggers off and the record drops
    Tune's timing fields, so this script wraps ``SweepCallback.on_trial_result`` in its own process to
    timestamp each result, keep Tune's ``time_this_iter_s`` and time the callback itself.
    ``time_this_iter_s`` is NOT the epoch period: a Tune function trainable reports synchronously
    (the training thread blocks in ``tune.report`` until the driver asks for the next result), and
    ``time_this_iter_s`` leaves out that round trip, which includes the driver's callbacks.

Two per-epoch times per variant:
  train  -- the training steps only (bare: timed around its loop; fit/ray: ``epoch_seconds``);
  epoch  -- report to report (bare: end of one epoch's validation to the next; ray: result arrival
            to arrival in the driver), i.e. training + validation + scheduler + checkpoint + report.
            Epoch 1 (set-up) and the last epoch (it adds the test pass) are left out.
Goal (issue #9): fit and ray epoch <= 1.05x bare epoch.

    python bench/trial_vs_bare.py                       # vgg11 width 1/8 on digits, batch 64
    python bench/trial_vs_bare.py --arch vgg16 --width 0.25 --epochs 8 --reps 5

Writes bench/results/trial_vs_bare.json and prints the medians and ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _cli import at_least, device, machine, positive, run  # noqa: E402 - bench/ is the script's directory

ROOT = Path(__file__).resolve().parent.parent

SPACE = '''
"""One trial: trial_vs_bare's Ray variant."""
from sweeper.spaces import Sweep
SWEEP = Sweep(
    name="{name}",
    space={{"model.arch": "{arch}", "model.width": {width}, "data.name": "{dataset}",
            "data.batch_size": {batch_size}, "data.synthetic_size": {size},
            "diagnostics.enabled": False, "device": "{device}"}},
    scheduler="fifo", max_epochs={epochs}, num_samples=1, seed=0,
)
'''


# ---- (a) the bare loop ------------------------------------------------------------------------------


def bare(cfg, splits, threads: int, *, benchmark: bool | None = None,
         stats: bool = False, fused: bool = False) -> dict[str, list[float]]:
    """A plain loop: returns per-epoch train seconds and end-of-epoch timestamps.

    Its SGD is the one fit builds (torch's default, foreach on CUDA). ``--explain`` adds three
    variants of it, to locate where fit's extra time goes: ``benchmark`` (cudnn.benchmark on, as fit
    sets it on CUDA; the plain loop leaves torch's default, off), ``stats`` (fit's per-step
    loss/top-1/top-5 sums on the device, ``sweeper.train._Totals``) and ``fused`` (torch's fused SGD,
    one kernel per step, to show what fusing would buy on a GPU).
    """
    import torch
    from torch import nn

    from sweeper.data import DeviceData
    from sweeper.models import build_model, split_outputs
    from sweeper.train import _Totals, resolve_device

    torch.set_num_threads(threads)
    device = resolve_device(cfg.device)
    on_cuda = device.type == "cuda"
    if not on_cuda:
        torch.set_flush_denormal(True)  # as fit does; it changes CPU speed, not the work
    channels_last = on_cuda and cfg.channels_last
    data = DeviceData(splits, cfg.data, device=device, channels_last=channels_last)
    torch.manual_seed(cfg.seed)  # the same init draws as fit
    model = build_model(cfg.model, num_classes=data.num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optim
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                          weight_decay=o.weight_decay, fused=True if fused else None)
    criterion = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_cuda and cfg.amp
                else contextlib.nullcontext)
    sync = (lambda: torch.cuda.synchronize(device)) if on_cuda else (lambda: None)

    saved_benchmark = torch.backends.cudnn.benchmark
    if benchmark is not None:
        torch.backends.cudnn.benchmark = benchmark
    train_s, ends = [], []
    for _ in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum = None
        totals = _Totals()
        for x, y in data.train_batches(gen):
            with autocast():
                logits = split_outputs(model(x))[0]
                loss = criterion(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if stats:
                totals.add(logits.detach(), y, loss.detach())
                loss_sum = totals.loss
            else:
                loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        loss_sum.sum().item()  # one read per epoch (and the CUDA sync)
        sync()
        train_s.append(time.perf_counter() - t0)
        model.eval()
        hits = None
        with torch.no_grad():
            for x, y in data.eval_batches("val"):
                with autocast():
                    h = (split_outputs(model(x))[0].argmax(1) == y).sum()
                hits = h if hits is None else hits + h
        float(hits)
        ends.append(time.perf_counter())
    torch.backends.cudnn.benchmark = saved_benchmark
    return {"train": train_s, "ends": ends}


# ---- (b) fit() with a checkpointing report ----------------------------------------------------------


def through_fit(cfg, splits, threads: int) -> dict[str, list[float]]:
    import torch

    from sweeper.train import fit

    torch.set_num_threads(threads)
    ends: list[float] = []

    def report(metrics, save) -> None:  # trial.py's report, minus tune.report
        ends.append(time.perf_counter())
        with tempfile.TemporaryDirectory(prefix="sweeper-ckpt-") as d:
            save(Path(d))

    result = fit(cfg, report=report, splits=splits)  # no hooks: diagnostics off
    return {"train": [h["epoch_seconds"] for h in result.history], "ends": ends}


# ---- (c) a real Ray Tune trial ----------------------------------------------------------------------


def through_ray(args, tmp: Path, rep: int) -> dict[str, list[float]]:
    from sweeper import tuner
    from sweeper.records import SweepRecord
    from sweeper.loading import load_sweep

    name = f"trial_vs_bare_{rep}"
    space = tmp / f"{name}.py"
    space.write_text(SPACE.format(name=name, arch=args.arch, width=args.width, dataset=args.dataset,
                                  batch_size=args.batch_size, size=args.size, epochs=args.epochs,
                                  device=args.device))
    store = tmp / "store"
    sweep, text = load_sweep(space, [f"storage={store}"])
    # sweeper turns Tune's file loggers off and its record drops Tune's timing fields, so the
    # driver-side callback is wrapped (here, in this process) to keep them: time_this_iter_s is
    # measured in the worker between reports; `arrivals` is when the driver got each result.
    seen: dict[int, dict[str, float]] = {}
    original = tuner.SweepCallback.on_trial_result

    def on_trial_result(self, iteration, trials, trial, result, **info):
        t0 = time.perf_counter()
        row = seen[int(result["training_iteration"])] = {
            "arrival": t0, "driver_cpu": time.process_time(),
            "time_this_iter_s": float(result["time_this_iter_s"])}
        try:
            return original(self, iteration, trials, trial, result, **info)
        finally:
            row["callback_s"] = time.perf_counter() - t0

    tuner.SweepCallback.on_trial_result = on_trial_result
    try:
        tuner.launch(sweep, text, local=True, num_cpus=1, quiet=True,
                     tracking_uri=f"sqlite:///{tmp}/{name}.db", tracking_wait_s=30)
    finally:
        tuner.SweepCallback.on_trial_result = original
    record = SweepRecord(store / name)
    (trial,) = record.trials()
    rows = record.epochs(trial["trial_id"])
    if len(rows) != args.epochs or sorted(seen) != list(range(1, args.epochs + 1)):
        raise RuntimeError(f"the Ray trial reported epochs {sorted(seen)} (record: {len(rows)} rows), "
                           f"expected 1..{args.epochs}; outcome {trial.get('outcome')}")
    return {"train": [float(r["epoch_seconds"]) for r in rows],
            "spacing": spacing([seen[e]["arrival"] for e in sorted(seen)]),
            "time_this_iter_s": [seen[e]["time_this_iter_s"] for e in sorted(seen)][1:-1],
            "callback_s": [seen[e]["callback_s"] for e in sorted(seen)][1:-1],
            # CPU seconds the driver process (all its threads: Tune's loop, sweeper's callback,
            # record, MLflow spool and delivery, lease heartbeat) spent per epoch, on a shared machine.
            "driver_cpu": spacing([seen[e]["driver_cpu"] for e in sorted(seen)]),
            "outcome": trial.get("outcome")}


# ---- the run ----------------------------------------------------------------------------------------


def spacing(ends: list[float]) -> list[float]:
    """Epochs 2..E-1: time from the previous epoch's end (its report) to this one's."""
    return [b - a for a, b in zip(ends[:-1], ends[1:])][:-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vgg11")
    ap.add_argument("--width", type=positive, default=0.125)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--batch-size", type=at_least(1), default=64)
    ap.add_argument("--size", type=at_least(1), default=2048, help="examples, for --dataset synthetic")
    ap.add_argument("--epochs", type=at_least(3), default=10, help="per run (>= 3: epoch 1 and the last "
                    "are left out of the epoch spacing)")
    ap.add_argument("--reps", type=at_least(1), default=3)
    ap.add_argument("--threads", type=at_least(1), default=1,
                    help="torch threads for bare and fit; a 1-CPU Ray trial gets OMP_NUM_THREADS=1")
    ap.add_argument("--device", type=device, default="auto")
    ap.add_argument("--no-ray", action="store_true", help="only (a) and (b)")
    ap.add_argument("--explain", action="store_true",
                    help="also the bare loop with cudnn.benchmark on, with fit's per-step sums, "
                         "and with torch's fused SGD")
    args = ap.parse_args()
    if args.epochs < 3:
        ap.error("--epochs must be >= 3")
    # Ray workers inherit this (Ray sets it to the trial's CPUs only when it is unset).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    from sweeper.config import TrialConfig
    from sweeper.data import load_splits
    from sweeper.loading import load_sweep
    from sweeper.spaces import sample_config

    started = time.time()
    variants = (["bare", "fit"] + (["bare_bench", "bare_stats", "bare_fused"] if args.explain else [])
                + ([] if args.no_ray else ["ray"]))
    per_rep: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="trial_vs_bare-") as tmp:
        # The config the Ray trial gets, built from the same space file the way the tuner builds it.
        space = Path(tmp) / "config.py"
        space.write_text(SPACE.format(name="config", arch=args.arch, width=args.width,
                                      dataset=args.dataset, batch_size=args.batch_size,
                                      size=args.size, epochs=args.epochs, device=args.device))
        cfg = TrialConfig.from_flat(sample_config(load_sweep(space)[0]))
        splits = load_splits(cfg.data, seed=cfg.seed)
        torch.set_num_threads(args.threads)
        through_fit(cfg.replace(epochs=1), splits, args.threads)  # warm-up: allocator, kernels
        for rep in range(args.reps):
            for v in variants:
                t0 = time.perf_counter()
                if v.startswith("bare"):
                    r = bare(cfg, splits, args.threads, benchmark=True if v == "bare_bench" else None,
                             stats=v == "bare_stats", fused=v == "bare_fused")
                    r["spacing"] = spacing(r.pop("ends"))
                elif v == "fit":
                    r = through_fit(cfg, splits, args.threads)
                    r["spacing"] = spacing(r.pop("ends"))
                else:
                    r = through_ray(args, Path(tmp), rep)
                r["train"] = r["train"][1:-1]
                r["wall_seconds"] = time.perf_counter() - t0
                per_rep[v].append(r)
                print(f"rep {rep + 1}/{args.reps} {v:<12}: train {statistics.median(r['train']):.3f} s,"
                      f" epoch {statistics.median(r['spacing']):.3f} s  ({r['wall_seconds']:.0f} s)",
                      flush=True)

    def med(v: str, key: str) -> float:
        return statistics.median(statistics.median(r[key]) for r in per_rep[v])

    summary = {v: {"train_s": med(v, "train"), "epoch_s": med(v, "spacing")} for v in variants}
    if "ray" in summary:
        summary["ray"]["time_this_iter_s"] = med("ray", "time_this_iter_s")
        summary["ray"]["sweep_callback_s"] = med("ray", "callback_s")
        summary["ray"]["driver_cpu_s"] = med("ray", "driver_cpu")
    ratios = {}
    for v in variants[1:]:
        ratios[f"{v}_epoch_vs_bare"] = summary[v]["epoch_s"] / summary["bare"]["epoch_s"]
        ratios[f"{v}_train_vs_bare"] = summary[v]["train_s"] / summary["bare"]["train_s"]
    steps = -(-len(splits.train_y) // cfg.data.batch_size)
    print(f"\n{args.arch} width={args.width} on {args.dataset} ({len(splits.train_y)} train images, "
          f"{steps} steps of {cfg.data.batch_size}), {args.threads} thread(s), "
          f"{args.epochs} epochs x {args.reps} reps; medians of per-rep medians, epochs 2..{args.epochs - 1}")
    print(f"{'variant':<12} {'train s/epoch':>14} {'epoch s':>9} {'epoch/bare':>11} {'train/bare':>11}")
    for v in variants:
        s = summary[v]
        print(f"{v:<12} {s['train_s']:>14.3f} {s['epoch_s']:>9.3f} "
              f"{s['epoch_s'] / summary['bare']['epoch_s']:>10.3f}x "
              f"{s['train_s'] / summary['bare']['train_s']:>10.3f}x")
    if "ray" in summary:
        r = summary["ray"]
        ratios["ray_time_this_iter_vs_bare"] = r["time_this_iter_s"] / summary["bare"]["epoch_s"]
        print(f"ray: Tune's time_this_iter_s {r['time_this_iter_s']:.3f} s "
              f"({ratios['ray_time_this_iter_vs_bare']:.3f}x bare epoch; it leaves out the report "
              f"round trip); sweeper's driver callback {1000 * r['sweep_callback_s']:.1f} ms per "
              f"result; the driver process used {1000 * r['driver_cpu_s']:.1f} ms CPU per epoch")
    print("goal: fit and ray epoch <= 1.05x bare")

    row = {"config": cfg.to_flat(), "threads": args.threads, "epochs": args.epochs,
           "reps": args.reps, "train_images": len(splits.train_y), "median": summary,
           "ratios": ratios, "goal_epoch_ratio": 1.05, "per_rep": per_rep,
           "machine": {**machine(),
                       "device": str(torch.device("cuda" if torch.cuda.is_available() else "cpu"))},
           "script_seconds": time.time() - started}
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "trial_vs_bare.json").write_text(json.dumps(row, indent=1, default=str))


if __name__ == "__main__":
    run(main)
