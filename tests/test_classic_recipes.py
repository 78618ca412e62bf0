"""Every classic-zoo method has a recipe under recipes/classic/, and every such recipe validates."""

import pytest

import kdistill.tasks  # noqa: F401  (registers the task schemas)
from kdistill.config import load_config
from kdistill.recipes import list_recipes

ZOO = ["dkd", "dist", "logit_standardization", "alpha_divergence", "sinkhorn_kd", "attention_transfer", "rkd", "pkt",
       "similarity_preserving", "nd_loss", "crd", "ofa", "gt_guided_self_distillation", "ensemble",
       "token_relation_graph", "lelp", "adaptive_fusion"]


def test_every_zoo_method_has_a_recipe():
    classic = [r for r in list_recipes() if r.startswith("classic/")]
    missing = [m for m in ZOO if f"classic/{m}" not in classic]
    assert not missing, missing
    assert len(classic) >= len(ZOO) + 1  # + the default classic/mnist1d


@pytest.mark.parametrize("method", ZOO)
def test_recipe_validates_and_names_its_method(method):
    cfg = load_config(f"classic/{method}", [])
    assert cfg.task == "classification"
    assert cfg.method.name == method
    assert cfg.baseline is True


def test_override_typo_fails_with_close_match():
    from kdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="kd_temperature"):
        load_config("classic/dkd", ["method.kwargs.kd_temprature=3.0"])
