import pytest

from kdistill.errors import KDistillError, UnknownNameError
from kdistill.registry import METHODS, Registry


def test_builtin_methods_registered():
    import kdistill.methods  # noqa: F401

    for name in ("none", "hinton_kd", "fitnet"):
        assert name in METHODS


def test_unknown_name_lists_close_matches():
    r = Registry("thing")
    r.register("alpha_divergence")(object)
    r.register("dkd")(int)
    with pytest.raises(UnknownNameError) as e:
        r.get("alpha_divergance")
    assert "alpha_divergence" in str(e.value) and "kdistill list" in str(e.value)


def test_names_must_be_snake_case_and_unique():
    r = Registry("thing")
    with pytest.raises(KDistillError):
        r.register("Bad-Name")
    r.register("x")(int)
    with pytest.raises(KDistillError, match="twice"):
        r.register("x")(float)
