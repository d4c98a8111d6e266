"""Chapter 1's workload: a char-level MLP trained by ContinuumOptimizer or by plain AdamW.

One function runs one (config, seed) training run and returns everything the
chapter plots or records; :func:`run_many` runs a list of seeds with a
progress bar.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from nested_lab import runtime
from nested_lab.data.corpus import CharCorpus, stdlib_text
from nested_lab.models.char_mlp import CharMLP
from nested_lab.optim import ContinuumConfig, ContinuumOptimizer, UnrollProblem
from nested_lab.optim.continuum import ControllerTrace
from nested_lab.optim.ensemble import ContinuumEnsemble
from nested_lab.parameters import check_numbers, check_positive_ints


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
        check_numbers(norm_scale=norm_scale)
        if not norm_scale > 0:
            raise ValueError(f"norm_scale must be > 0, got {norm_scale}")
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
    """Train one model for ``steps`` steps. ``config=None`` trains with plain AdamW at ``fixed_lr``."""
    if (config is None) == (fixed_lr is None):
        raise ValueError("give exactly one of config (ContinuumOptimizer) or fixed_lr (plain AdamW)")
    check_positive_ints(steps=steps)
    data_gen = runtime.generator(seed + 1_000)
    model = task.model(seed, norm_scale)
    if config is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=fixed_lr, weight_decay=0.01)
    else:
        problem = UnrollProblem(
            model, F.cross_entropy,
            train_batches=lambda k: [corpus().batch("train", task.batch_size, task.context, data_gen)
                                     for _ in range(k)],
            val_batch=lambda: corpus().batch("val", 512, task.context, data_gen),
        )
        optimizer = ContinuumOptimizer(model.param_groups(), config, runtime.generator(seed + 2_000), problem)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        inputs, targets = corpus().batch("train", task.batch_size, task.context, data_gen)
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step() if config is None else optimizer.step(loss.item())
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    with torch.no_grad():
        inputs, targets = task.val_batch()
        val = F.cross_entropy(model(inputs), targets).item()
    trace = None if config is None else optimizer.trace
    return RunResult(config, seed, losses, val, trace, seconds)


def run_many(config: ContinuumConfig | None, seeds: list[int], steps: int, desc: str = "",
             **kwargs) -> list[RunResult]:
    """:func:`train` for every seed, with a progress bar."""
    return [train(config, seed, steps, **kwargs) for seed in runtime.progress(seeds, desc=desc, leave=False)]


def pinned_side(m: torch.Tensor, low: float = 0.1, high: float = 2.0, tolerance: float = 0.01) -> list[str]:
    """``"floor"``, ``"ceiling"`` or ``"free"`` for each multiplier in ``m``."""
    span = high - low
    return ["floor" if v < low + tolerance * span else "ceiling" if v > high - tolerance * span else "free"
            for v in m.tolist()]


@dataclass
class EnsembleResult:
    train_loss: torch.Tensor  # [steps, seeds]
    multipliers: torch.Tensor  # [steps, seeds, groups]


def train_ensemble(config: ContinuumConfig, seeds: list[int], steps: int, task: CharTask = CharTask(),
                   norm_scale: float = 1.0) -> EnsembleResult:
    """The runs of :func:`train` for every seed at once (same models, data and controllers),
    vectorised over the seeds with ``torch.func``; used where latency matters."""
    check_positive_ints(steps=steps)
    if not seeds:
        raise ValueError("need at least one seed, got none")
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
