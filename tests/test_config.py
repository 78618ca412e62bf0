import pytest

from kdistill.config import apply_overrides, load_config, parse_override
from kdistill.errors import ConfigError, KDistillError

BASE = {
    "name": "t", "task": "classification",
    "data": {"name": "digits"},
    "teacher": {"model": {"name": "mlp", "kwargs": {"width": 16}}},
    "student": {"name": "mlp", "kwargs": {"width": 8, "depth": 1}},
    "method": {"name": "hinton_kd", "kwargs": {"kd_temperature": 2.0}},
}


def test_valid_and_defaults():
    cfg = load_config(BASE)
    assert cfg.method.name == "hinton_kd" and cfg.train.epochs == 10 and cfg.seed == 0


def test_unknown_method_suggests_close_match():
    with pytest.raises(KDistillError, match="Did you mean .hinton_kd"):
        load_config({**BASE, "method": {"name": "hinton"}})


def test_unknown_top_level_field_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'train'"):
        load_config({**BASE, "trian": {"epochs": 3}})


def test_unknown_nested_field_suggests():
    with pytest.raises(ConfigError, match="epochs"):
        load_config({**BASE, "train": {"epoch": 3}})


def test_method_kwarg_typo_fails_before_any_model_loads():
    with pytest.raises(ConfigError, match="kd_temperature"):
        load_config({**BASE, "method": {"name": "hinton_kd", "kwargs": {"temperature": 2.0}}})


def test_method_kwarg_bad_value_names_field_and_value():
    with pytest.raises(ConfigError, match="alpha"):
        load_config({**BASE, "method": {"name": "hinton_kd", "kwargs": {"alpha": 2.0}}})


def test_bad_value_names_field_and_received_value():
    with pytest.raises(ConfigError) as e:
        load_config({**BASE, "train": {"lr": -1}})
    assert "train.lr" in str(e.value) and "-1" in str(e.value)


def test_model_kwarg_typo():
    with pytest.raises(ConfigError, match="width"):
        load_config({**BASE, "student": {"name": "mlp", "kwargs": {"widht": 3}}})


def test_overrides():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    cfg = load_config(BASE, ["train.epochs=3", "method=dkd" if False else "method.kwargs.alpha=0.5", "seed=7"])
    assert cfg.train.epochs == 3 and cfg.method.kwargs["alpha"] == 0.5 and cfg.seed == 7
    cfg = load_config(BASE, ["method=none"])
    assert cfg.method.name == "none"
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.epochs"])


def test_missing_recipe_file_and_builtin_names():
    with pytest.raises(ConfigError, match="not found"):
        load_config("does/not/exist.yaml")
    assert load_config("classic/mnist1d").name == "mnist1d_default"
    assert load_config().name == "mnist1d_default"  # the built-in default


def test_errors_never_echo_a_secret():
    secret = "sk-abcdef1234567890abcdef"
    with pytest.raises(ConfigError) as e:
        load_config("blackbox/wordnet_supersense", [f"teacher.api_key_env={secret}"])
    assert secret not in str(e.value) and "redacted" in str(e.value) and "api_key_env" in str(e.value)
