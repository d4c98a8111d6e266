"""Chapter 1, the meta-loss collapse: what the chapter runs, measures and tabulates.

* the workload: a char-level MLP on the stdlib pydoc text, trained by
  ContinuumOptimizer or by plain AdamW (:func:`train`, :func:`run_many`), or by
  the vectorised ensemble for the live slider (:func:`train_ensemble`);
* the controller alone on fixed statistics, the measurement the original
  recorded (:func:`controller_saturation`);
* the chapter's summaries: the collapse at the first controller call
  (:func:`first_call_collapse`) and the jumps between bounds
  (:func:`bound_jumps`), the saturation table, the shipped fix's two changes
  apart (:func:`fix_ablation`), where the proxy's branches lead
  (:func:`regularization_span`, :func:`stagnation_pull`), the shipped
  ``UnrolledMetaTrainer``'s missing gradient (:func:`original_unrolled_gradients`),
  the fixed-rate oracle and the comparison of learned controllers with it.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache, partial

import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from nested_lab import runtime
from nested_lab.data.corpus import CharCorpus, stdlib_text
from nested_lab.models.char_mlp import CharMLP
from nested_lab.optim import ContinuumConfig, ContinuumOptimizer, UnrollProblem
from nested_lab.optim.continuum import ControllerTrace
from nested_lab.optim.controller import LRController, multiplier, scale_inputs
from nested_lab.optim.ensemble import ContinuumEnsemble
from nested_lab.optim.meta_losses import ProxyMetaLoss, regularization_loss
from nested_lab.parameters import check_positive_ints, check_range

# ----- the workload ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CharTask:
    """Sizes of the workload: next-character prediction on the stdlib pydoc text."""

    context: int = 8
    embed: int = 16
    hidden: int = 128
    batch_size: int = 64
    val_size: int = 4096

    def model(self, seed: int, norm_scale: float = 1.0) -> CharMLP:
        """A fresh model; ``norm_scale`` multiplies every initial weight (and so every parameter norm)."""
        check_range("norm_scale", norm_scale, 0, low_open=True)
        model = CharMLP(corpus().vocab_size, self.context, self.embed, self.hidden, runtime.generator(seed))
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(norm_scale)
        return model

    def val_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed validation batch, the same for every run."""
        return corpus().batch("val", self.val_size, self.context, runtime.generator(12345))


@cache
def corpus() -> CharCorpus:
    return CharCorpus.from_text(stdlib_text())


@dataclass
class RunResult:
    config: ContinuumConfig | None  # None: plain AdamW at a fixed learning rate
    seed: int
    train_loss: list[float]
    val_loss: float
    trace: ControllerTrace | None
    seconds: float

    @property
    def multipliers(self) -> torch.Tensor:
        """``[steps, groups]`` multiplier trajectory (all ones for plain AdamW)."""
        if self.trace is None:
            return torch.ones(len(self.train_loss), 2)
        return torch.tensor(self.trace.multipliers)


def train(config: ContinuumConfig | None, seed: int, steps: int, task: CharTask = CharTask(),
          norm_scale: float = 1.0, fixed_lr: float | None = None) -> RunResult:
    """Train one model for ``steps`` steps. ``config=None`` trains with plain AdamW at ``fixed_lr``.

    Data come from generator ``seed + 1000``, the controller from ``seed + 2000``.
    """
    if (config is None) == (fixed_lr is None):
        raise ValueError("give exactly one of config (ContinuumOptimizer) or fixed_lr (plain AdamW)")
    check_positive_ints(steps=steps)
    data_gen = runtime.generator(seed + 1_000)
    model = task.model(seed, norm_scale)
    if config is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=fixed_lr, weight_decay=0.01)
    else:
        problem = _unroll_problem(model, task, data_gen)
        optimizer = ContinuumOptimizer(model.param_groups(), config, runtime.generator(seed + 2_000), problem)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        batch = corpus().batch("train", task.batch_size, task.context, data_gen)
        losses.append(optimizer.step(partial(_loss_and_gradients, model, optimizer, batch)).item())
    seconds = time.perf_counter() - start
    with torch.no_grad():
        inputs, targets = task.val_batch()
        val = F.cross_entropy(model(inputs), targets).item()
    trace = None if config is None else optimizer.trace
    return RunResult(config, seed, losses, val, trace, seconds)


def _loss_and_gradients(model: CharMLP, optimizer: torch.optim.Optimizer,
                        batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The closure of ``optimizer.step``: the cross-entropy on ``batch``, its gradients in ``.grad``."""
    optimizer.zero_grad()
    inputs, targets = batch
    loss = F.cross_entropy(model(inputs), targets)
    loss.backward()
    return loss


def _unroll_problem(model: CharMLP, task: CharTask, data_gen: torch.Generator) -> UnrollProblem:
    """The unrolled meta-gradient's view of the workload: ``k`` training batches, one validation batch."""
    return UnrollProblem(
        model, F.cross_entropy,
        train_batches=lambda k: [corpus().batch("train", task.batch_size, task.context, data_gen)
                                 for _ in range(k)],
        val_batch=lambda: corpus().batch("val", 512, task.context, data_gen),
    )


def run_many(config: ContinuumConfig | None, seeds: list[int], steps: int, desc: str = "",
             **kwargs) -> list[RunResult]:
    """:func:`train` for every seed, with a progress bar."""
    return [train(config, seed, steps, **kwargs) for seed in runtime.progress(seeds, desc=desc, leave=False)]


def pinned_side(m: torch.Tensor, low: float = 0.1, high: float = 2.0, tolerance: float = 0.01) -> list[str]:
    """``"floor"``, ``"ceiling"`` or ``"free"`` for each multiplier in ``m``."""
    span = high - low
    return ["floor" if v < low + tolerance * span else "ceiling" if v > high - tolerance * span else "free"
            for v in m.tolist()]


# ----- the vectorised ensemble (live slider) ----------------------------------------------------


@dataclass
class EnsembleResult:
    train_loss: torch.Tensor  # [steps, seeds]
    multipliers: torch.Tensor  # [steps, seeds, groups]


def train_ensemble(config: ContinuumConfig, seeds: list[int], steps: int, task: CharTask = CharTask(),
                   norm_scale: float = 1.0) -> EnsembleResult:
    """The runs of :func:`train` for every seed at once (same models, data and controllers),
    vectorised over the seeds with ``torch.func``; used where latency matters."""
    check_positive_ints(steps=steps)
    check_range("number of seeds", len(seeds), 1, integer=True)
    models = [task.model(seed, norm_scale) for seed in seeds]
    params, _ = stack_module_state(models)
    names = {id(p): name for name, p in models[0].named_parameters()}
    groups = [{"name": g["name"], "depth": g["depth"], "params": {names[id(p)]: params[names[id(p)]]
                                                                 for p in g["params"]}}
              for g in models[0].param_groups()]
    optimizer = ContinuumEnsemble(groups, config, [seed + 2_000 for seed in seeds])
    base = copy.deepcopy(models[0]).to("meta")
    forward = vmap(lambda p, x: functional_call(base, p, (x,)))
    data_gens = [runtime.generator(seed + 1_000) for seed in seeds]
    losses = []
    for _ in range(steps):
        batches = [corpus().batch("train", task.batch_size, task.context, g) for g in data_gens]
        inputs, targets = torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
        logits = forward(params, inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(len(seeds), -1)
        loss = loss.mean(dim=1)
        for p in params.values():
            p.grad = None
        loss.sum().backward()
        optimizer.step(loss.detach())
        losses.append(loss.detach())
    return EnsembleResult(torch.stack(losses), torch.stack(optimizer.multipliers))


LIVE_TASK = CharTask(embed=8, hidden=32, batch_size=16)


@cache
def cached_ensemble(config: ContinuumConfig, seeds: tuple[int, ...], steps: int,
                    norm_scale: float) -> EnsembleResult:
    """:func:`train_ensemble` on the small live-slider task, memoised per setting."""
    return train_ensemble(config, list(seeds), steps, LIVE_TASK, norm_scale)


def redraw_ms(draw: Callable[..., plt.Figure], **values: object) -> float:
    """Milliseconds to draw (and close) one figure of a live slider."""
    start = time.perf_counter()
    plt.close(draw(**values))
    return 1000 * (time.perf_counter() - start)


# ----- section 1: the collapse at the first controller call ------------------------------------


@dataclass(frozen=True)
class Collapse:
    """Where the memory group's multiplier went, per seed, in runs of the original."""

    memory_m: torch.Tensor  # [seeds, steps]
    first_change: list[int]  # step of the first multiplier != 1
    side_first: list[str]  # floor / ceiling / free just after the first controller call
    side_last: list[str]  # the same after the last step
    pinned_grad_norms: list[float]  # controller gradient norms while both groups were pinned

    @property
    def pinned_first(self) -> list[bool]:
        return [side != "free" for side in self.side_first]

    @property
    def stayed(self) -> list[bool]:
        """For each seed pinned at the first call: is it on the same bound at the end?"""
        return [a == b for a, b, p in zip(self.side_first, self.side_last, self.pinned_first, strict=True) if p]


def first_call_collapse(runs: list[RunResult], update_freq: int) -> Collapse:
    """Summarise runs of the original configuration with the controller called every ``update_freq`` steps."""
    memory_m = torch.stack([r.multipliers[:, 1] for r in runs])  # the larger-norm group
    first_change = [int((m != 1.0).nonzero()[0]) + 1 for m in memory_m]
    pinned_grads = [norm for r in runs
                    for norm, step in zip(r.trace.meta_grad_norm, r.trace.update_steps, strict=True)
                    if "free" not in pinned_side(r.multipliers[step - 1])]
    return Collapse(memory_m, first_change, pinned_side(memory_m[:, update_freq - 1]),
                    pinned_side(memory_m[:, -1]), pinned_grads)


@dataclass(frozen=True)
class BoundJumps:
    """Moves of one group's multiplier from one bound to the other, over the controller calls of each run."""

    jumps: list[int]  # per run: bound-to-bound moves (free calls in between allowed)
    transit_calls: list[int]  # per jump: free controller calls between the two bounds
    sign_changes: list[int]  # per run: controller calls at which raw changed sign

    @property
    def runs_with_a_jump(self) -> int:
        return sum(n > 0 for n in self.jumps)


def bound_jumps(runs: list[RunResult], group: int = 1) -> BoundJumps:
    """Per run, the moves of group ``group``'s multiplier from one bound to the other (read at the
    controller calls, free calls in between allowed), and the calls at which its ``raw`` changed sign."""
    jumps, transits, signs = [], [], []
    for r in runs:
        sides = pinned_side(r.multipliers[[step - 1 for step in r.trace.update_steps], group])
        pinned = [(i, side) for i, side in enumerate(sides) if side != "free"]
        moves = [(b[0] - a[0] - 1) for a, b in itertools.pairwise(pinned) if a[1] != b[1]]
        jumps.append(len(moves))
        transits.extend(moves)
        raw = torch.tensor(r.trace.raw)[:, group]
        signs.append(int((torch.sign(raw[1:]) != torch.sign(raw[:-1])).sum()))
    return BoundJumps(jumps, transits, signs)


# ----- section 3: the controller alone -----------------------------------------------------------


@dataclass(frozen=True)
class SaturationResult:
    param_norms: list[float]
    first_raw: torch.Tensor  # [norms, seeds]: raw at the first controller call
    final_m: torch.Tensor  # [norms, seeds]: multiplier after the meta-steps
    low: float
    high: float

    def pinned(self, tolerance: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
        """Fractions of seeds at the floor and at the ceiling (within ``tolerance`` of the range)."""
        span = self.high - self.low
        floor = (self.final_m < self.low + tolerance * span).double().mean(dim=1)
        ceiling = (self.final_m > self.high - tolerance * span).double().mean(dim=1)
        return floor, ceiling

    def table(self) -> pd.DataFrame:
        """Per parameter norm: fractions pinned at the floor and the ceiling, mean ``|raw|`` at the first call."""
        floor, ceiling = self.pinned()
        return pd.DataFrame({"param norm": self.param_norms, "floor": floor.numpy(), "ceiling": ceiling.numpy(),
                             "mean |raw|": self.first_raw.abs().mean(1).numpy()})


def controller_saturation(param_norms: list[float], seeds: list[int], steps: int = 40,
                          controller_lr: float = 1e-4, grad_norm: float = 2.0, depth: float = 0.6,
                          input_scaling: str = "raw", low: float = 0.1, high: float = 2.0) -> SaturationResult:
    """The measurement recorded for the original: a fresh controller per seed on fixed statistics
    ``[grad_norm, param_norm, depth]``, ``steps`` clipped Adam steps of the regularization
    meta-loss, for each (param norm, seed); how often does the sigmoid pin?"""
    check_positive_ints(steps=steps)
    check_range("number of param norms", len(param_norms), 1, integer=True)
    check_range("number of seeds", len(seeds), 1, integer=True)
    first_raw = torch.zeros(len(param_norms), len(seeds))
    final_m = torch.zeros(len(param_norms), len(seeds))
    for i, norm in enumerate(param_norms):
        stats = scale_inputs(torch.tensor([[grad_norm, norm, depth]]), input_scaling)
        for j, seed in enumerate(seeds):
            controller = LRController(runtime.generator(seed))
            first_raw[i, j] = controller(stats).detach()[0]
            _train_controller(controller, stats, steps, controller_lr, low, high)
            final_m[i, j] = multiplier(controller(stats).detach(), low, high)[0]
    return SaturationResult(list(param_norms), first_raw, final_m, low, high)


def _train_controller(controller: LRController, stats: torch.Tensor, steps: int, lr: float,
                      low: float, high: float) -> None:
    """``steps`` Adam steps on ``((m - 1)^2).mean()``, the gradient clipped to norm 1 (as in the original)."""
    opt = torch.optim.Adam(controller.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        regularization_loss(multiplier(controller(stats), low, high)).backward()
        torch.nn.utils.clip_grad_norm_(controller.parameters(), 1.0)
        opt.step()


# ----- section 4: the shipped fix ----------------------------------------------------------------


def fix_ablation(original: ContinuumConfig) -> dict[str, ContinuumConfig]:
    """The shipped fix's two changes apart, each a one-field change of ``original``."""
    return {"neither (original)": original, "log1p inputs alone": original.with_(input_scaling="log1p"),
            "proxy meta-loss alone": original.with_(meta_loss="proxy"),
            "both (shipped fix)": original.with_(input_scaling="log1p", meta_loss="proxy")}


def pinned_fraction(run: RunResult) -> float:
    """The fraction of the run's groups whose final multiplier sits at a bound."""
    sides = pinned_side(run.multipliers[-1], run.config.min_lr_mult, run.config.max_lr_mult)
    return sum(side != "free" for side in sides) / len(sides)


def ablation_table(results: Mapping[str, list[RunResult]]) -> pd.DataFrame:
    """Per arm: the mean and standard deviation over seeds of the pinned fraction and the validation loss."""
    rows = []
    for name, rs in results.items():
        pinned = torch.tensor([pinned_fraction(r) for r in rs], dtype=torch.float64)
        val = torch.tensor([r.val_loss for r in rs], dtype=torch.float64)
        rows.append({"arm": name, "inputs": rs[0].config.input_scaling, "meta-loss": rs[0].config.meta_loss,
                     "pinned": pinned.mean().item(), "pinned sd": _sd(pinned),
                     "val loss": val.mean().item(), "val loss sd": _sd(val), "seeds": len(rs)})
    return pd.DataFrame(rows)


def _sd(values: torch.Tensor) -> float:
    """Sample standard deviation (0 for a single value)."""
    return values.std().item() if len(values) > 1 else 0.0


def regularization_span(run: RunResult) -> int:
    """The last training step whose meta-step fell back to the regularization (the proxy's warm-up)."""
    steps = [step for step, branch in zip(run.trace.update_steps, run.trace.meta_branch, strict=True)
             if branch == "warmup"]
    if not steps:
        raise ValueError("the run took no warm-up meta-step")
    return steps[-1]


@dataclass(frozen=True)
class StagnationPull:
    """The controller alone on the proxy's stagnating branch: the multiplier before and after."""

    start_m: torch.Tensor  # [seeds]
    final_m: torch.Tensor  # [seeds]

    @property
    def distance_change(self) -> torch.Tensor:
        """``|m_end - 1| - |m_start - 1|``: > 0 where the branch moved the multiplier away from 1."""
        return (self.final_m - 1).abs() - (self.start_m - 1).abs()


def stagnation_pull(stats: list[float], seeds: list[int], steps: int = 300, controller_lr: float = 1e-3,
                    low: float = 0.1, high: float = 2.0) -> StagnationPull:
    """A fresh controller per seed on fixed statistics ``stats`` (one group), ``steps`` clipped Adam
    steps of the proxy meta-loss held in its stagnating branch (a flat loss history)."""
    check_positive_ints(steps=steps)
    check_range("number of seeds", len(seeds), 1, integer=True)
    inputs = torch.tensor([stats], dtype=torch.float32)
    proxy = ProxyMetaLoss(window=2, threshold=1e-3, warmup=2)
    for _ in range(2):
        proxy.record(1.0, torch.ones(1))
    start, final = torch.zeros(len(seeds)), torch.zeros(len(seeds))
    for j, seed in enumerate(seeds):
        controller = LRController(runtime.generator(seed))
        start[j] = multiplier(controller(inputs).detach(), low, high)[0]
        opt = torch.optim.Adam(controller.parameters(), lr=controller_lr)
        for _ in range(steps):
            opt.zero_grad()
            proxy(multiplier(controller(inputs), low, high)).backward()
            torch.nn.utils.clip_grad_norm_(controller.parameters(), 1.0)
            opt.step()
        final[j] = multiplier(controller(inputs).detach(), low, high)[0]
    if proxy.last_branch != "stagnating":
        raise RuntimeError(f"the proxy left its stagnating branch ({proxy.last_branch})")
    return StagnationPull(start, final)


def improving_meta_grad_norms(runs: list[RunResult]) -> list[float]:
    """Controller gradient norms of every proxy meta-step taken in the "improving" branch."""
    return [norm for r in runs for norm, branch in zip(r.trace.meta_grad_norm, r.trace.meta_branch, strict=True)
            if branch == "improving"]


# ----- section 5: learned controllers against the best fixed rate --------------------------------


def original_unrolled_gradients(seed: int, norm_scale: float, unroll_steps: int = 5,
                                task: CharTask = CharTask()) -> tuple[int, int]:
    """One controller call of ``meta_loss="unrolled"`` with ``unroll_impl="original"`` (the shipped
    ``UnrolledMetaTrainer``) on the workload: (controller parameters that received a gradient, all of them)."""
    config = ContinuumConfig.shipped_fix(meta_loss="unrolled", unroll_impl="original", update_freq=1,
                                         unroll_steps=unroll_steps)
    data_gen = runtime.generator(seed + 1_000)
    model = task.model(seed, norm_scale)
    optimizer = ContinuumOptimizer(model.param_groups(), config, runtime.generator(seed + 2_000),
                                   _unroll_problem(model, task, data_gen))
    batch = corpus().batch("train", task.batch_size, task.context, data_gen)
    optimizer.step(partial(_loss_and_gradients, model, optimizer, batch))
    params = list(optimizer.controller.parameters())
    return sum(p.grad is not None for p in params), len(params)


@dataclass(frozen=True)
class Oracle:
    """Plain AdamW at each fixed learning rate: validation loss per seed, mean wall time per run."""

    seed_val_loss: dict[float, list[float]]
    seconds: dict[float, float]

    @property
    def val_loss(self) -> dict[float, float]:
        """Mean validation loss over the seeds, per learning rate."""
        return {lr: _mean(values) for lr, values in self.seed_val_loss.items()}

    @property
    def best_lr(self) -> float:
        return min(self.val_loss, key=self.val_loss.get)

    def best_lr_per_seed(self) -> list[float]:
        """The best learning rate of the grid for each seed alone."""
        lrs = list(self.seed_val_loss)
        per_seed = zip(*self.seed_val_loss.values(), strict=True)
        return [lrs[min(range(len(lrs)), key=values.__getitem__)] for values in per_seed]


def fixed_lr_oracle(lrs: list[float], seeds: list[int], steps: int, norm_scale: float = 1.0) -> Oracle:
    """:func:`run_many` with plain AdamW at every learning rate of ``lrs``."""
    runs = {lr: run_many(None, seeds, steps, desc=f"lr {lr:g}", fixed_lr=lr, norm_scale=norm_scale)
            for lr in lrs}
    return Oracle({lr: [r.val_loss for r in rs] for lr, rs in runs.items()},
                  {lr: _mean(r.seconds for r in rs) for lr, rs in runs.items()})


def learned_methods(original: ContinuumConfig, shipped: ContinuumConfig,
                    unroll_ks: list[int]) -> dict[str, ContinuumConfig]:
    """The controllers compared with the oracle: the unrolled meta-gradient for each ``k`` and
    Adam-HD (log1p inputs, ceiling 10, controller lr 1e-2), the original and the shipped fix."""
    learned = shipped.with_(max_lr_mult=10.0, controller_lr=1e-2)
    methods = {f"unrolled k={k}": learned.with_(meta_loss="unrolled", unroll_steps=k) for k in unroll_ks}
    methods["hypergradient"] = learned.with_(meta_loss="hypergradient", hypergradient_lr=1e-3)
    methods["original"], methods["shipped fix"] = original, shipped
    return methods


def oracle_ratios(runs: list[RunResult], oracle: Oracle) -> list[float]:
    """Per run: its validation loss over the oracle's (the best fixed rate's mean validation loss)."""
    best = oracle.val_loss[oracle.best_lr]
    return [r.val_loss / best for r in runs]


def controller_rate(config: ContinuumConfig) -> float:
    """The rate at which the multiplier learns: Adam-HD's step size, else the controller's Adam lr."""
    return config.hypergradient_lr if config.meta_loss == "hypergradient" else config.controller_lr


def comparison_table(results: Mapping[str, list[RunResult]], oracle: Oracle) -> pd.DataFrame:
    """Per method: its ceiling and controller learning rate; validation loss relative to the oracle's
    best (mean and sd over seeds), wall time relative to one plain run at lr 1e-3 (at the best rate if
    1e-3 is not in the grid), final core-group multiplier."""
    plain_seconds = oracle.seconds[1e-3 if 1e-3 in oracle.seconds else oracle.best_lr]
    rows = []
    for name, rs in results.items():
        ratios = torch.tensor(oracle_ratios(rs, oracle), dtype=torch.float64)
        rows.append({"method": name, "ceiling": rs[0].config.max_lr_mult,
                     "controller lr": controller_rate(rs[0].config),
                     "val loss / oracle": ratios.mean().item(), "sd": _sd(ratios),
                     "cost / plain run": _mean(r.seconds for r in rs) / plain_seconds,
                     "final m (core)": _mean(r.multipliers[-1, 0].item() for r in rs)})
    return pd.DataFrame(rows)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# ----- section 6: the static slider ------------------------------------------------------------


def multiplier_slider_grid(configs: Mapping[str, ContinuumConfig], scales: list[float], seeds: list[int],
                           steps: int) -> dict[str, dict]:
    """The memory group's multiplier trajectories for every (norm scale, configuration), keyed
    ``"x{scale} {name}"``, in the form :func:`nested_lab.viz.static_slider` takes."""
    settings = {f"x{scale:g} {name}": (scale, cfg) for scale in scales for name, cfg in configs.items()}
    grid = {}
    for key, (scale, cfg) in runtime.progress(settings.items(), desc="slider grid", leave=False):
        runs = [train(cfg, s, steps, norm_scale=scale) for s in seeds]
        grid[key] = {f"seed {r.seed}": (list(range(1, steps + 1)), r.multipliers[:, 1]) for r in runs}
    return grid
