"""The docs stay in step with the code: methods tables, the two commands, every Python snippet runs."""

from pathlib import Path

import pytest

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


def _python_snippets() -> list[tuple[str, str]]:
    import re

    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, m in enumerate(re.finditer(r"```python\n(.*?)```", path.read_text(), re.S)):
            out.append((f"{path.name}#{i}", m.group(1)))
    return out


def test_the_public_functions_survive_importing_every_subpackage():
    """`import kdistill.<sub>` rebinds the attribute `kdistill.<sub>`: no public function may share a subpackage's
    name (the README's `kdistill.export(...)` once crashed with "'module' object is not callable")."""
    import importlib
    import pkgutil

    import kdistill

    for info in pkgutil.walk_packages(kdistill.__path__, "kdistill."):
        if info.name.count(".") == 1:
            try:
                importlib.import_module(info.name)
            except ImportError:
                pass  # an optional dependency; its name still cannot clash (checked below)
    subpackages = {i.name for i in pkgutil.iter_modules(kdistill.__path__)}
    for name in kdistill.__all__:
        assert name not in subpackages, f"kdistill.{name} is both a public function and a subpackage"
        if name != "__version__":
            assert callable(getattr(kdistill, name)), name


@pytest.mark.slow
@pytest.mark.resources
def test_every_python_snippet_in_the_readme_and_docs_runs(tmp_path, monkeypatch):
    """Executes every ```python block of README.md and docs/*.md, in order, in an empty folder. The names a
    snippet uses without defining (its placeholders: logits, a mask, models, a loader) come from here, shaped as
    the snippet's comments say; a run folder a snippet loads is made by a tiny run of the same task."""
    import sys

    import torch

    from kdistill.data import TensorDictDataset, make_loader
    from kdistill.models import build_cnn, build_mlp

    snippets = _python_snippets()
    assert len(snippets) >= 4
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 40, generator=g), torch.randint(0, 10, (64,), generator=g)
    placeholders = {
        "student_logits": torch.randn(2, 5, 11, generator=g), "teacher_logits": torch.randn(2, 5, 11, generator=g),
        "mask": torch.rand(2, 5, generator=g) > 0.3,
        # the default recipe's models (blocks.1 of the student, blocks.3 of the teacher exist)
        "student": build_mlp((40,), 10, width=128, depth=2), "teacher": build_cnn((40,), 10, width=48, depth=4),
        "loader": make_loader(TensorDictDataset(inputs=x, labels=y), 32, seed=0),
    }
    if any("runs/minilm_to_2layer" in code for _, code in snippets):
        sys.path.insert(0, str(ROOT / "tests" / "tasks"))
        from test_embedding import TINY

        from kdistill.api import run

        run(TINY, output=tmp_path / "runs" / "minilm_to_2layer", progress=False, quiet=True)
    for where, code in snippets:
        namespace = dict(placeholders)
        try:
            exec(compile(code, where, "exec"), namespace)
        except Exception as e:  # name the snippet: the traceback alone points into a string
            raise AssertionError(f"the Python snippet {where} fails: {type(e).__name__}: {e}") from e
