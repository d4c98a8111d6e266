"""Checks at the door: one helper for a number's type and range, one for a choice among names.

Library entry points (configs, constructors, experiment functions) call :func:`check_range`
and :func:`check_choice`; a notebook checks its parameters cell with one call,
:func:`check_parameters`, from a spec of names, types and ranges::

    check_parameters(globals(), QUICK=boolean(), SEED=integer(0), LR=number(0, low_open=True))

A value of the wrong type raises ``TypeError``, a value outside its range or choices
``ValueError``; each message names the argument (a notebook parameter as ``parameter NAME``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def check_range(name: str, value: object, low: float | None = None, high: float | None = None, *,
                integer: bool = False, low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as an int (``integer=True``; numpy integers count, bools do not) or a finite real
    number, inside ``[low, high]`` (an end is open with ``low_open`` / ``high_open``, absent when
    None). Returns the value (a float unless ``integer``)."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        article = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {article}, got {type(value).__name__} ({value!r})")
    finite = "" if integer else "finite and "
    if not integer and not math.isfinite(value):
        bounds = _interval(low, high, low_open, high_open)
        raise ValueError(f"{name} must be {finite + bounds if bounds else 'finite'}, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be {finite}{_interval(low, high, low_open, high_open)}, got {value!r}")
    return int(value) if integer else float(value)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """``value`` must be one of the names in ``allowed``."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
    return value


def check_positive_ints(**values: object) -> None:
    """Each keyword value must be an int >= 1 (:func:`check_range` with ``integer=True``)."""
    check_ints_at_least(1, **values)


def check_ints_at_least(minimum: int, /, **values: object) -> None:
    """Each keyword value must be an int >= ``minimum``."""
    for name, value in values.items():
        check_range(name, value, minimum, integer=True)


def check_numbers(**values: object) -> None:
    """Each keyword value must be a real number (an int or a float, not a bool); the type only."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")


# ----- a notebook's parameters cell ----------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """What one notebook parameter may hold: ``kind`` is bool, int, float, ints, floats or choice."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    allowed: tuple[str, ...] = ()

    def check(self, name: str, value: object) -> object:
        """``value`` if this spec allows it (numbers as int or float); otherwise the error."""
        if self.kind == "bool" and not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {type(value).__name__} ({value!r})")
        if self.kind == "choice":
            return check_choice(name, value, self.allowed)
        if self.kind in ("ints", "floats"):
            if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
                raise TypeError(f"{name} must be a non-empty list of numbers, got {value!r}")
            return [self._number(f"{name}[{i}]", item, self.kind == "ints") for i, item in enumerate(value)]
        return value if self.kind == "bool" else self._number(name, value, self.kind == "int")

    def _number(self, name: str, value: object, integer: bool) -> float:
        return check_range(name, value, self.low, self.high, integer=integer,
                           low_open=self.low_open, high_open=self.high_open)


def boolean() -> Spec:
    return Spec("bool")


def integer(low: int | None = None, high: int | None = None) -> Spec:
    return Spec("int", low, high)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Spec:
    return Spec("float", low, high, low_open, high_open)


def integer_list(low: int | None = None, high: int | None = None) -> Spec:
    return Spec("ints", low, high)


def number_list(low: float | None = None, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False) -> Spec:
    return Spec("floats", low, high, low_open, high_open)


def choice(*allowed: str) -> Spec:
    return Spec("choice", allowed=allowed)


def check_parameters(namespace: Mapping[str, object], /, **spec: Spec) -> None:
    """Check a notebook's parameters: ``namespace`` (the notebook's ``globals()``) must hold each
    name of ``spec`` with a value the spec allows; an error names it as ``parameter NAME``."""
    for name, rule in spec.items():
        if name not in namespace:
            raise NameError(f"parameter {name} is not defined in the parameters cell")
        rule.check(f"parameter {name}", namespace[name])
