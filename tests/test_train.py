"""The training loop: it learns, it stalls where the theory says, it resumes exactly, it never crashes
a sweep on divergence. Narrow (width 1/8) VGGs on the embedded digits keep each test to seconds."""

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch

import sweeper.train as train_module
from sweeper.config import ConfigError, TrialConfig
from sweeper.data import DeviceData
from sweeper.diagnostics import Diagnostics
from sweeper.models import build_model
from sweeper.train import fit

LN10 = math.log(10)


def _cfg(**flat) -> TrialConfig:
    base = {"data.name": "digits", "model.width": 0.125, "data.batch_size": 64, "device": "cpu",
            "optim.schedule": "constant", "diagnostics.enabled": False}
    base.update(flat)
    return TrialConfig.from_flat(base)


def test_vgg11_bn_he_learns_digits_to_90_percent_within_5_epochs():
    cfg = _cfg(**{"model.arch": "vgg11", "model.batch_norm": True, "model.init": "he",
                  "optim.lr": 0.05, "epochs": 5})
    reports = []
    result = fit(cfg, report=lambda m, save: reports.append(m))
    assert result.outcome == "completed"
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4, 5]
    assert max(r["val_accuracy"] for r in reports) >= 0.90, [r["val_accuracy"] for r in reports]
    last = reports[-1]
    for key in ("train_loss", "val_loss", "train_top1_error", "val_top1_error", "val_top5_error",
                "lr", "epoch_seconds", "images_per_second", "test_accuracy"):
        assert math.isfinite(last[key]), key
    assert last["val_top5_error"] <= last["val_top1_error"]
    assert last["outcome"] == "completed" and reports[0]["outcome"] == "running"


def _conv_grad_to_weight_ratios(metrics):
    return {k.split("/")[1]: metrics[k] for k in metrics
            if k.startswith("rel_grad/") and k.endswith("_conv")}


def test_plain_vgg16_with_normal_init_stalls_at_chance_and_nothing_moves():
    cfg = _cfg(**{"model.arch": "vgg16", "model.init": "normal", "optim.lr": 0.01, "epochs": 3,
                  "diagnostics.enabled": True})
    reports = []
    result = fit(cfg, report=lambda m, save: reports.append(m),
                 hooks=[Diagnostics(cfg.diagnostics)])
    assert abs(result.initial["initial_loss"] - LN10) < 1e-4  # the net outputs nothing at init
    for r in reports:
        assert abs(r["train_loss"] - LN10) < 0.05, r["train_loss"]
    for metrics in (result.initial, reports[-1]):
        ratios = _conv_grad_to_weight_ratios(metrics)
        assert len(ratios) == 13  # VGG-16 (D) has 13 convs
        assert all(v < 1e-6 for v in ratios.values()), ratios
    assert result.outcome == "stalled"
    assert reports[-1]["stall_reason"] in ("vanishing_signal", "vanishing_gradient")


def test_same_net_with_he_and_batchnorm_leaves_the_chance_band():
    cfg = _cfg(**{"model.arch": "vgg16", "model.init": "he", "model.batch_norm": True,
                  "optim.lr": 0.05, "epochs": 3})
    result = fit(cfg)
    assert result.last["train_loss"] < LN10 - 0.05
    assert result.outcome == "completed"


def test_same_seed_same_metrics_and_other_seed_differs():
    cfg = _cfg(**{"model.arch": "smallcnn", "model.batch_norm": True, "optim.lr": 0.05,
                  "epochs": 2, "data.limit": 512})
    a, b = fit(cfg).history, fit(cfg).history
    c = fit(cfg.replace(seed=1)).history
    keys = ("train_loss", "val_loss", "val_accuracy")
    assert [[h[k] for k in keys] for h in a] == [[h[k] for k in keys] for h in b]
    assert [h["train_loss"] for h in a] != [h["train_loss"] for h in c]


@pytest.mark.parametrize("schedule", ["plateau", "cosine"])
def test_resume_mid_way_equals_an_uninterrupted_run(tmp_path, schedule):
    cfg = _cfg(**{"model.arch": "vgg11", "model.batch_norm": True, "optim.lr": 0.05,
                  "optim.schedule": schedule, "optim.plateau_patience": 0, "epochs": 4,
                  "data.limit": 512, "model.dropout": 0.5, "model.head": "paper",
                  "diagnostics.enabled": True})
    straight = fit(cfg, hooks=[Diagnostics(cfg.diagnostics)]).history

    ckpt = tmp_path / "ckpt"

    def stop_after_two(metrics, save):
        if metrics["epoch"] == 2:
            save(ckpt)
            raise KeyboardInterrupt  # the process dies after epoch 2

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, report=stop_after_two, hooks=[Diagnostics(cfg.diagnostics)])
    resumed = fit(cfg, resume_from=ckpt, hooks=[Diagnostics(cfg.diagnostics)]).history
    assert len(resumed) == 4
    skip = ("epoch_seconds", "images_per_second")
    for s, r in zip(straight, resumed):
        assert {k: v for k, v in s.items() if k not in skip} == \
               {k: v for k, v in r.items() if k not in skip}


@pytest.mark.parametrize("epoch_probe", ["training_step", "fixed"])
def test_diagnostics_do_not_change_the_trajectory(epoch_probe, monkeypatch):
    cfg = _cfg(**{"model.arch": "vgg11", "model.batch_norm": True, "optim.lr": 0.05,
                  "epochs": 2, "data.limit": 256, "model.head": "paper",
                  "diagnostics.epoch_probe": epoch_probe})
    plain = fit(cfg).history
    probes = []
    original = DeviceData.probe_batch
    monkeypatch.setattr(DeviceData, "probe_batch", lambda self, n: probes.append(n) or original(self, n))
    probed = fit(cfg, hooks=[Diagnostics(cfg.diagnostics)]).history
    assert [h["train_loss"] for h in plain] == [h["train_loss"] for h in probed]
    assert all(f"dead_frac/l0{i}_conv" in h for h in probed for i in range(8))
    # Step 0 reads the probe batch (discovery, the probe pass, the theory chain, the initial loss);
    # 'training_step' epochs read it no more, 'fixed' ones once each.
    at_start = len(probes) - (2 if epoch_probe == "fixed" else 0)
    assert at_start == 4 and len(probes) == at_start + (2 if epoch_probe == "fixed" else 0)


def test_non_finite_loss_ends_the_trial_as_diverged_without_raising():
    cfg = _cfg(**{"model.arch": "vgg11", "model.init": "normal", "model.init_std": 0.5,
                  "optim.lr": 10.0, "epochs": 5, "data.limit": 256})
    result = fit(cfg)
    assert result.outcome == "diverged"
    assert result.epochs < 5
    assert "non-finite" in result.reason
    assert result.last["outcome"] == "diverged"


# ---- no host reads in a step; the trainer options --------------------------------------------------


def test_importing_the_training_loop_imports_neither_ray_nor_mlflow():
    code = ("import sys, sweeper.train; bad = [m for m in ('ray', 'mlflow') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _tiny(**flat) -> TrialConfig:
    return _cfg(**{"model.arch": "smallcnn", "model.batch_norm": True, "optim.lr": 0.05, "epochs": 1,
                   "data.limit": 256, "data.batch_size": 32, **flat})


class _HostReads:
    """Counts what would make the host wait for a CUDA device, while active: reading a tensor's value
    (.item, .tolist, float/int/bool of a tensor) and creating or moving a tensor from host data."""

    READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self, monkeypatch):
        self.active, self.reads, self.moves = False, [], []
        for name in self.READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original, name, self.reads))
        monkeypatch.setattr(torch.Tensor, "to", self._wrap(torch.Tensor.to, "to", self.moves))
        monkeypatch.setattr(torch, "tensor", self._wrap(torch.tensor, "tensor", self.moves))

    def _wrap(self, original, name, log):
        def wrapper(*args, **kwargs):
            if self.active:
                log.append(name)
            return original(*args, **kwargs)
        return wrapper

    def during(self, fn):
        def wrapped(*args, **kwargs):
            self.active = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.active = False
        return wrapped


@pytest.mark.parametrize("arch", ["smallcnn", "googlenet"])  # googlenet: auxiliary losses in the step
def test_training_and_evaluation_steps_never_read_a_tensor_on_the_host(monkeypatch, arch):
    """The CPU stand-in for CUDA's sync-debug mode (tests/test_gpu.py): inside the epoch's steps no
    tensor value is read on the host, and no tensor is made or moved from host data per step."""
    steps = 256 // 32
    spy = _HostReads(monkeypatch)
    monkeypatch.setattr(train_module, "_train_epoch", spy.during(train_module._train_epoch))
    monkeypatch.setattr(train_module, "_eval_totals", spy.during(train_module._eval_totals))
    width = 0.125 if arch == "smallcnn" else 0.0625
    result = fit(_tiny(**{"model.arch": arch, "model.width": width}))
    assert result.outcome == "completed" and math.isfinite(result.last["train_loss"])
    assert spy.reads == []
    # The epoch's draws move once (one call per kind on CPU, one packed copy on CUDA), not per step.
    assert len(spy.moves) < steps, spy.moves


@pytest.mark.parametrize("classes", [10, 3])  # 3: fewer classes than top-5, top-k is all of them
def test_epoch_sums_count_top1_top5_and_the_loss_as_a_per_example_reference_does(classes):
    """The device sums a pass keeps (examples, loss x batch, per-rank hits) give the accuracy and
    top-5 error an example-by-example count gives, over uneven batches and a tie-heavy batch."""
    gen = torch.Generator().manual_seed(0)
    criterion = torch.nn.CrossEntropyLoss()
    totals = train_module._Totals()
    ref_loss, ref_top1, ref_topk, n = 0.0, 0, 0, 0
    k = min(5, classes)
    batches = [torch.randn(b, classes, generator=gen) for b in (32, 32, 7)]
    batches.append(torch.zeros(5, classes))  # every class tied
    for logits in batches:
        y = torch.randint(0, classes, (logits.shape[0],), generator=gen)
        loss = criterion(logits, y)
        totals.add(logits, y, loss)
        ranked = logits.topk(k, dim=1).indices.tolist()
        ref_top1 += sum(int(r[0] == t) for r, t in zip(ranked, y.tolist()))
        ref_topk += sum(int(t in r) for r, t in zip(ranked, y.tolist()))
        ref_loss += float(loss) * logits.shape[0]
        n += logits.shape[0]
    summary = train_module._summarise(totals)
    assert summary["examples"] == n == 76
    assert summary["accuracy"] == ref_top1 / n and summary["top1_error"] == 1 - ref_top1 / n
    assert summary["top5_error"] == 1 - ref_topk / n
    assert summary["loss"] == pytest.approx(ref_loss / n, rel=1e-6)
    if classes == 3:
        assert summary["top5_error"] == 0.0
    assert train_module._summarise(None)["examples"] == 0


def test_decay_norm_bias_false_puts_norm_and_bias_parameters_in_a_group_without_decay():
    cfg = _tiny(**{"model.arch": "vgg11", "optim.weight_decay": 5e-4})
    model = build_model(cfg.model, num_classes=10)
    (group,) = train_module._optimizer(cfg, model).param_groups
    assert group["weight_decay"] == 5e-4 and len(group["params"]) == len(list(model.parameters()))

    decayed, undecayed = train_module._optimizer(
        cfg.replace(**{"optim.decay_norm_bias": False}), model).param_groups
    assert decayed["weight_decay"] == 5e-4 and undecayed["weight_decay"] == 0.0
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(any(p is m.weight for p in undecayed["params"]) for m in norms)
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert {id(m.weight) for m in convs} == {id(p) for p in decayed["params"]}
    assert all(any(p is m.bias for p in undecayed["params"]) for m in convs if m.bias is not None)
    assert len(decayed["params"]) + len(undecayed["params"]) == len(list(model.parameters()))

    adam = train_module._optimizer(cfg.replace(**{"optim.decay_norm_bias": False,
                                                  "optim.name": "adam"}), model)
    assert [g["weight_decay"] for g in adam.param_groups] == [5e-4, 0.0]


def test_decay_norm_bias_changes_the_trajectory_and_resumes_exactly(tmp_path):
    cfg = _tiny(**{"optim.weight_decay": 0.05, "epochs": 2, "optim.decay_norm_bias": False})
    straight = fit(cfg).history
    assert straight[-1]["train_loss"] != fit(cfg.replace(**{"optim.decay_norm_bias": True})).history[-1][
        "train_loss"]

    def stop_after_one(metrics, save):
        save(tmp_path)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, report=stop_after_one)
    resumed = fit(cfg, resume_from=tmp_path).history
    assert [h["val_loss"] for h in resumed] == [h["val_loss"] for h in straight]


def test_compile_runs_training_and_evaluation_through_the_compiled_module(monkeypatch):
    """Wiring, without paying for a real compile (see the slow test below): the steps and evaluations
    call the compiled wrapper; the probe, hooks and checkpoint keys still see the model itself."""
    compiled = []

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += 1
            return self.inner(x)

    def fake_compile(model, *args, **kwargs):
        compiled.append(Counting(model))
        return compiled[-1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    watched = []
    original_watch = Diagnostics.watch_step
    monkeypatch.setattr(Diagnostics, "watch_step", lambda self, ctx, y: watched.append(len(y)) or
                        original_watch(self, ctx, y))
    # probe_size = the batch: without compile, each epoch's last step would be recorded.
    cfg = _tiny(**{"diagnostics.enabled": True, "diagnostics.probe_size": 32})
    result = fit(cfg.replace(compile=True), hooks=[Diagnostics(cfg.diagnostics)])
    assert len(compiled) == 1
    assert compiled[0].calls == 256 // 32 + 2 + 1  # train steps + val and test (256 per eval batch)
    # An eager step would round differently from the compiled ones: the epochs keep the probe pass.
    assert watched == []
    assert any(k.startswith("act_std/") for k in result.last)  # diagnostics hooks still fire
    assert fit(cfg, hooks=[Diagnostics(cfg.diagnostics)]).epochs == 1 and watched == [32]
    assert "layer/l00_conv" in result.initial and "_orig_mod" not in result.initial["layer/l00_conv"]
    assert fit(cfg).history[0]["train_loss"] == result.history[0]["train_loss"]
    assert compiled[0].calls == 256 // 32 + 3  # fit without the option never compiled


@pytest.mark.slow
def test_compile_really_compiles_and_trains_the_same_on_cpu():
    """A real torch.compile (inductor, C++ on CPU): about 30 s on 2 cores, for a small net."""
    cfg = _tiny(**{"epochs": 2})
    eager, compiled = fit(cfg).history, fit(cfg.replace(compile=True)).history
    # Compiled kernels round differently, and rounding compounds: after one epoch the two agree to
    # 1e-4; after two, this small net's validation loss on 144 images moved 2% with one torch thread
    # (0.2% between eager runs on 1 and 2 threads), while the training losses still agree to 1e-4.
    assert compiled[0]["train_loss"] == pytest.approx(eager[0]["train_loss"], rel=1e-4)
    assert compiled[0]["val_loss"] == pytest.approx(eager[0]["val_loss"], rel=1e-4)
    assert compiled[1]["train_loss"] == pytest.approx(eager[1]["train_loss"], rel=1e-3)
    assert compiled[1]["val_loss"] == pytest.approx(eager[1]["val_loss"], rel=0.05)


def test_deterministic_mode_holds_during_fit_only_and_same_seed_gives_identical_history(monkeypatch):
    seen = []
    original = train_module._train_epoch

    def recording(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled(),
                     torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark))
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "_train_epoch", recording)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cfg = _tiny(**{"epochs": 2, "deterministic": True, "model.arch": "vgg11", "model.head": "paper"})
    a, b = fit(cfg).history, fit(cfg).history
    assert seen == [(True, True, True, False)] * 4
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    skip = ("epoch_seconds", "images_per_second")
    assert [{k: v for k, v in h.items() if k not in skip} for h in a] == \
           [{k: v for k, v in h.items() if k not in skip} for h in b]
    # Restored afterwards: a deterministic trial does not change the process for the next one.
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    fit(cfg.replace(deterministic=False))
    assert seen[-1][0] is False


def test_new_options_default_off_and_are_validated():
    cfg = TrialConfig()
    assert (cfg.compile, cfg.deterministic, cfg.optim.decay_norm_bias) == (False, False, True)
    flat = TrialConfig.from_flat({"compile": "true", "deterministic": "on",
                                  "optim.decay_norm_bias": "false"})
    assert (flat.compile, flat.deterministic, flat.optim.decay_norm_bias) == (True, True, False)
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_flat({"compile": "maybe", "deterministic": 2, "optim.decay_norm_bias": "x"})
    allowed = "is not one of: false, true, 'reduce-overhead' (torch.compile's CUDA-graph mode)"
    assert len(info.value.problems) == 3 and f"compile='maybe' {allowed}" in str(info.value)
    built = TrialConfig(compile="yes")  # built directly, not through from_flat
    assert built.problems() == [f"compile='yes' {allowed}"]
    assert TrialConfig(compile=1).problems() == [f"compile=1 {allowed}"]  # not a bool, though == True


def test_compile_takes_a_boolean_or_the_cuda_graph_mode_from_a_space_or_the_command_line():
    for given, expected in [("reduce-overhead", "reduce-overhead"), ("on", True), ("false", False),
                            (1, True), (0, False), (True, True)]:
        cfg = TrialConfig.from_flat({"compile": given})
        assert cfg.compile == expected and type(cfg.compile) is type(expected), given
        assert TrialConfig.from_flat(cfg.to_flat()) == cfg  # survives the trip through a flat config
    for bad in ["max-autotune", "", 2, 0.5, None]:
        with pytest.raises(ConfigError, match=f"compile={bad!r} is not one of: false, true, "):
            TrialConfig.from_flat({"compile": bad})


def test_compile_reduce_overhead_asks_torch_for_cuda_graphs_with_static_shapes(monkeypatch):
    calls = []

    def fake_compile(model, *args, **kwargs):
        calls.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    fit(_tiny(compile="reduce-overhead"))
    fit(_tiny(compile=True))
    assert calls == [{"mode": "reduce-overhead", "dynamic": False}, {}]


def test_the_initial_loss_of_a_batchnorm_net_is_the_first_steps_not_its_plain_twins():
    """In eval mode a fresh BN (running mean 0, variance 1) is an identity: a Xavier VGG-19 with BN
    reported 2.3026 at step 0 -- its plain twin's loss -- while its first step saw 3.79."""
    import copy
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Dropout(0.5), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10))
    with torch.no_grad():
        model[0].weight.mul_(0.01)  # tiny pre-BN outputs: the plain path gives ~ln C, BN rescales them
        model[5].weight.mul_(20.0)
    x, y = torch.randn(16, 3, 8, 8), torch.arange(16) % 10
    ctx = SimpleNamespace(model=model, criterion=torch.nn.CrossEntropyLoss(),
                          cfg=SimpleNamespace(diagnostics=SimpleNamespace(probe_size=16)),
                          data=SimpleNamespace(probe_batch=lambda n: (x[:n], y[:n])))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    loss = train_module._probe_loss(ctx, contextlib.nullcontext)

    first_step = copy.deepcopy(model).train()
    first_step[3].p = 0.0  # what the first step computes, less dropout's noise
    with torch.no_grad():
        expected = float(torch.nn.functional.cross_entropy(first_step(x), y))
        plain = float(torch.nn.functional.cross_entropy(copy.deepcopy(model).eval()(x), y))
    assert loss == pytest.approx(expected, rel=1e-6)
    assert abs(plain - loss) > 0.5  # the eval-mode number this replaces was another net's
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN buffers too
    assert torch.equal(rng, torch.get_rng_state()) and model.training
