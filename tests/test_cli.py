"""The command lines: options generated from Config, one-line errors. The error cases themselves run
in process (tests/test_robust.py); here one subprocess checks what a shell really sees."""

import dataclasses
import typing

import pytest

from conftest import run_script
from jaxnorm.cli import OneLineParser, add_config_options, config_from_args
from jaxnorm.config import RANGES, Config, ConfigError


def test_bad_input_in_a_real_process_is_one_line_exit_2_and_no_stdout(tmp_path):
    result = run_script("train.py", "--norm", "gn", "--groups", "5", "--workdir", tmp_path / "run")
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --groups 5 does not divide the 24 channels")
    assert not (tmp_path / "run").exists()


def test_every_config_field_is_an_option_with_a_help_text_of_its_own():
    parser = OneLineParser()
    add_config_options(parser)
    options = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(options) == {f.name for f in dataclasses.fields(Config)} | {"preset"}
    helps = [options[name].help for name in options]
    assert all(h and not h.lstrip().startswith("(default") for h in helps)  # real words, not only a default
    assert len(set(helps)) == len(helps)  # none copied from another option
    assert "(default 20; 15 for mnist)" in options["epochs"].help  # the dataset's defaults are shown
    assert options["norm"].choices == ("bn", "gn", "ln")


def _config(*argv, **only):
    parser = OneLineParser()
    add_config_options(parser, **only)
    return config_from_args(parser.parse_args(list(argv)))


def test_options_map_onto_the_dataset_defaults_and_the_preset():
    assert _config() == Config()
    assert _config("--dataset", "mnist") == Config.for_dataset("mnist")
    mnist_flipped = Config.for_dataset("mnist", flip=True, epochs=3)
    assert _config("--dataset", "mnist", "--flip", "--epochs", "3") == mnist_flipped
    narrow = _config("--preset", "narrow", "--transition-width", "8")
    assert (narrow.width, narrow.transition_width) == (16, 8)  # an explicit width wins over the preset


def test_a_norms_own_defaults_apply_to_that_norm_only_and_a_given_option_wins(monkeypatch):
    from jaxnorm import config as config_module
    monkeypatch.setitem(config_module.NORM_DEFAULTS, ("mnist", "ln"), {"rotate": 10.0})
    assert _config("--dataset", "mnist", "--norm", "ln").rotate == 10.0
    assert _config("--dataset", "mnist", "--norm", "ln", "--rotate", "0").rotate == 0.0
    assert _config("--dataset", "mnist", "--norm", "gn").rotate == 0.0  # another norm
    assert _config("--norm", "ln").rotate == 0.0  # another dataset
    parser = OneLineParser()
    add_config_options(parser)
    help_text = {a.dest: a.help for a in parser._actions}["rotate"]
    assert "(default 0.0; 10.0 for mnist ln)" in help_text


def test_the_cifar10_norms_take_their_chosen_recipe_and_the_sweep_compares_them_under_one():
    from jaxnorm.config import NORM_DEFAULTS
    from jaxnorm.sweep import sweep_config
    for norm in ("bn", "gn", "ln"):
        own = NORM_DEFAULTS.get(("cifar10", norm), {})
        config = _config("--norm", norm)
        assert all(getattr(config, name) == value for name, value in own.items())
        swept = sweep_config(_config(), norm, batch_size=128, seed=0)
        assert swept == Config(norm=norm)  # the sweep's recipe: the dataset's, whatever the norm


def test_a_config_saved_before_a_field_existed_keeps_what_it_trained_with():
    old = {k: v for k, v in Config().to_dict().items() if k not in ("schedule", "warmup_epochs", "nesterov")}
    restored = Config.from_dict(old)
    assert (restored.schedule, restored.warmup_epochs, restored.nesterov) == ("step", 0.0, False)
    assert Config.from_dict(Config().to_dict()) == Config()  # a config saved today comes back as it was


def test_alternating_flips_need_flips():
    assert "alternating flips, 8x8 cutout" in Config(alternate_flips=True, cutout=8).recipe()
    with pytest.raises(ConfigError, match="--alternate-flips needs flips"):
        Config(alternate_flips=True, flip=False).validate()


def test_width_zero_is_an_error_not_the_preset_width():
    with pytest.raises(ConfigError, match="--width must be positive, got 0"):
        _config("--width", "0")


def test_every_numeric_knob_has_a_range_and_none_is_accepted_where_it_is_the_default():
    numeric = {name for name, kind in typing.get_type_hints(Config).items()
               if set(typing.get_args(kind) or [kind]) - {type(None)} <= {int, float}}
    assert numeric == set(RANGES)
    assert Config(steps_per_call=None, train_split=None).validate()
    with pytest.raises(ConfigError, match=r"--steps-per-call must be positive, got 0"):
        Config(steps_per_call=0).validate()


def test_a_script_can_take_only_some_fields():
    parser = OneLineParser()
    add_config_options(parser, only=("norm", "dataset"))
    assert {a.dest for a in parser._actions} == {"help", "norm", "dataset"}


# Training on the real subset end to end, in a process of its own: test_download.py (the README's first
# command, which downloads the subset first).
