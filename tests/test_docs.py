"""The methods tables stay in step with the registry."""

from pathlib import Path

import kdistill.methods  # noqa: F401
from kdistill.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]


def test_every_registered_method_is_in_the_readme_and_the_methods_doc():
    readme = (ROOT / "README.md").read_text()
    doc = (ROOT / "docs" / "methods.md").read_text()
    missing = [n for n in METHODS.names() if f"`{n}`" not in readme or f"`{n}`" not in doc]
    assert not missing, f"add these methods to README.md and docs/methods.md: {missing}"
    assert len(METHODS.names()) >= 23


def test_readme_keeps_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
