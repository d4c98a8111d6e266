"""Deep Momentum Gradient Descent with a learned momentum memory, and its meta-gradient.

Nested Learning (Behrouz et al. 2025) replaces the linear momentum of SGD by a memory,
an MLP trained by its own objective. The replica's optimizer keeps one memory MLP
``M_phi`` per parameter tensor, fed the flattened gradient and momentum:

    m_{i+1} = beta m_i + M_phi([g_i, m_i]),        W_{i+1} = W_i - lr m_{i+1}          (DMGD)

with ``M_phi`` = Linear(2n, 64)-LayerNorm-ReLU-Linear(64, n), Xavier-uniform weights of
gain 0.01 and zero biases (``n`` = the tensor's size). The memory's parameters ``phi``
are trained on the loss after a few optimizer steps, ``L_val(W_k(phi))``. Three meta-gradients:

- ``"original"`` -- the replica's surrogate: minimise ``sum(M_phi(...) * grad_W L_val)`` over the
  memory outputs of the last inner step. Since the step is ``-lr * M_phi``, the true first-order
  gradient is ``-lr * grad_phi sum(M_phi * grad_W L_val)``: the surrogate has the wrong sign and
  trains the memory toward gradient ascent.
- ``"unrolled"`` -- the gradient of ``L_val(W_k(phi))`` itself, through all ``k`` functional steps
  (``torch.func``, second-order terms included); ``last_step_only=True`` detaches all but the
  last step, which makes it exactly ``-lr`` times the original surrogate's gradient.
- ``"detached"`` -- commit 4f2b189, the version the replica's completion report describes: the
  step writes ``p.data``, which cuts the graph, so the validation loss does not depend on ``phi``
  and autograd hands the memory no gradient at all (returned as zeros; the meta-step is a no-op).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad

from nested_lab import runtime
from nested_lab.init import xavier_linear
from nested_lab.parameters import check_choice, check_positive_ints, check_range

META_GRADIENTS = ("original", "unrolled", "detached")
MEMORY_KEYS = ("parameter_id", "name")
Batch = tuple[torch.Tensor, torch.Tensor]
Params = dict[str, torch.Tensor]


class MomentumMemory(nn.Module):
    """The replica's memory MLP for one parameter tensor of ``numel`` entries: ``[g, m] -> Delta m``."""

    def __init__(self, numel: int, hidden: int = 64, generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_positive_ints(numel=numel, hidden=hidden)
        generator = runtime.generator(0) if generator is None else generator
        self.network = nn.Sequential(xavier_linear(2 * numel, hidden, generator, gain=0.01), nn.LayerNorm(hidden),
                                     nn.ReLU(), xavier_linear(hidden, numel, generator, gain=0.01))

    def forward(self, gradient: torch.Tensor, momentum: torch.Tensor) -> torch.Tensor:
        """Flat ``gradient`` and ``momentum`` (``n``,) -> the memory output (``n``,)."""
        return self.network(torch.cat([gradient, momentum]))


class LearnedMomentum(nn.Module):
    """One :class:`MomentumMemory` per parameter tensor of a model, keyed by parameter name.

    The memories depend only on the tensors' sizes, so one instance serves every fresh model of
    the same architecture (as the replica's meta-learner shares them across tasks). Without a
    ``generator`` the memories are drawn from one seeded with 0."""

    def __init__(self, shapes: dict[str, torch.Size], hidden: int = 64,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not shapes:
            raise ValueError("shapes must name at least one parameter tensor")
        generator = runtime.generator(0) if generator is None else generator
        self.names = list(shapes)
        self.memories = nn.ModuleDict({_key(name): MomentumMemory(math.prod(shape), hidden, generator)
                                       for name, shape in shapes.items()})

    @classmethod
    def for_model(cls, model: nn.Module, hidden: int = 64,
                  generator: torch.Generator | None = None) -> LearnedMomentum:
        return cls({name: p.shape for name, p in model.named_parameters()}, hidden, generator)

    def forward(self, gradients: Params, momenta: Params) -> Params:
        """The memory output for each named tensor, shaped like the tensor."""
        return {name: self.memories[_key(name)](g.flatten(), momenta[name].flatten()).view_as(g)
                for name, g in gradients.items()}


@dataclass
class InnerTask:
    """One inner problem: a model architecture, its starting parameters, ``k`` training batches
    (one per inner step) and a validation batch for the meta-loss."""

    model: nn.Module
    params: Params
    train_batches: list[Batch]
    val_batch: Batch
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.mse_loss

    def loss(self, params: Params, batch: Batch) -> torch.Tensor:
        inputs, targets = batch
        return self.loss_fn(functional_call(self.model, params, (inputs,)), targets)


def dmgd_update(outputs: Params, params: Params, momenta: Params, lr: float,
                beta: float) -> tuple[Params, Params]:
    """One DMGD step given the memory outputs: ``m <- beta m + out``, ``W <- W - lr m``."""
    momenta = {name: beta * momenta[name] + outputs[name] for name in params}
    return {name: p - lr * momenta[name] for name, p in params.items()}, momenta


def unroll(memory: LearnedMomentum, memory_params: Params, task: InnerTask, lr: float, beta: float,
           differentiable_from: int = 0) -> tuple[Params, Params]:
    """Run ``k = len(task.train_batches)`` DMGD steps from ``task.params`` with zero momentum; return
    the final parameters and momenta. The state is detached at the start of every step up to
    ``differentiable_from``, so no gradient flows through the steps before it."""
    params = dict(task.params)
    momenta = {name: torch.zeros_like(p) for name, p in params.items()}
    for step, batch in enumerate(task.train_batches):
        if step <= differentiable_from:
            params, momenta = _detached(params), _detached(momenta)
        gradients = grad(task.loss)(params, batch)
        outputs = functional_call(memory, memory_params, (gradients, momenta))
        params, momenta = dmgd_update(outputs, params, momenta, lr, beta)
    return params, momenta


def task_meta_gradient(memory: LearnedMomentum, task: InnerTask, lr: float, beta: float,
                       rule: str = "unrolled", last_step_only: bool = False) -> Params:
    """The gradient with respect to the memory's parameters that a meta-step descends.

    ``rule="original"``: ``grad_phi sum_n <out_n, grad_W L_val(W_k)>`` over the last step's outputs
    (the replica's surrogate; ``last_step_only`` changes nothing, it has no other step).
    ``rule="unrolled"``: ``grad_phi L_val(W_k(phi))`` through all steps, or through the last only.
    ``rule="detached"``: what autograd gives commit 4f2b189's in-place ``p.data`` steps."""
    check_choice("meta_gradient", rule, META_GRADIENTS)
    if rule == "detached":
        return _detached_gradient(memory, task, lr, beta)
    memory_params = {name: p.detach() for name, p in memory.named_parameters()}
    if rule == "original":
        return _surrogate_gradient(memory, memory_params, task, lr, beta)
    first = len(task.train_batches) - 1 if last_step_only else 0

    def meta_loss(phi: Params) -> torch.Tensor:
        final, _ = unroll(memory, phi, task, lr, beta, differentiable_from=first)
        return task.loss(final, task.val_batch)

    return grad(meta_loss)(memory_params)


def _surrogate_gradient(memory: LearnedMomentum, memory_params: Params, task: InnerTask, lr: float,
                        beta: float) -> Params:
    """The replica's rule: the gradient of ``sum(out * grad_W L_val)`` for the last step's outputs."""
    last = len(task.train_batches) - 1
    with torch.no_grad():  # torch.func.grad still differentiates inside no_grad
        params, momenta = unroll(memory, memory_params, _first_steps(task, last), lr, beta)
        gradients = grad(task.loss)(params, task.train_batches[last])
        outputs = functional_call(memory, memory_params, (gradients, momenta))
        final, _ = dmgd_update(outputs, params, momenta, lr, beta)
        meta_gradient = grad(task.loss)(final, task.val_batch)

    def surrogate(phi: Params) -> torch.Tensor:
        outputs = functional_call(memory, phi, (gradients, momenta))
        return sum((outputs[name] * meta_gradient[name]).sum() for name in outputs)

    return grad(surrogate)(memory_params)


def detached_unroll(memory: LearnedMomentum, task: InnerTask, lr: float, beta: float) -> nn.Module:
    """Commit 4f2b189's inner loop: a copy of the task's model stepped in place through ``p.data``
    (the memory's outputs built with autograd on, as there); returns the stepped model."""
    model = copy.deepcopy(task.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(task.params[name])
    named = dict(model.named_parameters())
    momenta = {name: torch.zeros_like(p) for name, p in named.items()}
    for inputs, targets in task.train_batches:
        loss = task.loss_fn(model(inputs), targets)
        gradients = dict(zip(named, torch.autograd.grad(loss, list(named.values()), create_graph=True), strict=True))
        outputs = memory(gradients, momenta)
        for name, p in named.items():
            momenta[name] = beta * momenta[name] + outputs[name]
            p.data.add_(momenta[name], alpha=-lr)  # as the replica: through p.data, off the graph
    return model


def _detached_gradient(memory: LearnedMomentum, task: InnerTask, lr: float, beta: float) -> Params:
    """Commit 4f2b189's meta-gradient: autograd's gradient of the validation loss after
    :func:`detached_unroll` with respect to the memory; a missing one is zero."""
    model = detached_unroll(memory, task, lr, beta)
    val_loss = task.loss_fn(model(task.val_batch[0]), task.val_batch[1])
    names, params = zip(*memory.named_parameters(), strict=True)
    found = torch.autograd.grad(val_loss, params, allow_unused=True)
    return {name: torch.zeros_like(p) if g is None else g for name, p, g in zip(names, params, found, strict=True)}


def _first_steps(task: InnerTask, steps: int) -> InnerTask:
    return InnerTask(task.model, task.params, task.train_batches[:steps], task.val_batch, task.loss_fn)


class NestedDeepMomentumGD(torch.optim.Optimizer):
    """The DMGD optimizer with a learned momentum memory and a meta-step.

    ``named_parameters``: the model's ``named_parameters()``; ``memory``: a shared
    :class:`LearnedMomentum` (built for these parameters if ``None``); ``meta_gradient``: the rule of
    :func:`task_meta_gradient`; the meta-step clips the memory gradient to norm 1 and takes an Adam
    step of size ``meta_lr`` (as the replica). ``memory_keys``: how :meth:`state_dict` names the saved
    memories -- ``"parameter_id"``, the replica's ``id(p)``, which no other optimizer's parameters
    share, so :meth:`load_state_dict` into a fresh optimizer restores none of them (silently, as the
    replica) -- or ``"name"``, the parameter's name."""

    def __init__(self, named_parameters: Iterable[tuple[str, nn.Parameter]], memory: LearnedMomentum | None = None,
                 lr: float = 0.01, momentum: float = 0.9, meta_lr: float = 1e-3,
                 meta_gradient: str = "original", hidden: int = 64, memory_keys: str = "parameter_id",
                 generator: torch.Generator | None = None) -> None:
        named = list(named_parameters)
        check_hyperparameters(lr=lr, momentum=momentum, meta_lr=meta_lr)
        check_choice("meta_gradient", meta_gradient, META_GRADIENTS)
        check_choice("memory_keys", memory_keys, MEMORY_KEYS)
        if not named or not all(isinstance(item, tuple) and len(item) == 2 for item in named):
            raise TypeError("named_parameters must be a non-empty iterable of (name, parameter) pairs, "
                            "e.g. model.named_parameters()")
        self.names = [name for name, _ in named]
        shapes = {name: p.shape for name, p in named}
        self.memory = memory if memory is not None else LearnedMomentum(shapes, hidden, generator)
        missing = [name for name in self.names if _key(name) not in self.memory.memories]
        if missing:
            raise ValueError(f"the memory has no module for parameters {missing}; it has {self.memory.names}")
        super().__init__([p for _, p in named], {"lr": lr, "momentum": momentum})
        self.meta_gradient, self.meta_lr, self.memory_keys = meta_gradient, meta_lr, memory_keys
        self.meta_optimizer: torch.optim.Adam | None = None  # built at the first meta-step

    def _saved_key(self, name: str, parameter: nn.Parameter) -> int | str:
        return id(parameter) if self.memory_keys == "parameter_id" else name

    def state_dict(self) -> dict:
        """The optimizer's state plus every memory's weights under ``"memory_modules"``."""
        state = super().state_dict()
        state["memory_modules"] = {self._saved_key(name, p): self.memory.memories[_key(name)].state_dict()
                                   for name, p in zip(self.names, self.param_groups[0]["params"], strict=True)}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the optimizer's state and every saved memory whose key matches one of this optimizer's
        parameters; others are skipped without a word, as the replica does."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("memory_modules", {})
        for name, p in zip(self.names, self.param_groups[0]["params"], strict=True):
            key = self._saved_key(name, p)
            if key in saved:
                self.memory.memories[_key(name)].load_state_dict(saved[key])
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One DMGD step with the current ``.grad`` of every parameter (eq. DMGD above)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        for name, p in zip(self.names, group["params"], strict=True):
            if p.grad is None:
                continue
            momentum = self.state[p].setdefault("momentum", torch.zeros_like(p))
            output = self.memory.memories[_key(name)](p.grad.flatten(), momentum.flatten()).view_as(p)
            momentum.mul_(group["momentum"]).add_(output)
            p.sub_(group["lr"] * momentum)
        return loss

    def task_meta_gradient(self, task: InnerTask, last_step_only: bool = False) -> Params:
        """:func:`task_meta_gradient` with this optimizer's memory, step size, momentum and rule."""
        group = self.param_groups[0]
        return task_meta_gradient(self.memory, task, group["lr"], group["momentum"], self.meta_gradient,
                                  last_step_only)

    def meta_step(self, task: InnerTask) -> Params:
        """Descend this task's meta-gradient (clipped to norm 1) with Adam; return the gradient."""
        gradient = self.task_meta_gradient(task)
        if self.meta_optimizer is None:
            self.meta_optimizer = torch.optim.Adam(self.memory.parameters(), lr=self.meta_lr)
        apply_meta_gradient(self.memory, self.meta_optimizer, gradient)
        return gradient


def apply_meta_gradient(memory: LearnedMomentum, optimizer: torch.optim.Optimizer, gradient: Params,
                        max_norm: float = 1.0) -> None:
    """Set the memory's ``.grad`` to ``gradient``, clip its norm to ``max_norm`` and step."""
    for name, p in memory.named_parameters():
        p.grad = gradient[name].detach().clone()
    nn.utils.clip_grad_norm_(memory.parameters(), max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def memory_alignment(memory: LearnedMomentum, model: nn.Module, batch: Batch,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.mse_loss
                     ) -> float:
    """Cosine between the memory's first output (zero momentum) and the loss gradient, all tensors
    concatenated: negative means the step ``-lr * out`` climbs the loss."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    task = InnerTask(model, params, [batch], batch, loss_fn)
    gradients = grad(task.loss)(params, batch)
    with torch.no_grad():
        outputs = memory(gradients, {name: torch.zeros_like(g) for name, g in gradients.items()})
    flat_out = torch.cat([outputs[name].flatten() for name in gradients])
    flat_grad = torch.cat([gradients[name].flatten() for name in gradients])
    return float(nn.functional.cosine_similarity(flat_out, flat_grad, dim=0))


def _key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys cannot contain dots


def _detached(tensors: Params) -> Params:
    return {name: t.detach() for name, t in tensors.items()}


def check_hyperparameters(lr: float, momentum: float, meta_lr: float) -> None:
    """Step sizes ``lr, meta_lr > 0`` and momentum ``beta`` in ``[0, 1)``."""
    check_range("lr", lr, 0, low_open=True)
    check_range("momentum", momentum, 0, 1, high_open=True)
    check_range("meta_lr", meta_lr, 0, low_open=True)
