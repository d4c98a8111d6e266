"""Moving entries from CortexGPT's short-term memory into its long-term memory.

Kinds (the original's first):

* ``"random"`` (``cortex_gpt.py``): after a training forward pass, with probability
  ``probability`` (0.1), every STM entry accessed at least ``threshold`` (3) times goes
  through ``Linear(2d, code)-ReLU-Linear(code, code)`` into the LTM. Nothing is
  removed from the STM, so the same entries are added again at the next event.
* ``"interval"`` (phase-1 summary, "structured consolidation"): the same, every
  ``interval`` training forward passes instead of at random.
* ``"gradual"`` (solutions document, ``GradualConsolidation``): every ``interval``
  passes; a candidate moves only if ``sigmoid(Linear(2d, 1)([k; v])) > 0.5``, and the
  entries that moved stay in the STM with their importance halved ("decay, not remove"). (The document also passes a weight to an LTM ``store``
  it never defines; the replica's LTM has no weights, so it is dropped.)
* ``"shipped_sync"`` (``cortex_gpt_unified.py``, synchronous path): triggered at each
  timestep with probability ``probability`` (0.1, the sleep-wake oscillator's
  "wake" value; its other phases are not modelled); the candidates are the three
  oldest STM entries (rows, with the shipped one-row-per-entry storage), whatever
  their access counts. Here the triggers of a pass are drawn per timestep and
  applied after the pass.
* ``"shipped_async"`` (the shipped default, ``async_memory_ops=True``): the same
  triggers hand the five oldest entries to a worker whose processing is ``pass``:
  entries are queued and the LTM is never filled.

Consolidation runs without gradient: the stored values are detached, so the
consolidation network and the transfer gate never learn.
"""

from __future__ import annotations

import torch
from torch import nn

from nested_lab.memory.ltm import LongTermMemory
from nested_lab.memory.stm import ShortTermMemory
from nested_lab.parameters import check_choice, check_positive_ints, check_range

CONSOLIDATIONS = ("random", "interval", "gradual", "shipped_sync", "shipped_async")


class Consolidator(nn.Module):
    """Decides when and what to move from STM to LTM; counts what it did."""

    def __init__(self, dim: int, code_dim: int, kind: str = "random", probability: float = 0.1,
                 interval: int = 10, threshold: int = 3) -> None:
        super().__init__()
        check_choice("consolidation", kind, CONSOLIDATIONS)
        check_range("probability", probability, 0, 1)
        check_positive_ints(interval=interval, threshold=threshold)
        self.kind, self.probability, self.interval, self.threshold = kind, probability, interval, threshold
        self.network = nn.Sequential(nn.Linear(2 * dim, code_dim), nn.ReLU(), nn.Linear(code_dim, code_dim))
        self.transfer_gate = nn.Linear(2 * dim, 1) if kind == "gradual" else None
        self.passes = self.events = self.queued_rows = 0

    @torch.no_grad()
    def after_forward(self, stm: ShortTermMemory, ltm: LongTermMemory, steps: int,
                      generator: torch.Generator) -> int:
        """Run after a training forward pass of ``steps`` timesteps; returns the rows added to the LTM."""
        self.passes += 1
        if self.kind in ("shipped_sync", "shipped_async"):
            return self._shipped(stm, ltm, steps, generator)
        if self.kind == "random":
            due = float(torch.rand((), generator=generator)) < self.probability
        else:
            due = self.passes % self.interval == 0
        if not due:
            return 0
        self.events += 1
        keys, values, _ = stm.candidates(self.threshold)
        if self.kind == "gradual" and len(keys):
            moving = torch.sigmoid(self.transfer_gate(torch.cat([keys, values], dim=-1))).squeeze(-1) > 0.5
            keys, values = keys[moving], values[moving]
            stm.scale_importance(self.threshold, moving, 0.5)
        return self._store(keys, values, ltm)

    def _shipped(self, stm: ShortTermMemory, ltm: LongTermMemory, steps: int, generator: torch.Generator) -> int:
        triggers = int((torch.rand(steps, generator=generator) < self.probability).sum())
        self.events += triggers
        if self.kind == "shipped_async":
            self.queued_rows += triggers * len(stm.first_entries(5)[0])
            return 0
        keys, values = stm.first_entries(3)
        return sum(self._store(keys, values, ltm) for _ in range(triggers))

    def _store(self, keys: torch.Tensor, values: torch.Tensor, ltm: LongTermMemory) -> int:
        if len(keys):
            ltm.write(keys, self.network(torch.cat([keys, values], dim=-1)))
        return len(keys)
