"""Decode once per node: a uint8 tensor file per (dataset, resolution, source), guarded by a file lock.

Concurrent trials on one node race to the same dataset; the first takes the lock and decodes, the
others wait and then load its file. The file appears atomically (write, then rename), so a crash
never leaves half a cache behind.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock

__all__ = ["cache_root", "cached"]


def cache_root() -> Path:
    return Path(os.environ.get("SWEEPER_CACHE_DIR", "~/.cache/sweeper")).expanduser()


def cached(key: str, build: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Load ``key`` from the cache, building (once, under a lock) if absent."""
    root = cache_root() / "decoded"
    root.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = root / f"{name}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    with FileLock(str(path) + ".lock", timeout=3600):
        if path.is_file():  # another process decoded it while we waited
            return torch.load(path, weights_only=True)
        data = build()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(data, tmp)
        os.replace(tmp, path)
        (root / f"{name}.key").write_text(key + "\n")  # which dataset a cache file holds
        return data
