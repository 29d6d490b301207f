"""The model zoo: torchvision-exact layouts, every architecture x BN x init trains a step, plans and depths."""

import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from sweeper.config import ModelConfig
from sweeper.models import ARCHITECTURES, GoogLeNetOutput, build_model, plain_plan, split_outputs, weight_depth
from sweeper.models.vgg import A, B, D, E

INITS = ["normal", "he", "xavier", "default"]
# (arch, depth): the plain stack at its shallowest and well beyond the paper's deepest.
ARCH_CASES = [(a, None) for a in ARCHITECTURES if a != "vgg"] + [("vgg", 8), ("vgg", 30)]
PAPER_VGGS = ["vgg11", "vgg13", "vgg16", "vgg19"]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shapes(model: nn.Module) -> Counter:
    # Counts alone could hide two mistakes that cancel; the multiset of shapes cannot.
    return Counter(tuple(p.shape) for p in model.parameters())


def _convs_per_stage(plan: list) -> list[int]:
    counts, n = [], 0
    for layer in plan:
        if layer == "M":
            counts.append(n)
            n = 0
        else:
            n += 1
    return counts


# ---- layouts equal torchvision's (built on the meta device: no memory, no init cost) ---------------


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("arch", PAPER_VGGS)
def test_vgg_matches_torchvision(arch, batch_norm):
    with torch.device("meta"):
        theirs = getattr(torchvision.models, arch + ("_bn" if batch_norm else ""))(weights=None, init_weights=False)
        ours = ARCHITECTURES[arch](ModelConfig(arch=arch, batch_norm=batch_norm, head="paper"), num_classes=1000)
    assert _n_params(ours) == _n_params(theirs)
    assert _shapes(ours) == _shapes(theirs)
    # Same order too, so torchvision's pretrained tensors would load positionally.
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]


@pytest.mark.parametrize("arch", ["resnet18", "resnet34"])
def test_resnet_matches_torchvision(arch):
    with torch.device("meta"):
        theirs = getattr(torchvision.models, arch)(weights=None)
        ours = ARCHITECTURES[arch](ModelConfig(arch=arch, batch_norm=True, stem="imagenet"), num_classes=1000)
    assert _n_params(ours) == _n_params(theirs)
    assert _shapes(ours) == _shapes(theirs)


def test_googlenet_matches_torchvision_with_and_without_aux_heads():
    with torch.device("meta"):
        theirs = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
        with_aux = ARCHITECTURES["googlenet"](ModelConfig(arch="googlenet", batch_norm=True), num_classes=1000)
        without = ARCHITECTURES["googlenet"](ModelConfig(arch="googlenet", batch_norm=True, aux_heads=False),
                                             num_classes=1000)
    assert _n_params(with_aux) == _n_params(theirs) == 13_004_888
    assert _shapes(with_aux) == _shapes(theirs)
    theirs_main = _shapes(theirs) - _shapes(theirs.aux1) - _shapes(theirs.aux2)
    assert _shapes(without) == theirs_main
    assert _n_params(without) == _n_params(theirs) - _n_params(theirs.aux1) - _n_params(theirs.aux2) == 6_624_904


def test_vgg16c_has_1x1_convs_closing_stages_3_to_5():
    with torch.device("meta"):
        c = ARCHITECTURES["vgg16c"](ModelConfig(head="paper"), num_classes=1000)
    kernels = [m.kernel_size[0] for m in c.modules() if isinstance(m, nn.Conv2d)]
    assert kernels == [3, 3, 3, 3] + [3, 3, 1] * 3
    assert _n_params(c) == 133_638_952  # the paper's Table 2 rounds it to 134M


def test_vgg11_lrn_is_a_with_lrn_after_the_first_conv():
    cfg = ModelConfig(head="paper")
    with torch.device("meta"):
        lrn, a = ARCHITECTURES["vgg11_lrn"](cfg, num_classes=1000), ARCHITECTURES["vgg11"](cfg, num_classes=1000)
    assert [type(m) for m in lrn.features[:4]] == [nn.Conv2d, nn.ReLU, nn.LocalResponseNorm, nn.MaxPool2d]
    assert sum(isinstance(m, nn.LocalResponseNorm) for m in lrn.modules()) == 1
    assert _shapes(lrn) == _shapes(a)


# ---- every architecture x BN x init builds, runs and back-propagates at 32 px ------------------------


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "bn"])
@pytest.mark.parametrize("arch,depth", ARCH_CASES, ids=[f"{a}{d or ''}" for a, d in ARCH_CASES])
def test_every_architecture_trains_a_step(arch, depth, batch_norm, init):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, depth=depth, batch_norm=batch_norm, width=1 / 8, init=init)
    model = build_model(cfg, num_classes=10).train()
    logits, aux = split_outputs(model(torch.randn(2, 3, 32, 32)))
    assert logits.shape == (2, 10)
    assert len(aux) == (2 if arch == "googlenet" else 0)
    target = torch.tensor([3, 7])
    loss = F.cross_entropy(logits, target) + cfg.aux_weight * sum(F.cross_entropy(a, target) for a in aux)
    loss.backward()
    assert torch.isfinite(logits).all() and all(torch.isfinite(a).all() for a in aux)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} is not on the loss's path"
        assert torch.isfinite(p.grad).all(), name


def test_build_model_applies_the_init():
    cfg = ModelConfig(arch="vgg11", width=1 / 8, init="normal", init_std=0.123)
    model = build_model(cfg, num_classes=10)
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    assert weights.std().item() == pytest.approx(0.123, rel=0.05)
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("arch,depth", ARCH_CASES, ids=[f"{a}{d or ''}" for a, d in ARCH_CASES])
def test_layers_are_registered_in_forward_order_and_each_runs_once(arch, depth):
    model = ARCHITECTURES[arch](ModelConfig(arch=arch, depth=depth, batch_norm=True, width=1 / 16),
                                num_classes=10).eval()
    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU)
    calls: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            module.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    model(torch.randn(1, 3, 32, 32))
    registered = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    assert len(calls) == len(set(calls)), "a module is called twice; activation hooks would mix its uses"
    assert calls == [n for n in registered if n in set(calls)]
    # Only GoogLeNet's training-time auxiliary heads may sit idle, and they are registered last.
    idle = [n for n in registered if n not in set(calls)]
    assert all(n.startswith(("aux1.", "aux2.")) for n in idle)
    assert registered[len(registered) - len(idle):] == idle


# ---- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,depth", ARCH_CASES, ids=[f"{a}{d or ''}" for a, d in ARCH_CASES])
def test_batch_norm_switch(arch, depth):
    def build(bn: bool) -> nn.Module:
        return ARCHITECTURES[arch](ModelConfig(arch=arch, depth=depth, batch_norm=bn, width=1 / 16), num_classes=10)

    on, off = build(True), build(False)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in on.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in on.modules()) == n_convs
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in off.modules())
    assert all(m.bias is not None for m in off.modules() if isinstance(m, nn.Conv2d))
    conv_biases = {m.bias is not None for m in on.modules() if isinstance(m, nn.Conv2d)}
    assert conv_biases == ({True} if arch.startswith("vgg") else {False})  # VGG keeps it, as torchvision


def test_googlenet_bn_uses_eps_1e_3():
    model = ARCHITECTURES["googlenet"](ModelConfig(batch_norm=True, width=1 / 16), num_classes=10)
    assert {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}


def test_width_scales_every_conv_and_the_paper_head():
    half = ARCHITECTURES["vgg16"](ModelConfig(width=0.5, head="paper"), num_classes=10)
    convs = [m.out_channels for m in half.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [32, 32, 64, 64, 128, 128, 128] + [256] * 6
    fcs = [(m.in_features, m.out_features) for m in half.modules() if isinstance(m, nn.Linear)]
    assert fcs == [(256 * 49, 2048), (2048, 2048), (2048, 10)]
    # Far below one channel per layer, every layer keeps one rather than vanishing.
    tiny = ARCHITECTURES["resnet18"](ModelConfig(width=1e-3), num_classes=10)
    assert {m.out_channels for m in tiny.modules() if isinstance(m, nn.Conv2d)} == {1}
    assert tiny(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg_heads():
    paper = ARCHITECTURES["vgg11"](ModelConfig(head="paper", dropout=0.3, width=1 / 8), num_classes=10).head
    assert [type(m) for m in paper] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout,
                                        nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert paper[0].output_size == (7, 7)
    assert [m.p for m in paper if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    compact = ARCHITECTURES["vgg11"](ModelConfig(head="compact", width=1 / 8), num_classes=10).head
    assert [type(m) for m in compact] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]
    assert compact[2].in_features == 64
    with pytest.raises(ValueError, match=re.escape("model.head='big' is not one of ['compact', 'paper']")):
        ARCHITECTURES["vgg11"](ModelConfig(head="big"), num_classes=10)


def test_resnet_stems():
    x = torch.randn(1, 3, 32, 32)
    cifar = ARCHITECTURES["resnet18"](ModelConfig(stem="cifar", width=1 / 8), num_classes=10)
    imagenet = ARCHITECTURES["resnet18"](ModelConfig(stem="imagenet", width=1 / 8), num_classes=10)
    assert cifar.stem(x).shape[-2:] == (32, 32)
    assert imagenet.stem(x).shape[-2:] == (8, 8)
    assert cifar.stem.conv.kernel_size == (3, 3) and imagenet.stem.conv.kernel_size == (7, 7)
    with pytest.raises(ValueError, match=re.escape("model.stem='tiny' is not one of ['cifar', 'imagenet']")):
        ARCHITECTURES["resnet18"](ModelConfig(stem="tiny"), num_classes=10)


def test_resnet_blocks_per_stage():
    for arch, blocks in [("resnet18", [2, 2, 2, 2]), ("resnet34", [3, 4, 6, 3])]:
        model = ARCHITECTURES[arch](ModelConfig(width=1 / 16), num_classes=10)
        assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == blocks


@pytest.mark.parametrize("arch,depth", [c for c in ARCH_CASES if c[0] != "googlenet"],
                         ids=[f"{a}{d or ''}" for a, d in ARCH_CASES if a != "googlenet"])
def test_smallest_configurable_resolution_runs(arch, depth):
    # data.resolution may be as small as 8 px; five 2x2 pools must not shrink that to nothing.
    model = ARCHITECTURES[arch](ModelConfig(arch=arch, depth=depth, width=1 / 16, head="paper"), num_classes=10)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_googlenet_refuses_inputs_its_pools_would_erase():
    model = ARCHITECTURES["googlenet"](ModelConfig(width=1 / 16), num_classes=10).eval()
    assert model(torch.randn(1, 3, 15, 15)).shape == (1, 10)
    with pytest.raises(ValueError, match=r"at least 15x15 px, got \(14, 14\)"):
        model(torch.randn(1, 3, 14, 14))


# ---- GoogLeNet outputs -------------------------------------------------------------------------------


def test_googlenet_outputs_by_mode():
    x = torch.randn(2, 3, 32, 32)
    model = ARCHITECTURES["googlenet"](ModelConfig(aux_heads=True, width=1 / 8), num_classes=5)
    out = model.train()(x)
    assert isinstance(out, GoogLeNetOutput) and len(out) == 3
    main, aux = split_outputs(out)
    assert main is out.logits and aux == [out.aux1, out.aux2]
    assert all(t.shape == (2, 5) for t in out)

    out = model.eval()(x)
    assert isinstance(out, torch.Tensor)
    assert split_outputs(out) == (out, [])

    no_aux = ARCHITECTURES["googlenet"](ModelConfig(aux_heads=False, width=1 / 8), num_classes=5)
    assert no_aux.aux1 is None and isinstance(no_aux.train()(x), torch.Tensor)


def test_split_outputs_rejects_other_types():
    with pytest.raises(TypeError, match="expected a Tensor or a tuple of Tensors"):
        split_outputs({"logits": torch.zeros(1)})
    with pytest.raises(TypeError):
        split_outputs(())


# ---- plans, depths, errors ------------------------------------------------------------------------


def test_plain_plan_gives_the_paper_plans():
    assert (plain_plan(11), plain_plan(13), plain_plan(16), plain_plan(19)) == (A, B, D, E)
    plan = plain_plan(16)
    plan.append("M")
    assert plain_plan(16) == D, "callers must get a copy, not the module constant"


@pytest.mark.parametrize("depth,per_stage", [
    (8, [1, 1, 1, 1, 1]),
    (12, [2, 2, 2, 2, 1]),
    (17, [3, 3, 3, 3, 2]),
    (22, [4, 4, 4, 4, 3]),
    (30, [6, 6, 5, 5, 5]),
    (33, [6, 6, 6, 6, 6]),
])
def test_plain_plan_spreads_convs_early_first(depth, per_stage):
    plan = plain_plan(depth)
    assert _convs_per_stage(plan) == per_stage
    channels = [layer for layer in plan if layer != "M"]
    assert channels == [c for c, n in zip([64, 128, 256, 512, 512], per_stage) for _ in range(n)]
    model = ARCHITECTURES["vgg"](ModelConfig(arch="vgg", depth=depth, head="paper", width=1 / 16), num_classes=10)
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()) == depth


def test_plain_plan_too_shallow():
    with pytest.raises(ValueError, match=r"model\.depth=7 is too shallow"):
        plain_plan(7)
    with pytest.raises(ValueError, match=r"model\.depth is required"):
        ARCHITECTURES["vgg"](ModelConfig(arch="vgg"), num_classes=10)


def test_unknown_architecture():
    message = re.escape(f"model.arch='alexnet' is not one of {sorted(ARCHITECTURES)}")
    with pytest.raises(ValueError, match=f"^{message}$"):
        build_model(ModelConfig(arch="alexnet"), num_classes=10)
    with pytest.raises(ValueError, match=f"^{message}$"):
        weight_depth(ModelConfig(arch="alexnet"))


@pytest.mark.parametrize("arch,depth,expected", [
    ("vgg11", None, 11), ("vgg11_lrn", None, 11), ("vgg13", None, 13), ("vgg16c", None, 16),
    ("vgg16", None, 16), ("vgg19", None, 19), ("vgg", 8, 8), ("vgg", 30, 30),
    ("resnet18", None, 18), ("resnet34", None, 34), ("googlenet", None, 22), ("smallcnn", None, 5),
])
def test_weight_depth(arch, depth, expected):
    cfg = ModelConfig(arch=arch, depth=depth, head="paper", width=1 / 16)
    assert weight_depth(cfg) == expected
    if arch == "googlenet":
        return  # 22 is the paper's own count of its layers with parameters; not a module count
    model = ARCHITECTURES[arch](cfg, num_classes=10)
    # Counted from the built network: ResNet's 1x1 projection shortcuts are not counted, as in its paper.
    layers = [m for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and ".shortcut." not in n]
    assert len(layers) == expected
