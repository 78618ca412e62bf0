"""Errors that say what was received, what was expected, and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KDistillError(ValueError):
    """Base class for every error kdistill raises on bad input."""


class ConfigError(KDistillError):
    """A recipe or override is invalid."""


class UnknownNameError(KDistillError, KeyError):
    """A registry key, layer name or field name that does not exist."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` candidates that look like ``name`` (difflib ratio, then substring)."""
    cands = list(candidates)
    found = difflib.get_close_matches(name, cands, n=n, cutoff=0.6)
    if len(found) < n:
        low = name.lower()
        for c in cands:
            if c not in found and (low in c.lower() or c.lower() in low) and len(found) < n:
                found.append(c)
    return found


def unknown_name(kind: str, name: str, candidates: Iterable[str], fix: str = "") -> UnknownNameError:
    """Build the standard 'unknown X' error with close matches and the full list when short."""
    cands = sorted(candidates)
    matches = close_matches(name, cands)
    msg = f"unknown {kind} {name!r}."
    if matches:
        msg += " Did you mean " + " or ".join(repr(m) for m in matches) + "?"
    if len(cands) <= 40:
        msg += f" Expected one of: {', '.join(cands)}."
    else:
        msg += f" ({len(cands)} {kind}s exist.)"
    if fix:
        msg += f" {fix}"
    return UnknownNameError(msg)


def expect(cond: bool, what: str, got: object, expected: str, fix: str = "") -> None:
    """Raise ``KDistillError`` unless ``cond``: "<what>: got <got>, expected <expected>. <fix>"."""
    if not cond:
        msg = f"{what}: got {got!r}, expected {expected}."
        if fix:
            msg += f" {fix}"
        raise KDistillError(msg)
