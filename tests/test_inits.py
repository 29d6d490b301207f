"""Each init scheme gives every layer the std its formula predicts (within 5%), zero biases, BN 1/0."""

import math

import pytest
import torch
from torch import nn

from sweeper.config import ModelConfig
from sweeper.inits import fans, init_weights, relu_gain, weight_std


def _net() -> nn.Module:
    # Fans span two orders of magnitude: 27 (first conv) to 16384 (the linear layer).
    return nn.Sequential(
        nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 128, 3), nn.ReLU(),
        nn.Conv2d(128, 256, 1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16384, 512),
    )


def _hand_std(init: str, fan_in: int, fan_out: int, *, std=0.01, mode="fan_in") -> float:
    """The textbook formulas, written out independently of sweeper.inits."""
    return {
        "normal": std,
        "he": math.sqrt(2 / (fan_in if mode == "fan_in" else fan_out)),
        "xavier": math.sqrt(2 / (fan_in + fan_out)),
        "default": math.sqrt(1 / (3 * fan_in)),  # kaiming_uniform(a=sqrt(5)): bound 1/sqrt(fan_in)
    }[init]


CASES = [
    dict(init="normal"), dict(init="normal", init_std=0.1),
    dict(init="he"), dict(init="he", init_mode="fan_out"), dict(init="he", init_distribution="uniform"),
    dict(init="xavier"), dict(init="xavier", init_distribution="normal"),
    dict(init="default"),
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: "-".join(str(v) for v in k.values()))
def test_empirical_std_matches_formula_within_5_percent(kwargs):
    torch.manual_seed(0)
    cfg = ModelConfig(**kwargs)
    net = init_weights(_net(), cfg)
    for layer in [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]:
        c_out, c_in = layer.weight.shape[:2]
        k2 = layer.weight[0, 0].numel() if layer.weight.dim() == 4 else 1
        expected = _hand_std(cfg.init, c_in * k2, c_out * k2, std=cfg.init_std, mode=cfg.init_mode)
        measured = layer.weight.std().item()
        assert measured == pytest.approx(expected, rel=0.05), (layer, measured, expected)
        assert abs(layer.weight.mean().item()) < 0.05 * expected + 1e-6
        if cfg.init != "default":
            assert torch.count_nonzero(layer.bias) == 0


def test_uniform_and_normal_shapes_differ():
    torch.manual_seed(0)
    uni = init_weights(nn.Linear(1000, 1000), ModelConfig(init="xavier")).weight
    nor = init_weights(nn.Linear(1000, 1000), ModelConfig(init="xavier",
                                                          init_distribution="normal")).weight
    bound = math.sqrt(6 / 2000)
    assert uni.abs().max().item() <= bound + 1e-6
    assert nor.abs().max().item() > bound  # a normal's tails pass the uniform's bound


def test_batchnorm_reset_to_identity():
    net = _net()
    with torch.no_grad():
        net[1].weight.fill_(3.0)
        net[1].bias.fill_(-1.0)
    init_weights(net, ModelConfig(init="he"))
    assert torch.all(net[1].weight == 1) and torch.all(net[1].bias == 0)


def test_fans_and_relu_gain_match_he_et_al():
    conv = nn.Conv2d(64, 128, 3)
    assert fans(conv) == (576, 1152)
    # He init keeps the ReLU gain at exactly 1; N(0, 0.01^2) on C_in=64 gives 0.5*9*64*1e-4 = 0.0288.
    assert relu_gain(ModelConfig(init="he"), conv) == pytest.approx(1.0)
    assert relu_gain(ModelConfig(init="normal"), conv) == pytest.approx(0.0288)
    assert relu_gain(ModelConfig(init="normal", init_std=0.1), conv) == pytest.approx(2.88)
    # Xavier: n*Var/2 = 576 * 2/(576+1152) / 2 = 1/3 for a layer that doubles the channels.
    assert relu_gain(ModelConfig(init="xavier"), conv) == pytest.approx(1 / 3)
    assert weight_std(ModelConfig(init="he", init_mode="fan_out"), 576, 1152) == pytest.approx(
        math.sqrt(2 / 1152))
