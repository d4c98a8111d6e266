"""Linear layers initialised from an explicit ``torch.Generator``.

``nn.Linear(...)`` draws its initial weights from the global random state; these helpers build
the layer with ``nn.utils.skip_init`` (nothing drawn) and then fill it from the given generator,
so library code never touches global state.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def uniform_linear(fan_in: int, fan_out: int, generator: torch.Generator) -> nn.Linear:
    """``nn.Linear``'s default initialisation: weight and bias uniform in ``+-1/sqrt(fan_in)``."""
    layer = nn.utils.skip_init(nn.Linear, fan_in, fan_out)
    bound = 1 / math.sqrt(fan_in)
    nn.init.uniform_(layer.weight, -bound, bound, generator=generator)
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


def xavier_linear(fan_in: int, fan_out: int, generator: torch.Generator, gain: float = 1.0) -> nn.Linear:
    """Xavier-uniform weight (Glorot & Bengio 2010: bound ``gain * sqrt(6 / (fan_in + fan_out))``)
    and a zero bias."""
    layer = nn.utils.skip_init(nn.Linear, fan_in, fan_out)
    nn.init.xavier_uniform_(layer.weight, gain=gain, generator=generator)
    nn.init.zeros_(layer.bias)
    return layer
