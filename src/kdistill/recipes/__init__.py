"""The built-in recipes: YAML files shipped inside this package (``kdistill/recipes/<task>/<name>.yaml``, so a
wheel install has them; ``recipes/`` at the repository root links here)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from ..errors import ConfigError, close_matches

DEFAULT_RECIPE = "classic/mnist1d"


def recipes_dir() -> Path:
    """The folder of the built-in recipes, found through the installed package (never beside it)."""
    return Path(str(files(__name__)))


def list_recipes() -> list[str]:
    root = recipes_dir()
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def find_recipe(name: str | Path) -> Path:
    """A path to an existing file, or a built-in name like ``classic/mnist1d`` (``.yaml`` optional)."""
    p = Path(name)
    if p.is_file():
        return p
    cand = recipes_dir() / p
    for c in (cand, cand.with_suffix(".yaml")):
        if c.is_file():
            return c
    known = list_recipes()
    m = close_matches(str(name), known)
    hint = f" Did you mean {' or '.join(repr(x) for x in m)}?" if m else ""
    raise ConfigError(f"recipe {str(name)!r} not found: no such file and no built-in recipe of that name.{hint} "
                      f"Built-in recipes: {', '.join(known) or '(none found)'}.")
