"""Chapter 5, nested optimizers: what the chapter runs and tabulates.

Three parts, each built on a mechanism below:

- the learned DMGD optimizer (:mod:`nested_lab.optim.dmgd`) and its meta-learner
  (:mod:`nested_lab.optim.meta`): the replica's meta-gradient, the unrolled one, and tuned
  hand-designed optimizers on held-out tasks. Every task is solved from the same fresh model
  (seeded by the task's index) with each optimizer for ``steps`` steps on one training batch; the
  score is the loss on a fresh validation batch;
- the Continuum Memory System's update schedule (:mod:`nested_lab.memory.cms`): what the replica
  prints, and which level each trainer actually changes;
- online training of a CMS on the drifting stream of :mod:`nested_lab.data.drift`: does the
  multi-frequency schedule of Nested Learning (Behrouz et al. 2025, the CMS equation) help against
  a single-frequency network of the same size? Every run trains a
  :class:`~nested_lab.memory.cms.ContinuumMemory` with plain SGD on the mean squared error, one
  batch per step, and records the prequential loss (the loss on each new batch BEFORE the model
  learns from it) and the loss on return (the prequential loss on the first batch of a fast mode
  that comes back after being away: how much of that mode was forgotten). The stream and the
  initialisation have their own generators, so every arm of a comparison sees the same stream
  and, for the same architecture, the same initial weights.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from nested_lab import runtime
from nested_lab.data.drift import drift_stream
from nested_lab.memory.cms import TRAINERS, ContinuumMemory, ContinuumMemoryTrainer, update_schedule
from nested_lab.optim import dmgd, meta
from nested_lab.parameters import check_choice, check_positive_ints, check_range

FAMILIES = ("regression", "sinusoid")

# --- the learned optimizer on tasks: solving, tuning, meta-training -----------------------------

OptimizerFactory = Callable[[nn.Module, float], torch.optim.Optimizer]
BASELINES: dict[str, OptimizerFactory] = {
    "SGD": lambda model, lr: torch.optim.SGD(model.parameters(), lr=lr),
    "SGD + momentum 0.9": lambda model, lr: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
    "Adam": lambda model, lr: torch.optim.Adam(model.parameters(), lr=lr),
}
MODEL_SIZES = {"regression": [10, 1], "sinusoid": [1, 40, 40, 1]}


def model_fn(family: str) -> Callable[[torch.Generator], nn.Sequential]:
    """The model of a task family: linear for regression, 1-40-40-1 ReLU MLP for sinusoids."""
    return functools.partial(meta.mlp, MODEL_SIZES[check_choice("task family", family, FAMILIES)])


def tasks(family: str, count: int, generator: torch.Generator, shared_weights_bug: bool = False) -> list[meta.Task]:
    """``count`` tasks of a family (:func:`~nested_lab.optim.meta.regression_tasks` or
    :func:`~nested_lab.optim.meta.sinusoid_tasks`)."""
    make = {"regression": meta.regression_tasks, "sinusoid": meta.sinusoid_tasks}
    return make[check_choice("task family", family, FAMILIES)](count, generator, shared_weights_bug=shared_weights_bug)


def solve(task: meta.Task, make_optimizer: OptimizerFactory, lr: float, build: Callable[[torch.Generator], nn.Module],
          steps: int, seed: int) -> list[float]:
    """Train a fresh model (seed ``seed``) on the task's training batch for ``steps`` steps; return
    the training losses before each step followed by the final validation loss. A run whose loss
    stops being finite is cut there, and every later loss is reported as ``inf``."""
    generator = runtime.generator(seed)
    model = build(generator)
    train, val = task(generator), task(generator)
    optimizer = make_optimizer(model, lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(train[0]), train[1])
        losses.append(loss.item())
        if not torch.isfinite(loss):
            return [*losses[:-1], *[math.inf] * (steps - len(losses) + 2)]
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        val_loss = nn.functional.mse_loss(model(val[0]), val[1]).item()
    return [*losses, val_loss if math.isfinite(val_loss) else math.inf]


def learned(memory: dmgd.LearnedMomentum, momentum: float = 0.9) -> OptimizerFactory:
    """A factory of DMGD optimizers that share a (meta-trained) memory."""
    return lambda model, lr: dmgd.NestedDeepMomentumGD(model.named_parameters(), memory=memory, lr=lr,
                                                       momentum=momentum)


def scores(task_list: Sequence[meta.Task], optimizers: dict[str, tuple[OptimizerFactory, float]],
           build: Callable[[torch.Generator], nn.Module], steps: int, first_seed: int = 0) -> pd.DataFrame:
    """Final validation loss of each optimizer (factory, lr) on each task: columns
    ``task, optimizer, lr, val_loss`` (``inf`` where the run diverged)."""
    check_positive_ints(steps=steps)
    rows = []
    for index, task in enumerate(task_list):
        for name, (make, lr) in optimizers.items():
            val_loss = solve(task, make, lr, build, steps, first_seed + index)[-1]
            rows.append({"task": index, "optimizer": name, "lr": lr, "val_loss": val_loss})
    return pd.DataFrame(rows)


def tune(task_list: Sequence[meta.Task], factories: dict[str, OptimizerFactory], lrs: Sequence[float],
         build: Callable[[torch.Generator], nn.Module], steps: int, first_seed: int = 0) -> dict[str, float]:
    """The learning rate of the grid with the lowest median validation loss, per optimizer (a
    diverged run counts as the worst)."""
    grid = {f"{name}@{lr}": (factories[name], lr) for name in factories for lr in lrs}
    table = scores(task_list, grid, build, steps, first_seed)
    table["name"] = table["optimizer"].str.rsplit("@", n=1).str[0]
    medians = table.groupby(["name", "lr"])["val_loss"].median()
    return {name: float(medians.loc[name].idxmin()) for name in factories}


def original_reproduction(seed: int, iterations: int, rule: str = "original", meta_lr: float = 1e-3,
                          eval_steps: int = 20, eval_tasks: int = 5, checkpoints: Sequence[int] = (),
                          family: str = "regression") -> tuple[pd.DataFrame, dict[int, list[float]]]:
    """The replica's setting: meta-train on the last task's last step with the closure bug on, as
    shipped, probing the memory-gradient cosine before and after every meta-step (``rule="unrolled"``
    swaps in the correct gradient and nothing else). At iteration 0, every checkpoint and the end,
    ``eval_tasks`` new tasks are trained with the optimizer for ``eval_steps`` steps.
    Returns the curve (``iteration, alignment, pre, post, improvement``, and ``step_size``, the
    :func:`first_step_size` on the probe, at iteration 0, every checkpoint and the end) and
    {iteration: the median over the new tasks of the losses :func:`solve` returns}.
    ``rule="detached"`` is commit 4f2b189, whose meta-steps reach no memory parameter."""
    if any(not 0 < c < iterations for c in checkpoints):
        raise ValueError(f"checkpoints must lie strictly between 0 and iterations={iterations}, got {list(checkpoints)}")
    learner, distribution = replica_learner(seed, family, rule, meta_lr)
    memory, build = learner.memory, learner.model_fn
    probe_model, probe_batch = build(runtime.generator(seed + 10_000)), distribution[0](learner.generator)
    new_tasks = tasks(family, eval_tasks, runtime.generator(seed + 20_000))

    def probe() -> float:
        return dmgd.memory_alignment(memory, probe_model, probe_batch)

    def trajectory() -> list[float]:
        runs = [solve(task, learned(memory), learner.lr, build, eval_steps, seed + 30_000 + i)
                for i, task in enumerate(new_tasks)]
        return torch.tensor(runs).median(dim=0).values.tolist()

    curves = [pd.DataFrame([{"iteration": 0, "probe": probe()}])]
    trajectories = {0: trajectory()}
    sizes = {0: first_step_size(memory, probe_model, probe_batch, learner.lr)}
    bounds = [0, *sorted(checkpoints), iterations]
    for done, until in itertools.pairwise(bounds):
        part = pd.DataFrame(learner.meta_train(distribution, until - done, probe=probe, show_progress=False))
        curves.append(part.assign(iteration=part["iteration"] + done))
        trajectories[until] = trajectory()
        sizes[until] = first_step_size(memory, probe_model, probe_batch, learner.lr)
    curve = pd.concat(curves, ignore_index=True).rename(columns={"probe": "alignment"})
    return curve.assign(step_size=curve["iteration"].map(sizes)), trajectories


def first_step_size(memory: dmgd.LearnedMomentum, model: nn.Module, batch: dmgd.Batch, lr: float) -> float:
    """The norm of the optimizer's first step from ``model`` on ``batch`` (zero momentum):
    ``lr * |memory output|``, all tensors together."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    gradients = torch.func.grad(dmgd.InnerTask(model, params, [batch], batch).loss)(params, batch)
    with torch.no_grad():
        outputs = memory(gradients, {name: torch.zeros_like(g) for name, g in gradients.items()})
    return lr * float(torch.cat([out.flatten() for out in outputs.values()]).norm())


def meta_train(family: str, seed: int, iterations: int, rule: str = "unrolled",
               aggregation: str = "meta_batch", lr: float = 0.1, meta_lr: float = 1e-3,
               shared_weights_bug: bool = False) -> tuple[dmgd.LearnedMomentum, pd.DataFrame]:
    """Meta-train a fresh memory on a task family; return it and its meta-training curve."""
    learner, distribution = _learner(family, seed, rule, aggregation, lr, meta_lr, shared_weights_bug)
    return learner.memory, pd.DataFrame(learner.meta_train(distribution, iterations, show_progress=False))


def _learner(family: str, seed: int, rule: str, aggregation: str, lr: float, meta_lr: float,
             shared_weights_bug: bool) -> tuple[meta.MetaLearner, list[meta.Task]]:
    """A fresh memory and meta-learner for a task family, and its distribution of 100 tasks, all
    drawn from one generator seeded with ``seed``."""
    generator = runtime.generator(seed)
    build = model_fn(family)
    memory = dmgd.LearnedMomentum.for_model(build(generator), generator=generator)
    distribution = tasks(family, 100, generator, shared_weights_bug=shared_weights_bug)
    learner = meta.MetaLearner(build, memory, generator=generator, lr=lr, meta_lr=meta_lr, rule=rule,
                               meta_gradient=aggregation)
    return learner, distribution


def replica_learner(seed: int, family: str = "regression", rule: str = "original",
                    meta_lr: float = 1e-3) -> tuple[meta.MetaLearner, list[meta.Task]]:
    """A meta-learner configured as the replica ships it (wrong-sign surrogate unless ``rule`` says
    otherwise, last task's last step, step size 0.01, closure bug on) and its 100 tasks."""
    return _learner(family, seed, rule, "last_task_last_step", 0.01, meta_lr, shared_weights_bug=True)


def demo_statistics(seeds: Sequence[int], update: bool = True, iterations: int = 3) -> pd.DataFrame:
    """The replica's demo, rebuilt: a 20-64-1 ReLU network, memories of width 32, 50 regression
    tasks with 20 inputs and a bias, the same first 4 tasks in every meta-iteration, 5 inner steps,
    its meta-gradient. ``update=False`` runs the same statistics without any meta-step (the null).
    Returns ``seed, iteration, pre, post, improvement``."""
    check_positive_ints(iterations=iterations)
    build = functools.partial(meta.mlp, [20, 64, 1])
    frames = []
    for seed in seeds:
        generator = runtime.generator(seed)
        memory = dmgd.LearnedMomentum.for_model(build(generator), hidden=32, generator=generator)
        learner = meta.MetaLearner(build, memory, generator=generator, rule="original",
                                   meta_gradient="last_task_last_step")
        batch = meta.regression_tasks(50, generator, input_dim=20, bias=True, max_noise=0.1)[:4]
        rows = [{"iteration": i + 1, **learner.meta_train_step(batch, update=update)} for i in range(iterations)]
        frames.append(pd.DataFrame(rows).assign(seed=seed))
    return pd.concat(frames, ignore_index=True)


def contributing_tasks(learner: meta.MetaLearner, task_list: Sequence[meta.Task], replacement: meta.Task) -> int:
    """How many tasks of a meta-batch reach its meta-gradient: task ``i`` counts if swapping it for
    ``replacement`` (same model initialisation) changes the gradient."""
    state = learner.generator.get_state()
    inner = [learner.inner_task(task) for task in task_list]
    swap = learner.inner_task(replacement)
    learner.generator.set_state(state)
    reference = learner.meta_gradient(inner)
    count = 0
    for i in range(len(inner)):
        swapped = dmgd.InnerTask(inner[i].model, inner[i].params, swap.train_batches, swap.val_batch, inner[i].loss_fn)
        changed = learner.meta_gradient([*inner[:i], swapped, *inner[i + 1:]])
        count += any(not torch.equal(reference[name], changed[name]) for name in reference)
    return count


def loss_growth(losses: Sequence[float], cap: float = 1e6) -> float:
    """Training loss before the last step over the initial loss, from :func:`solve`'s list (whose
    last entry is the validation loss); a diverged run gives ``cap``."""
    ratio = losses[-2] / losses[0]
    return min(ratio, cap) if math.isfinite(ratio) else cap


def checkpoint_round_trip(memory: dmgd.LearnedMomentum, family: str, memory_keys: str, seed: int = 0) -> float:
    """Save an optimizer holding ``memory`` and load the checkpoint into a fresh optimizer for a fresh
    model of the family, as a user resuming from a checkpoint would: the share of the memory tensors
    that differed before loading and are equal after it."""
    build = model_fn(family)
    source = dmgd.NestedDeepMomentumGD(build(runtime.generator(seed)).named_parameters(), memory=memory,
                                       memory_keys=memory_keys)
    target = dmgd.NestedDeepMomentumGD(build(runtime.generator(seed + 1)).named_parameters(),
                                       memory_keys=memory_keys, generator=runtime.generator(seed + 2))
    pairs = list(zip(source.memory.parameters(), target.memory.parameters(), strict=True))
    differing = [i for i, (a, b) in enumerate(pairs) if not torch.equal(a, b)]
    target.load_state_dict(source.state_dict())
    return sum(torch.equal(*pairs[i]) for i in differing) / len(differing)


# --- section 1: the replica's setting, both meta-gradients ---------------------------------------

RULES = ("original", "unrolled")
Runs = dict[tuple[str, int], tuple[pd.DataFrame, dict[int, list[float]]]]


def replica_runs(seeds: Sequence[int], iterations: int, checkpoints: Sequence[int]) -> Runs:
    """:func:`original_reproduction` for each meta-gradient rule and seed:
    ``{(rule, seed): (alignment curve, {iteration: median losses on new tasks})}``."""
    runs = {}
    for rule in RULES:
        for seed in runtime.progress(seeds, desc=f"replica setting, rule={rule}", leave=False):
            runs[rule, seed] = original_reproduction(seed, iterations, rule=rule, checkpoints=checkpoints)
    return runs


def alignment_curves(runs: Runs) -> pd.DataFrame:
    """Every run's alignment curve in one long table, with its ``rule`` and ``seed``."""
    return pd.concat([curve.assign(rule=rule, seed=seed) for (rule, seed), (curve, _) in runs.items()])


@dataclass(frozen=True)
class ReplicaSummary:
    """Per seed: the memory-gradient cosine before and after meta-training, and the loss growth
    (:func:`loss_growth`) of the meta-trained optimizer on new tasks, for each rule."""

    start_alignment: list[float]
    final_alignment: dict[str, list[float]]
    growth: dict[str, list[float]]

    @property
    def alignment_change(self) -> list[float]:
        """``|cos after - cos before|`` per seed, for the replica's rule."""
        return [abs(end - start) for end, start in
                zip(self.final_alignment["original"], self.start_alignment, strict=True)]


def summarize_replica(runs: Runs, seeds: Sequence[int], iterations: int) -> ReplicaSummary:
    """The :class:`ReplicaSummary` of :func:`replica_runs` (``iterations`` meta-steps)."""
    final = {rule: [runs[rule, s][0]["alignment"].iloc[-1] for s in seeds] for rule in RULES}
    start = [runs["original", s][0]["alignment"].iloc[0] for s in seeds]
    growth = {rule: [loss_growth(runs[rule, s][1][iterations]) for s in seeds] for rule in RULES}
    return ReplicaSummary(start, final, growth)


def slider_grid(runs: Runs, seed: int, iterations: Sequence[int]) -> dict[int, dict[str, tuple[list, list]]]:
    """For the static slider: per meta-training iteration, each rule's median training losses on
    the new tasks (seed ``seed``)."""
    return {iteration: {f"meta-gradient: {rule}": (list(range(20)), runs[rule, seed][1][iteration][:-1])
                        for rule in RULES}
            for iteration in iterations}


def pretraining_ratios(runs: Runs) -> list[float]:
    """Per seed of the replica's rule: the post-adaptation loss of the last 20 meta-steps over
    that of the first 20 (iterations 1-20)."""
    return [curve["post"].iloc[-20:].mean() / curve["post"].iloc[1:21].mean()
            for (rule, _), (curve, _) in runs.items() if rule == "original"]


def momentum_sensitivity(seed: int) -> float:
    """The share of the replica's memories (one per tensor of the regression model) whose output
    changes when only the momentum input changes (the gradient held fixed)."""
    generator = runtime.generator(seed)
    memory = dmgd.LearnedMomentum.for_model(model_fn("regression")(generator), generator=generator)
    changed = []
    with torch.no_grad():
        for module in memory.memories.values():
            numel = module.network[-1].out_features
            gradient = torch.randn(numel, generator=generator)
            momenta = torch.zeros(numel), torch.randn(numel, generator=generator)
            changed.append(not torch.equal(module(gradient, momenta[0]), module(gradient, momenta[1])))
    return float(np.mean(changed))


def init_bound_ratios(seed: int, gain: float = 0.01) -> list[float]:
    """Per linear layer of the replica's memories (regression model): the largest |weight| over the
    Xavier-uniform bound ``gain * sqrt(6 / (fan_in + fan_out))`` -- just under 1 for that
    initialisation, far from it for another gain."""
    generator = runtime.generator(seed)
    memory = dmgd.LearnedMomentum.for_model(model_fn("regression")(generator), generator=generator)
    layers = [m for m in memory.modules() if isinstance(m, nn.Linear)]
    return [float(layer.weight.detach().abs().max()) / (gain * math.sqrt(6 / (layer.in_features + layer.out_features)))
            for layer in layers]


def step_growth(runs: Runs, rule: str) -> list[float]:
    """Per seed of ``rule``: the share of consecutive checkpoints (0, ..., the end) at which the
    optimizer's first step on the probe (:func:`first_step_size`) is larger than at the one before."""
    shares = []
    for (name, _), (curve, _) in runs.items():
        if name == rule:
            sizes = curve["step_size"].dropna().to_numpy()
            shares.append(float(np.mean(np.diff(sizes) > 0)))
    return shares


def step_size_ratio(runs: Runs, rule: str) -> list[float]:
    """Per seed of ``rule``: the first step on the probe after meta-training over that before."""
    return [float(curve["step_size"].dropna().iloc[-1] / curve["step_size"].iloc[0])
            for (name, _), (curve, _) in runs.items() if name == rule]


def untrained_growth(runs: Runs) -> list[float]:
    """Per seed: :func:`loss_growth` on the new tasks of the optimizer before any meta-step (the
    memory as initialised; the replica's rule, though both rules start from the same memory)."""
    return [loss_growth(trajectories[0]) for (rule, _), (_, trajectories) in runs.items() if rule == "original"]


def runs_complete(runs: Runs, rule: str, iterations: int) -> list[float]:
    """Per seed of ``rule``: 1 if meta-training ran all ``iterations`` meta-steps with finite
    statistics, else 0."""
    return [float(len(curve) == iterations + 1 and bool(np.isfinite(curve[["pre", "post"]].iloc[1:]).all().all()))
            for (name, _), (curve, _) in runs.items() if name == rule]


def growth_change(runs: Runs, rule: str, iterations: int) -> list[float]:
    """Per seed of ``rule``: :func:`loss_growth` on the new tasks after meta-training over that before."""
    return [loss_growth(trajectories[iterations]) / loss_growth(trajectories[0])
            for (name, _), (_, trajectories) in runs.items() if name == rule]


def commit_4f2b189_runs(seeds: Sequence[int], iterations: int) -> Runs:
    """:func:`original_reproduction` with ``rule="detached"`` (commit 4f2b189) per seed; keys
    ``("detached", seed)``. (At 4f2b189 every task also built fresh memories; here they are
    shared, which makes no difference when no gradient reaches them.)"""
    return {("detached", seed): original_reproduction(seed, iterations, rule="detached")
            for seed in runtime.progress(seeds, desc="commit 4f2b189", leave=False)}


def alignment_shift(runs: Runs, rule: str) -> list[float]:
    """Per seed of ``rule``: cos(memory output, gradient) after meta-training minus before."""
    return [float(curve["alignment"].iloc[-1] - curve["alignment"].iloc[0])
            for (name, _), (curve, _) in runs.items() if name == rule]


def meta_step_directions(seed: int, steps: int, rule: str = "original") -> pd.DataFrame:
    """``steps`` meta-steps of the replica's learner (:func:`replica_learner`); per step: the norm
    of the memory's parameter change, its cosine with minus the gradient the step descended
    (``cos_own``), and with minus the true meta-gradient of the same meta-batch, the mean
    validation loss after the five inner steps, unrolled (``cos_true``; NaN for a zero change)."""
    learner, distribution = replica_learner(seed, rule=rule)
    rows = []
    for step in range(steps):
        picks = torch.randint(len(distribution), (4,), generator=learner.generator).tolist()
        inner = [learner.inner_task(distribution[i]) for i in picks]
        own = learner.meta_gradient(inner)
        true = [dmgd.task_meta_gradient(learner.memory, task, learner.lr, learner.momentum, "unrolled")
                for task in inner]
        before = _flat(dict(learner.memory.named_parameters())).detach().clone()
        dmgd.apply_meta_gradient(learner.memory, learner.meta_optimizer, own)
        change = _flat(dict(learner.memory.named_parameters())).detach() - before
        true_mean = -sum(_flat(g) for g in true) / len(true)
        rows.append({"step": step + 1, "update_norm": float(change.norm()),
                     "cos_own": _cosine(change, -_flat(own)), "cos_true": _cosine(change, true_mean)})
    return pd.DataFrame(rows)


def _flat(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors.values()])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    if not a.any() or not b.any():
        return math.nan
    return float(F.cosine_similarity(a, b, dim=0))


def step_directions(seeds: Sequence[int], steps: int) -> pd.DataFrame:
    """:func:`meta_step_directions` for the replica as shipped (38cb25d) and commit 4f2b189 on
    every seed, with ``seed`` and ``rule`` columns."""
    return pd.concat([meta_step_directions(seed, steps, rule).assign(seed=seed, rule=rule)
                      for rule in ("original", "detached") for seed in seeds], ignore_index=True)


def first_meta_step_change(seed: int) -> float:
    """The largest change of a memory parameter in one meta-step of the replica's learner, on the
    first four of its shipped tasks."""
    replica, shipped_tasks = replica_learner(seed)
    before = [p.detach().clone() for p in replica.memory.parameters()]
    replica.meta_train_step(shipped_tasks[:4])
    return max(float((p.detach() - b).abs().max())
               for p, b in zip(replica.memory.parameters(), before, strict=True))


def checkpoint_restores(memory: dmgd.LearnedMomentum, seed: int) -> dict[str, float]:
    """:func:`checkpoint_round_trip` on regression for each way of keying the saved memories."""
    return {keys: checkpoint_round_trip(memory, "regression", keys, seed) for keys in dmgd.MEMORY_KEYS}


def production_requirements(growth: Sequence[float], restored: float, pretraining: Sequence[float],
                            cms_error: int) -> dict[str, bool]:
    """Four things an optimizer ready for production use would do, each from a measurement of the
    replica as shipped: a meta-trained optimizer that does not blow up a new task (loss growth
    < 2 on every seed), a checkpoint that restores the memory (share 1), meta-training that lowers
    its own post-adaptation loss (ratio < 1 on every seed), and a CMS schedule that happens
    (count error 0)."""
    return {"does not blow up new tasks": max(growth) < 2, "checkpoint restores the memory": restored == 1,
            "meta-training lowers its loss": max(pretraining) < 1, "CMS schedule happens": cms_error == 0}


# --- section 2: the corrected optimizer against tuned hand-designed ones -------------------------

def meta_train_memories(seeds: Sequence[int], iterations: int, lr: float
                        ) -> tuple[dict[tuple[str, int], dmgd.LearnedMomentum], list[pd.DataFrame]]:
    """Corrected meta-training (:func:`meta_train`) on every family and seed: the memories by
    ``(family, seed)`` and their curves (with ``family`` and ``seed`` columns)."""
    memories, curves = {}, []
    for family in FAMILIES:
        for seed in runtime.progress(seeds, desc=f"meta-training on {family}", leave=False):
            memory, curve = meta_train(family, seed, iterations, lr=lr)
            memories[family, seed] = memory
            curves.append(curve.assign(family=family, seed=seed))
    return memories, curves


def compare_optimizers(memories: Mapping[tuple[str, int], dmgd.LearnedMomentum], seed: int, meta_seeds: int,
                       tune_tasks: int, held_out_tasks: int, lrs: Sequence[float],
                       horizons: Sequence[int]) -> pd.DataFrame:
    """Every family and horizon: the baselines and each learned memory at its tuned learning
    rate (tuned on ``tune_tasks`` tasks, seeds from ``seed + 1000``) scored on ``held_out_tasks``
    tasks (seeds from ``seed + 2000``): :func:`scores` plus ``family, steps, kind`` columns."""
    tables = []
    for family in FAMILIES:
        build = model_fn(family)
        tuning = tasks(family, tune_tasks, runtime.generator(seed + 100))
        held_out = tasks(family, held_out_tasks, runtime.generator(seed + 200))
        factories = {**BASELINES, **{f"learned (meta seed {s})": learned(memories[family, s])
                                     for s in range(seed, seed + meta_seeds)}}
        for steps in horizons:
            best = tune(tuning, factories, lrs, build, steps, first_seed=seed + 1_000)
            optimizers = {name: (factories[name], lr) for name, lr in best.items()}
            table = scores(held_out, optimizers, build, steps, first_seed=seed + 2_000)
            tables.append(table.assign(family=family, steps=steps))
    comparison = pd.concat(tables, ignore_index=True)
    is_learned = comparison["optimizer"].str.startswith("learned")
    comparison["kind"] = comparison["optimizer"].where(~is_learned, "learned DMGD")
    return comparison


def comparison_table(comparison: pd.DataFrame) -> pd.DataFrame:
    """Median, quartiles and diverged runs of the validation loss per family, horizon and kind of
    optimizer, with the tuned learning rates (one per meta seed for the learned one)."""
    summary = (comparison.groupby(["family", "steps", "kind"])["val_loss"]
               .agg(median="median", q25=lambda x: x.quantile(0.25), q75=lambda x: x.quantile(0.75),
                    diverged=lambda x: int((~np.isfinite(x)).sum()))
               .reset_index())
    lrs = (comparison.drop_duplicates(["family", "steps", "optimizer"])
           .groupby(["family", "steps", "kind"])["lr"].agg(lambda rates: "/".join(f"{rate:g}" for rate in rates)))
    return summary.join(lrs, on=["family", "steps", "kind"]).round(3)


def win_rates(comparison: pd.DataFrame, family: str, steps: int, meta_seeds: Sequence[int]) -> list[float]:
    """Per meta seed: the share of held-out tasks on which the learned optimizer beats the best
    tuned baseline."""
    part = comparison[(comparison["family"] == family) & (comparison["steps"] == steps)]
    losses = part.pivot(index="task", columns="optimizer", values="val_loss")
    best_baseline = losses[list(BASELINES)].min(axis=1)
    return [float((losses[f"learned (meta seed {seed})"] < best_baseline).mean()) for seed in meta_seeds]


# --- section 3: the MetaLearner -------------------------------------------------------------------

def tasks_reaching_the_gradient(seed: int, rule: str = "original") -> dict[str, int]:
    """Per aggregation of :mod:`~nested_lab.optim.meta`: how many of 4 distinct regression tasks
    reach the replica learner's meta-gradient (:func:`contributing_tasks`), under ``rule``."""
    replica, _ = replica_learner(seed, rule=rule)
    swap_in = tasks("regression", 1, runtime.generator(seed + 300))[0]
    distinct = tasks("regression", 4, runtime.generator(seed + 301))
    reaching = {}
    for aggregation in meta.AGGREGATIONS:
        replica.aggregation = aggregation
        reaching[aggregation] = contributing_tasks(replica, distinct, swap_in)
    return reaching


def aggregation_curves(meta_curves: Sequence[pd.DataFrame], seeds: Sequence[int], iterations: int,
                       lr: float) -> pd.DataFrame:
    """Regression meta-training curves under both aggregations: the ``meta_batch`` ones of
    ``meta_curves`` (section 2's runs) and new ``last_task_last_step`` runs, with the
    post-adaptation loss smoothed over 20 meta-steps."""
    curves = [curve.assign(meta_gradient="meta_batch") for curve in meta_curves
              if curve["family"].iloc[0] == "regression"]
    for seed in seeds:
        _, curve = meta_train("regression", seed, iterations, aggregation="last_task_last_step", lr=lr)
        curves.append(curve.assign(meta_gradient="last_task_last_step", seed=seed))
    curves = pd.concat(curves, ignore_index=True)
    curves["smoothed post-adaptation loss"] = (curves.groupby(["meta_gradient", "seed"])["post"]
                                               .transform(lambda x: x.rolling(20, min_periods=1).mean()))
    return curves


def late_loss_ratio(curves: pd.DataFrame, iterations: int) -> list[float]:
    """Per seed: the mean post-adaptation loss over the second half of meta-training, last task's
    last step over meta-batch."""
    late = curves[curves["iteration"] > iterations // 2]
    late_post = late.groupby(["meta_gradient", "seed"])["post"].mean().unstack(0)
    return (late_post["last_task_last_step"] / late_post["meta_batch"]).tolist()


def shipped_task_diversity(seed: int) -> dict[bool, float]:
    """:func:`~nested_lab.optim.meta.task_diversity` of 100 regression tasks, with the closure bug
    (``True``) and without."""
    return {bug: meta.task_diversity(tasks("regression", 100, runtime.generator(seed), shared_weights_bug=bug))
            for bug in (True, False)}


def closure_medians(memories: Mapping[tuple[str, int], dmgd.LearnedMomentum], seed: int, meta_seeds: int,
                    held_out_tasks: int, iterations: int, lr: float) -> pd.DataFrame:
    """Median held-out regression loss after 5 steps (a diverged run counts as 1e6), per meta seed
    (rows) and the distribution the memory was meta-trained on (columns: the shipped one-task
    distribution, trained here, and the distinct tasks of ``memories``)."""
    held_out = tasks("regression", held_out_tasks, runtime.generator(seed + 200))
    tables = []
    for meta_seed in range(seed, seed + meta_seeds):
        bugged_memory, _ = meta_train("regression", meta_seed, iterations, lr=lr, shared_weights_bug=True)
        arms = {"shipped tasks": (learned(bugged_memory), lr),
                "distinct tasks": (learned(memories["regression", meta_seed]), lr)}
        table = scores(held_out, arms, model_fn("regression"), steps=5, first_seed=seed + 2_000)
        tables.append(table.assign(seed=meta_seed))
    return (pd.concat(tables).assign(val_loss=lambda t: t["val_loss"].clip(upper=1e6))
            .groupby(["seed", "optimizer"])["val_loss"].median().unstack())


def sinusoid_fit(count: int, seed: int) -> pd.DataFrame:
    """Draw ``count`` sinusoid tasks (the replica's generator, seeded with ``seed``) and recover
    each one's amplitude and phase from one batch by least squares on ``[sin x, cos x]`` (exact for
    ``A sin(x + phase)``): columns ``task, amplitude, phase``."""
    rows = []
    for index, task in enumerate(tasks("sinusoid", count, runtime.generator(seed))):
        inputs, targets = task(runtime.generator(seed + 1 + index))
        basis = torch.cat([torch.sin(inputs), torch.cos(inputs)], dim=1).double()
        (a,), (b,) = torch.linalg.lstsq(basis, targets.double()).solution.tolist()
        rows.append({"task": index, "amplitude": math.hypot(a, b), "phase": math.atan2(b, a)})
    return pd.DataFrame(rows)


def sinusoid_checks(seeds: Sequence[int], count: int = 1000) -> pd.DataFrame:
    """Per seed, from :func:`sinusoid_fit`: the largest recovered amplitude, the share of phases
    in ``[0, pi]`` and the tasks' diversity (:func:`~nested_lab.optim.meta.task_diversity`)."""
    rows = []
    for seed in seeds:
        fit = sinusoid_fit(count, seed)
        rows.append({"seed": seed, "max_amplitude": fit["amplitude"].max(),
                     "min_amplitude": fit["amplitude"].min(),
                     "phase_in_range": float(fit["phase"].between(-1e-9, math.pi + 1e-9).mean()),
                     "diversity": meta.task_diversity(tasks("sinusoid", 100, runtime.generator(seed)))})
    return pd.DataFrame(rows)


def validation_arguments() -> int:
    """How many arguments of the replica's ``MetaLearner.meta_train`` could take held-out
    validation tasks (a name containing "val"): the original's takes none."""
    signature = inspect.signature(meta.MetaLearner.meta_train)
    return sum("val" in name for name in signature.parameters)


# --- section 4: the demo's noise ------------------------------------------------------------------

def demo_with_null(seeds: Sequence[int]) -> pd.DataFrame:
    """:func:`demo_statistics` with meta-learning on (as shipped) and off (the null), labelled in
    a ``meta_learning`` column."""
    return pd.concat([demo_statistics(seeds, update=update)
                      .assign(meta_learning="on (as shipped)" if update else "off (null)")
                      for update in (True, False)])


@dataclass(frozen=True)
class NullStatistics:
    """The null's improvement statistic: ``mean`` and ``sigma`` over seeds and iterations; the
    share of null seeds whose improvement rises from iteration 1 to 3 by at least the reported
    rise; and the mean ``|on - off|`` per seed and iteration, in units of ``sigma``."""

    mean: float
    sigma: float
    share_as_good: float
    on_off_shift: float


def null_statistics(demo: pd.DataFrame, reported: Sequence[float]) -> NullStatistics:
    """The :class:`NullStatistics` of :func:`demo_with_null`, against the ``reported`` values of
    iterations 1-3."""
    null = demo[demo["meta_learning"] == "off (null)"]
    per_seed = null.pivot(index="seed", columns="iteration", values="improvement")
    mean, sigma = float(null["improvement"].mean()), float(null["improvement"].std())
    share_as_good = float((per_seed[3] - per_seed[1] >= reported[-1] - reported[0]).mean())
    paired = demo.pivot_table(index=["seed", "iteration"], columns="meta_learning", values="improvement")
    shift = float((paired["on (as shipped)"] - paired["off (null)"]).abs().mean() / sigma)
    return NullStatistics(mean, sigma, share_as_good, shift)


# --- section 5: the continuum memory system's schedule ---------------------------------------------

# The replica's printout for chunk sizes (8, 32, 128): the steps it shows and the levels it calls due.
PRINTED_LINES = ((0, [0, 1, 2]), (1, []), (2, []), (3, []), (4, []), (8, [0]))


def printed_schedule(chunk_sizes: Sequence[int], steps: int) -> np.ndarray:
    """The replica's printed "due" schedule, ``step % C == 0``: a bool array ``[levels, steps]``
    with ``ceil(steps / C)`` due steps per level, step 0 due for all. Its trainer ignores it."""
    check_positive_ints(steps=steps)
    step = np.arange(steps)
    return np.stack([step % size == 0 for size in chunk_sizes])


def printed_lines_reproduced(chunk_sizes: Sequence[int], schedule: str = "printed") -> int:
    """How many of the replica's printed lines (:data:`PRINTED_LINES`) a schedule reproduces: the
    replica's printer (``"printed"``, :func:`printed_schedule`) or the correct one (``"correct"``,
    :func:`~nested_lab.memory.cms.update_schedule`), a check that the comparison can fail."""
    check_choice("schedule", schedule, ("printed", "correct"))
    printed = printed_schedule(chunk_sizes, 9) if schedule == "printed" else update_schedule(chunk_sizes, 9)
    return int(sum(list(np.flatnonzero(printed[:, step])) == due for step, due in PRINTED_LINES))


def count_changes(trainer: str, chunk_sizes: Sequence[int], steps: int, seed: int) -> ContinuumMemoryTrainer:
    """A residual CMS (width 8, hidden 32) trained with SGD (lr 0.01) for ``steps`` steps on random
    batches (target: the input reversed), initialisation and batches from one generator seeded with
    ``seed``; the trainer holds the measured changes."""
    generator = runtime.generator(seed)
    memory = ContinuumMemory(8, 32, chunk_sizes, residual=True, generator=generator)
    loop = ContinuumMemoryTrainer(memory, memory, torch.optim.SGD(memory.parameters(), lr=0.01), trainer)
    for _ in range(steps):
        inputs = torch.randn(16, 8, generator=generator)
        loop.step(F.mse_loss(memory(inputs), inputs.flip(-1)))
    return loop


def schedule_runs(chunk_sizes: Sequence[int], steps: int, seed: int) -> dict[str, ContinuumMemoryTrainer]:
    """:func:`count_changes` under each trainer."""
    return {trainer: count_changes(trainer, chunk_sizes, steps, seed) for trainer in TRAINERS}


def change_counts_table(runs: Mapping[str, ContinuumMemoryTrainer], steps: int) -> pd.DataFrame:
    """Per level: the chunk size, ``floor(N / C)`` and the changes measured under each trainer."""
    chunk_sizes = next(iter(runs.values())).chunk_sizes
    return pd.DataFrame({"chunk size": chunk_sizes, "floor(N / C)": [steps // c for c in chunk_sizes],
                         **{f"changes, {t} trainer": loop.change_counts for t, loop in runs.items()}})


def count_ratios(loop: ContinuumMemoryTrainer, steps: int) -> list[float]:
    """Per level: the measured changes over ``floor(N / C)``."""
    return [n / (steps // c) for n, c in zip(loop.change_counts, loop.chunk_sizes, strict=True)]


def largest_count_error(loop: ContinuumMemoryTrainer, steps: int) -> int:
    """The largest ``|changes - floor(N / C)|`` over levels."""
    return max(abs(n - steps // c) for n, c in zip(loop.change_counts, loop.chunk_sizes, strict=True))


def trainer_history(loop: ContinuumMemoryTrainer) -> pd.DataFrame:
    """One row per step and level of a trainer's run: ``step, level, chunk_size, changed, loss``."""
    changed = loop.changed_matrix()
    return pd.DataFrame([
        {"step": step, "level": level, "chunk_size": size, "changed": bool(changed[level, step]),
         "loss": loop.losses[step]}
        for step in range(loop.steps_done) for level, size in enumerate(loop.chunk_sizes)])


# --- section 5: online runs on the drifting stream ----------------------------------------------

INIT_SEED_OFFSET = 1_000_003  # the initialisation's generator is seeded with seed + this
FINAL_FRACTION = 0.1  # "final loss": the mean prequential loss over this last fraction of the steps

ARMS: dict[str, tuple[tuple[int, ...], str]] = {
    "CMS (1, 8, 32)": ((1, 8, 32), "correct"),
    "single-frequency (1, 1, 1)": ((1, 1, 1), "correct"),
    "CMS (1, 8, 32), original trainer": ((1, 8, 32), "original"),
}
CMS_ARM, SINGLE_ARM, ORIGINAL_ARM = ARMS


def run_stream(chunk_sizes: Sequence[int], seed: int, steps: int = 1500, *, dim: int = 8, hidden_dim: int = 32,
               batch_size: int = 16, lr: float = 0.05, residual: bool = True, trainer: str = "correct",
               modes: int = 3, switch_every: int = 50, noise: float = 0.1) -> pd.DataFrame:
    """One online run; one row per step: ``step, mode, loss`` (prequential) and ``returned`` (the
    step is the first of a fast mode seen before)."""
    check_range("lr", lr, 0)
    memory = ContinuumMemory(dim, hidden_dim, chunk_sizes, residual=residual,
                             generator=runtime.generator(seed + INIT_SEED_OFFSET))
    stream = drift_stream(steps, dim, runtime.generator(seed), batch_size=batch_size, modes=modes,
                          switch_every=switch_every, noise=noise)
    loop = ContinuumMemoryTrainer(memory, memory, torch.optim.SGD(memory.parameters(), lr=lr), trainer)
    rows, seen, previous = [], set(), None
    for step, (x, y, mode) in enumerate(stream):
        loss = loop.step(F.mse_loss(memory(x), y))
        rows.append({"step": step, "mode": mode, "loss": loss, "returned": mode != previous and mode in seen})
        seen.add(mode)
        previous = mode
    return pd.DataFrame(rows)


def summarize_run(run: pd.DataFrame) -> dict[str, float]:
    """Mean prequential loss, mean loss on return of a mode (NaN if none returned), final loss."""
    final = max(1, round(FINAL_FRACTION * len(run)))
    return {"prequential_loss": run["loss"].mean(),
            "return_loss": run.loc[run["returned"], "loss"].mean(),
            "final_loss": run["loss"].iloc[-final:].mean()}


def compare(seeds: Sequence[int] = (0, 1, 2), arms: Mapping[str, tuple[Sequence[int], str]] | None = None,
            show_progress: bool = True, **settings) -> pd.DataFrame:
    """Every arm (name -> (chunk sizes, trainer); default :data:`ARMS`) on every seed; one row per
    seed and arm: ``seed, arm, chunk_sizes, trainer, prequential_loss, return_loss, final_loss``.
    ``settings`` go to :func:`run_stream`."""
    arms = ARMS if arms is None else arms
    if not arms:
        raise ValueError("arms must name at least one (chunk sizes, trainer) pair")
    seeds = list(seeds)
    rows = []
    for seed in runtime.progress(seeds, desc="seeds", leave=False, disable=not show_progress):
        for name, (chunk_sizes, trainer) in arms.items():
            run = run_stream(chunk_sizes, seed, trainer=trainer, **settings)
            rows.append({"seed": seed, "arm": name, "chunk_sizes": tuple(chunk_sizes), "trainer": trainer,
                         **summarize_run(run)})
    return pd.DataFrame(rows)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of each measure, one row per arm (in the order given)."""
    measures = ["prequential_loss", "return_loss", "final_loss"]
    table = results.groupby("arm", sort=False)[measures].agg(["mean", "std"])
    table.columns = [f"{measure}_{stat}" for measure, stat in table.columns]
    return table.reset_index()



def arm_completes(results: pd.DataFrame, arm: str = ORIGINAL_ARM) -> list[float]:
    """Per seed: 1 if the arm's online run gave a finite prequential and final loss, else 0."""
    part = results[results["arm"] == arm]
    return [float(np.isfinite(row.prequential_loss) and np.isfinite(row.final_loss)) for row in part.itertuples()]


def gap_to_single(results: pd.DataFrame, measure: str, arm: str = CMS_ARM) -> pd.Series:
    """Per seed: ``measure`` of ``arm`` minus that of the single-frequency arm (same stream, same
    initial weights)."""
    paired = results.pivot(index="seed", columns="arm", values=measure)
    return paired[arm] - paired[SINGLE_ARM]


def relative_gap_to_single(results: pd.DataFrame, measure: str, arm: str) -> pd.Series:
    """Per seed: ``|measure of arm - that of single-frequency| / that of single-frequency``."""
    paired = results.pivot(index="seed", columns="arm", values=measure)
    return (paired[arm] - paired[SINGLE_ARM]).abs() / paired[SINGLE_ARM]


def gap_table(results: pd.DataFrame) -> pd.DataFrame:
    """Long table of :func:`gap_to_single` for both CMS arms and both measures, for plotting:
    ``seed, gap, measure, arm``."""
    return pd.concat([
        gap_to_single(results, measure, arm).rename("gap").reset_index().assign(measure=label, arm=arm)
        for measure, label in (("prequential_loss", "prequential (adaptation)"),
                               ("return_loss", "on a mode's return (forgetting)"))
        for arm in (CMS_ARM, ORIGINAL_ARM)])
