"""Adaptive gradient clipping, as the CortexGPT phase-1 summary describes it.

"Dynamic threshold: adjusts based on gradient history; spike detection: gradient
spikes > 3x average; aggressive clipping: 10x more aggressive during spikes."
The summary gives no formula beyond these numbers, so the replica reads them as:
keep the last ``window`` total gradient norms (before clipping); a norm above
``spike_factor`` times their mean is a spike and is clipped to ``clip / tighten``;
any other norm is clipped to ``clip``. The first ``warmup`` norms are never spikes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from torch import nn

from nested_lab.parameters import check_positive_ints, check_range


class AdaptiveClipper:
    """Clip to ``clip``, or to ``clip / tighten`` when the norm is a spike."""

    def __init__(self, clip: float, window: int = 100, spike_factor: float = 3.0, tighten: float = 10.0,
                 warmup: int = 10) -> None:
        check_range("clip", clip, 0, low_open=True)
        check_range("spike_factor", spike_factor, 1, low_open=True)
        check_range("tighten", tighten, 1)
        check_positive_ints(window=window, warmup=warmup)
        self.clip, self.spike_factor, self.tighten, self.warmup = clip, spike_factor, tighten, warmup
        self.history: deque[float] = deque(maxlen=window)
        self.spikes = 0

    def threshold(self, norm: float) -> float:
        """The clipping threshold for a gradient of total norm ``norm``; records the norm."""
        spike = len(self.history) >= self.warmup and norm > self.spike_factor * (sum(self.history) / len(self.history))
        self.history.append(norm)
        self.spikes += spike
        return self.clip / self.tighten if spike else self.clip

    def __call__(self, parameters: Iterable[nn.Parameter]) -> tuple[float, float]:
        """Clip the gradients of ``parameters`` in place; returns (norm before clipping, threshold used)."""
        params = [p for p in parameters if p.grad is not None]
        total = nn.utils.get_total_norm([p.grad for p in params])
        threshold = self.threshold(float(total))
        nn.utils.clip_grads_with_norm_(params, threshold, total)
        return float(total), threshold

    def state_dict(self) -> dict:
        return {"history": list(self.history), "spikes": self.spikes}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(state["history"])
        self.spikes = state["spikes"]
