"""Modules with parameters that methods own (projectors, memory banks, heads)."""

from .projectors import FeatureProjector

__all__ = ["FeatureProjector"]
