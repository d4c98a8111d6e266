"""ContinuumOptimizer: AdamW whose per-group learning rates a learned controller scales.

A faithful replica of the ContinuumOptimizer of ``bigwolfeman/TitanMAC-Standalone``
(``titans_core/opt/continuum_optimizer.py``, ``nested_controller.py``,
``meta_trainer.py``; fix commit 4819455), with each original design choice a
named option of :class:`ContinuumConfig`:

* ``input_scaling``: ``"raw"`` summed L2 norms (original) | ``"log1p"`` (the fix);
* ``meta_loss``: ``"regularization"`` (original) | ``"proxy"`` (the shipped fix) |
  ``"unrolled"`` (a correct k-step meta-gradient) | ``"hypergradient"``
  (Baydin et al. 2018, Adam-HD on the multiplier, no controller);
* ``unroll_impl`` (for ``meta_loss="unrolled"``): ``"functional"`` (the correct
  meta-gradient) | ``"original"`` (the shipped ``UnrolledMetaTrainer``, whose
  loss never depends on the controller: no gradient reaches it);
* ``variant``: ``"continuum"`` (controller every ``update_freq`` steps, its
  multiplier applied at once, then one meta-step) | ``"deep_nested"``
  (DeepNestedOptimizer: controller under no_grad every step, meta-step every
  ``meta_update_freq`` steps).

Before the first controller call every multiplier is 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn

from nested_lab.optim.controller import INPUT_SCALINGS, LRController, group_stats, multiplier, scale_inputs
from nested_lab.optim.meta_losses import ProxyMetaLoss, regularization_loss
from nested_lab.optim.unrolled import AdamWHyper, UnrollProblem, swapped_unrolled_loss, unrolled_meta_gradient
from nested_lab.parameters import check_choice, check_positive_ints, check_range

META_LOSSES = ("regularization", "proxy", "unrolled", "hypergradient")
VARIANTS = ("continuum", "deep_nested")
UNROLL_IMPLS = ("functional", "original")
_COUNTS = ("update_freq", "meta_update_freq", "unroll_steps", "proxy_window", "proxy_warmup")
_POSITIVE = ("lr", "controller_lr", "controller_clip", "eps", "hypergradient_lr", "min_lr_mult")


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
    unroll_impl: str = "functional"
    hypergradient_lr: float = 1e-3
    proxy_window: int = 100
    proxy_threshold: float = 1e-3
    proxy_warmup: int = 10

    def __post_init__(self) -> None:
        check_choice("input_scaling", self.input_scaling, INPUT_SCALINGS)
        check_choice("meta_loss", self.meta_loss, META_LOSSES)
        check_choice("variant", self.variant, VARIANTS)
        check_choice("unroll_impl", self.unroll_impl, UNROLL_IMPLS)
        check_positive_ints(**{name: getattr(self, name) for name in _COUNTS})
        for name in _POSITIVE:
            check_range(name, getattr(self, name), 0, low_open=True)
        check_range("max_lr_mult", self.max_lr_mult, self.min_lr_mult, low_open=True)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("proxy_threshold", self.proxy_threshold)
        for i, beta in enumerate(self.betas):
            check_range(f"betas[{i}]", beta, 0, 1, high_open=True)

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
        for name in changes:
            check_choice("ContinuumConfig field", name, [f.name for f in fields(self)])
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


class ContinuumOptimizer(torch.optim.AdamW):
    r"""AdamW whose per-group learning rates a learned controller scales.

    For each parameter group ``g``, with ``s_g = [grad_norm, param_norm, depth]``
    (scaled by ``input_scaling``) and the controller network ``f_phi``::

        m_g = min + (max - min) * sigmoid(f_phi(s_g))      (on a controller step)
        theta_g <- AdamW(theta_g, grad_g, lr = lr_g * m_g)  (every step)

    ``lr_g`` is the group's ``"lr"`` -- the base rate, which a
    ``torch.optim.lr_scheduler`` may change -- and ``m_g`` its ``"multiplier"``
    (1 before the first controller call). On a controller step the multipliers
    are computed and applied at once, then ``phi`` takes one clipped Adam step
    on the meta-loss.

    ``params``: parameters, or dicts with ``"params"``, a ``"name"`` and
    optionally a ``"depth"`` (default 0.5). ``problem`` is needed only for
    ``meta_loss="unrolled"``. The proxy meta-loss needs the training loss:
    pass ``step(closure)`` or ``step(loss=...)``. :meth:`state_dict` holds
    AdamW's state, the multipliers (in ``param_groups``), the step counter,
    the controller's weights, its Adam state and the proxy's history.
    """

    def __init__(self, params: Iterable, config: ContinuumConfig | None = None,
                 generator: torch.Generator | None = None, problem: UnrollProblem | None = None) -> None:
        config = ContinuumConfig() if config is None else config
        if not isinstance(config, ContinuumConfig):
            raise TypeError(f"config must be a ContinuumConfig, got {type(config).__name__}")
        if config.meta_loss == "unrolled" and problem is None:
            raise ValueError("meta_loss='unrolled' needs problem=UnrollProblem(...)")
        super().__init__(params, lr=config.lr, betas=config.betas, eps=config.eps,
                         weight_decay=config.weight_decay)
        self.defaults["multiplier"] = 1.0
        for group in self.param_groups:
            group.setdefault("multiplier", 1.0)
        self.config = config
        self._device = self.param_groups[0]["params"][0].device
        self.controller = LRController(generator).to(self._device)
        self.controller_opt = torch.optim.Adam(self.controller.parameters(), lr=config.controller_lr)
        self.proxy = ProxyMetaLoss(config.proxy_window, config.proxy_threshold, config.proxy_warmup)
        self.problem = problem
        self.steps = 0
        self.trace = ControllerTrace()

    @property
    def multipliers(self) -> torch.Tensor:
        """The current multiplier ``m_g`` of every group, shape ``[groups]``."""
        return torch.tensor([group["multiplier"] for group in self.param_groups], device=self._device)

    def step(self, closure: Callable[[], torch.Tensor] | None = None, *,
             loss: float | torch.Tensor | None = None) -> float | torch.Tensor | None:
        """One AdamW step; first, on its schedule, the controller sets the multipliers.

        ``closure`` re-evaluates the model and returns the loss (run under
        ``torch.enable_grad()``); ``loss`` is the training loss when there is
        no closure. Returns the loss.
        """
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable (pass the loss as step(loss=...)), got {closure!r}")
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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
        with self._scaled_learning_rates():
            super().step()
        if cfg.meta_loss == "hypergradient":
            self._remember_directions()
        self.trace.multipliers.append([group["multiplier"] for group in self.param_groups])
        return loss

    @contextmanager
    def _scaled_learning_rates(self) -> Iterator[None]:
        """Within the block each group's ``"lr"`` is ``lr_g * m_g``; afterwards the base rate again."""
        base = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] = group["lr"] * group["multiplier"]
        try:
            yield
        finally:
            for group, lr in zip(self.param_groups, base, strict=True):
                group["lr"] = lr

    def state_dict(self) -> dict:
        """AdamW's state dict plus ``"controller"``: step counter, network, its Adam, proxy history."""
        state = super().state_dict()
        state["controller"] = {"steps": self.steps, "network": self.controller.state_dict(),
                               "optimizer": self.controller_opt.state_dict(), "proxy": self.proxy.state_dict()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        controller = state_dict.pop("controller")
        super().load_state_dict(state_dict)
        self.steps = controller["steps"]
        self.controller.load_state_dict(controller["network"])
        self.controller_opt.load_state_dict(controller["optimizer"])
        self.proxy.load_state_dict(controller["proxy"])

    def _controller_multipliers(self, track: bool) -> torch.Tensor:
        stats = scale_inputs(group_stats(self.param_groups), self.config.input_scaling)
        with torch.set_grad_enabled(track):
            raw = self.controller(stats)
        if track:
            self.trace.update_steps.append(self.steps)
            self.trace.raw.append(raw.detach().tolist())
        return multiplier(raw, self.config.min_lr_mult, self.config.max_lr_mult)

    def _apply(self, m: torch.Tensor) -> None:
        for group, value in zip(self.param_groups, m.detach().tolist(), strict=True):
            group["multiplier"] = value

    @torch.enable_grad()
    def _meta_step(self, loss: float | torch.Tensor | None) -> None:
        """Compute the multipliers, apply them at once, then one controller step."""
        m = self._controller_multipliers(track=True)
        self._apply(m)
        self.controller_opt.zero_grad()
        if self.config.meta_loss == "unrolled":
            meta_loss = self._unrolled_gradients()
        else:
            value = self._proxy_loss(loss, m) if self.config.meta_loss == "proxy" else regularization_loss(m)
            value.backward()
            meta_loss = float(value.detach())
        norm = nn.utils.clip_grad_norm_(self.controller.parameters(), self.config.controller_clip)
        self.controller_opt.step()
        self.trace.meta_grad_norm.append(float(norm))
        self.trace.meta_loss.append(meta_loss)

    def _proxy_loss(self, loss: float | torch.Tensor | None, m: torch.Tensor) -> torch.Tensor:
        if loss is None:
            raise ValueError("meta_loss='proxy' needs the training loss: step(closure) or step(loss=...)")
        loss = loss.detach() if isinstance(loss, torch.Tensor) else loss
        self.proxy.record(float(loss), m)  # recorded BEFORE the loss, as in the original
        value = self.proxy(m)
        self.trace.meta_branch.append(self.proxy.last_branch)
        return value

    def _unrolled_gradients(self) -> float:
        cfg = self.config
        if cfg.unroll_impl == "original":
            return self._original_unrolled_gradients()
        names = {id(p): name for name, p in self.problem.model.named_parameters()}
        group_of = {names[id(p)]: i for i, g in enumerate(self.param_groups) for p in g["params"]}
        state = {names[id(p)]: self._adam_state(p) for g in self.param_groups for p in g["params"]}
        stats = scale_inputs(group_stats(self.param_groups), cfg.input_scaling)
        grads, value = unrolled_meta_gradient(
            self.controller, stats, self.problem, state, group_of, [g["lr"] for g in self.param_groups],
            (cfg.min_lr_mult, cfg.max_lr_mult), AdamWHyper(cfg.betas, cfg.eps, cfg.weight_decay),
            cfg.unroll_steps)
        for name, p in self.controller.named_parameters():
            p.grad = grads[name].detach()
        return value

    def _original_unrolled_gradients(self) -> float:
        """The shipped ``UnrolledMetaTrainer``: each controller parameter's gradient is what autograd
        finds from its meta-loss to it -- None for every one (see :func:`swapped_unrolled_loss`)."""
        value = swapped_unrolled_loss(self.controller, self.problem, self.param_groups[0]["lr"],
                                      self.config.unroll_steps)
        params = list(self.controller.parameters())
        grads = torch.autograd.grad(value, params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        return float(value.detach())

    def _adam_state(self, p: nn.Parameter) -> tuple:
        state = self.state.get(p, {})
        if "exp_avg" not in state:
            return (torch.zeros_like(p), torch.zeros_like(p), 0)
        return (state["exp_avg"].detach(), state["exp_avg_sq"].detach(), int(state["step"]))

    def _hypergradient_update(self) -> None:
        """Adam-HD (Baydin et al. 2018, Sec. 3): ``m <- m + beta * g_t . u_{t-1}`` per group,
        ``u`` the previous Adam direction, kept within [min_lr_mult, max_lr_mult]."""
        if self.steps == 1:  # no previous direction yet
            return
        h = torch.stack([
            sum((p.grad * self.state[p]["previous_direction"]).sum() for p in g["params"] if p.grad is not None)
            for g in self.param_groups
        ])
        m = (self.multipliers + self.config.hypergradient_lr * h).clamp(self.config.min_lr_mult,
                                                                      self.config.max_lr_mult)
        self.trace.meta_grad_norm.append(float(h.norm()))
        self._apply(m)

    @torch.no_grad()
    def _remember_directions(self) -> None:
        """``u_t = m_hat / (sqrt(v_hat) + eps)``, the Adam direction of this step, per parameter."""
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    t = float(state["step"])
                    m_hat = state["exp_avg"] / (1 - beta1**t)
                    v_hat = state["exp_avg_sq"] / (1 - beta2**t)
                    state["previous_direction"] = m_hat / (v_hat.sqrt() + group["eps"])
