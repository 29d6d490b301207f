"""The model zoo: a registry of builders, ``builder(cfg, *, num_classes) -> nn.Module``.

Builders lay out the network only; :func:`build_model` also applies ``cfg.init``. Every builder registers
its modules in forward order, so ``named_modules()`` lists the layers as the network runs them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from sweeper.config import ConfigError, ModelConfig
from sweeper.models.googlenet import GoogLeNetOutput, googlenet
from sweeper.models.resnet import resnet18, resnet34
from sweeper.models.smallcnn import smallcnn
from sweeper.models.vgg import A, A_LRN, B, C, D, E, conv_count, plain_plan, vgg, vgg11, vgg11_lrn, vgg13, \
    vgg16, vgg16c, vgg19

__all__ = ["ARCHITECTURES", "GoogLeNetOutput", "build_model", "is_allocation_failure", "plain_plan",
           "split_outputs", "too_big", "weight_depth"]

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "vgg11": vgg11,
    "vgg11_lrn": vgg11_lrn,
    "vgg13": vgg13,
    "vgg16c": vgg16c,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "vgg": vgg,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "googlenet": googlenet,
    "smallcnn": smallcnn,
}


def _unknown_arch(name: str) -> ValueError:
    return ValueError(f"model.arch={name!r} is not one of {sorted(ARCHITECTURES)}")


def build_model(cfg: ModelConfig, *, num_classes: int) -> nn.Module:
    """Build ``cfg.arch`` for ``num_classes`` classes and initialise it with ``cfg.init``."""
    builder = ARCHITECTURES.get(cfg.arch)
    if builder is None:
        raise _unknown_arch(cfg.arch)
    # Imported here so that the registry stays importable (config validation reads it) on its own.
    from sweeper.inits import init_weights

    try:
        model = builder(cfg, num_classes=num_classes)
        init_weights(model, cfg)
    except (RuntimeError, MemoryError) as exc:
        if not is_allocation_failure(exc):
            raise
        raise too_big(exc, f"model.arch={cfg.arch!r} at model.width={cfg.width:g}",
                      "lower model.width") from None
    return model


def is_allocation_failure(exc: BaseException) -> bool:
    """Torch could not get the memory a tensor needed (CPU allocator or CUDA)."""
    text = str(exc)
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text


def too_big(exc: BaseException, what: str, fix: str) -> ConfigError:
    """A setting whose model or batch cannot be allocated: the user's to change (exit 2, no
    traceback), named with the size torch asked for (``model.width=1000`` once ended in a
    DefaultCPUAllocator traceback at launch)."""
    import re

    asked = re.search(r"allocate (\d+) bytes", str(exc))
    size = f" (it asked for {int(asked.group(1)) / 1e9:.1f} GB)" if asked else ""
    return ConfigError([f"{what} needs more memory than this machine could give{size}: {fix}"])


def split_outputs(output: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, list[Tensor]]:
    """(main logits, auxiliary logits): the list is empty unless the model returned auxiliary outputs."""
    if isinstance(output, Tensor):
        return output, []
    if isinstance(output, (tuple, list)) and output and all(isinstance(t, Tensor) for t in output):
        return output[0], list(output[1:])
    raise TypeError(f"expected a Tensor or a tuple of Tensors (main logits first), got {type(output).__name__}")


def weight_depth(cfg: ModelConfig) -> int:
    """The weight layers (conv + linear) the built model really has on its main path.

    A VGG has its convs plus its head's linear layers: 3 for the paper's 4096-4096-N head, 1 for the
    compact head (global pool + one linear). So ``vgg19`` -- the paper's configuration E, 19 layers as
    the paper counts them -- has 17 with the compact head, and ``model.depth`` of ``arch='vgg'`` (the
    paper's count, convs + 3) is the real count only with ``head='paper'``. ResNets count as named
    (projection shortcuts excluded; their head is one linear) and GoogLeNet as its paper does (22).
    """
    vgg_plans = {"vgg11": A, "vgg11_lrn": A_LRN, "vgg13": B, "vgg16c": C, "vgg16": D, "vgg19": E}
    match cfg.arch:
        case "vgg":
            if cfg.depth is None:
                raise ValueError("model.depth is required for model.arch='vgg' (weight layers, e.g. 11, 16, 30)")
            return conv_count(plain_plan(cfg.depth)) + _vgg_head_layers(cfg)
        case name if name in vgg_plans:
            return conv_count(vgg_plans[name]) + _vgg_head_layers(cfg)
        case "resnet18":
            return 18
        case "resnet34":
            return 34
        case "googlenet":
            return 22
        case "smallcnn":
            return 5  # 4 convs + the linear head
    raise _unknown_arch(cfg.arch)


def _vgg_head_layers(cfg: ModelConfig) -> int:
    """Linear layers of a VGG head (see ``sweeper.models.vgg._head``): paper 3, compact 1."""
    heads = {"paper": 3, "compact": 1}
    if cfg.head not in heads:
        raise ValueError(f"model.head={cfg.head!r} is not one of {sorted(heads)}")
    return heads[cfg.head]
