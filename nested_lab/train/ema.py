"""Exponential moving average of a model's weights (the solutions document's EMA, decay 0.999).

The document calls ``ExponentialMovingAverage(model.parameters(), decay=0.999)``
and ``ema.update()``: the API of the ``torch_ema`` package, whose default
(``use_num_updates=True``) ramps the decay in, using
``min(decay, (1 + n) / (10 + n))`` at the n-th update, so that the average is not
dominated by the initial weights. Each update is
``torch.optim.swa_utils.get_ema_multi_avg_fn`` with that decay:
``W_ema <- decay * W_ema + (1 - decay) * W``. ``AveragedModel`` is not used
because it deep-copies the module and keeps its buffers in sync, and CortexGPT's
memories are buffers whose size changes during training; here only the
parameters are averaged, and the live model's memories are used to evaluate.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from nested_lab.parameters import check_range


class WeightEMA:
    """EMA copies of ``model``'s parameters, started at their current values."""

    def __init__(self, model: nn.Module, decay: float = 0.999, ramp: bool = True) -> None:
        check_range("decay", decay, 0, 1, low_open=True, high_open=True)
        self.decay, self.ramp, self.updates = decay, ramp, 0
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p.detach().clone() for p in model.parameters()]

    def current_decay(self) -> float:
        """The decay the next update uses: ``min(decay, (1 + n) / (10 + n))`` with ``ramp``."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.ramp else self.decay

    def update(self, model: nn.Module) -> None:
        get_ema_multi_avg_fn(self.current_decay())(self.params, [p.detach() for p in model.parameters()], None)
        self.updates += 1

    def as_dict(self) -> dict[str, torch.Tensor]:
        """Parameter name -> averaged value, for ``torch.func.functional_call``."""
        return dict(zip(self.names, self.params, strict=True))

    def state_dict(self) -> dict:
        return {"updates": self.updates, "params": {name: p.clone() for name, p in self.as_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        for name, p in self.as_dict().items():
            p.copy_(state["params"][name])
