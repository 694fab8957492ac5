"""Argument checks that name the bad setting, its value and what was expected (one ``ValueError`` line)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def check_number(
    name: str,
    value: Any,
    low: float,
    high: float | None = None,
    *,
    integer: bool = False,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` and ``value`` unless ``low (<|<=) value (<|<=) high``."""
    is_number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    ok = is_number and (value > low if low_open else value >= low)
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        kind = "an integer" if integer else "a number"
        lo = f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f" and {'<' if high_open else '<='} {high}"
        raise ValueError(f"{name}={value!r} is invalid: expected {kind} {lo}{hi}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``name``, ``value`` and the valid choices unless ``value in choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is invalid: expected one of {list(choices)}")
