"""The learned learning-rate controller of ContinuumOptimizer.

One MLP, shared by every parameter group, maps a group's statistics
``[grad_norm, param_norm, depth]`` to a pre-sigmoid value ``raw`` and then to a
multiplier ``m = min + (max - min) * sigmoid(raw)`` of the group's learning rate.
A ReLU network with zero biases is positively homogeneous: scaling its input by
``c`` scales ``raw`` by ``c``. With raw norms in the hundreds, ``|raw| >> 1`` at
the first call and the sigmoid saturates -- the real cause of the collapse
studied in chapter 1.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SCALINGS = ("raw", "log1p")


class LRController(nn.Module):
    """Linear(3,32)-ReLU-Linear(32,32)-ReLU-Linear(32,1), Xavier-uniform weights, zero biases."""

    def __init__(self, generator: torch.Generator | None = None, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight, generator=generator)
                nn.init.zeros_(layer.bias)

    def forward(self, stats: torch.Tensor) -> torch.Tensor:
        """``stats`` of shape ``[groups, 3]`` -> ``raw`` of shape ``[groups]``."""
        return self.net(stats).squeeze(-1)


def multiplier(raw: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``m = low + (high - low) * sigmoid(raw)``: the learning-rate multiplier."""
    return low + (high - low) * torch.sigmoid(raw)


def scale_inputs(stats: torch.Tensor, input_scaling: str) -> torch.Tensor:
    """``"raw"``: the norms as they are (the original); ``"log1p"``: ``log1p(norm) / 10``
    on the two norm columns (the silent part of the shipped fix); depth is unchanged."""
    if input_scaling == "raw":
        return stats
    if input_scaling == "log1p":
        return torch.cat([torch.log1p(stats[..., :2]) / 10, stats[..., 2:]], dim=-1)
    raise ValueError(f"unknown input_scaling {input_scaling!r}; allowed: {INPUT_SCALINGS}")


@torch.no_grad()
def group_stats(param_groups: list[dict]) -> torch.Tensor:
    """``[summed grad L2 norm, summed param L2 norm, depth]`` per group, shape ``[groups, 3]``.

    ``depth`` is the group's ``"depth"`` entry (the original's average depth, default 0.5).
    """
    rows = []
    for group in param_groups:
        param_norm = torch.stack([p.norm() for p in group["params"]]).sum().float()
        grads = [p.grad.norm() for p in group["params"] if p.grad is not None]
        grad_norm = torch.stack(grads).sum().float() if grads else torch.zeros_like(param_norm)
        depth = torch.full_like(param_norm, float(group.get("depth", 0.5)))
        rows.append(torch.stack([grad_norm, param_norm, depth]))
    return torch.stack(rows)
