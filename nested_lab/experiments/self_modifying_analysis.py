"""Measurements of the self-modifying layers: what their update does, and what a weight change proves.

* :func:`projection_trace` follows ``|W x_bar|`` and ``|W y|`` (``y`` orthogonal to ``x_bar``)
  while a :class:`~nested_lab.models.self_modifying.SelfModifyingLinear` sees the same batch
  again and again; the seed rule ``W <- W (I - lr P)``, ``P = x_bar x_bar^T / |x_bar|^2``,
  predicts ``|W x_bar| = (1 - lr)^n |W_0 x_bar|`` and ``|W y|`` constant.
* :func:`demo_weight_change` repeats the document's validation: a ``SelfModifyingTitan``
  (64 -> 128 -> 64, two GRU layers, rate 1e-3), one forward pass, then five more on the
  same input, and the mean absolute change of the input projection's weight.
* :func:`same_size_changes` produces a change of the same mean size by a plain weight decay
  and by random noise: neither stores anything, so the size of a change is no evidence.
* :func:`demo_attention_change` repeats the document's Demo 4 on ``SelfModifyingAttention``;
  :func:`distance_to_delta_rule` compares the seed's step with a delta-rule step.
* :func:`backward_succeeds` and :func:`pending_after` test the two historical update variants.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from nested_lab import runtime
from nested_lab.models.self_modifying import (
    NORM_EPS,
    SelfModifyingAttention,
    SelfModifyingLinear,
    SelfModifyingTitan,
    self_modifying_update,
)
from nested_lab.parameters import check_positive_ints


def projection_trace(layer: SelfModifyingLinear, batch: torch.Tensor, updates: int) -> pd.DataFrame:
    """Apply the layer's update ``updates`` times to the same ``batch`` ``[N, in]`` and record, per
    update, ``along_mean`` = ``|W x_bar|``, ``orthogonal`` = ``|W y|`` for a fixed unit ``y``
    orthogonal to ``x_bar``, and ``predicted_along_mean`` = ``(1 - lr)^n |W_0 x_bar|``.
    The layer's weight is restored afterwards."""
    if not isinstance(layer, SelfModifyingLinear):
        raise TypeError(f"layer must be a SelfModifyingLinear, got {type(layer).__name__}")
    if batch.ndim != 2 or batch.shape[1] != layer.in_features:
        raise ValueError(f"batch must have shape [N, {layer.in_features}], got {tuple(batch.shape)}")
    if not layer.normalized:
        raise ValueError("the (1 - lr)^n prediction holds for normalized=True only")
    check_positive_ints(updates=updates)
    mean = batch.mean(dim=0)
    mean_unit = mean / mean.norm()
    other = torch.roll(mean_unit, 1)
    orthogonal = other - (other @ mean_unit) * mean_unit
    orthogonal = orthogonal / orthogonal.norm()
    saved = layer.weight.detach().clone()
    rows = []
    with torch.no_grad():
        start = float((layer.weight @ mean_unit).norm())
        for n in range(updates + 1):
            rows.append({"update": n, "along_mean": float((layer.weight @ mean_unit).norm()),
                         "orthogonal": float((layer.weight @ orthogonal).norm()),
                         "predicted_along_mean": start * (1 - layer.self_mod_lr) ** n})
            layer.weight.copy_(self_modifying_update(layer.weight, batch, layer.self_mod_lr, layer.normalized,
                                                    NORM_EPS[layer.update]))
        layer.weight.copy_(saved)
    return pd.DataFrame(rows)


def demo_weight_change(seed: int, passes: int = 5) -> tuple[float, SelfModifyingTitan]:
    """The document's check: mean ``|W_after - W_before|`` of the input projection over ``passes``
    forward passes of a fresh ``SelfModifyingTitan(64, 128, 64, num_layers=2, self_mod_lr=1e-3)``
    on one ``[4, 10, 64]`` Gaussian input, after a first pass. Returns the change and the model."""
    with runtime.seeded(seed):
        model = SelfModifyingTitan(input_dim=64, hidden_dim=128, output_dim=64, num_layers=2, self_mod_lr=1e-3)
    x = torch.randn(4, 10, 64, generator=runtime.generator(seed))
    model.train()
    with torch.no_grad(), runtime.seeded(seed):  # dropout draws from torch's generator
        model(x)
        before = model.input_proj.weight.detach().clone()
        for _ in range(passes):
            model(x)
    return float((model.input_proj.weight.detach() - before).abs().mean()), model


def same_size_changes(weight: torch.Tensor, change: float, seed: int) -> dict[str, torch.Tensor]:
    """Two weights whose mean absolute difference from ``weight`` is ``change``: a weight decay
    ``(1 - lam) W`` with ``lam = change / mean|W|``, and ``W + noise`` with Gaussian noise of
    standard deviation ``change * sqrt(pi / 2)`` (the mean absolute value of N(0, s^2) is
    ``s sqrt(2 / pi)``)."""
    if change <= 0:
        raise ValueError(f"change must be positive, got {change}")
    decay = change / float(weight.abs().mean())
    noise = torch.randn(weight.shape, generator=runtime.generator(seed)) * change * math.sqrt(math.pi / 2)
    return {"decay": (1 - decay) * weight, "noise": weight + noise}


def backward_succeeds(update: str, seed: int) -> bool:
    """Whether ``loss.backward()`` runs after a training-mode forward pass of a small
    ``SelfModifyingTitan`` built with ``update`` (``"in_forward"`` changes the weight that
    autograd saved, and the backward pass refuses)."""
    with runtime.seeded(seed):
        model = SelfModifyingTitan(input_dim=16, hidden_dim=32, output_dim=16, num_layers=1, update=update)
    with runtime.seeded(seed):  # dropout draws from torch's generator
        output, _ = model.train()(torch.randn(2, 5, 16, generator=runtime.generator(seed)))
    try:
        output.square().mean().backward()
    except RuntimeError as error:
        if "modified by an inplace operation" not in str(error):
            raise
        return False
    return True


def pending_after(passes: int, seed: int) -> int:
    """Length of the input projection's pending-update list after ``passes`` forward passes, in eval
    mode, of a ``SelfModifyingTitan(update="deferred")`` whose updates are never applied."""
    with runtime.seeded(seed):
        model = SelfModifyingTitan(input_dim=16, hidden_dim=32, output_dim=16, num_layers=1, update="deferred")
    model.eval()
    x = torch.randn(2, 5, 16, generator=runtime.generator(seed))
    with torch.no_grad():
        for _ in range(passes):
            model(x)
    return len(model.input_proj.pending_updates)


def demo_attention_change(seed: int) -> float:
    """The document's Demo 4: mean ``|W_q after - W_q before|`` of a fresh
    ``SelfModifyingAttention(128, num_heads=8, self_mod_lr=1e-3)`` after one training-mode
    forward pass on a ``[4, 16, 128]`` Gaussian input."""
    with runtime.seeded(seed):
        layer = SelfModifyingAttention(128, num_heads=8, self_mod_lr=1e-3).train()
        before = layer.q_proj.weight.detach().clone()
        with torch.no_grad():
            layer(torch.randn(4, 16, 128, generator=runtime.generator(seed)))
    return float((layer.q_proj.weight.detach() - before).abs().mean())


def distance_to_delta_rule(seed: int, dim: int = 32, lr: float = 0.01) -> float:
    """How far the seed's step is from a delta-rule step on the same input:
    ``|dW_seed - dW_delta| / |dW_delta|`` (Frobenius), with ``dW_seed = -lr (W x) x^T / |x|^2``
    and ``dW_delta = -lr (W x - v) x^T / |x|^2`` for a random weight ``W = 0.01 randn``, input
    ``x`` and target ``v`` -- 0 if the seed's rule were the delta rule."""
    gen = runtime.generator(seed)
    weight = 0.01 * torch.randn(dim, dim, generator=gen)
    x, target = torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
    seed_step = self_modifying_update(weight, x.unsqueeze(0), lr) - weight
    delta_step = -lr * torch.outer(weight @ x - target, x) / x.square().sum()
    return float((seed_step - delta_step).norm() / delta_step.norm())
