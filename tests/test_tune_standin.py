"""Search-space files without Ray: sweeper's stand-in for ray.tune draws what Ray draws.

A GPU box kept for debugging may have torch and no Ray. `sweeper debug FILE` and `sweeper validate
FILE` load the file with sweeper.tune_standin in place of ray.tune there; these tests hold the
stand-in beside the real Ray 2.60 (installed here) and fail when either moves.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from ray import tune

from sweeper import tune_standin
from sweeper.config import ConfigError
from sweeper.domains import _domain_problems, describe_domain, space_signature
from sweeper.loading import load_sweep
from sweeper.spaces import corner_values, sample_config

REPO = Path(__file__).resolve().parents[1]
SPACES = sorted((REPO / "search_spaces").glob("*.py"))

DOMAINS = [
    ("uniform", (-2.5, 4.0)),
    ("quniform", (-2.0, 4.0, 0.5)),
    ("quniform", (0.0, 1.0, 0.25)),
    ("loguniform", (1e-4, 1e-1)),
    ("qloguniform", (1e-2, 1.0, 1e-2)),
    ("randn", (0.0, 1.0)),
    ("randn", (3.0, 0.5)),
    ("qrandn", (1.0, 2.0, 0.5)),
    ("randint", (1, 5)),
    ("randint", (-3, 3)),
    ("qrandint", (8, 64, 8)),
    ("qrandint", (1, 10)),  # q = 1: the upper bound is included
    ("qrandint", (3, 20, 4)),  # bounds off the grid
    ("lograndint", (1, 1000)),
    ("qlograndint", (2, 128, 2)),
    ("choice", ([1, "two", 3.0, None, True],)),
    ("choice", (["sgd", "adam"],)),
]


@pytest.mark.parametrize("name,args", DOMAINS, ids=[f"{n}{a}" for n, a in DOMAINS])
def test_each_domain_draws_what_ray_draws_and_reads_the_same(name, args):
    ours, rays = getattr(tune_standin, name)(*args), getattr(tune, name)(*args)
    for seed in range(40):
        a = ours.sample(random_state=np.random.RandomState(seed))
        b = rays.sample(random_state=np.random.RandomState(seed))
        assert (a, type(a)) == (b, type(b)), (seed, a, b)
    # Ray's newer Generator too (what a user's own code might pass)
    a = ours.sample(random_state=np.random.default_rng(7))
    assert a == rays.sample(random_state=np.random.default_rng(7))
    assert describe_domain(ours) == describe_domain(rays)
    assert corner_values(ours) == corner_values(rays)
    for search in ("random", "optuna"):
        assert _domain_problems("k", ours, search) == _domain_problems("k", rays, search)


def test_sample_from_and_grid_search_behave_as_ray():
    assert tune_standin.grid_search([1, 2]) == tune.grid_search([1, 2])
    ours = tune_standin.sample_from(lambda spec: 4)
    assert ours.sample() == tune.sample_from(lambda spec: 4).sample() == 4
    assert tune_standin.sample_from(lambda: "x").sample() == "x"
    assert describe_domain(ours).startswith("sample_from(")
    theirs = describe_domain(tune.sample_from(lambda c: 4))
    assert describe_domain(ours).split(" at ")[0] == theirs.split(" at ")[0]


@pytest.mark.parametrize("name,args", [("loguniform", (0.0, 1.0)), ("loguniform", (1e-3, float("inf"))),
                                       ("uniform", (None, 1.0)), ("quniform", (0.0, 1.0, 0.3)),
                                       ("lograndint", (0, 10)), ("sample_from", (lambda a, b: 1,))])
def test_bounds_ray_refuses_are_refused_alike(name, args):
    with pytest.raises(ValueError) as ray_error:
        getattr(tune, name)(*args)
    with pytest.raises(ValueError) as our_error:
        getattr(tune_standin, name)(*args)
    # the same first words: the loading error a user reads names the same problem
    assert str(our_error.value).split(".")[0][:30] == str(ray_error.value).split(".")[0][:30]


@pytest.mark.parametrize("args", [(0.1, 0), (0.0, -1.0), (0.0, float("nan"))])
def test_randn_needs_a_positive_sd_as_in_ray(args):
    # Ray refuses with an assert at the file's line; the stand-in used to accept it, and sweeper's
    # later check refused it without the line
    with pytest.raises(AssertionError, match="SD has to be strictly greater than 0"):
        tune.randn(*args)
    with pytest.raises(ValueError, match="SD has to be strictly greater than 0"):
        tune_standin.randn(*args)
    with pytest.raises(ValueError, match="SD has to be strictly greater than 0"):
        tune_standin.qrandn(0.0, args[1], 0.1)


def _without_ray(monkeypatch):
    # As where Ray is not installed: `import ray` fails (None in sys.modules), and none of its
    # submodules this process imported is there to be found
    monkeypatch.setitem(sys.modules, "ray", None)
    for name in [n for n in sys.modules if n.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_every_shipped_space_loads_without_ray_to_the_same_sweep_and_draws(path, monkeypatch):
    real, text = load_sweep(path)
    _without_ray(monkeypatch)
    lite, lite_text = load_sweep(path)
    assert lite_text == text
    assert sys.modules["ray"] is None and "ray.tune" not in sys.modules  # put back as they were
    assert space_signature(lite) == space_signature(real)
    assert lite.problems() == real.problems() == []
    for seed in range(12):
        assert sample_config(lite, seed) == sample_config(real, seed)


def test_a_file_asking_ray_for_more_than_sampling_is_told_it_needs_ray(tmp_path, monkeypatch):
    path = tmp_path / "space.py"
    path.write_text(textwrap.dedent('''\
        from ray import tune
        from sweeper.spaces import Sweep
        stopper = tune.stopper.MaximumIterationStopper(3)
        SWEEP = Sweep(name="s", space={"optim.lr": tune.loguniform(1e-3, 1e-1)})
    '''))
    _without_ray(monkeypatch)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    (problem,) = err.value.problems
    assert f"{path}:3: AttributeError: ray.tune.stopper needs Ray, which is not installed" in problem
    assert "loguniform" in problem and "pip install 'ray[tune]'" in problem


@pytest.mark.parametrize("line", ["from ray.tune import Tuner", "import ray.train",
                                  "import ray; print(ray.__version__)"])
def test_importing_more_of_ray_than_sampling_is_told_it_needs_ray(tmp_path, monkeypatch, line):
    path = tmp_path / "space.py"
    path.write_text(f"{line}\nfrom sweeper.spaces import Sweep\nSWEEP = Sweep(name='s', space={{}})\n")
    _without_ray(monkeypatch)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    (problem,) = err.value.problems
    assert problem.startswith(f"{path}:1: ")
    assert "not installed in this Python" in problem and "grid_search" in problem


def test_import_forms_a_space_file_may_use_all_resolve_to_the_stand_in(tmp_path, monkeypatch):
    path = tmp_path / "space.py"
    path.write_text(textwrap.dedent('''\
        import os, ray.tune as tune
        from ray.tune import choice
        import importlib
        ray = importlib.import_module("ray")
        from sweeper.spaces import Sweep
        SWEEP = Sweep(name="s", space={"optim.lr": ray.tune.loguniform(1e-3, 1e-1),
                                       "optim.name": choice(["sgd", "adam"]),
                                       "model.arch": tune.grid_search(["vgg11", "vgg13"])})
    '''))
    _without_ray(monkeypatch)
    sweep, _ = load_sweep(path)
    assert isinstance(sweep.space["optim.lr"], tune_standin.Float)
    assert tune_standin.standin_sampled(sweep.space)


def _cli_without_ray(*args: str) -> subprocess.CompletedProcess:
    from conftest import run_sweeper_without

    return run_sweeper_without(("ray", "mlflow"), *args, cwd=REPO, timeout=240)


def test_debug_trains_a_space_file_without_ray_and_mlflow_and_launch_says_what_it_needs(tmp_path):
    args = ["search_spaces/vgg_depth.py", "dataset=digits", "width=1/16", "model.arch=vgg11",
            "data.batch_size=256", "--epochs", "1", "--sample", "3", "--no-diagnostics"]
    run = _cli_without_ray("debug", *args)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "drawn by sweeper's stand-in for ray.tune" in run.stdout
    assert "outcome:" in run.stdout
    lr = next(line for line in run.stdout.splitlines() if "optim.lr " in line)
    with_ray = sample_config(load_sweep(REPO / "search_spaces/vgg_depth.py")[0], 3)["optim.lr"]
    assert f"{with_ray:.4g}" in lr

    launch = _cli_without_ray("launch", "search_spaces/vgg_depth.py", "--local", "--dry-run")
    assert launch.returncode == 2, launch.stderr[-2000:]
    assert "sweeper launch needs ray, which is not installed in this Python" in launch.stderr
    assert "Traceback" not in launch.stderr
