"""Generator-seeded linear layers: deterministic, and the global random state untouched."""

import math

import torch

from nested_lab import runtime
from nested_lab.init import uniform_linear, xavier_linear


def test_layers_draw_only_from_their_generator():
    state = torch.random.get_rng_state()
    first = uniform_linear(5, 3, runtime.generator(1))
    second = uniform_linear(5, 3, runtime.generator(1))
    xavier = xavier_linear(5, 3, runtime.generator(2), gain=0.01)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    assert first.weight.abs().max() <= 1 / math.sqrt(5) and first.bias.abs().max() <= 1 / math.sqrt(5)
    assert xavier.weight.abs().max() <= 0.01 * math.sqrt(6 / 8) and not xavier.bias.any()
