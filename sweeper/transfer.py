"""Starting a trial from trained weights, and freezing part of it.

Three settings of :class:`~sweeper.config.ModelConfig` (defaults and meanings live there):

``model.pretrained``
    Fine-tuning a pretrained backbone. A torchvision weights name (``ResNet18_Weights.IMAGENET1K_V1``,
    or ``IMAGENET1K_V1`` for the configured arch) read from torch.hub's cache
    (``$TORCH_HOME/hub/checkpoints/<file>``: never downloaded here), or a local file: a plain state
    dict or a sweeper checkpoint (``trial_state.pt``). torchvision's key layout is mapped onto ours.
    By default only the backbone is loaded (the head stays new). A torchvision name also sets the
    input normalisation its weights were trained with (ImageNet mean/std; GoogLeNet's own); a local
    file keeps the dataset's statistics.
``model.init_from``
    Initialising from a trained trial: a checkpoint path or storage URI, or ``sweep:NAME/REF`` (REF =
    ``best``, a trial id or a trial name; ``best`` ranks trials by the sweep's metric at their
    checkpoint epoch, diverged ones and those without a checkpoint excluded, as ``sweeper ensemble``
    does). A source with non-finite weights, or one trained with BatchNorm copied into a net without
    it, is refused. The driver resolves a sweep reference before Ray starts
    (:func:`resolve_sweep`) and puts the checkpoint's location into the trial config, so a trial on
    any node reads it from the storage, and its params record what it was initialised from.
``model.init_layers``
    Which layers are copied: ``backbone`` (every layer outside the head, matched by name; a shape
    mismatch is an error), ``all`` (every tensor whose name and shape match), ``vgg_paper`` (the
    first four convs, each with its BatchNorm where both nets have one, into the convs of the same
    stage and position -- Caffe's conv1_1, conv2_1, conv3_1, conv3_2, so VGG-A -> D/E works -- and
    the head's linear layers in order: Simonyan & Zisserman, sec. 3.1), ``none`` (copy nothing:
    the from-scratch control, same settings otherwise). None: ``backbone`` for ``pretrained``,
    ``all`` for ``init_from``. Layers not copied keep ``model.init``.
``model.freeze``
    ``none``, ``backbone`` (only the head trains), ``all_but_last:N`` (the last N backbone blocks and
    the head train). A block is a conv (+BN) or hidden linear layer of a VGG/SmallCNN, the stem or a
    BasicBlock of a ResNet, a stem conv or an Inception module of GoogLeNet. Frozen parameters get
    ``requires_grad=False`` and the optimizer never sees them (no weight decay, no momentum: they are
    bit-identical after training); frozen BatchNorm and Dropout modules stay in eval mode whatever
    ``.train()`` is called on the model (their class is swapped for an eval-only subclass, so the
    training loop, the probe, evaluation, diagnostics and deep copies all keep it).

``python -m sweeper.transfer standin PATH [key=value ...]`` writes a small stand-in "pretrained"
state dict (by default a ResNet-18 at width 1/8 trained 2 epochs on the synthetic gratings) for
offline studies and tests.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from sweeper.config import ConfigError
from sweeper.spaces import name_problem

if TYPE_CHECKING:
    from sweeper.config import ModelConfig, TrialConfig
    from sweeper.spaces import Sweep

__all__ = [
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenDropout",
    "INIT_LAYERS",
    "Transfer",
    "apply_transfer",
    "config_problems",
    "freeze",
    "input_normalization",
    "load_source",
    "resolve_init_from",
    "resolve_sweep",
    "source_problems",
    "standin",
    "torchvision_file",
    "torchvision_weights",
    "units",
]

log = logging.getLogger(__name__)

INIT_LAYERS = ("all", "backbone", "none", "vgg_paper")
SWEEP_PREFIX = "sweep:"
_FREEZE_RE = re.compile(r"^all_but_last:(\d+)$")
_VGG_PAPER_CONVS = 4  # "the first four convolutional layers and the last three fully-connected layers"
# torchvision's arch names for ours (VGGs by BatchNorm); the others have no torchvision weights.
_TV_ARCHS = {"resnet18": "resnet18", "resnet34": "resnet34", "googlenet": "googlenet",
             "vgg11": "vgg11", "vgg13": "vgg13", "vgg16": "vgg16", "vgg19": "vgg19"}


# ---- settings ---------------------------------------------------------------------------------------


def is_file_ref(value: str) -> bool:
    """A path or URI rather than a torchvision weights name (a bare name that is a file here is a
    file: `model.pretrained=afile` was read as a weights name and refused for the wrong reason)."""
    return ("/" in value or "\\" in value or value.startswith(("~", ".")) or
            value.endswith((".pt", ".pth", ".bin", ".ckpt")) or os.path.isfile(value))


def _tv_arch(m: "ModelConfig") -> str | None:
    name = _TV_ARCHS.get(m.arch)
    if name is not None and name.startswith("vgg") and m.batch_norm:
        name += "_bn"
    return name


def torchvision_weights(m: "ModelConfig"):
    """The torchvision ``WeightsEnum`` member ``m.pretrained`` names; ConfigError says why not."""
    from torchvision.models import get_model_weights, get_weight

    value, tv = m.pretrained, _tv_arch(m)
    if tv is None:
        raise ConfigError([f"model.pretrained={value!r}: torchvision has no weights for "
                           f"model.arch={m.arch!r} (it has them for {sorted(_TV_ARCHS)}); "
                           "give a state-dict file instead"])
    enum = get_model_weights(tv)
    options = ", ".join(f"{enum.__name__}.{w.name}" for w in enum)
    if "." in value:
        try:
            weights = get_weight(value)
        except (ValueError, KeyError, AttributeError, ImportError):
            raise ConfigError([f"model.pretrained={value!r} is not a torchvision weights name nor a "
                               f"file path (for model.arch={m.arch!r}: {options})"]) from None
        if not isinstance(weights, enum):
            raise ConfigError([f"model.pretrained={value!r} is for another architecture: "
                               f"model.arch={m.arch!r} (batch_norm={m.batch_norm}) takes {options}"])
        return weights
    try:
        return enum[value]
    except KeyError:
        raise ConfigError([f"model.pretrained={value!r} is not a torchvision weights name nor a file "
                           f"path (for model.arch={m.arch!r}: {options})"]) from None


def config_problems(m: "ModelConfig") -> list[str]:
    """The transfer settings' own problems (called by ``TrialConfig.problems``); no file is read."""
    p: list[str] = []
    if not (m.freeze in ("none", "backbone") or
            ((g := _FREEZE_RE.match(str(m.freeze))) and int(g.group(1)) >= 1)):
        p.append(f"model.freeze={m.freeze!r} is not one of 'none', 'backbone', 'all_but_last:N' "
                 "(N >= 1: the last N backbone blocks and the head train)")
    if m.init_layers is not None and m.init_layers not in INIT_LAYERS:
        p.append(f"model.init_layers={m.init_layers!r} is not one of {sorted(INIT_LAYERS)} "
                 "(or None: 'backbone' for model.pretrained, 'all' for model.init_from)")
    if m.pretrained is not None and m.init_from is not None:
        p.append(f"model.pretrained={m.pretrained!r} and model.init_from={m.init_from!r} are both "
                 "set: a model starts from one source; keep one")
    for key, value in (("model.pretrained", m.pretrained), ("model.init_from", m.init_from)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            p.append(f"{key}={value!r} must be a non-empty string or None")
    if p:
        return p
    if m.init_from is not None and m.init_from.startswith(SWEEP_PREFIX):
        name, _, ref = m.init_from[len(SWEEP_PREFIX):].partition("/")
        if name_problem(name) is not None or (ref == "" and "/" in m.init_from):
            p.append(f"model.init_from={m.init_from!r} is not a sweep reference 'sweep:NAME/REF' "
                     "(REF: 'best', a trial id or a trial name), nor a checkpoint path")
    source = m.pretrained if m.pretrained is not None else m.init_from
    if source is not None and m.init_layers == "vgg_paper" and not m.arch.startswith("vgg"):
        p.append(f"model.init_layers='vgg_paper' copies a VGG's first four convs and its head's "
                 f"linear layers; model.arch={m.arch!r} is no VGG (use 'all' or 'backbone')")
    if m.pretrained is not None and not is_file_ref(m.pretrained):
        try:
            torchvision_weights(m)
        except ConfigError as exc:
            p.extend(exc.problems)
            return p
        if m.arch.startswith("resnet") and m.stem != "imagenet":
            p.append(f"model.pretrained={m.pretrained!r} was trained with the ImageNet stem: set "
                     f"model.stem='imagenet' (model.stem={m.stem!r})")
        if m.arch in ("resnet18", "resnet34", "googlenet") and not m.batch_norm:
            p.append(f"model.pretrained={m.pretrained!r} has BatchNorm layers: set "
                     "model.batch_norm=true")
    return p


def input_normalization(cfg: "TrialConfig") -> tuple[list[float], list[float]] | None:
    """(mean, std) the weights expect, or None for the dataset's own statistics.

    ``model.init_from`` another trial inherits that trial's: a source fine-tuned from torchvision
    weights was fed ImageNet-normalised images (see ``_inherited_normalization``).

    A torchvision name gives its weights' (ImageNet's; GoogLeNet's weights expect (x - 0.5) / 0.5,
    what torchvision's ``transform_input`` does). The size they were trained at is not imposed: a
    ``data.resolution`` other than the weights' crop size only warns (features transfer across
    sizes, less well), because changing the resolution silently would change the experiment.
    """
    m = cfg.model
    if m.pretrained is None and m.init_from is not None and m.init_layers != "none":
        return _inherited_normalization(m.init_from)
    if m.pretrained is None or is_file_ref(m.pretrained):
        return None
    weights = torchvision_weights(m)
    transforms = weights.transforms()
    size = getattr(transforms, "crop_size", [None])[0]
    fed = getattr(cfg.data, "crop", None) or cfg.data.resolution  # data.crop: the network's input side
    if size is not None and fed != size:
        what = f"{fed}x{fed} inputs" if fed else "the dataset's native size (data.resolution=None)"
        warnings.warn(f"model.pretrained={m.pretrained!r} was trained on {size}x{size} inputs; this "
                      f"trial feeds {what} (data.resolution={size} matches them)", stacklevel=2)
    if m.arch == "googlenet":
        return [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    return list(transforms.mean), list(transforms.std)


def _inherited_normalization(init_from: str, depth: int = 0) -> tuple[list[float], list[float]] | None:
    """A trial started from another trial's weights sees its inputs as that trial did: a source
    fine-tuned from torchvision weights was fed ImageNet-normalised images, and its features expect
    them (the source's config is in its checkpoint). None: the dataset's statistics, as before."""
    from sweeper.config import TrialConfig

    if depth > 8:  # a chain of init_from sources this long is a loop
        return None
    try:
        location, _ = resolve_init_from(init_from)
        _, source = load_source(location)
        src = TrialConfig.from_flat(source) if source else None
    except (ConfigError, ValueError):
        return None  # apply_transfer reports an unreadable source, with its own message
    if src is None:
        return None
    m = src.model
    if m.pretrained is not None and not is_file_ref(m.pretrained) and m.init_layers != "none":
        with warnings.catch_warnings():  # the source's resolution is not this trial's to warn about
            warnings.simplefilter("ignore")
            try:
                return input_normalization(src)
            except ConfigError:
                return None
    if m.pretrained is None and m.init_from is not None and m.init_layers != "none":
        return _inherited_normalization(m.init_from, depth + 1)
    return None


# ---- sources ------------------------------------------------------------------------------------------


def torchvision_file(weights) -> Path:
    """Where torch.hub keeps ``weights``' file: ``$TORCH_HOME/hub/checkpoints/<name in its URL>``."""
    from urllib.parse import urlsplit

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlsplit(weights.url).path)


_CACHE: dict[tuple, tuple[dict[str, torch.Tensor], dict | None]] = {}


def load_source(location: str, *, key: str = "model.init_from") -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, the source trial's flat config or None) from a plain state-dict file, a sweeper
    checkpoint (file or directory, local or a storage URI). ConfigError names ``key`` and what is wrong.
    The last few sources are cached per process (a reused worker, the counterfactual runs)."""
    from sweeper.checkpoints import load_trial_state

    local = "://" not in location
    path = str(Path(location).expanduser()) if local else location
    stamp: tuple = (path,)
    if local and os.path.exists(path):
        st = os.stat(path)
        stamp = (path, st.st_mtime_ns, st.st_size)
    if stamp in _CACHE:
        return _CACHE[stamp]
    try:
        obj = load_trial_state(path)
    except FileNotFoundError:
        if local and os.path.isdir(path):
            raise ConfigError([f"{key}={location!r} is a directory without trial_state.pt (give a "
                               "state-dict file, or a checkpoint directory holding trial_state.pt)"]) from None
        raise ConfigError([f"{key}={location!r}: no such file or checkpoint (a state-dict file, a "
                           "checkpoint directory holding trial_state.pt, or a storage URI)"]) from None
    except Exception as exc:  # noqa: BLE001 -- unreadable, not a torch file, unreachable storage
        if local and os.path.isfile(path) and os.path.getsize(path) == 0:
            why = "the file is empty"
        elif isinstance(exc, (EOFError, KeyError, IndexError, UnicodeDecodeError)) or \
                "magic number" in str(exc) or "zip archive" in str(exc):
            why = f"not a file torch.save wrote ({type(exc).__name__}: {exc})"
        else:
            why = f"{type(exc).__name__}: {exc}"
        raise ConfigError([f"{key}={location!r} cannot be read as a state dict: {why}"]) from None
    config = None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):  # a sweeper checkpoint
        config = obj.get("config") if isinstance(obj.get("config"), Mapping) else None
        obj = obj["model"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or \
            not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError([f"{key}={location!r} holds no state dict (expected a dict of tensors, "
                           "or a sweeper checkpoint with a 'model' entry)"])
    if len(_CACHE) >= 4:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[stamp] = (dict(obj), dict(config) if config else None)
    return _CACHE[stamp]


def _pretrained_source(m: "ModelConfig") -> tuple[dict[str, torch.Tensor], str, bool]:
    """(state dict, where it came from, whether every backbone key must be present)."""
    if is_file_ref(m.pretrained):
        sd, _ = load_source(m.pretrained, key="model.pretrained")
        return sd, m.pretrained, False
    weights = torchvision_weights(m)
    path = torchvision_file(weights)
    if not path.is_file():
        raise ConfigError([
            f"model.pretrained={m.pretrained!r}: {path} is not in torch's cache, and sweeper never "
            "downloads weights. On a machine with network run once: python -c \"import torchvision; "
            f"torchvision.models.get_weight('{type(weights).__name__}.{weights.name}')"
            ".get_state_dict(check_hash=True)\" (or download "
            f"{weights.url} to that path; TORCH_HOME moves it), or pass a state-dict file: "
            "model.pretrained=/path/to/weights.pth"])
    sd, _ = load_source(str(path), key="model.pretrained")
    return sd, str(path), True


def _torchvision_layout(sd: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """torchvision's key names mapped onto our builders' (ResNet stem/shortcuts, VGG classifier)."""
    from sweeper.models.resnet import ResNet
    from sweeper.models.vgg import VGG

    out = dict(sd)
    if isinstance(model, ResNet) and "conv1.weight" in sd:
        renames = [(r"^conv1\.", "stem.conv."), (r"^bn1\.", "stem.bn."),
                   (r"\.downsample\.0\.", ".shortcut.conv."), (r"\.downsample\.1\.", ".shortcut.bn.")]
        out = {}
        for k, v in sd.items():
            for pattern, repl in renames:
                k = re.sub(pattern, repl, k)
            out[k] = v
    elif isinstance(model, VGG) and any(k.startswith("classifier.") for k in sd):
        # torchvision: classifier = Linear, ReLU, Dropout x2, Linear; ours: head = pool, flatten, the same.
        out = {re.sub(r"^classifier\.(\d+)\.", lambda g: f"head.{int(g.group(1)) + 2}.", k): v
               for k, v in sd.items()}
    return out


# ---- where the head and the blocks are ---------------------------------------------------------------


def units(model: nn.Module) -> tuple[list[list[str]], list[str]]:
    """(backbone blocks in forward order, each a list of module names; the head's module names)."""
    from sweeper.models.googlenet import GoogLeNet
    from sweeper.models.resnet import ResNet

    blocks: list[list[str]] = []
    if isinstance(model, ResNet):
        blocks.append(["stem"])
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            blocks += [[f"{stage}.{i}"] for i in range(len(getattr(model, stage)))]
        return blocks, ["fc"]
    if isinstance(model, GoogLeNet):
        head = ["dropout", "fc"] + [n for n in ("aux1", "aux2") if getattr(model, n, None) is not None]
        blocks = [[name] for name, child in model.named_children()
                  if name not in head and any(True for _ in child.parameters())]
        return blocks, head
    features, top = getattr(model, "features", None), getattr(model, "head", None)
    if isinstance(features, nn.Sequential) and isinstance(top, nn.Sequential):  # VGG, SmallCNN
        for i, module in enumerate(features):
            if isinstance(module, nn.Conv2d) or not blocks:
                blocks.append([f"features.{i}"])
            else:
                blocks[-1].append(f"features.{i}")
        linears = [i for i, module in enumerate(top) if isinstance(module, nn.Linear)]
        head: list[str] = []
        for i, module in enumerate(top):
            if linears and i >= linears[-1]:
                head.append(f"head.{i}")
            elif isinstance(module, nn.Linear):
                blocks.append([f"head.{i}"])
            else:
                blocks[-1].append(f"head.{i}")
        return blocks, head
    raise ConfigError([f"model.freeze / model.pretrained: no block layout known for "
                       f"{type(model).__name__}"])


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ---- freezing ------------------------------------------------------------------------------------------


class _EvalOnly:
    """Mixin: ``.train(mode)`` leaves the module in eval mode (a frozen BatchNorm keeps its running
    statistics and normalises with them; a frozen Dropout passes its input through)."""

    def train(self, mode: bool = True):  # noqa: ARG002 -- always eval
        return super().train(False)


class FrozenBatchNorm1d(_EvalOnly, nn.BatchNorm1d):
    pass


class FrozenBatchNorm2d(_EvalOnly, nn.BatchNorm2d):
    pass


class FrozenDropout(_EvalOnly, nn.Dropout):
    pass


_EVAL_ONLY = {nn.BatchNorm1d: FrozenBatchNorm1d, nn.BatchNorm2d: FrozenBatchNorm2d,
              nn.Dropout: FrozenDropout}


def freeze(model: nn.Module, spec: str, *, arch: str = "") -> int:
    """Freeze the backbone blocks ``spec`` names (see the module docstring); the parameter tensors frozen."""
    if spec == "none":
        return 0
    blocks, _ = units(model)
    keep = 0
    if spec != "backbone":
        match = _FREEZE_RE.match(spec)
        if match is None:
            raise ConfigError([f"model.freeze={spec!r} is not one of 'none', 'backbone', "
                               "'all_but_last:N'"])
        keep = int(match.group(1))
        if keep >= len(blocks):
            raise ConfigError([f"model.freeze={spec!r} keeps {keep} blocks training, but "
                               f"model.arch={arch or type(model).__name__!r} has only {len(blocks)} "
                               f"backbone blocks: use all_but_last:{len(blocks) - 1} at most, or "
                               "'none'"])
    prefixes = [name for block in blocks[:len(blocks) - keep] for name in block]
    frozen = 0
    for name, module in model.named_modules():
        if not _under(name, prefixes):
            continue
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)
            frozen += 1
        if type(module) in _EVAL_ONLY:
            module.__class__ = _EVAL_ONLY[type(module)]
            module.train(False)
    return frozen


# ---- copying --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """What :func:`apply_transfer` did to a model."""

    source: str | None  # where the weights came from (a file, a checkpoint location), None: nowhere
    layers: str | None  # the layer map used
    copied: tuple[str, ...] = ()  # target state-dict keys overwritten from the source
    skipped: int = 0  # source tensors not used (another head, another name or shape)
    frozen: int = 0  # parameter tensors frozen

    def metrics(self) -> dict[str, float]:
        """What a trial reports at step 0 (``init/transfer_tensors``, ``init/frozen_tensors``)."""
        return {"transfer_tensors": float(len(self.copied)), "frozen_tensors": float(self.frozen)}

    def describe(self) -> str:
        if self.source is None:
            return f"froze {self.frozen} parameter tensors" if self.frozen else "nothing transferred"
        text = (f"copied {len(self.copied)} tensors from {self.source} (init_layers={self.layers}; "
                f"{self.skipped} source tensors unused)")
        return text + (f"; froze {self.frozen} parameter tensors" if self.frozen else "")


def _copy_by_name(model: nn.Module, source: Mapping[str, torch.Tensor], *, layers: str, key: str,
                  value: str, strict: bool) -> tuple[list[str], int]:
    target = model.state_dict()
    _, head = units(model)
    names = [k for k in target if layers == "all" or not _under(k.rpartition(".")[0], head)]
    copied, mismatched, missing = [], [], []
    for k in names:
        if k not in source:
            missing.append(k)
        elif source[k].shape != target[k].shape:
            mismatched.append(f"{k}: source {tuple(source[k].shape)}, model {tuple(target[k].shape)}")
        else:
            copied.append(k)
    if mismatched and layers == "backbone":
        hint = " (torchvision's weights are for model.width=1)" if strict else ""
        raise ConfigError([f"{key}={value!r}: {len(mismatched)} backbone tensor(s) differ in shape "
                           f"from the model{hint}: " + "; ".join(mismatched[:3])
                           + (" ..." if len(mismatched) > 3 else "")])
    if strict and missing:
        raise ConfigError([f"{key}={value!r}: {len(missing)} backbone tensor(s) of the model are not "
                           f"in the weights: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")])
    if not copied:
        some = ", ".join(list(source)[:4])
        raise ConfigError([f"{key}={value!r}: no tensor matches the model by name and shape (the file "
                           f"has e.g. {some}; the model {', '.join(names[:4])}): another architecture?"])
    with torch.no_grad():
        for k in copied:
            target[k].copy_(source[k])
    return copied, len(source) - len(copied)


def _groups(sd: Mapping[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """State-dict entries grouped by module, in registration (= forward) order."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        prefix, _, leaf = k.rpartition(".")
        out.setdefault(prefix, {})[leaf] = v
    return list(out.items())


def _kind(group: dict[str, torch.Tensor]) -> str:
    if "running_mean" in group:
        return "norm"
    w = group.get("weight")
    if w is not None and w.dim() == 4:
        return "conv"
    if w is not None and w.dim() == 2:
        return "linear"
    return "other"


def _conv_positions(groups: list[tuple[str, dict[str, torch.Tensor]]]) -> dict[tuple[int, int], int]:
    """(stage, index within the stage) -> group index of each conv of a VGG's ``features.N`` layout.

    Caffe's names (conv3_2 = stage 3, second conv), which is how the paper's "first four conv layers"
    of A land in D and E: A's conv1_1, conv2_1, conv3_1, conv3_2 are D's layers of the same names,
    not D's first four by order (D's second conv is 64->64, A's is 64->128). A stage ends where a
    max-pool sits between two convs, seen as a gap in the module indices: a conv is followed by its
    ReLU (and its BN before that), so the next conv of the same stage comes 2 (3 with BN) indices on.
    """
    convs = [(i, int(p.rsplit(".", 1)[1])) for i, (p, g) in enumerate(groups)
             if _kind(g) == "conv" and p.startswith("features.") and p.rsplit(".", 1)[1].isdigit()]
    out: dict[tuple[int, int], int] = {}
    stage, within = 0, 0
    for n, (i, index) in enumerate(convs):
        if n:
            before, before_index = convs[n - 1]
            has_bn = before + 1 < len(groups) and _kind(groups[before + 1][1]) == "norm"
            if index - before_index > (3 if has_bn else 2):  # a pool in between: the next stage
                stage, within = stage + 1, 0
            else:
                within += 1
        out[(stage, within)] = i
    return out


def _copy_vgg_paper(model: nn.Module, source: Mapping[str, torch.Tensor], *, key: str,
                    value: str) -> tuple[list[str], int]:
    """The VGG paper's map (sec. 3.1): the source's first four convs into the model's convs of the
    same stage and position (:func:`_conv_positions`), each with its BN where both nets have one, and
    the source's head linear layers into the model's, in order; shapes must agree."""
    src, tgt = _groups(source), _groups(model.state_dict())
    src_pos, tgt_pos = _conv_positions(src), _conv_positions(tgt)
    first = sorted(src_pos.items(), key=lambda item: item[1])[:_VGG_PAPER_CONVS]
    if len(first) < _VGG_PAPER_CONVS:
        raise ConfigError([f"{key}={value!r}: init_layers='vgg_paper' copies the first "
                           f"{_VGG_PAPER_CONVS} convs of a VGG's features; the source has {len(src_pos)}"])
    pairs = []
    for (stage, within), s in first:
        t = tgt_pos.get((stage, within))
        if t is None:
            raise ConfigError([f"{key}={value!r}: init_layers='vgg_paper': the source's {src[s][0]} is "
                               f"conv{stage + 1}_{within + 1}, which the model does not have"])
        pairs.append((s, t))
        if s + 1 < len(src) and t + 1 < len(tgt) and _kind(src[s + 1][1]) == _kind(tgt[t + 1][1]) == "norm":
            pairs.append((s + 1, t + 1))
    src_fc = [i for i, (p, g) in enumerate(src) if _kind(g) == "linear" and not p.startswith("aux")]
    tgt_fc = [i for i, (p, g) in enumerate(tgt) if _kind(g) == "linear"]
    if len(src_fc) != len(tgt_fc):
        raise ConfigError([f"{key}={value!r}: init_layers='vgg_paper' copies the head's linear layers "
                           f"in order, but the source has {len(src_fc)} and the model {len(tgt_fc)} "
                           "(model.head must be the source's: 'paper' has 3, 'compact' 1)"])
    pairs += list(zip(src_fc, tgt_fc))
    plan, problems = [], []
    for s, t in pairs:
        (sp, sg), (tp, tg) = src[s], tgt[t]
        for leaf, tensor in tg.items():
            if leaf not in sg:
                problems.append(f"{tp}.{leaf} has no counterpart {sp}.{leaf} in the source")
            elif sg[leaf].shape != tensor.shape:
                problems.append(f"{sp}.{leaf} {tuple(sg[leaf].shape)} -> {tp}.{leaf} "
                                f"{tuple(tensor.shape)}")
            else:
                plan.append((f"{tp}.{leaf}", sg[leaf]))
    if problems:
        raise ConfigError([f"{key}={value!r}: init_layers='vgg_paper' maps layers by order and their "
                           "shapes must agree (same model.width, model.head and classes as the "
                           "source): " + "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else "")])
    target = model.state_dict()
    with torch.no_grad():
        for name, tensor in plan:
            target[name].copy_(tensor)
    return [name for name, _ in plan], len(source) - len(plan)


def _check_source(sd: Mapping[str, torch.Tensor], model: nn.Module, *, key: str, value: str) -> None:
    """Refuse a source whose weights cannot mean what they would be copied as: non-finite tensors
    (a diverged trial's checkpoint), or BatchNorm-trained convs copied into a net without BatchNorm
    (their outputs were scaled by the BN after them; without it they explode or vanish)."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError([f"{key}={value!r} holds non-finite weights ({len(bad)} tensor(s), e.g. "
                           f"{', '.join(bad[:3])}): a diverged trial's checkpoint? Copy a trial that "
                           "trained (sweep:NAME/best never picks a diverged one)"])
    src_bn = [k for k in sd if k.endswith(".running_mean")]
    if src_bn and not any(k.endswith(".running_mean") for k in model.state_dict()):
        raise ConfigError([f"{key}={value!r} was trained with BatchNorm layers (e.g. "
                           f"{src_bn[0].rpartition('.')[0]}) and this model has none: its convs "
                           "expect the BN after them; set model.batch_norm=true"])


def apply_transfer(model: nn.Module, m: "ModelConfig", *, storage: str | None = None) -> Transfer:
    """Load ``model.pretrained`` / ``model.init_from`` into a freshly built model as ``model.init_layers``
    says, then apply ``model.freeze``; in place, on the CPU, before the optimizer is built.

    Draws no random numbers: with ``init_layers='none'`` the model is exactly the from-scratch one.
    """
    source, copied, skipped, layers = None, [], 0, m.init_layers
    if m.pretrained is not None:
        layers = layers or "backbone"
        sd, source, strict = _pretrained_source(m)
        value, key = m.pretrained, "model.pretrained"
    elif m.init_from is not None:
        layers = layers or "all"
        location, _ = resolve_init_from(m.init_from, storage=storage)
        sd, _ = load_source(location)
        source, value, key, strict = location, m.init_from, "model.init_from", False
    if source is not None and layers != "none":
        sd = _torchvision_layout(sd, model)
        _check_source(sd, model, key=key, value=value)
        if layers == "vgg_paper":
            copied, skipped = _copy_vgg_paper(model, sd, key=key, value=value)
        else:
            copied, skipped = _copy_by_name(model, sd, layers=layers, key=key, value=value,
                                            strict=strict and layers == "backbone")
    frozen = freeze(model, m.freeze, arch=m.arch)
    done = Transfer(source=source, layers=layers, copied=tuple(copied), skipped=skipped, frozen=frozen)
    if source is not None or frozen:
        log.info("model: %s", done.describe())
    return done


# ---- sweep references, resolved by the driver before Ray starts --------------------------------------


def _sweep_roots(name: str, storage: str | None) -> list[str]:
    from sweeper.store import DEFAULT_STORAGE, index_lookup, storage_root

    roots = [storage_root(storage)] if storage else []
    roots.append(storage_root(DEFAULT_STORAGE))
    remembered = index_lookup(name)
    if remembered:
        roots.append(remembered)
    return list(dict.fromkeys(roots))


def resolve_init_from(value: str, *, storage: str | None = None) -> tuple[str, str]:
    """(checkpoint location, what it is) for ``model.init_from``. A ``sweep:NAME/REF`` is looked up in
    ``storage`` (the launching sweep's), then ``./sweeps``, then where this machine last launched NAME;
    anything else is a location already. ConfigError names the value and what exists."""
    if not value.startswith(SWEEP_PREFIX):
        return value, value
    from sweeper.checkpoints import trial_checkpoint_location
    from sweeper.records import finite
    from sweeper.store import open_record, redacted_root

    name, _, ref = value[len(SWEEP_PREFIX):].partition("/")
    ref = ref or "best"
    roots = _sweep_roots(name, storage)
    for root in roots:
        try:
            record, _ = open_record(name, root)
        except OSError:
            continue
        if record.exists():
            break
    else:
        known = sorted({p.parent.parent.name for root in roots if "://" not in root
                        for p in Path(root).glob("*/sweeper/sweep.json")})
        raise ConfigError([f"model.init_from={value!r}: no sweep named {name!r} under "
                           f"{', '.join(redacted_root(r) for r in roots)} (sweeps there: "
                           f"{', '.join(known) or 'none'}); launch the source sweep first, or give "
                           "a checkpoint path"])
    metric = record.meta().get("metric")
    try:
        if ref == "best":
            trial, best, at = _best_trial(record, name)
        else:
            trial = record.find_trial(ref)
            best, at = finite((trial.get("best") or {}).get(metric)), ""
        location = trial_checkpoint_location(root, name, trial)
    except LookupError as exc:
        raise ConfigError([f"model.init_from={value!r}: {exc}"]) from None
    score = f", best {metric} {best:.4g}{at}" if best is not None else ""
    return location, f"trial {trial.get('name')} ({trial['trial_id']}{score}) of sweep {name!r}"


def _best_trial(record, name: str) -> tuple[dict, float, str]:
    """``sweep:NAME/best``: the first of ``SweepRecord.by_checkpoint`` (the trial whose checkpoint --
    the weights copied -- scores best, diverged trials left out), as ``sweeper ensemble`` ranks."""
    if not record.trials():
        raise LookupError(f"sweep {name!r} has no trials yet")
    scored, skipped = record.by_checkpoint()
    if not scored:
        why = "; ".join(f"{reason}: {', '.join(names[:5])}" for reason, names in skipped.items())
        raise LookupError(f"sweep {name!r} has no trial to copy as 'best' ({why}); name a trial "
                          "instead, or launch the source sweep further")
    value, trial = scored[0]
    return trial, value, f" at its checkpoint epoch {int(trial['checkpoint_epoch'])}"


def resolve_sweep(sweep: "Sweep") -> tuple["Sweep", list[str]]:
    """The sweep with every ``sweep:NAME/REF`` of ``model.init_from`` (a fixed value or grid values)
    replaced by its checkpoint's location, and one line per reference saying what it became."""
    from sweeper.domains import _is_domain, _is_grid

    value = sweep.space.get("model.init_from")
    notes: list[str] = []

    def one(v: Any) -> Any:
        if isinstance(v, str) and v.startswith(SWEEP_PREFIX):
            location, what = resolve_init_from(v, storage=sweep.storage)
            notes.append(f"model.init_from={v!r}: {what}, checkpoint {location}")
            return location
        return v

    if _is_grid(value):
        new: Any = {"grid_search": [one(v) for v in value["grid_search"]]}
    elif _is_domain(value):
        cats = getattr(value, "categories", [])
        if any(isinstance(c, str) and c.startswith(SWEEP_PREFIX) for c in cats):
            raise ConfigError(["space['model.init_from']: a sweep reference must be a fixed value or "
                               "a tune.grid_search value (it is resolved once, before Ray starts)"])
        return sweep, notes
    else:
        new = one(value)
    if not notes:
        return sweep, notes
    return sweep.replace(space={**sweep.space, "model.init_from": new}), notes


def _cell_configs(sweep: "Sweep"):
    """The trial config of each grid cell (one sample of the other domains); a cell whose config is
    invalid is skipped: the space's own validation reports it."""
    from sweeper.config import TrialConfig
    from sweeper.spaces import base_config, grid_cells, sample_config

    sampled = sample_config(sweep)
    for cell in grid_cells(sweep):
        try:
            yield TrialConfig.from_flat({**sampled, **base_config(sweep, cell)})
        except ConfigError:
            continue


def source_problems(sweep: "Sweep") -> list[str]:
    """Before Ray starts: every pretrained/init_from source of the grid is readable here and fits
    its model (built on the CPU, loaded and frozen as a trial would). One problem per failure."""
    from sweeper.models import build_model
    from sweeper.spaces import _num_classes

    problems: list[str] = []
    seen = set()
    for cfg in _cell_configs(sweep):
        m = cfg.model
        if m.pretrained is None and m.init_from is None and m.freeze == "none":
            continue
        key = (m, _num_classes(cfg))
        if key in seen:
            continue
        seen.add(key)
        try:
            with torch.random.fork_rng(devices=[]):
                apply_transfer(build_model(m, num_classes=key[1]), m, storage=sweep.storage)
        except ConfigError as exc:
            problems.extend(p for p in exc.problems if p not in problems)
    return problems


def source_files(sweep: "Sweep") -> list[tuple[str, str]]:
    """(setting, what a trial will read) for every source of the grid: a file path or storage URI,
    or the torch.hub cache file of a torchvision weights name. For the per-node check of a cluster:
    a path on the driver's disk is no use to a trial on another machine."""
    out: list[tuple[str, str]] = []
    for m in (cfg.model for cfg in _cell_configs(sweep)):
        if m.init_from is not None and m.init_layers != "none":
            out.append(("model.init_from", m.init_from))
        if m.pretrained is not None and m.init_layers != "none":
            try:
                where = m.pretrained if is_file_ref(m.pretrained) else \
                    str(torchvision_file(torchvision_weights(m)))
            except ConfigError:
                continue  # reported before the cluster was asked
            out.append(("model.pretrained", where))
    return list(dict.fromkeys(out))


def unreadable_sources(sources: list[tuple[str, str]]) -> list[str]:
    """Run where trials run: the sources this machine cannot read, one sentence each."""
    import pyarrow.fs as pafs

    problems = []
    for key, where in sources:
        try:
            if "://" in where:
                from sweeper.store import filesystem

                fs, path = filesystem(where)
                found = fs.get_file_info(path).type != pafs.FileType.NotFound
            else:
                found = Path(where).expanduser().exists()
        except Exception as exc:  # noqa: BLE001 -- unreachable storage, no credentials
            problems.append(f"{key}: {where!r} cannot be read here: {type(exc).__name__}: {exc}")
            continue
        if not found:
            problems.append(f"{key}: {where!r} is not on this machine (a file on the launching "
                            "machine's disk is not on the others: put it on shared storage, e.g. "
                            "s3://..., or the same path on every node)")
    return problems


# ---- a stand-in "pretrained" file ----------------------------------------------------------------------

STANDIN_DEFAULTS = {"model.arch": "resnet18", "model.width": 0.125, "model.batch_norm": True,
                    "data.name": "synthetic", "epochs": 2, "diagnostics.enabled": False,
                    "seed": 0}


def standin(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Path:
    """Write a small trained state dict to ``path``: a stand-in for real pretrained weights offline.

    By default a ResNet-18 at width 1/8 (CIFAR stem) trained 2 epochs on the synthetic gratings
    (``STANDIN_DEFAULTS``; ``epochs=0`` saves the random init). The file is a plain state dict, as
    ``torch.save(model.state_dict())`` writes one. Returns the path.
    """
    import tempfile

    from sweeper.config import TrialConfig
    from sweeper.models import build_model
    from sweeper.train import CHECKPOINT_FILE, fit

    flat = {**STANDIN_DEFAULTS, **(overrides or {})}
    epochs = flat.pop("epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ConfigError([f"epochs={epochs!r} must be an integer >= 0 (0: the random init)"])
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError([f"{str(path)!r} is a directory: give the file to write, e.g. "
                           f"{str(path / 'standin.pt')!r}"])
    above = next(a for a in path.parents if a.exists())
    if not above.is_dir():
        raise ConfigError([f"{str(path)!r}: {str(above)!r} is a file, not a folder"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError([f"{str(path)!r}: cannot create its folder ({exc.strerror or exc})"]) from None
    if not os.access(path.parent, os.W_OK):
        raise ConfigError([f"{str(path)!r}: its folder {str(path.parent)!r} is not writable"])
    if epochs <= 0:
        cfg = TrialConfig.from_flat(flat)
        from sweeper.data import num_classes

        torch.manual_seed(cfg.seed)
        state = build_model(cfg.model, num_classes=num_classes(cfg.data) or 10).state_dict()
    else:
        cfg = TrialConfig.from_flat({**flat, "epochs": epochs})
        with tempfile.TemporaryDirectory(prefix="sweeper-standin-") as d:
            saved = Path(d)

            def report(metrics, save):
                if metrics["epoch"] == cfg.epochs or metrics.get("outcome") not in (None, "running"):
                    save(saved)
                    print(f"standin: epoch {metrics['epoch']}: train loss {metrics['train_loss']:.3f}, "
                          f"val accuracy {metrics.get('val_accuracy', float('nan')):.3f}", file=sys.stderr)

            fit(cfg, report=report)
            state = torch.load(saved / CHECKPOINT_FILE, map_location="cpu", weights_only=True)["model"]
    try:
        torch.save(state, path)
    except (OSError, RuntimeError) as exc:  # torch's writer raises RuntimeError for an unopenable file
        raise ConfigError([f"{str(path)!r} cannot be written: {str(exc).splitlines()[0][-200:]}"]) from None
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    from sweeper.config import parse_value

    parser = argparse.ArgumentParser(prog="python -m sweeper.transfer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("standin", help="write a small trained stand-in state dict (offline)")
    cmd.add_argument("path")
    cmd.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                     help=f"trial settings (defaults {STANDIN_DEFAULTS}); epochs=0: random weights")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.settings:
        k, sep, v = item.partition("=")
        if not sep:
            parser.error(f"{item!r} is not key=value")
        overrides[k] = parse_value(v)
    try:
        out = standin(args.path, overrides)
    except ConfigError as exc:
        for p in exc.problems:
            print(f"error: {p}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
