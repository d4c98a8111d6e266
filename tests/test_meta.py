"""The MAML-style meta-learner, its task distributions and the closure bug."""

import functools

import pytest
import torch

from nested_lab import runtime
from nested_lab.optim import dmgd, meta


def learner(aggregation: str, rule: str = "unrolled", seed: int = 0) -> meta.MetaLearner:
    generator = runtime.generator(seed)
    build = functools.partial(meta.mlp, [10, 1])
    memory = dmgd.LearnedMomentum.for_model(build(generator), hidden=16, generator=generator)
    return meta.MetaLearner(build, memory, generator=generator, lr=0.05, inner_steps=3, rule=rule,
                            meta_gradient=aggregation)


@pytest.mark.parametrize("rule", ["original", "unrolled"])
def test_meta_batch_gradient_is_the_mean_of_the_task_gradients(rule):
    ml = learner("meta_batch", rule)
    inner = [ml.inner_task(task) for task in meta.regression_tasks(3, runtime.generator(1))]
    per_task = [dmgd.task_meta_gradient(ml.memory, t, ml.lr, ml.momentum, rule) for t in inner]
    combined = ml.meta_gradient(inner)
    last_layer = "memories.0__weight.network.3.weight"
    assert not torch.allclose(per_task[0][last_layer], per_task[1][last_layer])
    for name, value in combined.items():
        torch.testing.assert_close(value, sum(g[name] for g in per_task) / 3)


def test_last_task_last_step_uses_only_the_last_task_through_its_last_step():
    ml = learner("last_task_last_step")
    inner = [ml.inner_task(task) for task in meta.regression_tasks(3, runtime.generator(1))]
    expected = dmgd.task_meta_gradient(ml.memory, inner[-1], ml.lr, ml.momentum, "unrolled", last_step_only=True)
    for name, value in ml.meta_gradient(inner).items():
        torch.testing.assert_close(value, expected[name])


@pytest.mark.parametrize("family", [meta.regression_tasks, meta.sinusoid_tasks])
def test_closure_bug_makes_every_task_the_last_one(family):
    buggy = family(5, runtime.generator(0), shared_weights_bug=True)
    fixed = family(5, runtime.generator(0))
    outputs = [task(runtime.generator(3))[1] for task in buggy]
    assert all(torch.equal(outputs[0], y) for y in outputs)
    torch.testing.assert_close(outputs[0], fixed[-1](runtime.generator(3))[1])
    assert meta.task_diversity(buggy) == 0.0
    assert meta.task_diversity(fixed) > 0.3


def test_meta_training_is_deterministic_and_reports_the_replica_statistics():
    runs = []
    for _ in range(2):
        ml = learner("meta_batch")
        runs.append(ml.meta_train(meta.regression_tasks(10, runtime.generator(2)), iterations=3,
                                  meta_batch_size=2, show_progress=False))
    assert [list(row) for row in runs[0]] == [["iteration", "pre", "post", "improvement"]] * 3
    assert runs[0] == runs[1]
    assert all(row["improvement"] == row["pre"] - row["post"] for row in runs[0])


def test_meta_training_takes_no_validation_tasks_and_validates_on_a_fresh_batch_of_each_task():
    from nested_lab.experiments import nested_optimizers as chapter

    assert chapter.validation_arguments() == 0
    ml = learner("meta_batch")
    inner = ml.inner_task(meta.regression_tasks(1, runtime.generator(1))[0])
    (train_x, _), (val_x, _) = inner.train_batches[0], inner.val_batch
    assert not torch.equal(train_x, val_x)


def test_sinusoid_fit_recovers_amplitude_and_phase():
    from nested_lab.experiments import nested_optimizers as chapter

    fit = chapter.sinusoid_fit(20, seed=3)
    generator = runtime.generator(3)
    for row in fit.itertuples():
        amplitude = 0.1 + 5.0 * float(torch.rand((), generator=generator))
        phase = torch.pi * float(torch.rand((), generator=generator))
        assert row.amplitude == pytest.approx(amplitude, rel=1e-4)
        assert row.phase == pytest.approx(phase, abs=1e-4)
    checks = chapter.sinusoid_checks([0], count=200)
    assert 4.9 < checks["max_amplitude"].iloc[0] <= 5.1 and checks["phase_in_range"].iloc[0] == 1.0


def test_mlp_is_seeded_by_its_generator():
    first, second = (meta.mlp([3, 5, 1], runtime.generator(4)) for _ in range(2))
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [type(layer).__name__ for layer in first] == ["Linear", "ReLU", "Linear"]


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown meta_gradient 'all'; allowed: last_task_last_step, meta_batch"):
        learner("all")
    with pytest.raises(ValueError, match="unknown meta_gradient 'sign'"):
        learner("meta_batch", rule="sign")
    ml = learner("meta_batch")
    with pytest.raises(ValueError, match="at least one task"):
        ml.meta_gradient([])
    with pytest.raises(ValueError, match="task distribution is empty"):
        ml.meta_train([], iterations=1)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        ml.meta_train(meta.regression_tasks(2, runtime.generator(0)), iterations=0)
    with pytest.raises(ValueError, match="count must be >= 1"):
        meta.regression_tasks(0, runtime.generator(0))
    with pytest.raises(ValueError, match="at least 2 tasks"):
        meta.task_diversity(meta.sinusoid_tasks(1, runtime.generator(0)))
    with pytest.raises(ValueError, match="at least an input and an output width"):
        meta.mlp([3], runtime.generator(0))
    with pytest.raises(TypeError, match=r"sizes\[1\] must be an int"):
        meta.mlp([3, 2.5], runtime.generator(0))
