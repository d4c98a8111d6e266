"""A non-stationary regression stream with a slow and a fast component, for the Continuum Memory
System: a slowly drifting map plus one of a few recurring maps that switch quickly.

At step ``t`` a batch has inputs ``x ~ N(0, I_d)`` and targets

    y = A(t) x + B_{m(t)} x + noise,      A(t) = cos(phi_t) A + sin(phi_t) A',   phi_t = drift * t / steps,
    m(t) = floor(t / switch_every) mod modes,

where ``A``, ``A'`` and ``B_1 .. B_M`` are fixed maps with entries ``N(0, 1 / d)`` (the ``B`` scaled
by ``fast_scale``) and ``noise ~ N(0, noise^2)``. The slow map turns by ``drift`` radians over the
whole stream (at ``pi / 2`` it ends at ``A'``); the fast modes take turns in a fixed cycle, so each
returns after ``(modes - 1) * switch_every`` steps away, which lets forgetting be measured.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from nested_lab.parameters import check_positive_ints, check_range


class DriftBatch(NamedTuple):
    x: Tensor  # [batch, dim]
    y: Tensor  # [batch, dim]
    mode: int  # which fast map is active


def mode_at(step: int, modes: int, switch_every: int) -> int:
    """The fast mode active at ``step``: ``floor(step / switch_every) mod modes``."""
    return (step // switch_every) % modes


def drift_stream(steps: int, dim: int, generator: torch.Generator, *, batch_size: int = 16, modes: int = 3,
                 switch_every: int = 50, drift: float = math.pi / 2, fast_scale: float = 1.0,
                 noise: float = 0.0) -> Iterator[DriftBatch]:
    """``steps`` batches of the stream, all drawn from ``generator`` (the maps first, at the call).

    Arguments are checked at the call, not at the first batch.
    """
    check_positive_ints(steps=steps, dim=dim, batch_size=batch_size, modes=modes, switch_every=switch_every)
    check_range("drift", drift)
    check_range("fast_scale", fast_scale, 0)
    check_range("noise", noise, 0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    scale = 1 / math.sqrt(dim)
    slow_start, slow_end = (torch.randn(dim, dim, generator=generator) * scale for _ in range(2))
    fast = torch.randn(modes, dim, dim, generator=generator) * scale * fast_scale
    return _batches(steps, batch_size, slow_start, slow_end, fast, switch_every, drift, noise, generator)


def _batches(steps: int, batch_size: int, slow_start: Tensor, slow_end: Tensor, fast: Tensor, switch_every: int,
             drift: float, noise: float, generator: torch.Generator) -> Iterator[DriftBatch]:
    dim, modes = slow_start.shape[0], fast.shape[0]
    for step in range(steps):
        angle = drift * step / steps
        mode = mode_at(step, modes, switch_every)
        target_map = math.cos(angle) * slow_start + math.sin(angle) * slow_end + fast[mode]
        x = torch.randn(batch_size, dim, generator=generator)
        y = x @ target_map.T
        if noise > 0:
            y = y + noise * torch.randn(batch_size, dim, generator=generator)
        yield DriftBatch(x, y, mode)
