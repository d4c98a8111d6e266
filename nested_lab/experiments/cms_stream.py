"""Online training of a Continuum Memory System on the drifting stream of
:mod:`nested_lab.data.drift`: does the multi-frequency schedule of Nested Learning (Behrouz et al.
2025, the CMS equation) help against a single-frequency network of the same size?

Every run trains a :class:`~nested_lab.memory.cms.ContinuumMemory` with plain SGD on the mean
squared error, one batch per step, and records

* the prequential loss: the loss on each new batch BEFORE the model learns from it;
* the loss on return: the prequential loss on the first batch of a fast mode that comes back
  after being away, a measure of how much of that mode was forgotten.

The stream and the initialisation have their own generators, so every arm of a comparison sees
the same stream and, for the same architecture, the same initial weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from nested_lab import runtime
from nested_lab.data.drift import drift_stream
from nested_lab.memory.cms import ContinuumMemory, ContinuumMemoryTrainer, check_chunk_sizes, check_trainer
from nested_lab.parameters import check_float, check_positive_ints

INIT_SEED_OFFSET = 1_000_003  # the initialisation's generator is seeded with seed + this
FINAL_FRACTION = 0.1  # "final loss": the mean prequential loss over this last fraction of the steps

ARMS: dict[str, tuple[tuple[int, ...], str]] = {
    "CMS (1, 8, 32)": ((1, 8, 32), "correct"),
    "single-frequency (1, 1, 1)": ((1, 1, 1), "correct"),
    "CMS (1, 8, 32), original trainer": ((1, 8, 32), "original"),
}


def run_stream(chunk_sizes: Sequence[int], seed: int, steps: int = 1500, *, dim: int = 8, hidden_dim: int = 32,
               batch_size: int = 16, lr: float = 0.05, residual: bool = True, trainer: str = "correct",
               modes: int = 3, switch_every: int = 50, noise: float = 0.1) -> pd.DataFrame:
    """One online run; one row per step: ``step, mode, loss`` (prequential) and ``returned`` (the
    step is the first of a fast mode seen before)."""
    chunk_sizes = check_chunk_sizes(chunk_sizes)
    check_positive_ints(steps=steps)
    check_float("lr", lr, minimum=0.0)
    check_trainer(trainer)
    memory = ContinuumMemory(dim, hidden_dim, chunk_sizes, residual=residual,
                             generator=runtime.generator(seed + INIT_SEED_OFFSET))
    stream = drift_stream(steps, dim, runtime.generator(seed), batch_size=batch_size, modes=modes,
                          switch_every=switch_every, noise=noise)
    loop = ContinuumMemoryTrainer(memory, memory, torch.optim.SGD(memory.parameters(), lr=lr), trainer)
    rows, seen, previous = [], set(), None
    for step, (x, y, mode) in enumerate(stream):
        loss = loop.step(F.mse_loss(memory(x), y))
        rows.append({"step": step, "mode": mode, "loss": loss, "returned": mode != previous and mode in seen})
        seen.add(mode)
        previous = mode
    return pd.DataFrame(rows)


def summarize_run(run: pd.DataFrame) -> dict[str, float]:
    """Mean prequential loss, mean loss on return of a mode (NaN if none returned), final loss."""
    final = max(1, round(FINAL_FRACTION * len(run)))
    return {"prequential_loss": run["loss"].mean(),
            "return_loss": run.loc[run["returned"], "loss"].mean(),
            "final_loss": run["loss"].iloc[-final:].mean()}


def compare(seeds: Sequence[int] = (0, 1, 2), arms: Mapping[str, tuple[Sequence[int], str]] | None = None,
            show_progress: bool = True, **settings) -> pd.DataFrame:
    """Every arm (name -> (chunk sizes, trainer); default :data:`ARMS`) on every seed; one row per
    seed and arm: ``seed, arm, chunk_sizes, trainer, prequential_loss, return_loss, final_loss``.
    ``settings`` go to :func:`run_stream`."""
    arms = ARMS if arms is None else arms
    if not arms:
        raise ValueError("arms must name at least one (chunk sizes, trainer) pair")
    seeds = list(seeds)
    rows = []
    for seed in runtime.progress(seeds, desc="seeds", leave=False, disable=not show_progress):
        for name, (chunk_sizes, trainer) in arms.items():
            run = run_stream(chunk_sizes, seed, trainer=trainer, **settings)
            rows.append({"seed": seed, "arm": name, "chunk_sizes": tuple(chunk_sizes), "trainer": trainer,
                         **summarize_run(run)})
    return pd.DataFrame(rows)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of each measure, one row per arm (in the order given)."""
    measures = ["prequential_loss", "return_loss", "final_loss"]
    table = results.groupby("arm", sort=False)[measures].agg(["mean", "std"])
    table.columns = [f"{measure}_{stat}" for measure, stat in table.columns]
    return table.reset_index()
