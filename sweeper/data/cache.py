"""Decode once per node: one uint8 tensor file per (dataset, resolution, source), guarded by a file lock.

Concurrent trials on one node race for the same dataset; the first takes the lock and decodes, the
others wait on the lock and then load its file. The file appears atomically (written under a temporary
name, then renamed), so a crash or a kill mid-write never leaves half a cache for the next trial.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

import torch
from filelock import FileLock, Timeout

__all__ = ["CACHE_FORMAT", "cache_file", "cache_root", "cached"]

# Part of every key: bump it when a decoder changes its output, so nodes do not reuse stale caches.
CACHE_FORMAT = 2
# A decode of Food-101 on a slow disk takes minutes, not hours; beyond this something is stuck.
LOCK_TIMEOUT_S = 3 * 3600

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$SWEEPER_CACHE_DIR``, else ``~/.cache/sweeper``."""
    return Path(os.environ.get("SWEEPER_CACHE_DIR") or "~/.cache/sweeper").expanduser()


def cache_file(key: str) -> Path:
    digest = hashlib.sha256(f"v{CACHE_FORMAT}|{key}".encode()).hexdigest()[:20]
    return cache_root() / "decoded" / f"{digest}.pt"


def cached(key: str, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The dict stored under ``key``; ``build()`` runs at most once per node (under a lock) if absent."""
    path = cache_file(key)
    data = _load(path)
    if data is not None:
        return data
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # SWEEPER_CACHE_DIR naming a file ended in a NotADirectoryError traceback
        from sweeper.config import ConfigError

        raise ConfigError([f"the data cache {cache_root()} (SWEEPER_CACHE_DIR, else ~/.cache/sweeper) "
                           f"cannot hold decoded data: {path.parent} cannot be made "
                           f"({exc.strerror or exc}); point SWEEPER_CACHE_DIR at a directory"]) from None
    lock = FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)
    try:
        with lock:
            data = _load(path)  # another process may have decoded it while we waited
            if data is not None:
                return data
            log.info("decoding %s into %s", key, path)
            data = build()
            # Unique per process and thread: two writers never share a temporary file.
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                torch.save(data, tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            # For people looking into the cache directory: which dataset a file holds.
            path.with_suffix(".key").write_text(key + "\n")
            return data
    except Timeout:
        raise TimeoutError(f"waited {LOCK_TIMEOUT_S} s for {lock.lock_file} while another process "
                           f"decoded {key}; if no process is decoding, delete the lock file") from None


def _load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        # mmap: trials on one node share the page cache instead of each holding a private copy.
        return torch.load(path, weights_only=True, mmap=True)
    except Exception as exc:  # a cache is derived data: an unreadable one is rebuilt, not fatal
        log.warning("ignoring unreadable cache file %s (%s); decoding again", path, exc)
        return None
