"""The Ray Tune trainable: a flat trial config in, one ``tune.report`` (with a checkpoint) per epoch out.

Everything a trial does lives in :func:`sweeper.train.fit`; this adapter only turns the sampled dict
into a strict :class:`~sweeper.config.TrialConfig`, resumes from Tune's checkpoint when the trial is a
retry or a restored sweep, and reports.

Every report carries the sweep's metric. A diverged epoch has no validation pass, and Tune's strict
metric check would otherwise raise in the controller and end the whole sweep; instead the metric gets
the worst value for its mode (:func:`worst_value`), so ASHA and the searcher see a bad trial, and the
trial's ``outcome`` says what happened.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from sweeper.config import TrialConfig
from sweeper.diagnostics import trial_hooks
from sweeper.train import CHECKPOINT_FILE, INIT_PREFIX, fit

__all__ = ["FAIL_ONCE_ENV", "MISSING_CHECKPOINT_MARKER", "RESUMED_HISTORY", "train_trial",
           "with_metric", "worst_value"]
# Fault injection for the retry test: the first trial to finish epoch N (after its checkpoint is saved)
# raises once, claiming a marker file so that no trial fails twice. Unset in normal use.
FAIL_ONCE_ENV = "SWEEPER_TEST_FAIL_ONCE"
# Left by sweeper.checkpoints in place of a checkpoint that is gone from storage with nothing newer
# to stand in for it: Ray needs the directory to exist, and the trial starts again from scratch.
MISSING_CHECKPOINT_MARKER = "SWEEPER_CHECKPOINT_MISSING"
# The key of the resumed checkpoint's epochs in the first report after a resume (a JSON string).
RESUMED_HISTORY = "resumed_history"


def worst_value(metric: str, mode: str) -> float:
    """The worst value a metric can take: a bounded one's bound, else infinity the wrong way."""
    if mode == "max":
        return 0.0 if "accuracy" in metric else -math.inf
    return 1.0 if metric.endswith("error") else math.inf


def with_metric(metrics: dict[str, Any], metric: str, mode: str) -> dict[str, Any]:
    """``metrics`` with the sweep's metric present and finite-or-worst (see the module docstring)."""
    value = metrics.get(metric)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
        return metrics
    return {**metrics, metric: worst_value(metric, mode)}


def train_trial(config: dict[str, Any], metric: str = "val_accuracy", mode: str = "max") -> None:
    cfg = TrialConfig.from_flat(config)
    hooks = trial_hooks(cfg)

    checkpoint = tune.get_checkpoint()
    fail_at = _fail_once_epoch()
    import ray

    # Which Ray node ran each epoch: on one machine every node shares the IP that Tune records.
    node_id = ray.get_runtime_context().get_node_id()

    carried: list[str] = []  # the resumed checkpoint's own epochs, for the first report only

    def report(metrics: dict[str, Any], save) -> None:
        metrics = {**with_metric(metrics, metric, mode), "node_id": node_id}
        if carried:
            metrics[RESUMED_HISTORY] = carried.pop()
        with tempfile.TemporaryDirectory(prefix="sweeper-ckpt-") as d:
            save(Path(d))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        if fail_at is not None and metrics["epoch"] == fail_at:
            _fail_once()

    with tempfile.TemporaryDirectory(prefix="sweeper-resume-") as resume_dir:
        resume_from = None
        if checkpoint is not None:  # a retry, or a restored sweep: continue where it stopped
            checkpoint.to_directory(resume_dir)
            if (Path(resume_dir) / CHECKPOINT_FILE).is_file():
                resume_from = Path(resume_dir)
                carried.append(_history_of(resume_from))
            else:
                print(f"sweeper: the checkpoint {checkpoint.path} holds no trial state "
                      "(it was lost from storage): this trial starts again from scratch",
                      file=sys.stderr)
        fit(cfg, report=report, resume_from=resume_from, hooks=hooks)


def _history_of(checkpoint_dir: Path) -> str:
    """The epochs a checkpoint holds, as JSON: the first report after a resume carries them.

    A driver killed between writing its record and pushing it to the storage can leave Ray's state
    (which names this checkpoint) ahead of the sweep's record; the driver that resumes fills the
    record's gap from these rows (see SweepCallback), so no epoch goes missing.
    """
    import json

    import torch

    state = torch.load(checkpoint_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    rows = [dict(row) for row in state.get("history", [])]
    if rows and state.get("initial"):
        rows[0].update({INIT_PREFIX + k: v for k, v in state["initial"].items()})
    return json.dumps(rows, default=float)


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
