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
from nested_lab.experiments.cortexgpt_instability import gradient_norm_to, mean_loss, probe, tail_mean
from nested_lab.memory.gates import MemoryGate
from nested_lab.models.cortex import CortexGPT, CortexOutput
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


def counted_differences(a: list[int], b: list[int]) -> list[int]:
    """Per seed, ``a - b`` of two event counts, over the seeds where either arm had an
    event: a seed where neither had one compares nothing (empty when no seed had one)."""
    return [x - y for x, y in zip(a, b, strict=True) if x + y > 0]


def steps_to_level(losses, level: float, window: int) -> int:
    """First step (1-based) at which the ``window``-step moving mean of ``losses`` is at or
    below ``level``; one past the run when it never is."""
    smoothed = pd.Series(np.asarray(losses, dtype=float)).rolling(window, min_periods=1).mean().to_numpy()
    reached = np.flatnonzero(smoothed <= level)
    return int(reached[0]) + 1 if len(reached) else len(smoothed) + 1


def convergence_speed(runs: list[CortexRun], reference: list[CortexRun], window: int) -> list[float]:
    """Per seed, the steps a run needs to reach a loss level over the steps the ``reference``
    run of the same seed needs. The level is the higher of the two runs' final moving means
    (the mean of their last ``window`` losses), so both reach it; below 1: faster."""
    ratios = []
    for run, ref in zip(runs, reference, strict=True):
        level = max(np.mean(run.losses[-window:]), np.mean(ref.losses[-window:]))
        ratios.append(steps_to_level(run.losses, level, window) / steps_to_level(ref.losses, level, window))
    return ratios


def roughness(runs: list[CortexRun]) -> list[float]:
    """Per run, the mean absolute step-to-step change of the training loss over the second
    half, relative to the mean loss there (0: a smooth curve)."""
    tails = [np.asarray(r.losses[len(r.losses) // 2:], dtype=float) for r in runs]
    return [float(np.abs(np.diff(t)).mean() / t.mean()) for t in tails]


def document_buffer_ages(capacity: int, stores: int) -> tuple[int, int]:
    """The solutions document's bounded buffer, ages only: each store writes age 0 at the
    circular write pointer, advances it, adds 1 to the age of every valid entry and
    invalidates entries older than ``2 * capacity``. Returns (largest age a valid entry
    reaches, entries invalidated) over ``stores`` stores."""
    check_range("capacity", capacity, 1, integer=True)
    check_range("stores", stores, 0, integer=True)
    age, valid = np.zeros(capacity, dtype=np.int64), np.zeros(capacity, dtype=bool)
    pointer = oldest = invalidated = 0
    for _ in range(stores):
        age[pointer], valid[pointer] = 0, True
        pointer = (pointer + 1) % capacity
        age[valid] += 1
        old = valid & (age > 2 * capacity)
        invalidated += int(old.sum())
        valid &= ~old
        oldest = max(oldest, int(age[valid].max()))
    return oldest, invalidated


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


def injected_spike_clipping(faulted: CortexRun, clean: CortexRun, fault: Fault,
                            window: int = 100) -> tuple[float, float, bool]:
    """For a ``"grad_spike"`` fault: (the clean run's clipping threshold at the fault's batch
    over the faulted run's -- 10 when the clipper tightens tenfold --, the injected gradient
    norm over the mean of the ``window`` norms before it, whether the clean run's threshold
    at that batch was already tightened)."""
    check_choice("fault", fault.kind, ("grad_spike",))
    rows = {name: run.records.set_index("batch") for name, run in (("faulted", faulted), ("clean", clean))}
    batch = fault.batch + 1
    norms = rows["faulted"].loc[:batch, "grad_norm"].dropna()
    recent = norms.iloc[:-1].iloc[-window:].mean()
    clean_clip = rows["clean"].loc[batch, "clip"]
    return (float(clean_clip / rows["faulted"].loc[batch, "clip"]), float(norms.iloc[-1] / recent),
            bool(clean_clip < clean.setup.train.clip))


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


# ----- claims without a row (issue 15, point 5) -----

# Each stabiliser the documents name, as a one-field change: name -> (the run it changes,
# the change, whether the change takes the stabiliser out, the document). A change that
# takes it out is made to a preset; one that puts it in (the phase-1 training settings,
# each alone) is made to the original.
STABILISERS: dict[str, tuple[str, dict, bool, str]] = {
    "LayerNorms (001)": ("001 preset", {"memory_norm": False, "output_norm": False}, True, "001"),
    "gradient scaling (001)": ("001 preset", {"memory_scale": False}, True, "001"),
    "residual (001)": ("001 preset", {"residual_weight": 0.0}, True, "001"),
    "label smoothing (001)": ("001 preset", {"label_smoothing": 0.0}, True, "001"),
    "memory lr x0.1 (001)": ("001 preset", {"memory_lr_factor": 1.0}, True, "001"),
    "residual 0.1 (003)": ("003 preset", {"residual_weight": 0.0}, True, "003"),
    "LayerNorms (003)": ("003 preset", {"layer_norms": False}, True, "003"),
    "lr 1e-4 (003)": ("original", {"lr": 1e-4}, False, "003"),
    "beta2 0.98 (003)": ("original", {"betas": (0.9, 0.98)}, False, "003"),
    "clip 0.5 (003)": ("original", {"clip": 0.5}, False, "003"),
    "10% warm-up, cosine (003)": ("original", {"schedule": "warmup_cosine"}, False, "003"),
    "weight decay 0.1 (003)": ("original", {"weight_decay": 0.1}, False, "003"),
}
# The documents' words for each of them.
STABILISER_CLAIMS = {
    "LayerNorms (001)": "Add layer normalization (memory and output LayerNorm)",
    "gradient scaling (001)": "Gradient scaling for memory components",
    "residual (001)": "Add residual connection (output_norm(output + current))",
    "label smoothing (001)": "Label smoothing for stability",
    "memory lr x0.1 (001)": "Separate optimizers: slower learning for memory",
    "residual 0.1 (003)": "Residual connections (default 0.1)",
    "LayerNorms (003)": "Layer normalization: applied throughout the model for stability",
    "lr 1e-4 (003)": "Learning rate: 1e-4 (reduced from 3e-4)",
    "beta2 0.98 (003)": "Adam beta2: 0.98 (reduced from 0.999)",
    "clip 0.5 (003)": "Gradient clipping: 0.5 (reduced from 1.0)",
    "10% warm-up, cosine (003)": "Warmup ratio: 10% of total steps",
    "weight decay 0.1 (003)": "Weight decay: 0.1 (increased for regularization)",
}
# The oscillation ratio each document calls stable: "< 1.2x" (001), "< 1.5x" (003).
STABLE_RATIO = {"001": 1.2, "003": 1.5}


def stabiliser_id(name: str) -> str:
    """A ledger id suffix for stabiliser ``name``: ``"lr 1e-4 (003)"`` -> ``"003-lr-1e-4"``."""
    label = name.rsplit(" (", 1)[0].lower()
    words = "".join(c if c.isalnum() or c == "." else " " for c in label).split()
    return "-".join([STABILISERS[name][3], *words])


def stabiliser_runs(grid: Grid, seeds: list[int], steps: int) -> dict[str, list[CortexRun]]:
    """Runs of the original, the two presets and every change of :data:`STABILISERS`, one
    per seed, ``steps`` steps each, under one progress bar."""
    setups = {name: grid[name][1] for name in ("original", "001 preset", "003 preset")}
    setups |= {name: grid[base][1].with_(**change) for name, (base, change, _, _) in STABILISERS.items()}
    runs: dict[str, list[CortexRun]] = {name: [] for name in setups}
    jobs = [(name, seed) for name in setups for seed in seeds]
    for name, seed in runtime.progress(jobs, desc="stabilisers"):
        runs[name].append(train(setups[name], seed, steps))
    return runs


def with_and_without(runs: Mapping[str, list[CortexRun]], name: str) -> tuple[list[CortexRun], list[CortexRun]]:
    """The runs with stabiliser ``name`` and the runs without it (same seeds)."""
    base, _, removes, _ = STABILISERS[name]
    return (runs[base], runs[name]) if removes else (runs[name], runs[base])


def oscillation(runs: list[CortexRun]) -> list[float]:
    """Per run, the oscillation ratio (p95/p5 of the per-step loss, second half)."""
    return [run.summary()["oscillation_ratio"] for run in runs]


def spikes(runs: list[CortexRun]) -> list[int]:
    """Per run, its gradient spikes plus its loss explosions."""
    return [g + s for g, s in zip(gradient_spikes(runs), loss_explosions(runs), strict=True)]


def stabiliser_effect(runs: Mapping[str, list[CortexRun]], name: str) -> tuple[list[float], bool]:
    """(per seed, the oscillation ratio with the stabiliser minus without it; whether every run
    without it is unstable by its document's own line, :data:`STABLE_RATIO`)."""
    with_, without = with_and_without(runs, name)
    line = STABLE_RATIO[STABILISERS[name][3]]
    return differences(oscillation(with_), oscillation(without)), min(oscillation(without)) >= line


def stabiliser_table(runs: Mapping[str, list[CortexRun]]) -> pd.DataFrame:
    """Per stabiliser: the run it changes, the oscillation ratio with and without it (mean over
    seeds), their difference (mean and standard deviation), spikes with and without, and the
    validation bits per character with minus without."""
    rows = []
    for name, (base, _, _, document) in STABILISERS.items():
        with_, without = with_and_without(runs, name)
        change = np.array(stabiliser_effect(runs, name)[0])
        rows.append({"stabiliser": name, "changes": base, "stable below": STABLE_RATIO[document],
                     "ratio without": np.mean(oscillation(without)), "ratio with": np.mean(oscillation(with_)),
                     "with - without": change.mean(), "sd": change.std(ddof=1) if len(change) > 1 else 0.0,
                     "spikes with/without": f"{sum(spikes(with_))}/{sum(spikes(without))}",
                     "val bits/char, with - without": np.mean(differences(
                         [r.val_bpc for r in with_], [r.val_bpc for r in without]))})
    return pd.DataFrame(rows).set_index("stabiliser")


def gate_lead_of_current(runs: list[CortexRun]) -> list[float]:
    """Per run, the mean gate weight on the current state minus the larger of the STM's and
    the LTM's, over the second half (> 0: the gate favours the current state)."""
    current, stm, ltm = (tail_mean(runs, f"gate_{source}") for source in ("current", "stm", "ltm"))
    return [c - max(s, m) for c, s, m in zip(current, stm, ltm, strict=True)]


@torch.no_grad()
def selection_mismatch(run: CortexRun, tokens: list[torch.Tensor]) -> float:
    """Mean over columns and tokens of |training-mode weight - evaluation-mode weight|: the
    soft selection a model trains with against the hard top-k it is evaluated with."""
    soft, hard = probe(run.model, tokens, training=True), probe(run.model, tokens)
    return float(np.mean([(s.column_weights - h.column_weights).abs().mean().item()
                          for s, h in zip(soft, hard, strict=True)]))


@torch.no_grad()
def consolidation_decay(run: CortexRun, tokens: torch.Tensor) -> dict[str, float]:
    """One forced gradual consolidation on ``run``'s trained memories, which are restored
    afterwards: the rows it moves to the LTM, the STM entries it removes, the importance after
    over before of the entries it decayed, and the largest change of the logits on ``tokens``
    when every STM importance is set to zero."""
    model = run.model
    consolidator, stm = model.consolidator, model.stm
    check_choice("consolidation", consolidator.kind, ("gradual",))
    state = model.memory_state()
    entries, importance = stm.entries, stm.importance.clone()
    consolidator.passes = consolidator.interval - 1  # the next pass is due
    moved = consolidator.after_forward(stm, model.ltm, tokens.shape[1], model.generator)
    decayed = stm.importance[: len(importance)] != importance
    ratio = (stm.importance[: len(importance)][decayed] / importance[decayed]).mean()
    logits = probe(model, [tokens])[0].logits
    stm.importance = torch.zeros_like(stm.importance)
    unread = (probe(model, [tokens])[0].logits - logits).abs().max()
    model.load_memory_state(state)  # also the consolidator's counters
    return {"rows moved": moved, "entries removed": entries - stm.entries,
            "importance ratio": float(ratio), "logit change": float(unread)}


def document_gate_smoothness(gates: torch.Tensor) -> torch.Tensor:
    """The solutions document's term ``mean((gates[1:] - gates[:-1])^2)``: differences along the
    first axis, the batch axis of the ``[B, 3]`` gates its gate returns."""
    return ((gates[1:] - gates[:-1]) ** 2).mean()


def time_smoothness(gates: torch.Tensor) -> torch.Tensor:
    """``mean((g_t - g_{t-1})^2)`` over the timesteps of ``gates`` ``[B, T, 3]`` (the replica's term)."""
    return ((gates[:, 1:] - gates[:, :-1]) ** 2).mean()


def time_order_effect(gates: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """How much the document's term and the time term change, relative to their values, when
    the timesteps of ``gates`` ``[B, T, 3]`` are put in a random order: (document's, time's)."""
    order = torch.randperm(gates.shape[1], generator=runtime.generator(seed))
    changes = []
    for term in (document_gate_smoothness, time_smoothness):
        before = term(gates.double())
        changes.append(float((term(gates.double()[:, order]) - before).abs() / before.clamp_min(1e-300)))
    return changes[0], changes[1]


def kl_ce_gradient_gap(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.1
                       ) -> tuple[float, float]:
    """The solutions document's loss, ``KL(smoothed one-hot || softmax(logits))`` summed over
    the vocabulary, against cross-entropy with the same label smoothing, in float64: (largest
    |difference of their gradients| over the largest |CE gradient|, the spread over tokens of
    KL - CE, which is minus the target's entropy, one constant)."""
    check_range("smoothing", smoothing, 0, 1, high_open=True)
    logits = logits.detach().reshape(-1, logits.shape[-1]).double().requires_grad_()
    targets = targets.reshape(-1)
    target = torch.nn.functional.one_hot(targets, logits.shape[-1]).double()
    target = target * (1 - smoothing) + smoothing / logits.shape[-1]
    log_probs = torch.log_softmax(logits, dim=-1)
    kl = torch.nn.functional.kl_div(log_probs, target, reduction="none").sum(dim=-1)
    ce = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=smoothing, reduction="none")
    grad_kl, = torch.autograd.grad(kl.mean(), logits, retain_graph=True)
    grad_ce, = torch.autograd.grad(ce.mean(), logits)
    gap = (grad_kl - grad_ce).abs().max() / grad_ce.abs().max()
    difference = (kl - ce).detach()
    return float(gap), float(difference.max() - difference.min())


def slowed_parameters(model: CortexGPT) -> list[str]:
    """Names of the parameters the solutions document's memory optimizer takes (name contains
    "memory"), at ``lr * memory_lr_factor``."""
    return [name for name, _ in model.named_parameters() if "memory" in name]


def memories_slowed(model: CortexGPT) -> float:
    """Fraction of the STM's and LTM's parameter elements that the memory optimizer takes."""
    slowed = set(slowed_parameters(model))
    sizes = {name: p.numel() for name, p in model.named_parameters() if name.startswith(("stm.", "ltm."))}
    return sum(n for name, n in sizes.items() if name in slowed) / sum(sizes.values())


def ema_training_change(setup: CortexSetup, seed: int, steps: int) -> float:
    """Largest |training loss with the EMA - without it| over ``steps`` steps of ``setup``."""
    check_range("ema_decay", setup.train.ema_decay, 0, 1, low_open=True, high_open=True)
    with_ema = train(setup, seed, steps).losses
    without = train(setup.with_(ema_decay=None), seed, steps).losses
    return float(np.max(np.abs(np.subtract(with_ema, without))))


def gradient_below_memory(model: CortexGPT, tokens: torch.Tensor, targets: torch.Tensor) -> float:
    """Norm of the gradient one training-mode loss sends to the layers below the memory loop
    (embedding, columns, column mixer); the memories are restored afterwards."""
    below = [*model.embedding.parameters(), *model.columns.parameters(), *model.column_mixer.parameters()]
    return gradient_norm_to(model, below, tokens, targets)


@torch.no_grad()
def gate_temperature_response(kind: str, dim: int = 8, seed: int = 0) -> float:
    """Largest change of a fresh gate's weights on the same random inputs when its temperature
    goes from 0.5 to 2 (0: the temperature never reaches the gate)."""
    inputs = torch.randn(3, 16, dim, generator=runtime.generator(seed))
    gates = []
    for temperature in (0.5, 2.0):
        with runtime.seeded(seed):
            gates.append(MemoryGate(dim, kind, temperature)(*inputs)[1])
    return float((gates[0] - gates[1]).abs().max())


def gradient_flow_ratios(runs: Mapping[str, list[CortexRun]], name: str, tokens: torch.Tensor,
                         targets: torch.Tensor) -> list[float]:
    """Per seed, :func:`gradient_below_memory` of the run with stabiliser ``name`` over the run
    without it, on the same batch."""
    with_, without = with_and_without(runs, name)
    return [gradient_below_memory(a.model, tokens, targets) / gradient_below_memory(b.model, tokens, targets)
            for a, b in zip(with_, without, strict=True)]


def stabiliser_points(runs: Mapping[str, list[CortexRun]]) -> pd.DataFrame:
    """One row per stabiliser and seed: its row number in :data:`STABILISERS` and the
    oscillation ratios of the runs without and with it (for a figure)."""
    rows = []
    for row, name in enumerate(STABILISERS):
        with_, without = with_and_without(runs, name)
        rows += [{"stabiliser": name, "row": row, "without": a, "with": b}
                 for a, b in zip(oscillation(without), oscillation(with_), strict=True)]
    return pd.DataFrame(rows)
