"""Experiments on the learned DMGD optimizer: the replica's meta-gradient, the unrolled one, and
tuned hand-designed optimizers on held-out tasks.

Every task is solved from the same fresh model (seeded by the task's index) with each optimizer for
``steps`` steps on one training batch; the score is the loss on a fresh validation batch.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import pandas as pd
import torch
from torch import nn

from nested_lab import runtime
from nested_lab.optim import dmgd, meta
from nested_lab.parameters import check_positive_ints

OptimizerFactory = Callable[[nn.Module, float], torch.optim.Optimizer]
BASELINES: dict[str, OptimizerFactory] = {
    "SGD": lambda model, lr: torch.optim.SGD(model.parameters(), lr=lr),
    "SGD + momentum 0.9": lambda model, lr: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
    "Adam": lambda model, lr: torch.optim.Adam(model.parameters(), lr=lr),
}
MODEL_SIZES = {"regression": [10, 1], "sinusoid": [1, 40, 40, 1]}


def model_fn(family: str) -> Callable[[torch.Generator], nn.Sequential]:
    """The model of a task family: linear for regression, 1-40-40-1 ReLU MLP for sinusoids."""
    if family not in MODEL_SIZES:
        raise ValueError(f"unknown task family {family!r}; allowed: {', '.join(MODEL_SIZES)}")
    return functools.partial(meta.mlp, MODEL_SIZES[family])


def tasks(family: str, count: int, generator: torch.Generator, shared_weights_bug: bool = False) -> list[meta.Task]:
    if family == "regression":
        return meta.regression_tasks(count, generator, shared_weights_bug=shared_weights_bug)
    if family == "sinusoid":
        return meta.sinusoid_tasks(count, generator, shared_weights_bug=shared_weights_bug)
    raise ValueError(f"unknown task family {family!r}; allowed: {', '.join(MODEL_SIZES)}")


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
    Returns the curve (``iteration, alignment, pre, post, improvement``) and {iteration: the
    median over the new tasks of the losses :func:`solve` returns}."""
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
    bounds = [0, *sorted(checkpoints), iterations]
    for done, until in itertools.pairwise(bounds):
        part = learner.meta_train(distribution, until - done, probe=probe, show_progress=False)
        curves.append(part.assign(iteration=part["iteration"] + done))
        trajectories[until] = trajectory()
    return pd.concat(curves, ignore_index=True).rename(columns={"probe": "alignment"}), trajectories


def meta_train(family: str, seed: int, iterations: int, rule: str = "unrolled",
               aggregation: str = "meta_batch", lr: float = 0.1, meta_lr: float = 1e-3,
               shared_weights_bug: bool = False) -> tuple[dmgd.LearnedMomentum, pd.DataFrame]:
    """Meta-train a fresh memory on a task family; return it and its meta-training curve."""
    learner, distribution = _learner(family, seed, rule, aggregation, lr, meta_lr, shared_weights_bug)
    return learner.memory, learner.meta_train(distribution, iterations, show_progress=False)


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
