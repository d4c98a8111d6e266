"""The Continuum Memory System (CMS) of Nested Learning (Behrouz et al., NeurIPS 2025), the
replica's trainer for it and the corrected trainer.

The CMS is a chain of MLP levels ``f_1 .. f_k`` applied in sequence,

    y_t = MLP^(f_k)( ... MLP^(f_1)(x_t) )                              (the CMS equation)

where level ``l`` has a chunk size ``C^(l)``: its parameters stay fixed inside a chunk of
``C^(l)`` steps and change once at the chunk's end, by the sum of the chunk's gradient steps,

    theta^(l)_{i+1} = theta^(l)_i - sum_{t = i - C^(l)}^{i} eta_t grad f(theta^(l)_t; x_t)
                                          if i = 0 (mod C^(l)) (steps counted from 1), else unchanged.

With steps counted from 0, :class:`ContinuumMemoryTrainer` (``trainer="correct"``) accumulates
every level's gradient each step and steps a level only after steps with
``(step + 1) % C == 0``, with the SUM of the chunk's gradients; over ``N`` steps a level changes
exactly ``floor(N / C)`` times. ``trainer="original"`` reproduces the replica, which differs in
three ways:

1. its schedule calls a level due when ``step % C == 0``, so step 0 is due for every level
   (``ceil(N / C)`` due steps, :func:`printed_schedule`);
2. on a due step it replaces the level's gradient by the accumulated gradients divided by ``C``
   (the chunk's mean, except at step 0, where one gradient is divided by ``C``) instead of their sum;
3. it never clears the gradient of a level that is not due, so the optimizer steps every level
   with that step's own gradient on every step: the multi-frequency schedule never happens
   (:func:`update_schedule` with ``trainer="original"``), although the printed one looks right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from nested_lab import runtime
from nested_lab.init import uniform_linear
from nested_lab.parameters import check_positive_ints

TRAINERS = ("original", "correct")


def check_chunk_sizes(chunk_sizes: Sequence[int]) -> tuple[int, ...]:
    """``chunk_sizes`` as a tuple, after checking it is a non-empty sequence of ints >= 1."""
    if isinstance(chunk_sizes, str | bytes) or not isinstance(chunk_sizes, Sequence):
        raise TypeError(f"chunk_sizes must be a sequence of ints >= 1 (one per level), got {chunk_sizes!r}")
    if not chunk_sizes:
        raise ValueError("chunk_sizes must name at least one level, got an empty sequence")
    check_positive_ints(**{f"chunk_sizes[{i}]": size for i, size in enumerate(chunk_sizes)})
    return tuple(chunk_sizes)


def check_trainer(trainer: str) -> str:
    if trainer not in TRAINERS:
        raise ValueError(f"unknown trainer {trainer!r}; allowed: {', '.join(TRAINERS)}")
    return trainer


# --- the memory --------------------------------------------------------------------------------

class ContinuumMemory(nn.Module):
    """The CMS chain: one MLP level ``Linear(dim, hidden_dim) -> ReLU -> Linear(hidden_dim, dim)``
    per chunk size, applied in sequence.

    ``residual=False`` is the paper's plain chain. ``residual=True`` makes each level
    ``x + MLP(x)``: a plain chain of randomly initialised MLPs starts far from the identity and
    trains poorly, while the residual form starts near it. The parameters are drawn with
    ``generator`` (default: a generator seeded with 0) as ``nn.Linear`` draws them by default
    (uniform in ``+-1 / sqrt(fan_in)``), never from the global random state.
    """

    def __init__(self, dim: int, hidden_dim: int, chunk_sizes: Sequence[int], residual: bool = False,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_positive_ints(dim=dim, hidden_dim=hidden_dim)
        if not isinstance(residual, bool):
            raise TypeError(f"residual must be True or False, got {residual!r}")
        self.chunk_sizes = check_chunk_sizes(chunk_sizes)
        self.residual = residual
        generator = runtime.generator(0) if generator is None else generator
        self.levels = nn.ModuleList(_mlp(dim, hidden_dim, generator) for _ in self.chunk_sizes)

    def forward(self, x: Tensor) -> Tensor:
        for level in self.levels:
            x = x + level(x) if self.residual else level(x)
        return x


def _mlp(dim: int, hidden_dim: int, generator: torch.Generator) -> nn.Sequential:
    return nn.Sequential(uniform_linear(dim, hidden_dim, generator), nn.ReLU(), uniform_linear(hidden_dim, dim, generator))


# --- schedules ---------------------------------------------------------------------------------

def update_schedule(chunk_sizes: Sequence[int], steps: int, trainer: str = "correct") -> np.ndarray:
    """Which level's parameters change at which step: a bool array ``[levels, steps]``.

    ``"correct"``: after steps with ``(step + 1) % C == 0``. ``"original"``: every level on every
    step, which is what the replica's trainer does (see :func:`printed_schedule` for what it
    claims to do).
    """
    chunk_sizes = check_chunk_sizes(chunk_sizes)
    check_positive_ints(steps=steps)
    if check_trainer(trainer) == "original":
        return np.ones((len(chunk_sizes), steps), dtype=bool)
    step = np.arange(steps)
    return np.stack([(step + 1) % size == 0 for size in chunk_sizes])


def printed_schedule(chunk_sizes: Sequence[int], steps: int) -> np.ndarray:
    """The replica's printed "due" schedule, ``step % C == 0``: a bool array ``[levels, steps]``
    with ``ceil(steps / C)`` due steps per level, step 0 due for all. Its trainer ignores it."""
    chunk_sizes = check_chunk_sizes(chunk_sizes)
    check_positive_ints(steps=steps)
    step = np.arange(steps)
    return np.stack([step % size == 0 for size in chunk_sizes])


# --- the trainer -------------------------------------------------------------------------------

class ContinuumMemoryTrainer:
    """Backward, the CMS schedule and ``optimizer.step()`` for one loss at a time.

    ``model`` contains ``memory``; its other parameters (e.g. a read-out head) update every step
    as the optimizer does. ``trainer="correct"`` steps level ``l`` once per completed chunk with
    the sum of the chunk's gradients and hides it from the optimizer on other steps (its
    ``.grad`` is ``None``, so torch optimizers skip it, momentum and weight decay included);
    ``trainer="original"`` is the replica (see the module docstring). Every step records, per
    level, whether its parameters actually changed, by comparing them before and after.
    """

    def __init__(self, model: nn.Module, memory: ContinuumMemory, optimizer: torch.optim.Optimizer,
                 trainer: str = "correct") -> None:
        _check_parts(model, memory, optimizer)
        self.model, self.memory, self.optimizer = model, memory, optimizer
        self.trainer = check_trainer(trainer)
        self.chunk_sizes = memory.chunk_sizes
        self.steps_done = 0
        self.losses: list[float] = []
        self.changed: list[tuple[bool, ...]] = []  # per step, per level
        self._level_params = [list(level.parameters()) for level in memory.levels]
        self._accumulated: list[list[Tensor | None]] = [[None] * len(params) for params in self._level_params]

    def step(self, loss: Tensor) -> float:
        """Backpropagate ``loss`` (a finite scalar), apply the schedule, step the optimizer;
        return the loss as a float."""
        value = _check_loss(loss, self.steps_done)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for index, params in enumerate(self._level_params):
            self._schedule_level(index, params)
        before = [[p.detach().clone() for p in params] for params in self._level_params]
        self.optimizer.step()
        self.changed.append(tuple(any(not torch.equal(old, new) for old, new in zip(saved, params, strict=True))
                                  for saved, params in zip(before, self._level_params, strict=True)))
        self.losses.append(value)
        self.steps_done += 1
        return value

    def _schedule_level(self, index: int, params: list[nn.Parameter]) -> None:
        """Accumulate the level's gradient and leave in ``.grad`` what the optimizer should use."""
        size, accumulated = self.chunk_sizes[index], self._accumulated[index]
        for i, param in enumerate(params):
            if param.grad is not None:
                accumulated[i] = param.grad.clone() if accumulated[i] is None else accumulated[i] + param.grad
        if self.trainer == "original":
            if self.steps_done % size == 0:
                for i, param in enumerate(params):
                    param.grad = None if accumulated[i] is None else accumulated[i] / size
                accumulated[:] = [None] * len(params)
            return  # the bug: a level that is not due keeps this step's gradient
        due = (self.steps_done + 1) % size == 0
        for i, param in enumerate(params):
            param.grad = accumulated[i] if due else None
        if due:
            accumulated[:] = [None] * len(params)

    @property
    def change_counts(self) -> tuple[int, ...]:
        """How many steps changed each level's parameters."""
        return tuple(int(n) for n in self.changed_matrix().sum(axis=1))

    def changed_matrix(self) -> np.ndarray:
        """Bool array ``[levels, steps]``: measured changes, comparable to :func:`update_schedule`."""
        return np.array(self.changed, dtype=bool).reshape(-1, len(self.chunk_sizes)).T

    def history(self) -> pd.DataFrame:
        """One row per step and level: ``step, level, chunk_size, changed, loss``."""
        changed = self.changed_matrix()
        return pd.DataFrame([
            {"step": step, "level": level, "chunk_size": size, "changed": bool(changed[level, step]),
             "loss": self.losses[step]}
            for step in range(self.steps_done) for level, size in enumerate(self.chunk_sizes)])


def _check_parts(model: nn.Module, memory: ContinuumMemory, optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(memory, ContinuumMemory):
        raise TypeError(f"memory must be a ContinuumMemory, got {type(memory).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if len(memory.levels) != len(memory.chunk_sizes):
        raise ValueError(f"the memory has {len(memory.levels)} levels but {len(memory.chunk_sizes)} chunk sizes; "
                         "they must match one to one")
    in_model = {id(p) for p in model.parameters()}
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for index, level in enumerate(memory.levels):
        ids = {id(p) for p in level.parameters()}
        if not ids <= in_model:
            raise ValueError(f"level {index} of the memory is not part of the model; pass the model that "
                             "contains the memory")
        if not ids <= optimized:
            raise ValueError(f"level {index} of the memory has parameters the optimizer does not hold; build "
                             "the optimizer over model.parameters()")


def _check_loss(loss: Tensor, step: int) -> float:
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss must be a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss must be a scalar tensor, got shape {tuple(loss.shape)}")
    value = loss.item()
    if not math.isfinite(value):
        raise ValueError(f"loss is {value} at step {step}; it must be finite, and no parameter was updated")
    return value
