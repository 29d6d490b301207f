"""Images/s of sweeper's data path vs torchvision's DataLoader + transforms.v2, side by side in one run.

Both produce the same training batches from the same images: the digits training split as sweeper
decodes it (``load_splits``: 32x32 RGB uint8), batch size 64, shuffled, with random crop after
zero-padding by 4, horizontal flip, AlexNet's PCA colour shift (std 0.1 along the training pixels'
principal axes) and normalisation to the training mean/std, as float32 N x 3 x 32 x 32.

  sweeper      ``DeviceData.train_batches`` on the CPU (whole-batch tensor ops, data.flip=true)
  dl_w0, dl_w2 ``torch.utils.data.DataLoader`` over a uint8 tensor dataset, per-sample
               ``v2.Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(),
               ToDtype(float32, scale=True), Lambda(pca_shift), Normalize(mean, std)])``,
               num_workers 0 and 2 (persistent workers, started before timing)

Nothing trains: this is the cost of making batches. The variants alternate rep by rep (order rotated),
each timed over --epochs epochs after one warm-up epoch; images/s is the median over reps.
The main process runs --threads torch threads (a 1-CPU trial's 1 by default); DataLoader workers
are extra processes (one thread each), which a 1-CPU trial would not have. Goal (issue #9): sweeper
>= 5x each DataLoader variant.

    python bench/data_path.py
    python bench/data_path.py --reps 9 --epochs 20 --workers 0 2 4

Writes bench/results/data_path.json and prints images/s and ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from sweeper.config import TrialConfig
from sweeper.data import DeviceData, load_splits

from _cli import at_least, machine, run  # noqa: E402 - bench/ is the script's directory

ROOT = Path(__file__).resolve().parent.parent


class PCAShift:
    """AlexNet's lighting noise on one 3 x H x W float image (0..1 scale): what DeviceData adds.

    A class, not a lambda, so that DataLoader workers could also be spawned (not only forked).
    """

    def __init__(self, eigval: torch.Tensor, eigvec: torch.Tensor, std: float):
        self.eigval, self.eigvec_t, self.std = eigval, eigvec.T.contiguous(), std

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.std
        return img + ((alpha * self.eigval) @ self.eigvec_t)[:, None, None]


class UInt8Images(Dataset):
    """uint8 N x 3 x H x W images and labels, transformed per sample."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.transform(self.x[i]), self.y[i]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--batch-size", type=at_least(1), default=64)
    ap.add_argument("--epochs", type=at_least(1), default=10, help="timed epochs per variant per rep")
    ap.add_argument("--reps", type=at_least(1), default=7)
    ap.add_argument("--workers", type=at_least(0), nargs="+", default=[0, 2])
    ap.add_argument("--threads", type=at_least(1), default=1, help="torch threads in the main process")
    args = ap.parse_args()
    started = time.time()
    torch.set_num_threads(args.threads)

    cfg = TrialConfig.from_flat({"data.name": args.dataset, "data.batch_size": args.batch_size,
                                 "data.flip": True, "data.crop_padding": 4,
                                 "data.color_shift": 0.1, "device": "cpu"})
    d = cfg.data
    splits = load_splits(d, seed=cfg.seed)
    n, _, h, w = splits.train_x.shape
    data = DeviceData(splits, d, device="cpu")
    gen = torch.Generator().manual_seed(1)

    transform = v2.Compose([
        v2.RandomCrop((h, w), padding=d.crop_padding),  # zero fill on uint8 = black, as DeviceData
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),  # 0..255 -> 0..1
        v2.Lambda(PCAShift(splits.eigval, splits.eigvec, d.color_shift)),
        v2.Normalize(splits.mean.tolist(), splits.std.tolist()),
    ])
    dataset = UInt8Images(splits.train_x, splits.train_y, transform)
    loaders = {f"dl_w{k}": DataLoader(dataset, batch_size=d.batch_size, shuffle=True,
                                      num_workers=k, persistent_workers=k > 0,
                                      generator=torch.Generator().manual_seed(1))
               for k in args.workers}

    def batches(variant: str):
        return data.train_batches(gen) if variant == "sweeper" else loaders[variant]

    def one_epoch(variant: str) -> int:
        seen = 0
        for x, y in batches(variant):
            seen += len(y)
        return seen

    # Same output on both paths: dtype, shape, and the normalised statistics' scale.
    check = {}
    for variant in ["sweeper", *loaders]:
        xs = [x for x, _ in batches(variant)]  # also the warm-up epoch (workers start here)
        x = torch.cat(xs)
        assert x.dtype == torch.float32 and x.shape[1:] == (3, h, w), (variant, x.dtype, x.shape)
        check[variant] = {"images": len(x), "mean": round(x.mean().item(), 3),
                          "std": round(x.std().item(), 3)}

    variants = ["sweeper", *loaders]
    per_rep: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(args.reps):
        order = variants[rep % len(variants):] + variants[:rep % len(variants)]
        for v in order:
            t0 = time.perf_counter()
            seen = sum(one_epoch(v) for _ in range(args.epochs))
            per_rep[v].append(seen / (time.perf_counter() - t0))

    ips = {v: statistics.median(r) for v, r in per_rep.items()}
    ratios = {f"sweeper_vs_{v}": ips["sweeper"] / ips[v] for v in loaders}
    print(f"{args.dataset}: {n} training images {h}x{w}, batch {d.batch_size}, crop+flip+colour shift,"
          f" {args.threads} main thread(s); {args.epochs} epochs x {args.reps} reps, median images/s")
    print(f"output check (images, mean, std of one epoch): {check}")
    print(f"{'variant':<10} {'images/s':>10} {'sweeper/this':>13}")
    for v in variants:
        print(f"{v:<10} {ips[v]:>10.0f} {ips['sweeper'] / ips[v]:>12.1f}x")
    print("goal: sweeper >= 5x each DataLoader variant")

    row = {"dataset": args.dataset, "train_images": n, "resolution": [h, w],
           "batch_size": d.batch_size, "epochs_per_rep": args.epochs, "reps": args.reps,
           "threads": args.threads, "images_per_second": ips, "ratios": ratios, "goal_ratio": 5.0,
           "per_rep": per_rep, "output_check": check,
           "machine": machine(),
           "script_seconds": time.time() - started}
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_path.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    run(main)
