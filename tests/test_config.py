"""TrialConfig: dotted keys in, frozen validated sections out, every problem reported at once."""

import pytest

from sweeper.config import ConfigError, TrialConfig, parse_value


def test_defaults_are_valid_and_round_trip():
    cfg = TrialConfig()
    cfg.validate()
    assert TrialConfig.from_flat(cfg.to_flat()) == cfg


def test_from_flat_sets_nested_fields_and_coerces_cli_strings():
    cfg = TrialConfig.from_flat({"model.arch": "vgg16", "model.batch_norm": "true",
                                 "model.width": "1/8", "optim.lr": "0.05", "epochs": "3"})
    assert cfg.model.arch == "vgg16"
    assert cfg.model.batch_norm is True
    assert cfg.model.width == 0.125
    assert cfg.optim.lr == 0.05
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)


def test_all_problems_are_reported_at_once_with_field_value_and_allowed():
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_flat({"model.arch": "vgg99", "model.init": "kaiming2",
                               "optim.lr": -0.1, "model.width": 0, "data.name": "mnist"})
    problems = info.value.problems
    assert len(problems) == 5
    text = str(info.value)
    assert "model.init='kaiming2' is not one of ['default', 'he', 'normal', 'xavier']" in text
    assert "model.arch='vgg99' is not one of [" in text and "'vgg16'" in text
    assert "optim.lr=-0.1 must be > 0" in text
    assert "model.width=0.0 must be > 0" in text
    assert "data.name='mnist' is not one of [" in text and "'digits'" in text


def test_epoch_probe_is_one_of_its_two_modes():
    assert TrialConfig().diagnostics.epoch_probe == "training_step"  # the cheap one is the default
    assert TrialConfig.from_flat({"diagnostics.epoch_probe": "fixed"}).diagnostics.epoch_probe == "fixed"
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_flat({"diagnostics.epoch_probe": "every_step"})
    assert info.value.problems == ["diagnostics.epoch_probe='every_step' is not one of "
                                   "['fixed', 'training_step']"]


def test_unknown_keys_are_rejected_by_name_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown setting 'optim.learning_rate'"):
        TrialConfig.from_flat({"optim.learning_rate": 0.1})
    with pytest.raises(ConfigError, match=r"did you mean 'model.init'"):
        TrialConfig.from_flat({"model.inti": "he"})
    with pytest.raises(ConfigError, match=r"unknown setting 'modle.arch'"):
        TrialConfig.from_flat({"modle.arch": "vgg11"})


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"epochs='many' is not an integer"):
        TrialConfig.from_flat({"epochs": "many"})
    with pytest.raises(ConfigError, match=r"model.batch_norm='maybe' is not a boolean"):
        TrialConfig.from_flat({"model.batch_norm": "maybe"})
    with pytest.raises(ConfigError, match=r"optim.lr=nan is not a finite number"):
        TrialConfig.from_flat({"optim.lr": float("nan")})


def test_plain_vgg_needs_a_depth_and_others_refuse_one():
    with pytest.raises(ConfigError, match=r"model.depth is required for model.arch='vgg'"):
        TrialConfig.from_flat({"model.arch": "vgg"})
    with pytest.raises(ConfigError, match=r"model.depth=5 is too shallow"):
        TrialConfig.from_flat({"model.arch": "vgg", "model.depth": 5})
    with pytest.raises(ConfigError, match=r"model.depth=22 applies only to model.arch='vgg'"):
        TrialConfig.from_flat({"model.arch": "vgg11", "model.depth": 22})
    assert TrialConfig.from_flat({"model.arch": "vgg", "model.depth": 30}).model.depth == 30
    # Unbounded, depth=10**6 hung `sweeper validate` building the model for its dry run.
    with pytest.raises(ConfigError, match=r"model.depth=1000000 is too deep: a plain VGG stack here has "
                                          r"at most 1000 weight layers"):
        TrialConfig.from_flat({"model.arch": "vgg", "model.depth": 10**6})
    assert TrialConfig.from_flat({"model.arch": "vgg", "model.depth": 1000}).model.depth == 1000


def test_replace_revalidates():
    cfg = TrialConfig()
    assert cfg.replace(**{"optim.lr": 0.5}).optim.lr == 0.5
    with pytest.raises(ConfigError, match="device='tpu'"):
        cfg.replace(device="tpu")


def test_config_is_immutable():
    cfg = TrialConfig()
    with pytest.raises(Exception):
        cfg.model.arch = "vgg19"


@pytest.mark.parametrize("text,value", [("3", 3), ("0.5", 0.5), ("1e-3", 1e-3), ("true", True),
                                        ("off", False), ("none", None), ("1/8", 0.125),
                                        ("vgg16", "vgg16")])
def test_parse_value(text, value):
    assert parse_value(text) == value


def test_digits_given_for_a_text_setting_are_that_text():
    # `sweeper launch FILE data.test_scales=64` parses 64 as a number; one test scale was meant.
    from sweeper.config import parse_value

    cfg = TrialConfig.from_flat({"data.resolution": 64, "data.crop": 32, "data.test_scales": parse_value("64")})
    assert cfg.data.test_scales == "64" and cfg.data.test_scale_list == (64,)
    with pytest.raises(ConfigError, match=r"data.test_scales='28.5' is not a comma-separated list "
                                          r"of integers"):
        TrialConfig.from_flat({"data.resolution": 64, "data.crop": 24, "data.test_scales": 28.5})


@pytest.mark.parametrize("flat,message", [
    ({"data.test_scales": "28,,32"}, "data.test_scales='28,,32' is not a comma-separated list"),
    ({"data.test_scales": "28,", "data.test_grid": 10},
     "data.test_grid=10 must be <= 5: the largest test scale 28 leaves 5 distinct crop offsets"),
    ({"data.test_scales": "28,32", "data.test_grid": 100000}, "data.test_grid=100000 must be <= 9"),
])
def test_multicrop_settings_that_would_repeat_or_explode_are_refused(flat, message):
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_flat({"data.resolution": 32, "data.crop": 24, **flat})
    assert any(p.startswith(message) for p in err.value.problems), err.value.problems
    cfg = TrialConfig.from_flat({"data.resolution": 32, "data.crop": 24, "data.test_scales": "28,",
                                 "data.test_grid": 5})
    assert cfg.data.test_scale_list == (28,)
