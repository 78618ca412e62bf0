"""Task runners; importing this module registers every task in ``TASKS``."""

from . import classification  # noqa: F401
from . import blackbox  # noqa: F401
from . import embedding  # noqa: F401
from . import llm  # noqa: F401
from . import tabular  # noqa: F401
from .base import RunContext, Task

__all__ = ["RunContext", "Task"]
