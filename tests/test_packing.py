"""resources='auto': GPU shares from a measured training step, cached per GPU kind and config shape."""

import json
import subprocess
import sys

import pytest
import torch

from sweeper.config import ConfigError
from sweeper.packing import CONTEXT_BYTES, PackingPlan, gpu_fraction, memory_key, trials_per_gpu
from sweeper.spaces import Sweep, trial_resources
from sweeper.config import TrialConfig

GiB = 2**30


def test_as_many_trials_share_a_gpu_as_fit_never_more():
    # 80 GiB card, 10% headroom: 72 GiB for trials of 9 GiB + a 0.5 GiB context each -> 7.
    assert trials_per_gpu(9 * GiB, 80 * GiB) == 7
    assert 7 * (9 * GiB + CONTEXT_BYTES) <= 80 * GiB * 0.9 < 8 * (9 * GiB + CONTEXT_BYTES)
    assert trials_per_gpu(100 * GiB, 80 * GiB) == 1  # needs the whole card: gets it
    for n in range(1, 17):
        assert n * gpu_fraction(n) <= 1.0 and (n + 1) * gpu_fraction(n) > 1.0


def test_the_plan_measures_each_shape_once_and_caches_it_per_gpu_kind(tmp_path):
    calls = []

    def fake_measure(flat):
        calls.append(flat)
        return {"peak_bytes": (4 if flat.get("model.arch") == "vgg19" else 2) * GiB}

    cache = tmp_path / "gpu_memory.json"
    plan = PackingPlan("NVIDIA H100", 80 * GiB, fake_measure, cache=cache)
    vgg19 = {"model.arch": "vgg19", "optim.lr": 0.1, "data.batch_size": 128}
    assert plan.fraction(vgg19) == gpu_fraction(trials_per_gpu(4 * GiB, 80 * GiB))
    assert plan.fraction({**vgg19, "optim.lr": 0.001, "model.init": "normal"}) == plan.fraction(vgg19)
    assert len(calls) == 1  # lr and init do not change a step's memory
    plan.fraction({**vgg19, "data.batch_size": 256})
    plan.fraction({"model.arch": "vgg11"})
    assert len(calls) == 3
    assert len(json.loads(cache.read_text())) == 3
    again = PackingPlan("NVIDIA H100", 80 * GiB, fake_measure, cache=cache)
    again.fraction(vgg19)
    assert len(calls) == 3  # from the cache
    other = PackingPlan("NVIDIA A10G", 24 * GiB, fake_measure, cache=cache)
    other.fraction(vgg19)
    assert len(calls) == 4  # another GPU kind is measured again
    assert "vgg19 (batch 128): 4.00 GiB per step" in plan.describe(vgg19)


def test_memory_key_fills_defaults():
    assert memory_key({"model.arch": "vgg16"}, "X") == memory_key(
        {"model.arch": "vgg16", "data.batch_size": TrialConfig().data.batch_size}, "X")


def test_auto_resources_is_a_valid_sweep_setting_and_a_typo_is_named():
    sweep = Sweep(name="s", space={"model.arch": "smallcnn"}, resources="auto")
    assert trial_resources(sweep, TrialConfig.from_flat({"model.arch": "smallcnn"})) == \
        {"cpu": 1.0, "gpu": 1.0}
    with pytest.raises(ConfigError) as err:
        Sweep(name="s", space={"model.arch": "smallcnn"}, resources="autoo")
    assert "or 'auto' (GPU shares from a measured memory probe)" in err.value.problems[0]


def _probe_in_a_fresh_process(flat):
    # As the tuner runs it: a Ray task whose worker exits after it (max_calls=1). In a process that
    # already trained, cuBLAS's workspaces (32 MiB under CUBLAS_WORKSPACE_CONFIG=:4096:8) exist
    # before the probe and go uncounted: on an H200 a second in-process probe at batch 128 read less
    # (219 MB) than a first one at batch 32 (227 MB).
    code = ("import json, sys; from sweeper.packing import measure_peak_bytes; "
            "print('RESULT ' + json.dumps(measure_peak_bytes(json.loads(sys.argv[1]))))")
    run = subprocess.run([sys.executable, "-c", code, json.dumps(flat)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.split("RESULT ")[-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_real_probe_on_a_gpu_grows_with_the_batch():
    small = _probe_in_a_fresh_process({"model.arch": "vgg11", "data.batch_size": 32})
    large = _probe_in_a_fresh_process({"model.arch": "vgg11", "data.batch_size": 512})
    assert 0 < small["peak_bytes"] < large["peak_bytes"] < large["total_bytes"]
