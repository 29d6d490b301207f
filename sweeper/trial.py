"""The Ray Tune trainable: a flat trial config in, one ``tune.report`` (with a checkpoint) per epoch out.

Everything a trial does lives in :func:`sweeper.train.fit`; this adapter only turns the sampled dict
into a strict :class:`~sweeper.config.TrialConfig`, resumes from Tune's checkpoint when the trial is a
retry or a restored sweep, and reports.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from sweeper.config import TrialConfig
from sweeper.train import fit

__all__ = ["FAIL_ONCE_ENV", "train_trial"]
# Fault injection for the retry test: the first trial to finish epoch N (after its checkpoint is saved)
# raises once, claiming a marker file so that no trial fails twice. Unset in normal use.
FAIL_ONCE_ENV = "SWEEPER_TEST_FAIL_ONCE"


def train_trial(config: dict[str, Any]) -> None:
    cfg = TrialConfig.from_flat(config)
    hooks = []
    if cfg.diagnostics.enabled:
        from sweeper.diagnostics import Diagnostics

        hooks.append(Diagnostics(cfg.diagnostics))

    checkpoint = tune.get_checkpoint()
    fail_at = _fail_once_epoch()

    def report(metrics: dict[str, Any], save) -> None:
        with tempfile.TemporaryDirectory(prefix="sweeper-ckpt-") as d:
            save(Path(d))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        if fail_at is not None and metrics["epoch"] == fail_at:
            _fail_once()

    with tempfile.TemporaryDirectory(prefix="sweeper-resume-") as resume_dir:
        resume_from = None
        if checkpoint is not None:  # a retry, or a restored sweep: continue where it stopped
            checkpoint.to_directory(resume_dir)
            resume_from = Path(resume_dir)
        fit(cfg, report=report, resume_from=resume_from, hooks=hooks)


def _fail_once_epoch() -> int | None:
    spec = os.environ.get(FAIL_ONCE_ENV)  # "<marker path>:<epoch>"
    return int(spec.rsplit(":", 1)[1]) if spec else None


def _fail_once() -> None:
    marker = os.environ[FAIL_ONCE_ENV].rsplit(":", 1)[0]
    try:  # O_EXCL: exactly one trial of the sweep claims the failure
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    raise RuntimeError(f"injected failure ({FAIL_ONCE_ENV}); the retry must resume from a checkpoint")
