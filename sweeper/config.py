"""The trial configuration: one frozen dataclass per layer of the program.

A trial arrives as a flat dict with dotted keys (``{"model.arch": "vgg16", "optim.lr": 0.01}``) from a
search space, a Ray Tune sample or the command line. :func:`TrialConfig.from_flat` turns it into nested,
validated, immutable objects and reports **every** problem at once, each naming the field, the value and
what is allowed. Defaults live here and nowhere else.

Names of architectures, datasets and inits are checked against the registries, which are imported
lazily so that this module stays importable without torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

__all__ = [
    "EPOCH_METRICS",
    "MAX_SEED",
    "ConfigError",
    "DataConfig",
    "DiagnosticsConfig",
    "ModelConfig",
    "OptimConfig",
    "TrialConfig",
    "parse_value",
]


class ConfigError(ValueError):
    """One or more invalid settings; ``problems`` lists each as a sentence."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            msg = f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)


def file_in_the_way(option: str, path) -> list[str]:
    """A problem if an output ``path`` (or one of its parents) is an existing file, so that no
    directory can be made there: ``--out x/y`` with ``x`` a file would end in FileExistsError."""
    from pathlib import Path

    path = Path(path)
    blocked = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocked is not None and not blocked.is_dir():
        return [f"{option} {path}: {blocked} is a file, not a directory"]
    if (problem := unwritable_directory(path)) is not None:
        return [f"{option} {problem}"]
    return []


def unwritable_directory(directory) -> str | None:
    """Why files cannot be written in ``directory`` (made on first use where it is missing), or
    None. Its nearest existing ancestor is probed by a real write: root passes ``os.access`` checks
    on /proc, /sys and read-only mounts, and the write then failed with a traceback."""
    import os
    import tempfile
    from pathlib import Path

    given = Path(os.path.abspath(directory))
    existing = given
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{directory} cannot be made: {existing} is not a directory"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sweeper-probe-", dir=existing))
    except OSError as exc:
        import errno

        what = "is not writable" if existing == given else f"cannot be made in {existing}"
        # /proc answers "No such file or directory" for a directory that exists: say what it means.
        why = "files cannot be created there" if exc.errno == errno.ENOENT else exc.strerror or exc
        return f"{directory} {what} ({why})"
    return None


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "vgg11"
    # Weight layers of a plain VGG stack (convs + 3, as the paper counts); only for arch='vgg'.
    # 11/13/16/19 give the paper's configurations A/B/D/E exactly.
    depth: int | None = None
    batch_norm: bool = False
    width: float = 1.0  # channel multiplier; 1/8 keeps deep VGGs fast on a CPU
    head: str = "compact"  # 'paper': 4096-4096-N with dropout; 'compact': global pool + linear
    dropout: float = 0.5  # on the paper head's FC1/FC2, as in the VGG recipe
    stem: str = "cifar"  # ResNet: 'cifar' (3x3, no max-pool) or 'imagenet' (7x7/2 + max-pool)
    aux_heads: bool = True  # GoogLeNet's two auxiliary classifiers
    aux_weight: float = 0.3  # GoogLeNet paper: loss = main + 0.3 * (aux1 + aux2)
    init: str = "he"
    # std of N(0, std^2) for init='normal'. 0.01 is the common (Caffe) reading of the VGG paper and
    # vanishes; the paper's literal "variance 1e-2" is std 0.1, which explodes at full width.
    init_std: float = 0.01
    init_mode: str = "fan_in"  # he: fan_in preserves forward signal, fan_out preserves gradients
    # 'uniform' or 'normal'; None = the scheme's own default (xavier: uniform, he: normal).
    init_distribution: str | None = None
    # ---- transfer (sweeper.transfer): start from trained weights, freeze part of the net.
    # A torchvision weights name ('ResNet18_Weights.IMAGENET1K_V1', or 'IMAGENET1K_V1' for this arch),
    # read from torch.hub's cache and never downloaded, or a state-dict / sweeper checkpoint file.
    # A torchvision name also sets the input normalisation its weights expect (ImageNet mean/std).
    pretrained: str | None = None
    # A trained trial: 'sweep:NAME/REF' (REF: best, a trial id or a trial name; the driver replaces it
    # by the trial's checkpoint location before Ray starts), or a checkpoint path / storage URI.
    init_from: str | None = None
    # Layers copied from the source: 'backbone' (all but the head, by name), 'all' (every tensor whose
    # name and shape match), 'vgg_paper' (A's first 4 convs into D/E's convs of the same stage and
    # position, + the head's linears: VGG paper sec. 3.1),
    # 'none' (nothing: the from-scratch control); None = 'backbone' for pretrained, 'all' for init_from.
    init_layers: str | None = None
    # 'none'; 'backbone' (only the head trains); 'all_but_last:N' (the last N backbone blocks and the
    # head train). Frozen parameters are left out of the optimizer; frozen BN/Dropout stay in eval mode.
    freeze: str = "none"


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    dir: str | None = None  # where real datasets live (or are downloaded to)
    download: bool = False  # real datasets only; offline by default
    resolution: int | None = None  # None: the dataset's native size (digits/synthetic/cifar: 32)
    val_fraction: float = 0.1  # carved from the training split with the trial's seed
    batch_size: int = 64
    limit: int | None = None  # use only the first N training examples (quick runs)
    crop_padding: int = 4  # random crop after zero-padding by this many pixels; 0 disables
    # Random horizontal flip; None = the dataset's own choice (off for digits: a mirrored 2 is no 2).
    flip: bool | None = None
    # AlexNet/VGG "random RGB colour shift": std of alpha_i in PCA lighting noise; 0 disables.
    color_shift: float = 0.1
    synthetic_size: int = 2048  # examples generated for name='synthetic'
    synthetic_classes: int = 10
    # ---- VGG's multi-scale training and multi-crop testing (sweeper.data.device, sweeper.data.views).
    # All scalars, so they travel through Tune spaces and MLflow params; sides in pixels of the square
    # image as stored (data.resolution, which must hold the largest scale: images are decoded once to
    # it and only ever shrunk, never the original 512-px files kept).
    # Side of the network's input crop; None = today's behaviour (the stored image, shifted by
    # crop_padding). VGG: 224 from S in [256, 512].
    crop: int | None = None
    # Training scale S: each batch is resized to S x S (S uniform in [scale_min, scale_max], drawn per
    # batch), then randomly cropped to `crop`. Both None: S = the stored resolution (VGG's fixed S).
    scale_min: int | None = None
    scale_max: int | None = None
    # Multi-crop test: comma-separated test scales Q, e.g. "256,384,512"; None = single-crop only.
    test_scales: str | None = None
    test_grid: int = 5  # test_grid x test_grid crops per scale (VGG: 5x5), evenly spaced corner to corner
    test_flips: bool = True  # each crop also mirrored (VGG: 2 flips; 3 scales x 2 x 25 = 150 views)

    @property
    def test_scale_list(self) -> tuple[int, ...]:
        """``test_scales`` parsed ("256,384,512" -> (256, 384, 512)); () when None. ValueError if bad."""
        if self.test_scales is None:
            return ()
        # One trailing comma is allowed ("64," for one scale); any other empty piece is a typo.
        pieces = str(self.test_scales).replace(" ", "").split(",")
        if len(pieces) > 1 and pieces[-1] == "":
            pieces = pieces[:-1]
        if pieces == [""]:
            return ()  # nothing listed: problems() says so
        if any(piece == "" for piece in pieces):
            raise ValueError(f"data.test_scales={self.test_scales!r} has an empty item")
        return tuple(int(piece) for piece in pieces)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"  # 'sgd' (momentum, as the VGG recipe) or 'adam'
    lr: float = 0.01  # torchvision's references: 0.1 is too high for BN-free VGG
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "plateau"  # 'plateau' (VGG: /10 when val accuracy stalls), 'cosine', 'step', 'constant'
    plateau_patience: int = 2  # epochs without val-accuracy gain before /10
    step_size: int = 10  # epochs between decays for schedule='step'
    gamma: float = 0.1  # decay factor for 'plateau' and 'step'
    label_smoothing: float = 0.0
    # False: no weight decay on 1-D parameters (BatchNorm/norm scales and shifts, biases); two param
    # groups. Decaying a BN scale only fights the next layer's rescaling (the fast CIFAR trainers and
    # timm exclude them); True keeps the VGG recipe, which decays every parameter.
    decay_norm_bias: bool = True


MAX_VGG_DEPTH = 1000  # see ModelConfig's check of depth
MAX_SEED = 2**62  # see TrialConfig's check of seed


@dataclass(frozen=True)
class DiagnosticsConfig:
    enabled: bool = True
    probe_size: int = 64  # examples the layer statistics are taken over (step 0: the fixed probe batch)
    # Where each epoch's layer statistics come from. 'training_step': the epoch's last full-size
    # training step, recorded by hooks as it runs (its first probe_size examples; its own gradient):
    # nearly free, and it measures the step that trained the net. 'fixed': one extra forward and
    # backward of the fixed probe batch (the first probe_size validation images, unaugmented) after
    # each epoch, about one training step's cost, for epochs compared on identical inputs. Step 0
    # always uses the fixed probe; so does 'training_step' when a batch is smaller than probe_size.
    epoch_probe: str = "training_step"
    # Stall = `stall_epochs` epochs in a row whose training loss is not below ln(num_classes) -
    # `stall_tolerance` (and validation not past 2x chance): sweeper.outcomes.no_better_than_chance.
    stall_tolerance: float = 0.05
    stall_epochs: int = 3
    stop_on_stall: bool = False
    # Check the named cause by intervention (sweeper.counterfactual), once, at the epoch a stall is
    # first named: short runs with lr / 10, lr x 10 (from the trial's init and from its stalled
    # weights), He init and BatchNorm (from scratch) on the trial's own data. On by default because
    # its cost is capped by `counterfactual_budget`; a budget too small to run them skips them, saying so.
    counterfactuals: bool = True
    counterfactual_steps: int = 200  # optimizer steps per intervention, at most (fewer if the budget caps)
    # Below this many steps per intervention a run cannot tell an escape from noise: skip instead.
    counterfactual_min_steps: int = 50
    # All interventions together take at most this fraction of the trial's budget (epochs x steps
    # per epoch). 0.1: a stalled trial costs at most 10% more than it would have anyway.
    counterfactual_budget: float = 0.1


@dataclass(frozen=True)
class TrialConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    epochs: int = 10
    seed: int = 0  # drives init, split, shuffling and augmentation
    device: str = "auto"  # 'auto' (cuda if present), 'cpu', 'cuda', 'cuda:N'
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    channels_last: bool = True  # on CUDA; ignored on CPU
    # torch.compile the model for training and evaluation steps: false, true (torch's default mode),
    # or "reduce-overhead" (one graph per batch shape, replayed as a CUDA graph: a small net's step
    # stops paying a kernel launch per op; measured 3.3x true's and ~2.4x eager's images/s for a
    # full-width VGG-16-BN at 32x32 on one H200, bench/README.md; on a CPU: static shapes, no graphs).
    # Compiling takes from seconds (small nets) to ~40 s (VGG-16 on a GPU), once per process and
    # shape: it pays off for long trials or a worker that trains many same-shaped models, not for
    # short sweeps of varied architectures. Needs a C++ compiler on CPU and Triton on CUDA.
    compile: bool | str = False
    # Same seed, same device -> bit-identical metrics: deterministic kernels, cudnn.benchmark off,
    # CUBLAS_WORKSPACE_CONFIG=:4096:8. Slower on CUDA; an op without a deterministic kernel warns
    # by name (the 'paper' head's 7x7 adaptive pool, GoogLeNet's auxiliary pools).
    deterministic: bool = False

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "TrialConfig":
        """Build from dotted keys; raise ConfigError listing every unknown key and bad value."""
        problems: list[str] = []
        sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        top: dict[str, Any] = {}
        for key, value in flat.items():
            section, _, name = key.rpartition(".")
            if section:
                if section not in _SECTIONS:
                    problems.append(_unknown(key, _all_keys()))
                    continue
                target, owner = sections[section], _SECTIONS[section]
            else:
                target, owner = top, cls
            if name not in _field_types(owner) or name in _SECTIONS:
                problems.append(_unknown(key, _all_keys()))
                continue
            try:
                target[name] = _coerce(key, value, _field_types(owner)[name])
            except ValueError as exc:
                problems.append(str(exc))
        # Values that parsed are validated even when others did not: every problem at once.
        cfg = cls(**{name: _SECTIONS[name](**vals) for name, vals in sections.items()}, **top)
        problems += cfg.problems()
        if problems:
            raise ConfigError(problems)
        return cfg

    @classmethod
    def from_nested(cls, nested: Mapping[str, Any]) -> "TrialConfig":
        return cls.from_flat(_flatten(nested))

    def to_flat(self) -> dict[str, Any]:
        """Dotted keys to values, in field order: the inverse of from_flat."""
        return _flatten(dataclasses.asdict(self))

    def replace(self, **flat: Any) -> "TrialConfig":
        """A copy with some dotted keys changed (e.g. ``cfg.replace(**{"optim.lr": 0.1})``)."""
        merged = self.to_flat()
        merged.update(flat)
        return type(self).from_flat(merged)

    # ---- validation -----------------------------------------------------------------------------

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        from sweeper.data import DATASETS
        from sweeper.inits import INITS
        from sweeper.models import ARCHITECTURES
        from sweeper.transfer import config_problems as transfer_problems

        p: list[str] = []
        m, d, o, g = self.model, self.data, self.optim, self.diagnostics
        _choice(p, "model.arch", m.arch, ARCHITECTURES)
        _choice(p, "model.init", m.init, INITS)
        _choice(p, "model.head", m.head, ["compact", "paper"])
        _choice(p, "model.stem", m.stem, ["cifar", "imagenet"])
        _choice(p, "model.init_mode", m.init_mode, ["fan_in", "fan_out"])
        if m.init_distribution is not None:
            _choice(p, "model.init_distribution", m.init_distribution, ["normal", "uniform"])
        _positive(p, "model.width", m.width)
        _positive(p, "model.init_std", m.init_std)
        _in_range(p, "model.dropout", m.dropout, 0.0, 1.0, hi_open=True)
        _at_least(p, "model.aux_weight", m.aux_weight, 0.0)
        if m.arch == "vgg":
            if m.depth is None:
                p.append("model.depth is required for model.arch='vgg' (weight layers, e.g. 11, 16, 30)")
            elif m.depth < 8:
                p.append(f"model.depth={m.depth!r} is too shallow: a plain VGG stack needs >= 8 "
                         "weight layers (5 convs, one per stage, + 3 FC)")
            elif m.depth > MAX_VGG_DEPTH:
                # Unbounded, depth=10**6 hung `validate` (its CPU dry run builds the model) and a
                # grid holding 5000 stalled the whole batch. 1000 is 30x the deepest plain net of the
                # papers this study follows (He et al. 2015: 30 layers); depth 1000 builds in ~10 s.
                p.append(f"model.depth={m.depth!r} is too deep: a plain VGG stack here has at most "
                         f"{MAX_VGG_DEPTH} weight layers")
        elif m.depth is not None:
            p.append(f"model.depth={m.depth!r} applies only to model.arch='vgg' "
                     f"(model.arch={m.arch!r} fixes its own depth); remove it")
        p += transfer_problems(m)  # model.pretrained, init_from, init_layers, freeze

        _choice(p, "data.name", d.name, DATASETS)
        if d.resolution is not None:
            _at_least(p, "data.resolution", d.resolution, 8)
        _in_range(p, "data.val_fraction", d.val_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        if d.batch_size < 2:  # a batch of one breaks BatchNorm's statistics: training drops it
            p.append(f"data.batch_size={d.batch_size!r} must be >= 2 (a batch of one is skipped, as it "
                     "breaks BatchNorm's batch statistics: no step would ever be taken)")
        if d.limit is not None:
            _at_least(p, "data.limit", d.limit, 2)
        _at_least(p, "data.crop_padding", d.crop_padding, 0)
        _at_least(p, "data.color_shift", d.color_shift, 0.0)
        _at_least(p, "data.synthetic_size", d.synthetic_size, 20)
        _at_least(p, "data.synthetic_classes", d.synthetic_classes, 2)
        _views_problems(p, d, DATASETS)

        _choice(p, "optim.name", o.name, ["adam", "sgd"])
        _positive(p, "optim.lr", o.lr)
        _in_range(p, "optim.momentum", o.momentum, 0.0, 1.0, hi_open=True)
        _at_least(p, "optim.weight_decay", o.weight_decay, 0.0)
        _choice(p, "optim.schedule", o.schedule, ["constant", "cosine", "plateau", "step"])
        _at_least(p, "optim.plateau_patience", o.plateau_patience, 0)
        _at_least(p, "optim.step_size", o.step_size, 1)
        _in_range(p, "optim.gamma", o.gamma, 0.0, 1.0, lo_open=True)
        _in_range(p, "optim.label_smoothing", o.label_smoothing, 0.0, 1.0, hi_open=True)
        _boolean(p, "optim.decay_norm_bias", o.decay_norm_bias)

        _at_least(p, "diagnostics.probe_size", g.probe_size, 1)
        _choice(p, "diagnostics.epoch_probe", g.epoch_probe, ["fixed", "training_step"])
        _positive(p, "diagnostics.stall_tolerance", g.stall_tolerance)
        _at_least(p, "diagnostics.stall_epochs", g.stall_epochs, 1)
        _boolean(p, "diagnostics.counterfactuals", g.counterfactuals)
        _at_least(p, "diagnostics.counterfactual_min_steps", g.counterfactual_min_steps, 1)
        _at_least(p, "diagnostics.counterfactual_steps", g.counterfactual_steps, g.counterfactual_min_steps)
        _in_range(p, "diagnostics.counterfactual_budget", g.counterfactual_budget, 0.0, 1.0, lo_open=True)

        _at_least(p, "epochs", self.epochs, 1)
        # torch.manual_seed takes a signed 64-bit integer, and the loop seeds its batch generator
        # with seed + 1: the bound leaves room for those offsets.
        _in_range(p, "seed", self.seed, 0, MAX_SEED)
        if not (self.device in ("auto", "cpu", "cuda") or
                (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            p.append(f"device={self.device!r} is not one of ['auto', 'cpu', 'cuda', 'cuda:N']")
        if not (isinstance(self.compile, bool) or self.compile == "reduce-overhead"):
            p.append(f"compile={self.compile!r} is not one of: false, true, 'reduce-overhead' "
                     "(torch.compile's CUDA-graph mode)")
        _boolean(p, "deterministic", self.deterministic)
        return p


# Every metric a trial reports after EVERY epoch (sweeper.train.fit: the train_* and val_* summaries
# of ``evaluate``), with the direction in which it is better. A Sweep's metric must be one of them:
# ASHA compares trials at each rung, Optuna receives each epoch's value. (lr, epoch_seconds and
# images_per_second are reported too but say nothing about the model; test_* only after the last
# epoch.) Note: an epoch whose training loss is non-finite ends the trial before validation, so that
# last report has no val_* metrics.
EPOCH_METRICS: dict[str, str] = {
    "train_loss": "min",
    "train_accuracy": "max",
    "train_top1_error": "min",
    "train_top5_error": "min",
    "val_loss": "min",
    "val_accuracy": "max",
    "val_top1_error": "min",
    "val_top5_error": "min",
}

_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "diagnostics": DiagnosticsConfig,
}


# ---- helpers ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    # Cached: resolving the annotations was a third of the driver's per-trial callback time.
    # Callers only read the dict.
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _all_keys() -> list[str]:
    keys = [f"{s}.{n}" for s, c in _SECTIONS.items() for n in _field_types(c)]
    return keys + [n for n in _field_types(TrialConfig) if n not in _SECTIONS]


# Names people reach for, mapped to the field they mean (matched on the part after the last dot).
_SYNONYMS: dict[str, str] = {
    "learning_rate": "lr", "learningrate": "lr", "eta": "lr", "lr0": "lr",
    "bn": "batch_norm", "batchnorm": "batch_norm", "batch_normalization": "batch_norm",
    "batch_normalisation": "batch_norm", "use_bn": "batch_norm",
    "wd": "weight_decay", "l2": "weight_decay", "decay": "weight_decay",
    "bs": "batch_size", "batchsize": "batch_size", "batch": "batch_size",
    "architecture": "arch", "model": "arch", "network": "arch", "net": "arch",
    "initialization": "init", "initialisation": "init", "initializer": "init", "initialiser": "init",
    "optimizer": "name", "optimiser": "name", "dataset": "name",
    "num_epochs": "epochs", "n_epochs": "epochs", "epoch": "epochs",
    "smoothing": "label_smoothing", "scheduler": "schedule", "lr_schedule": "schedule",
    "width_multiplier": "width", "aux": "aux_heads",
}


def _unknown(key: str, allowed: list[str]) -> str:
    close = _suggestions(key, allowed)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown setting {key!r}{hint} (settings are 'section.name', e.g. 'model.arch', 'optim.lr')"


def _suggestions(key: str, allowed: list[str], n: int = 3) -> list[str]:
    """Close settings: by known synonym or close spelling of the name after the dot (preferring the
    same or a similarly spelt section), else by the whole key's spelling."""
    if not isinstance(key, str):
        return []
    section, _, name = key.strip().rpartition(".")
    norm = name.lower().replace("-", "_")
    by_name: dict[str, list[str]] = {}
    for candidate in allowed:
        by_name.setdefault(candidate.rpartition(".")[2], []).append(candidate)
    names = [_SYNONYMS[norm]] if norm in _SYNONYMS and _SYNONYMS[norm] in by_name else []
    if norm in by_name:
        names.append(norm)  # right name, wrong or misspelt section
    names += difflib.get_close_matches(norm, list(by_name), n=n, cutoff=0.75)

    def section_rank(candidate: str) -> float:
        own = candidate.rpartition(".")[0]
        return -difflib.SequenceMatcher(None, section.lower(), own).ratio()

    out: list[str] = []
    for matched in dict.fromkeys(names):
        for candidate in sorted(by_name[matched], key=section_rank):
            if candidate != key and candidate not in out:
                out.append(candidate)
    if not out:
        out = difflib.get_close_matches(key, allowed, n=n, cutoff=0.6)
    return out[:n]


def _flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in nested.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_value(text: str) -> Any:
    """Best-effort literal for a command-line value: int, float, bool, None, else the string."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false", "yes", "no", "on", "off"):
        return low in ("true", "yes", "on")
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if "/" in text:  # fractions such as width=1/8
        num, _, den = text.partition("/")
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            pass
    return text


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert value to the field's type (accepting command-line strings); ValueError names the key."""
    optional = False
    if typing.get_origin(typ) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        optional = len(args) < len(typing.get_args(typ))
        if args == [bool, str]:  # compile: a boolean, or a word the field's own check judges
            value = parse_value(value) if isinstance(value, str) else value
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1):
                return bool(value)
            return value
        typ = args[0]
    if isinstance(value, str) and typ is not str:
        value = parse_value(value)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key}=None is not allowed: expected {typ.__name__}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{key}={value!r} is not a boolean (true/false)")
    if typ is int:
        # Non-finite first: int() of inf/nan raises without naming the key.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not math.isfinite(value)) or value != int(value):
            raise ValueError(f"{key}={value!r} is not an integer")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}={value!r} is not a number")
        if not math.isfinite(value):
            raise ValueError(f"{key}={value!r} is not a finite number")
        return float(value)
    if typ is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # The command line reads `data.test_scales=64` as the number 64; for a text setting
            # the characters were meant (one test scale, a file named 64...), and the setting's own
            # check says what it takes.
            return str(value)
        if not isinstance(value, str):
            raise ValueError(f"{key}={value!r} is not a string")
        return value
    return value


def _choice(p: list[str], key: str, value: Any, allowed: Any) -> None:
    names = sorted(allowed)
    if value not in names:
        p.append(f"{key}={value!r} is not one of {names}")


def _boolean(p: list[str], key: str, value: Any) -> None:
    if not isinstance(value, bool):  # from_flat coerces; a directly built config may hold anything
        p.append(f"{key}={value!r} is not a boolean (true/false)")


def _positive(p: list[str], key: str, value: float) -> None:
    if not value > 0:
        p.append(f"{key}={value!r} must be > 0")


def _at_least(p: list[str], key: str, value: float, lo: float) -> None:
    if value < lo:
        p.append(f"{key}={value!r} must be >= {lo}")


def _in_range(p: list[str], key: str, value: float, lo: float, hi: float, *,
              lo_open: bool = False, hi_open: bool = False) -> None:
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        p.append(f"{key}={value!r} must be in {lb}{lo}, {hi}{rb}")


def _views_problems(p: list[str], d: DataConfig, datasets: Mapping[str, Any]) -> None:
    """data.crop, data.scale_min/max and data.test_*: sizes that fit inside the stored image."""
    spec = datasets.get(d.name)
    stored = d.resolution or (spec.native_resolution if spec is not None else None)
    where = (f"the stored resolution {stored} (data.resolution, else {d.name}'s native size; "
             "raise data.resolution to decode larger)")
    if d.crop is not None:
        _at_least(p, "data.crop", d.crop, 8)
        if stored is not None and d.crop > stored:
            p.append(f"data.crop={d.crop!r} must be <= {where}")
    if (d.scale_min is None) != (d.scale_max is None):
        p.append(f"data.scale_min={d.scale_min!r} and data.scale_max={d.scale_max!r}: set both "
                 "(the training scale S range) or neither")
    elif d.scale_min is not None:
        if d.crop is None:
            p.append(f"data.scale_min={d.scale_min!r}/data.scale_max={d.scale_max!r} need data.crop "
                     "(the side cut from the image resized to S), e.g. data.crop=224 for S in [256, 512]")
        elif d.scale_min < d.crop:
            p.append(f"data.scale_min={d.scale_min!r} must be >= data.crop={d.crop!r}: a crop is cut "
                     "from the image resized to S")
        if d.scale_min > d.scale_max:
            p.append(f"data.scale_min={d.scale_min!r} must be <= data.scale_max={d.scale_max!r}")
        if stored is not None and d.scale_max > stored:
            p.append(f"data.scale_max={d.scale_max!r} must be <= {where}: images are only shrunk "
                     f"to S, so decode at data.resolution={d.scale_max}")
    _at_least(p, "data.test_grid", d.test_grid, 1)
    _boolean(p, "data.test_flips", d.test_flips)
    if d.test_scales is None:
        return
    try:
        scales = d.test_scale_list
    except ValueError:
        p.append(f"data.test_scales={d.test_scales!r} is not a comma-separated list of integers "
                 "(e.g. '256,384,512')")
        return
    if not scales:
        p.append(f"data.test_scales={d.test_scales!r} lists no scale (e.g. '256,384,512', or '64,' "
                 "for one)")
    if d.crop is None:
        p.append(f"data.test_scales={d.test_scales!r} needs data.crop (the side of each test crop)")
    if len(set(scales)) != len(scales):
        p.append(f"data.test_scales={d.test_scales!r} repeats a scale; each must appear once")
    if scales and d.crop is not None and max(scales) >= d.crop:
        # G positions per side run corner to corner over q - crop + 1 possible offsets: a grid finer
        # than the largest scale allows only repeats views (seen: test_grid=10 on a 28-px scale with
        # 24-px crops reported 200 views, 50 distinct; 100000 tried to allocate 69 TB).
        fits = max(scales) - d.crop + 1
        if d.test_grid > fits:
            p.append(f"data.test_grid={d.test_grid!r} must be <= {fits}: the largest test scale "
                     f"{max(scales)} leaves {fits} distinct crop offsets of data.crop={d.crop!r} per "
                     "side (VGG uses 5)")
    for q in scales:
        if d.crop is not None and q < d.crop:
            p.append(f"data.test_scales={d.test_scales!r}: scale {q} must be >= data.crop={d.crop!r}")
        if stored is not None and q > stored:
            p.append(f"data.test_scales={d.test_scales!r}: scale {q} must be <= {where}")
