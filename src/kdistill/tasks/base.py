"""What a task is: a config schema plus a runner that returns the report dict."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel


@dataclass
class RunContext:
    """Where and how a run happens (set by ``kdistill.run``, never read from the recipe)."""

    output: Path
    resume: bool = False
    progress: bool = True


@dataclass
class Task:
    name: str
    config_model: type[BaseModel]
    run: Callable[[Any, RunContext], dict[str, Any]]
    description: str = ""
    #: ``kdistill select``: ``(config, output folder, progress) -> summary``; None for tasks without data selection
    select: Callable[[Any, Path, bool], dict[str, Any]] | None = None
    #: ``kdistill design``: ``(config, output folder, *, budget, capacity_gap, progress) -> summary``; None for tasks
    #: without a student search
    design: Callable[..., dict[str, Any]] | None = None
