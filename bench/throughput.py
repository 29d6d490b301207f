"""Training throughput (images/s) and peak memory per architecture, one trial at a time.

No Ray, no MLflow: this runs on a bare GPU machine. On CUDA it uses bf16 autocast and channels_last
(the trial defaults) and reports peak allocated memory, which is what a trial's GPU fraction must fit:
fit() resets CUDA's peak counter at the start of every epoch and reports that epoch's peak (training
and evaluation) as ``gpu_memory_peak_mb``, so the figure here is the largest over the epochs.

    python bench/throughput.py --archs vgg11 vgg16 vgg19 resnet18 googlenet --width 1 --epochs 2

Writes bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sweeper.config import TrialConfig
from sweeper.data import load_splits
from sweeper.train import fit, resolve_device

from _cli import at_least, device, jsonable, machine, positive, run  # noqa: E402 - bench/ is the script's directory

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["vgg11", "vgg16", "vgg19", "resnet18", "smallcnn"])
    ap.add_argument("--width", type=positive, default=0.125)
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--size", type=at_least(1), default=4096, help="synthetic examples")
    ap.add_argument("--batch-size", type=at_least(1), default=128)
    ap.add_argument("--epochs", type=at_least(1), default=2)
    ap.add_argument("--device", type=device, default="auto")
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--bn", choices=["on", "off", "both"], default="on", help="BatchNorm in the models")
    ap.add_argument("--compile", nargs="?", const="true", choices=["true", "reduce-overhead"],
                    help="the trial option compile: true (torch's default mode) or reduce-overhead "
                         "(CUDA graphs)")
    ap.add_argument("--static", action="store_true",
                    help="with --compile true, an experiment: dynamic=False, one graph per batch shape, "
                         "where torch otherwise recompiles the batch size as dynamic once a second "
                         "shape (the epoch's short last batch, an evaluation batch) appears "
                         "(reduce-overhead is always static)")
    ap.add_argument("--threads", type=at_least(1), default=1,
                    help="torch threads (default 1, what a 1-CPU trial gets: on a shared machine more "
                         "threads than free cores made single CPU runs many times slower)")
    args = ap.parse_args()
    if args.static and args.compile != "true":
        ap.error("--static goes with --compile true")
    torch.set_num_threads(args.threads)
    compile_option = {None: False, "true": True}.get(args.compile, args.compile)
    if args.static:
        import sweeper.train as train

        # The trial option calls sweeper.train._compiled(model, mode); replaced here only.
        train._compiled = lambda model, mode=True: torch.compile(model, dynamic=False)

    print(f"{'arch':<10} {'img/s (last epoch)':>18} {'peak MiB':>9} {'epoch 1 s':>9} {'last s':>7}")
    rows = []
    variants = [(a, bn) for a in args.archs
                for bn in {"on": [True], "off": [False], "both": [True, False]}[args.bn]]
    for arch, bn in variants:
        cfg = TrialConfig.from_flat({
            "model.arch": arch, "model.width": args.width, "model.batch_norm": bn,
            "compile": compile_option,
            "data.name": args.dataset, "data.synthetic_size": args.size,
            "data.batch_size": args.batch_size, "epochs": args.epochs, "device": args.device,
            "amp": not args.no_amp, "diagnostics.enabled": False, "optim.lr": 0.01})
        splits = load_splits(cfg.data, seed=0)
        result = fit(cfg, splits=splits)
        # Not torch.cuda.max_memory_allocated() here: fit resets the peak each epoch. CUDA only.
        peaks = [h["gpu_memory_peak_mb"] for h in result.history if "gpu_memory_peak_mb" in h]
        peak = max(peaks) if peaks else float("nan")
        name = arch + ("_bn" if bn else "")
        first, last = result.history[0]["epoch_seconds"], result.last["epoch_seconds"]
        print(f"{name:<10} {result.last['images_per_second']:>18.0f} {peak:>9.0f} {first:>9.1f} "
              f"{last:>7.2f}", flush=True)
        rows.append({"arch": arch, "batch_norm": bn, "compile": compile_option, "static": args.static,
                     "epoch_seconds": [h["epoch_seconds"] for h in result.history],
                     "train_loss": [h["train_loss"] for h in result.history],
                     "images_per_second": result.last["images_per_second"],
                     "gpu_memory_peak_mb": peak if peaks else None,
                     "device": str(resolve_device(cfg.device)), "config": cfg.to_flat()})
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = "throughput"
    if args.compile:
        name += "_compiled" + ("" if args.compile == "true" else f"_{args.compile}") + (
            "_static" if args.static else "")
    (out / f"{name}.json").write_text(json.dumps(
        jsonable({"rows": rows, "threads": args.threads, "machine": machine()}), indent=1))


if __name__ == "__main__":
    run(main)
