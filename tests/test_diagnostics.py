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


def test_a_fully_dead_layer_is_not_a_nonfinite_net():
    """Behind a layer whose every unit is dead, the next layer's input is all zeros and its gain a
    ratio over zero (inf, nan): a VGG-16 at lr 0.5 in that state, with a finite loss and small
    logits, was named `exploding`. The net's own numbers are finite; the dead units are the cause."""
    torch.manual_seed(0)
    model = _mlp()
    with torch.no_grad():
        model.conv2.bias[:] = -100.0  # every channel of conv2 dead: the head sees zeros
    ctx = _ctx(model, torch.randn(8, 3, 8, 8), torch.arange(8))
    diag = Diagnostics(DiagnosticsConfig(probe_size=8))
    metrics = diag.on_fit_start(ctx)
    assert metrics["dead_frac/l01_conv"] == 1.0
    assert not math.isfinite(metrics["gain_meas/l02_fc"])  # the ratio over a zero input
    assert metrics["nonfinite"] == 0.0
    assert classify_stall(metrics, diag.layers) != "exploding"
    with torch.no_grad():
        model.head.weight[0, 0] = math.inf  # a weight that did overflow still counts
    assert diag.on_fit_start(ctx)["nonfinite"] == 1.0


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


def test_a_frozen_backbone_is_no_vanishing_gradient():
    """model.freeze: frozen layers have no gradient by construction; only the trained ones count."""
    metrics, layers = _fake(stds=[1, 1, 1, 1], updates=[0.0, 0.0, 0.0, 1e-2], grads=[0, 0, 0, 1.0])
    frozen = [LayerInfo(l.index, l.key, l.path, nn.Linear(2, 2), l.gain_pred) for l in layers]
    for l in frozen[:3]:
        l.module.weight.requires_grad_(False)
    assert classify_stall(metrics, frozen) == "plateau"
    trainable = [LayerInfo(l.index, l.key, l.path, nn.Linear(2, 2), l.gain_pred) for l in layers]
    assert classify_stall(metrics, trainable) == "vanishing_gradient"  # the same numbers, all training


def test_a_signal_dead_at_init_outranks_dead_units_now():
    metrics, layers = _fake(stds=[1, 1, 1, 1], updates=[1e-2] * 4, dead=[0, 0, 0.6, 0.7])
    assert classify_stall(metrics, layers) == "dead_relu"
    assert classify_stall(metrics, layers, initial_signal=0.5) == "dead_relu"
    assert classify_stall(metrics, layers, initial_signal=4e-4) == "vanishing_signal"
    assert classify_stall(metrics, layers, initial_signal=math.nan) == "dead_relu"  # old checkpoints


def test_frozen_is_judged_by_the_loss_gradients_step_not_weight_decays_pull():
    """A stalled VGG-16 under the VGG recipe (SGD lr 0.01, momentum 0.9, wd 5e-4) read update ratio
    4.8e-5 in every layer -- weight decay's lr wd / (1 - momentum) -- while its relative gradients
    were 1e-18..4e-7: the frozen test (every update < 1e-5) could never fire, and it fell through to
    lr_too_small."""
    from sweeper.diagnostics import gradient_lr

    keys = [f"l{i:02d}_conv" for i in range(4)]
    frozen = {f"rel_grad/{k}": 1e-8 for k in keys}
    metrics, layers = _fake(stds=[1, 0.5, 0.3, 0.2], updates=[4.83e-5] * 4, **frozen)
    assert classify_stall(metrics, layers) == "lr_too_small"  # the update ratio alone
    assert classify_stall(metrics, layers, gradient_lr=0.1) == "vanishing_signal"
    moving = {f"rel_grad/{k}": 1e-3 for k in keys}  # lr_eff x 1e-3 = 1e-4: it moves, slowly
    metrics, layers = _fake(stds=[1, 0.5, 0.3, 0.2], updates=[4.83e-5] * 4, **moving)
    assert classify_stall(metrics, layers, gradient_lr=0.1) == "lr_too_small"
    # Frozen by the lr, not the gradient: a plateau schedule cut lr 0.01 to 1e-4 (gradient_lr 1e-3)
    # under healthy relative gradients (a He VGG-16: 4e-3..7e-3). Was named vanishing_signal.
    healthy = {f"rel_grad/{k}": g for k, g in zip(keys, [4e-3, 5e-3, 6e-3, 7e-3])}
    metrics, layers = _fake(stds=[1, 0.8, 0.5, 0.4], updates=[5e-7] * 4, **healthy)
    assert classify_stall(metrics, layers, gradient_lr=1e-3, initial_max_update=1e-2) == "lr_too_small"
    assert classify_stall(metrics, layers, gradient_lr=1e-4) == "lr_too_small"

    net = [LayerInfo(0, "l00_conv", "0", nn.Conv2d(3, 4, 3), 1.0)]
    params = list(net[0].module.parameters())
    assert gradient_lr(torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4), net) == \
        pytest.approx(0.1)
    assert gradient_lr(torch.optim.SGD(params, lr=0.01), net) == pytest.approx(0.01)
    assert gradient_lr(torch.optim.SGD(params, lr=0.01, momentum=0.5, dampening=0.5), net) == \
        pytest.approx(0.01)
    assert math.isnan(gradient_lr(torch.optim.Adam(params, lr=0.01), net))
    assert math.isnan(gradient_lr(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.01), net))
    # model.freeze: a frozen first layer is not in the optimizer; the first trained one's group counts.
    two = [*net, LayerInfo(1, "l01_conv", "1", nn.Conv2d(4, 4, 3), 1.0)]
    trained = torch.optim.SGD(two[1].module.parameters(), lr=0.02, momentum=0.9)
    assert gradient_lr(trained, two) == pytest.approx(0.2)


def test_the_epoch_end_names_the_stall_with_the_optimizers_gradient_lr(monkeypatch):
    seen = {}

    def spy(metrics, layers, **kwargs):
        seen.update(kwargs)
        return "plateau"

    monkeypatch.setattr("sweeper.diagnostics.hook.classify_stall", spy)
    model = _mlp()
    ctx = _ctx(model, torch.randn(8, 3, 8, 8), torch.arange(8))
    ctx.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    diag = Diagnostics(DiagnosticsConfig(probe_size=8, stall_epochs=1, counterfactuals=False))
    diag.on_fit_start(ctx)
    diag.on_epoch_end(ctx, {"train_loss": math.log(10)})
    assert seen["gradient_lr"] == pytest.approx(0.1)
    assert seen["initial_signal"] == pytest.approx(diag._initial_signal) and math.isfinite(seen["initial_signal"])


def test_lr_too_high_vs_too_small_depends_on_the_first_steps():
    metrics, layers = _fake(stds=[1, 0.5, 0.3, 0.2], updates=[2e-4] * 4)
    assert classify_stall(metrics, layers, initial_max_update=1e-2) == "lr_too_high"
    assert classify_stall(metrics, layers, initial_max_update=3e-4) == "lr_too_small"
    # Seen: a He VGG-19 at lr 0.02, updates 4.5e-3 at step 0 and 5.6e-4 at its stall (8x), was
    # lr_too_small beside lr 0.01 and 0.002 training. Large first steps rule "too small" out.
    metrics, layers = _fake(stds=[1, 0.5, 0.3, 0.2], updates=[5.6e-4] * 4)
    assert classify_stall(metrics, layers, initial_max_update=4.5e-3) == "lr_too_high"
    metrics, layers = _fake(stds=[1, 0.5, 0.3, 0.2], updates=[9e-4] * 4)
    assert classify_stall(metrics, layers, initial_max_update=1.2e-3) == "plateau"


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


# ---- each epoch measured on one of its own training steps (issue #9) ------------------------------

# Everything measured from the pass itself, at the weights it ran with (the recorded step's: before
# its update), so a probe of the same batch at those weights gives the same numbers.
_PER_PASS = ("act_std", "act_mean", "out_grad_std", "zero_frac", "dead_frac", "sensitivity",
             "gain_meas", "gain_pred", "grad_norm", "rel_grad")


def _recorded_epoch(model, x, y, *, probe_size, then=None, lr=0.1):
    """on_fit_start on (x, y); one training step on (x, y) inside watch_step (and, if ``then`` is a
    batch, an unrecorded step on it after, like a short last batch); the probe batch then replaced by
    other images, so an epoch end that ran a probe pass would measure those instead."""
    from sweeper.train import train_step

    ctx = _ctx(model, x, y, lr=lr)
    diag = Diagnostics(DiagnosticsConfig(probe_size=probe_size))
    diag.on_fit_start(ctx)
    ctx.data = _Data(torch.randn_like(x) * 3, y)
    watch = diag.watch_step(ctx, y)
    assert watch is not None
    with watch:
        train_step(model, ctx.optimizer, ctx.criterion, x, y)
    if then is not None:
        train_step(model, ctx.optimizer, ctx.criterion, *then)
    return diag.on_epoch_end(ctx, {"train_loss": 1.0})


def test_an_epoch_measured_on_its_training_step_equals_a_probe_of_that_batch():
    torch.manual_seed(0)
    model, x, y = _mlp(), torch.randn(8, 3, 8, 8), torch.arange(8)
    with torch.no_grad():
        model.conv1.bias[:3] = -100.0  # dead channels, so dead_frac is not trivially 0
    # The probe pass at the same weights, on the same batch: what the recorded step must reproduce.
    # A large lr, so that the weights after the step differ from those the step ran with.
    probe = Diagnostics(DiagnosticsConfig(probe_size=8)).on_fit_start(_ctx(model, x, y, lr=2000.0))
    epoch = _recorded_epoch(model, x, y, probe_size=8, lr=2000.0)
    for name in _PER_PASS:
        for layer in ("l00_conv", "l01_conv", "l02_fc"):
            key = f"{name}/{layer}"
            if key in probe:
                assert epoch[key] == pytest.approx(probe[key], rel=1e-5, abs=1e-12), key
    assert epoch["dead_frac/l00_conv"] == pytest.approx(3 / 16)
    assert epoch["probe_loss"] == pytest.approx(probe["probe_loss"], rel=1e-6)
    # The weights are the ones after the step, and the update ratio is the step that was taken.
    assert epoch["weight_norm/l01_conv"] == pytest.approx(float(model.conv2.weight.detach().norm()))
    assert epoch["weight_norm/l01_conv"] != pytest.approx(probe["weight_norm/l01_conv"], rel=1e-2)
    assert epoch["update_ratio/l01_conv"] == pytest.approx(probe["update_ratio/l01_conv"], rel=1e-4)


def test_the_update_ratio_is_the_recorded_steps_own_when_a_short_batch_follows():
    torch.manual_seed(2)
    model, x, y = _mlp(), torch.randn(8, 3, 8, 8), torch.arange(8)
    probe = Diagnostics(DiagnosticsConfig(probe_size=8)).on_fit_start(_ctx(model, x, y))
    short = (torch.randn(3, 3, 8, 8) * 5, torch.tensor([1, 2, 3]))
    epoch = _recorded_epoch(model, x, y, probe_size=8, then=short)
    # Plain SGD: the recorded step's update is lr * its gradient, what the probe predicted for it.
    for layer in ("l00_conv", "l01_conv", "l02_fc"):
        assert epoch[f"update_ratio/{layer}"] == pytest.approx(probe[f"update_ratio/{layer}"], rel=1e-4)
        assert epoch[f"update_ratio/{layer}"] == pytest.approx(0.1 * epoch[f"rel_grad/{layer}"], rel=1e-4)


def test_a_recorded_step_that_raises_leaves_the_epoch_to_the_probe():
    model, x, y = _mlp(), torch.randn(8, 3, 8, 8), torch.arange(8)
    ctx = _ctx(model, x, y)
    diag = Diagnostics(DiagnosticsConfig(probe_size=8))
    diag.on_fit_start(ctx)
    with pytest.raises(RuntimeError, match="out of memory, say"):
        with diag.watch_step(ctx, y):
            model(x)
            raise RuntimeError("out of memory, say")
    assert not any(m._forward_hooks for m in model.modules())
    out = diag.on_epoch_end(ctx, {"train_loss": 1.0})  # the probe pass, not a half-recorded step
    assert out["grad_norm/l00_conv"] > 0 and math.isfinite(out["probe_loss"])
    assert out["act_std/l00_conv"] == pytest.approx(float(model.conv1(x).detach().std()), rel=1e-5)


def test_a_recorded_step_larger_than_the_probe_measures_its_first_probe_size_examples():
    torch.manual_seed(1)
    model, x, y = _mlp(), torch.randn(16, 3, 8, 8), torch.arange(16) % 10
    first = Diagnostics(DiagnosticsConfig(probe_size=8)).on_fit_start(_ctx(model, x[:8], y[:8]))
    loss = nn.functional.cross_entropy(model(x), y)  # the step's own gradient: all 16 examples
    whole = float(torch.autograd.grad(loss, model.conv2.weight)[0].norm())
    epoch = _recorded_epoch(model, x, y, probe_size=8)
    # out_grad_std too: the step's mean over 16 examples, rescaled to a mean over the 8 measured.
    for key in ("act_std/l00_conv", "dead_frac/l01_conv", "sensitivity/l01_conv", "gain_meas/l02_fc",
                "out_grad_std/l00_conv", "out_grad_std/l02_fc", "gain_pred/l01_conv"):
        assert epoch[key] == pytest.approx(first[key], rel=1e-5), key
    assert epoch["probe_loss"] == pytest.approx(first["probe_loss"], rel=1e-6)
    assert epoch["grad_norm/l01_conv"] == pytest.approx(whole, rel=1e-5)
    assert whole != pytest.approx(first["grad_norm/l01_conv"], rel=1e-3)


def test_a_batch_smaller_than_the_probe_or_the_fixed_mode_keeps_the_probe_pass():
    model, x, y = _mlp(), torch.randn(8, 3, 8, 8), torch.arange(8)
    ctx = _ctx(model, x, y)
    diag = Diagnostics(DiagnosticsConfig(probe_size=8))
    diag.on_fit_start(ctx)
    assert diag.watch_step(ctx, y[:7]) is None  # 7 examples < probe_size: dead_frac would mean less
    fixed = Diagnostics(DiagnosticsConfig(probe_size=8, epoch_probe="fixed"))
    fixed.on_fit_start(ctx)
    assert fixed.watch_step(ctx, y) is None
    # Without a recorded step the epoch end measures the probe batch, as it always did.
    assert diag.on_epoch_end(ctx, {"train_loss": 1.0})["act_std/l00_conv"] == pytest.approx(
        float(model.conv1(x).detach().std()), rel=1e-5)


def test_a_recorded_step_leaves_no_hooks_behind():
    model, x, y = _mlp(), torch.randn(8, 3, 8, 8), torch.arange(8)
    _recorded_epoch(model, x, y, probe_size=8)
    modules = list(model.modules())
    assert not any(m._forward_hooks for m in modules)
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())


@pytest.mark.parametrize("losses,final,collapsed,vals", [
    ((1.2, 0.6), math.log(10), True, None),
    # A He-init VGG-19 without BN reached 33% validation accuracy at loss 2.04 (ln 10 - 0.26) and fell
    # back to ln 10: it learned, by the counterfactuals' bar of ln C - 2 x stall_tolerance.
    ((2.2, 2.04), math.log(10), True, None),
    # Never a whole tolerance past the chance band's edge (2.21 > ln 10 - 0.1): no learning to lose.
    ((2.25, 2.21), math.log(10), False, None),
    # Learned (1.98), then past chance: an lr-too-high blow-up ending at 2.96, val 12%, was "completed".
    ((2.22, 1.98), 2.96, True, None),
    # He init starts above ln C: no learning yet, so no collapse -- but three epochs no better than
    # chance, not on their way down, are a stall (a dead He VGG-19 went 2.30, 2.44, 2.31 and was
    # "completed")...
    ((2.45, 2.43), 2.40, "stall", None),
    # ... while a loss falling by more than the tolerance each epoch is on its way to learning.
    ((3.2, 2.9), 2.6, False, None),
    # With validation accuracy: the He VGG-19 peaked at 33% (> 2x chance) -- it learned.
    ((2.30, 2.22, 2.04), 2.33, True, (0.25, 0.19, 0.33)),
    # A noisy net near chance: one epoch at 2.19 with validation at 15% learned nothing to lose.
    ((2.30, 2.19), 2.26, False, (0.12, 0.15)),
])
def test_learn_then_collapse(losses, final, collapsed, vals):
    model = _mlp()
    ctx = _ctx(model, torch.randn(8, 3, 8, 8), torch.arange(8))
    diag = Diagnostics(DiagnosticsConfig(probe_size=8, stall_epochs=3, counterfactuals=False))
    diag.on_fit_start(ctx)
    for i, loss in enumerate(losses):
        metrics = {"train_loss": loss, **({"val_accuracy": vals[i]} if vals else {})}
        diag.on_epoch_end(ctx, metrics)
        ctx.history.append(metrics)
    out = diag.on_epoch_end(ctx, {"train_loss": final, **({"val_accuracy": 0.1} if vals else {})})
    if collapsed == "stall":
        assert out["stalled"] == 1.0 and out["stall_reason"] != "learn_then_collapse"
        return
    assert out.get("stall_reason") == ("learn_then_collapse" if collapsed else None)
    assert out["stalled"] == (1.0 if collapsed else 0.0)


def test_a_signal_that_died_at_init_is_the_cause_after_dead_units_follow():
    """Xavier VGG-19 without BN: the forward signal ratio was 4e-4 at init; by epoch 3 biases had
    lifted it to 2e-3 and killed the last convs' units, and the stall was named dead_relu. The root
    cause is the init's signal: step 0's ratio is kept (and checkpointed) for the verdict."""
    def stalled_reason(vanished_at_init: bool, resume: bool = False) -> str:
        torch.manual_seed(0)
        model, x, y = _mlp(), torch.randn(8, 3, 8, 8), torch.arange(8)
        weight = model.conv2.weight.detach().clone()
        with torch.no_grad():
            model.head.bias.zero_()
            model.conv2.bias.zero_()
            if vanished_at_init:
                model.conv2.weight.mul_(1e-5)  # the deep signal is 1e-5 of the first layer's
        ctx = _ctx(model, x, y)
        diag = Diagnostics(DiagnosticsConfig(probe_size=8, stall_epochs=1, counterfactuals=False))
        init = diag.on_fit_start(ctx)
        assert (init["act_std/l02_fc"] / init["act_std/l00_conv"] < 1e-3) == vanished_at_init
        with torch.no_grad():  # later: weights grown back, 28 of conv2's 32 channels dead
            model.conv2.weight.copy_(weight)
            model.conv2.bias[:28] = -100.0
        if resume:
            diag, state = Diagnostics(diag.cfg), diag.state_dict()
            diag.load_state_dict(state)
        out = diag.on_epoch_end(ctx, {"train_loss": math.log(10)})
        assert out["dead_frac/l01_conv"] == pytest.approx(28 / 32)
        assert out["act_std/l01_conv"] / out["act_std/l00_conv"] > 1e-3  # the ratio no longer says it
        return out["stall_reason"]

    assert stalled_reason(vanished_at_init=False) == "dead_relu"
    assert stalled_reason(vanished_at_init=True) == "vanishing_signal"
    assert stalled_reason(vanished_at_init=True, resume=True) == "vanishing_signal"


# ---- theory beside measurement (issue #10) ---------------------------------------------------------

from sweeper.diagnostics import (  # noqa: E402
    last_step,
    maxpool_factor,
    padding_fraction,
    position_energy,
    predicted_gain,
)
from sweeper.models import build_model  # noqa: E402


class _Noise:
    """A probe of i.i.d. N(0, 1) images: the input the theory assumes (real images are correlated
    across pixels and, for digits, across the three identical colour channels; see gain_err)."""

    num_classes = 10

    def __init__(self, n=64, size=32):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 10

    def probe_batch(self, n):
        return self.x[:n], self.y[:n]


def _zoo_ctx(flat, data, optimizer=None):
    cfg = TrialConfig.from_flat(flat)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=10)
    opt = optimizer(model) if optimizer else torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                                                             weight_decay=5e-4)
    return SimpleNamespace(cfg=cfg, model=model, data=data, optimizer=opt,
                           criterion=nn.CrossEntropyLoss(), history=[], label=None, stop=False)


@pytest.mark.parametrize("kernel,stride,padding,size", [(3, 1, 1, 32), (3, 1, 1, 2), (3, 1, 1, 1),
                                                        (7, 2, 3, 15), (1, 1, 0, 4), (5, 2, 1, 9)])
def test_padding_fraction_counts_the_taps_inside_the_map(kernel, stride, padding, size):
    conv = nn.Conv2d(1, 1, kernel, stride=stride, padding=padding, bias=False)
    ones = nn.functional.conv2d(torch.ones(1, 1, size, size), torch.ones(1, 1, kernel, kernel),
                                stride=stride, padding=padding)
    assert padding_fraction(conv, (size, size)) == pytest.approx(float(ones.mean()) / kernel ** 2)
    if (kernel, stride, padding) == (3, 1, 1):
        assert padding_fraction(conv, (size, size)) == pytest.approx(((3 * size - 2) / (3 * size)) ** 2)


@pytest.mark.parametrize("kernel,stride,padding,size", [(3, 1, 1, 4), (3, 1, 1, 8), (5, 2, 1, 9), (1, 1, 0, 4)])
def test_padding_fraction_weighted_by_where_the_input_energy_sits(kernel, stride, padding, size):
    # A flat map gives rho; a map whose rim is weaker than its centre (as inside a zero-padded net) gives
    # what many random filters measure: E[y^2] / (n E[w^2] E[x^2]) of a 2048-channel conv.
    conv = nn.Conv2d(16, 2048, kernel, stride=stride, padding=padding, bias=False)
    flat = torch.ones(size, size, dtype=torch.float64)
    assert padding_fraction(conv, (size, size), flat) == pytest.approx(padding_fraction(conv, (size, size)))
    profile = torch.ones(size, size)
    profile[1:-1, 1:-1] = 3.0  # the centre 3x the rim's amplitude, 9x its energy
    x = torch.randn(16, 16, size, size, generator=torch.Generator().manual_seed(0)) * profile
    energy = position_energy(x)
    assert float(energy.mean()) == pytest.approx(float(x.double().pow(2).mean()))
    with torch.no_grad():
        y = conv(x)
    w2 = float(conv.weight.detach().double().pow(2).mean())
    seen = float(y.double().pow(2).mean()) / (16 * kernel * kernel * w2 * float(energy.mean()))
    assert padding_fraction(conv, (size, size), energy) == pytest.approx(seen, rel=0.02)
    if (kernel, padding) == (3, 1):  # where taps fall off the map, flat rho misses by > 10%
        assert abs(padding_fraction(conv, (size, size)) / seen - 1) > 0.1
    # Diagnostics predicts with the real input's energy map.
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 10))
    m = Diagnostics(DiagnosticsConfig(probe_size=16)).on_fit_start(_ctx(model, x, torch.arange(16) % 10))
    assert m["gain_pred/l00_conv"] == pytest.approx(
        16 * kernel * kernel * w2 * padding_fraction(conv, (size, size), energy), rel=1e-4)


def test_maxpool_factor_matches_a_monte_carlo_draw():
    g = torch.Generator().manual_seed(0)
    for c in (0.0, 0.5, 0.9):
        z0, z = torch.randn(400_000, 1, generator=g, dtype=torch.float64), \
            torch.randn(400_000, 4, generator=g, dtype=torch.float64)
        y = math.sqrt(c) * z0 + math.sqrt(1 - c) * z
        ratio = float(torch.relu(y.max(1).values).pow(2).mean() / torch.relu(y).pow(2).mean())
        assert maxpool_factor(4, c) == pytest.approx(ratio, rel=0.01), c
    assert maxpool_factor(1) == 1.0


@pytest.mark.parametrize("size", [32, 4, 2, 1])
@pytest.mark.parametrize("init", ["he", "default"])
def test_gain_of_one_wide_layer_is_the_formula_padding_and_bias_included(size, init):
    # One wide layer on i.i.d. input is where He's formula must hold to sampling noise: 256 output
    # channels of 64*9 taps. PyTorch's default init keeps its U(+-1/sqrt(n)) biases.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 256, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(256, 10))
    if init == "he":
        from sweeper.inits import init_weights

        init_weights(model, ModelConfig(init="he"))
    x = torch.randn(64, 64, size, size, generator=torch.Generator().manual_seed(1)) * 0.1
    ctx = _ctx(model, x, torch.arange(64) % 10)
    m = Diagnostics(DiagnosticsConfig(probe_size=64)).on_fit_start(ctx)
    w, b = model[0].weight.detach(), model[0].bias.detach()
    rho = ((3 * size - 2) / (3 * size)) ** 2
    m2 = float(x.pow(2).mean())
    # rho is weighted by the probe's energy per position, flat here up to the sampling of 64 images.
    rho_probe = padding_fraction(model[0], (size, size), position_energy(x))
    assert rho_probe == pytest.approx(rho, rel=0.01)
    assert m["gain_pred/l00_conv"] == pytest.approx(576 * float(w.pow(2).mean()) * rho_probe
                                                    + float(b.pow(2).mean()) / m2)
    assert abs(m["gain_err/l00_conv"]) < 0.05, m["gain_err/l00_conv"]


# Plain (BN-free) VGGs A-E and plain stacks of 8 and 30 layers, on 64 noise images. gain_pred is the
# expectation of gain_meas over draws of the layer's own weights, given its real input (issue #10):
# a modelling error shows as a seed-mean away from 0, a one-draw gap is noise of known size.
# Measured (issue #10: 10 seeds at full width, 20 at width 1/4, he and xavier, C not at full width;
# normal 0.01 draws he's weights times a constant, so its errors are he's):
#  * before: flat rho(H) was off by a seed-mean +5..+15% on convs reading 8x8 and 4x4 maps (worst: E's
#    l11, 4x4, +11%; width 1/4: D's l08 +14%): inside a net a map's rim carries less energy than its
#    centre (the zero-padded conv before gave its border outputs fewer taps), and the border taps are
#    the ones that fall off the map. Weighting rho by the real input's energy per position removed it:
#    every conv's seed-mean within 4% at full width (vgg30: 9%, he's l09 on 128 channels, at 2.5
#    standard errors); z-scores of the seed-means over the 146 width-1/4 convs: mean 0.02, sd 1.1
#    (flat rho: mean 1.6, sd 2.2).
#  * what is left is one weight draw: gain_meas = mean over output units of w' M w / E[x^2], M the
#    input patches' second moments, of relative sd sqrt(2 (tr M^2 - tr(M)^2 / n) / C_out) / tr M
#    (_one_draw_sd). Deep ReLU features point nearly one way (effective rank tr(M)^2 / tr M^2 = 1.5-4
#    past the first two convs), so convs spread 3-12% at full width, 10-35% at width 1/4, and the
#    10-class head, a chi^2_10 / 10 variable, +-45% at any width (seen: -0.82..+1.58 over 10 seeds).
_ZOO = [("vgg11", None), ("vgg13", None), ("vgg16c", None), ("vgg16", None), ("vgg19", None),
        ("vgg", 8), ("vgg", 30)]


@pytest.fixture
def _flush_denormals():
    # As training does on CPU: N(0, 0.01) signals reach float32 denormals, ~10x slower arithmetic.
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def _zoo_flat(arch, depth, init, width):
    flat = {"model.arch": arch, "model.init": init, "model.width": width}
    if depth:
        flat["model.depth"] = depth
    return flat


def _capture_inputs(model):
    """{layer: its input on the next forward}, the first call kept; call the result to unhook."""
    seen = {}

    def hook(mod, args, out):
        seen.setdefault(mod, args[0].detach())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return seen, lambda: [h.remove() for h in handles]


def _one_draw_sd(module, x, kurtosis):
    """The relative sd of gain_meas / gain_pred over draws of this layer's i.i.d. weights, given input x.

    gain_meas = mean over the C_out output units u of w_u' M w_u / E[x^2], M the second-moment matrix of
    the n-tap input patches; Var[w' M w] = s^4 (2 tr M^2 + (kurtosis - 3) sum M_ii^2). gain_pred uses the
    draw's own E[w^2], which takes the isotropic part tr(M)/n I out of M."""
    x = x.detach().float()
    x = x / x.abs().amax().clamp_min(1e-30)  # a vanished signal stays representable
    if isinstance(module, nn.Conv2d):
        # Every 4th example's patches: M to a few per cent (plenty for a spread), at a quarter of the cost.
        p = nn.functional.unfold(x[::4], module.kernel_size, dilation=module.dilation, padding=module.padding,
                                 stride=module.stride)
        p = p.transpose(1, 2).reshape(-1, p.shape[1])
    else:
        p = x.flatten(1)
    rows, n = p.shape
    m = (p.T @ p if rows > n else p @ p.T).double() / rows  # the same nonzero spectrum either way
    tr, tr2 = float(m.trace()), float((m * m).sum())
    diag2 = float(p.double().pow(2).mean(0).pow(2).sum())
    var = 2 * (tr2 - tr * tr / n) + (kurtosis - 3) * (diag2 - tr * tr / n)
    units = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
    return math.sqrt(max(var, 0.0) / units) / tr


@pytest.mark.parametrize("init", ["normal", "xavier", "he"])
def test_predicted_gain_matches_measured_on_plain_vggs(init, _flush_denormals):
    # One draw per net at width 1/4, as Diagnostics reports it: each layer's gap, in units of the
    # spread theory gives one draw of that layer (_one_draw_sd), is a standard normal. Measured over
    # the 99 layers (convs and heads) of the 7 nets: z mean 0.12 (normal, he) / -0.05 (xavier), sd
    # 0.98 / 0.94, worst |z| 3.1 (vgg30 l05) / 3.6 (xavier's vgg16c l08). Raw |gain_err| of convs: median 0.03-0.16,
    # worst 0.69 (vgg30's 16-channel stage); heads up to 1.09: far from 10%, and all of it noise.
    data = _Noise()
    kurtosis = 1.8 if init == "xavier" else 3.0  # xavier draws uniform weights, the others normal
    zs = []
    for arch, depth in _ZOO:
        ctx = _zoo_ctx(_zoo_flat(arch, depth, init, 0.25), data)
        inputs, unhook = _capture_inputs(ctx.model)
        diag = Diagnostics(DiagnosticsConfig(probe_size=64))
        m = diag.on_fit_start(ctx)
        unhook()
        convs = [l.key for l in diag.layers if l.key.endswith("_conv")]
        measured = [l for l in diag.layers if f"gain_err/{l.key}" in m]
        # normal 0.01 at depth 30 underflows float32 deep down: those layers have no measurement.
        assert len(measured) >= len(diag.layers) - (3 if init == "normal" else 0), (arch, depth)
        for l in measured:
            z = m[f"gain_err/{l.key}"] / _one_draw_sd(l.module, inputs[l.module], kurtosis)
            assert abs(z) < 4.5, (arch, depth, l.key, m[f"gain_err/{l.key}"], z)
            zs.append(z)
        assert m["gain_err_max"] == pytest.approx(max(abs(m[f"gain_err/{l.key}"]) for l in measured))
        assert len(convs) + 1 == len(diag.layers)
    mean = sum(zs) / len(zs)
    sd = math.sqrt(sum((z - mean) ** 2 for z in zs) / (len(zs) - 1))
    assert abs(mean) < 0.4, mean  # 4 standard errors of a mean of ~99 standard normals
    assert 0.7 < sd < 1.3, sd  # the spread is the one theory gives, neither hidden nor exceeded


def _seed_mean_errors(init, width, seeds):
    """{(net, depth, layer index, layer kind, input shape): [gain_meas / gain_pred - 1 per seed]}, from
    forward passes only, each layer's prediction made by predicted_gain on its captured input the way
    Diagnostics.measure makes it."""
    data, errors = _Noise(), {}
    for arch, depth in _ZOO:
        cfg = TrialConfig.from_flat(_zoo_flat(arch, depth, init, width))
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = build_model(cfg.model, num_classes=10)
            seen = []

            def hook(mod, args, out, seen=seen):
                seen.append((mod, args[0].detach(), out.detach()))

            handles = [m.register_forward_hook(hook) for m in model.modules()
                       if isinstance(m, (nn.Conv2d, nn.Linear))]
            with torch.no_grad():
                model(data.x)
            for h in handles:
                h.remove()
            for i, (mod, x, y) in enumerate(seen):
                energy = position_energy(x)
                m2 = float(energy.mean()) if energy is not None else float(x.double().pow(2).mean())
                pred = predicted_gain(mod, tuple(x.shape[2:]), m2, input_energy=energy)
                meas = float(y.double().pow(2).mean()) / m2
                key = (arch, depth, i, type(mod).__name__, tuple(x.shape[1:]))
                errors.setdefault(key, []).append(meas / pred - 1)
    return errors


@pytest.mark.parametrize("seeds", [pytest.param(16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("init", ["xavier", "he"])
def test_seed_mean_gain_is_the_prediction_at_every_layer(init, seeds, _flush_denormals):
    # The expectation itself: the mean over 16 weight draws of every layer's gain_err, at width 1/4 (a
    # full-width run of 10 seeds takes minutes; its numbers are in the comment above _ZOO).
    errors = _seed_mean_errors(init, 0.25, seeds)
    zs = []
    for key, errs in errors.items():
        mean = sum(errs) / seeds
        se = math.sqrt(sum((e - mean) ** 2 for e in errs) / (seeds - 1) / seeds)
        # Within 10% wherever 16 draws resolve 10% (standard error < 0.03: the convs on >= 64
        # channels and 4x4 / 2x2 maps); everywhere within 4.5 standard errors (t with 15 degrees
        # of freedom: 1 in 4000 per layer by chance), the 10-class heads' +-0.1 included.
        if se < 0.03:
            assert abs(mean) < 0.1, (key, mean, se)
        assert abs(mean) < 4.5 * se, (key, mean, se)
        if key[3] == "Conv2d" and key[4][0] > 3:
            zs.append(mean / se)
    # Flat rho gave these z-scores a mean of 1.6 (sd 2.2) over the convs after the first.
    assert abs(sum(zs) / len(zs)) < 0.4, sum(zs) / len(zs)


def test_predicted_std_chain_within_2x_at_every_layer_of_vgg19_he():
    ctx = _zoo_ctx({"model.arch": "vgg19", "model.init": "he", "model.width": 0.25}, _Noise())
    diag = Diagnostics(DiagnosticsConfig(probe_size=64))
    m = diag.on_fit_start(ctx)
    assert len(diag.layers) == 17  # 16 convs + the compact head's one linear layer
    for l in diag.layers:
        pred, meas = m[f"act_std_pred/{l.key}"], m[f"act_std/{l.key}"]
        assert 0.5 < meas / pred < 2.0, (l.key, meas, pred)
    assert m["act_std_err_max"] < 2.0  # 1.47 when written


def test_default_init_chain_includes_biases():
    # PyTorch's default init: the weights shrink the signal ~x0.17 per layer, the U(+-1/sqrt(n)) biases
    # hold it up. Ignoring the biases predicted a deep std ~1e5 too small.
    ctx = _zoo_ctx({"model.arch": "vgg19", "model.init": "default", "model.width": 0.25}, _Noise())
    diag = Diagnostics(DiagnosticsConfig(probe_size=64))
    m = diag.on_fit_start(ctx)
    assert m["act_std_err_max"] < 2.0


def _step_cases():
    return {
        "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-3),
        "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3),
        "sgd_plain_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=5e-3),
        "adam_l2": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=5e-3),
        "adam_amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    }


@pytest.mark.parametrize("name", list(_step_cases()))
def test_update_ratio_is_the_real_step_momentum_decay_and_adam_included(name):
    torch.manual_seed(0)
    model = _mlp()
    opt = _step_cases()[name](model.parameters())
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8)
    ctx = _ctx(model, x, y)
    ctx.optimizer = opt
    diag = Diagnostics(DiagnosticsConfig(probe_size=8))
    init = diag.on_fit_start(ctx)

    # Step 0: the step the optimizer will take on the probe batch's gradient, from its empty state.
    before = model.conv2.weight.detach().clone()
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    first = float((model.conv2.weight.detach() - before).norm() / before.norm())
    assert init["update_ratio/l01_conv"] == pytest.approx(first, rel=1e-4)

    # An "epoch" of three steps on other batches; the hook then reports the last one.
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        xb, yb = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        before = [l.weight.detach().clone() for l in (model.conv1, model.conv2, model.head)]
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    out = diag.on_epoch_end(ctx, {"train_loss": 1.0})
    for key, module, w0 in zip(("l00_conv", "l01_conv", "l02_fc"), (model.conv1, model.conv2, model.head), before):
        real = float((module.weight.detach() - w0).norm() / w0.norm())
        assert out[f"update_ratio/{key}"] == pytest.approx(real, rel=1e-3), key
        assert last_step(opt, module.weight) is not None
    # Momentum makes it differ from lr * ||grad|| / ||W|| (what update_ratio used to be).
    if "momentum" in name or "nesterov" in name:
        assert out["update_ratio/l01_conv"] != pytest.approx(0.1 * out["rel_grad/l01_conv"], rel=0.05)


def _googlenet_ctx(aux_heads):
    flat = {"model.arch": "googlenet", "model.width": 0.125, "model.aux_heads": aux_heads,
            "model.aux_weight": 0.3}
    return _zoo_ctx(flat, _Noise(n=8))


def test_googlenet_main_path_names_do_not_depend_on_aux_heads():
    with_aux, without = Diagnostics(DiagnosticsConfig(probe_size=8)), Diagnostics(DiagnosticsConfig(probe_size=8))
    m_aux = with_aux.on_fit_start(_googlenet_ctx(True))
    without.on_fit_start(_googlenet_ctx(False))
    main = {k: v for k, v in with_aux.layer_map().items() if k.startswith("l")}
    assert main == without.layer_map()
    assert list(main)[-1].endswith("_fc") and main[list(main)[-1]] == "fc"  # the classifier is last
    aux = {k: v for k, v in with_aux.layer_map().items() if k.startswith("a")}
    assert sorted(aux.values()) == sorted(["aux1.conv.conv", "aux1.fc1", "aux1.fc2",
                                           "aux2.conv.conv", "aux2.fc1", "aux2.fc2"])
    assert list(aux) == ["a00_conv", "a01_fc", "a02_fc", "a03_conv", "a04_fc", "a05_fc"]
    assert m_aux["grad_norm/a02_fc"] > 0  # the aux losses are in the probe's backward pass


def test_googlenet_probe_gradient_includes_weighted_aux_losses():
    ctx = _googlenet_ctx(True)
    m = Diagnostics(DiagnosticsConfig(probe_size=8)).on_fit_start(ctx)
    model, (x, y) = ctx.model, ctx.data.probe_batch(8)
    model.train()
    with torch.random.fork_rng():
        logits, aux1, aux2 = model(x)
        loss = sum(w * nn.functional.cross_entropy(o, y) for w, o in ((1.0, logits), (0.3, aux1), (0.3, aux2)))
        loss.backward()
    assert m["grad_norm/l00_conv"] == pytest.approx(float(model.conv1.conv.weight.grad.norm()), rel=1e-4)


# ---- causes checked by intervention (issue #10) ----------------------------------------------------

from sweeper.counterfactual import Evidence, RunResult  # noqa: E402
from sweeper.diagnostics import signal_cause  # noqa: E402


@pytest.mark.parametrize("case,cause", [
    (dict(stds=[1, 1, 1, 1], updates=[1e-4] * 4, dead=[0, 0, 0.6, 0.7]), "dead_relu"),
    (dict(stds=[1, 0.5, 0.3, 0.2], updates=[1e-4] * 4, grads=[1e-4, 1e-2, 0.1, 1]), "vanishing_gradient"),
    (dict(stds=[1, 1e-2, 1e-3, 1e-4], updates=[1e-4] * 4, grads=[0.5, 1, 1, 1]), "vanishing_signal"),
])
def test_signal_cause_follows_the_measurements(case, cause):
    metrics, layers = _fake(**case)
    assert signal_cause(metrics, layers) == cause


def test_a_fake_context_without_training_batches_records_why_nothing_ran():
    ctx = _ctx(_mlp(), torch.randn(8, 3, 8, 8), torch.arange(8))
    diag = Diagnostics(DiagnosticsConfig(probe_size=8, stall_epochs=1))
    diag.on_fit_start(ctx)
    out = diag.on_epoch_end(ctx, {"train_loss": math.log(10)})
    assert "no training batches" in out["cf_skipped"]
    assert out["stall_reason"] == out["stall_reason_measured"]


def test_the_checked_cause_is_decided_once_and_labels_every_later_stalled_epoch(monkeypatch):
    calls = []

    def fake_runs(ctx, cfg):
        calls.append(ctx)
        runs = {"lr_div10": RunResult(True, 1.5, 50), "lr_x10": RunResult(False, 2.3, 50)}
        return Evidence(runs=runs, steps=50, total_steps=100, budget=2000)

    monkeypatch.setattr("sweeper.counterfactual.run_counterfactuals", fake_runs)
    monkeypatch.setattr("sweeper.diagnostics.hook.classify_stall", lambda *a, **k: "lr_too_small")
    ctx = _ctx(_mlp(), torch.randn(8, 3, 8, 8), torch.arange(8))
    diag = Diagnostics(DiagnosticsConfig(probe_size=8, stall_epochs=1))
    diag.on_fit_start(ctx)
    first = diag.on_epoch_end(ctx, {"train_loss": math.log(10)})
    assert ctx.label == ("stalled", "lr_too_high") and first["stall_reason_measured"] == "lr_too_small"
    assert first["cf_evidence"] == "lr/10 escaped chance in 50 steps; lr x10 did not -> lr_too_high " \
                                   "(measured: lr_too_small)"
    ctx.history.append({"train_loss": math.log(10)})
    second = diag.on_epoch_end(ctx, {"train_loss": math.log(10)})
    assert len(calls) == 1 and "cf_evidence" not in second and second["stall_reason"] == "lr_too_high"
    resumed = Diagnostics(DiagnosticsConfig(probe_size=8, stall_epochs=1))  # the verdict is checkpointed
    resumed.load_state_dict(diag.state_dict())
    resumed.on_epoch_end(ctx, {"train_loss": math.log(10)})
    assert len(calls) == 1 and ctx.label == ("stalled", "lr_too_high")


# ---- the probe's statistics, written for speed (issue #9), against their plain forms -------------

from sweeper.diagnostics import stats  # noqa: E402


def _plain_moments(y):
    """mean, var, E[y^2] and sensitivity the straightforward way, in float64 (var: float32's var())."""
    d = y.double()
    rms = float(d.pow(2).mean().sqrt())
    sens = float(d.std(dim=0).mean()) / rms if rms > 0 else 0.0
    return float(d.mean()), float(y.var()), float(d.pow(2).mean()), sens


@pytest.mark.parametrize("scale", [1.0, 3e-3, 1e-12, 1e-25, 1e15, 1e19, 0.0])
def test_fast_probe_statistics_match_their_plain_forms(scale):
    # Magnitudes a probe meets: healthy, vanished (1e-25: squares below float32's range, var() = 0),
    # huge (1e19: squares overflow float32), all zero; one unit ignores its input (sensitivity 0 there)
    # and the units' means differ (the between-unit part of the variance).
    torch.manual_seed(0)
    y = torch.randn(16, 4, 5, 5) + torch.linspace(-2.0, 3.0, 4)[:, None, None]
    y[:, 0] = 1.5
    y = y * scale
    mean, var, m2, sens = stats.output_moments(y)
    p_mean, p_var, p_m2, p_sens = _plain_moments(y)
    assert mean == pytest.approx(p_mean, rel=1e-5, abs=1e-6 * scale)
    assert var == pytest.approx(p_var, rel=1e-5)
    assert m2 == pytest.approx(p_m2, rel=1e-5)
    assert stats.second_moment(y) == pytest.approx(p_m2, rel=1e-5)
    assert sens == pytest.approx(p_sens, rel=1e-5, abs=1e-7)
    assert stats.std(y) == pytest.approx(float(y.double().std()), rel=1e-5)
    energy = position_energy(y)
    assert energy.flatten().tolist() == pytest.approx(y.double().pow(2).mean(dim=(0, 1)).flatten().tolist(),
                                                     rel=1e-5)
    r = torch.relu(y - 0.5 * scale)
    zero, dead = stats.relu_fractions(*stats.relu_counts(r))
    assert zero == pytest.approx(float((r == 0).double().mean()), abs=1e-9)
    assert dead == pytest.approx(float((r.amax(dim=(0, 2, 3)) == 0).double().mean()), abs=1e-9)


def test_fast_probe_statistics_keep_the_plain_forms_on_nonfinite_and_single_examples():
    y = torch.randn(8, 3, 4, 4)
    y[2, 1, 0, 0] = math.nan
    mean, var, m2, sens = stats.output_moments(y)
    assert math.isnan(mean) and math.isnan(var) and m2 == math.inf and sens == 0.0
    assert math.isnan(stats.std(y))
    r = torch.relu(torch.randn(8, 3, 4, 4))
    r[0, 0, 0, 0] = math.nan  # its unit also has positive values: alive, as (r > 0).any() says
    zero, dead = stats.relu_fractions(*stats.relu_counts(r))
    assert dead == 0.0 and zero == pytest.approx(float((r <= 0).double().mean() + 1 / r.numel()))
    one = torch.randn(1, 3, 4, 4)  # one example: no spread across examples
    assert stats.output_moments(one)[3] == 0.0 and stats.output_moments(one)[1] == pytest.approx(float(one.var()))


@pytest.mark.parametrize("epochs", [1, 2, 5])
def test_a_trial_shorter_than_stall_epochs_at_chance_throughout_is_stalled_at_its_end(epochs):
    """The hook and sweeper.outcomes judge a short trial alike. A width-1/8 VGG-11 with N(0, 0.01)
    init, 1 and 2 epochs: `debug` said completed while the sweep's record said stalled with no cause."""
    from sweeper.outcomes import classify

    torch.manual_seed(0)
    model = _mlp()
    ctx = _ctx(model, torch.randn(8, 3, 8, 8), torch.arange(8))
    ctx.cfg = TrialConfig.from_flat({"epochs": epochs})
    diag = Diagnostics(DiagnosticsConfig(probe_size=8, stall_epochs=3, counterfactuals=False))
    diag.on_fit_start(ctx)
    ln_c = math.log(10)
    for ctx.epoch in range(1, epochs + 1):
        metrics = {"epoch": ctx.epoch, "train_loss": ln_c, "val_accuracy": 0.1, "chance_loss": ln_c}
        out = diag.on_epoch_end(ctx, metrics)
        metrics.update(out)
        ctx.history.append(metrics)
        at_end = ctx.epoch == epochs
        # Before the end only stall_epochs in a row name a stall; at the end the whole run does.
        assert out["stalled"] == (1.0 if ctx.epoch >= 3 or at_end else 0.0), ctx.epoch
    recorded = classify(ctx.history, stall_epochs=3)
    assert recorded.outcome == "stalled" and recorded.cause == out["stall_reason"] is not None
