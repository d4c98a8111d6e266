"""Benchmark helpers: timings measured side by side in one run, reported as ratios.

A single timing on a busy machine can move by tens of percent from one minute
to the next; a ratio of two timings taken in the same minute does not.
:func:`interleaved_rounds` runs every candidate once per round, round after
round, so that every candidate sees the same machine, and returns every round;
a ratio can then be taken round by round. :func:`interleaved_timings` keeps each
candidate's best round, and :func:`ratios` divides timings by a reference.

:func:`batched_matmul_gflops` measures what the machine's batched matrix product
delivers, and :func:`delta_rule_flops` counts the arithmetic of the chunked delta
rule, so that a timing can be read as a fraction of what the hardware does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import torch

from nested_lab import runtime
from nested_lab.parameters import check_choice, check_ints_at_least, check_positive_ints


def interleaved_rounds(candidates: Mapping[str, Callable[[], object]], rounds: int = 3, calls: int = 10,
                       warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each candidate in each of ``rounds`` rounds; in every round each
    candidate makes ``calls`` calls, the candidates taking turns. ``warmup`` untimed calls first."""
    if not candidates:
        raise ValueError("give at least one candidate to time")
    check_positive_ints(rounds=rounds, calls=calls)
    check_ints_at_least(0, warmup=warmup)
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
    check_choice("reference", reference, list(timings))
    return {name: seconds / timings[reference] for name, seconds in timings.items()}


def batched_matmul(size: int = 64, batch: int = 256) -> tuple[Callable[[], torch.Tensor], float]:
    """A ``torch.bmm`` of two ``(batch, size, size)`` fp32 tensors, ready to time, and its operation
    count ``2 size^3 batch``."""
    check_positive_ints(size=size, batch=batch)
    gen = runtime.generator(0)
    left = torch.randn(batch, size, size, generator=gen)
    right = torch.randn(batch, size, size, generator=gen)
    return (lambda: torch.bmm(left, right)), 2.0 * size**3 * batch


def batched_matmul_gflops(size: int = 64, batch: int = 256, rounds: int = 3) -> float:
    """Measured throughput of :func:`batched_matmul`, in GFLOP/s: its operations over the best
    round's seconds per product."""
    check_positive_ints(rounds=rounds)
    product, flops = batched_matmul(size, batch)
    calls = min(200, max(3, math.ceil(3e7 / flops)))  # rounds of at least ~3e7 operations
    seconds = interleaved_timings({"bmm": product}, rounds=rounds, calls=calls)["bmm"]
    return flops / seconds / 1e9


def delta_rule_flops(batch: int, heads: int, length: int, key_dim: int, value_dim: int,
                     chunk_size: int) -> float:
    """Floating-point operations of the chunked delta rule
    (:func:`nested_lab.memory.delta_rule.delta_rule_chunked`) over ``ceil(length / chunk_size)``
    chunks of every head: its matrix products, ``2 m n k`` each, and the unit lower-triangular solve
    for ``T``, ``C (C - 1)`` per right-hand column. Elementwise work is left out.

    Per chunk of ``C`` tokens: ``A = diag(beta) K K^T``, ``W = T K`` and the scores ``Q K^T``,
    ``2 C^2 Dk`` each; ``U = T V`` and ``tril(Q K^T) delta``, ``2 C^2 Dv`` each; ``W S``, ``K^T delta``
    and ``Q S``, ``2 C Dk Dv`` each; ``T = (I + A)^{-1} diag(beta)``, ``C (C - 1) C``. (For chunks
    larger than ``SOLVE_BLOCK`` the inverse is built from smaller solves and products, somewhat fewer
    operations than the one solve counted here.)
    """
    check_positive_ints(batch=batch, heads=heads, length=length, key_dim=key_dim, value_dim=value_dim,
                         chunk_size=chunk_size)
    c, dk, dv = chunk_size, key_dim, value_dim
    per_chunk = 3 * (2 * c * c * dk) + 2 * (2 * c * c * dv) + 3 * (2 * c * dk * dv) + c * (c - 1) * c
    return float(batch * heads * math.ceil(length / chunk_size) * per_chunk)

