"""Gradient descent on quadratics: the textbook stability boundary ``lr * lambda < 2``.

For ``f(x) = 1/2 x^T H x`` gradient descent is ``x_{t+1} = x_t - lr H x_t``, so
along an eigenvector of ``H`` with eigenvalue ``lambda`` the iterate is
multiplied by ``1 - lr*lambda`` each step: it converges monotonically for
``0 < lr*lambda < 1``, converges while flipping sign for ``1 < lr*lambda < 2``
and diverges for ``lr*lambda > 2`` (Nesterov 2018, Sec. 1.2.3). Chapter 0
measures this instead of assuming it.
"""

from __future__ import annotations

import torch

from nested_lab.parameters import check_positive_ints, check_range

REGIMES = ("monotone", "oscillating", "divergent")


def gd_scalar_trajectories(lrs, curvatures, x0: float = 1.0, steps: int = 50) -> torch.Tensor:
    """Run gradient descent on ``f(x) = lambda x^2 / 2`` for every (lr, lambda) pair.

    Returns the iterates, shape ``[steps + 1, len(lrs), len(curvatures)]`` (float64),
    computed step by step with ``x <- x - lr * lambda * x``, not from the closed form.
    """
    lrs, curvatures = _positive_vector("lrs", lrs), _positive_vector("curvatures", curvatures)
    check_positive_ints(steps=steps)
    rate = lrs[:, None] * curvatures[None, :]
    x = torch.full_like(rate, float(x0))
    out = [x]
    for _ in range(steps):
        x = x - rate * x
        out.append(x)
    return torch.stack(out)


def regime(trajectories: torch.Tensor) -> list[str]:
    """Classify trajectories of shape ``[steps + 1, n]``.

    ``divergent``: the last iterate is larger in magnitude than the first, or not finite;
    ``oscillating``: not divergent, and the sign flips on every step;
    ``monotone``: everything else.
    """
    if trajectories.ndim != 2 or trajectories.shape[0] < 2:
        raise ValueError(f"trajectories must have shape [steps + 1 >= 2, n], got {tuple(trajectories.shape)}")
    grows = ~(trajectories[-1].abs() <= trajectories[0].abs())  # an overflowed (NaN) run diverged
    flips = (torch.sign(trajectories[1:]) * torch.sign(trajectories[:-1]) < 0).all(dim=0)
    return [REGIMES[2] if g else REGIMES[1] if f else REGIMES[0]
            for g, f in zip(grows.tolist(), flips.tolist(), strict=True)]


def random_hessians(n: int, dim: int, generator: torch.Generator, max_eig: float = 4.0) -> torch.Tensor:
    """``n`` random symmetric positive-definite ``dim x dim`` matrices (float64) with
    random eigenvectors, eigenvalues uniform in (0, max_eig) and the largest equal to ``max_eig``."""
    check_positive_ints(n=n, dim=dim)
    check_range("max_eig", max_eig, 0, low_open=True)
    q, _ = torch.linalg.qr(torch.randn(n, dim, dim, generator=generator, dtype=torch.float64))
    eig = torch.rand(n, dim, generator=generator, dtype=torch.float64) * max_eig
    eig[:, 0] = max_eig
    return q @ torch.diag_embed(eig) @ q.transpose(1, 2)


def measured_critical_lr(hessians: torch.Tensor, generator: torch.Generator, steps: int = 4000,
                         iterations: int = 40) -> torch.Tensor:
    """The largest stable learning rate of gradient descent on each ``1/2 x^T H x``,
    found by bisection on behaviour (stable: ``|x_T| < |x_0|`` from a random ``x_0``),
    never from the eigenvalues. ``hessians`` has shape ``[n, d, d]``."""
    if hessians.ndim != 3 or hessians.shape[1] != hessians.shape[2]:
        raise ValueError(f"hessians must have shape [n, d, d], got {tuple(hessians.shape)}")
    check_positive_ints(steps=steps, iterations=iterations)
    x0 = torch.randn(hessians.shape[:2], generator=generator, dtype=hessians.dtype)
    # lambda_max <= |H|_F <= sqrt(d) lambda_max, so the bracket [0, 4 sqrt(d) / |H|_F] holds the boundary
    frobenius = torch.linalg.matrix_norm(hessians, ord="fro")
    low, high = torch.zeros_like(frobenius), 4.0 * hessians.shape[1] ** 0.5 / frobenius
    for _ in range(iterations):
        mid = (low + high) / 2
        stable = _final_norm(hessians, x0, mid, steps) < x0.norm(dim=-1)
        low, high = torch.where(stable, mid, low), torch.where(stable, high, mid)
    return (low + high) / 2


def _final_norm(hessians: torch.Tensor, x0: torch.Tensor, lrs: torch.Tensor, steps: int) -> torch.Tensor:
    x = x0
    for _ in range(steps):
        x = x - lrs[:, None] * (hessians @ x.unsqueeze(-1)).squeeze(-1)
    return x.norm(dim=-1)


def _positive_vector(name: str, values) -> torch.Tensor:
    """``values`` (a sequence, an array or a tensor) as a float64 vector of finite numbers > 0."""
    tensor = torch.as_tensor(values, dtype=torch.float64)
    if tensor.ndim != 1 or tensor.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {tuple(tensor.shape)}")
    for value in tensor.tolist():
        check_range(name, value, 0, low_open=True)
    return tensor
