"""The bench scripts' command lines: a bad count or an unknown architecture is one line and exit 2,
never a traceback (they are run by people checking the project's figures, often with other flags)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _run(script, *args):
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("script,args,says", [
    ("driver_overhead.py", ["--trials", "0"], "argument --trials: 0 must be >= 1"),
    ("driver_overhead.py", ["--width", "nan"], "argument --width: nan must be a finite number > 0"),
    ("trial_vs_bare.py", ["--epochs", "2"], "argument --epochs: 2 must be >= 3"),
    ("asha_vs_fifo.py", ["--grace-period", "x"], "argument --grace-period: 'x' is not an integer"),
    ("diagnostics_overhead.py", ["--arch", "vgg99"], "error: model.arch='vgg99' is not one of"),
    ("data_path.py", ["--dataset", "imagenet"], "error: data.name='imagenet' is not one of"),
    ("throughput.py", ["--device", "tpu"], "argument --device: 'tpu' is not a device"),
    # Refused in the parent, before any trial process starts.
    ("gpu_packing.py", ["--arch", "vgg99", "--device", "cpu"], "error: model.arch='vgg99' is not one of"),
])
def test_a_bad_argument_is_one_line_and_exit_2(script, args, says):
    out = _run(script, *args)
    assert out.returncode == 2, out.stderr
    assert says in out.stderr and "Traceback" not in out.stderr


def test_cuda_on_a_machine_without_it_is_refused_before_any_work():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    for script, args in (("gpu_packing.py", ["--counts", "1"]),  # its default is cuda
                         ("diagnostics_overhead.py", ["--device", "cuda"]),
                         ("trial_vs_bare.py", ["--device", "cuda", "--no-ray"])):
        out = _run(script, *args)
        assert out.returncode == 2, (script, out.stderr)
        assert "argument --device: 'cuda': torch sees no CUDA device" in out.stderr
        assert "Traceback" not in out.stderr
