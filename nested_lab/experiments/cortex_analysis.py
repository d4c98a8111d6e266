"""Measurements behind chapter 2's audit of the CortexGPT "proof"
(``docs/technical/cortex_mathematical_instability_proof.md``).

Each function measures one quantity a theorem of the proof makes a claim about:
the spectrum of the gate Jacobian (Theorem 2), the gain of the STM read-out and of
the gate (Theorem 3), the information capacity of 5% sparsity (Theorem 4) and the
fraction of dead units (Theorem 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import jacrev, vmap

from nested_lab.memory.gates import softmax_jacobian
from nested_lab.memory.sparsity import hard_topk_mask
from nested_lab.memory.stm import ShortTermMemory
from nested_lab.models.cortex import CortexGPT, CortexOutput
from nested_lab.parameters import check_ints_at_least


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
    return torch.linalg.matrix_norm(jacobians, ord=2)


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
    LTM's networks with; the memories and the gradients are restored/cleared afterwards."""
    state, mode = model.memory_state(), model.training
    params = [*model.stm.parameters(), *model.ltm.parameters()]
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
