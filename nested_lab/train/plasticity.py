"""Forgetting, flatness and drift: what fine-tuning does to a trained network, measured.

Everything here works on any ``nn.Module`` and a loss callable ``loss_fn(net, batch) -> scalar``:
``net`` is called exactly like the module's ``forward`` (it is the module itself, or the module
run with other weights through ``torch.func.functional_call``), and ``batch`` is a tuple of
tensors that share a leading example dimension, e.g. ``(idx, targets)`` for a GPT.

Notation: theta the trainable parameters as a dict ``name -> tensor``, theta* an anchor (the
pretrained weights), N examples, T tasks, R ``[T, T]`` the accuracy matrix, b ``[T]`` the
accuracies at initialisation. A parameter group is a name such as ``blocks.0.attn`` made from
parameter names by ``group_of`` (default :func:`module_group`).

Sources: Kirkpatrick et al. (PNAS 2017, EWC, eq. 3); Keskar et al. (ICLR 2017) and Dinh et al.
(ICML 2017) on sharpness; Frankle et al. (ICML 2020, linear mode connectivity); Lopez-Paz &
Ranzato (NeurIPS 2017, GEM, the ACC / BWT / FWT scores).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from nested_lab.parameters import check_positive_ints, check_range

Batch = tuple[Tensor, ...]
LossFn = Callable[[Callable[..., Any], Batch], Tensor]
Params = dict[str, Tensor]


# ----- parameters as dicts ------------------------------------------------------------------------

def parameter_snapshot(model: nn.Module) -> Params:
    """Detached copies of the trainable parameters, ``name -> tensor`` (an anchor theta*)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def module_group(name: str) -> str:
    """The default parameter group: the name without its last component (``.weight``), cut one
    component after a block index: ``blocks.0.attn.c_attn.weight -> blocks.0.attn``,
    ``wte.weight -> wte``, ``transformer.h.1.mlp.c_fc.bias -> transformer.h.1.mlp``."""
    parts = name.split(".")[:-1] or name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 2])
    return ".".join(parts)


def _with_weights(model: nn.Module, params: Params) -> Callable[..., Any]:
    """``model`` called with ``params`` in place of its own (the rest of its state unchanged)."""
    return lambda *args, **kwargs: functional_call(model, params, args, kwargs)


def _as_batch(batch: Batch) -> Batch:
    """A batch is a tuple (or list) of tensors sharing the leading example dimension."""
    if not isinstance(batch, tuple | list) or not all(isinstance(t, Tensor) for t in batch):
        raise TypeError(f"a batch must be a tuple of tensors, got {type(batch).__name__}")
    return tuple(batch)


def _trainable(model: nn.Module) -> Params:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[name] * b[name]).sum() for name in a)


# ----- EWC: diagonal Fisher and penalty -----------------------------------------------------------

def diagonal_fisher(model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch], *,
                    chunk_size: int | None = None) -> Params:
    """Diagonal empirical Fisher at the current weights (Kirkpatrick et al. 2017, EWC):
    ``F_i = (1/N) sum_n (d loss_n / d theta_i)^2``, the mean over all N examples of ``batches`` of
    the squared per-example gradient (not the square of the mean gradient). Each example is fed
    to ``loss_fn`` as a batch of one; per-example gradients come from ``vmap(grad(...))``, in
    chunks of ``chunk_size`` examples when given. Put the model in eval mode (no dropout) first.
    Attention runs on the math kernel, the one with batching rules for ``vmap``."""
    if chunk_size is not None:
        check_positive_ints(chunk_size=chunk_size)
    params = _trainable(model)

    def example_loss(theta: Params, example: Batch) -> Tensor:
        return loss_fn(_with_weights(model, theta), tuple(t.unsqueeze(0) for t in example))

    per_example_grad = vmap(grad(example_loss), in_dims=(None, 0), chunk_size=chunk_size)
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    count = 0
    for batch in batches:
        batch = _as_batch(batch)
        with sdpa_kernel(SDPBackend.MATH):
            grads = per_example_grad(params, batch)  # name -> (n, *shape)
        for name, g in grads.items():
            total[name] += g.square().sum(dim=0)
        count += batch[0].shape[0]
    if count == 0:
        raise ValueError("diagonal_fisher needs at least one example")
    return {name: t / count for name, t in total.items()}


class EWCPenalty:
    """Elastic weight consolidation (Kirkpatrick et al. 2017, eq. 3):
    ``(lambda / 2) sum_i F_i (theta_i - theta*_i)^2`` with the anchor theta* (the model's weights
    when the penalty is made) and the Fisher F frozen as detached copies. Calling it on the model
    gives a differentiable scalar to add to the new task's loss."""

    def __init__(self, model: nn.Module, fisher: Params, strength: float) -> None:
        self.strength = check_range("strength", strength, 0)
        params = dict(model.named_parameters())
        unknown = sorted(set(fisher) - set(params))
        if unknown or not fisher:
            raise ValueError(f"fisher must name parameters of the model; unknown or none: {unknown}")
        for name, f in fisher.items():
            if f.shape != params[name].shape:
                raise ValueError(f"fisher[{name!r}] has shape {tuple(f.shape)}, "
                                 f"the parameter {tuple(params[name].shape)}")
        self.fisher = {name: f.detach().clone() for name, f in fisher.items()}
        self.anchor = {name: params[name].detach().clone() for name in fisher}

    def __call__(self, model: nn.Module) -> Tensor:
        params = dict(model.named_parameters())
        total = sum((f * (params[name] - self.anchor[name]).square()).sum() for name, f in self.fisher.items())
        return 0.5 * self.strength * total


# ----- flatness: sharpness and loss barrier -------------------------------------------------------

def top_hessian_eigenvalue(model: nn.Module, loss_fn: LossFn, batch: Batch, iterations: int,
                           generator: torch.Generator) -> float:
    """Sharpness (Keskar et al. 2017): the Hessian eigenvalue of largest magnitude of the loss on
    ``batch`` over the trainable parameters, by power iteration ``v <- Hv / ||Hv||`` from a normal
    start vector drawn with ``generator``; returns the Rayleigh quotient ``v^T H v`` of the last
    iterate. ``Hv`` is forward-over-reverse (``jvp`` of ``grad``). Sharpness depends on the
    parameterisation (Dinh et al. 2017): compare models of the same parameterisation only.
    Attention runs on the math kernel, the one with forward-mode derivatives."""
    check_positive_ints(iterations=iterations)
    batch = _as_batch(batch)
    params = _trainable(model)

    def loss(theta: Params) -> Tensor:
        return loss_fn(_with_weights(model, theta), batch)

    def hessian_times(v: Params) -> Params:
        return jvp(grad(loss), (params,), (v,))[1]

    v = {name: torch.randn(p.shape, generator=generator, device=generator.device, dtype=p.dtype).to(p.device)
         for name, p in params.items()}
    with sdpa_kernel(SDPBackend.MATH):
        for _ in range(iterations):
            norm = _dot(v, v).sqrt()
            v = {name: t / norm for name, t in v.items()}
            hv = hessian_times(v)
            eigenvalue = _dot(v, hv)
            v = hv
    return float(eigenvalue)


@torch.no_grad()
def loss_barrier(model: nn.Module, start: Params, end: Params, loss_fn: LossFn, batch: Batch,
                 points: int = 11) -> tuple[list[float], float]:
    """Linear mode connectivity (Frankle et al. 2020): the losses ``L(a)`` of the weights
    ``theta(a) = (1 - a) start + a end`` at ``points`` values of ``a`` evenly spaced in [0, 1], and
    the barrier ``max_a [L(a) - ((1 - a) L(0) + a L(1))]``, about 0 (or below) when the two weight
    vectors lie in one basin. ``start`` and ``end`` name the same parameters of ``model`` (others
    keep the model's values; buffers may be named too); the model itself is not modified."""
    check_range("points", points, 2, integer=True)
    batch = _as_batch(batch)
    known = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    if set(start) != set(end) or not set(start) <= known or not start:
        raise ValueError("start and end must name the same parameters of the model")
    alphas = torch.linspace(0, 1, points).tolist()
    losses = [float(loss_fn(_with_weights(model, _interpolate(start, end, a)), batch)) for a in alphas]
    chord = [(1 - a) * losses[0] + a * losses[-1] for a in alphas]
    return losses, max(loss - line for loss, line in zip(losses, chord, strict=True))


def _interpolate(start: Params, end: Params, a: float) -> Params:
    """``(1 - a) start + a end``, exactly ``start`` at 0 and ``end`` at 1."""
    return {name: torch.lerp(start[name], end[name], a) for name in start}


# ----- drift and gradients per parameter group ----------------------------------------------------

def weight_drift(model: nn.Module, reference: Params,
                 group_of: Callable[[str], str] = module_group) -> dict[str, float]:
    """Relative distance from the reference weights per group, ``||theta_g - theta*_g|| / ||theta*_g||``
    over the parameters named in ``reference``, and ``"all"``: the same over all of them (global
    relative L2 distance). A group whose reference is all zeros gives ``inf`` (``0.0`` if unmoved)."""
    params = dict(model.named_parameters())
    if not set(reference) <= set(params):
        raise ValueError(f"reference names no parameters of the model: {sorted(set(reference) - set(params))}")
    moved: dict[str, float] = {}
    size: dict[str, float] = {}
    for name, anchor in reference.items():
        group = group_of(name)
        change = float((params[name].detach() - anchor).square().sum())
        moved[group] = moved.get(group, 0.0) + change
        size[group] = size.get(group, 0.0) + float(anchor.square().sum())
    moved["all"], size["all"] = sum(moved.values()), sum(size.values())
    return {group: _ratio(math.sqrt(moved[group]), math.sqrt(size[group])) for group in moved}


def _ratio(distance: float, norm: float) -> float:
    if norm > 0:
        return distance / norm
    return 0.0 if distance == 0 else math.inf


def gradient_norms(model: nn.Module, group_of: Callable[[str], str] = module_group) -> dict[str, float]:
    """L2 norm of ``.grad`` per parameter group (a missing gradient counts as zero, so a frozen or
    untouched group reads ``0.0``)."""
    squares: dict[str, float] = {}
    for name, p in model.named_parameters():
        group = group_of(name)
        squares[group] = squares.get(group, 0.0) + (0.0 if p.grad is None else float(p.grad.square().sum()))
    return {group: math.sqrt(total) for group, total in squares.items()}


def gradient_overlap(grads: list[Params]) -> float:
    """Mean cosine similarity between successive flattened gradients ``g_k, g_{k+1}`` (1: the
    same direction every step; about 0: unrelated directions; a zero gradient counts as 0)."""
    if len(grads) < 2 or any(set(g) != set(grads[0]) for g in grads):
        raise ValueError("gradient_overlap needs at least 2 gradients over the same parameter names")
    flat = [_flatten(g, sorted(grads[0])) for g in grads]
    cosines = [torch.nn.functional.cosine_similarity(a, b, dim=0) for a, b in itertools.pairwise(flat)]
    return float(torch.stack(cosines).mean())


def update_concentration(update: Params, share: float = 0.01) -> float:
    """Share of the squared norm of a flattened update carried by its largest ``ceil(share * n)``
    entries: 1.0 when a few weights carry it all, about ``share`` for an even spread (``nan`` for a
    zero update)."""
    share = check_range("share", share, 0, 1, low_open=True)
    squares = _flatten(update, sorted(update)).square()
    top = torch.topk(squares, max(1, math.ceil(share * squares.numel()))).values
    return float(top.sum() / squares.sum())


def _flatten(params: Params, names: list[str]) -> Tensor:
    return torch.cat([params[name].detach().reshape(-1).float() for name in names])


# ----- continual-learning scores -------------------------------------------------------------------

def gem_metrics(accuracy: Tensor, initial: Tensor) -> dict[str, float]:
    """GEM scores ACC, BWT, FWT (Lopez-Paz & Ranzato 2017, section 2) from ``accuracy = R [T, T]``, ``R[i, j]`` the
    accuracy on task j after training through task i, and ``initial = b [T]``, ``b[j]`` on task j at
    initialisation (0-indexed): ``ACC = mean_j R[T-1, j]``;
    ``BWT = mean_{j<T-1} (R[T-1, j] - R[j, j])`` (negative: forgetting);
    ``FWT = mean_{j>=1} (R[j-1, j] - b[j])``."""
    r, b = accuracy.double(), initial.double()
    if r.dim() != 2 or r.shape[0] != r.shape[1] or r.shape[0] < 2 or b.shape != r.shape[:1]:
        raise ValueError(f"accuracy must be [T, T] with T >= 2 and initial [T]; "
                         f"got {tuple(r.shape)} and {tuple(b.shape)}")
    return {"ACC": float(r[-1].mean()),
            "BWT": float((r[-1, :-1] - r.diagonal()[:-1]).mean()),
            "FWT": float((r.diagonal(offset=1) - b[1:]).mean())}  # R[j-1, j] - b[j], j >= 1
