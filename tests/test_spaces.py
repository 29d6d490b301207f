"""Search-space files: loading, overrides, all-problems-at-once validation, sampling, dry runs."""

import textwrap
from pathlib import Path

import pytest
from ray import tune

from sweeper.config import ConfigError, TrialConfig
from sweeper.spaces import (Sweep, dry_run, grid_cells, load_sweep, parse_overrides, sample_config,
                            trial_count)

SPACES = sorted((Path(__file__).parent.parent / "search_spaces").glob("*.py"))


def _write(tmp_path, body: str) -> Path:
    path = tmp_path / "space.py"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_every_shipped_search_space_validates_and_dry_runs(path):
    sweep, text = load_sweep(path, ["dataset=digits", "width=1/8"])
    assert sweep.question, f"{path.name} needs a docstring stating its question"
    assert text == path.read_text()
    cfg = dry_run(sweep)
    assert isinstance(cfg, TrialConfig) and cfg.model.width == 0.125
    assert trial_count(sweep) >= 1


def test_vgg_depth_covers_the_full_factorial():
    sweep, _ = load_sweep(Path("search_spaces/vgg_depth.py"))
    cells = grid_cells(sweep)
    assert len(cells) == 24
    assert {(c["model.arch"], c["model.init"], c["model.batch_norm"]) for c in cells} == {
        (a, i, b) for a in ("vgg11", "vgg13", "vgg16", "vgg19")
        for i in ("normal", "xavier", "he") for b in (False, True)}
    assert trial_count(sweep) == 24 * sweep.num_samples


def test_overrides_change_sweep_fields_and_fix_trial_settings(tmp_path):
    path = _write(tmp_path, """
        from ray import tune
        from sweeper.spaces import Sweep
        SWEEP = Sweep(name="s", space={"model.arch": "vgg11", "optim.lr": tune.loguniform(1e-3, 1e-1)})
    """)
    sweep, _ = load_sweep(path, ["max_epochs=6", "lr=0.02", "dataset=synthetic", "model.width=1/8"])
    assert sweep.max_epochs == 6
    assert sweep.space["optim.lr"] == 0.02 and sweep.space["data.name"] == "synthetic"
    flat = sample_config(sweep)
    assert flat["epochs"] == 6 and flat["model.width"] == 0.125


def test_all_problems_in_a_file_are_reported_at_once(tmp_path):
    path = _write(tmp_path, """
        from ray import tune
        from sweeper.spaces import Sweep
        SWEEP = Sweep(
            name="bad name!",
            space={"model.arch": tune.grid_search(["vgg11", "vgg99"]),
                   "model.init": tune.choice(["he", "kaiming2"]),
                   "optim.lr": tune.loguniform(-1.0, 0.1) if False else tune.uniform(-0.5, 0.1),
                   "optim.momentun": 0.9},
            mode="maximum", grace_period=20, max_epochs=10, resources={"cpu": 1, "tpu": 1},
        )
    """)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    text = str(info.value)
    for expected in ["name='bad name!'", "mode='maximum' is not one of ['max', 'min']",
                     "grace_period=20 must be <= max_epochs=10", "resources['tpu'] is not one of",
                     "model.arch='vgg99' is not one of", "model.init='kaiming2' is not one of",
                     "optim.lr=-0.5 must be > 0", "unknown setting 'optim.momentun'"]:
        assert expected in text, expected
    assert all(p.startswith(str(path)) for p in info.value.problems)


def test_optuna_refuses_grid_axes():
    with pytest.raises(ConfigError, match="search='optuna' cannot expand grid axes"):
        Sweep(name="s", space={"model.init": tune.grid_search(["he", "xavier"])}, search="optuna")


def test_a_file_without_exactly_one_sweep_is_an_error(tmp_path):
    path = _write(tmp_path, "X = 1\n")
    with pytest.raises(ConfigError, match="must define exactly one Sweep"):
        load_sweep(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "missing.py")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="override 'epochs' is not key=value"):
        parse_overrides(["epochs"])


def test_sampling_is_seeded_and_respects_domains():
    sweep = Sweep(name="s", space={"optim.lr": tune.loguniform(1e-3, 1e-1),
                                   "model.init": tune.choice(["he", "xavier"]),
                                   "model.arch": tune.grid_search(["vgg11", "vgg13"])})
    a, b = sample_config(sweep, seed=1), sample_config(sweep, seed=1)
    assert a == b
    draws = [sample_config(sweep, seed=s) for s in range(30)]
    assert all(1e-3 <= d["optim.lr"] <= 1e-1 for d in draws)
    assert {d["model.init"] for d in draws} == {"he", "xavier"}
    assert {d["model.arch"] for d in draws} == {"vgg11", "vgg13"}
    assert all(isinstance(d["optim.lr"], float) for d in draws)


def test_resources_may_be_a_function_of_the_config():
    sweep = Sweep(name="s", space={"model.arch": tune.grid_search(["vgg11", "vgg19"])},
                  resources=lambda cfg: {"cpu": 1, "gpu": 0.5 if cfg.model.arch == "vgg19" else 0.25})
    from sweeper.spaces import trial_resources

    cfg = TrialConfig.from_flat({"model.arch": "vgg19"})
    assert trial_resources(sweep, cfg) == {"cpu": 1.0, "gpu": 0.5}
    bad = sweep.replace(resources=lambda cfg: {"cpu": -1})
    with pytest.raises(ConfigError, match=r"resources\(config of vgg11\)\['cpu'\]=-1 must be"):
        trial_resources(bad, TrialConfig())


def test_the_epoch_budget_belongs_to_the_sweep():
    with pytest.raises(ConfigError, match=r"space\['epochs'\] is set by the Sweep: use max_epochs=5"):
        Sweep(name="s", space={"epochs": 5})
