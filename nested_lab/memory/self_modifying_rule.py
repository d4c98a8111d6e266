"""The seed's self-modifying update rule, a pure function (the replica's document, "the seed rule").

    x_bar = mean of the inputs over every row,
    W <- clamp(W - lr * (W x_bar) x_bar^T / (|x_bar|^2 + eps), -10, 10)

applied when ``|x_bar|^2 > eps``. It is one step of gradient descent on
``1/2 |W x_bar|^2 / |x_bar|^2``: the delta rule (Yang et al. 2024, Eq. 1) with value ``v = 0``.
:mod:`nested_lab.models.self_modifying` builds the document's layers on it.

Shapes: ``W`` [out, in]; inputs [..., in]; ``x_bar`` [in].
"""

from __future__ import annotations

import math

import torch

from nested_lab.parameters import check_numbers

WEIGHT_LIMIT = 10.0
NORM_EPS = {"in_forward": 1e-6, "deferred": 1e-8}  # each original version's threshold and denominator guard


def self_modifying_update(weight: torch.Tensor, inputs: torch.Tensor, lr: float,
                          normalized: bool = True, eps: float = NORM_EPS["deferred"]) -> torch.Tensor:
    """The seed rule: the new weight ``clamp(W - lr (W x_bar) x_bar^T / (|x_bar|^2 + eps), -10, 10)``.

    ``weight`` ``[out, in]``; ``inputs`` ``[..., in]``, averaged over every row into ``x_bar``.
    ``normalized=False`` leaves out the division by ``|x_bar|^2 + eps``. When
    ``|x_bar|^2 <= eps`` the weight is returned unchanged (no clamp either), as in the original.
    """
    term = update_term(weight, inputs, lr, normalized, eps)
    if term is None:
        return weight.clone()
    return (weight - term).clamp(-WEIGHT_LIMIT, WEIGHT_LIMIT)


def update_term(weight: torch.Tensor, inputs: torch.Tensor, lr: float, normalized: bool,
                 eps: float) -> torch.Tensor | None:
    """``lr (W x_bar) x_bar^T [/ (|x_bar|^2 + eps)]``, or None when ``|x_bar|^2 <= eps``."""
    _check_update_inputs(weight, inputs, lr)
    check_numbers(eps=eps)
    if not eps > 0:
        raise ValueError(f"eps must be a number > 0, got {eps!r}")
    with torch.no_grad():
        x_bar = inputs.detach().reshape(-1, weight.shape[1]).mean(dim=0)
        norm_sq = x_bar @ x_bar
        if norm_sq <= eps:
            return None
        term = lr * torch.outer(weight.detach() @ x_bar, x_bar)
        return term / (norm_sq + eps) if normalized else term


def _check_update_inputs(weight: torch.Tensor, inputs: torch.Tensor, lr: float) -> None:
    if not isinstance(weight, torch.Tensor) or not isinstance(inputs, torch.Tensor):
        raise TypeError(f"weight and inputs must be tensors, got {type(weight).__name__} and "
                        f"{type(inputs).__name__}")
    if weight.ndim != 2:
        raise ValueError(f"weight must have shape [out, in], got {tuple(weight.shape)}")
    if inputs.ndim < 1 or inputs.shape[-1] != weight.shape[1] or inputs.numel() == 0:
        raise ValueError(f"inputs must be a non-empty tensor of shape [..., {weight.shape[1]}], "
                         f"got {tuple(inputs.shape)}")
    if not weight.is_floating_point() or inputs.dtype != weight.dtype or inputs.device != weight.device:
        raise TypeError(f"weight and inputs must share a floating dtype and a device, got {weight.dtype} on "
                        f"{weight.device} and {inputs.dtype} on {inputs.device}")
    check_lr(lr)


def check_lr(lr: float) -> None:
    check_numbers(lr=lr)
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"the self-modification lr must be finite and >= 0, got {lr}")


