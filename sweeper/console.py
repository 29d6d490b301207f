"""Terminal output shared by the commands: configs, epoch tables, errors. No Ray, no MLflow."""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Mapping

from rich.console import Console
from rich.table import Table

__all__ = ["EpochPrinter", "config_table", "console", "error_console", "fmt"]


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """The reader of the output went away (`sweeper status NAME | head -1`): the rest of the
        output is dropped and the command goes on to its own end and exit status. Rich's default
        (rich 15, ``Console.on_broken_pipe``) exits 1, which reads as an internal error, and would
        have ended a launch mid-sweep when the pipe it printed into closed."""
        self.quiet = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.file.fileno())  # later writes, rich's or print's, go nowhere
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # no real descriptor (a test's capture)
            pass


# A log file or pipe gets whole lines and full tables, not rich's default 80 columns.
_WIDTH = None if sys.stdout.isatty() else 200
console = _Console(highlight=False, soft_wrap=True, width=_WIDTH)
error_console = _Console(stderr=True, highlight=False, soft_wrap=True, width=_WIDTH)

_OUTCOME_STYLE = {"completed": "green", "running": "", "diverged": "red", "stalled": "yellow",
                  "pruned": "cyan", "failed": "red"}


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def config_table(flat: Mapping[str, Any], *, title: str, defaults: Mapping[str, Any] = {}) -> Table:
    """Settings as a table; values that differ from the defaults are bold."""
    table = Table(title=title, show_header=True, header_style="bold", title_justify="left")
    table.add_column("setting")
    table.add_column("value")
    for key, value in flat.items():
        style = "bold" if key in defaults and defaults[key] != value else "dim"
        table.add_row(key, fmt(value), style=style)
    return table


class EpochPrinter:
    """Prints one line per epoch under a fixed header; plain lines, so pdb and logs stay readable."""

    columns = [("epoch", 5), ("train_loss", 10), ("train_accuracy", 9), ("val_loss", 9),
               ("val_accuracy", 9), ("val_top5_error", 9), ("lr", 8), ("epoch_seconds", 7),
               ("images_per_second", 8), ("outcome", 10)]
    headers = {"train_accuracy": "train_acc", "val_accuracy": "val_acc", "val_top5_error": "top5_err",
               "epoch_seconds": "sec", "images_per_second": "img/s"}

    def __init__(self, out: Console = console):
        self.out = out
        self.printed_header = False

    def __call__(self, metrics: Mapping[str, Any], save: Any = None) -> None:
        if not self.printed_header:
            self.out.print("  ".join(self.headers.get(c, c).rjust(w) for c, w in self.columns),
                           style="bold")
            self.printed_header = True
        cells = []
        for column, width in self.columns:
            value = metrics.get(column, "")
            if column == "images_per_second" and isinstance(value, float):
                text = f"{value:.0f}"
            else:
                text = fmt(value)
            cells.append(text.rjust(width))
        line = "  ".join(cells)
        self.out.print(line, style=_OUTCOME_STYLE.get(str(metrics.get("outcome")), ""))
