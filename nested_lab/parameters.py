"""Checks for a notebook's parameters cell, so a bad papermill override fails
at once with a message naming the parameter and what is allowed; and
:func:`check_positive_ints`, :func:`check_ints_at_least` and :func:`check_numbers`
for the library's own arguments (``TypeError`` for a wrong type, ``ValueError``
for a value out of range)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"parameter {name} must be True or False, got {type(value).__name__} ({value!r})")
    return value


def check_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"parameter {name} must be an int, got {type(value).__name__} ({value!r})")
    _check_range(name, value, minimum, maximum)
    return value


def check_float(name: str, value: object, minimum: float | None = None, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"parameter {name} must be a number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value):
        raise ValueError(f"parameter {name} must be finite, got {value!r}")
    _check_range(name, value, minimum, maximum)
    return float(value)


def check_floats(name: str, values: object, minimum: float | None = None,
                 maximum: float | None = None) -> list[float]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
        raise TypeError(f"parameter {name} must be a non-empty list of numbers, got {values!r}")
    return [check_float(f"{name}[{i}]", v, minimum, maximum) for i, v in enumerate(values)]


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"parameter {name}={value!r} is not allowed; choose one of {list(allowed)}")
    return value


def check_positive_ints(**values: object) -> None:
    """For library arguments: each value must be an int >= 1 (the message names the argument)."""
    check_ints_at_least(1, **values)


def check_ints_at_least(minimum: int, /, **values: object) -> None:
    """For library arguments: each value must be an int (not a bool; numpy integers count) >=
    ``minimum``; a value of another type raises ``TypeError``, one below ``minimum`` ``ValueError``."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_numbers(**values: object) -> None:
    """For library arguments: each value must be a real number (an int or a float, not a bool);
    otherwise ``TypeError`` naming the argument. Ranges are the caller's to check."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")


def _check_range(name: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise ValueError(f"parameter {name} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"parameter {name} must be <= {maximum}, got {value!r}")
