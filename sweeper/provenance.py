"""What produced a result: git SHA and dirty flag, command line, package versions, host."""

from __future__ import annotations

import importlib.metadata
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["git_state", "provenance"]


def git_state(path: str | Path = ".") -> dict[str, Any]:
    """SHA and dirty flag of the repository holding ``path``; ``None`` values outside a checkout."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=Path(path).resolve().parent
                                 if Path(path).is_file() else path,
                                 capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return {"git_sha": None, "git_dirty": None}
    return {"git_sha": sha, "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def provenance(path: str | Path = ".") -> dict[str, Any]:
    versions = {}
    for pkg in ("sweeper", "torch", "torchvision", "ray", "mlflow", "optuna"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        **git_state(path),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "versions": versions,
    }
