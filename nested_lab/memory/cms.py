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
   (``ceil(N / C)`` due steps; the chapter's ``printed_schedule`` draws it);
2. on a due step it replaces the level's gradient by the accumulated gradients divided by ``C``
   (the chunk's mean, except at step 0, where one gradient is divided by ``C``) instead of their sum;
3. it never clears the gradient of a level that is not due, so the optimizer steps every level
   with that step's own gradient on every step: the multi-frequency schedule never happens
   (:func:`update_schedule` with ``trainer="original"``), although the printed one looks right.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from nested_lab import runtime
from nested_lab.init import uniform_linear
from nested_lab.parameters import check_choice, check_positive_ints, check_range

TRAINERS = ("original", "correct")


def check_chunk_sizes(chunk_sizes: Sequence[int]) -> tuple[int, ...]:
    """``chunk_sizes`` as a tuple: a sequence of ints >= 1, one per level (at least one)."""
    if isinstance(chunk_sizes, str | bytes) or not isinstance(chunk_sizes, Sequence):
        raise TypeError(f"chunk_sizes must be a sequence of ints >= 1 (one per level), got {chunk_sizes!r}")
    check_range("number of levels", len(chunk_sizes), 1, integer=True)
    check_positive_ints(**{f"chunk_sizes[{i}]": size for i, size in enumerate(chunk_sizes)})
    return tuple(chunk_sizes)


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
    step, which is what the replica's trainer does (its printout claims ``step % C == 0``).
    """
    chunk_sizes = check_chunk_sizes(chunk_sizes)
    check_positive_ints(steps=steps)
    if check_choice("trainer", trainer, TRAINERS) == "original":
        return np.ones((len(chunk_sizes), steps), dtype=bool)
    step = np.arange(steps)
    return np.stack([(step + 1) % size == 0 for size in chunk_sizes])


# --- the trainer -------------------------------------------------------------------------------

class ContinuumMemoryTrainer:
    """Backward, the CMS schedule and ``optimizer.step()`` for one loss at a time.

    ``model`` contains ``memory``; its other parameters (e.g. a read-out head) update every step
    as the optimizer does. ``trainer="correct"`` steps level ``l`` once per completed chunk with
    the sum of the chunk's gradients and hides it from the optimizer on other steps (its
    ``.grad`` is ``None``, so torch optimizers skip it, momentum and weight decay included);
    ``trainer="original"`` is the replica (see the module docstring). Every step records, per
    level, whether its parameters actually changed, by comparing them before and after. The
    loss is not checked: a non-finite loss is recorded and stepped like any other.
    """

    def __init__(self, model: nn.Module, memory: ContinuumMemory, optimizer: torch.optim.Optimizer,
                 trainer: str = "correct") -> None:
        _check_parts(model, memory, optimizer)
        self.model, self.memory, self.optimizer = model, memory, optimizer
        self.trainer = check_choice("trainer", trainer, TRAINERS)
        self.chunk_sizes = memory.chunk_sizes
        self.steps_done = 0
        self.losses: list[float] = []
        self.changed: list[tuple[bool, ...]] = []  # per step, per level
        self._level_params = [list(level.parameters()) for level in memory.levels]
        self._accumulated: list[list[Tensor | None]] = [[None] * len(params) for params in self._level_params]

    def step(self, loss: Tensor) -> float:
        """Backpropagate ``loss`` (a scalar), apply the schedule, step the optimizer;
        return the loss as a float."""
        value = loss.item()
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


def _check_parts(model: nn.Module, memory: ContinuumMemory, optimizer: torch.optim.Optimizer) -> None:
    """Every level of ``memory`` must be part of ``model`` and held by ``optimizer``."""
    if not isinstance(memory, ContinuumMemory):
        raise TypeError(f"memory must be a ContinuumMemory, got {type(memory).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    held = {id(p) for p in model.parameters()} & {id(p) for group in optimizer.param_groups for p in group["params"]}
    for index, level in enumerate(memory.levels):
        if not {id(p) for p in level.parameters()} <= held:
            raise ValueError(f"level {index} of the memory must be part of the model and held by the optimizer; "
                             "build the optimizer over model.parameters() of the model that contains the memory")
