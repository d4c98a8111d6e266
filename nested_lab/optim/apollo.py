"""APOLLO: AdamW's adaptive step, coarsened to channels or the whole tensor and estimated from a
rank-r random sketch of the gradient (Zhu et al. 2024, arXiv 2412.05270, Algorithm 1).

Shapes, for one 2-D weight (a tall one is handled as its transpose, so the sketch always
compresses the shorter side):
    G   (m, n)   the gradient;  Gw (d, D) its wide view: Gw = G if m < n else G^T
    d = min(m, n)  the side the projection compresses;  D = max(m, n)  the channels
    r              the rank of the sketch
    P   (r, d)   the random projection, entries N(0, 1/r), redrawn every ``update_proj_gap`` steps
    R   (r, D)   the sketch P Gw;  M, V (r, D) its Adam moments
    s   (D,)     channel-wise scale, or ()  the tensor-wise scale
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch.linalg import vector_norm

from nested_lab import runtime
from nested_lab.parameters import check_choice, check_positive_ints, check_range

SCALE_TYPES = ("channel", "tensor")
GUARD = 1e-8  # added to the norms that divide, so that a zero gradient gives a zero step
SEED_ADVANCE = 15  # a redraw moves a parameter's seed to the 15th int64 drawn from the old one


class APOLLO(torch.optim.Optimizer):
    r"""APOLLO (Zhu et al. 2024, Algorithm 1) with the norm-growth limiter of Fira (Chen et al. 2024).

    For a 2-D weight ``W`` with gradient ``G_t`` in its wide view (``d <= D``; see the shape legend),
    at step ``t = 1, 2, ...`` with ``T = update_proj_gap``::

        P_k ~ N(0, 1/r)^(r x d),   k = floor((t - 1) / T)           the projection, redrawn every T steps
        R_t = P_k G_t                                               (r x D)
        M_t = b1 M_{t-1} + (1 - b1) R_t,   V_t = b2 V_{t-1} + (1 - b2) R_t^2
        R~_t = M_t / (sqrt(V_t) + eps)
        s_j = ||R~_t[:, j]|| / (||R_t[:, j]|| + 1e-8)               scale_type="channel"
        s   = ||R~_t|| / (||R_t|| + 1e-8)                           scale_type="tensor"
        U_t = G_t diag(s)
        U_t <- U_t / f_t,   f_t = max(||U_t|| / (||U_{t-1}|| + 1e-8), gamma) / gamma      (t > 1)
        W_t = (W_{t-1} - lr c_t alpha U_t) (1 - lr wd),   c_t = sqrt(1 - b2^t) / (1 - b1^t)

    The limiter (``gamma = norm_growth_limit``; None switches it off) keeps ``||U_t|| <= gamma
    ||U_{t-1}||``, where ``U_{t-1}`` is the previous limited update; it acts before ``alpha``, ``lr``
    and ``c_t``, so a learning-rate schedule never trips it. APOLLO-Mini is ``rank=1,
    scale_type="tensor"`` (the defaults). Every other parameter -- not 2-D (biases, norms), or in a
    group with ``"apollo": False`` -- takes the AdamW step of the same convention, with ``M, V`` on
    ``G`` itself: ``W_t = (W_{t-1} - lr c_t M_t / (sqrt(V_t) + eps)) (1 - lr wd)``.

    Conventions are those of the authors' package ``apollo-torch`` 1.0.3, which this class matches
    step for step: the bias correction is folded into ``c_t`` (the paper's ``M^ / (sqrt(V^) + eps)``
    with ``eps`` read as ``eps / sqrt(1 - b2^t)``); the decoupled weight decay is applied after the
    step (``torch.optim.AdamW`` decays before it: a difference of order ``lr^2 wd``).

    ``alpha``: None gives ``sqrt(d / r)``, ``d`` the compressed side. At the first step ``R~`` is about
    ``sign(R)`` with norm ``sqrt(r D)`` while AdamW's ``sign(G)`` has norm ``sqrt(d D)``, so this
    ``alpha`` gives the tensor-wise update AdamW's size (the channel-wise one comes out larger at small
    ``r``, where a column's sketch norm can be near zero). ``apollo-torch``'s ``scale`` is ``alpha^2``
    (its multiplier is ``sqrt(scale)``); its recommended ``scale`` 1 (APOLLO, rank d/4) and 128
    (Mini) are below this default.

    ``seed``: the k-th parameter (1-based, counting every parameter of every group in order) draws its
    first projection from ``seed + k``; each redraw moves the seed on by :func:`next_projection_seed`.
    With ``seed=0`` the projections are ``apollo-torch``'s. ``P`` is never stored but redrawn from its
    seed at every step, so a weight's state is ``M, V`` (``2 r D`` numbers), the limiter's previous
    norm, the step and the seed -- against AdamW's ``2 m n``.

    Every hyperparameter is also a param-group key (``apollo`` too, default True); groups are checked
    when added.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, *, rank: int = 1, scale_type: str = "tensor",
                 alpha: float | None = None, update_proj_gap: int = 200,
                 norm_growth_limit: float | None = 1.01, seed: int = 0) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "rank": rank,
                    "scale_type": scale_type, "alpha": alpha, "update_proj_gap": update_proj_gap,
                    "norm_growth_limit": norm_growth_limit, "seed": seed, "apollo": True}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (torch's contract) and check its hyperparameters."""
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One APOLLO step for every parameter with a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is not None:
                    self._update(p, group, group["seed"] + index)
        return loss

    def _update(self, p: torch.Tensor, group: dict, seed: int) -> None:
        state = self.state[p]
        if not state:
            _init_state(state, p, group, seed)
        state["step"] += 1
        if "projection_seed" in state:
            direction = _apollo_direction(p.grad, state, group)
        else:
            direction = _adam_direction(p.grad, state, group)
        p.add_(direction, alpha=-group["lr"] * _bias_correction(group["betas"], state["step"]))
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])


def _check_group(group: dict) -> None:
    check_range("lr", group["lr"], 0, low_open=True)
    beta1, beta2 = group["betas"]
    check_range("betas[0]", beta1, 0, 1, high_open=True)
    check_range("betas[1]", beta2, 0, 1, high_open=True)
    check_range("eps", group["eps"], 0)
    check_range("weight_decay", group["weight_decay"], 0)
    check_positive_ints(rank=group["rank"], update_proj_gap=group["update_proj_gap"])
    check_choice("scale_type", group["scale_type"], SCALE_TYPES)
    if group["alpha"] is not None:
        check_range("alpha", group["alpha"], 0, low_open=True)
    if group["norm_growth_limit"] is not None:
        check_range("norm_growth_limit", group["norm_growth_limit"], 1)
    check_range("seed", group["seed"], 0, integer=True)


def _init_state(state: dict, p: torch.Tensor, group: dict, seed: int) -> None:
    """Step 0 and zero moments: on the sketch (r, D) for an APOLLO matrix, on ``p`` itself otherwise."""
    state["step"] = 0
    shape = p.shape
    if group["apollo"] and p.ndim == 2:
        state["projection_seed"] = seed
        shape = (group["rank"], max(p.shape))
    state["exp_avg"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
    state["exp_avg_sq"] = torch.zeros(shape, dtype=p.dtype, device=p.device)


def _bias_correction(betas: tuple[float, float], step: int) -> float:
    """``c_t = sqrt(1 - b2^t) / (1 - b1^t)``."""
    beta1, beta2 = betas
    return math.sqrt(1 - beta2**step) / (1 - beta1**step)


def _adam_direction(x: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
    """Update the moments of ``x`` in place and return ``M / (sqrt(V) + eps)`` (not bias-corrected)."""
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.mul_(beta1).add_(x, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(x, x, value=1 - beta2)
    return exp_avg / exp_avg_sq.sqrt().add_(group["eps"])


def _apollo_direction(grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
    """``alpha U_t`` for a 2-D gradient (class docstring), in the gradient's own orientation."""
    wide = grad.shape[0] < grad.shape[1]
    g = grad if wide else grad.T  # (d, D)
    rank, d = group["rank"], g.shape[0]
    if state["step"] > 1 and (state["step"] - 1) % group["update_proj_gap"] == 0:
        state["projection_seed"] = next_projection_seed(state["projection_seed"])
    projection = random_projection(state["projection_seed"], rank, d, wide=wide, like=g)  # (r, d)
    sketch = projection @ g  # (r, D)
    scaled = g * _scale(_adam_direction(sketch, state, group), sketch, group["scale_type"])  # (d, D)
    if group["norm_growth_limit"] is not None:
        scaled = _limit_norm_growth(scaled, state, group["norm_growth_limit"])
    alpha = math.sqrt(d / rank) if group["alpha"] is None else group["alpha"]
    return (scaled if wide else scaled.T) * alpha


def _scale(normalized: torch.Tensor, sketch: torch.Tensor, scale_type: str) -> torch.Tensor:
    """``s_j = ||R~[:, j]|| / (||R[:, j]|| + 1e-8)`` per channel (D,), or one ratio of whole norms ()."""
    if scale_type == "channel":
        return vector_norm(normalized, dim=0) / (vector_norm(sketch, dim=0) + GUARD)
    return vector_norm(normalized) / (vector_norm(sketch) + GUARD)


def _limit_norm_growth(update: torch.Tensor, state: dict, gamma: float) -> torch.Tensor:
    """Fira's limiter: shrink ``update`` so its norm is at most ``gamma`` times the previous one."""
    norm = vector_norm(update)
    if "previous_norm" not in state:
        state["previous_norm"] = norm
        return update
    shrink = torch.clamp(norm / (state["previous_norm"] + GUARD), min=gamma) / gamma
    state["previous_norm"] = norm / shrink
    return update / shrink


def random_projection(seed: int, rank: int, side: int, *, wide: bool, like: torch.Tensor) -> torch.Tensor:
    """``P`` (rank, side) with entries N(0, 1/rank), drawn in float32 by a generator on ``like``'s device
    seeded with ``seed``, then cast to ``like``'s dtype. The draw's layout follows ``apollo-torch``:
    (side, rank) then transposed for a wide matrix, (rank, side) for a tall one."""
    shape = (side, rank) if wide else (rank, side)
    gen = runtime.generator(seed, like.device)
    draw = torch.randn(shape, generator=gen, device=like.device, dtype=torch.float32) / math.sqrt(rank)
    return (draw.T if wide else draw).to(like.dtype)


def next_projection_seed(seed: int) -> int:
    """The seed of the next projection: the 15th int64 in [0, 2^63 - 1) drawn by a CPU generator
    seeded with ``seed`` (``apollo-torch``'s chain, so the two draw the same matrices)."""
    draws = torch.randint(0, torch.iinfo(torch.int64).max, (SEED_ADVANCE,), generator=runtime.generator(seed))
    return int(draws[-1])
