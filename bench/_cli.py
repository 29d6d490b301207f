"""What the bench scripts share at their command line: counts and sizes checked by argparse (exit 2
with the option named), and a mistake in what they are asked to build -- an unknown architecture, a
dataset not on this machine, a sweep that cannot run -- shown as one line with exit 2, not a
traceback. Imports neither Ray nor MLflow (the GPU machine has neither)."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

__all__ = ["at_least", "device", "jsonable", "machine", "positive", "run"]


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in its message
    return parse


def positive(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return value


def device(text: str) -> str:
    """An argparse type: 'auto', 'cpu' or a CUDA device this machine has (checked before any work)."""
    import torch

    if text in ("auto", "cpu"):
        return text
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type != "cuda":
        raise argparse.ArgumentTypeError(f"{text!r}: these benchmarks run on auto, cpu or cuda")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: torch sees no CUDA device on this machine")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA "
                                         "device(s)")
    return text


def machine() -> dict:
    """Where a figure was measured, for the JSON beside it: CPUs, load average after the run, torch."""
    import os
    import platform

    import torch

    return {"cpus": os.cpu_count(), "loadavg_after": os.getloadavg(), "platform": platform.platform(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def jsonable(value):
    """NaN and infinities as null: strict JSON has no spelling for them (a CPU run has no GPU peak)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def run(main: Callable[[], None]) -> None:
    """Run a script's ``main``; sweeper's own refusal of a setting ends it with its message, exit 2."""
    from sweeper.config import ConfigError
    from sweeper.data.sources import DatasetUnavailable

    try:
        main()
    except (ConfigError, DatasetUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
