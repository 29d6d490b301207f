"""The running driver's own settings, for the objects Tune brings back from its pickle.

``Tuner.restore`` unpickles the driver callback and the scheduler exactly as the first launch made
them: with that launch's record directory (a temporary copy, for a sweep on a URI), its tracker (its
tracking server) and its output flags. The launch running now sets its own here before ``fit`` and
clears them after; :class:`~sweeper.callback.SweepCallback` and :class:`~sweeper.schedulers.CellASHA`
read them, so a restore honours today's flags and writes today's record.
"""

from __future__ import annotations

from typing import Any

__all__ = ["activate", "setting"]

_ACTIVE: dict[str, Any] = {}


def activate(**settings: Any) -> None:
    """Make these the running driver's settings (none: clear them)."""
    _ACTIVE.clear()
    _ACTIVE.update(settings)


def setting(name: str, default: Any = None) -> Any:
    return _ACTIVE.get(name, default)
