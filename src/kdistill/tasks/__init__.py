"""Task runners; importing this module registers every task in ``TASKS``."""

from . import classification  # noqa: F401
from .base import RunContext, Task

__all__ = ["RunContext", "Task"]
