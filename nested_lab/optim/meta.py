"""Meta-training the DMGD memory on a task distribution (MAML-style, Finn et al. 2017).

For each task of a meta-batch: a fresh model, ``k`` DMGD steps on one training batch, then the
loss on a fresh validation batch (the meta-loss). The memory -- shared by all tasks -- descends

    ``"last_task_last_step"`` (the replica): the meta-gradient of the LAST task only, through its
        last inner step only (the replica kept one task's last memory outputs);
    ``"meta_batch"`` (correct): the mean of every task's meta-gradient, ``1/B sum_b grad_phi L_val^b``,

each clipped to norm 1 before an Adam step (as the replica). The meta-gradient *rule* (the replica's
wrong-sign surrogate or the unrolled gradient) is the separate option of :mod:`nested_lab.optim.dmgd`.

Task distributions: linear regression -- the replica's ``create_meta_learning_task_distribution``
(10 inputs, weights ~ N(0, I), noise level ~ U(0, 0.5), 32 samples) by default, its demo's
``create_regression_tasks`` (20 inputs, a bias ~ N(0, 1), noise level ~ U(0, 0.1)) with
``input_dim=20, bias=True, max_noise=0.1`` -- and MAML's sinusoids (amplitude ~ U(0.1, 5.1), phase
~ U(0, pi), x ~ U(-5, 5)). ``shared_weights_bug=True`` rebuilds the late-binding closure of
``create_meta_learning_task_distribution``: every task function reads the loop variables when it
is *called*, after the loop has ended, so all tasks share the last task's parameters. (The
replica's other two distributions bind their values correctly; the option is offered for every
family so that its effect can be measured on each.)
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from nested_lab import runtime
from nested_lab.init import uniform_linear
from nested_lab.optim import dmgd
from nested_lab.parameters import check_choice, check_positive_ints, check_range

AGGREGATIONS = ("last_task_last_step", "meta_batch")
Task = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
BATCH = 32  # samples per task batch, as the replica


def regression_tasks(count: int, generator: torch.Generator, input_dim: int = 10, bias: bool = False,
                     max_noise: float = 0.5, shared_weights_bug: bool = False) -> list[Task]:
    """``count`` linear-regression tasks ``y = x W + b + noise * eps`` (``b = 0`` unless ``bias``,
    noise level ~ U(0, ``max_noise``)); see the module docstring."""
    check_positive_ints(count=count, input_dim=input_dim)
    check_range("max_noise", max_noise, 0)
    tasks = []
    for _ in range(count):
        weights = torch.randn(input_dim, 1, generator=generator)
        offset = torch.randn(1, generator=generator) if bias else torch.zeros(1)
        noise = max_noise * float(torch.rand((), generator=generator))
        if shared_weights_bug:
            def task(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
                inputs = torch.randn(BATCH, input_dim, generator=g)
                return inputs, (inputs @ weights + offset  # noqa: B023 (the bug: late binding)
                                + noise * torch.randn(BATCH, 1, generator=g))  # noqa: B023
        else:
            task = functools.partial(_regression_batch, weights, offset, noise)
        tasks.append(task)
    return tasks


def sinusoid_tasks(count: int, generator: torch.Generator, shared_weights_bug: bool = False) -> list[Task]:
    """``count`` sinusoid tasks ``y = A sin(x + phase)``; see the module docstring."""
    check_positive_ints(count=count)
    tasks = []
    for _ in range(count):
        amplitude = 0.1 + 5.0 * float(torch.rand((), generator=generator))
        phase = math.pi * float(torch.rand((), generator=generator))
        if shared_weights_bug:
            def task(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
                inputs = 10 * torch.rand(BATCH, 1, generator=g) - 5
                return inputs, amplitude * torch.sin(inputs + phase)  # noqa: B023 (the bug)
        else:
            task = functools.partial(_sinusoid_batch, amplitude, phase)
        tasks.append(task)
    return tasks


def _regression_batch(weights: torch.Tensor, offset: torch.Tensor, noise: float,
                      g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.randn(BATCH, weights.shape[0], generator=g)
    return inputs, inputs @ weights + offset + noise * torch.randn(BATCH, 1, generator=g)


def _sinusoid_batch(amplitude: float, phase: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = 10 * torch.rand(BATCH, 1, generator=g) - 5
    return inputs, amplitude * torch.sin(inputs + phase)


def task_diversity(tasks: Sequence[Task], seed: int = 0) -> float:
    """Share of the targets' variance that is due to which task drew them: every task is sampled with
    the same random stream (so the same inputs), and ``mean_x var_tasks(y) / var(y)`` is returned --
    0 when all tasks are one function."""
    if len(tasks) < 2:
        raise ValueError(f"task_diversity needs at least 2 tasks, got {len(tasks)}")
    targets = torch.stack([task(runtime.generator(seed))[1] for task in tasks])
    return float(targets.var(dim=0, unbiased=False).mean() / targets.var(unbiased=False))


def mlp(sizes: Sequence[int], generator: torch.Generator) -> nn.Sequential:
    """Linear layers of the given widths with ReLUs between, initialised like ``nn.Linear``
    (uniform in +-1/sqrt(fan_in)) from ``generator``."""
    if len(sizes) < 2:
        raise ValueError(f"sizes must list at least an input and an output width, got {list(sizes)}")
    check_positive_ints(**{f"sizes[{i}]": size for i, size in enumerate(sizes)})
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [uniform_linear(fan_in, fan_out, generator), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class MetaLearner:
    """Meta-trains a shared :class:`~nested_lab.optim.dmgd.LearnedMomentum` on a task distribution.

    ``model_fn(generator)`` builds a fresh model per task; ``rule``: the DMGD meta-gradient
    (``"original"`` | ``"unrolled"`` | ``"detached"``, see :mod:`~nested_lab.optim.dmgd`);
    ``meta_gradient``: how tasks are combined, see the module docstring."""

    def __init__(self, model_fn: Callable[[torch.Generator], nn.Module], memory: dmgd.LearnedMomentum, *,
                 generator: torch.Generator, lr: float = 0.01, momentum: float = 0.9, inner_steps: int = 5,
                 meta_lr: float = 1e-3, rule: str = "original",
                 meta_gradient: str = "last_task_last_step") -> None:
        check_positive_ints(inner_steps=inner_steps)
        dmgd.check_hyperparameters(lr=lr, momentum=momentum, meta_lr=meta_lr)
        check_choice("meta_gradient", rule, dmgd.META_GRADIENTS)
        check_choice("meta_gradient", meta_gradient, AGGREGATIONS)
        self.model_fn, self.memory, self.generator = model_fn, memory, generator
        self.lr, self.momentum, self.inner_steps = lr, momentum, inner_steps
        self.rule, self.aggregation = rule, meta_gradient
        self.meta_optimizer = torch.optim.Adam(memory.parameters(), lr=meta_lr)

    def inner_task(self, task: Task) -> dmgd.InnerTask:
        """A fresh model and the task's batches: one training batch reused for every inner step
        (as the replica) and a fresh validation batch."""
        model = self.model_fn(self.generator)
        params = {name: p.detach() for name, p in model.named_parameters()}
        train = task(self.generator)
        return dmgd.InnerTask(model, params, [train] * self.inner_steps, task(self.generator))

    def meta_gradient(self, inner_tasks: Sequence[dmgd.InnerTask]) -> dmgd.Params:
        """The meta-gradient of a meta-batch under this learner's aggregation."""
        if not inner_tasks:
            raise ValueError("a meta-batch needs at least one task")
        if self.aggregation == "last_task_last_step":
            return self._task_gradient(inner_tasks[-1], last_step_only=True)
        gradients = [self._task_gradient(task, last_step_only=False) for task in inner_tasks]
        return {name: torch.stack([g[name] for g in gradients]).mean(0) for name in gradients[0]}

    def _task_gradient(self, task: dmgd.InnerTask, last_step_only: bool) -> dmgd.Params:
        return dmgd.task_meta_gradient(self.memory, task, self.lr, self.momentum, self.rule, last_step_only)

    def adapted_loss(self, task: dmgd.InnerTask) -> tuple[float, float]:
        """(loss on the training batch before adaptation, validation loss after the inner steps)."""
        memory_params = {name: p.detach() for name, p in self.memory.named_parameters()}
        with torch.no_grad():
            final, _ = dmgd.unroll(self.memory, memory_params, task, self.lr, self.momentum)
            return float(task.loss(task.params, task.train_batches[0])), float(task.loss(final, task.val_batch))

    def meta_train_step(self, tasks: Sequence[Task], update: bool = True) -> dict[str, float]:
        """One meta-step on a meta-batch; returns the replica's statistics: mean pre-adaptation
        loss, mean post-adaptation loss and their difference ("improvement"). ``update=False``
        computes the statistics and leaves the memory as it is (a null for them)."""
        inner_tasks = [self.inner_task(task) for task in tasks]
        losses = torch.tensor([self.adapted_loss(task) for task in inner_tasks])
        if update:
            dmgd.apply_meta_gradient(self.memory, self.meta_optimizer, self.meta_gradient(inner_tasks))
        pre, post = losses.mean(0).tolist()
        return {"pre": pre, "post": post, "improvement": pre - post}

    def meta_train(self, distribution: Sequence[Task], iterations: int, meta_batch_size: int = 4,
                   probe: Callable[[], float] | None = None,
                   show_progress: bool = True) -> list[dict[str, float]]:
        """``iterations`` meta-steps, each on ``meta_batch_size`` tasks drawn with replacement; one
        row per step: ``iteration`` and the statistics of :meth:`meta_train_step`, and ``probe()``
        if given, recorded after the step (e.g. the memory-gradient alignment)."""
        check_positive_ints(iterations=iterations, meta_batch_size=meta_batch_size)
        if not distribution:
            raise ValueError("the task distribution is empty")
        rows = []
        steps = range(iterations)
        for iteration in runtime.progress(steps, desc="meta-training", leave=False) if show_progress else steps:
            picks = torch.randint(len(distribution), (meta_batch_size,), generator=self.generator).tolist()
            row = {"iteration": iteration + 1, **self.meta_train_step([distribution[i] for i in picks])}
            if probe is not None:
                row["probe"] = probe()
            rows.append(row)
        return rows
