"""Every built-in recipe validates (no model is loaded)."""

from kdistill.config import load_config
from kdistill.recipes import list_recipes


def test_every_recipe_validates():
    names = list_recipes()
    validated = [n for n in names if load_config(n) is not None]
    # counts what it validated, so a recipe folder that silently empties fails this test
    assert len(validated) == len(names) >= 27
    assert "classic/mnist1d" in validated
    print(f"validated {len(validated)} recipes")
