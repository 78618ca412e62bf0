"""Task runners; importing this module registers every task in ``TASKS``."""

from . import (
    blackbox,  # noqa: F401
    classification,  # noqa: F401
    dataset_distillation,  # noqa: F401
    diffusion,  # noqa: F401
    embedding,  # noqa: F401
    graph,  # noqa: F401
    llm,  # noqa: F401
    tabular,  # noqa: F401
)
from .base import RunContext, Task

__all__ = ["RunContext", "Task"]
