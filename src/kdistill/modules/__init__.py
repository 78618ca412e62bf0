"""Modules with parameters that methods own (projectors, memory banks, heads)."""

from .banks import FifoQueue
from .projectors import FeatureProjector

__all__ = ["FeatureProjector", "FifoQueue"]
