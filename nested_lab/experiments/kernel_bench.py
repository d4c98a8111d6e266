"""Speed of the memory kernels against their per-token references, measured side by side.

For each sequence length the candidates of one kernel -- the per-token recurrence and the
chunked forms -- run on the same random inputs, taking turns round after round
(:func:`nested_lab.experiments.bench.interleaved_timings`), and every chunked output is compared with the
reference's. :func:`scaling` returns one row per (length, candidate): best seconds per call,
the speed-up over the reference measured in the same run, and the largest absolute difference.
:func:`delta_rule_matmul_fraction` reads the chunked delta rule's speed as a fraction of the
machine's batched matrix product, timed side by side.
:func:`titans_staleness` measures what the chunked Titans forms give up against the exact
per-token recurrence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from nested_lab import runtime
from nested_lab.experiments import bench
from nested_lab.memory.delta_rule import delta_rule_chunked, delta_rule_recurrent
from nested_lab.memory.titans import GRADIENTS_AT, init_memory, titans_chunked, titans_sequential

Candidates = Mapping[str, Callable[[], torch.Tensor]]


def delta_rule_candidates(length: int, heads: int = 4, dim: int = 64, chunk_size: int = 64,
                          seed: int = 0, other_chunk_sizes: Sequence[int] = (32,)) -> Candidates:
    """The recurrent delta rule (the reference, first) and the chunked form with each inverse at
    ``chunk_size``, then the triangular-solve form at each of ``other_chunk_sizes`` (named
    ``"delta: chunked, triangular solve, chunk C"``), on ``(1, heads, length, dim)`` unit keys and
    queries, Gaussian values and ``beta`` in (0, 1)."""
    gen = runtime.generator(seed)
    q, k = (F.normalize(torch.randn(1, heads, length, dim, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(1, heads, length, dim, generator=gen)
    beta = torch.rand(1, heads, length, generator=gen)
    candidates = {
        "delta: recurrent": lambda: delta_rule_recurrent(q, k, v, beta)[0],
        "delta: chunked, triangular solve": lambda: delta_rule_chunked(q, k, v, beta, chunk_size)[0],
        "delta: chunked, row substitution": lambda: delta_rule_chunked(q, k, v, beta, chunk_size,
                                                                       inverse="substitution")[0],
    }
    for size in other_chunk_sizes:
        candidates[f"delta: chunked, triangular solve, chunk {size}"] = (
            lambda size=size: delta_rule_chunked(q, k, v, beta, size)[0])
    return candidates


def titans_candidates(length: int, heads: int = 4, dim: int = 64, chunk_size: int = 64,
                      seed: int = 0) -> Candidates:
    """The sequential Titans memory with gradients refreshed every ``chunk_size`` tokens (the
    chunk-parallel semantics; the reference, first) and the chunk-parallel form in its two gradient
    forms (``"Titans: chunk-parallel"`` is the default, factored one; ``", vmap"`` takes per-token
    gradients with ``torch.func``); 2-layer memory, ``heads`` independent sequences of ``length``
    tokens, fixed gates."""
    gen = runtime.generator(seed)
    params = init_memory(dim, depth=2, generator=gen)
    keys, queries = (F.normalize(torch.randn(heads, length, dim, generator=gen), dim=-1) for _ in range(2))
    values = torch.randn(heads, length, dim, generator=gen)
    gates = {"theta": 0.02, "eta": 0.5, "alpha": 0.02}
    return {
        "Titans: sequential": lambda: titans_sequential(params, keys, values, queries, gradient_every=chunk_size,
                                                        **gates)[0],
        "Titans: chunk-parallel": lambda: titans_chunked(params, keys, values, queries, chunk_size=chunk_size,
                                                         **gates)[0],
        "Titans: chunk-parallel, vmap": lambda: titans_chunked(params, keys, values, queries, chunk_size=chunk_size,
                                                               gradient_form="vmap", **gates)[0],
    }


def scaling(make_candidates: Callable[[int], Candidates], lengths: Sequence[int], rounds: int = 3,
            calls: int = 1) -> pd.DataFrame:
    """Time the candidates of ``make_candidates(length)`` for every length, warm, best of ``rounds``
    (gradients off). Columns: ``length, candidate, seconds, speedup`` (reference seconds / seconds,
    the reference being the first candidate) and ``max_error`` (largest absolute difference of the
    outputs from the reference's)."""
    if not lengths:
        raise ValueError("give at least one sequence length")
    rows = []
    with torch.no_grad():
        for length in runtime.progress(lengths, desc="sequence lengths"):
            candidates = make_candidates(length)
            reference_name = next(iter(candidates))
            reference = candidates[reference_name]()
            errors = {name: float((run() - reference).abs().max()) for name, run in candidates.items()}
            seconds = bench.interleaved_timings(candidates, rounds=rounds, calls=calls, warmup=1)
            rows += [{"length": length, "candidate": name, "seconds": seconds[name],
                      "speedup": seconds[reference_name] / seconds[name], "max_error": errors[name]}
                     for name in candidates]
    return pd.DataFrame(rows)


def delta_rule_matmul_fraction(length: int, heads: int = 4, dim: int = 64, chunk_size: int = 64,
                               seed: int = 0, rounds: int = 3) -> dict[str, float]:
    """How close the chunked delta rule comes to the machine's batched matrix product: the kernel at
    ``chunk_size`` on the inputs of :func:`delta_rule_candidates` and a ``torch.bmm`` of 256
    ``dim x dim`` matrices, timed in the same interleaved rounds so that both see the same machine.
    Returns ``kernel_gflops`` (:func:`bench.delta_rule_flops` over the best round), ``matmul_gflops``
    and their ratio ``fraction``."""
    kernel = delta_rule_candidates(length, heads, dim, chunk_size, seed,
                                   other_chunk_sizes=())["delta: chunked, triangular solve"]
    product, product_flops = bench.batched_matmul(dim, batch=256)
    with torch.no_grad():
        seconds = bench.interleaved_timings({"kernel": kernel, "matmul": product}, rounds=rounds, calls=3, warmup=1)
    kernel_gflops = bench.delta_rule_flops(1, heads, length, dim, dim, chunk_size) / seconds["kernel"] / 1e9
    matmul_gflops = product_flops / seconds["matmul"] / 1e9
    return {"kernel_gflops": kernel_gflops, "matmul_gflops": matmul_gflops, "fraction": kernel_gflops / matmul_gflops}


def titans_staleness(length: int = 256, chunk_sizes: Sequence[int] = (4, 16, 64), seed: int = 0) -> pd.DataFrame:
    """What taking gradients at stale weights costs: the relative error
    ``|y - y_exact| / |y_exact|`` of the chunk-parallel Titans memory against the exact per-token
    recurrence, for gradients at each chunk's start (the paper) and at the call's start (the
    common approximation). 2-layer memory, 4 sequences of ``length`` tokens, fixed gates."""
    gen = runtime.generator(seed)
    params = init_memory(64, depth=2, generator=gen)
    keys, queries = (F.normalize(torch.randn(4, length, 64, generator=gen), dim=-1) for _ in range(2))
    values = torch.randn(4, length, 64, generator=gen)
    gates = {"theta": 0.02, "eta": 0.5, "alpha": 0.02}
    with torch.no_grad():
        exact = titans_sequential(params, keys, values, queries, **gates)[0]
        rows = [{"chunk size": size, "gradients at": where,
                 "relative error": float((titans_chunked(params, keys, values, queries, chunk_size=size,
                                                         gradients_at=where, **gates)[0] - exact).norm()
                                         / exact.norm())}
                for size in chunk_sizes for where in GRADIENTS_AT]
    return pd.DataFrame(rows)
