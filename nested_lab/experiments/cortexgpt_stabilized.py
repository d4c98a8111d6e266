"""Chapter 3, CortexGPT stabilised?: the grid of documented fixes, the claims' measurements,
side-by-side step timings and memory footprints, the shipped defects and the fault test.

Every run goes through :func:`nested_lab.train.cortex_trainer.train`; the runs of many
seeds, the tables and the probes of a trained model are chapter 2's
(:mod:`nested_lab.experiments.cortexgpt_instability`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from nested_lab import runtime
from nested_lab.experiments import bench
from nested_lab.experiments.cortexgpt_instability import mean_loss, probe, tail_mean
from nested_lab.models.cortex import CortexOutput
from nested_lab.parameters import check_choice, check_range
from nested_lab.train import metrics
from nested_lab.train.cortex_setup import PHASE1_FIXES, SOLUTION_FIXES, CortexSetup
from nested_lab.train.cortex_trainer import CortexRun, CortexTrainer, Fault, train
from nested_lab.train.guards import same_state

Grid = dict[str, tuple[str, CortexSetup]]  # name -> (group, setup)


# ----- the grid of fixes ------------------------------------------------------------------------

def fix_grid(base: CortexSetup) -> Grid:
    """Chapter 3's setups, by name, with their group: the original, each documented fix
    alone, each preset, and each preset without one of its fixes. ``base`` holds the sizes."""
    sizes = {"batch_size": base.train.batch_size, "context": base.train.context, "dim": base.model.dim}
    grid = {"original": ("original", base)}
    for document, fixes, preset in (("001", SOLUTION_FIXES, CortexSetup.solutions),
                                    ("003", PHASE1_FIXES, CortexSetup.phase1)):
        for name, change in fixes.items():
            grid[f"{document}: {name}"] = (f"fix alone ({document})", base.with_(**change))
        grid[f"{document} preset"] = ("preset", preset(**sizes))
        for name in fixes:
            grid[f"{document} preset - {name}"] = (f"preset minus one ({document})", preset(without=name, **sizes))
    return grid


def train_grid(grid: Grid, seed: int, steps: int) -> dict[str, CortexRun]:
    """One run of every setup of ``grid`` on ``seed``, with a progress bar."""
    return {name: train(setup, seed, steps) for name, (_, setup) in runtime.progress(grid.items(), desc="configurations")}


def footprint(run: CortexRun) -> int:
    """Bytes of persistent training state plus the activations saved for the backward pass."""
    return run.state_bytes + run.activation_bytes


def grid_table(grid: Grid, runs: Mapping[str, CortexRun], time_ratio: Mapping[str, float]) -> pd.DataFrame:
    """Per setup: its group, oscillation ratio, validation bits per character, and its time per
    step and memory footprint over the original's."""
    return pd.DataFrame([{
        "configuration": name, "group": grid[name][0], "oscillation ratio": run.summary()["oscillation_ratio"],
        "val bits/char": run.val_bpc, "time / original": time_ratio[name],
        "memory / original": footprint(run) / footprint(runs["original"]),
    } for name, run in runs.items()]).set_index("configuration")


def step_time_ratios(setups: dict[str, CortexSetup], reference: str, seed: int = 0, rounds: int = 5,
                     calls: int = 2, warmup: int = 2) -> dict[str, float]:
    """Wall time per training step of each setup over the ``reference`` one, measured
    side by side (:func:`nested_lab.experiments.bench.interleaved_rounds`): the median of the per-round ratios."""
    check_choice("reference", reference, tuple(setups))
    trainers = {name: CortexTrainer(setup, seed, steps=rounds * calls + warmup + 4) for name, setup in setups.items()}
    seconds = bench.interleaved_rounds({name: t.train_step for name, t in trainers.items()}, rounds, calls, warmup)
    base = np.array(seconds[reference])
    return {name: float(np.median(np.array(values) / base)) for name, values in seconds.items()}


def memory_ratios(runs: Mapping[str, list[CortexRun]], reference: str = "original") -> dict[str, float]:
    """Per group, the mean footprint of its runs over the mean footprint of the ``reference`` group's."""
    base = np.mean([footprint(r) for r in runs[reference]])
    return {name: float(np.mean([footprint(r) for r in group]) / base) for name, group in runs.items()}


# ----- the documents' claims ------------------------------------------------------------------------

def differences(a: list[float], b: list[float]) -> list[float]:
    """Per seed, ``a - b`` (two groups of runs on the same seeds)."""
    return [x - y for x, y in zip(a, b, strict=True)]


def memory_shares(runs: list[CortexRun]) -> tuple[list[float], list[float]]:
    """Per run, the STM's and the LTM's share of the gate mix over the second half."""
    return tail_mean(runs, "stm_share"), tail_mean(runs, "ltm_share")


def smaller_share(runs: list[CortexRun]) -> list[float]:
    """Per run, the smaller of the STM's and the LTM's shares."""
    return [min(stm, ltm) for stm, ltm in zip(*memory_shares(runs), strict=True)]


def share_balance(runs: list[CortexRun]) -> list[float]:
    """Per run, the smaller over the larger of the STM's and the LTM's shares (1: balanced)."""
    return [min(stm, ltm) / max(stm, ltm, 1e-12) for stm, ltm in zip(*memory_shares(runs), strict=True)]


def uncovered_fraction(run: CortexRun, tokens: list[torch.Tensor]) -> float:
    """Fraction of the tokens that no column processes, in evaluation, over ``tokens``."""
    return float(np.mean([(o.column_weights.sum(0) == 0).float().mean().item() for o in probe(run.model, tokens)]))


def gradient_spikes(runs: list[CortexRun]) -> list[int]:
    """Per run, steps whose gradient norm exceeds 3x the mean of the previous 100."""
    return [metrics.count_spikes(r.records["grad_norm"], factor=3.0, window=100) for r in runs]


def loss_explosions(runs: list[CortexRun]) -> list[int]:
    """Per run, steps whose loss exceeds 5x the mean of the previous 50."""
    return [metrics.count_spikes(r.losses) for r in runs]


def quarter(values, index: int) -> np.ndarray:
    """The ``index``-th quarter (0 to 3) of a run's per-step values."""
    check_range("quarter index", index, 0, 3, integer=True)
    values = np.asarray(values, dtype=float)
    size = len(values) // 4
    return values[index * size:(index + 1) * size]


def loss_variance_trend(runs: list[CortexRun]) -> list[float]:
    """Per run, the loss variance of the last quarter over that of the second quarter."""
    return [np.var(quarter(r.losses, 3)) / np.var(quarter(r.losses, 1)) for r in runs]


def gradient_p90_trend(runs: list[CortexRun]) -> list[float]:
    """Per run, the 90th-percentile gradient norm of the last quarter over that of the second."""
    return [np.percentile(quarter(r.records["grad_norm"], 3), 90) / np.percentile(quarter(r.records["grad_norm"], 1), 90)
            for r in runs]


@torch.no_grad()
def gate_residual_effect(run: CortexRun, out: CortexOutput) -> float:
    """Largest difference between the gate's residual form ``c + g_1 (s - c) + g_2 (l - c)``
    and the plain mix ``g_0 c + g_1 s + g_2 l``, on the read-outs of one probed pass."""
    inputs = (out.current, out.stm_read, out.ltm_read)
    residual_form, gates = run.model.memory_gate(*inputs)
    plain_mix = (gates[..., None] * torch.stack(inputs, dim=-2)).sum(dim=-2)
    return float((residual_form - plain_mix).abs().max())


def regulariser_entropy(outputs: list[CortexOutput]) -> list[float]:
    """``H = -mean(g log g)`` over all gate entries of each output, as the regularised loss computes it."""
    return [float(-(o.gates * (o.gates + 1e-8).log()).mean()) for o in outputs]


# ----- what shipped -----------------------------------------------------------------------------

def mode_gap(run: CortexRun, tokens: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Evaluation-mode minus training-mode loss (nats) of a trained model on the same batches."""
    return mean_loss(probe(run.model, tokens), targets) - mean_loss(probe(run.model, tokens, training=True), targets)


def shipped_table(runs: Mapping[str, CortexRun], gaps: Mapping[str, float]) -> pd.DataFrame:
    """Per run: LTM rows, queued rows, LTM share, training-mode column weight, val bits/char, mode gap."""
    return pd.DataFrame({name: {"LTM rows": run.ltm_rows, "queued rows": run.queued_rows,
                                "LTM share": tail_mean([run], "ltm_share")[0],
                                "mean column weight (training)": tail_mean([run], "active")[0],
                                "val bits/char": run.val_bpc, "eval - train-mode loss (nats)": gaps[name]}
                         for name, run in runs.items()}).T


# ----- the fault test ---------------------------------------------------------------------------

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


def rollback_is_exact(setup: CortexSetup, seed: int, steps: int) -> tuple[bool, bool, int]:
    """Train half of ``steps``, write a NaN into a weight, and compare: (the state after the
    rollback equals the recovery checkpoint, the best checkpoint is kept, the step count)."""
    trainer = CortexTrainer(setup, seed, steps)
    for _ in range(steps // 2):
        trainer.train_step()
    best_before = (trainer.guard.best.step, trainer.guard.best.mean_loss)
    trainer.train_step(Fault(trainer.batches, "nan"))
    restored = same_state(trainer.capture(), trainer.guard.recovery.state)
    return restored, best_before == (trainer.guard.best.step, trainer.guard.best.mean_loss), trainer.step_count
