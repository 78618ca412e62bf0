"""The built-in recipes: YAML files shipped inside this package (``kdistill/recipes/<task>/<name>.yaml``, so a
wheel install has them; ``recipes/`` at the repository root links here).

``accelerate/`` beside them holds Accelerate launcher configs (``ddp.yaml``, ``fsdp.yaml``), shipped the same way but
not recipes: ``accelerate launch --config_file $(python -c "from kdistill.recipes import launcher_config;
print(launcher_config('fsdp'))") -m kdistill.cli run RECIPE``."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from ..errors import ConfigError, close_matches, unknown_name

DEFAULT_RECIPE = "classic/mnist1d"
#: the folder of launcher configs, which are not recipes
LAUNCHER_DIR = "accelerate"


def recipes_dir() -> Path:
    """The folder of the built-in recipes, found through the installed package (never beside it)."""
    return Path(str(files(__name__)))


def list_recipes() -> list[str]:
    root = recipes_dir()
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")
                  if p.relative_to(root).parts[0] != LAUNCHER_DIR)


def launcher_configs() -> dict[str, Path]:
    """The shipped Accelerate launcher configs by name (``ddp``, ``fsdp``): paths for ``accelerate launch
    --config_file``."""
    folder = recipes_dir() / LAUNCHER_DIR
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def launcher_config(name: str) -> Path:
    """The path of one shipped Accelerate launcher config, e.g. ``launcher_config("fsdp")``."""
    configs = launcher_configs()
    if name not in configs:
        raise unknown_name("launcher config", name, configs, "They are the files in kdistill/recipes/accelerate/.")
    return configs[name]


def find_recipe(name: str | Path) -> Path:
    """A path to an existing file, or a built-in name like ``classic/mnist1d`` (``.yaml`` optional)."""
    p = Path(name)
    if p.is_file():
        return p
    cand = recipes_dir() / p
    if p.parts and p.parts[0] == LAUNCHER_DIR:
        raise ConfigError(f"{str(name)!r} is an Accelerate launcher config, not a recipe. Use it to launch a recipe: "
                          f"accelerate launch --config_file {launcher_configs().get(p.stem, cand)} -m kdistill.cli "
                          f"run RECIPE (built-in recipes: `kdistill list`).")
    for c in (cand, cand.with_suffix(".yaml")):
        if c.is_file():
            return c
    known = list_recipes()
    m = close_matches(str(name), known)
    hint = f" Did you mean {' or '.join(repr(x) for x in m)}?" if m else ""
    raise ConfigError(f"recipe {str(name)!r} not found: no such file and no built-in recipe of that name.{hint} "
                      f"Built-in recipes: {', '.join(known) or '(none found)'}.")
