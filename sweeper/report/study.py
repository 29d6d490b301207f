"""The study model: trials as the record (and ``sweeper export``) state them, grouped into cells and seeds.

- A **trial**'s facts -- outcome, at_chance, cause, best/final/test accuracy -- are its export row
  (:func:`sweeper.export.trial_row`), so the report never states a number the export does not give.
- A **cell** is one combination of the sweep's grid axes: the config keys that vary across trials,
  less the sampled ones (``optim.lr`` and other continuous domains) and ``seed``.
- A **replicate** is one seed of a cell (``Sweep(seeds=N)`` makes ``seed`` a grid axis): its trials are
  that seed's lr samples; it trains when one of them does. A cell's verdict counts its seeds
  ("trains in 3/3 seeds").

When the axes are a subset of model x init x BatchNorm (the VGG depth study), the cells also carry
their row in the depth x init x BN heatmap: the model's name and its real weight-layer count.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sweeper.export import trial_row
from sweeper.outcomes import NOT_TRAINED, trained_bar
from sweeper.records import SweepRecord

SIGNAL_FLOOR = 1e-6
FLOOR_TEXT = "1e-6"
INIT_ORDER = ("normal", "default", "xavier", "he")  # from the problem to the fix, left to right
LAYER_KEY = re.compile(r"^l(\d+)_(conv|fc)$")
_KNOWN_DATASET_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000, "mnist": 10}
# Config keys that are never a cell axis: replicates and the budget.
_NOT_AXES = ("seed", "epochs")
# The axes of the depth x init x BN view, in the order cells are labelled.
MODEL_AXES = ("model.arch", "model.depth")
VIEW_AXES = (*MODEL_AXES, "model.init", "model.batch_norm")
# How a sampled (not grid) domain is spelled in the sweep's recorded space (spaces.describe_domain).
_SAMPLED_PREFIXES = ("uniform(", "loguniform(", "quniform(", "qloguniform(", "randn(", "qrandn(",
                     "randint(", "qrandint(", "lograndint(", "qlograndint(", "sample_from(")
# Labels read off the outcome alone rank below causes the diagnostics named (evidence).
DERIVED = {"at_chance", "slow", "no_data", "diverged", "failed", "no_diagnostics"}


# ---- numbers ---------------------------------------------------------------------------------------------


def num(value: Any) -> float:
    """A float from a record value; the record spells non-finite numbers as strings ("nan", "inf")."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


def finite(value: Any) -> bool:
    return math.isfinite(num(value))


# ---- trials ----------------------------------------------------------------------------------------------


@dataclass(eq=False)  # identity: two trials are never "equal"
class Trial:
    id: str
    name: str
    config: dict[str, Any]
    status: str
    row: dict[str, Any]  # its `sweeper export` row: every number below comes from it
    prune: dict[str, Any] | None
    epochs: list[dict[str, Any]]
    model: str = "?"  # arch, or vgg<depth>p for a plain stack (as trial names spell it)
    depth: int | None = None  # weight layers the model really has (models.weight_depth)
    init: str = "he"
    bn: bool = False
    seed: Any = None
    lr: float = math.nan
    label: str = ""  # why it did not train (a cause or a derived label); "" if it trained
    init_vals: dict[str, Any] = field(default_factory=dict)  # step-0 values, "init/" stripped

    @property
    def outcome(self) -> str:
        return self.row.get("outcome") or ""

    @property
    def at_chance(self) -> bool:
        return bool(self.row.get("at_chance"))

    @property
    def cause(self) -> str:
        return self.row.get("cause") or ""

    @property
    def acc(self) -> float:
        """Best-epoch validation accuracy (export: best_val_accuracy)."""
        return num(self.row.get("best_val_accuracy"))

    @property
    def final(self) -> float:
        return num(self.row.get("final_val_accuracy"))

    @property
    def test(self) -> float:
        return num(self.row.get("test_accuracy"))

    @property
    def first(self) -> dict[str, Any]:
        return self.epochs[0] if self.epochs else {}

    @property
    def running(self) -> bool:
        return self.status != "finished"

    @property
    def cause_check(self) -> str:
        """How its named cause was checked: the counterfactuals' sentence (``cf_evidence``, recorded
        at the epoch the stall was first named, also when the runs were skipped and why); "" when
        none was recorded (counterfactuals off, or no stall named)."""
        for e in self.epochs:
            if e.get("cf_evidence"):
                return str(e["cf_evidence"])
        return ""


_DEPTHS: dict[tuple, int | None] = {}


def weight_layers(config: Mapping[str, Any]) -> int | None:
    """The weight layers the trial's model really has (compact head: 1 linear, paper head: 3)."""
    model = {k: v for k, v in config.items() if k.startswith("model.")}
    key = tuple(sorted((k, repr(v)) for k, v in model.items()))
    if key not in _DEPTHS:
        try:
            from sweeper.config import TrialConfig
            from sweeper.models import weight_depth

            _DEPTHS[key] = weight_depth(TrialConfig.from_flat(model).model)
        except Exception:  # noqa: BLE001 - an odd config must not sink the report
            _DEPTHS[key] = None
    return _DEPTHS[key]


def model_name(config: Mapping[str, Any]) -> str:
    arch = str(config.get("model.arch", "vgg11"))
    if arch == "vgg" and config.get("model.depth") is not None:
        return f"vgg{config['model.depth']}p"  # a plain stack of the paper's depth count
    return arch


def load_trials(record: SweepRecord) -> list[Trial]:
    trials = []
    for t in record.trials():
        config = dict(t.get("config") or {})
        epochs = record.epochs(t["trial_id"])  # a line the driver is still appending is skipped
        trial = Trial(id=t["trial_id"], name=str(t.get("name") or t["trial_id"]), config=config,
                      status=str(t.get("status") or "running"), row=trial_row(t, epochs),
                      prune=t.get("prune"), epochs=epochs)
        trial.model = model_name(config)
        trial.depth = weight_layers(config)
        trial.init = str(config.get("model.init", "he"))
        trial.bn = bool(config.get("model.batch_norm", False))
        trial.seed = config.get("seed")
        trial.lr = num(config.get("optim.lr"))
        trial.init_vals = {k[5:]: v for k, v in trial.first.items() if k.startswith("init/")}
        trials.append(trial)
    return trials


def num_classes(trials: list[Trial]) -> tuple[int, str]:
    """(C, how it was found): the epochs' recorded ln C, the dataset's class count, else
    e^(smallest initial loss), else 10."""
    for t in trials:
        for e in t.epochs:
            ln_c = num(e.get("chance_loss"))
            if math.isfinite(ln_c) and ln_c > 0:
                return round(math.exp(ln_c)), "the trials' recorded ln C"
    for t in trials:
        name = t.config.get("data.name")
        if name is None:
            continue
        try:
            from sweeper.config import TrialConfig
            from sweeper.data import num_classes as data_classes

            data = {k: v for k, v in t.config.items() if k.startswith("data.")}
            n = data_classes(TrialConfig.from_flat(data).data)
            if n:
                return int(n), f"dataset {name}"
        except Exception:  # noqa: BLE001
            if name in _KNOWN_DATASET_CLASSES:
                return _KNOWN_DATASET_CLASSES[name], f"dataset {name}"
    # A small-init net starts exactly at ln C while He init starts above it (science note 1).
    losses = [num(t.init_vals.get("initial_loss")) for t in trials]
    losses = [v for v in losses if math.isfinite(v) and 0.5 < v < 12]
    if losses:
        n = round(math.exp(min(losses)))
        if n >= 2:
            return n, "the smallest initial loss (ln C)"
    return 10, "default (no dataset or initial loss recorded)"


# ---- axes ------------------------------------------------------------------------------------------------


def grid_axes(configs: list[Mapping[str, Any]], space: Mapping[str, Any] | None) -> list[str]:
    """The config keys that vary across trials and define cells: grid axes (and categorical choices),
    not sampled values (optim.lr, ...) and not the seed.

    The recorded space (sweep.json's ``space``: each key's domain as text) says which is which; for a
    key it does not describe, a float-valued key counts as sampled.
    """
    space = space or {}
    keys: list[str] = []
    for cfg in configs:
        keys.extend(k for k in cfg if k not in keys)
    out = []
    for k in keys:
        values = [c.get(k) for c in configs]
        if k in _NOT_AXES or len({repr(v) for v in values}) < 2:
            continue
        desc = space.get(k)
        floats = any(isinstance(v, float) for v in values)
        if isinstance(desc, str) and desc.startswith("grid_search("):
            out.append(k)
        elif isinstance(desc, str) and desc.startswith(_SAMPLED_PREFIXES):
            continue
        elif not floats:  # a choice of categories (or a key the space does not describe)
            out.append(k)
    order = {k: i for i, k in enumerate(VIEW_AXES)}
    return sorted(out, key=lambda k: (order.get(k, len(order)), out.index(k)))


# ---- cells and seeds -------------------------------------------------------------------------------------


def init_sort(init: str) -> tuple[int, str]:
    return (INIT_ORDER.index(init), init) if init in INIT_ORDER else (len(INIT_ORDER), init)


@dataclass
class Replicate:
    """One seed of a cell: its trials (the lr samples) and whether any of them trained."""
    seed: Any
    trials: list[Trial]
    best: Trial | None  # highest best-epoch validation accuracy
    verdict: str  # "trained", "running", "stalled"
    reason: str = ""  # the stall's cause, for a stalled seed

    @property
    def acc(self) -> float:
        return self.best.acc if self.best else math.nan

    @property
    def stopped(self) -> bool:
        """Not judged because the sweep was interrupted: its trials not finished were all stopped."""
        return self.verdict == "running" and all(t.outcome == "stopped" for t in self.trials if t.running)


@dataclass
class Cell:
    values: dict[str, Any]  # axis -> value
    trials: list[Trial]
    replicates: list[Replicate]
    outcome: str  # "trained", "running", "mixed", "stalled: <reason>"
    reasons: Counter  # labels of the trials that did not train
    model: str = "?"
    depth: int | None = None
    init: str = "he"
    bn: bool = False
    signal_layer: str | None = None  # plain cells: where the init signal fell below the floor
    signal_low: float = math.nan
    signal_low_layer: str | None = None
    signal_layers: int = 0
    signal_source: str = ""  # "init" or "epoch 1"

    @property
    def key(self) -> tuple:
        return tuple(self.values.items())

    @property
    def view_key(self) -> tuple[str, str, bool]:
        return self.model, self.init, self.bn

    @property
    def n(self) -> int:
        return len(self.replicates)

    def count(self, verdict: str) -> int:
        return sum(r.verdict == verdict for r in self.replicates)

    @property
    def trained(self) -> bool:
        return self.outcome == "trained"

    @property
    def stalled(self) -> bool:
        return self.outcome.startswith("stalled")

    @property
    def stopped(self) -> bool:
        """Not judged because the sweep was interrupted: every seed of it not finished was stopped
        (a cell with one finished and one stopped trial was said to be "still running")."""
        return self.outcome == "running" and all(r.stopped for r in self.replicates if r.verdict == "running")

    @property
    def mixed(self) -> bool:
        return self.outcome == "mixed"

    @property
    def reason(self) -> str:
        if ": " in self.outcome:
            return self.outcome.split(": ", 1)[1]
        causes = Counter(r.reason for r in self.replicates if r.verdict == "stalled")
        return causes.most_common(1)[0][0] if causes else ""

    @property
    def best(self) -> Trial | None:
        """The best trial over every seed (figures draw it)."""
        scored = [t for t in self.trials if math.isfinite(t.acc)]
        return max(scored, key=lambda t: t.acc) if scored else None

    @property
    def is_vgg(self) -> bool:
        return self.model.startswith("vgg") and self.depth is not None

    # Per-seed numbers: each seed's best trial (selected on validation accuracy) speaks for the seed.
    def per_seed(self, what: str) -> list[float]:
        return [num(getattr(r.best, what)) if r.best else math.nan for r in self.replicates]

    def stats(self, what: str) -> tuple[float, float, float, int]:
        """(mean, min, max, how many seeds have it) of the seeds' best trials' ``what``."""
        vals = [v for v in self.per_seed(what) if math.isfinite(v)]
        if not vals:
            return math.nan, math.nan, math.nan, 0
        return sum(vals) / len(vals), min(vals), max(vals), len(vals)

    def verdict(self) -> str:
        """The cell's verdict with its count: "trains in 3/3 seeds", "stalls in 2/3 seeds (dead_relu)"."""
        n, parts = self.n, []
        trained, stalled, running = self.count("trained"), self.count("stalled"), self.count("running")
        if trained:
            parts.append(f"trains in {trained}/{n} seed{'s' if n > 1 else ''}")
            # Over the bar once, at chance at the end (export's at_chance): "trains" alone hid it.
            fell = sum(r.verdict == "trained" and r.best is not None and r.best.at_chance
                       for r in self.replicates)
            if fell:
                parts[-1] += f", then ends at chance in {fell}"
        if stalled:
            causes = Counter(r.reason for r in self.replicates if r.verdict == "stalled")
            # Trials that ran their whole budget (outcome completed) are not stalls, which the
            # outcome counts beside this line would contradict: "slow" ones stayed below the bar,
            # "at_chance" ones ended at chance with no stall named in their epochs.
            unstalled = not any(t.outcome == "stalled" for r in self.replicates
                                if r.verdict == "stalled" for t in r.trials)
            if unstalled and set(causes) == {"slow"}:
                verb = "stays below the bar"
            elif unstalled and set(causes) <= {"slow", "at_chance"}:
                verb = "ends at chance"
                causes = Counter({("no stall named" if c == "at_chance" else c): k
                                  for c, k in causes.items()})
            else:
                verb = "stalls"
                # A seed that ended at chance with no stall named beside seeds that stalled: say so,
                # not the raw flag as if it were a cause.
                causes = Counter({("at chance, no stall named" if c == "at_chance" else c): k
                                  for c, k in causes.items()})
            why = ", ".join(f"{c} ×{k}" if k > 1 and len(causes) > 1 else c
                            for c, k in causes.most_common())
            parts.append(f"{verb} in {stalled}/{n} seed{'s' if n > 1 else ''} ({why})")
        if running:
            # A trial of an interrupted sweep is "stopped" (its outcome), not running: the report said
            # "still running" beside the outcome line's "1 stopped" and status's "not running".
            stopped = sum(r.stopped for r in self.replicates)
            if running - stopped:
                parts.append(f"still running in {running - stopped}/{n}")
            if stopped:
                parts.append(f"stopped before its end in {stopped}/{n} (the sweep was interrupted)")
        return "; ".join(parts) or "no data"


def _trial_label(t: Trial) -> str:
    """Why a trial did not train, from its recorded outcome, at_chance and cause."""
    if t.outcome == "stalled":
        # No cause recorded: the diagnostics were off (with them on, every stall is named). It was
        # "plateau" here, a cause the diagnostics name from evidence this trial never recorded.
        return t.cause or "no_diagnostics"
    if t.outcome in ("diverged", "failed", "val_collapse"):
        return t.outcome
    if not t.epochs and not math.isfinite(t.acc):
        return "no_data"
    if t.at_chance:  # pruned (or stopped) while at chance: the diagnostics' cause, if they named one
        return t.cause or "at_chance"
    return "slow"  # learned something, not enough to pass the bar


def _replicate(seed: Any, ts: list[Trial], bar: float) -> Replicate:
    scored = [t for t in ts if math.isfinite(t.acc)]
    best = max(scored, key=lambda t: t.acc) if scored else None
    # A running trial above the bar counts: it has shown the net can learn. A stalled one does not:
    # a learn-then-collapse trial's best epoch came before it fell back to chance.
    trained = [t for t in scored if t.outcome not in NOT_TRAINED and t.acc > bar]
    for t in ts:
        t.label = "" if t in trained else _trial_label(t)
    if trained:
        return Replicate(seed, ts, best, "trained")
    if any(t.running for t in ts):
        return Replicate(seed, ts, best, "running")
    done = [t for t in ts if not t.running]
    evidence = Counter(t.label for t in done if t.label not in DERIVED)
    reasons = evidence or Counter(t.label for t in done)
    return Replicate(seed, ts, best, "stalled", reasons.most_common(1)[0][0] if reasons else "no_data")


def _seed_sort(seed: Any) -> tuple[int, Any]:
    return (0, seed) if isinstance(seed, (int, float)) else (1, str(seed))


def cells_of(trials: list[Trial], axes: list[str], chance: float) -> list[Cell]:
    groups: dict[tuple, list[Trial]] = {}
    for t in trials:
        groups.setdefault(tuple(repr(t.config.get(k)) for k in axes), []).append(t)
    cells = []
    for ts in groups.values():
        first = ts[0]
        by_seed: dict[Any, list[Trial]] = {}
        for t in ts:
            by_seed.setdefault(t.seed, []).append(t)
        reps = [_replicate(s, by_seed[s], trained_bar(chance))
                for s in sorted(by_seed, key=_seed_sort)]
        verdicts = Counter(r.verdict for r in reps)
        if verdicts["trained"] and verdicts["stalled"]:
            outcome = "mixed"
        elif verdicts["trained"]:
            outcome = "trained"
        elif verdicts["running"]:
            outcome = "running"
        else:
            causes = Counter(r.reason for r in reps)
            outcome = f"stalled: {causes.most_common(1)[0][0]}"
        cell = Cell({k: first.config.get(k) for k in axes}, ts, reps, outcome,
                    Counter(t.label for t in ts if t.label and not t.running),
                    model=first.model, depth=first.depth, init=first.init, bn=first.bn)
        if not cell.bn:
            _signal(cell)
        cells.append(cell)
    return sorted(cells, key=cell_sort)


def cell_sort(c: Cell) -> tuple:
    return (row_sort(c.model, c.depth), c.bn, init_sort(c.init),
            tuple(repr(v) for k, v in c.values.items() if k not in VIEW_AXES))


def row_sort(model: str, depth: int | None) -> tuple:
    return (depth if depth is not None else math.inf, model)


# ---- labels --------------------------------------------------------------------------------------------


def model_label(model: str, depth: int | None) -> str:
    """``vgg11 (9 weight layers)``: the paper's name, and the layers the model really has."""
    return f"{model} ({depth} weight layers)" if depth is not None else model


def cell_label(cell: Cell, view: bool = True) -> str:
    """A cell as the text names it. The depth x init x BN view names model, init and BN; other sweeps
    name the cell's axis values."""
    parts = []
    if view or any(k in cell.values for k in MODEL_AXES):
        parts.append(model_label(cell.model, cell.depth))
    if view or "model.init" in cell.values:
        parts.append(cell.init)
    if view or "model.batch_norm" in cell.values:
        parts.append("BN" if cell.bn else "no BN")
    parts += [f"{k.split('.')[-1]}={axis_value(v)}" for k, v in cell.values.items()
              if k not in VIEW_AXES]
    return ", ".join(parts) or "all trials"


def axis_value(value: Any) -> str:
    """An axis value as the text names it. A file or checkpoint location (model.init_from resolved
    to ``<storage>/<sweep>/<trial dir>/checkpoint_N``) is named by its last three parts -- the source
    sweep, trial and checkpoint -- not its whole path; the cells table keeps the full value."""
    text = str(value)
    if "/" in text and len(text) > 40:
        tail = [p for p in text.split("?", 1)[0].rstrip("/").split("/") if p][-3:]
        return ".../" + "/".join(tail)
    return text


# ---- the forward signal at init --------------------------------------------------------------------------


def layer_series(row: dict[str, Any], name: str) -> list[tuple[int, str, float]]:
    """[(index, 'l03_conv', value)] for ``name/lNN_*`` keys of a metrics row, in execution order."""
    out = []
    prefix = name + "/"
    for key, value in row.items():
        if key.startswith(prefix):
            layer = key[len(prefix):]
            match = LAYER_KEY.match(layer)
            if match:
                out.append((int(match.group(1)), layer, num(value)))
    return sorted(out)


def signal_floor_layer(stds: list[tuple[int, str, float]], floor: float = SIGNAL_FLOOR
                       ) -> tuple[str | None, float, str | None]:
    """(first layer whose std < floor x l00's, the smallest ratio seen, its layer).

    l00 is the reference because its input is the data itself: anything lost after it was lost to
    the weights.
    """
    good = [(i, k, v) for i, k, v in stds if math.isfinite(v)]
    if len(good) < 2 or good[0][2] <= 0:
        return None, math.nan, None
    ref = good[0][2]
    crossed, low, low_key = None, math.inf, None
    for _, key, value in good[1:]:
        ratio = value / ref
        if ratio < low:
            low, low_key = ratio, key
        if crossed is None and ratio < floor:
            crossed = key
    return crossed, low, low_key


def _signal(cell: Cell) -> None:
    """Where the forward signal of a plain cell fell below SIGNAL_FLOOR of l00's, at init.

    Step-0 values are preferred (the first seed's); without them the epoch-1 row of the smallest-lr
    trial (which moved least) stands in.
    """
    with_init = [t for t in cell.trials if layer_series(t.init_vals, "act_std")]
    if with_init:
        stds, source = layer_series(with_init[0].init_vals, "act_std"), "init"
    else:
        fallback = sorted((t for t in cell.trials if layer_series(t.first, "act_std")),
                          key=lambda t: t.lr if math.isfinite(t.lr) else math.inf)
        if not fallback:
            return
        stds, source = layer_series(fallback[0].first, "act_std"), "epoch 1"
    crossed, low, low_key = signal_floor_layer(stds)
    cell.signal_layer, cell.signal_low, cell.signal_low_layer = crossed, low, low_key
    cell.signal_layers, cell.signal_source = len(stds), source


# ---- the study -----------------------------------------------------------------------------------------


@dataclass
class Study:
    meta: dict[str, Any]
    trials: list[Trial]
    axes: list[str]
    cells: list[Cell]
    num_classes: int
    classes_from: str

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes

    @property
    def ln_c(self) -> float:
        return math.log(self.num_classes)

    @property
    def view(self) -> bool:
        """Whether the cells are (model, init, BN): the depth x init x BN heatmap and findings apply."""
        return bool(self.trials) and set(self.axes) <= set(VIEW_AXES)

    @property
    def seeds(self) -> list[Any]:
        return sorted({t.seed for t in self.trials}, key=_seed_sort)

    def outcome_counts(self) -> Counter:
        """Trials per recorded outcome (export's `outcome` column; "running" for none yet)."""
        return Counter(t.outcome or "running" for t in self.trials)

    def pruned_at_chance(self) -> int:
        return sum(t.outcome == "pruned" and t.at_chance for t in self.trials)


def load_study(record: SweepRecord) -> Study:
    meta = record.meta() if record.exists() else {}
    trials = load_trials(record)
    n, how = num_classes(trials)
    axes = grid_axes([t.config for t in trials], meta.get("space"))
    return Study(meta, trials, axes, cells_of(trials, axes, 1.0 / n), n, how)
