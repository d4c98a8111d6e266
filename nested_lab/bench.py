"""Benchmark helpers: timings measured side by side in one run, reported as ratios.

A single timing on a shared 2-core machine moves by tens of percent from one
minute to the next; a ratio of two timings taken in the same minute does not.
:func:`interleaved_rounds` runs every candidate once per round, round after
round, so that every candidate sees the same machine, and returns every round;
a ratio can then be taken round by round. :func:`interleaved_timings` keeps each
candidate's best round, and :func:`ratios` divides timings by a reference.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


def interleaved_rounds(candidates: Mapping[str, Callable[[], object]], rounds: int = 3, calls: int = 10,
                       warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each candidate in each of ``rounds`` rounds; in every round each
    candidate makes ``calls`` calls, the candidates taking turns. ``warmup`` untimed calls first."""
    if not candidates:
        raise ValueError("give at least one candidate to time")
    if min(rounds, calls) < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1, calls >= 1 and warmup >= 0, got {rounds}, {calls}, {warmup}")
    for run in candidates.values():
        for _ in range(warmup):
            run()
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            seconds[name].append((time.perf_counter() - start) / calls)
    return seconds


def interleaved_timings(candidates: Mapping[str, Callable[[], object]], rounds: int = 3, calls: int = 10,
                        warmup: int = 2) -> dict[str, float]:
    """Best round of :func:`interleaved_rounds`: seconds per call of each candidate."""
    return {name: min(values) for name, values in interleaved_rounds(candidates, rounds, calls, warmup).items()}


def ratios(timings: Mapping[str, float], reference: str) -> dict[str, float]:
    """Each timing divided by the ``reference`` one."""
    if reference not in timings:
        raise ValueError(f"reference {reference!r} is not one of {list(timings)}")
    return {name: seconds / timings[reference] for name, seconds in timings.items()}
