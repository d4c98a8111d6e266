"""Experiments on CortexGPT for chapters 2 and 3: many seeds, summary tables, the grid
of documented fixes, side-by-side step timings, and the fault test's reactions.

Everything here calls :func:`nested_lab.train.cortex.train` and reads the per-batch
records of the runs; no experiment trains in its own way.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from nested_lab import runtime
from nested_lab.experiments import bench
from nested_lab.models.cortex import PHASE1_FIXES, SOLUTION_FIXES, CortexConfig
from nested_lab.train.cortex import CortexRun, CortexTrainer, Fault, train


def run_seeds(config: CortexConfig, seeds: list[int], steps: int, desc: str = "", **kwargs) -> list[CortexRun]:
    """:func:`~nested_lab.train.cortex.train` for every seed, with a progress bar."""
    return [train(config, seed, steps, **kwargs) for seed in runtime.progress(seeds, desc=desc or "seeds", leave=False)]


def summary_table(runs: dict[str, list[CortexRun]], columns: tuple[str, ...] = ("oscillation_ratio", "val_bpc")
                  ) -> pd.DataFrame:
    """One row per named group of runs: mean and standard deviation over its seeds of each metric."""
    rows = []
    for name, group in runs.items():
        frame = pd.DataFrame([run.summary() for run in group])
        row = {"name": name, "seeds": len(group)}
        for column in columns:
            row[column] = frame[column].mean()
            row[f"{column}_std"] = frame[column].std(ddof=1) if len(group) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows).set_index("name")


def tail_mean(runs: list[CortexRun], column: str) -> list[float]:
    """Per run, the mean of a record column over the second half of the run."""
    return [float(run.records[column].iloc[len(run.records) // 2:].mean()) for run in runs]


def restart_steps(run: CortexRun) -> list[int]:
    """The steps at which the learning rate jumped up (warm restarts)."""
    lr = run.records["lr"].to_numpy()
    return [int(run.records["step"].iloc[i]) for i in range(1, len(lr)) if lr[i] > lr[i - 1] * 1.5]


def memory_energy(run: CortexRun) -> np.ndarray:
    """The proof's Lyapunov function ``V = (|S|^2 + |L|^2) / 2`` per batch: S the STM's keys
    and values, L the LTM's stored values."""
    return 0.5 * (run.records["stm_norm"].to_numpy() ** 2 + run.records["ltm_norm"].to_numpy() ** 2)


def fix_grid(base: CortexConfig) -> dict[str, tuple[str, CortexConfig]]:
    """Chapter 3's configurations, by name, with their group: the original, each documented fix
    alone, each preset, and each preset without one of its fixes. ``base`` holds the sizes."""
    sizes = {"batch_size": base.batch_size, "context": base.context, "dim": base.dim}
    grid = {"original": ("original", base)}
    for document, fixes, preset in (("001", SOLUTION_FIXES, CortexConfig.solutions),
                                    ("003", PHASE1_FIXES, CortexConfig.phase1)):
        for name, change in fixes.items():
            grid[f"{document}: {name}"] = (f"fix alone ({document})", base.with_(**change))
        grid[f"{document} preset"] = ("preset", preset(**sizes))
        for name in fixes:
            grid[f"{document} preset - {name}"] = (f"preset minus one ({document})", preset(without=name, **sizes))
    return grid


def step_time_ratios(configs: dict[str, CortexConfig], reference: str, seed: int = 0, rounds: int = 5,
                     calls: int = 2, warmup: int = 2) -> dict[str, float]:
    """Wall time per training step of each configuration over the ``reference`` one, measured
    side by side (:func:`nested_lab.experiments.bench.interleaved_rounds`): the median of the per-round ratios."""
    if reference not in configs:
        raise ValueError(f"reference {reference!r} is not one of the configurations")
    trainers = {name: CortexTrainer(config, seed, steps=rounds * calls + warmup + 4) for name, config in configs.items()}
    seconds = bench.interleaved_rounds({name: t.train_step for name, t in trainers.items()}, rounds, calls, warmup)
    base = np.array(seconds[reference])
    return {name: float(np.median(np.array(values) / base)) for name, values in seconds.items()}


def fault_reactions(run: CortexRun, faults: dict[str, Fault]) -> pd.DataFrame:
    """For each named fault: the largest loss of the faulty batch and the next one over the mean of
    the 50 batches before, and whether the guard rolled back on either."""
    records = run.records.set_index("batch")
    rows = []
    for name, fault in faults.items():
        recent = records.loc[: fault.batch, "loss"].iloc[-50:].mean()
        after = records.loc[fault.batch + 1: fault.batch + 2]
        rows.append({"fault": name, "batch": fault.batch + 1, "largest loss / recent mean": after["loss"].max() / recent,
                     "rolled back": bool(after["rollback"].any())})
    return pd.DataFrame(rows).set_index("fault")


def quarter(values, index: int) -> np.ndarray:
    """The ``index``-th quarter (0 to 3) of a run's per-step values."""
    if index not in (0, 1, 2, 3):
        raise ValueError(f"quarter index must be 0, 1, 2 or 3, got {index}")
    values = np.asarray(values, dtype=float)
    size = len(values) // 4
    return values[index * size:(index + 1) * size]
