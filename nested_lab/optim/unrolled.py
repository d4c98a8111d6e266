"""A correct k-step unrolled meta-gradient for the learning-rate controller.

The original's ``UnrolledMetaTrainer`` never ran: it swapped values into
``param.data``, so the validation loss did not depend on the controller. Here
the meta-objective is a pure function of the controller's parameters
(``torch.func``): the controller's multipliers set the learning rates of ``k``
functional AdamW steps on training batches -- gradients inside the unroll are
differentiated too -- and the objective is the validation loss after them:

    L_meta(phi) = L_val(theta_k),  theta_{i+1} = AdamW(theta_i, grad L_train(theta_i; B_i), lr * m_phi)

Short unrolls are biased toward small learning rates (Wu et al. 2018).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad

from nested_lab.optim.controller import multiplier

Batch = tuple[torch.Tensor, torch.Tensor]
Params = dict[str, torch.Tensor]


@dataclass
class UnrollProblem:
    """What the unrolled meta-gradient needs to know about the training problem."""

    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train_batches: Callable[[int], list[Batch]]  # k batches for one unroll
    val_batch: Callable[[], Batch]

    def loss(self, params: Params, batch: Batch) -> torch.Tensor:
        inputs, targets = batch
        return self.loss_fn(functional_call(self.model, params, (inputs,)), targets)


@dataclass(frozen=True)
class AdamWHyper:
    betas: tuple[float, float]
    eps: float
    weight_decay: float


def adamw_step(params: Params, grads: Params, state: dict[str, tuple], lrs: dict[str, torch.Tensor],
               hyper: AdamWHyper) -> tuple[Params, dict[str, tuple]]:
    """One functional AdamW step (Loshchilov & Hutter 2019, Alg. 2), differentiable in ``lrs``.

    ``state[name] = (exp_avg, exp_avg_sq, step)``. The square root is taken of
    ``v_hat + 1e-30`` so that second derivatives stay finite where ``v_hat = 0``.
    """
    beta1, beta2 = hyper.betas
    new_params, new_state = {}, {}
    for name, p in params.items():
        exp_avg, exp_avg_sq, step = state[name]
        g = grads[name]
        step = step + 1
        exp_avg = beta1 * exp_avg + (1 - beta1) * g
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
        m_hat = exp_avg / (1 - beta1**step)
        v_hat = exp_avg_sq / (1 - beta2**step)
        lr = lrs[name]
        new_params[name] = p * (1 - lr * hyper.weight_decay) - lr * m_hat / (torch.sqrt(v_hat + 1e-30) + hyper.eps)
        new_state[name] = (exp_avg, exp_avg_sq, step)
    return new_params, new_state


def unrolled_validation_loss(controller_params: Params, controller: nn.Module, stats: torch.Tensor,
                             problem: UnrollProblem, params: Params, state: dict[str, tuple],
                             group_of: dict[str, int], base_lrs: Sequence[float], bounds: tuple[float, float],
                             hyper: AdamWHyper, batches: list[Batch], val: Batch) -> torch.Tensor:
    """``L_val`` after ``len(batches)`` AdamW steps whose learning rates the controller sets:
    parameter ``name`` of group ``g = group_of[name]`` steps at ``base_lrs[g] * m_g``."""
    raw = functional_call(controller, controller_params, (stats,))
    m = multiplier(raw, *bounds)
    lrs = {name: base_lrs[group_of[name]] * m[group_of[name]] for name in params}
    for batch in batches:
        grads = grad(problem.loss)(params, batch)
        params, state = adamw_step(params, grads, state, lrs, hyper)
    return problem.loss(params, val)


def unrolled_meta_gradient(controller: nn.Module, stats: torch.Tensor, problem: UnrollProblem,
                           state: dict[str, tuple], group_of: dict[str, int], base_lrs: Sequence[float],
                           bounds: tuple[float, float], hyper: AdamWHyper, k: int) -> tuple[Params, float]:
    """``d L_meta / d phi`` for every controller parameter, and ``L_meta`` itself."""
    params = {name: p.detach() for name, p in problem.model.named_parameters()}
    controller_params = {name: p.detach() for name, p in controller.named_parameters()}
    batches, val = problem.train_batches(k), problem.val_batch()
    grads, value = torch.func.grad_and_value(unrolled_validation_loss)(
        controller_params, controller, stats, problem, params, state, group_of, base_lrs, bounds, hyper,
        batches, val)
    return grads, float(value)


def swapped_unrolled_loss(controller: nn.Module, problem: UnrollProblem, base_lr: float, k: int,
                          momentum: float = 0.9) -> torch.Tensor:
    """The original ``UnrolledMetaTrainer.compute_meta_loss``, with its defect (``unroll_impl="original"``).

    Meant: ``k`` momentum-SGD steps ``p - base_lr * m * update`` on copies of the
    parameters, ``m`` from the controller, then the validation loss. As shipped,
    every loss is evaluated by copying the copies' values into ``param.data``,
    so it depends on the model's own parameters, not on the copies: the
    gradient with respect to each copy is None, no step changes anything, the
    controller is never consulted (``m`` would be ``.item()``, off the graph
    anyway), and the returned loss is the validation loss at the unchanged
    parameters. The model is finally restored in place (``param.copy_`` under
    ``no_grad``), so a ``backward()`` of the loss through a saved parameter raises.
    Returns that loss; nothing in it depends on ``controller``.
    """
    model = problem.model
    start = {name: p.clone() for name, p in model.named_parameters()}
    current = {name: p.detach().requires_grad_(True) for name, p in start.items()}
    buffers = {name: torch.zeros_like(p) for name, p in current.items()}
    for batch in problem.train_batches(k)[:k]:
        loss = _loss_through_data(problem, current, batch)
        grads = torch.autograd.grad(loss, list(current.values()), allow_unused=True)
        for (name, p), g in zip(list(current.items()), grads, strict=True):
            if g is None:  # always, as in the original: the loss never saw ``current``
                continue
            stats = torch.stack([g.norm(), p.norm(), torch.tensor(0.5)]).unsqueeze(0)
            m = controller(stats)[0].item()
            buffers[name] = momentum * buffers[name] + g
            current[name] = p - base_lr * m * buffers[name]
    meta_loss = _loss_through_data(problem, current, problem.val_batch())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(start[name])
    return meta_loss


def _loss_through_data(problem: UnrollProblem, params: Params, batch: Batch) -> torch.Tensor:
    """The loss of ``problem.model`` after copying ``params`` into each ``param.data`` (then restored)."""
    saved = {name: p.data.clone() for name, p in problem.model.named_parameters()}
    for name, p in problem.model.named_parameters():
        p.data.copy_(params[name])
    try:
        inputs, targets = batch
        return problem.loss_fn(problem.model(inputs), targets)
    finally:
        for name, p in problem.model.named_parameters():
            p.data.copy_(saved[name])
