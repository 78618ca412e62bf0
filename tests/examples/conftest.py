import json

import pytest
from typer.testing import CliRunner

from kdistill.cli import app


@pytest.fixture
def example(tmp_path, monkeypatch):
    """``example("examples/<name>", *args, output="run")`` runs a recipe with the CLI in ``tmp_path`` (where the
    test wrote its data) with a private cache; returns the CLI result and, when it succeeded, the report."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()

    def run(recipe: str, *args: str, output: str = "run"):
        result = runner.invoke(app, ["run", recipe, "-o", output, "--no-progress", *args])
        report = tmp_path / output / "report.json"
        return result, json.loads(report.read_text()) if result.exit_code == 0 else None

    run.cli = lambda *args: runner.invoke(app, list(args))
    return run
