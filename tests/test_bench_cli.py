"""The bench scripts' command lines: a bad count or an unknown architecture is one line and exit 2,
never a traceback (they are run by people checking the project's figures, often with other flags)."""

import os
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench(monkeypatch, capsys):
    """Runs a bench script as ``python bench/SCRIPT ARGS`` would, in this process (each refusal here
    happens while parsing, before any work: a fresh interpreter per case cost ~1.3 s of imports);
    returns its exit code and stderr. A traceback would surface as the test's own error."""
    import torch

    monkeypatch.syspath_prepend(str(BENCH))  # the script's directory, as python puts it first
    threads = torch.get_num_threads()  # a script sets its own before it builds what it refuses
    environ = dict(os.environ)  # and trial_vs_bare its OMP_NUM_THREADS

    def run(script, *args):
        monkeypatch.setattr(sys, "argv", [str(BENCH / script), *args])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(BENCH / script), run_name="__main__")
        return exit_.value.code, capsys.readouterr().err

    yield run
    torch.set_num_threads(threads)  # later tests in this process run as they would alone
    os.environ.clear()
    os.environ.update(environ)


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
    ("study_gpu.py", ["--archs", "vgg99", "--device", "cpu"], "error: model.arch='vgg99' is not one of"),
    ("study_gpu.py", ["--workers", "0"], "argument --workers: 0 must be >= 1"),
    ("study_gpu.py", ["--epochs", "3", "--max-epochs", "2", "--device", "cpu"],
     "error: --epochs 3 is more than --max-epochs 2 (the budget the projection is for)"),
    ("throughput.py", ["--static"], "error: --static goes with --compile true"),
    ("throughput.py", ["--compile", "max-autotune"], "argument --compile: invalid choice: 'max-autotune'"),
])
@pytest.mark.timeout(60)  # a refusal that stopped refusing would run the benchmark here
def test_a_bad_argument_is_one_line_and_exit_2(bench, script, args, says):
    code, err = bench(script, *args)
    assert code == 2, err
    assert says in err.strip().splitlines()[-1]  # the last line says it (argparse puts usage above)


@pytest.mark.timeout(60)
def test_cuda_on_a_machine_without_it_is_refused_before_any_work(bench):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    for script, args in (("gpu_packing.py", ["--counts", "1"]),  # its default is cuda
                         ("study_gpu.py", []),  # so is this one's
                         ("diagnostics_overhead.py", ["--device", "cuda"]),
                         ("trial_vs_bare.py", ["--device", "cuda", "--no-ray"])):
        code, err = bench(script, *args)
        assert code == 2, (script, err)
        assert "argument --device: 'cuda': torch sees no CUDA device" in err


def test_the_study_projection_counts_the_fewest_epochs_asha_can_run_per_cell():
    sys.path.insert(0, str(BENCH))
    try:
        from study_gpu import asha_epochs_per_cell
    finally:
        sys.path.remove(str(BENCH))
    # vgg_depth: 3 trials, rungs at 3, 9, 27 of 30; one goes on from each rung: 9 + 6 + 18 + 3.
    assert asha_epochs_per_cell(3, grace=3, rf=3, max_epochs=30) == 36
    assert asha_epochs_per_cell(9, grace=3, rf=3, max_epochs=30) == 27 + 3 * 6 + 18 + 3
    assert asha_epochs_per_cell(1, grace=3, rf=3, max_epochs=30) == 30
    assert asha_epochs_per_cell(4, grace=1, rf=2, max_epochs=4) == 4 + 2 * 1 + 2
