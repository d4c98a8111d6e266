"""The controller alone, on fixed group statistics: how often does the sigmoid pin?

Mirrors the measurement recorded for the original: statistics
``[grad_norm, param_norm, depth]``, a fresh controller per seed, a few Adam
steps on the regularization meta-loss, then count multipliers stuck at the
floor or the ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nested_lab import runtime
from nested_lab.optim.controller import LRController, multiplier, scale_inputs
from nested_lab.optim.meta_losses import regularization_loss
from nested_lab.parameters import check_positive_ints


@dataclass(frozen=True)
class SaturationResult:
    param_norms: list[float]
    first_raw: torch.Tensor  # [norms, seeds]: raw at the first controller call
    final_m: torch.Tensor  # [norms, seeds]: multiplier after the meta-steps
    low: float
    high: float

    def pinned(self, tolerance: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
        """Fractions of seeds at the floor and at the ceiling (within ``tolerance`` of the range)."""
        span = self.high - self.low
        floor = (self.final_m < self.low + tolerance * span).double().mean(dim=1)
        ceiling = (self.final_m > self.high - tolerance * span).double().mean(dim=1)
        return floor, ceiling


def controller_saturation(param_norms: list[float], seeds: list[int], steps: int = 40,
                          controller_lr: float = 1e-4, grad_norm: float = 2.0, depth: float = 0.6,
                          input_scaling: str = "raw", low: float = 0.1, high: float = 2.0) -> SaturationResult:
    """Run ``steps`` Adam steps of the regularization meta-loss for each (param norm, seed)."""
    check_positive_ints(steps=steps)
    if not param_norms or not seeds:
        raise ValueError(f"need at least one param norm and one seed, got {param_norms} and {seeds}")
    first_raw = torch.zeros(len(param_norms), len(seeds))
    final_m = torch.zeros(len(param_norms), len(seeds))
    for i, norm in enumerate(param_norms):
        stats = scale_inputs(torch.tensor([[grad_norm, norm, depth]]), input_scaling)
        for j, seed in enumerate(seeds):
            controller = LRController(runtime.generator(seed))
            opt = torch.optim.Adam(controller.parameters(), lr=controller_lr)
            first_raw[i, j] = controller(stats).detach()[0]
            for _ in range(steps):
                opt.zero_grad()
                regularization_loss(multiplier(controller(stats), low, high)).backward()
                torch.nn.utils.clip_grad_norm_(controller.parameters(), 1.0)
                opt.step()
            final_m[i, j] = multiplier(controller(stats).detach(), low, high)[0]
    return SaturationResult(list(param_norms), first_raw, final_m, low, high)
