"""Cost of the per-layer diagnostics on training, measured side by side in one process.

The same trial (same seed, same data) runs without the Diagnostics hook and with it in both of its
epoch-probe modes, interleaved `--repeats` times so that drift in machine load hits all of them; the
ratio of median epoch times is the overhead. ``diagnostics`` is the default,
``diagnostics.epoch_probe='training_step'`` (each epoch measured on one of its own training steps);
``diagnostics_fixed`` is ``'fixed'`` (an extra probe pass of the fixed batch after each epoch). No
Ray, no MLflow: this runs on any machine with torch (a GPU one included).
Torch runs --threads threads (default 1, what a 1-CPU trial gets): on a shared machine, OpenMP threads
that outnumber the free cores make single runs several times slower and the ratio meaningless.

    python bench/diagnostics_overhead.py --arch vgg16 --width 0.125 --epochs 3 --repeats 3

Also prints where the hook's time goes, timed inside the same runs: its step-0 measurement
(``on_fit_start``: layer discovery, one probe, the theory chain), its per-epoch work
(``on_epoch_end``; in 'fixed' mode the probe's forward and backward, about one training step), and the
recorded training step beside an unrecorded one; the per-epoch figure carries 1/epochs of step 0.

Writes bench/results/diagnostics_overhead.json: one entry per dataset and epoch length (other
entries kept), e.g. ``digits_21_steps``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sweeper.config import TrialConfig
from sweeper.data import load_splits
from sweeper.diagnostics import Diagnostics
from sweeper.train import fit, resolve_device

from _cli import at_least, device, machine, positive, run  # noqa: E402 - bench/ is the script's directory

ROOT = Path(__file__).resolve().parent.parent


class _Timed(Diagnostics):
    """Diagnostics that add up the seconds spent in their hook calls."""

    def __init__(self, cfg, seconds: dict[str, list[float]]):
        super().__init__(cfg)
        self.seconds = seconds

    def watch_step(self, ctx, y):
        watch = super().watch_step(ctx, y)
        return None if watch is None else _TimedWatch(watch, self.seconds["recorded_step"])

    def on_fit_start(self, ctx):
        t0 = time.perf_counter()
        try:
            return super().on_fit_start(ctx)
        finally:
            self.seconds["fit_start"].append(time.perf_counter() - t0)

    def on_epoch_end(self, ctx, metrics):
        t0 = time.perf_counter()
        try:
            return super().on_epoch_end(ctx, metrics)
        finally:
            self.seconds["epoch_end"].append(time.perf_counter() - t0)


class _TimedWatch:
    """The recorder's context, timed from entry to exit: the whole recorded step, hooks included."""

    def __init__(self, watch, seconds: list[float]):
        self.watch, self.seconds = watch, seconds

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self.watch.__enter__()

    def __exit__(self, *exc):
        try:
            return self.watch.__exit__(*exc)
        finally:
            self.seconds.append(time.perf_counter() - self.t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vgg16")
    ap.add_argument("--width", type=positive, default=0.125)
    ap.add_argument("--batch-norm", action="store_true")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--size", type=at_least(1), default=2048, help="examples, for --dataset synthetic")
    ap.add_argument("--epochs", type=at_least(1), default=3)
    ap.add_argument("--repeats", type=at_least(1), default=3)
    ap.add_argument("--device", type=device, default="auto")
    ap.add_argument("--threads", type=at_least(1), default=1, help="torch threads")
    args = ap.parse_args()
    started = time.time()
    torch.set_num_threads(args.threads)

    cfg = TrialConfig.from_flat({"model.arch": args.arch, "model.width": args.width,
                                 "model.batch_norm": args.batch_norm, "model.init": "he",
                                 "data.name": args.dataset, "epochs": args.epochs,
                                 "data.synthetic_size": args.size,
                                 "optim.lr": 0.01, "device": args.device})
    splits = load_splits(cfg.data, seed=cfg.seed)
    # Warm-up of every variant, so that none pays a first run: on CUDA the probe's batch is a new
    # shape, and cudnn.benchmark tunes each conv for it once per process (seen: +74% on an H200 when
    # only the plain variant was warmed up, +3.5% once both were).
    fit(cfg.replace(epochs=1), splits=splits)
    fixed = cfg.replace(**{"diagnostics.epoch_probe": "fixed"}).diagnostics
    fit(cfg.replace(epochs=1), splits=splits, hooks=[Diagnostics(cfg.diagnostics)])
    fit(cfg.replace(epochs=1), splits=splits, hooks=[Diagnostics(fixed)])
    steps = -(-len(splits.train_y) // cfg.data.batch_size)
    times = {"plain": [], "diagnostics": [], "diagnostics_fixed": []}
    hook_seconds: dict[str, list[float]] = {"fit_start": [], "epoch_end": [], "recorded_step": []}
    fixed_seconds: dict[str, list[float]] = {"fit_start": [], "epoch_end": [], "recorded_step": []}
    step_seconds = []
    for rep in range(args.repeats):
        for mode in (list(times) if rep % 2 == 0 else list(times)[::-1]):  # none always first
            hooks = {"plain": [], "diagnostics": [_Timed(cfg.diagnostics, hook_seconds)],
                     "diagnostics_fixed": [_Timed(fixed, fixed_seconds)]}[mode]
            t0 = time.perf_counter()
            result = fit(cfg, hooks=hooks, splits=splits)
            total = time.perf_counter() - t0
            # Per-epoch time includes the hook's end-of-epoch probe: that is the cost we measure.
            times[mode].append(total / result.epochs)
            if mode == "plain":
                step_seconds += [h["epoch_seconds"] / steps for h in result.history]  # steps only
    med = {mode: statistics.median(v) for mode, v in times.items()}
    plain, diag, fixed_probe = med["plain"], med["diagnostics"], med["diagnostics_fixed"]
    print(f"{args.arch} width={args.width} bn={args.batch_norm} on {resolve_device(cfg.device)}, "
          f"{args.dataset}: {steps} steps/epoch, {args.epochs} epochs x {args.repeats} repeats, "
          f"statistics over {cfg.diagnostics.probe_size} examples")
    print(f"median seconds/epoch (incl. evaluation): plain {plain:.3f}, with diagnostics {diag:.3f} "
          f"(epoch_probe='training_step', the default), {fixed_probe:.3f} (epoch_probe='fixed')")
    print(f"overhead: {100 * (diag / plain - 1):+.1f}% (default), {100 * (fixed_probe / plain - 1):+.1f}% "
          f"(fixed)  (repeats: {times})")
    print("goal: diagnostics <= 1.05x plain (issue #9)")
    step_ms = 1000 * statistics.median(step_seconds)
    hook_ms = {}
    for mode, seconds in (("training_step", hook_seconds), ("fixed", fixed_seconds)):
        ms = {k: 1000 * statistics.median(v) for k, v in seconds.items() if v}
        # A recorded step costs what it adds to an unrecorded one.
        ms["recorded_step_extra"] = ms.pop("recorded_step", step_ms) - step_ms
        ms["hook_per_epoch"] = ms["epoch_end"] + ms["recorded_step_extra"] + ms["fit_start"] / args.epochs
        hook_ms[mode] = ms
        print(f"hook ({mode}), median ms: step 0 (on_fit_start) {ms['fit_start']:.1f}, per epoch: "
              f"on_epoch_end {ms['epoch_end']:.1f} + recorded step's extra {ms['recorded_step_extra']:.1f}, "
              f"with step 0 spread over {args.epochs} epochs {ms['hook_per_epoch']:.1f}")
    print(f"one training step {step_ms:.1f} ms")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "diagnostics_overhead.json"
    try:
        entries = json.loads(path.read_text())
        if "config" in entries:  # the old layout: one run, no entries
            entries = {}
    except (OSError, ValueError):
        entries = {}
    name = args.dataset if args.dataset != "synthetic" else f"synthetic_{args.size}"
    key = f"{name}_{steps}_steps" + ("" if args.device in ("auto", "cpu") else f"_{args.device}")
    if (args.arch, args.width, args.batch_norm) != ("vgg16", 0.125, False):  # not the default model
        key += f"_{args.arch}_w{args.width:g}" + ("_bn" if args.batch_norm else "")
    entries[key] = {
        "config": cfg.to_flat(), "threads": args.threads, "repeats": args.repeats,
        "seconds_per_epoch": med, "ratio": diag / plain, "ratio_fixed": fixed_probe / plain,
        "per_repeat": times, "hook_ms": hook_ms, "training_step_ms": step_ms, "device": str(resolve_device(cfg.device)),
        "machine": machine(),
        "script_seconds": time.time() - started}
    command = "python bench/diagnostics_overhead.py" + (f" --dataset {args.dataset} --size {args.size}"
                                                        if args.dataset == "synthetic" else "")
    entries["commands"] = sorted({*entries.get("commands", []), command})
    path.write_text(json.dumps(entries, indent=1))


if __name__ == "__main__":
    run(main)
