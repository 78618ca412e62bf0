"""Every built-in recipe validates (no model is loaded)."""

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser

from kdistill.config import load_config
from kdistill.errors import ConfigError, UnknownNameError
from kdistill.recipes import launcher_config, launcher_configs, list_recipes


def test_every_recipe_validates():
    names = list_recipes()
    validated = [n for n in names if load_config(n) is not None]
    # counts what it validated, so a recipe folder that silently empties fails this test
    assert len(validated) == len(names) >= 27
    assert "classic/mnist1d" in validated
    print(f"validated {len(validated)} recipes")


def test_launcher_configs_ship_beside_the_recipes_but_are_not_recipes():
    """`recipes/accelerate/*.yaml` are Accelerate launcher configs: found by name, valid for `accelerate launch`,
    never listed or loaded as kdistill recipes."""
    assert set(launcher_configs()) == {"ddp", "fsdp"}
    assert not any(n.startswith("accelerate/") for n in list_recipes())
    ddp, fsdp = (load_config_from_file(str(launcher_config(n))) for n in ("ddp", "fsdp"))
    assert ddp.distributed_type == "MULTI_GPU" and fsdp.distributed_type == "FSDP"
    assert fsdp.fsdp_config["fsdp_version"] == 2
    # every FSDP key is one `accelerate launch` understands (a misspelt key would be silently dropped)
    options = {a.dest for a in launch_command_parser()._actions}
    assert set(fsdp.fsdp_config) <= options, set(fsdp.fsdp_config) - options
    with pytest.raises(ConfigError, match="launcher config, not a recipe"):
        load_config("accelerate/fsdp")
    with pytest.raises(UnknownNameError, match="Did you mean 'fsdp'"):
        launcher_config("fsdb")
