"""What produced a result: git SHA and dirty flag, command line, package versions, host."""

from __future__ import annotations

import importlib.metadata
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["command_line", "git_state", "provenance"]


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
        return {"git_sha": None, "git_dirty": None, "git_repo": None}
    return {"git_sha": sha, "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "git_repo": git("rev-parse", "--show-toplevel")}


def provenance(path: str | Path = ".") -> dict[str, Any]:
    """The launch's provenance. The git state is the working directory's checkout (the project the
    sweep was launched from), else the checkout sweeper itself runs from: a launch outside any
    checkout recorded git_sha None (MLflow's tag read 'None') though the code that ran had one.
    ``git_repo`` says which it was."""
    versions = {}
    for pkg in ("sweeper", "torch", "torchvision", "ray", "mlflow", "optuna"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    state = git_state(path)
    if state["git_sha"] is None:
        state = git_state(Path(__file__).resolve().parent)
    return {
        **state,
        "command": command_line(sys.argv),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "versions": versions,
    }


def command_line(argv: list[str]) -> str:
    """The command as a user would type it again: ``sweeper launch ...`` also when it ran as
    ``python -m sweeper.cli`` (argv[0] is then the module's file, which typed alone runs nothing),
    each argument quoted where the shell needs it."""
    program = Path(argv[0]).name if argv else "sweeper"
    if program in ("cli.py", "__main__.py", ""):
        program = "sweeper"
    return shlex.join([program, *argv[1:]])
