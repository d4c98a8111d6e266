"""Capacity curves of associative memories: write ``N`` key -> value pairs, then read every key.

The keys are random unit vectors and the values random Gaussian vectors in ``d`` dimensions
(:func:`random_pairs`). A memory is written with the pairs in order and read, after the last
write, with every key (:func:`write_then_read`); :func:`recall_scores` says how close each read
is to its value. The load ``N / d`` is the x-axis of a capacity curve (:func:`capacity_curve`).

The rules (all in the row convention ``read(k) = k S``):

* ``"hebbian"``: ``S <- S + k^T v``, linear attention's rule. Exact for orthonormal keys; with
  random keys every read carries the cross-talk ``sum_{j != i} (k_i . k_j) v_j``.
* ``"delta"``: ``S <- S + beta k^T (v - k S)`` (Yang et al. 2024, Eq. 1; option ``beta``, default
  1), which corrects what the memory already returns for ``k`` before writing.
* ``"titans"``: the neural memory of Behrouz et al. 2024 (Eqs. 10, 13), read with
  :func:`~nested_lab.memory.titans.memory_forward`; options ``depth`` (default 2), ``hidden``,
  ``theta`` (default 0.1; ``depth=1``, ``theta=0.5``, ``eta = alpha = 0`` with unit keys is the
  delta rule with ``beta = 1``), ``eta`` (0), ``alpha`` (0), ``chunk_size`` (default 1, the exact
  recurrence) and ``generator`` (the initial weights of a deeper memory; a depth-1 memory
  starts at zero, like the others).
* ``"seed"``: the self-modifying rule ``W <- clamp(W - lr (W k) k^T / |k|^2, -10, 10)`` of
  :func:`nested_lab.models.self_modifying.self_modifying_update`, one pair per call, from
  ``W = 0.01 randn`` (``generator``), read as ``k W^T``; options ``lr`` (default 1e-3),
  ``normalized`` (True). It takes no value: it can store nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from nested_lab import runtime
from nested_lab.memory.delta_rule import delta_rule_recurrent
from nested_lab.memory.self_modifying_rule import self_modifying_update
from nested_lab.memory.titans import init_memory, memory_forward, titans_chunked
from nested_lab.parameters import check_positive_ints

RULE_OPTIONS: dict[str, tuple[str, ...]] = {
    "hebbian": (),
    "delta": ("beta",),
    "titans": ("depth", "hidden", "theta", "eta", "alpha", "chunk_size", "generator"),
    "seed": ("lr", "normalized", "generator"),
}
RULES = tuple(RULE_OPTIONS)
CURVE_COLUMNS = ("rule", "count", "load", "seed", "cosine", "top1")


def random_pairs(count: int, dim: int, generator: torch.Generator, batch: int = 1) -> tuple[Tensor, Tensor]:
    """``count`` pairs per batch element: keys ``[batch, count, dim]`` uniform on the unit sphere
    (normalised Gaussians) and values ``[batch, count, dim]`` standard Gaussian, keys drawn first."""
    check_positive_ints(count=count, dim=dim, batch=batch)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    keys = F.normalize(torch.randn(batch, count, dim, generator=generator), dim=-1)
    values = torch.randn(batch, count, dim, generator=generator)
    return keys, values


def recall_scores(retrieved: Tensor, values: Tensor) -> dict[str, float]:
    """How well ``retrieved`` ``[B, N, D]`` matches ``values`` ``[B, N, D]``, row for row.

    ``"cosine"``: the mean cosine similarity of each read to its value (0 for a zero read);
    ``"top1"``: the fraction of reads whose most similar value (by cosine, among the ``N`` values of
    the same batch element) is their own.
    """
    if not isinstance(retrieved, Tensor) or not isinstance(values, Tensor):
        raise TypeError("retrieved and values must be tensors")
    if retrieved.ndim != 3 or retrieved.shape != values.shape:
        raise ValueError(f"retrieved and values must share a shape [batch, count, dim], got "
                         f"{tuple(retrieved.shape)} and {tuple(values.shape)}")
    reads, targets = F.normalize(retrieved, dim=-1), F.normalize(values, dim=-1)
    similarity = reads @ targets.mT  # [B, N, N]: read i against value j
    own = torch.arange(values.shape[1], device=values.device)
    return {"cosine": float(similarity.diagonal(dim1=-2, dim2=-1).mean()),
            "top1": float((similarity.argmax(dim=-1) == own).float().mean())}


def write_then_read(rule: str, keys: Tensor, values: Tensor, **options) -> Tensor:
    """Write every pair of ``keys`` ``[B, N, D_k]``, ``values`` ``[B, N, D_v]`` in order with ``rule``
    (one memory per batch element), then read every key: returns ``[B, N, D_v]``.

    Rules and options: see the module docstring (:data:`RULE_OPTIONS` lists the option names).
    """
    if rule not in RULE_OPTIONS:
        raise ValueError(f"unknown rule {rule!r}; allowed: {', '.join(RULES)}")
    unknown = sorted(set(options) - set(RULE_OPTIONS[rule]))
    if unknown:
        raise ValueError(f"unknown options {unknown} for rule {rule!r}; allowed: "
                         f"{', '.join(RULE_OPTIONS[rule]) or 'none'}")
    if not isinstance(keys, Tensor) or not isinstance(values, Tensor):
        raise TypeError("keys and values must be tensors")
    if keys.ndim != 3 or values.ndim != 3 or keys.shape[:2] != values.shape[:2] or keys.shape[1] < 1:
        raise ValueError(f"keys and values must have shapes [batch, count, D_k] and [batch, count, D_v] "
                         f"with count >= 1, got {tuple(keys.shape)} and {tuple(values.shape)}")
    return _WRITERS[rule](keys, values, **options)


def _hebbian(keys: Tensor, values: Tensor) -> Tensor:
    """``S = sum_i k_i^T v_i``, read ``k S``."""
    return keys @ (keys.mT @ values)


def _delta(keys: Tensor, values: Tensor, beta: float = 1.0) -> Tensor:
    """The delta rule from ``S = 0`` (Yang et al. 2024, Eq. 1), read ``k S``."""
    gates = torch.full(keys.shape[:2], float(beta), dtype=keys.dtype, device=keys.device)[:, None]
    _, state = delta_rule_recurrent(keys[:, None], keys[:, None], values[:, None], gates)
    return keys @ state[:, 0]


def _titans(keys: Tensor, values: Tensor, depth: int = 2, hidden: int | None = None, theta: float = 0.1,
            eta: float = 0.0, alpha: float = 0.0, chunk_size: int = 1,
            generator: torch.Generator | None = None) -> Tensor:
    """Titans' memory (Eqs. 10, 13) written with every pair, read with the final weights."""
    params = init_memory(keys.shape[-1], depth, hidden, values.shape[-1], generator)
    if depth == 1:
        params = {name: torch.zeros_like(weight) for name, weight in params.items()}
    params = {name: weight.to(keys) for name, weight in params.items()}
    _, memory = titans_chunked(params, keys, values, keys, theta=theta, eta=eta, alpha=alpha,
                               chunk_size=chunk_size)
    return memory_forward(memory, keys)


def _seed(keys: Tensor, values: Tensor, lr: float = 1e-3, normalized: bool = True,
          generator: torch.Generator | None = None) -> Tensor:
    """The self-modifying rule, one call per key from ``W = 0.01 randn(D_v, D_k)``; read ``k W^T``."""
    generator = runtime.generator(0) if generator is None else generator
    reads = []
    for sequence in keys:
        weight = 0.01 * torch.randn(values.shape[-1], keys.shape[-1], generator=generator).to(keys)
        for key in sequence:
            weight = self_modifying_update(weight, key[None], lr, normalized)
        reads.append(sequence @ weight.T)
    return torch.stack(reads)


_WRITERS = {"hebbian": _hebbian, "delta": _delta, "titans": _titans, "seed": _seed}


def capacity_curve(rule: str, counts: Sequence[int], dim: int, seeds: Sequence[int], **options) -> pd.DataFrame:
    """Recall of ``rule`` after writing ``count`` random pairs in ``dim`` dimensions, for every count
    and seed: columns ``rule, count, load (= count / dim), seed, cosine, top1``.

    Each (count, seed) draws its pairs from ``runtime.generator(seed)``; a rule with a random
    initial memory draws it from the same generator, after the pairs, unless ``generator`` is given.
    """
    if rule not in RULE_OPTIONS:
        raise ValueError(f"unknown rule {rule!r}; allowed: {', '.join(RULES)}")
    check_positive_ints(dim=dim)
    for name, values in (("counts", counts), ("seeds", seeds)):
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
            raise TypeError(f"{name} must be a non-empty sequence of ints, got {values!r}")
    for count in counts:
        check_positive_ints(**{"every count": count})
    rows = []
    for seed in seeds:
        for count in counts:
            generator = runtime.generator(seed)
            keys, values = random_pairs(count, dim, generator)
            extra = {"generator": generator} if "generator" in RULE_OPTIONS[rule] and "generator" not in options else {}
            scores = recall_scores(write_then_read(rule, keys, values, **options, **extra), values)
            rows.append({"rule": rule, "count": count, "load": count / dim, "seed": seed, **scores})
    return pd.DataFrame(rows, columns=list(CURVE_COLUMNS))

