"""The memory gate of CortexGPT: how the current state, the STM read-out and the
LTM read-out are mixed into one output per token.

* ``"softmax"`` (the original): ``g = softmax(W [c; s; l])``, ``y = g0 c + g1 s + g2 l``.
* ``"temperature_softmax"`` (solutions document, ``StabilizedMemoryGate``): a learned
  temperature ``tau`` (clamped at 0.1) and a learned bias initialised to
  ``[0.5, 0.3, 0.2]``: ``g = softmax((W [c; s; l] + b) / tau)``, and the "residual"
  output ``y = c + g1 (s - c) + g2 (l - c)``. Since ``g0 = 1 - g1 - g2`` this is the
  same mix as the original: the residual adds nothing.
* ``"temperature_sigmoid"`` (phase-1 summary): ``w = sigmoid(W [c; s; l] / tau)`` with
  a fixed ``tau``, ``g = w / sum(w)``, ``y = g0 c + g1 s + g2 l``.

The gate Jacobian ``d softmax / d logits = diag(g) - g g^T`` (the proof's Theorem
2) is symmetric, so its eigenvalues are real: :func:`softmax_jacobian`.
"""

from __future__ import annotations

import torch
from torch import nn

from nested_lab.parameters import check_choice, check_range

GATES = ("softmax", "temperature_softmax", "temperature_sigmoid")


class MemoryGate(nn.Module):
    """Mix ``current``, ``stm`` and ``ltm`` (each ``[..., d]``) into ``[..., d]``; returns ``(y, g)``."""

    def __init__(self, dim: int, kind: str = "softmax", temperature: float = 1.0) -> None:
        super().__init__()
        check_choice("gate", kind, GATES)
        check_range("temperature", temperature, 0, low_open=True)
        self.kind = kind
        self.proj = nn.Linear(3 * dim, 3)
        if kind == "temperature_softmax":
            self.temperature = nn.Parameter(torch.full((1,), float(temperature)))
            self.bias = nn.Parameter(torch.tensor([0.5, 0.3, 0.2]))
        else:
            self.register_buffer("temperature", torch.full((1,), float(temperature)), persistent=False)

    def forward(self, current: torch.Tensor, stm: torch.Tensor, ltm: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.proj(torch.cat([current, stm, ltm], dim=-1))
        if self.kind == "softmax":
            gates = torch.softmax(logits, dim=-1)
        elif self.kind == "temperature_softmax":
            gates = torch.softmax((logits + self.bias) / self.temperature.clamp(min=0.1), dim=-1)
            return current + gates[..., 1:2] * (stm - current) + gates[..., 2:3] * (ltm - current), gates
        else:
            weights = torch.sigmoid(logits / self.temperature)
            gates = weights / weights.sum(dim=-1, keepdim=True)
        return gates[..., 0:1] * current + gates[..., 1:2] * stm + gates[..., 2:3] * ltm, gates


def softmax_jacobian(gates: torch.Tensor) -> torch.Tensor:
    """``diag(g) - g g^T`` for each gate vector in ``gates`` ``[..., n]`` -> ``[..., n, n]``."""
    return torch.diag_embed(gates) - gates[..., :, None] * gates[..., None, :]


def gate_entropy(gates: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``-sum_i g_i log g_i`` (nats; at most ``log 3``)."""
    return -(gates * gates.clamp_min(1e-12).log()).sum(dim=-1).mean()
