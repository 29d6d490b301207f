"""Search-space files: loading, overrides, all-problems-at-once validation, sampling, dry runs."""

import re
import textwrap
from pathlib import Path

import pytest
from ray import tune

from sweeper.config import ConfigError, TrialConfig
from sweeper.loading import load_sweep
from sweeper.spaces import Sweep, dry_run, grid_cells, parse_overrides, sample_config, trial_count

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


def test_malformed_and_unknown_overrides_are_reported_together(tmp_path):
    """The malformed one alone was reported; the unknown keys only after it was fixed."""
    from sweeper.local import debug_config

    with pytest.raises(ConfigError) as err:
        load_sweep("search_spaces/vgg_depth.py", ["bogus=1", "model.bogus=2", "justaword"])
    text = str(err.value)
    assert "override 'justaword' is not key=value" in text
    assert "bogus" in text.replace("'justaword'", "") and "model.bogus" in text
    assert len(err.value.problems) >= 3, err.value.problems
    with pytest.raises(ConfigError) as err:
        debug_config(None, ["bogus=1", "=x"])
    assert "override '=x' is not key=value" in str(err.value) and "bogus" in str(err.value).replace("=x", "")
    assert len(err.value.problems) == 2, err.value.problems


def test_a_key_set_twice_to_different_values_is_refused_not_last_wins():
    # lr is optim.lr's alias: the last of the two won, and the file's lr grid became 0.2 in silence.
    with pytest.raises(ConfigError, match=r"optim.lr is set twice, to different values \(lr=0.1, "
                                          r"optim.lr=0.2\): keep one") as err:
        parse_overrides(["lr=0.1", "optim.lr=0.2", "dataset=digits", "data.name=cifar10"])
    assert "data.name is set twice, to different values (dataset=digits, data.name=cifar10)" in str(err.value)
    assert parse_overrides(["lr=0.1", "optim.lr=0.1", "width=1/8"]) == {"optim.lr": 0.1, "model.width": 0.125}


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


# ---- loading robustness, domains, metric, signatures ----------------------------------------------------


def test_every_failure_at_import_names_the_file_line_and_error_type(tmp_path):
    cases = {
        "import json\njson.loads('{')\n": "space.py:2: JSONDecodeError: Expecting property name",
        "X = 1\nraise SystemExit(3)\n": "space.py:2: SystemExit: called sys.exit(3) while being loaded",
        "def f():\n    return 1 / 0\nX = f()\n": "space.py:2: ZeroDivisionError: division by zero",
        "x = (\n": "space.py:1: SyntaxError: '(' was never closed",
    }
    for body, expected in cases.items():
        path = _write(tmp_path, body)
        with pytest.raises(ConfigError) as info:
            load_sweep(path)
        assert len(info.value.problems) == 1 and info.value.problems[0].startswith(str(path))
        assert expected in info.value.problems[0], info.value.problems[0]


@pytest.mark.parametrize("space,key", [
    ('{"optim.lr": tune.loguniform(0, 1)}', "optim.lr"),
    ('{"data.name": "digits", "optim.momentum": tune.quniform(0, 1, 0.3)}', "optim.momentum"),
    # The failing call inside another domain, after other keys on the line: the innermost value's key.
    ('{"optim.momentum": 0.9, "optim.lr": tune.choice([0.1, tune.qloguniform(1e-3, 1, 0)])}', "optim.lr"),
    ('{"optim.lr": 0.1,\n        "model.width": 1 / 0}', "model.width"),
])
def test_a_value_that_raises_while_loading_names_its_key(tmp_path, space, key):
    """Ray's messages from its domain constructors ("LogUniform requires a lower bound greater than
    0", a bare ZeroDivisionError for q=0) named no field: the file's line only."""
    path = _write(tmp_path, f"from ray import tune\nfrom sweeper.spaces import Sweep\nSWEEP = Sweep(name='k', space={space})\n")
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert info.value.problems[0].endswith(f" (in the value given for {key!r})"), info.value.problems[0]


@pytest.mark.parametrize("body", [
    "def f():\n    return 1 / 0\nSWEEP = f()\n",  # raised in a helper: no key on its line
    "X = {'a': 1, 'b': 1 / 0}\n",  # 'a' ended at the comma; 'b' is found
])
def test_no_key_is_named_where_the_failing_value_has_none(tmp_path, body):
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    problem = info.value.problems[0]
    assert "'a'" not in problem and ("'b'" in problem) == ("'b'" in body), problem


def test_loading_has_a_time_limit_and_restores_the_alarm(tmp_path, monkeypatch):
    import signal

    path = _write(tmp_path, "while True:\n    pass\n")
    previous = signal.signal(signal.SIGALRM, lambda *a: None)
    try:
        signal.setitimer(signal.ITIMER_REAL, 100)  # someone else's timer survives the load
        with pytest.raises(ConfigError, match=r"space.py:\d: TimeoutError: took longer than 0.2 s"):
            load_sweep(path, timeout_s=0.2)
        assert 95 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100
        monkeypatch.setenv("SWEEPER_LOAD_TIMEOUT", "0.2")
        with pytest.raises(ConfigError, match="took longer than 0.2 s"):
            load_sweep(path)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_metric_must_be_reported_every_epoch_and_mode_must_agree():
    from sweeper.config import EPOCH_METRICS

    for metric, better in EPOCH_METRICS.items():
        Sweep(name="s", space={}, metric=metric, mode=better)
        worse = "min" if better == "max" else "max"
        with pytest.raises(ConfigError, match="would keep the worst trials"):
            Sweep(name="s", space={}, metric=metric, mode=worse)
    with pytest.raises(ConfigError, match=r"metric='val_acc' .*did you mean 'val_accuracy'\?"):
        Sweep(name="s", space={}, metric="val_acc")


def test_epoch_metrics_are_what_fit_reports_every_epoch():
    from sweeper.config import EPOCH_METRICS
    from sweeper.train import fit

    cfg = TrialConfig.from_flat({"model.arch": "smallcnn", "model.width": 0.125, "data.name": "synthetic",
                                 "data.synthetic_size": 40, "data.batch_size": 16, "epochs": 2,
                                 "diagnostics.enabled": False, "device": "cpu"})
    reports = []
    fit(cfg, report=lambda metrics, save: reports.append(metrics))
    assert len(reports) == 2
    for metrics in reports:
        assert set(EPOCH_METRICS) <= set(metrics)


@pytest.mark.parametrize("domain,search,expected", [
    (tune.randint(5, 1), "random", "randint(5, 1) needs lower < upper"),
    (tune.uniform(1.0, 0.0), "random", "uniform(1.0, 0.0) needs lower < upper"),
    (tune.loguniform(0.1, 0.001), "random", "swap them: loguniform(0.001, 0.1)"),
    (tune.loguniform(0.1, 0.001), "optuna", "loguniform(0.1, 0.001) needs lower < upper"),
    (tune.choice([]), "random", "choice([]) has nothing to choose from"),
    (tune.randn(0.9, 0.01), "optuna", "cannot sample a normal distribution"),
    (tune.qrandn(0.9, 0.01, 0.01), "optuna", "cannot sample a normal distribution"),
    (tune.qloguniform(0.001, 0.1, 0.001), "optuna", "drops the step q=0.001"),
    (tune.qlograndint(16, 256, 16), "optuna", "cannot step a log-scaled integer"),
    (tune.sample_from(lambda c: 0.9), "optuna", "search='optuna' cannot convert tune.sample_from"),
    (tune.choice([0.9, [0.8]]), "optuna", "not list [0.8]"),
    (tune.qrandint(5, 7, 4), "random", "has no multiple of q=4 between 5 and 7"),
])
def test_every_domain_is_checked_under_the_search_that_samples_it(domain, search, expected):
    with pytest.raises(ConfigError) as info:
        Sweep(name="s", space={"optim.momentum": domain}, search=search, num_samples=2)
    assert any(expected in p and "space['optim.momentum']=" in p for p in info.value.problems), \
        info.value.problems


def test_domains_optuna_converts_are_accepted():
    space = {"optim.momentum": tune.uniform(0.5, 0.9), "optim.lr": tune.loguniform(1e-3, 1e-1),
             "data.batch_size": tune.qrandint(16, 64, 16), "optim.step_size": tune.lograndint(1, 10),
             "model.init": tune.choice(["he", "xavier"]), "model.init_distribution": tune.choice([None, "normal"]),
             "optim.label_smoothing": tune.quniform(0.0, 0.2, 0.1)}
    Sweep(name="s", space=space, search="optuna", num_samples=4)


def test_describe_domain_is_readable_and_stable():
    from sweeper.spaces import describe_domain

    assert describe_domain(tune.loguniform(0.001, 0.1)) == "loguniform(0.001, 0.1)"
    assert describe_domain(tune.uniform(0, 1)) == "uniform(0, 1)"
    assert describe_domain(tune.randint(1, 5)) == "randint(1, 5)"
    assert describe_domain(tune.qrandint(8, 64, 8)) == "qrandint(8, 64, 8)"
    assert describe_domain(tune.lograndint(1, 64)) == "lograndint(1, 64)"
    assert describe_domain(tune.qloguniform(0.001, 0.1, 0.001)) == "qloguniform(0.001, 0.1, 0.001)"
    assert describe_domain(tune.quniform(0.0, 1.0, 0.25)) == "quniform(0.0, 1.0, 0.25)"
    assert describe_domain(tune.randn(0.0, 1.0)) == "randn(0.0, 1.0)"
    assert describe_domain(tune.choice(["a", "b"])) == "choice(['a', 'b'])"
    assert describe_domain(tune.grid_search([11, 13])) == "grid_search([11, 13])"
    assert describe_domain(0.01) == "0.01" and describe_domain("vgg11") == "'vgg11'"
    assert re.fullmatch(r"sample_from\(\S*<lambda> at test_spaces.py:\d+\)",
                        describe_domain(tune.sample_from(lambda c: 1)))
    assert " at 0x" not in describe_domain(tune.choice([object, len]))


def test_space_signature_is_deterministic_and_changes_with_any_key_or_value(tmp_path):
    import json

    from sweeper.spaces import space_signature

    body = """
        from ray import tune
        from sweeper.spaces import Sweep
        SWEEP = Sweep(name="s", space={"model.arch": tune.grid_search(["vgg11", "vgg13"]),
                                       "optim.lr": tune.loguniform(1e-3, 1e-1), "model.width": 0.125},
                      num_samples=2)
    """
    a, _ = load_sweep(_write(tmp_path, body))
    b, _ = load_sweep(_write(tmp_path, body))
    sig = space_signature(a)
    assert sig == space_signature(b) and json.loads(json.dumps(sig)) == sig
    assert sig["optim.lr"] == "loguniform(0.001, 0.1)" and sig["sweep.num_samples"] == "2"
    assert space_signature(a.replace(question="other words")) == sig
    changed = [
        a.replace(space={**a.space, "optim.lr": tune.loguniform(1e-3, 2e-1)}),
        a.replace(space={**a.space, "model.width": 0.25}),
        a.replace(space={**a.space, "model.init": "he"}),
        a.replace(space={k: v for k, v in a.space.items() if k != "model.width"}),
        a.replace(space={"model.width": 0.125, **{k: v for k, v in a.space.items() if k != "model.width"}}),
        a.replace(space={**a.space, "model.arch": tune.grid_search(["vgg11", "vgg16"])}),
        a.replace(metric="train_accuracy"), a.replace(metric="val_loss", mode="min"),
        *(a.replace(**{f: v}) for f, v in [("max_epochs", 5), ("scheduler", "fifo"), ("grace_period", 2),
                                           ("seed", 1), ("reduction_factor", 2), ("num_samples", 3)]),
    ]
    signatures = [space_signature(s) for s in changed]
    assert all(s != sig for s in signatures)
    assert len({json.dumps(s, sort_keys=True) for s in signatures}) == len(signatures)


def test_the_dry_run_plan_describes_sampled_domains(capsys):
    from sweeper.local import print_plan

    sweep = Sweep(name="s", space={"optim.lr": tune.loguniform(1e-3, 1e-1),
                                   "model.arch": tune.grid_search(["vgg11", "vgg13"])})
    print_plan(sweep)
    out = capsys.readouterr().out
    assert "sampled per trial: optim.lr ~ loguniform(0.001, 0.1)" in out
    assert "object at 0x" not in out


@pytest.mark.parametrize("key,suggestion", [
    ("optim.learning_rate", "'optim.lr'"), ("optim.eta", "'optim.lr'"), ("model.lr", "'optim.lr'"),
    ("model.bn", "'model.batch_norm'"), ("model.batchnorm", "'model.batch_norm'"),
    ("optim.wd", "'optim.weight_decay'"), ("data.bs", "'data.batch_size'"),
    ("optim.momentun", "'optim.momentum'"), ("optimizer.lr", "'optim.lr'"), ("modle.arch", "'model.arch'"),
])
def test_unknown_settings_suggest_what_was_meant(key, suggestion):
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_flat({key: 1})
    assert f"did you mean {suggestion}?" in str(info.value)


def test_a_directory_or_a_json_file_is_not_a_search_space(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a search-space file"):
        load_sweep(tmp_path)
    (tmp_path / "s.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"s.json: is a .json file, not a Python search-space file"):
        load_sweep(tmp_path / "s.json")


def test_a_sampled_sweep_reference_is_refused_by_validate_not_only_by_launch():
    # A launch resolves sweep:NAME/REF once, before Ray starts; a sampled one never would be.
    with pytest.raises(ConfigError) as err:
        Sweep(name="s", space={"model.init_from": tune.choice(["sweep:src/best", None])})
    assert any("space['model.init_from']=" in p and "must be a fixed value or a tune.grid_search"
               in p for p in err.value.problems), err.value.problems
    Sweep(name="s", space={"model.init_from": tune.grid_search(["sweep:src/best", None])})


def test_a_grid_is_counted_without_listing_it_and_capped_at_max_trials(monkeypatch):
    from ray import tune

    import sweeper.spaces as spaces
    from sweeper.config import ConfigError

    axes = {f"optim.{k}": tune.grid_search(values) for k, values in
            (("lr", [0.01, 0.02, 0.05, 0.1]), ("momentum", [0.0, 0.5, 0.9]), ("weight_decay", [0.0, 1e-4]))}
    monkeypatch.setattr(spaces, "MAX_TRIALS", 48)
    at_cap = Sweep(name="cap", space=axes, num_samples=2)  # 4 x 3 x 2 cells x 2 samples: allowed
    assert spaces.grid_size(at_cap) == 24 == len(grid_cells(at_cap)) and trial_count(at_cap) == 48
    with pytest.raises(ConfigError) as info:
        Sweep(name="over", space=axes, num_samples=2, seeds=2)  # the seed axis counts too: 96
    assert info.value.problems == [
        "the sweep would run 96 trials (optim.lr (4) x optim.momentum (3) x optim.weight_decay (2) x "
        "seed (2) x num_samples (2)): more than 48, which every launch plans up front and Tune keeps "
        "in its experiment state. Split it into several sweeps, or draw values with tune.choice / "
        "tune.uniform instead of crossing grid_search axes"]
    # Counted from the axes' lengths: a grid of 10^12 cells is refused at once, never listed.
    monkeypatch.setattr(spaces, "grid_cells", lambda sweep: pytest.fail("the grid was listed"))
    values = [i / 1000 for i in range(1, 1001)]
    huge = {"optim.lr": tune.grid_search(values), "optim.momentum": tune.grid_search(values[:-1]),
            "optim.weight_decay": tune.grid_search(values), "model.width": tune.grid_search(values)}
    with pytest.raises(ConfigError, match=r"would run 999,000,000,000 trials"):
        Sweep(name="huge", space=huge)
    # The seed axis likewise: seeds=10**9 once built its list of seeds first (22 GB, killed).
    monkeypatch.setattr(spaces, "run_space", lambda sweep: pytest.fail("the seed axis was listed"))
    with pytest.raises(ConfigError, match=r"\(seed \(1000000000\) x num_samples \(1\)\): more than 48"):
        Sweep(name="seeded", space={"optim.lr": 0.1}, seeds=10**9)


def test_integer_sweep_settings_take_an_integral_float_from_the_command_line():
    from sweeper.config import ConfigError
    from sweeper.spaces import apply_overrides

    base = Sweep(name="ints", space={"model.arch": "smallcnn"})
    sweep = apply_overrides(base, parse_overrides(["max_epochs=1e3", "num_samples=2.0", "seed=7"]))
    assert (sweep.max_epochs, sweep.num_samples, sweep.seed) == (1000, 2, 7)
    assert isinstance(sweep.max_epochs, int)
    for bad, message in (("max_epochs=2.5", "max_epochs=2.5 must be an integer >= 1"),
                         ("max_epochs=inf", "max_epochs=inf must be an integer >= 1")):
        with pytest.raises(ConfigError) as info:
            apply_overrides(base, parse_overrides([bad]))
        assert message in str(info.value)


@pytest.mark.parametrize("override, message", [
    ("max_epochs=-1", "max_epochs=-1 must be an integer >= 1"),
    ("max_epochs=0", "max_epochs=0 must be an integer >= 1"),
    ("seed=-1", "seed=-1 must be an integer >= 0"),
])
def test_a_refused_sweep_field_is_one_problem_not_one_per_check_that_reads_it(override, message):
    """The trials' epochs and seed are the Sweep's: a bad max_epochs was also reported as
    'grace_period=3 must be <= max_epochs=-1' and 'space: epochs=-1 must be >= 1'."""
    from sweeper.config import ConfigError
    from sweeper.spaces import apply_overrides

    base = Sweep(name="one", space={"model.arch": "smallcnn", "optim.lr": 0.1}, grace_period=3)
    with pytest.raises(ConfigError) as info:
        apply_overrides(base, parse_overrides([override]))
    assert info.value.problems == [message]


def test_grid_values_that_are_one_setting_are_refused():
    from ray import tune

    from sweeper.config import ConfigError

    with pytest.raises(ConfigError) as info:
        Sweep(name="dup", space={"model.arch": "vgg11",
                                 "model.batch_norm": tune.grid_search([True, "yes", 1, False]),
                                 "model.width": tune.grid_search([0.125, "1/8"]),
                                 "optim.lr": tune.grid_search([0.1, 0.01])})
    assert info.value.problems == [
        "model.batch_norm: grid_search values True, 'yes' and 1 are one setting (True): each would "
        "be a cell of its own; list it once",
        "model.width: grid_search values 0.125 and '1/8' are one setting (0.125): each would be a "
        "cell of its own; list it once"]
    Sweep(name="fine", space={"model.arch": "vgg11", "model.batch_norm": tune.grid_search([True, False])})


def test_a_command_line_setting_is_not_blamed_on_the_space_and_a_huge_seed_is_the_sweeps():
    from sweeper.config import ConfigError
    from sweeper.spaces import apply_overrides

    base = Sweep(name="blame", space={"model.arch": "smallcnn", "optim.lr": 0.1})
    with pytest.raises(ConfigError) as info:
        apply_overrides(base, parse_overrides(["device=tpu"]))
    assert info.value.problems == ["device='tpu' is not one of ['auto', 'cpu', 'cuda', 'cuda:N']"]
    with pytest.raises(ConfigError) as info:
        Sweep(name="blame", space={"model.arch": "smallcnn", "device": "tpu"})
    assert info.value.problems == ["space: device='tpu' is not one of ['auto', 'cpu', 'cuda', 'cuda:N']"]
    with pytest.raises(ConfigError) as info:
        apply_overrides(base, parse_overrides([f"seed={2**80}"]))
    assert info.value.problems == [f"seed={2**80} must be an integer in [0, {2**62}] (2**62)"]
    with pytest.raises(ConfigError) as info:  # a misspelt setting typed on the command line
        apply_overrides(base, parse_overrides(["batch=64"]))
    assert info.value.problems == ["unknown setting 'batch'; did you mean 'data.batch_size'? "
                                   "(settings are 'section.name', e.g. 'model.arch', 'optim.lr')"]
