"""The seed's self-modifying update rule, a pure function (the replica's document, "the seed rule").

    x_bar = mean of the inputs over every row,
    W <- clamp(W - lr * (W x_bar) x_bar^T / (|x_bar|^2 + eps), -10, 10)

applied when ``|x_bar|^2 > eps``. It is one step of gradient descent on
``1/2 |W x_bar|^2 / |x_bar|^2``: the delta rule (Yang et al. 2024, Eq. 1) with value ``v = 0``.
:mod:`nested_lab.models.self_modifying` builds the document's layers on it.

Shapes: ``W`` [out, in]; inputs [..., in]; ``x_bar`` [in].
"""

from __future__ import annotations

import torch

WEIGHT_LIMIT = 10.0
NORM_EPS = {"in_forward": 1e-6, "deferred": 1e-8}  # each original version's threshold and denominator guard


def self_modifying_update(weight: torch.Tensor, inputs: torch.Tensor, lr: float,
                          normalized: bool = True, eps: float = NORM_EPS["deferred"]) -> torch.Tensor:
    """The seed rule: the new weight ``clamp(W - lr (W x_bar) x_bar^T / (|x_bar|^2 + eps), -10, 10)``.

    ``weight`` ``[out, in]``; ``inputs`` ``[..., in]``, averaged over every row into ``x_bar``.
    ``normalized=False`` leaves out the division by ``|x_bar|^2 + eps``. When
    ``|x_bar|^2 <= eps`` the weight is returned unchanged (no clamp either), as in the original.
    A rule applied in loops: it trusts its caller (``lr >= 0``, ``eps > 0``, matching shapes).
    """
    term = update_term(weight, inputs, lr, normalized, eps)
    if term is None:
        return weight.clone()
    return (weight - term).clamp(-WEIGHT_LIMIT, WEIGHT_LIMIT)


def update_term(weight: torch.Tensor, inputs: torch.Tensor, lr: float, normalized: bool,
                eps: float) -> torch.Tensor | None:
    """``lr (W x_bar) x_bar^T [/ (|x_bar|^2 + eps)]``, or None when ``|x_bar|^2 <= eps``.

    Runs in the layers' forward passes and trusts its caller. Whether the original skips the
    update depends on the value of ``|x_bar|^2``, so this reads it (the rule, not a check).
    """
    with torch.no_grad():
        x_bar = inputs.detach().reshape(-1, weight.shape[1]).mean(dim=0)
        norm_sq = x_bar @ x_bar
        if norm_sq <= eps:
            return None
        term = lr * torch.outer(weight.detach() @ x_bar, x_bar)
        return term / (norm_sq + eps) if normalized else term

