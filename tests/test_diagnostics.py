"""Per-layer diagnostics: the measurements mean what their names say, the theory matches hand
calculations, and stalls get the cause the numbers point to."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sweeper.config import DiagnosticsConfig, ModelConfig, TrialConfig
from sweeper.diagnostics import Diagnostics, LayerInfo, classify_stall, predicted_stds


class _Data:
    def __init__(self, x, y, num_classes=10):
        self.x, self.y, self.num_classes = x, y, num_classes

    def probe_batch(self, n):
        return self.x[:n], self.y[:n]


def _ctx(model, x, y, *, init="he", lr=0.1):
    cfg = TrialConfig.from_flat({"model.init": init})
    return SimpleNamespace(cfg=cfg, model=model, data=_Data(x, y),
                           optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                           criterion=nn.CrossEntropyLoss(), history=[], label=None, stop=False)


def _mlp():
    # Registered out of execution order on purpose: diagnostics must follow the forward pass.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(32, 10)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
            self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

        def forward(self, x):
            x = self.relu1(self.conv1(x))
            x = self.relu2(self.conv2(x))
            return self.head(x.mean((2, 3)))

    return Net()


def test_layers_are_named_in_execution_order_with_a_path_map():
    torch.manual_seed(0)
    model = _mlp()
    diag = Diagnostics(DiagnosticsConfig(probe_size=8))
    metrics = diag.on_fit_start(_ctx(model, torch.randn(8, 3, 8, 8), torch.arange(8)))
    assert diag.layer_map() == {"l00_conv": "conv1", "l01_conv": "conv2", "l02_fc": "head"}
    for key in ("act_std", "act_mean", "grad_norm", "weight_norm", "rel_grad", "update_ratio",
                "out_grad_std", "sensitivity", "gain_pred", "gain_meas", "act_std_pred"):
        assert f"{key}/l00_conv" in metrics, key
    assert "dead_frac/l00_conv" in metrics and "dead_frac/l02_fc" not in metrics  # no ReLU after fc
    w = model.conv1.weight
    assert metrics["weight_norm/l00_conv"] == pytest.approx(float(w.detach().norm()))


def test_measurements_match_direct_computation():
    torch.manual_seed(0)
    model = _mlp()
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8)
    ctx = _ctx(model, x, y, lr=0.5)
    metrics = Diagnostics(DiagnosticsConfig(probe_size=8)).on_fit_start(ctx)
    out1 = model.conv1(x)
    assert metrics["act_std/l00_conv"] == pytest.approx(float(out1.detach().std()), rel=1e-5)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    g = float(model.conv2.weight.grad.norm())
    assert metrics["grad_norm/l01_conv"] == pytest.approx(g, rel=1e-5)
    assert metrics["update_ratio/l01_conv"] == pytest.approx(0.5 * g / float(model.conv2.weight.detach().norm()),
                                                             rel=1e-5)
    relu = torch.relu(out1)
    assert metrics["zero_frac/l00_conv"] == pytest.approx(float((relu == 0).float().mean()))


def test_dead_units_are_channels_zero_everywhere():
    model = _mlp()
    with torch.no_grad():
        model.conv1.bias[:4] = -100.0  # 4 of 16 channels can never fire
    metrics = Diagnostics(DiagnosticsConfig(probe_size=8)).on_fit_start(
        _ctx(model, torch.randn(8, 3, 8, 8), torch.arange(8)))
    assert metrics["dead_frac/l00_conv"] == pytest.approx(4 / 16)


def test_the_probe_leaves_training_state_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                          nn.Flatten(), nn.Linear(4 * 36, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = _ctx(model, torch.randn(8, 3, 8, 8), torch.arange(8))
    rng = torch.get_rng_state()
    Diagnostics(DiagnosticsConfig(probe_size=8)).on_fit_start(ctx)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN buffers too
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


def test_theory_gain_and_predicted_std_by_hand():
    convs = [nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3)]
    cfg = ModelConfig(init="normal", init_std=0.01)
    layers = [LayerInfo(i, f"l{i:02d}_conv", str(i), m, 0.0) for i, m in enumerate(convs)]
    # Var[y1] = 27 * 1e-4 * 1 (input second moment 1); then E[x^2] = Var/2 behind each ReLU.
    v1 = 27 * 1e-4
    v2 = 72 * 1e-4 * v1 / 2
    v3 = 144 * 1e-4 * v2 / 2
    assert predicted_stds(cfg, layers) == pytest.approx([math.sqrt(v1), math.sqrt(v2), math.sqrt(v3)])
    # The science notes' table: g = 0.5 * 9 * C_in * sigma^2 = .0036 at C_in=8, .0072 at 16.
    from sweeper.inits import relu_gain

    assert relu_gain(cfg, convs[1]) == pytest.approx(0.0036)
    assert relu_gain(cfg, convs[2]) == pytest.approx(0.0072)
    # He: Var[y1] = 27 * (2/27) * 2 = 4; behind a ReLU E[x^2] = 2 again, so every layer keeps std 2.
    he = predicted_stds(ModelConfig(init="he"), layers, input_second_moment=2.0)
    assert he == pytest.approx([2.0, 2.0, 2.0])


def _fake(stds, updates, dead=None, grads=None, **extra):
    keys = [f"l{i:02d}_conv" for i in range(len(stds))]
    m = {}
    for i, k in enumerate(keys):
        m[f"act_std/{k}"] = stds[i]
        m[f"update_ratio/{k}"] = updates[i]
        m[f"sensitivity/{k}"] = 0.3
        m[f"dead_frac/{k}"] = (dead or [0.0] * len(keys))[i]
        m[f"grad_norm/{k}"] = (grads or [1.0] * len(keys))[i]
    m.update(extra)
    layers = [LayerInfo(i, k, k, nn.Identity(), 1.0) for i, k in enumerate(keys)]
    return m, layers


@pytest.mark.parametrize("case,reason", [
    (dict(stds=[1, 1e-2, 1e-5, 1e-9], updates=[1e-9] * 4), "vanishing_signal"),
    (dict(stds=[1, 1, 1, 1], updates=[1e-7] * 4), "vanishing_signal"),
    (dict(stds=[1, 1, 1, 1], updates=[1e-2] * 4, dead=[0, 0, 0.6, 0.7]), "dead_relu"),
    (dict(stds=[1, 1, 1, 1], updates=[1e-2] * 4, grads=[1e-6, 1e-3, 1e-1, 1]), "vanishing_gradient"),
    (dict(stds=[1, 1, 1, 1], updates=[1e-4] * 4), "lr_too_small"),
    (dict(stds=[1, 1, 1, 1], updates=[1e-2] * 4, nonfinite=1.0), "exploding"),
    (dict(stds=[1, 1, 1, 1], updates=[1e-2] * 4, logit_std=1e6), "exploding"),
    (dict(stds=[1, 1, 1, 1], updates=[1e-2] * 4), "plateau"),
])
def test_classify_stall(case, reason):
    metrics, layers = _fake(**case)
    assert classify_stall(metrics, layers) == reason


def test_lr_too_high_vs_too_small_depends_on_the_first_steps():
    metrics, layers = _fake(stds=[1, 0.5, 0.3, 0.2], updates=[2e-4] * 4)
    assert classify_stall(metrics, layers, initial_max_update=1e-2) == "lr_too_high"
    assert classify_stall(metrics, layers, initial_max_update=3e-4) == "lr_too_small"


def test_stall_labels_after_n_epochs_at_chance_and_can_stop():
    model = _mlp()
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8)
    ctx = _ctx(model, x, y)
    diag = Diagnostics(DiagnosticsConfig(probe_size=8, stall_epochs=2, stop_on_stall=True))
    diag.on_fit_start(ctx)
    chance = math.log(10)
    out = diag.on_epoch_end(ctx, {"train_loss": chance + 0.01})
    assert out["stalled"] == 0.0 and ctx.label is None
    ctx.history.append({"train_loss": chance + 0.01})
    out = diag.on_epoch_end(ctx, {"train_loss": chance - 0.02})
    assert out["stalled"] == 1.0 and ctx.label[0] == "stalled" and ctx.stop is True
    ctx.history.append({"train_loss": chance - 0.02})
    out = diag.on_epoch_end(ctx, {"train_loss": 1.0})  # it left the band: no longer stalled
    assert out["stalled"] == 0.0 and ctx.label is None


def test_learn_then_collapse():
    model = _mlp()
    ctx = _ctx(model, torch.randn(8, 3, 8, 8), torch.arange(8))
    diag = Diagnostics(DiagnosticsConfig(probe_size=8, stall_epochs=3))
    diag.on_fit_start(ctx)
    for loss in (1.2, 0.6):
        diag.on_epoch_end(ctx, {"train_loss": loss})
        ctx.history.append({"train_loss": loss})
    out = diag.on_epoch_end(ctx, {"train_loss": math.log(10)})
    assert out["stall_reason"] == "learn_then_collapse"
