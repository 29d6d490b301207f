"""Packing trials onto GPUs by measurement: ``resources="auto"``.

Hand-written GPU fractions (``{"gpu": 0.25}``) are guesses: too small and trials run out of memory
(Ray does not look at memory when it packs fractions), too large and GPUs idle. With
``resources="auto"`` a Sweep measures instead: one training step (forward, backward, optimizer step)
of the trial's model at its batch size, resolution, precision and memory format, on the GPU kind the
trials will use, gives the peak allocated memory; as many trials share a GPU as fit beside each other
(each also pays its own CUDA context), never more. Measurements are cached per GPU name and config
shape (``memory_key``), so a shape is measured once per machine kind, not once per trial.

This module imports torch, never Ray or MLflow: the tuner decides where the probe runs (in the driver
when it has the GPU, else as a one-GPU Ray task on a worker).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

__all__ = ["CONTEXT_BYTES", "HEADROOM", "PackingPlan", "gpu_fraction", "measure_peak_bytes",
           "memory_key", "trials_per_gpu"]

# What every CUDA process holds before its first tensor (context, cuBLAS/cuDNN workspaces): measured
# 300-600 MiB across recent drivers; 512 MiB errs on the side of fewer trials per GPU.
CONTEXT_BYTES = 512 * 2**20
# Memory left unplanned: fragmentation, cuDNN autotuning trying larger algorithms, evaluation batches.
HEADROOM = 0.10
# Settings that change a training step's memory; everything else (lr, init, seed...) does not.
_SHAPE_KEYS = ("model.arch", "model.depth", "model.width", "model.batch_norm", "model.head",
               "model.stem", "model.aux_heads", "data.batch_size", "data.name", "data.resolution",
               "data.crop", "data.dir", "data.limit", "data.synthetic_size", "amp", "channels_last",
               "compile", "optim.name")


def memory_key(flat: Mapping[str, Any], device_name: str) -> str:
    """The cache key of a trial's step memory: the GPU's name and the settings that change it
    (defaults filled in, so a config that spells a default out shares the key of one that does not)."""
    from sweeper.config import TrialConfig

    full = TrialConfig.from_flat(dict(flat)).to_flat()
    return json.dumps([device_name] + [[k, full.get(k)] for k in _SHAPE_KEYS], default=str)


def trials_per_gpu(peak_bytes: int, total_bytes: int, *, headroom: float = HEADROOM,
                   context_bytes: int = CONTEXT_BYTES) -> int:
    """How many trials of this peak fit on one GPU together (at least 1: a trial that needs the
    whole card gets it, and a trial that does not fit at all fails on its own, with CUDA's message)."""
    usable = total_bytes * (1 - headroom)
    return max(1, int(usable // (peak_bytes + context_bytes)))


def gpu_fraction(n_per_gpu: int) -> float:
    """Ray's fractional GPU for n trials per GPU, rounded down so n of them never exceed 1.0."""
    return math.floor(10_000 / n_per_gpu) / 10_000


def measure_peak_bytes(flat: Mapping[str, Any], device: str = "cuda") -> dict[str, Any]:
    """Peak memory of one training step of this config on ``device`` (a CUDA device).

    Call it in a fresh process, as the tuner does (a one-GPU Ray task whose worker exits after it):
    what CUDA libraries allocate lazily on a process's first step (cuBLAS's workspaces) is part of a
    trial's memory, and in a process that already ran a step it exists before the probe starts.

    Returns {"peak_bytes" (step + data), "step_bytes", "data_bytes", "total_bytes", "device_name",
    "seconds"}. Random data of the trial's shape (its crop, if any): memory does not depend on the
    values; the trial's own splits on the device are added from the node's decoded copy.
    """
    import torch

    from sweeper.config import TrialConfig
    from sweeper.data import num_classes, resolution
    from sweeper.data.splits import decoded_bytes
    from sweeper.models import build_model, split_outputs

    cfg = TrialConfig.from_flat(dict(flat))
    dev = torch.device(device)
    t0 = time.perf_counter()
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    classes = num_classes(cfg.data) or 1000
    side = cfg.data.crop or resolution(cfg.data)  # what the network sees: the crop, if any
    model = build_model(cfg.model, num_classes=classes).to(dev)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = (torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                 if cfg.optim.name == "sgd" else torch.optim.Adam(model.parameters(), lr=1e-3))
    x = torch.randn(cfg.data.batch_size, 3, side, side, device=dev).to(memory_format=memory_format)
    y = torch.randint(0, classes, (cfg.data.batch_size,), device=dev)
    criterion = torch.nn.CrossEntropyLoss()
    for _ in range(2):  # the second step holds the optimizer's state too
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp):
            logits, aux = split_outputs(model(x))
            loss = criterion(logits.float(), y) + sum(criterion(a.float(), y) for a in aux)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    props = torch.cuda.get_device_properties(dev)
    del model, optimizer, x, y, loss, logits, aux
    torch.cuda.empty_cache()
    # A trial also holds its splits on the GPU (uint8, sweeper.data.DeviceData): as large as a
    # training step or larger for big datasets (Food-101 at 160 px: 7.8 GB). Known once the dataset
    # was decoded on this node (launch's data check decodes it); 0 when it was not.
    data = decoded_bytes(cfg.data) or 0
    return {"peak_bytes": int(peak) + data, "step_bytes": int(peak), "data_bytes": data,
            "total_bytes": int(props.total_memory), "device_name": props.name,
            "seconds": time.perf_counter() - t0}


def _cache_path() -> Path:
    root = os.environ.get("SWEEPER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sweeper")
    return Path(root) / "gpu_memory.json"


class PackingPlan:
    """Measured peaks by memory key, cached on disk; the GPU fraction for each trial config."""

    def __init__(self, device_name: str, total_bytes: int, measure, *, cache: Path | None = None):
        self.device_name, self.total_bytes = device_name, total_bytes
        self._measure = measure  # flat config -> {"peak_bytes": ...}; runs where the GPU is
        self.cache = cache or _cache_path()
        try:
            self._peaks: dict[str, int] = json.loads(self.cache.read_text())
        except (OSError, ValueError):
            self._peaks = {}

    def remember(self, flat: Mapping[str, Any], measured: Mapping[str, Any]) -> None:
        self._peaks[memory_key(flat, self.device_name)] = int(measured["peak_bytes"])
        self._save()

    def peak(self, flat: Mapping[str, Any]) -> int:
        key = memory_key(flat, self.device_name)
        if key not in self._peaks:
            self._peaks[key] = int(self._measure(dict(flat))["peak_bytes"])
            self._save()
        return self._peaks[key]

    def per_gpu(self, flat: Mapping[str, Any]) -> int:
        return trials_per_gpu(self.peak(flat), self.total_bytes)

    def fraction(self, flat: Mapping[str, Any]) -> float:
        return gpu_fraction(self.per_gpu(flat))

    def describe(self, flat: Mapping[str, Any]) -> str:
        n = self.per_gpu(flat)
        return (f"{flat.get('model.arch')} (batch {flat.get('data.batch_size')}): "
                f"{self.peak(flat) / 2**30:.2f} GiB per step -> {n} per "
                f"{self.total_bytes / 2**30:.0f} GiB {self.device_name} (gpu={gpu_fraction(n)})")

    def _save(self) -> None:
        try:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache.with_name(f".{self.cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._peaks, indent=1))
            os.replace(tmp, self.cache)
        except OSError:
            pass  # a read-only home: measure again next time
