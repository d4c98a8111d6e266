"""ContinuumOptimizer over an ensemble of independent seeds, in one set of batched tensors.

Chapter 1's live slider retrains several seeds on every change; run one by one
that is Python-bound. Here every parameter carries a leading seed dimension
``E`` (``torch.func.stack_module_state``), the controllers of all seeds run in
one ``vmap``, and the base update is the functional AdamW of
:mod:`nested_lab.optim.unrolled` with a learning rate per seed. The mechanisms
are the same objects as in :class:`~nested_lab.optim.continuum.ContinuumOptimizer`
(controller, multiplier, input scaling, meta-losses); ``tests/test_ensemble.py``
checks that an ensemble reproduces separate ContinuumOptimizer runs.

Supported: ``variant="continuum"`` with ``meta_loss`` ``"regularization"``,
``"proxy"`` or ``"hypergradient"``.
"""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call, stack_module_state, vmap

from nested_lab import runtime
from nested_lab.optim.continuum import ContinuumConfig
from nested_lab.optim.controller import LRController, multiplier, scale_inputs
from nested_lab.optim.meta_losses import ProxyMetaLoss, regularization_loss
from nested_lab.optim.unrolled import AdamWHyper, adamw_step
from nested_lab.parameters import check_choice

ENSEMBLE_META_LOSSES = ("regularization", "proxy", "hypergradient")


class ContinuumEnsemble:
    """``groups``: one ``{"name", "params": {name: tensor [E, ...]}, "depth"}`` dict per group;
    the tensors are leaves that require grad. ``controller_seeds``: one seed per member."""

    def __init__(self, groups: list[dict], config: ContinuumConfig, controller_seeds: list[int]) -> None:
        check_choice("ContinuumEnsemble variant", config.variant, ("continuum",))
        check_choice("ContinuumEnsemble meta_loss", config.meta_loss, ENSEMBLE_META_LOSSES)
        self.size = len(controller_seeds)
        if self.size < 1 or any(p.shape[0] != self.size for g in groups for p in g["params"].values()):
            raise ValueError(f"every parameter needs a leading ensemble dimension of {self.size}")
        self.config, self.groups = config, groups
        self.hyper = AdamWHyper(config.betas, config.eps, config.weight_decay)
        self.state = {n: (torch.zeros_like(p), torch.zeros_like(p), 0) for g in groups for n, p in g["params"].items()}
        controllers = [LRController(runtime.generator(s)) for s in controller_seeds]
        self.controller_params, _ = stack_module_state(controllers)
        self.controller = copy.deepcopy(controllers[0]).to("meta")
        self.controller_opt = torch.optim.Adam(self.controller_params.values(), lr=config.controller_lr)
        self.proxies = [ProxyMetaLoss(config.proxy_window, config.proxy_threshold, config.proxy_warmup)
                        for _ in range(self.size)]
        self.current = torch.ones(self.size, len(groups))
        self.steps = 0
        self.multipliers: list[torch.Tensor] = []
        self._previous_direction: dict[str, torch.Tensor] = {}

    def step(self, losses: torch.Tensor) -> None:
        """One step for every member; ``losses`` ``[E]`` are the members' training losses,
        already backpropagated into the parameters' ``.grad``."""
        self.steps += 1
        if self.config.meta_loss == "hypergradient":
            self._hypergradient_update()
        elif self.steps % self.config.update_freq == 0:
            self._meta_step(losses.detach())
        self._base_step()
        self.multipliers.append(self.current.clone())

    def _stats(self) -> torch.Tensor:
        """``[E, groups, 3]``: summed grad and parameter L2 norms per member, and depth."""
        rows = []
        for group in self.groups:
            params = list(group["params"].values())
            grad_norm = sum(p.grad.flatten(1).norm(dim=1) for p in params)
            param_norm = sum(p.detach().flatten(1).norm(dim=1) for p in params)
            rows.append(torch.stack([grad_norm, param_norm, torch.full_like(param_norm, group.get("depth", 0.5))], 1))
        return scale_inputs(torch.stack(rows, dim=1), self.config.input_scaling)

    def _meta_step(self, losses: torch.Tensor) -> None:
        raw = vmap(lambda params, stats: functional_call(self.controller, params, (stats,)))(
            self.controller_params, self._stats())
        m = multiplier(raw, self.config.min_lr_mult, self.config.max_lr_mult)
        self.current = m.detach()
        if self.config.meta_loss == "proxy":
            for proxy, loss, member in zip(self.proxies, losses.tolist(), m, strict=True):
                proxy.record(loss, member)
            meta_loss = sum(proxy(member) for proxy, member in zip(self.proxies, m, strict=True))
        else:
            meta_loss = sum(regularization_loss(member) for member in m)
        self.controller_opt.zero_grad()
        meta_loss.backward()
        self._clip_per_member()
        self.controller_opt.step()

    def _clip_per_member(self) -> None:
        """``clip_grad_norm_`` applied to each member's controller separately."""
        grads = [p.grad for p in self.controller_params.values()]
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
        scale = (self.config.controller_clip / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *[1] * (g.ndim - 1)))

    @torch.no_grad()
    def _base_step(self) -> None:
        params = {n: p for g in self.groups for n, p in g["params"].items()}
        grads = {n: p.grad for n, p in params.items()}
        lrs = {n: self.config.lr * self.current[:, i].view(-1, *[1] * (p.ndim - 1))
               for i, g in enumerate(self.groups) for n, p in g["params"].items()}
        new, self.state = adamw_step(params, grads, self.state, lrs, self.hyper)
        beta1, beta2 = self.config.betas
        for name, p in params.items():
            if self.config.meta_loss == "hypergradient":
                exp_avg, exp_avg_sq, step = self.state[name]
                v_hat = exp_avg_sq / (1 - beta2**step)
                self._previous_direction[name] = exp_avg / (1 - beta1**step) / (v_hat.sqrt() + self.config.eps)
            p.copy_(new[name])

    def _hypergradient_update(self) -> None:
        """Adam-HD per member and group, as in ContinuumOptimizer."""
        if not self._previous_direction:
            return
        h = torch.stack([
            sum((p.grad * self._previous_direction[n]).flatten(1).sum(1) for n, p in g["params"].items())
            for g in self.groups], dim=1)
        self.current = (self.current + self.config.hypergradient_lr * h).clamp(self.config.min_lr_mult,
                                                                             self.config.max_lr_mult)
