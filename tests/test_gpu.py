"""On a CUDA device: a training epoch never makes the host wait for the GPU, the epoch's draws arrive
bit for bit, and the epoch reports its GPU memory peak. Skipped where torch sees no CUDA device."""

import math
import os

import pytest
import torch

import sweeper.train as train_module
from sweeper.config import DataConfig, TrialConfig
from sweeper.data import DeviceData, load_splits
from sweeper.train import fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Read when the process first uses cuBLAS, which may be a test before the deterministic ones.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _cfg(**flat) -> TrialConfig:
    base = {"data.name": "digits", "model.arch": "smallcnn", "model.width": 0.25,
            "model.batch_norm": True, "data.batch_size": 64, "data.limit": 1024, "device": "cuda",
            "optim.lr": 0.05, "optim.schedule": "constant", "diagnostics.enabled": False, "epochs": 1}
    base.update(flat)
    return TrialConfig.from_flat(base)


def _sync_free(fn):
    """fn under torch.cuda.set_sync_debug_mode('error'): any synchronising call inside raises."""
    def wrapped(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return wrapped


@pytest.mark.parametrize("flat", [
    {},  # SGD, bf16 autocast, channels_last: the defaults
    {"optim.name": "adam", "amp": False, "channels_last": False},
    {"model.arch": "googlenet", "model.width": 0.125, "data.name": "synthetic",  # auxiliary losses
     "data.synthetic_size": 600, "data.flip": True},
    {"optim.decay_norm_bias": False, "deterministic": True},
])
def test_a_training_epoch_and_its_evaluations_never_synchronise(monkeypatch, flat):
    # Only the steps are wrapped; the once-per-epoch reads (the sums, the divergence check, timing)
    # happen outside them, as they should.
    monkeypatch.setattr(train_module, "_train_epoch", _sync_free(train_module._train_epoch))
    monkeypatch.setattr(train_module, "_eval_totals", _sync_free(train_module._eval_totals))
    result = fit(_cfg(**flat))
    assert result.outcome == "completed" and math.isfinite(result.last["train_loss"])
    assert result.last["gpu_memory_peak_mb"] > 0
    try:
        torch.cuda.utilization()
    except Exception:  # no pynvml / NVML: the metric is left out, not faked
        assert "gpu_utilization" not in result.last
    else:
        assert 0 <= result.last["gpu_utilization"] <= 100


def test_cuda_batches_equal_cpu_batches_under_the_same_seed():
    """The CPU generator's draws cross in one packed, pinned, non-blocking copy and arrive bit for
    bit: the same order, crops, flips and lighting as on the CPU (pixels to float rounding)."""
    cfg = DataConfig(name="synthetic", synthetic_size=400, limit=203, batch_size=50, flip=True,
                     crop_padding=4, color_shift=0.1)
    splits = load_splits(cfg, seed=0)
    cpu, gpu = DeviceData(splits, cfg), DeviceData(splits, cfg, device="cuda")
    d_cpu = cpu.draw_epoch(torch.Generator().manual_seed(1))
    d_gpu = gpu.draw_epoch(torch.Generator().manual_seed(1))
    for name in ("perm", "oy", "ox", "mirror", "alpha"):
        assert torch.equal(getattr(d_gpu, name).cpu(), getattr(d_cpu, name)), name
    batches_cpu = list(cpu.train_batches(torch.Generator().manual_seed(2)))
    batches_gpu = list(gpu.train_batches(torch.Generator().manual_seed(2)))
    assert len(batches_cpu) == len(batches_gpu) == 5
    for (xc, yc), (xg, yg) in zip(batches_cpu, batches_gpu):
        assert torch.equal(yg.cpu(), yc)
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-5)


def test_deterministic_mode_gives_bit_identical_cuda_runs():
    cfg = _cfg(**{"epochs": 2, "deterministic": True})
    a, b = fit(cfg).history, fit(cfg).history
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss")
    assert [[h.get(k) for k in keys] for h in a] == [[h.get(k) for k in keys] for h in b]


def test_diagnostics_record_a_bf16_channels_last_training_step_like_the_fixed_probe():
    """The default epoch_probe records a training step run under bf16 autocast and channels_last:
    its statistics are finite, and training goes as it does with the fixed probe."""
    from sweeper.diagnostics import Diagnostics

    cfg = _cfg(**{"model.arch": "vgg11", "model.width": 0.125, "model.batch_norm": False,
                  "epochs": 2, "diagnostics.enabled": True})
    step = fit(cfg, hooks=[Diagnostics(cfg.diagnostics)]).history
    fixed_cfg = cfg.replace(**{"diagnostics.epoch_probe": "fixed"})
    fixed = fit(fixed_cfg, hooks=[Diagnostics(fixed_cfg.diagnostics)]).history
    assert [h["train_loss"] for h in step] == pytest.approx([h["train_loss"] for h in fixed], rel=1e-3)
    for h in step:
        assert h["nonfinite"] == 0.0
        assert all(math.isfinite(h[f"act_std/l0{i}_conv"]) and h[f"act_std/l0{i}_conv"] > 0 for i in range(8))


@pytest.mark.parametrize("flat", [
    {"optim.name": "sgd"},
    {"optim.name": "adam", "optim.decay_norm_bias": False},
    {"model.arch": "vgg11", "model.width": 0.125, "diagnostics.enabled": True},  # hook state too
])
def test_a_cuda_trial_resumes_from_its_checkpoint_bit_for_bit(tmp_path, flat):
    """A CUDA trial's checkpoint resumes (the generators' states were once mapped onto the GPU with
    the weights, and set_state refused them: every resume of a GPU trial failed) and continues to
    exactly the metrics of the run that never stopped."""
    from sweeper.diagnostics import trial_hooks

    cfg = _cfg(**{"epochs": 2, "deterministic": True, **flat})

    def report(metrics, save):
        if metrics["epoch"] == 1:
            save(tmp_path)

    whole = fit(cfg, report=report, hooks=trial_hooks(cfg)).history
    resumed = fit(cfg, resume_from=tmp_path, hooks=trial_hooks(cfg)).history
    keys = ("train_loss", "val_loss", "val_accuracy", "test_loss") + (
        ("rel_change/l01_conv",) if cfg.diagnostics.enabled else ())
    assert [[h.get(k) for k in keys] for h in resumed] == [[h.get(k) for k in keys] for h in whole]


def test_compile_reduce_overhead_trains_evaluates_and_resumes_on_cuda(tmp_path):
    """compile='reduce-overhead' (CUDA graphs, one per batch shape) through a whole trial: training,
    the short last batch, validation, test, the diagnostics probe on the eager model, a checkpoint
    and a resume; it learns as the eager run does."""
    from sweeper.diagnostics import Diagnostics

    cfg = _cfg(**{"epochs": 3, "compile": "reduce-overhead", "diagnostics.enabled": True,
                  "data.limit": 1000})  # 1000 is not a multiple of the batch: a short last step

    def report(metrics, save):
        if metrics["epoch"] == 2:
            save(tmp_path)

    graphed = fit(cfg, report=report, hooks=[Diagnostics(cfg.diagnostics)]).history
    eager = fit(cfg.replace(compile=False), hooks=[Diagnostics(cfg.diagnostics)]).history
    assert [h["outcome"] for h in graphed] == ["running", "running", "completed"]
    assert graphed[-1]["val_accuracy"] > 0.5 and eager[-1]["val_accuracy"] > 0.5
    assert graphed[-1]["train_loss"] == pytest.approx(eager[-1]["train_loss"], rel=0.5, abs=0.05)
    assert math.isfinite(graphed[-1]["test_loss"]) and math.isfinite(graphed[-1]["act_std/l00_conv"])
    resumed = fit(cfg, resume_from=tmp_path, hooks=[Diagnostics(cfg.diagnostics)]).history
    assert len(resumed) == 3 and resumed[-1]["outcome"] == "completed"
    assert [h["train_loss"] for h in resumed[:2]] == [h["train_loss"] for h in graphed[:2]]
    assert math.isfinite(resumed[-1]["val_loss"])
