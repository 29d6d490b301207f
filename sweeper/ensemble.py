"""Soft-voting ensembles of a sweep's best trials: ``sweeper ensemble NAME --top K``.

The members are trials of one sweep, ranked by the sweep's metric (``metric``/``mode`` of its record)
**at each trial's checkpoint epoch**: the checkpoint Tune keeps is a trial's latest, not its best
epoch, so the ensemble ranks exactly the weights it uses (a trial that peaked early and then
degraded ranks by what its checkpoint holds). Selection reads only validation numbers; the test split
is read once, to score what was selected.

Each member's checkpoint is evaluated on the test split with its own data settings (its seed and
``data.limit`` decide the training-split statistics its inputs are normalised with), giving an
``[examples, classes]`` matrix of softmax probabilities per member. The ensemble's prediction is the
**mean of those probabilities** (soft voting): not the mean of logits (which lets one member's large
logits outvote the others) and not a majority of argmax votes (which drops how sure each member is).
The members must share a test set (dataset, classes, the same labelled examples in the same order):
the test split does not depend on the trial seed (``sweeper.data.splits``), so trials of one sweep
normally do.

The result is logged to MLflow as a run under the sweep's parent run (tags ``sweeper.role=ensemble``
and ``sweeper.ensemble_id``, a digest of the sweep and each member's checkpoint), so the same members
never make a second run; another checkpoint (a resumed trial) is another ensemble.

Plain functions; no Ray; MLflow only inside :func:`log_ensemble`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from sweeper.config import ConfigError
from sweeper.records import finite

__all__ = ["EnsembleResult", "Member", "ensemble_id", "ensemble_table", "evaluate_ensemble",
           "log_ensemble", "member_test_probabilities", "mean_probabilities", "predict_probabilities",
           "run_ensemble", "scores", "select_members"]

COMBINE = "mean_softmax"  # what the ensemble averages; part of its identity
VIEWS = "single"  # one unaugmented view per test image (multi-crop would be another value)
_SCORES = ("accuracy", "top1_error", "top5_error", "loss")


@dataclass(frozen=True)
class Member:
    """One trial chosen for the ensemble, and the checkpoint whose weights it contributes."""

    trial_id: str
    name: str
    rank: int  # 1 = best by the sweep's metric at its checkpoint epoch
    checkpoint: str  # relative to the sweep's experiment dir (the record's ``checkpoint``)
    checkpoint_epoch: int
    location: str  # a local path or a storage URI (sweeper.checkpoints.trial_checkpoint_location)
    value: float  # the sweep's metric at the checkpoint epoch (validation)
    best_epoch: int | None = None  # the trial's best epoch by the same metric
    best_value: float | None = None
    outcome: str | None = None
    dataset: str | None = None  # data.name in the trial's record


@dataclass
class EnsembleResult:
    sweep: str
    sweep_uid: str
    metric: str
    mode: str
    members: list[Member]
    member_scores: dict[str, dict[str, float]]  # trial_id -> scores of its checkpoint on the test split
    ensemble: dict[str, float]  # scores of the mean probabilities
    examples: int
    classes: int
    device: str
    selection: str  # how the members were chosen, in words
    id: str = ""
    run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best_single(self) -> Member:
        """The member the sweep would have picked alone: rank 1 by its validation metric."""
        return min(self.members, key=lambda m: m.rank)

    @property
    def best_on_test(self) -> Member:
        """The member with the highest test accuracy (a stricter baseline: chosen on test)."""
        return max(self.members, key=lambda m: (self.member_scores[m.trial_id]["accuracy"], -m.rank))

    def gains(self) -> dict[str, float]:
        """Error reductions of the ensemble (positive = the ensemble is better)."""
        single = self.member_scores[self.best_single.trial_id]
        on_test = self.member_scores[self.best_on_test.trial_id]
        return {"gain_top1_error": single["top1_error"] - self.ensemble["top1_error"],
                "gain_top5_error": single["top5_error"] - self.ensemble["top5_error"],
                "gain_top1_error_vs_best_on_test": on_test["top1_error"] - self.ensemble["top1_error"],
                "gain_top5_error_vs_best_on_test": on_test["top5_error"] - self.ensemble["top5_error"]}


# ---- choosing members -----------------------------------------------------------------------------


def _where_filters(where: Sequence[str]) -> list[tuple[str, Any, str]]:
    from sweeper.config import parse_value
    from sweeper.spaces import ALIASES

    out, problems = [], []
    for item in where:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            problems.append(f"--where {item!r} is not KEY=VALUE (e.g. outcome=completed or "
                            "model.arch=vgg11)")
            continue
        out.append((ALIASES.get(key, key), parse_value(text), text))
    if problems:
        raise ConfigError(problems)
    return out


def _matches(value: Any, want: Any, text: str) -> bool:
    if isinstance(value, float) and isinstance(want, (int, float)) and not isinstance(want, bool):
        return math.isclose(value, float(want), rel_tol=1e-9, abs_tol=0.0)
    return value == want or str(value) == text


def select_members(record, *, sweep: str, storage_root: str, top: int | None,
                   trials: Sequence[str] = (), where: Sequence[str] = ()) -> tuple[list[Member], str]:
    """The members, best first, and the selection in words; ConfigError names what is wrong.

    Candidates: trials with a recorded checkpoint, whose metric at the checkpoint epoch is finite and
    that did not diverge (their weights are not finite), narrowed to ``trials`` (ids or names) and to
    ``where`` (``KEY=VALUE``: ``outcome``, ``status`` or a trial setting); then the ``top`` best. With
    ``trials`` and no ``top``, all of them.
    """
    from sweeper.checkpoints import trial_checkpoint_location
    from sweeper.config import TrialConfig

    if top is not None and top < 1:
        raise ConfigError([f"--top {top}: must be at least 1 (the number of trials to ensemble)"])
    if top is None and not trials:
        raise ConfigError(["give --top K (the K best trials) or --trials ID,... (these trials)"])
    meta = record.meta()
    metric, mode = meta.get("metric", "val_accuracy"), meta.get("mode", "max")
    every = record.trials()
    if not every:
        raise ConfigError([f"sweep {sweep!r} has no trials yet"])
    pool = list(every)
    words = []
    if trials:
        wanted = [name.strip() for item in trials for name in item.split(",") if name.strip()]
        if not wanted:
            raise ConfigError([f"--trials {','.join(trials)!r} names no trial (trial ids or names, "
                               f"comma-separated, e.g. {every[0]['trial_id']})"])
        chosen, problems = [], []
        for ref in wanted:
            found = [t for t in every if ref in (t["trial_id"], t.get("name"))]
            if len(found) == 1:
                chosen.append(found[0])
            elif found:
                problems.append(f"--trials {ref!r}: {len(found)} trials of sweep {sweep!r} are named "
                                f"so; use a trial id ({', '.join(t['trial_id'] for t in found)})")
            else:
                known = ", ".join(t["trial_id"] for t in every[:8]) + (" ..." if len(every) > 8 else "")
                problems.append(f"--trials {ref!r}: sweep {sweep!r} has no such trial (a trial id or "
                                f"name; ids: {known})")
        if problems:
            raise ConfigError(problems)
        pool = list({t["trial_id"]: t for t in chosen}.values())
        words.append(f"trials {', '.join(t['trial_id'] for t in pool)}")
    defaults = TrialConfig().to_flat()
    for key, want, text in _where_filters(where):
        if key not in ("outcome", "status") and key not in defaults and not any(
                key in (t.get("config") or {}) for t in every):
            raise ConfigError([f"--where {key}={text}: {key!r} is not 'outcome', 'status' or a trial "
                               "setting (e.g. model.arch, optim.lr; see sweeper/config.py)"])
        kept, seen = [], []
        for t in pool:
            if key in ("outcome", "status"):
                value = t.get(key)
            else:
                value = {**defaults, **(t.get("config") or {})}.get(key)
            if _matches(value, want, text):
                kept.append(t)
            elif value not in seen:
                seen.append(value)
        if pool and not kept:
            listed = ", ".join(map(str, seen[:8])) + (" ..." if len(seen) > 8 else "")
            raise ConfigError([f"--where {key}={text}: no trial of sweep {sweep!r}"
                               + (f" among {'; '.join(words)}" if words else "")
                               + f" has {key}={text} (its trials have {listed})"])
        pool = kept
        words.append(f"{key}={text}")

    ranked, excluded = record.by_checkpoint(pool)
    candidates = [(value, t, finite((t.get("best") or {}).get("epoch")),
                   finite((t.get("best") or {}).get(metric))) for value, t in ranked]
    if trials and excluded:  # trials asked for by name are members, or the command says why not
        raise ConfigError([f"--trials: sweep {sweep!r} cannot ensemble "
                           + "; ".join(f"{', '.join(repr(n) for n in names)} ({reason})"
                                       for reason, names in excluded.items())])
    if not candidates:
        why = "; ".join(f"{reason}: {', '.join(names)}" for reason, names in excluded.items())
        raise ConfigError([f"sweep {sweep!r} has no trial to ensemble"
                           + (f" among {'; '.join(words)}" if words else "")
                           + (f" ({why})" if why else "")])
    k = top if top is not None else len(candidates)
    if k > len(candidates):
        why = "; ".join(f"{len(names)} {reason}" for reason, names in excluded.items())
        raise ConfigError([f"--top {k}: sweep {sweep!r} has {len(candidates)} trial(s) with a checkpoint "
                           "to ensemble" + (f" among {'; '.join(words)}" if words else "")
                           + (f" ({why})" if why else "")
                           + f"; choose 1..{len(candidates)}"])
    members = []
    for rank, (value, t, best_epoch, best_value) in enumerate(candidates[:k], start=1):
        members.append(Member(
            trial_id=t["trial_id"], name=t.get("name") or t["trial_id"], rank=rank,
            checkpoint=t["checkpoint"], checkpoint_epoch=int(t["checkpoint_epoch"]),
            location=trial_checkpoint_location(storage_root, sweep, t), value=value,
            best_epoch=int(best_epoch) if best_epoch is not None else None, best_value=best_value,
            outcome=t.get("outcome") or t.get("status"),
            dataset=(t.get("config") or {}).get("data.name", defaults["data.name"])))
    selection = (f"top {k} by {metric} ({mode}) at each trial's checkpoint epoch"
                 + (f" among {'; '.join(words)}" if words else ""))
    return members, selection


# ---- probabilities and scores ---------------------------------------------------------------------


@torch.inference_mode()
def predict_probabilities(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax probabilities [N, C] float32 on the CPU, labels [N]) of ``model`` over ``batches``.

    The one place a member's test predictions are made: a multi-view evaluation (multi-crop) would
    average its views' probabilities here, per image, before the members are averaged.
    """
    from sweeper.models import split_outputs

    model.eval()
    probs, labels = [], []
    for x, y in batches:
        logits = split_outputs(model(x))[0].float()
        probs.append(torch.softmax(logits, dim=1).cpu())
        labels.append(y.cpu())
    if not probs:
        raise ValueError("no test examples to evaluate")
    return torch.cat(probs), torch.cat(labels)


def member_test_probabilities(state: Mapping[str, Any], *, device: torch.device,
                              splits_cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(probabilities [N, C], labels [N], the Splits) of one checkpoint's model on the test split.

    ``state`` is what ``sweeper.train.fit`` saved (``sweeper.checkpoints.load_trial_state``). The data is
    loaded with the member's own data settings and seed: the test examples are the same for every
    trial, but the normalisation statistics come from the member's training split.
    """
    from sweeper.config import TrialConfig
    from sweeper.data import DeviceData, load_splits
    from sweeper.models import build_model
    from sweeper.transfer import input_normalization

    cfg = TrialConfig.from_flat(state["config"])
    key = (repr(cfg.data), cfg.seed)
    splits = (splits_cache or {}).get(key)
    if splits is None:
        splits = load_splits(cfg.data, seed=cfg.seed)
        if splits_cache is not None:
            splits_cache[key] = splits
    # The inputs a trial was trained on: a torchvision-pretrained trial normalises with its weights'
    # mean/std (sweeper.transfer.input_normalization), not the training split's statistics.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the resolution warning was the trial's to give
        normalize = input_normalization(cfg)
    data = DeviceData(splits, cfg.data, device=device, normalize=normalize)
    model = build_model(cfg.model, num_classes=data.num_classes)
    model.load_state_dict(state["model"])
    model.to(device)
    probs, labels = predict_probabilities(model, data.eval_batches("test"))
    return probs, labels, splits


def mean_probabilities(member_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Soft voting: the members' class probabilities averaged per example (float64)."""
    if not member_probs:
        raise ValueError("an ensemble needs at least one member")
    return torch.stack([p.double() for p in member_probs]).mean(dim=0)


def scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """accuracy, top1_error, top5_error (top-min(5, C)) and loss (mean negative log probability)."""
    n, classes = probs.shape
    k = min(5, classes)
    topk = probs.topk(k, dim=1).indices
    hits = topk == labels[:, None]
    top1 = hits[:, 0].double().mean().item()
    top5 = hits.any(dim=1).double().mean().item()
    picked = probs.double().gather(1, labels[:, None]).squeeze(1)
    loss = (-picked.clamp_min(1e-12).log()).mean().item()
    return {"accuracy": top1, "top1_error": 1.0 - top1, "top5_error": 1.0 - top5, "loss": loss,
            "examples": float(n)}


def _test_set_problem(first: Member, first_splits, first_labels: torch.Tensor,
                      other: Member, other_splits, other_labels: torch.Tensor) -> str | None:
    """Why two members' predictions cannot be averaged example by example, or None."""
    def describe(splits, labels) -> str:
        return f"{splits.name}, {len(splits.classes)} classes, {len(labels)} test examples"

    if (first_splits.name == other_splits.name and list(first_splits.classes) == list(other_splits.classes)
            and torch.equal(first_labels, other_labels)):
        return None
    same_shape = describe(first_splits, first_labels) == describe(other_splits, other_labels)
    return (f"members {first.name!r} ({describe(first_splits, first_labels)}) and {other.name!r} "
            f"({describe(other_splits, other_labels)}) do not share a test set"
            + (" (their test labels differ)" if same_shape else "")
            + ": an ensemble averages predictions per test example, so its members need one dataset, "
            "classes and test split; choose them with --trials or --where")


def _check_datasets(members: Sequence[Member]) -> None:
    """Refuse before loading any checkpoint when the records say the members' datasets differ."""
    names = {m.name: m.dataset for m in members}
    if len(set(names.values())) > 1:
        listed = ", ".join(f"{n} ({d})" for n, d in names.items())
        raise ConfigError([f"the members are trained on different datasets ({listed}): an ensemble "
                           "needs one dataset, classes and test split; choose members with --trials "
                           "or --where data.name=..."])


def _load_member(member: Member) -> dict[str, Any]:
    from sweeper.checkpoints import load_trial_state

    try:
        state = load_trial_state(member.location, map_location="cpu")
    except FileNotFoundError as exc:
        raise ConfigError([f"member {member.name!r}: {exc} (a running sweep replaces checkpoints; a "
                           "deleted one is gone: choose other members)"]) from None
    if int(state.get("epoch", member.checkpoint_epoch)) != member.checkpoint_epoch:
        raise ConfigError([f"member {member.name!r}: its checkpoint holds epoch {state.get('epoch')}, "
                           f"its record says {member.checkpoint_epoch} (is the sweep running? try again "
                           "when it has ended)"])
    return state


def evaluate_ensemble(members: Sequence[Member], *, device: str = "auto", sweep: str = "",
                      sweep_uid: str = "", metric: str = "", mode: str = "",
                      selection: str = "") -> EnsembleResult:
    """Score each member's checkpoint alone on the test split, and the mean of their probabilities.

    One checkpoint is in memory at a time (a checkpoint holds the optimizer state too); what is kept
    per member is its [examples, classes] probabilities.
    """
    from sweeper.train import resolve_device

    if not members:
        raise ConfigError(["an ensemble needs at least one member"])
    try:
        torch_device = resolve_device(device)
    except (RuntimeError, ValueError) as exc:
        text = str(exc)
        if "Expected one of" in text:  # torch's list of every device type it knows
            text = "not a device (use auto, cpu, cuda or cuda:N)"
        raise ConfigError([f"--device {device}: {text}"]) from None
    _check_datasets(members)
    cache: dict = {}
    member_probs, member_scores = [], {}
    first = None
    for m in members:
        probs, labels, splits = member_test_probabilities(_load_member(m), device=torch_device,
                                                          splits_cache=cache)
        if first is None:
            first = (m, splits, labels)
        else:
            problem = _test_set_problem(*first, m, splits, labels)
            if problem:
                raise ConfigError([problem])
        if not torch.isfinite(probs).all():
            raise ConfigError([f"member {m.name!r}: its checkpoint predicts non-finite probabilities "
                               "(its weights are not finite): leave it out with --trials or --where"])
        member_probs.append(probs)
        member_scores[m.trial_id] = scores(probs, labels)
    labels = first[2]
    ensemble = scores(mean_probabilities(member_probs), labels)
    return EnsembleResult(sweep=sweep, sweep_uid=sweep_uid, metric=metric, mode=mode,
                          members=list(members), member_scores=member_scores, ensemble=ensemble,
                          examples=len(labels), classes=member_probs[0].shape[1],
                          device=str(torch_device), selection=selection,
                          id=ensemble_id(sweep_uid, members))


def ensemble_id(sweep_uid: str, members: Sequence[Member]) -> str:
    """The ensemble's identity: its sweep, each member's checkpoint, and how they are combined.

    Order-free (the mean does not depend on it); a resumed trial's newer checkpoint is another id.
    """
    key = {"sweep_uid": sweep_uid, "combine": COMBINE, "views": VIEWS, "split": "test",
           "members": sorted([m.trial_id, m.checkpoint, m.checkpoint_epoch] for m in members)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ---- output ---------------------------------------------------------------------------------------


def member_rows(result: EnsembleResult) -> list[dict[str, Any]]:
    """The member table (one row per member, then the ensemble): what the artifact and the CLI show."""
    rows = []
    for m in sorted(result.members, key=lambda m: m.rank):
        s = result.member_scores[m.trial_id]
        rows.append({"row": "member", "rank": m.rank, "trial_id": m.trial_id, "name": m.name,
                     "outcome": m.outcome, "checkpoint": m.checkpoint,
                     "checkpoint_epoch": m.checkpoint_epoch, f"{result.metric}": m.value,
                     "best_epoch": m.best_epoch, f"best_{result.metric}": m.best_value,
                     **{f"test_{k}": s[k] for k in _SCORES}})
    blank = {k: None for k in rows[0] if not k.startswith("test_")}
    rows.append({**blank, "row": "ensemble", "name": f"mean of softmax, k={len(result.members)}",
                 **{f"test_{k}": result.ensemble[k] for k in _SCORES}})
    return rows


def ensemble_table(result: EnsembleResult):
    """A rich table: each member's test top-1/top-5 (evaluated now), the ensemble, and the gain."""
    from rich.markup import escape
    from rich.table import Table

    from sweeper.console import fmt

    table = Table(title=f"soft-voting ensemble of sweep {result.sweep!r}: {result.selection}; "
                        f"{result.examples} test examples, device {result.device}",
                  title_justify="left", show_header=True, header_style="bold")
    for col in ("rank", "trial", "outcome", "ckpt epoch", f"{result.metric} @ckpt",
                "test top-1 err", "test top-5 err", "test acc"):
        table.add_column(col, justify="left" if col in ("trial", "outcome") else "right")
    single, on_test = result.best_single, result.best_on_test
    for m in sorted(result.members, key=lambda m: m.rank):
        s = result.member_scores[m.trial_id]
        mark = " (best single)" if m is single else ""
        mark += " (best on test)" if m is on_test and m is not single else ""
        table.add_row(str(m.rank), escape(m.name + mark), escape(str(m.outcome or "")),
                      str(m.checkpoint_epoch), fmt(m.value), fmt(s["top1_error"]),
                      fmt(s["top5_error"]), fmt(s["accuracy"]))
    e = result.ensemble
    table.add_row("", f"ensemble (mean of softmax, k={len(result.members)})", "", "", "",
                  fmt(e["top1_error"]), fmt(e["top5_error"]), fmt(e["accuracy"]), style="bold")
    gains = result.gains()
    table.add_row("", f"gain vs best single ({escape(single.name)})", "", "", "",
                  _signed(gains["gain_top1_error"]), _signed(gains["gain_top5_error"]), "",
                  style="green" if gains["gain_top1_error"] > 0 else "yellow")
    if on_test is not single:
        table.add_row("", f"gain vs best on test ({escape(on_test.name)})", "", "", "",
                      _signed(gains["gain_top1_error_vs_best_on_test"]),
                      _signed(gains["gain_top5_error_vs_best_on_test"]), "")
    return table


def _signed(value: float) -> str:
    return f"{value:+.4f}"


def _notes(result: EnsembleResult) -> list[str]:
    """What the table does not say: members whose checkpoint is not their best epoch."""
    earlier = [m for m in result.members if m.best_epoch is not None and m.best_value is not None
               and m.best_epoch != m.checkpoint_epoch and m.best_value != m.value]
    if not earlier:
        return []
    from sweeper.console import fmt

    listed = "; ".join(f"{m.name}: best {fmt(m.best_value)} at epoch {m.best_epoch}, checkpoint epoch "
                       f"{m.checkpoint_epoch} has {fmt(m.value)}" for m in earlier)
    return [f"note: the ensemble uses each trial's checkpoint (its last epoch), not its best epoch; "
            f"they differ for {len(earlier)} member(s) ({listed})"]


# ---- MLflow ---------------------------------------------------------------------------------------


class TrackingUnavailable(RuntimeError):
    """The ensemble was computed but could not be logged (server down, sweep not delivered yet)."""


def log_ensemble(result: EnsembleResult, *, tracking_uri: str, experiment: str,
                 storage: str | None = None) -> tuple[str, bool]:
    """Log ``result`` as a child run of its sweep's parent run; (run id, created).

    The run is found again by ``sweeper.ensemble_id``: a run that is already FINISHED is left as it is
    (created=False); one a crash left unfinished is completed (only what it lacks is logged).
    TrackingUnavailable when the server cannot be reached or holds no parent run for the sweep.
    """
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if tracking_uri.startswith(("http://", "https://")):
        # Fail in seconds, as the tracker does, instead of mlflow's ~4 minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from sweeper.store import resume_command
    from sweeper.tracking import artifact_relocation, redact, write_artifact

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        parent = None
        if exp is not None:
            found = client.search_runs(
                [exp.experiment_id], max_results=1,
                filter_string=f"tags.`sweeper.sweep_uid` = '{result.sweep_uid}' and "
                              "tags.`sweeper.role` = 'sweep'")
            parent = found[0].info.run_id if found else None
        if parent is None:
            raise TrackingUnavailable(
                f"{redact(tracking_uri)} has no parent run for sweep {result.sweep!r} yet (its tracking "
                f"was not delivered there): {resume_command(result.sweep, storage, verb='sync')}, "
                "then run this again")
        existing = client.search_runs(
            [exp.experiment_id], max_results=1,
            filter_string=f"tags.`sweeper.sweep_uid` = '{result.sweep_uid}' and "
                          f"tags.`sweeper.ensemble_id` = '{result.id}'")
        if existing and existing[0].info.status == "FINISHED":
            result.run_id = existing[0].info.run_id
            return result.run_id, False
        trial_runs = {}  # the members' own runs, for the member table
        for m in result.members:
            found = client.search_runs(
                [exp.experiment_id], max_results=1,
                filter_string=f"tags.`sweeper.sweep_uid` = '{result.sweep_uid}' and "
                              f"tags.`sweeper.trial_id` = '{m.trial_id}'")
            trial_runs[m.trial_id] = found[0].info.run_id if found else None
        ranked = sorted(result.members, key=lambda m: m.rank)
        member_ids = ",".join(m.trial_id for m in ranked)
        tags = {"mlflow.parentRunId": parent, "sweeper.sweep_uid": result.sweep_uid,
                "sweeper.role": "ensemble", "sweeper.ensemble_id": result.id,
                "sweeper.members": member_ids, "mlflow.note.content": _description(result)}
        if existing:
            run_id = existing[0].info.run_id
            created = False
        else:
            run_id = client.create_run(exp.experiment_id, tags=tags,
                                       run_name=f"ensemble-top{len(result.members)}-{result.id[:8]}"
                                       ).info.run_id
            created = True
        run = client.get_run(run_id)
        params = {"ensemble.k": len(result.members), "ensemble.members": member_ids,
                  "ensemble.combine": COMBINE, "ensemble.views": VIEWS, "ensemble.split": "test",
                  "ensemble.selection": result.selection, "ensemble.ranked_by": result.metric,
                  "ensemble.mode": result.mode,
                  "ensemble.weights": "each trial's checkpoint (its latest epoch)",
                  "ensemble.checkpoint_epochs": ",".join(f"{m.trial_id}:{m.checkpoint_epoch}"
                                                         for m in ranked),
                  "ensemble.best_single": result.best_single.trial_id}
        params = {k: str(v)[:6000] for k, v in params.items() if k not in run.data.params}
        if params:
            client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        now = int(time.time() * 1000)
        single = result.member_scores[result.best_single.trial_id]
        on_test = result.member_scores[result.best_on_test.trial_id]
        metrics = {**{f"test_{k}": result.ensemble[k] for k in _SCORES},
                   **{f"best_single_test_{k}": single[k] for k in _SCORES},
                   **{f"best_on_test_test_{k}": on_test[k] for k in _SCORES},
                   **result.gains(), "members": float(len(result.members)),
                   "test_examples": float(result.examples)}
        missing = [Metric(k, float(v), now, 0) for k, v in metrics.items() if k not in run.data.metrics]
        if missing:
            client.log_batch(run_id, metrics=missing)
        client.log_batch(run_id, tags=[RunTag(k, str(v)[:8000]) for k, v in tags.items()])
        rows = member_rows(result)
        for row in rows:
            row["mlflow_run_id"] = trial_runs.get(row["trial_id"]) if row["trial_id"] else run_id
        # Beside the store as it is now where it was moved or copied (tracking.write_artifact)
        moved = artifact_relocation(client, tracking_uri, exp.experiment_id)
        write_artifact(client, tracking_uri, run_id, text=_csv(rows), name="members.csv", relocation=moved)
        summary = {"ensemble_id": result.id, "sweep": result.sweep, "sweep_uid": result.sweep_uid,
                   "selection": result.selection, "combine": COMBINE, "views": VIEWS,
                   "device": result.device,
                   "members": [asdict(m) | {"location": redact(m.location)} for m in result.members],
                   "member_scores": result.member_scores, "ensemble": result.ensemble,
                   "gains": result.gains()}
        write_artifact(client, tracking_uri, run_id, name="ensemble.json", relocation=moved,
                       text=json.dumps(summary, indent=2, default=str))  # log_dict's format
        client.set_terminated(run_id, status="FINISHED")
    except TrackingUnavailable:
        raise
    except Exception as exc:  # the server, the network, a full disk...: like the tracker, no crash
        raise TrackingUnavailable(f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    result.run_id = run_id
    return run_id, created


def _csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


def _description(result: EnsembleResult) -> str:
    from sweeper.console import fmt

    single = result.best_single
    s = result.member_scores[single.trial_id]
    e = result.ensemble
    names = ", ".join(f"{m.name} (epoch {m.checkpoint_epoch})"
                      for m in sorted(result.members, key=lambda m: m.rank))
    return (f"Soft-voting ensemble (mean of softmax probabilities) of {len(result.members)} trials of "
            f"sweep {result.sweep!r}, {result.selection}: {names}. Test top-1 error {fmt(e['top1_error'])}"
            f" vs {fmt(s['top1_error'])} for the best single trial ({single.name}); top-5 error "
            f"{fmt(e['top5_error'])} vs {fmt(s['top5_error'])}. Weights: each trial's checkpoint (its "
            "latest epoch); members.csv lists them.")


# ---- the command ----------------------------------------------------------------------------------


def run_ensemble(record, *, storage_root: str, tracking_uri: str, top: int | None,
                 trials: Sequence[str] = (), where: Sequence[str] = (), device: str = "auto") -> bool:
    """``sweeper ensemble``: choose, evaluate, print, log. False when the run could not be logged."""
    from rich.markup import escape

    from sweeper.console import console, error_console
    from sweeper.tracking import redact

    meta = record.meta()
    sweep = meta.get("name", record.experiment_dir.name)
    if "***@" in tracking_uri:
        raise ConfigError([f"the sweep's tracking URI is recorded without its credentials "
                           f"({tracking_uri}): pass --tracking-uri"])
    members, selection = select_members(record, sweep=sweep, storage_root=storage_root, top=top,
                                        trials=trials, where=where)
    result = evaluate_ensemble(members, device=device, sweep=sweep, sweep_uid=meta.get("sweep_uid", ""),
                               metric=meta.get("metric", "val_accuracy"), mode=meta.get("mode", "max"),
                               selection=selection)
    console.print(ensemble_table(result))
    for note in _notes(result):
        console.print(escape(note), style="yellow")
    if not result.sweep_uid:
        error_console.print("[yellow]the sweep's record has no sweep id: nothing logged to MLflow[/yellow]")
        return False
    try:
        run_id, created = log_ensemble(result, tracking_uri=tracking_uri, experiment=sweep,
                                       storage=storage_root)
    except TrackingUnavailable as exc:
        error_console.print(f"[yellow]ensemble not logged to {escape(redact(tracking_uri))}: "
                            f"{escape(str(exc))}; run this command again when it is reachable (the "
                            "same members find their run again, never a second one)[/yellow]")
        return False
    verb = "logged as" if created else "already logged as"
    console.print(f"ensemble {result.id}: {verb} MLflow run {run_id}, a child of the parent run of "
                  f"sweep {sweep!r} ({redact(tracking_uri)})")
    return True
