"""Stability guards of the CortexGPT phase-1 summary: loss-spike detection and
rollback to a recovery checkpoint.

"Loss spike detection: automatically detects when loss increases > 5x average;
recovery checkpoints: saves model state periodically for rollback capability."
:class:`SpikeGuard` keeps the last ``window`` healthy losses; a loss that is not
finite, or above ``factor`` times their mean, is a spike. Every
``checkpoint_every`` healthy steps it saves a recovery checkpoint: a deep copy of
whatever state the trainer hands it (parameters, optimizer and scheduler states,
the memories, the step count). On a spike the trainer restores that checkpoint
exactly and goes on with the next batch. The guard also keeps the best
checkpoint (lowest mean loss over a checkpoint interval), which a spike never replaces.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nested_lab.parameters import check_positive_ints, check_range


@dataclass
class Checkpoint:
    step: int
    state: dict
    mean_loss: float


class SpikeGuard:
    """Detects loss spikes and holds the recovery and best checkpoints."""

    def __init__(self, factor: float = 5.0, window: int = 50, warmup: int = 10, checkpoint_every: int = 25) -> None:
        check_range("factor", factor, 1, low_open=True)
        check_positive_ints(window=window, warmup=warmup, checkpoint_every=checkpoint_every)
        self.factor, self.warmup, self.checkpoint_every = factor, warmup, checkpoint_every
        self.losses: deque[float] = deque(maxlen=window)
        self.recovery: Checkpoint | None = None
        self.best: Checkpoint | None = None
        self.rollbacks = 0

    def start(self, capture: Callable[[], dict]) -> None:
        """Save the initial state as the first recovery checkpoint (step 0)."""
        self.recovery = Checkpoint(0, copy.deepcopy(capture()), math.inf)

    def is_spike(self, loss: float) -> bool:
        """True for a non-finite loss or one above ``factor`` x the mean of recent healthy losses."""
        if not math.isfinite(loss):
            return True
        return len(self.losses) >= self.warmup and loss > self.factor * sum(self.losses) / len(self.losses)

    def healthy(self, loss: float, step: int, capture: Callable[[], dict]) -> None:
        """Record a healthy loss at optimizer step ``step``; save checkpoints when due."""
        self.losses.append(loss)
        if step % self.checkpoint_every:
            return
        recent = list(self.losses)[-self.checkpoint_every:]
        checkpoint = Checkpoint(step, copy.deepcopy(capture()), sum(recent) / len(recent))
        self.recovery = checkpoint
        if self.best is None or checkpoint.mean_loss < self.best.mean_loss:
            self.best = checkpoint

    def rollback(self, restore: Callable[[dict], None]) -> int:
        """Hand a copy of the recovery checkpoint to ``restore``; returns its step."""
        if self.recovery is None:
            raise RuntimeError("no recovery checkpoint: call start() before training")
        self.rollbacks += 1
        restore(copy.deepcopy(self.recovery.state))
        return self.recovery.step


def same_state(a, b) -> bool:
    """Exact equality of two captured states: nested dicts, lists, tuples, dataclasses,
    tensors (same dtype, shape and values) and plain values."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and same_state(dataclasses.asdict(a), dataclasses.asdict(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b
