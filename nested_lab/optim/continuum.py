"""ContinuumOptimizer: AdamW whose per-group learning rates a learned controller scales.

A faithful replica of the ContinuumOptimizer of ``bigwolfeman/TitanMAC-Standalone``
(``titans_core/opt/continuum_optimizer.py``, ``nested_controller.py``,
``meta_trainer.py``; fix commit 4819455), with each original design choice a
named option of :class:`ContinuumConfig`:

* ``input_scaling``: ``"raw"`` summed L2 norms (original) | ``"log1p"`` (the fix);
* ``meta_loss``: ``"regularization"`` (original) | ``"proxy"`` (the shipped fix) |
  ``"unrolled"`` (a correct k-step meta-gradient) | ``"hypergradient"``
  (Baydin et al. 2018, Adam-HD on the multiplier, no controller);
* ``variant``: ``"continuum"`` (controller every ``update_freq`` steps, its
  multiplier applied at once, then one meta-step) | ``"deep_nested"``
  (DeepNestedOptimizer: controller under no_grad every step, meta-step every
  ``meta_update_freq`` steps).

Before the first controller call every multiplier is 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn

from nested_lab.optim.controller import INPUT_SCALINGS, LRController, group_stats, multiplier, scale_inputs
from nested_lab.optim.meta_losses import ProxyMetaLoss, regularization_loss
from nested_lab.optim.unrolled import AdamWHyper, UnrollProblem, unrolled_meta_gradient
from nested_lab.parameters import check_numbers, check_positive_ints

META_LOSSES = ("regularization", "proxy", "unrolled", "hypergradient")
VARIANTS = ("continuum", "deep_nested")


@dataclass(frozen=True)
class ContinuumConfig:
    """Every knob of the replica; the defaults are the original's."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    input_scaling: str = "raw"
    meta_loss: str = "regularization"
    variant: str = "continuum"
    update_freq: int = 50
    meta_update_freq: int = 50
    controller_lr: float = 1e-3
    controller_clip: float = 1.0
    min_lr_mult: float = 0.1
    max_lr_mult: float = 2.0
    unroll_steps: int = 5
    hypergradient_lr: float = 1e-3
    proxy_window: int = 100
    proxy_threshold: float = 1e-3
    proxy_warmup: int = 10

    def __post_init__(self) -> None:
        _choice("input_scaling", self.input_scaling, INPUT_SCALINGS)
        _choice("meta_loss", self.meta_loss, META_LOSSES)
        _choice("variant", self.variant, VARIANTS)
        check_positive_ints(**{name: getattr(self, name) for name in
                               ("update_freq", "meta_update_freq", "unroll_steps", "proxy_window", "proxy_warmup")})
        positive = ("lr", "controller_lr", "controller_clip", "eps", "hypergradient_lr")
        check_numbers(**{name: getattr(self, name) for name in (*positive, "min_lr_mult", "max_lr_mult", "weight_decay")})
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.min_lr_mult < self.max_lr_mult:
            raise ValueError(f"need 0 < min_lr_mult < max_lr_mult, got {self.min_lr_mult} and {self.max_lr_mult}")
        if self.weight_decay < 0 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"need weight_decay >= 0 and betas in [0, 1), got {self.weight_decay}, {self.betas}")

    @classmethod
    def original(cls, **overrides) -> ContinuumConfig:
        """The pre-fix ContinuumOptimizer: raw inputs, regularization meta-loss."""
        return cls(**{"input_scaling": "raw", "meta_loss": "regularization", **overrides})

    @classmethod
    def shipped_fix(cls, **overrides) -> ContinuumConfig:
        """The fix commit: log1p inputs (undocumented) and the proxy meta-loss."""
        return cls(**{"input_scaling": "log1p", "meta_loss": "proxy", **overrides})

    def with_(self, **changes) -> ContinuumConfig:
        """A copy with some fields changed (a fix is a one-field change)."""
        known = {f.name for f in fields(self)}
        if unknown := sorted(set(changes) - known):
            raise ValueError(f"unknown ContinuumConfig field(s) {unknown}; known: {sorted(known)}")
        return replace(self, **changes)


@dataclass
class ControllerTrace:
    """What the optimizer did, for plots and ledger records."""

    multipliers: list[list[float]] = field(default_factory=list)  # every step, one per group
    update_steps: list[int] = field(default_factory=list)
    raw: list[list[float]] = field(default_factory=list)  # per controller update
    meta_grad_norm: list[float] = field(default_factory=list)  # per meta-step
    meta_loss: list[float] = field(default_factory=list)
    meta_branch: list[str] = field(default_factory=list)  # proxy only: warmup, improving, stagnating


class ContinuumOptimizer:
    """AdamW over named parameter groups, learning rates scaled by a learned controller.

    ``param_groups``: dicts with ``"params"``, a ``"name"`` and optionally a
    ``"depth"``. ``problem`` is needed only for ``meta_loss="unrolled"``.
    Call :meth:`step` with the current training loss after ``backward()``.
    """

    def __init__(self, param_groups: list[dict], config: ContinuumConfig | None = None,
                 generator: torch.Generator | None = None, problem: UnrollProblem | None = None) -> None:
        config = ContinuumConfig() if config is None else config
        if not isinstance(config, ContinuumConfig):
            raise TypeError(f"config must be a ContinuumConfig, got {type(config).__name__}")
        if not param_groups or any("params" not in g for g in param_groups):
            raise ValueError("param_groups must be a non-empty list of dicts with a 'params' entry")
        if config.meta_loss == "unrolled" and problem is None:
            raise ValueError("meta_loss='unrolled' needs problem=UnrollProblem(...)")
        self.config = config
        groups = [{**g, "params": list(g["params"]), "lr": config.lr} for g in param_groups]
        self.base = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps,
                                      weight_decay=config.weight_decay)
        device = groups[0]["params"][0].device
        self.controller = LRController(generator).to(device)
        self.controller_opt = torch.optim.Adam(self.controller.parameters(), lr=config.controller_lr)
        self.proxy = ProxyMetaLoss(config.proxy_window, config.proxy_threshold, config.proxy_warmup)
        self.problem = problem
        self.current = torch.ones(len(groups), device=device)
        self.steps = 0
        self.trace = ControllerTrace()
        self._previous_direction: dict[nn.Parameter, torch.Tensor] = {}

    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def step(self, loss: float) -> None:
        """One base step; first, on its schedule, the controller sets the multipliers."""
        if isinstance(loss, bool) or not isinstance(loss, int | float):
            raise TypeError(f"loss must be the training loss as a float (e.g. loss.item()), got {type(loss).__name__}")
        if not math.isfinite(loss):
            raise ValueError(f"step needs the training loss as a finite float, got {loss!r}")
        self.steps += 1
        cfg = self.config
        if cfg.meta_loss == "hypergradient":
            self._hypergradient_update()
        elif cfg.variant == "deep_nested":
            self._apply(self._controller_multipliers(track=False))
            if self.steps % cfg.meta_update_freq == 0:
                self._meta_step(loss)
        elif self.steps % cfg.update_freq == 0:
            self._meta_step(loss)
        self.base.step()
        if cfg.meta_loss == "hypergradient":
            self._remember_directions()
        self.trace.multipliers.append(self.current.tolist())

    def _controller_multipliers(self, track: bool) -> torch.Tensor:
        stats = scale_inputs(group_stats(self.base.param_groups), self.config.input_scaling)
        with torch.set_grad_enabled(track):
            raw = self.controller(stats)
        if track:
            self.trace.update_steps.append(self.steps)
            self.trace.raw.append(raw.detach().tolist())
        return multiplier(raw, self.config.min_lr_mult, self.config.max_lr_mult)

    def _apply(self, m: torch.Tensor) -> None:
        self.current = m.detach()
        for group, value in zip(self.base.param_groups, self.current.tolist(), strict=True):
            group["lr"] = self.config.lr * value

    def _meta_step(self, loss: float) -> None:
        """Compute the multipliers, apply them at once, then one controller step."""
        m = self._controller_multipliers(track=True)
        self._apply(m)
        self.controller_opt.zero_grad()
        if self.config.meta_loss == "unrolled":
            meta_loss = self._unrolled_gradients()
        else:
            if self.config.meta_loss == "proxy":
                self.proxy.record(loss, m)  # recorded BEFORE the loss, as in the original
                value = self.proxy(m)
                self.trace.meta_branch.append(self.proxy.last_branch)
            else:
                value = regularization_loss(m)
            value.backward()
            meta_loss = float(value.detach())
        norm = nn.utils.clip_grad_norm_(self.controller.parameters(), self.config.controller_clip)
        self.controller_opt.step()
        self.trace.meta_grad_norm.append(float(norm))
        self.trace.meta_loss.append(meta_loss)

    def _unrolled_gradients(self) -> float:
        cfg = self.config
        names = {id(p): name for name, p in self.problem.model.named_parameters()}
        group_of = {names[id(p)]: i for i, g in enumerate(self.base.param_groups) for p in g["params"]}
        state = {names[id(p)]: self._adam_state(p) for g in self.base.param_groups for p in g["params"]}
        stats = scale_inputs(group_stats(self.base.param_groups), cfg.input_scaling)
        grads, value = unrolled_meta_gradient(
            self.controller, stats, self.problem, state, group_of, cfg.lr,
            (cfg.min_lr_mult, cfg.max_lr_mult), AdamWHyper(cfg.betas, cfg.eps, cfg.weight_decay),
            cfg.unroll_steps)
        for name, p in self.controller.named_parameters():
            p.grad = grads[name].detach()
        return value

    def _adam_state(self, p: nn.Parameter) -> tuple:
        state = self.base.state.get(p, {})
        if not state:
            return (torch.zeros_like(p), torch.zeros_like(p), 0)
        return (state["exp_avg"].detach(), state["exp_avg_sq"].detach(), int(state["step"]))

    def _hypergradient_update(self) -> None:
        """Adam-HD (Baydin et al. 2018, Sec. 3): ``m <- m + beta * g_t . u_{t-1}`` per group,
        ``u`` the previous Adam direction, kept within [min_lr_mult, max_lr_mult]."""
        if not self._previous_direction:
            return
        h = torch.stack([
            sum((p.grad * self._previous_direction[p]).sum() for p in g["params"] if p.grad is not None)
            for g in self.base.param_groups
        ])
        m = (self.current + self.config.hypergradient_lr * h).clamp(self.config.min_lr_mult,
                                                                  self.config.max_lr_mult)
        self.trace.meta_grad_norm.append(float(h.norm()))
        self._apply(m)

    @torch.no_grad()
    def _remember_directions(self) -> None:
        beta1, beta2 = self.config.betas
        for group in self.base.param_groups:
            for p in group["params"]:
                state = self.base.state.get(p)
                if state:
                    t = float(state["step"])
                    m_hat = state["exp_avg"] / (1 - beta1**t)
                    v_hat = state["exp_avg_sq"] / (1 - beta2**t)
                    self._previous_direction[p] = m_hat / (v_hat.sqrt() + self.config.eps)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
