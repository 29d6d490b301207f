"""The training loop: it learns, it stalls where the theory says, it resumes exactly, it never crashes
a sweep on divergence. Narrow (width 1/8) VGGs on the embedded digits keep each test to seconds."""

import math

import pytest
import torch

from sweeper.config import TrialConfig
from sweeper.diagnostics import Diagnostics
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


def test_diagnostics_do_not_change_the_trajectory():
    cfg = _cfg(**{"model.arch": "vgg11", "model.batch_norm": True, "optim.lr": 0.05,
                  "epochs": 2, "data.limit": 256, "model.head": "paper"})
    plain = fit(cfg).history
    probed = fit(cfg, hooks=[Diagnostics(cfg.diagnostics)]).history
    assert [h["train_loss"] for h in plain] == [h["train_loss"] for h in probed]


def test_non_finite_loss_ends_the_trial_as_diverged_without_raising():
    cfg = _cfg(**{"model.arch": "vgg11", "model.init": "normal", "model.init_std": 0.5,
                  "optim.lr": 10.0, "epochs": 5, "data.limit": 256})
    result = fit(cfg)
    assert result.outcome == "diverged"
    assert result.epochs < 5
    assert "non-finite" in result.reason
    assert result.last["outcome"] == "diverged"
