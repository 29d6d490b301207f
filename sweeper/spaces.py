"""The validated :class:`Sweep` a search-space file defines, and the trials it expands to.

A search space is a Python file with one module-level ``SWEEP = Sweep(...)`` whose ``space`` maps
dotted trial settings (``"model.arch"``, ``"optim.lr"``; see :mod:`sweeper.config`) to fixed values or
Ray Tune sampling primitives (``tune.choice``, ``tune.loguniform``, ``tune.grid_search``, ...).

Constructing a Sweep checks everything that can be checked before any Ray process starts and reports
**all** problems at once: Sweep fields, the metric and mode, unknown trial settings, every domain under
the search algorithm that will sample it (:mod:`sweeper.domains`), and every categorical value and
numeric bound of the space, each validated as a trial config would be. Overrides (``key=value``) apply
to Sweep fields or trial settings; :func:`grid_cells`, :func:`sample_config` and :func:`run_space`
expand the space; :func:`dry_run` builds one sampled model on the CPU and pushes a batch through it.
Files are loaded by :mod:`sweeper.loading`.

This module does not import Ray: it recognises Tune's domains by their duck type, so ``sweeper debug``
works wherever torch does.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import random
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, TypeVar

from sweeper.config import EPOCH_METRICS, MAX_SEED, ConfigError, TrialConfig, parse_value
from sweeper.domains import (_domain, _domain_problems, _is_domain, _is_grid, describe_domain,
                             space_signature)

__all__ = [
    "MAX_TRIALS",
    "ALIASES",
    "Sweep",
    "corner_values",
    "describe_domain",
    "dry_run",
    "grid_cells",
    "grid_size",
    "name_problem",
    "parse_overrides",
    "read_overrides",
    "run_space",
    "sample_config",
    "space_signature",
    "trial_count",
    "with_override_problems",
]

T = TypeVar("T")

# Short names for the settings people change most on the command line.
ALIASES: dict[str, str] = {
    "dataset": "data.name",
    "data_dir": "data.dir",
    "width": "model.width",
    "batch_size": "data.batch_size",
    "limit": "data.limit",
    "lr": "optim.lr",
}

# Sweep fields a command line cannot set (a dict, a callable, prose): they live in the file.
_FILE_ONLY = {"space", "question", "resources"}
# Trials a sweep may plan: a launch lists every one up front (Tune's num_samples, the plan, the
# launch order), and Tune's own release tests stop at 10,000 trials per experiment.
MAX_TRIALS = 100_000
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# resources="auto": GPU shares from a measured memory probe (sweeper.packing).
AUTO = "auto"
Resources = Mapping[str, float] | Callable[[TrialConfig], Mapping[str, float]] | str


@dataclass(frozen=True)
class Sweep:
    """A study: what to vary, how to search, and how to run trials. Constructing one validates it."""

    name: str
    space: Mapping[str, Any]
    question: str = ""  # defaults to the search-space file's docstring
    metric: str = "val_accuracy"
    mode: str = "max"
    max_epochs: int = 10  # every trial's epoch budget; ASHA's max_t
    scheduler: str = "asha"  # 'asha' or 'fifo' (no early stopping)
    # ASHA compares a trial with the trials of its own grid cell ('cell': every cell keeps its best
    # lr to the end, so "this cell stalled" means at its best lr) or with the whole sweep ('sweep').
    prune_within: str = "cell"
    grace_period: int = 1  # ASHA: epochs before a trial can be stopped
    reduction_factor: int = 3  # ASHA: each rung keeps the top 1/reduction_factor
    search: str = "random"  # 'random' (Ray's basic generator, grid axes expanded) or 'optuna' (TPE)
    num_samples: int = 1  # samples per grid cell (random) / trials in all (optuna)
    # Replicates: every cell runs once per seed (seed, seed+1, ...), each with its own samples and its
    # own ASHA rungs, so a verdict can say "trains in 3/3 seeds".
    seeds: int = 1
    # Per trial, e.g. {"cpu": 1, "gpu": 0.25}, a function of the TrialConfig (deep VGGs need more), or
    # "auto": as many trials per GPU as a measured training step says fit (sweeper.packing).
    resources: Resources = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    max_concurrent: int | None = None  # None: as many as the cluster fits
    seed: int = 0  # drives sampling, and every trial's seed unless the space sets "seed"
    max_failures: int = 1  # retries of a failed trial, from its last checkpoint
    # Checkpoints kept per trial (Ray's CheckpointConfig(num_to_keep)). Ray saves the whole experiment
    # state (every trial's last result) whenever a trial has checkpointed this many times since the
    # last save: at 1 that is every epoch of every trial, quadratic in the trials (measured: 200
    # one-epoch trials ran 1.63x their ideal span with 1, 1.27x with 2; the driver's CPU per trial
    # 81 -> 62 ms). 2 halves those saves for long trials, at twice the checkpoint disk of 1 (Ray's
    # default keeps all); a retry or restore needs only the latest.
    keep_checkpoints: int = 2
    storage: str | None = None  # local dir or s3://, gs:// URI; None: ./sweeps

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def replace(self, **changes: Any) -> "Sweep":
        return dataclasses.replace(self, **changes)

    def problems(self) -> list[str]:
        p: list[str] = []
        if (problem := name_problem(self.name)) is not None:
            p.append(problem)
        if not isinstance(self.space, Mapping):
            p.append(f"space must be a dict of 'section.name' -> value or tune domain, "
                     f"not {type(self.space).__name__}")
            return p
        if not isinstance(self.question, str):
            p.append(f"question={self.question!r} must be text: the question the sweep asks")
        if self.storage is not None and (not isinstance(self.storage, str) or not self.storage.strip()):
            p.append(f"storage={self.storage!r} must be a directory or an s3://, gs:// URI "
                     "(None: ./sweeps)")
        elif self.storage is not None:
            from sweeper.store import storage_problems

            p.extend(storage_problems(self.storage))
        if self.mode not in ("max", "min"):
            p.append(f"mode={self.mode!r} is not one of ['max', 'min']")
        p.extend(_metric_problems(self.metric, self.mode))
        if isinstance(self.seeds, int) and self.seeds > 1 and isinstance(self.space, Mapping):
            if "seed" in self.space:
                p.append(f"seeds={self.seeds} replicates every cell with its own seed, but the space "
                         "sets 'seed' too: keep one of them")
            if self.search == "optuna":
                p.append(f"seeds={self.seeds} needs search='random' (replicates are a grid axis)")
        if self.prune_within not in ("cell", "sweep"):
            p.append(f"prune_within={self.prune_within!r} is not one of ['cell', 'sweep']")
        if self.scheduler not in ("asha", "fifo"):
            p.append(f"scheduler={self.scheduler!r} is not one of ['asha', 'fifo']")
        if self.search not in ("optuna", "random"):
            p.append(f"search={self.search!r} is not one of ['optuna', 'random']")
        invalid = set()  # fields refused here: what depends on them is not checked again
        for key, lo in (("max_epochs", 1), ("grace_period", 1), ("num_samples", 1), ("seeds", 1),
                        ("max_failures", 0), ("keep_checkpoints", 1), ("seed", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                p.append(f"{key}={value!r} must be an integer >= {lo}")
                invalid.add(key)
        if "seed" not in invalid and self.seed > MAX_SEED:  # the Sweep's, not the space's
            p.append(f"seed={self.seed} must be an integer in [0, {MAX_SEED}] (2**62)")
            invalid.add("seed")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 2:
            p.append(f"reduction_factor={self.reduction_factor!r} must be an integer >= 2")
        if not invalid & {"grace_period", "max_epochs"} and self.grace_period > self.max_epochs:
            p.append(f"grace_period={self.grace_period} must be <= max_epochs={self.max_epochs}")
        if self.max_concurrent is not None and (isinstance(self.max_concurrent, bool) or
                not isinstance(self.max_concurrent, int) or self.max_concurrent < 1):
            p.append(f"max_concurrent={self.max_concurrent!r} must be None or an integer >= 1")
        if not callable(self.resources) and self.resources != AUTO:
            p.extend(_resource_problems("resources", self.resources))
        # The trials' epochs and seed are the Sweep's: one problem for a bad max_epochs, not three.
        own = {"max_epochs": "epochs", "seed": "seed"}
        p.extend(self._space_problems(skip=[own[k] for k in invalid if k in own]))
        if self.search == "optuna" and any(_is_grid(v) for v in self.space.values()):
            grid = [k for k, v in self.space.items() if _is_grid(v)]
            p.append(f"search='optuna' cannot expand grid axes {grid}: use search='random' for a "
                     "factorial grid, or tune.choice for Optuna to pick from")
        if p:  # the checks below read the fields as the ones above validated them
            return p
        p.extend(_grid_duplicates(self, self.space))
        if self.seed + self.seeds - 1 > MAX_SEED:
            p.append(f"seeds={self.seeds} from seed={self.seed} reach seed {self.seed + self.seeds - 1}: "
                     f"seeds go up to {MAX_SEED} (2**62)")
        elif (count := trial_count(self)) > MAX_TRIALS:
            factors = [f"{k} ({len(v['grid_search'])})" for k, v in self.space.items() if _is_grid(v)]
            factors += [f"seed ({self.seeds})"] * (self.seeds > 1) + [f"num_samples ({self.num_samples})"]
            p.append(f"the sweep would run {count:,} trials ({' x '.join(factors)}): more than "
                     f"{MAX_TRIALS:,}, which every launch plans up front and Tune keeps in its "
                     "experiment state. Split it into several sweeps, or draw values with "
                     "tune.choice / tune.uniform instead of crossing grid_search axes")
        return p

    def _space_problems(self, skip: Sequence[str] = ()) -> list[str]:
        """The space's problems; ``skip``: trial settings whose Sweep field was refused already."""
        p: list[str] = []
        if "epochs" in self.space:  # one budget for ASHA and the trials: the Sweep's
            p.append(f"space['epochs'] is set by the Sweep: use max_epochs={self.space['epochs']!r}")
        sweep_fields = {f.name for f in dataclasses.fields(Sweep)} - {"seed"}  # seed: both
        checked: dict[str, Any] = {}
        wrong: list[str] = list(skip)  # keys whose domain (or Sweep field) is wrong
        for key, value in self.space.items():
            if not isinstance(key, str):
                p.append(f"space key {key!r} must be a string 'section.name' (e.g. 'optim.lr')")
                continue
            if key in sweep_fields:
                where = ("in the search-space file" if key in _FILE_ONLY
                         else f"(or {key}=... on the command line)")
                p.append(f"space[{key!r}] is a Sweep setting, not a trial setting: pass "
                         f"Sweep({key}=...) {where}")
                continue
            problems = _domain_problems(key, value, self.search)
            p.extend(problems)
            if problems:
                wrong.append(key)
            elif key != "epochs":
                checked[key] = value
        # Keys whose domain is wrong are left out of the trial-config checks; drop what those checks
        # then say about them (e.g. "model.depth is required"), which would only confuse.
        about_wrong = re.compile("|".join(rf"(?<![\w.]){re.escape(k)}(?!\w)" for k in wrong) or "(?!)")
        try:
            for cfg_problems in _corner_problems(self, checked):
                p.extend(x for x in cfg_problems if x not in p and not about_wrong.search(x))
        except ConfigError as exc:
            p.extend(exc.problems)
        return p


def _metric_problems(metric: Any, mode: Any) -> list[str]:
    """The metric must be one a trial reports every epoch, and the mode must agree with it."""
    allowed = sorted(EPOCH_METRICS)
    if not isinstance(metric, str) or metric not in EPOCH_METRICS:
        hint = ""
        if isinstance(metric, str):
            if metric.startswith("test_"):
                hint = ("; test metrics exist only after the last epoch, so ASHA and Optuna cannot "
                        "compare trials on them")
                if "val_" + metric[5:] in EPOCH_METRICS:
                    hint += f": use {'val_' + metric[5:]!r}"
            else:
                short = {"accuracy": "val_accuracy", "acc": "val_accuracy", "val_acc": "val_accuracy",
                         "loss": "val_loss", "error": "val_top1_error", "top1_error": "val_top1_error",
                         "top5_error": "val_top5_error", "train_acc": "train_accuracy"}
                close = [short[metric]] if metric in short else \
                    difflib.get_close_matches(metric, allowed, n=2, cutoff=0.6)
                if close:
                    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?"
        return [f"metric={metric!r} is not a metric every trial reports each epoch{hint} "
                f"(one of {allowed})"]
    better = EPOCH_METRICS[metric]
    if mode in ("max", "min") and mode != better:
        word = "lower" if better == "min" else "higher"
        return [f"mode={mode!r} contradicts metric={metric!r}, which is better {word}: "
                f"mode={mode!r} would keep the worst trials; use mode={better!r}"]
    return []


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out, problems = read_overrides(items)
    if problems:
        raise ConfigError(problems)
    return out


def name_problem(name: Any) -> str | None:
    """Why ``name`` is no sweep name (it names a directory under the storage), or None."""
    if isinstance(name, str) and _NAME_RE.match(name):
        return None
    shown = repr(name)
    if len(shown) > 60:  # a pasted paragraph is not echoed whole
        shown = f"{shown[:40]}... ({len(name)} characters)"
    problem = (f"name={shown} must be 1-100 letters, digits, '_', '-' or '.', starting with a letter "
               "or digit")
    if isinstance(name, str) and "/" in name.rstrip("/"):  # a path where a name goes
        path = name.rstrip("/")
        parent, _, last = path.rpartition("/")
        problem += (f"; for the sweep in {path}, give its name and storage: {shlex.quote(last)} "
                    f"--storage {shlex.quote(parent or '/')}")
    return problem


def read_overrides(items: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """(the well-formed overrides, the problems of the others): a caller that goes on to check the
    values can report every problem at once, not the syntax first and the keys after a fix."""
    out: dict[str, Any] = {}
    given: dict[str, str] = {}  # key -> the item that set it
    problems = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r} is not key=value (e.g. max_epochs=6 or model.width=1/8)")
            continue
        key = ALIASES.get(key.strip(), key.strip())
        parsed = parse_value(value.strip())
        if key in given and repr(out[key]) != repr(parsed):  # the last one won, silently
            problems.append(f"{key} is set twice, to different values ({given[key]}, {item}): keep one")
        given.setdefault(key, item)
        out.setdefault(key, parsed)
    return out, problems


def with_override_problems(problems: Sequence[str], build: Callable[[], T]) -> T:
    """``build()`` (which validates the well-formed overrides), refused with the malformed ones'
    ``problems`` beside its own: a user sees every problem at once."""
    try:
        value = build()
    except ConfigError as exc:
        raise ConfigError([*problems, *exc.problems]) from None
    if problems:
        raise ConfigError(list(problems))
    return value


def apply_overrides(sweep: Sweep, overrides: Mapping[str, Any]) -> Sweep:
    """Sweep fields by name (max_epochs=6); anything else is a fixed trial setting (data.name=digits)."""
    file_only = sorted(k for k in overrides if k in _FILE_ONLY)
    if file_only:  # it read "space['resources'] is a Sweep setting": the command line gave it
        raise ConfigError([f"{k}={overrides[k]!r}: {k} is set in the search-space file only "
                           f"(Sweep({k}=...)), not on the command line" for k in file_only])
    fields = {f.name: f for f in dataclasses.fields(Sweep) if f.name not in _FILE_ONLY}
    changes = {k: v for k, v in overrides.items() if k in fields}
    for key, value in changes.items():
        # max_epochs=1e3 reads as a float; an integer field takes it as the integer it names, as the
        # trial settings do (inf, nan and 2.5 stay floats, and are refused by name).
        if str(fields[key].type).startswith("int") and isinstance(value, float) and value.is_integer() \
                and abs(value) <= 2**53:  # beyond, a float is not the integer it prints as
            changes[key] = int(value)
    space = dict(sweep.space)
    space.update({k: v for k, v in overrides.items() if k not in fields})
    if "storage" in changes and changes["storage"] is not None:
        changes["storage"] = str(changes["storage"])
    try:
        return sweep.replace(space=space, **changes)
    except ConfigError as exc:
        # A setting the command line gave is not the space file's to blame ("space: device='tpu'").
        given = tuple(form for k in overrides if k not in fields
                      for form in (f"space: {k}=", f"space: unknown setting {k!r}"))
        raise ConfigError([p[len("space: "):] if p.startswith(given) else p
                           for p in exc.problems]) from None


# ---- sampling -----------------------------------------------------------------------------------------



def run_space(sweep: Sweep) -> dict[str, Any]:
    """The space trials are drawn from: the file's, plus a ``seed`` grid axis when ``seeds > 1``."""
    space = dict(sweep.space)
    if sweep.seeds > 1:
        space["seed"] = {"grid_search": [sweep.seed + i for i in range(sweep.seeds)]}
    return space


def grid_cells(sweep: Sweep) -> list[dict[str, Any]]:
    """Every combination of the grid axes, seeds included (one empty cell if there are none)."""
    axes = {k: list(v["grid_search"]) for k, v in run_space(sweep).items() if _is_grid(v)}
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def grid_size(sweep: Sweep) -> int:
    """How many cells :func:`grid_cells` has, without listing them (nor the seed axis)."""
    return math.prod(len(v["grid_search"]) for v in sweep.space.values() if _is_grid(v)) * max(sweep.seeds, 1)


def trial_count(sweep: Sweep) -> int:
    return grid_size(sweep) * sweep.num_samples


def base_config(sweep: Sweep, values: Mapping[str, Any]) -> dict[str, Any]:
    """The flat trial config: sampled values + the Sweep's epochs and (default) seed."""
    flat = {"seed": sweep.seed}
    flat.update(values)
    flat["epochs"] = sweep.max_epochs
    return flat


def sample_config(sweep: Sweep, seed: int | None = None) -> dict[str, Any]:
    """One flat trial config drawn from the space (grid axes: a random cell), without Ray."""
    import numpy as np

    rng = random.Random(sweep.seed if seed is None else seed)
    state = np.random.RandomState(rng.randrange(2**31))
    values = {}
    for key, value in sweep.space.items():
        if _is_grid(value):
            values[key] = rng.choice(list(value["grid_search"]))
        elif _is_domain(value):
            values[key] = _plain(value.sample(random_state=state))
        else:
            values[key] = value
    return base_config(sweep, values)


def corner_values(value: Any) -> list[Any]:
    """Values that exercise a space entry: every category / grid value, a numeric domain's bounds."""
    if _is_grid(value):
        return list(value["grid_search"])
    if not _is_domain(value):
        return [value]
    if hasattr(value, "categories"):
        return list(value.categories)
    if _domain(value).sampler == "normal":  # unbounded: check its mean
        return [_domain(value).mean]
    if hasattr(value, "lower") and hasattr(value, "upper"):
        lower, upper = value.lower, value.upper
        if type(value).__name__ == "Integer":
            upper = upper - 1  # tune.randint excludes its upper bound
        return [lower, upper]
    return [value]


def _corners(sweep: Sweep, space: Mapping[str, Any]) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """(each key's corner values, the base config of their first ones): what validation varies."""
    corners = {k: c for k, c in ((k, corner_values(v)) for k, v in space.items()) if c}
    return corners, base_config(sweep, {k: c[0] for k, c in corners.items()})


def _corner_problems(sweep: Sweep, space: Mapping[str, Any] | None = None) -> list[list[str]]:
    """Validate a base config, then each corner value of each key on top of it."""
    corners, base = _corners(sweep, sweep.space if space is None else space)
    results = [_config_problems(base)]
    for key, candidates in corners.items():
        for candidate in candidates[1:]:
            results.append(_config_problems({**base, key: candidate}))
    return results


def _grid_duplicates(sweep: Sweep, space: Mapping[str, Any]) -> list[str]:
    """Grid values that are one setting once read as the trial reads them (True, 'yes' and 1; 0.125
    and '1/8'; 0.1 twice): each would be a cell of its own, with its own ASHA rungs and report line."""
    _, base = _corners(sweep, space)
    problems = []
    for key, value in space.items():
        if not _is_grid(value):
            continue
        read: dict[str, list[Any]] = {}
        for candidate in value["grid_search"]:
            setting = TrialConfig.from_flat({**base, key: candidate}).to_flat()[key]
            read.setdefault(repr(setting), []).append(candidate)
        for setting, same in read.items():
            if len(same) > 1:
                listed = ", ".join(repr(v) for v in same[:-1]) + f" and {same[-1]!r}"
                problems.append(f"{key}: grid_search values {listed} are one setting ({setting}): "
                                "each would be a cell of its own; list it once")
    return problems


def _config_problems(flat: Mapping[str, Any]) -> list[str]:
    try:
        TrialConfig.from_flat(flat)
    except ConfigError as exc:
        return [f"space: {p}" for p in exc.problems]
    return []


def _resource_problems(name: str, resources: Any) -> list[str]:
    if not isinstance(resources, Mapping):
        return [f"{name}={resources!r} must be a dict like {{'cpu': 1, 'gpu': 0.5}}, a function "
                "of the trial config returning one, or 'auto' (GPU shares from a measured memory "
                "probe)"]
    p = []
    for key, amount in resources.items():
        if key not in ("cpu", "gpu"):
            p.append(f"{name}[{key!r}] is not one of ['cpu', 'gpu']")
        elif isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0 \
                or not math.isfinite(amount):
            p.append(f"{name}[{key!r}]={amount!r} must be a number >= 0")
        elif key == "gpu" and amount > 1 and amount != int(amount):
            p.append(f"{name}['gpu']={amount!r}: fractions are allowed only below 1 GPU")
    if not p and resources.get("cpu", 1) == 0 and resources.get("gpu", 0) == 0:
        p.append(f"{name} asks for no CPU and no GPU; a trial needs at least one")
    return p


def trial_resources(sweep: Sweep, cfg: TrialConfig) -> dict[str, float]:
    """Resources for one trial; a callable ``resources`` is checked on each config it returns for.

    ``resources="auto"`` asks for one CPU and at most one GPU here; the launch replaces the GPU
    share with the measured packing (sweeper.packing).
    """
    from sweeper.loading import _line_in, _one_line  # the space file's traceback, as loading reads it

    name = f"resources(config of {cfg.model.arch})"
    if sweep.resources == AUTO:
        return {"cpu": 1.0, "gpu": 1.0}
    if callable(sweep.resources):
        try:
            resources = sweep.resources(cfg)
        except BaseException as exc:  # noqa: B036 -- the space file's function: never a traceback
            code = getattr(sweep.resources, "__code__", None)
            line = _line_in(exc.__traceback__, code.co_filename) if code else None
            where = f"{code.co_filename}:{line}: " if code and line else ""
            message = _one_line(str(exc))
            raise ConfigError([f"{where}{name} raised {type(exc).__name__}"
                               f"{': ' + message if message else ''}; it must return a dict like "
                               "{'cpu': 1, 'gpu': 0.5}"]) from None
    else:
        resources = sweep.resources
    problems = _resource_problems(name, resources)
    if problems:
        raise ConfigError(problems)
    return {"cpu": float(resources.get("cpu", 1)), "gpu": float(resources.get("gpu", 0))}


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars (configs go to JSON, MLflow and dataclasses)."""
    return value.item() if hasattr(value, "item") else value


# ---- dry run ------------------------------------------------------------------------------------------


def dry_run(sweep: Sweep) -> TrialConfig:
    """Build one sampled model on the CPU and run a forward pass; return the sampled config."""
    import torch

    from sweeper.models import build_model, is_allocation_failure, split_outputs, too_big

    cfg = TrialConfig.from_flat(sample_config(sweep))
    if callable(sweep.resources):
        trial_resources(sweep, cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=_num_classes(cfg)).eval()
    from sweeper.data import resolution

    side = resolution(cfg.data)
    try:
        with torch.no_grad():
            logits = split_outputs(model(torch.zeros(2, 3, side, side)))[0]
    except (RuntimeError, MemoryError) as exc:
        if not is_allocation_failure(exc):
            raise
        raise too_big(exc, f"a forward pass of {cfg.model.arch} (model.width={cfg.model.width:g}) at "
                           f"data.resolution={side}", "lower data.resolution or model.width") from None
    if logits.shape != (2, _num_classes(cfg)):
        raise ConfigError([f"dry run: {cfg.model.arch} produced logits of shape "
                           f"{tuple(logits.shape)}, expected (2, {_num_classes(cfg)})"])
    return cfg


def _num_classes(cfg: TrialConfig) -> int:
    from sweeper.data import num_classes

    return num_classes(cfg.data) or 10  # imagefolder: any count exercises the model
