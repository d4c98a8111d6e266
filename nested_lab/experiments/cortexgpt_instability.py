"""Chapter 2, CortexGPT's training instability and its "proof": what the chapter runs and measures.

Runs: :func:`run_seeds` trains one setup on many seeds (through
:func:`nested_lab.train.cortex_trainer.train`; no experiment trains in its own way), and
:func:`summary_table` tabulates their stability metrics. The audit of the "proof"
(``docs/technical/cortex_mathematical_instability_proof.md``) measures what each of its
theorems makes a claim about: the spectrum of the gate Jacobian (Theorem 2), the gain of
the STM read-out and of the gate (Theorem 3), the information capacity of 5% sparsity
(Theorem 4), the fraction of dead units (Theorem 5) and the memory's energy (Theorem 1).
Chapter 3 (:mod:`nested_lab.experiments.cortexgpt_stabilized`) reuses the runs and probes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.func import jacrev, vmap

from nested_lab import runtime
from nested_lab.memory.gates import softmax_jacobian
from nested_lab.memory.sparsity import hard_topk_mask
from nested_lab.memory.stm import ShortTermMemory
from nested_lab.models.cortex import CortexGPT, CortexOutput
from nested_lab.parameters import check_ints_at_least
from nested_lab.train import metrics
from nested_lab.train.cortex_setup import CortexSetup
from nested_lab.train.cortex_trainer import CortexRun, corpus, train

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs [B, T], targets [B, T]


# ----- runs and their tables -------------------------------------------------------------------

def run_seeds(setup: CortexSetup, seeds: list[int], steps: int, desc: str = "", **kwargs) -> list[CortexRun]:
    """:func:`~nested_lab.train.cortex_trainer.train` for every seed, with a progress bar."""
    return [train(setup, seed, steps, **kwargs) for seed in runtime.progress(seeds, desc=desc or "seeds", leave=False)]


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


def oscillation_ratios(runs: list[CortexRun]) -> list[float]:
    """Each run's oscillation ratio (:func:`nested_lab.train.metrics.oscillation_ratio`)."""
    return [run.summary()["oscillation_ratio"] for run in runs]


def peak_over_log_vocab(runs: list[CortexRun]) -> list[float]:
    """Per run, the largest second-half training loss over ``ln V``, the loss of a uniform guess."""
    log_vocab = math.log(corpus().vocab_size)
    return [max(run.losses[len(run.losses) // 2:]) / log_vocab for run in runs]


def tail_mean(runs: list[CortexRun], column: str) -> list[float]:
    """Per run, the mean of a record column over the second half of the run."""
    return [float(run.records[column].iloc[len(run.records) // 2:].mean()) for run in runs]


def restart_steps(run: CortexRun) -> list[int]:
    """The steps at which the learning rate jumped up (warm restarts)."""
    lr = run.records["lr"].to_numpy()
    return [int(run.records["step"].iloc[i]) for i in range(1, len(lr)) if lr[i] > lr[i - 1] * 1.5]


def smoothed_losses(run: CortexRun, window: int = 25) -> tuple[list[int], list[float]]:
    """(steps 1, 2, ..., the ``window``-step moving mean of the training loss) of one run."""
    losses = pd.Series(run.losses)
    return list(range(1, len(losses) + 1)), losses.rolling(window, min_periods=1).mean().tolist()


def slider_grid(groups: Mapping[str, list[CortexRun]]) -> dict[str, dict[str, tuple[list, list]]]:
    """Configuration -> {"seed s" -> smoothed loss curve}: the data of a static slider."""
    return {name: {f"seed {run.seed}": smoothed_losses(run) for run in group} for name, group in groups.items()}


def stress_table(groups: Mapping[str, list[CortexRun]]) -> pd.DataFrame:
    """Per setting and seed: diverged or not, the largest |logit|, and (if it did not diverge)
    the oscillation ratio, spike ratio and validation bits per character."""
    rows = []
    for name, group in groups.items():
        for run in group:
            summary = {} if run.diverged else {k: run.summary()[k]
                                               for k in ("oscillation_ratio", "spike_ratio", "val_bpc")}
            rows.append({"setting": name, "seed": run.seed, "diverged": run.diverged,
                         "largest |logit|": run.records["logit_max"].max(), **summary})
    return pd.DataFrame(rows).set_index(["setting", "seed"])


def finite_metric(runs: list[CortexRun], metric: str) -> list[float]:
    """Per run that did not diverge, one of its :meth:`~CortexRun.summary` metrics (a diverged
    run has no second half to measure)."""
    return [run.summary()[metric] for run in runs if not run.diverged]


def logit_growth(high: list[CortexRun], low: list[CortexRun]) -> list[float]:
    """Per seed, the largest |logit| of a run in ``high`` over that of the same seed's run in ``low``."""
    return [h.records["logit_max"].max() / lo.records["logit_max"].max() for h, lo in zip(high, low, strict=True)]


def sample_batches(setup: CortexSetup, split: str, count: int, seed: int) -> list[Batch]:
    """``count`` batches of ``setup``'s batch size and context from ``split``, drawn with ``seed``."""
    gen = runtime.generator(seed)
    return [corpus().sequences(split, setup.train.batch_size, setup.train.context, gen) for _ in range(count)]


# ----- ablations ---------------------------------------------------------------------------------

def ablation_label(cause: str, removes: bool) -> str:
    """``"without CAUSE"`` for a change that removes a cause, ``"with CAUSE"`` for one that adds it."""
    return f"{'without' if removes else 'with'} {cause}"


def run_ablations(setup: CortexSetup, changes: Mapping[str, dict], removing: set[str], seeds: list[int],
                  steps: int, reuse: Mapping[str, list[CortexRun]]) -> dict[str, list[CortexRun]]:
    """For each cause, ``setup`` with its one-field change, on ``seeds``; a change whose label is
    in ``reuse`` takes those runs instead of training again."""
    ablated = {}
    for cause, change in changes.items():
        label = ablation_label(cause, cause in removing)
        ablated[label] = reuse.get(label) or run_seeds(setup.with_(**change), seeds, steps, desc=label)
    return ablated


def cause_effects(base: list[float], ablated: Mapping[str, list[CortexRun]], causes: list[str],
                  removing: set[str]) -> dict[str, np.ndarray]:
    """Per cause, the oscillation ratio with the cause minus without it, per seed (``base``: the
    original's ratios)."""
    effect = {}
    for cause in causes:
        changed = np.array(oscillation_ratios(ablated[ablation_label(cause, cause in removing)]))
        effect[cause] = np.array(base) - changed if cause in removing else changed - np.array(base)
    return effect


# ----- the proof's theorems --------------------------------------------------------------------

@dataclass(frozen=True)
class GateSpectrum:
    """Eigenvalues of the softmax gate's Jacobian at measured gate values."""

    eigenvalues: torch.Tensor  # [N, 3] complex
    closed_form_error: float  # max |autograd Jacobian - (diag(g) - g g^T)|
    asymmetry: float  # max |J - J^T|

    @property
    def max_imaginary(self) -> float:
        return float(self.eigenvalues.imag.abs().max())

    @property
    def max_modulus(self) -> float:
        return float(self.eigenvalues.abs().max())

    @property
    def min_modulus(self) -> float:
        return float(self.eigenvalues.abs().min())

    @property
    def largest_smallest_modulus(self) -> float:
        """Over the gate vectors, the largest of each one's smallest |eigenvalue| (0 for every g: Theorem 2)."""
        return float(self.eigenvalues.abs().min(dim=-1).values.max())


def gate_jacobian_spectrum(gates: torch.Tensor) -> GateSpectrum:
    """The Jacobian of ``softmax`` at logits ``log g`` (which give back ``g``) for every
    gate vector in ``gates`` ``[..., 3]``, by automatic differentiation, and its eigenvalues."""
    g = gates.detach().reshape(-1, gates.shape[-1]).double()
    g = g / g.sum(dim=-1, keepdim=True)  # exactly normalised in float64
    numeric = vmap(jacrev(lambda z: torch.softmax(z, dim=-1)))(g.clamp_min(1e-300).log())
    closed = softmax_jacobian(g)
    return GateSpectrum(torch.linalg.eigvals(numeric), float((numeric - closed).abs().max()),
                        float((numeric - numeric.transpose(1, 2)).abs().max()))


def gate_memory_gain(gates: torch.Tensor, weight_block: torch.Tensor) -> torch.Tensor:
    """Spectral norm of ``d g / d r = (diag(g) - g g^T) W_r`` for each gate vector ``g`` in ``gates``
    ``[N, 3]``, with ``W_r`` ``[3, d]`` the block of the gate's weight that multiplies ``r``."""
    jacobian = softmax_jacobian(gates.detach().double()) @ weight_block.detach().double()
    return torch.linalg.matrix_norm(jacobian, ord=2)


def stm_gate_gain(model: CortexGPT, gates: torch.Tensor) -> torch.Tensor:
    """:func:`gate_memory_gain` for the STM read-out's block of ``model``'s memory gate."""
    d = model.config.dim
    return gate_memory_gain(gates, model.memory_gate.proj.weight[:, d:2 * d])


def readout_gain(stm: ShortTermMemory, queries: torch.Tensor) -> torch.Tensor:
    """Spectral norm of ``d r_stm(x) / d x`` at each query ``x`` ``[N, d]``, the memory held fixed:
    ``r_stm(x) = softmax(W_q x (W_k K)^T / sqrt(d)) V`` over every stored row."""
    if not stm.entries:
        raise ValueError("the STM is empty: run the model on some batches first")
    keys = stm.key_proj(stm.keys).detach()

    def readout(x: torch.Tensor) -> torch.Tensor:
        scores = stm.query_proj(x) @ keys.T / math.sqrt(stm.dim)
        return torch.softmax(scores, dim=-1) @ stm.values

    jacobians = vmap(jacrev(readout))(queries.detach())
    return torch.linalg.matrix_norm(jacobians, ord=2).detach()


def loss_change_autocorrelation(runs: list[CortexRun], lags: tuple[int, ...] = (4, 5)) -> list[float]:
    """Per run, the largest autocorrelation of the loss changes at ``lags`` (the proof's period)."""
    return [max(metrics.autocorrelation(run.losses, lag) for lag in lags) for run in runs]


@torch.no_grad()
def dead_unit_fraction(model: CortexGPT, batches: list[torch.Tensor]) -> float:
    """Fraction of the columns' hidden ReLU units that are zero on every token their column
    selects, over ``batches`` (hard top-k selection, as in evaluation)."""
    cols = model.columns
    alive = torch.zeros(cols.w1.shape[0], cols.w1.shape[-1], dtype=torch.bool, device=cols.w1.device)
    for tokens in batches:
        x = model.embed(tokens).reshape(-1, model.config.dim)
        mask = hard_topk_mask(cols.scores(x), model.config.active_fraction).bool()  # [C, N]
        hidden = torch.relu(x @ cols.w1 + cols.b1)  # [C, N, d]
        alive |= ((hidden > 0) & mask[..., None]).any(dim=1)
    return float(1 - alive.float().mean())


def log2_binomial(n: int, k: int) -> float:
    """``log2 C(n, k)``, exactly (through the log-gamma function)."""
    check_ints_at_least(0, n=n, k=k)
    if k > n:
        raise ValueError(f"need k <= n, got n={n}, k={k}")
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def first_full_store(runs: list[CortexRun], capacity: int, context: int) -> list[int]:
    """Per run, the timestep stores until the STM first held ``capacity`` entries
    (one store per timestep, ``context`` per training batch)."""
    return [(int(np.argmax(run.records["stm_entries"].to_numpy() >= capacity)) + 1) * context for run in runs]


def memory_energy(run: CortexRun) -> np.ndarray:
    """The proof's Lyapunov function ``V = (|S|^2 + |L|^2) / 2`` per batch: S the STM's keys
    and values, L the LTM's stored values."""
    return 0.5 * (run.records["stm_norm"].to_numpy() ** 2 + run.records["ltm_norm"].to_numpy() ** 2)


def energy_rising_fraction(run: CortexRun) -> float:
    """Fraction of the second half's steps at which the energy ``V`` grew (Theorem 1: all of them)."""
    energy = memory_energy(run)
    return float((np.diff(energy[len(energy) // 2:]) > 0).mean())


def energy_growth(run: CortexRun) -> float:
    """``V`` at the end of the run over ``V`` at mid-run."""
    energy = memory_energy(run)
    return float(energy[-1] / energy[len(energy) // 2])


def stm_growth_factor(run: CortexRun) -> float:
    """The per-step growth factor of the STM's norm over the second half (the proof's eigenvalue 1.15)."""
    norm, half = run.records["stm_norm"], len(run.records) // 2
    return float((norm.iloc[-1] / norm.iloc[half]) ** (1 / (len(run.records) - half - 1)))


# ----- probes of a trained model ------------------------------------------------------------------

@torch.no_grad()
def probe(model: CortexGPT, batches: list[torch.Tensor], training: bool = False) -> list[CortexOutput]:
    """Forward passes over ``batches`` in evaluation mode (or training mode, for the train/eval
    comparison); the memories and the model's generator are restored afterwards."""
    state, mode = model.memory_state(), model.training
    model.train(training)
    try:
        return [model(tokens) for tokens in batches]
    finally:
        model.train(mode)
        model.load_memory_state(state)


def memory_gradient_norm(model: CortexGPT, tokens: torch.Tensor, targets: torch.Tensor) -> float:
    """Norm of the gradient that one training-mode loss reaches the STM's projections and the
    LTM's networks with (:func:`gradient_norm_to`)."""
    return gradient_norm_to(model, [*model.stm.parameters(), *model.ltm.parameters()], tokens, targets)


def gradient_norm_to(model: CortexGPT, params: list[torch.nn.Parameter], tokens: torch.Tensor,
                     targets: torch.Tensor) -> float:
    """Norm of the gradient that one training-mode loss sends to ``params`` (0 when none reaches
    them); the memories are restored and no ``.grad`` is written."""
    state, mode = model.memory_state(), model.training
    model.train()
    try:
        out = model(tokens)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        model.train(mode)
        model.load_memory_state(state)
    norms = [g.norm() for g in grads if g is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def mean_loss(outputs: list[CortexOutput], targets: list[torch.Tensor]) -> float:
    """Mean cross-entropy (nats) of ``outputs`` against ``targets``."""
    return float(torch.stack([torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), target.flatten())
                              for out, target in zip(outputs, targets, strict=True)]).mean())


def loss_by_column_coverage(outputs: list[CortexOutput], targets: list[torch.Tensor]) -> tuple[float, float]:
    """Mean cross-entropy (nats) of the tokens no column processed, and of the others."""
    losses, empty = [], []
    for out, target in zip(outputs, targets, strict=True):
        losses.append(torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), target.flatten(), reduction="none"))
        empty.append(out.column_weights.sum(dim=0) == 0)
    loss, uncovered = torch.cat(losses), torch.cat(empty)
    return float(loss[uncovered].mean()), float(loss[~uncovered].mean())
