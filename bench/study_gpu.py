"""The vgg_depth study's 72 trials packed on one GPU: E epochs of every trial, measured, and the
whole study's time projected from it (issue #9: the full-width CIFAR-size study in <= 1 GPU-hour).

The trials are the study's (``search_spaces/vgg_depth.py``): VGG-11/13/16/19 x init normal/xavier/he x
BatchNorm off/on, three learning rates per cell drawn log-uniform in [1e-3, 1e-1], full width, the
compact head, SGD with the plateau schedule and weight decay 5e-4, batch 128, the colour shift, and
diagnostics on (the study records them). The data are synthetic images of CIFAR-10's shape and size:
45,000 training images per epoch (``--size 62500``: 72% of a synthetic set trains). The space file
itself imports Ray, which a bare GPU machine lacks, so its fixed values are restated here.

``--workers`` long-lived processes (what Ray's reused trial actors are) take trials from one queue as
they free up, each with one torch thread (a 1-CPU Ray trial's OMP_NUM_THREADS); the parent samples
NVML utilisation. Measured: the wall time from the first worker's start to the last trial's end
(process start-up, data generation, cuDNN autotuning and each trial's test pass included), and each
epoch's seconds inside the trials. Projected from it:

  FIFO bound   every trial runs all ``--max-epochs``: the measured wall time scaled by the epochs,
               start-up included (an upper bound for any scheduler);
  ASHA range   per cell, 3 trials, grace 3, reduction factor 3: at least 3 x 3 + 6 + 18 + 3 = 36
               epochs (one survivor per rung), at most 3 x 30 = 90 (nothing stopped), each trial's
               epochs at its measured packed epoch time, spread over the workers.

No Ray, no MLflow (a bare GPU machine has neither).

    python bench/study_gpu.py --workers 16 --epochs 2          # on a GPU machine
    python bench/study_gpu.py --device cpu --width 0.125 --size 600 --workers 2 --lrs 1 --archs vgg11

Writes bench/results/study_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import random
import statistics
import threading
import time
from pathlib import Path

from _cli import at_least, device, jsonable, machine, positive, run  # noqa: E402 - bench/ is the script's directory

ROOT = Path(__file__).resolve().parent.parent


def study_configs(args) -> list[dict]:
    """The study's trials as flat configs (vgg_depth.py's fixed values; lr drawn per trial)."""
    rng = random.Random(args.seed)
    configs = []
    for arch in args.archs:
        for init in ("normal", "xavier", "he"):
            for bn in (False, True):
                for _ in range(args.lrs):
                    configs.append({
                        "model.arch": arch, "model.init": init, "model.batch_norm": bn,
                        "model.init_std": 0.01, "model.width": args.width, "model.head": "compact",
                        "optim.lr": 10 ** rng.uniform(-3, -1), "optim.schedule": "plateau",
                        "optim.weight_decay": 5e-4, "data.name": "synthetic",
                        "data.synthetic_size": args.size, "data.batch_size": 128,
                        "data.color_shift": 0.1, "epochs": args.epochs, "device": args.device,
                        "seed": len(configs)})
    return configs


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # a 1-CPU Ray trial gets OMP_NUM_THREADS=1


def _trial(flat: dict) -> dict:
    """One trial as trial.py runs it (fit with the Diagnostics hook), minus Tune and MLflow."""
    from sweeper.config import TrialConfig
    from sweeper.diagnostics import trial_hooks
    from sweeper.train import fit

    start = time.time()
    cfg = TrialConfig.from_flat(flat)
    result = fit(cfg, hooks=trial_hooks(cfg))
    return {"arch": flat["model.arch"], "batch_norm": flat["model.batch_norm"],
            "init": flat["model.init"], "start": start, "end": time.time(),
            "epoch_seconds": [h["epoch_seconds"] for h in result.history],
            "images_per_second": [h["images_per_second"] for h in result.history],
            "gpu_memory_peak_mb": max((h.get("gpu_memory_peak_mb", float("nan"))
                                       for h in result.history), default=float("nan")),
            "outcome": result.outcome}


def _sample_utilisation(stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # no NVML (a CPU try-out): utilisation is left out, not faked
        return
    while not stop.is_set():
        samples.append((time.time(), float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)))
        time.sleep(0.2)


def asha_epochs_per_cell(trials: int, grace: int, rf: int, max_epochs: int) -> int:
    """The fewest epochs a cell of ``trials`` runs under ASHA: all reach the first rung, and at each
    rung the top 1/rf (at least one) go on to the next, the last stretch to ``max_epochs``."""
    rungs, r = [], grace
    while r < max_epochs:
        rungs.append(r)
        r *= rf
    epochs, alive, done = 0, trials, 0
    for rung in rungs:
        epochs += alive * (rung - done)
        done, alive = rung, max(1, alive // rf)
    return epochs + alive * (max_epochs - done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=at_least(1), default=8, help="trials training at once on the GPU")
    ap.add_argument("--epochs", type=at_least(1), default=2, help="epochs each trial runs here")
    ap.add_argument("--max-epochs", type=at_least(1), default=30, help="the study's budget per trial")
    ap.add_argument("--archs", nargs="+", default=["vgg11", "vgg13", "vgg16", "vgg19"])
    ap.add_argument("--lrs", type=at_least(1), default=3, help="learning rates per cell (num_samples)")
    ap.add_argument("--width", type=positive, default=1.0)
    ap.add_argument("--size", type=at_least(20), default=62500,
                    help="synthetic examples per trial (62500: CIFAR-10's 45,000 training images)")
    ap.add_argument("--device", type=device, default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.epochs > args.max_epochs:
        ap.error(f"--epochs {args.epochs} is more than --max-epochs {args.max_epochs} (the budget the "
                 "projection is for)")
    from sweeper.config import TrialConfig

    configs = study_configs(args)
    for flat in configs:
        TrialConfig.from_flat(flat)  # a bad setting is refused here, once, not in every worker

    stop, samples = threading.Event(), []
    sampler = threading.Thread(target=_sample_utilisation, args=(stop, samples), daemon=True)
    sampler.start()
    t0 = time.time()
    with mp.get_context("spawn").Pool(args.workers, initializer=_worker_init) as pool:
        results = []
        for r in pool.imap_unordered(_trial, configs):
            results.append(r)
            print(f"{len(results):>3}/{len(configs)} {r['arch']}{'_bn' if r['batch_norm'] else '':<3} "
                  f"{r['init']:<6} {statistics.median(r['epoch_seconds']):6.2f} s/epoch "
                  f"({time.time() - t0:5.0f} s)", flush=True)
    wall = time.time() - t0
    stop.set()
    sampler.join()

    trial_epochs = sum(len(r["epoch_seconds"]) for r in results)
    def pace(r: dict) -> float:  # packed, one epoch of a trial: its median over the epochs it ran
        return statistics.median(r["epoch_seconds"])

    fifo_s = wall * args.max_epochs / args.epochs
    cells: dict[tuple, list[dict]] = {}
    for r in results:
        cells.setdefault((r["arch"], r["batch_norm"], r["init"]), []).append(r)
    asha_min = asha_epochs_per_cell(args.lrs, 3, 3, args.max_epochs)
    # Lower end: the cell's slowest trial is taken as the survivor at every rung (conservative).
    asha_lo_s = sum(asha_min * max(map(pace, rs)) for rs in cells.values()) / args.workers
    asha_hi_s = sum(args.max_epochs * pace(r) for r in results) / args.workers
    busy = [u for t, u in samples if t0 + 5 <= t <= t0 + wall]
    summary = {
        "trials": len(results), "workers": args.workers, "epochs_each": args.epochs,
        "wall_s": wall, "trial_epochs": trial_epochs,
        "trial_epochs_per_hour": trial_epochs / wall * 3600,
        "median_epoch_s_packed": statistics.median(map(pace, results)),
        "gpu_utilisation_median": statistics.median(busy) if busy else None,
        "projected_fifo_s": fifo_s, "asha_epochs_per_cell_min": asha_min,
        "projected_asha_s": [asha_lo_s, asha_hi_s],
        "peak_mb_max": max((r["gpu_memory_peak_mb"] for r in results
                            if not math.isnan(r["gpu_memory_peak_mb"])), default=None),
    }
    print(f"\n{len(results)} trials x {args.epochs} epochs, {args.workers} at once: {wall:.0f} s wall "
          f"({summary['trial_epochs_per_hour']:.0f} trial-epochs/h), GPU busy "
          f"{'n/a' if busy == [] else f'{statistics.median(busy):.0f}%'} (median)")
    print(f"projected, {args.max_epochs} epochs: FIFO <= {fifo_s / 60:.1f} min (measured wall scaled); "
          f"ASHA per cell {asha_min}-{args.max_epochs * args.lrs} epochs: "
          f"{asha_lo_s / 60:.1f}-{asha_hi_s / 60:.1f} min of training")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_gpu.json").write_text(json.dumps(jsonable(
        {"summary": summary, "args": vars(args), "trials": results, "machine": machine()}), indent=1))


if __name__ == "__main__":
    run(main)
