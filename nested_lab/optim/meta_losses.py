"""The meta-losses the original ContinuumOptimizer shipped, as named options.

* ``"regularization"``: ``((m - 1)^2).mean()`` -- the original. Its gradient
  ``2 (m - 1)`` points toward 1, never away from it.
* ``"proxy"``: ``SimplifiedMetaTrainer.compute_proxy_loss`` of the fix commit,
  including its defect: the step is recorded *before* the loss is computed, so
  in the "improving" branch the target equals the current multiplier and the
  loss and its gradient are exactly zero.
"""

from __future__ import annotations

from collections import deque

import torch

from nested_lab.parameters import check_positive_ints, check_range


def regularization_loss(m: torch.Tensor) -> torch.Tensor:
    """``((m - 1)^2).mean()``."""
    return ((m - 1.0) ** 2).mean()


class ProxyMetaLoss:
    """SimplifiedMetaTrainer: a loss-improvement proxy with a ``window``-record history.

    Fewer than ``warmup`` records: ``((m - 1)^2).mean()``. Otherwise, with
    ``improvement = losses[0] - losses[-1]``: if ``improvement > threshold`` the
    loss is ``((m - multipliers[-1])^2).mean()``, else
    ``((m - 1)^2).mean() - 0.1 * |m - 1|.mean()`` (minimised at ``|m - 1| = 0.05``).
    Needs ``window >= max(2, warmup)``.
    """

    def __init__(self, window: int = 100, threshold: float = 1e-3, warmup: int = 10) -> None:
        check_positive_ints(warmup=warmup)
        check_range("window", window, max(2, warmup), integer=True)
        self.threshold = check_range("threshold", threshold)
        self.warmup = warmup
        self.losses: deque[float] = deque(maxlen=window)
        self.multipliers: deque[torch.Tensor] = deque(maxlen=window)
        self.last_branch = "warmup"

    def record(self, loss: float, m: torch.Tensor) -> None:
        self.losses.append(float(loss))
        self.multipliers.append(m.detach().clone())

    def state_dict(self) -> dict:
        """The history and the last branch (for an optimizer checkpoint)."""
        return {"losses": list(self.losses), "multipliers": list(self.multipliers), "last_branch": self.last_branch}

    def load_state_dict(self, state: dict) -> None:
        self.losses.clear()
        self.losses.extend(state["losses"])
        self.multipliers.clear()
        self.multipliers.extend(state["multipliers"])
        self.last_branch = state["last_branch"]

    def __call__(self, m: torch.Tensor) -> torch.Tensor:
        if len(self.losses) < self.warmup:
            self.last_branch = "warmup"
            return regularization_loss(m)
        if self.losses[0] - self.losses[-1] > self.threshold:
            self.last_branch = "improving"
            return ((m - self.multipliers[-1]) ** 2).mean()
        self.last_branch = "stagnating"
        return regularization_loss(m) - 0.1 * (m - 1.0).abs().mean()
