"""Argument checks shared by the package's public functions."""

from __future__ import annotations


def positive_int(name: str, value) -> int:
    """Returns `value` if it is an int >= 1 (not a bool); else raises ValueError naming the argument `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
