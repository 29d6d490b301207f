"""Packed trials on one GPU: 1, 2, 4, 8 trials side by side, aggregate images/s and GPU utilisation.

Each trial is its own process (as a Ray worker would be) running ``sweeper.train.fit`` on synthetic
CIFAR-size data after a one-epoch warm-up; all start their measured fit together (a barrier after the
warm-up), and the row says how much of it they spent side by side (``overlap``); the parent samples NVML utilisation every 0.2 s and keeps
the samples taken while all of them were training (each reports its window), and reads
each trial's last-epoch images/s and peak memory from its result. The ratio that matters is the
aggregate images/s at k trials over the images/s of one trial alone: what packing buys on this card
for this model. No Ray, no MLflow (a bare GPU machine has neither).

    python bench/gpu_packing.py --arch vgg11 --width 1 --counts 1 2 4 8

Writes bench/results/gpu_packing.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _cli import at_least, device, jsonable, machine, positive, run  # noqa: E402 - bench/ is the script's directory

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, sys, time, torch
from sweeper.config import TrialConfig
from sweeper.train import fit
flat = json.loads(sys.argv[1])
cfg = TrialConfig.from_flat(flat)
fit(cfg.replace(epochs=1))  # warm-up (CUDA context, cudnn), outside the window that is measured
print("READY", flush=True)
sys.stdin.readline()  # the parent's go, sent once every trial is warm: they train side by side
start = time.time()
result = fit(cfg)
end = time.time()
peaks = [h.get("gpu_memory_peak_mb", float("nan")) for h in result.history]
print("RESULT " + json.dumps({"images_per_second": result.last["images_per_second"],
                              "peak_mb": max(peaks), "epochs": len(result.history),
                              "start": start, "end": end}))
"""


def _utilisation_sampler(stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # no NVML: utilisation is left out, not faked
        return
    while not stop.is_set():
        samples.append((time.time(), float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)))
        time.sleep(0.2)


def run_packed(k: int, flat: dict) -> dict:
    stop, samples = threading.Event(), []
    sampler = threading.Thread(target=_utilisation_sampler, args=(stop, samples), daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    # stderr to files: a pipe nobody reads while the others warm up could fill and stall a trial
    errs = [tempfile.TemporaryFile(mode="w+") for _ in range(k)]
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps({**flat, "seed": i})],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                              text=True)
             for i, err in enumerate(errs)]

    def failed(p, err) -> SystemExit:
        p.kill()
        err.seek(0)
        return SystemExit(f"packed trial failed (k={k}):\n{err.read()[-2000:]}")

    # A barrier: each trial warms up, says READY and waits; all start together. Without it, 2-epoch
    # trials of a few seconds started as their processes came up and barely overlapped (8 trials on
    # an H200: no NVML sample with all 8 training), and the summed rates overstated what packing buys.
    for p, err in zip(procs, errs):
        if p.stdout.readline().strip() != "READY":
            raise failed(p, err)
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p, err in zip(procs, errs):
        out, _ = p.communicate()
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            raise failed(p, err)
        results.append(json.loads(line[-1][7:]))
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    # Only while every trial trains: start-up (torch import, CUDA context, warm-up) and stragglers
    # would otherwise dominate the samples (a first version took the median of all: 0%).
    lo, hi = max(r["start"] for r in results), min(r["end"] for r in results)
    steady = [u for t, u in samples if lo <= t <= hi]
    longest = max(r["end"] - r["start"] for r in results)
    return {"trials": k, "wall_s": wall,
            # the share of the longest trial's measured fit during which all k trained together
            "overlap": max(hi - lo, 0.0) / longest if longest > 0 else 0.0,
            "aggregate_images_per_second": sum(r["images_per_second"] for r in results),
            "per_trial_images_per_second": [r["images_per_second"] for r in results],
            "peak_mb_per_trial": max(r["peak_mb"] for r in results),
            "gpu_utilisation_median": statistics.median(steady) if steady else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vgg11")
    ap.add_argument("--width", type=positive, default=1.0)
    ap.add_argument("--batch-norm", action="store_true", default=True)
    ap.add_argument("--size", type=at_least(1), default=20000, help="synthetic examples per trial")
    ap.add_argument("--batch-size", type=at_least(1), default=128)
    ap.add_argument("--epochs", type=at_least(1), default=3)
    ap.add_argument("--device", type=device, default="cuda",
                    help="cuda (default; refused on a machine without one), cpu only to try the script")
    ap.add_argument("--counts", type=at_least(1), nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    import torch  # the trials are child processes; the parent only checks and names the device

    from sweeper.config import TrialConfig
    flat = {"model.arch": args.arch, "model.width": args.width, "model.batch_norm": args.batch_norm,
            "data.name": "synthetic", "data.synthetic_size": args.size,
            "data.batch_size": args.batch_size, "epochs": args.epochs, "device": args.device,
            "diagnostics.enabled": False, "optim.lr": 0.01}
    TrialConfig.from_flat(flat)  # a bad setting is refused here, not in each trial's process
    rows = []
    print(f"{'trials':>6} {'agg img/s':>10} {'x one':>6} {'GPU util %':>10} {'peak MiB/trial':>14} "
          f"{'overlap':>7}")
    for k in args.counts:
        row = run_packed(k, flat)
        base = rows[0]["aggregate_images_per_second"] if rows else row["aggregate_images_per_second"]
        row["speedup_vs_one"] = row["aggregate_images_per_second"] / base
        rows.append(row)
        util = row["gpu_utilisation_median"]
        print(f"{k:>6} {row['aggregate_images_per_second']:>10.0f} {row['speedup_vs_one']:>6.2f} "
              f"{'n/a' if util is None else f'{util:.0f}':>10} {row['peak_mb_per_trial']:>14.0f} "
              f"{row['overlap']:>7.0%}", flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_packing.json").write_text(json.dumps(jsonable(
        {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
         "config": flat, "rows": rows, "machine": machine()}), indent=1))


if __name__ == "__main__":
    run(main)
