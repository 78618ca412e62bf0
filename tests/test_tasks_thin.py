"""The task runners wire components; they never name a method or read a method's keyword arguments (a method
declares what it needs through hooks on ``Method``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import kdistill.methods  # noqa: F401  (fills the registry)
from kdistill.config import ALONE
from kdistill.registry import METHODS

TASKS = sorted((Path(kdistill.methods.__file__).parents[1] / "tasks").glob("*.py"))


def _string_constants(tree: ast.AST) -> set[str]:
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings}


@pytest.mark.parametrize("path", TASKS, ids=lambda p: p.name)
def test_tasks_name_no_method(path: Path) -> None:
    strings = _string_constants(ast.parse(path.read_text()))
    named = sorted((set(METHODS.names()) - {ALONE}) & strings)  # 'none' is also an ordinary word; ALONE names it
    assert not named, f"{path.name} names methods {named}; declare a hook on Method instead"


@pytest.mark.parametrize("path", TASKS, ids=lambda p: p.name)
def test_tasks_read_no_method_kwarg(path: Path) -> None:
    src = path.read_text()
    reads = re.findall(r"method\w*\.kwargs\s*(?:\[|\.get\()", src)
    # the temperature kwarg the tasks once validated and defaulted themselves (a method's cache_identity says it)
    # (as a string, an attribute or a schema field; a component's own keyword ``kd_temperature=`` is fine)
    reads += re.findall(r"[\"'.]kd_temperature\b|\bkd_temperature\s*:", src)
    assert not reads, f"{path.name} reads a method's kwargs ({reads}); let the method declare what it needs"


def test_the_check_catches_a_method_name() -> None:
    tree = ast.parse('def f(cfg):\n    """dkd in a docstring is fine"""\n    return cfg.method.name == "dkd"\n')
    assert "dkd" in _string_constants(tree) & set(METHODS.names())
