"""The learned-momentum optimizer (DMGD) and its two meta-gradients."""

import copy
import math

import pytest
import torch
from torch import nn

from nested_lab import runtime
from nested_lab.experiments import nested_optimizers as chapter
from nested_lab.optim import dmgd, meta

LR, BETA = 0.1, 0.9


def tiny_task(seed: int = 0, steps: int = 3, dtype: torch.dtype = torch.float32):
    generator = runtime.generator(seed)
    model = meta.mlp([4, 3, 1], generator).to(dtype)
    inputs = torch.randn(16, 4, generator=generator, dtype=dtype)
    targets = inputs @ torch.randn(4, 1, generator=generator, dtype=dtype)
    memory = dmgd.LearnedMomentum.for_model(model, hidden=8, generator=generator).to(dtype)
    params = {name: p.detach() for name, p in model.named_parameters()}
    task = dmgd.InnerTask(model, params, [(inputs, targets)] * steps, (inputs + 0.1, targets))
    return memory, task


def val_loss(memory, phi, task):
    final, _ = dmgd.unroll(memory, phi, task, LR, BETA)
    return float(task.loss(final, task.val_batch))


def test_memory_architecture_and_init():
    memory = dmgd.MomentumMemory(numel=10, generator=runtime.generator(0))
    first, norm, relu, last = memory.network
    assert (first.in_features, first.out_features, last.in_features, last.out_features) == (20, 64, 64, 10)
    assert isinstance(norm, nn.LayerNorm) and isinstance(relu, nn.ReLU)
    for layer in (first, last):
        bound = 0.01 * math.sqrt(6 / (layer.in_features + layer.out_features))  # Xavier-uniform, gain 0.01
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > bound / 2
        assert not layer.bias.any()


def test_step_is_momentum_plus_memory_output():
    memory, task = tiny_task()
    model = task.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = dmgd.NestedDeepMomentumGD(model.named_parameters(), memory=memory, lr=LR, momentum=BETA)
    for _ in range(2):
        optimizer.zero_grad()
        task.loss(dict(model.named_parameters()), task.train_batches[0]).backward()
        optimizer.step()
    expected, _ = dmgd.unroll(memory, dict(memory.named_parameters()), dmgd.InnerTask(
        model, before, task.train_batches[:2], task.val_batch), LR, BETA)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name].detach())


def test_original_meta_gradient_is_minus_one_over_lr_times_the_true_one():
    memory, task = tiny_task()
    original = dmgd.task_meta_gradient(memory, task, LR, BETA, rule="original")
    truncated = dmgd.task_meta_gradient(memory, task, LR, BETA, rule="unrolled", last_step_only=True)
    assert sum(float(g.abs().sum()) for g in truncated.values()) > 0
    for name in original:
        torch.testing.assert_close(-LR * original[name], truncated[name], atol=1e-6, rtol=1e-4)


def test_original_meta_step_climbs_the_loss_and_turns_the_output_against_the_gradient():
    memory, task = tiny_task()
    phi = {name: p.detach() for name, p in memory.named_parameters()}
    probe_batch = task.train_batches[0]
    alignment_before = dmgd.memory_alignment(memory, task.model, probe_batch)
    start = val_loss(memory, phi, task)
    for rule, climbs in (("original", True), ("unrolled", False)):
        gradient = dmgd.task_meta_gradient(memory, task, LR, BETA, rule=rule)
        moved = {name: phi[name] - 1e-3 * gradient[name] / _norm(gradient) for name in phi}
        assert (val_loss(memory, moved, task) > start) == climbs, rule
    optimizer = dmgd.NestedDeepMomentumGD(task.model.named_parameters(), memory=memory, lr=LR, momentum=BETA)
    for _ in range(20):
        optimizer.meta_step(task)
    assert dmgd.memory_alignment(memory, task.model, probe_batch) < alignment_before - 0.3


def _norm(gradient):
    return math.sqrt(sum(float((g ** 2).sum()) for g in gradient.values()))


def test_unrolled_meta_gradient_matches_finite_differences():
    memory, task = tiny_task(dtype=torch.float64)
    gradient = dmgd.task_meta_gradient(memory, task, LR, BETA, rule="unrolled")
    phi = {name: p.detach() for name, p in memory.named_parameters()}
    generator = runtime.generator(1)
    for _ in range(3):
        direction = {name: torch.randn(p.shape, generator=generator, dtype=torch.float64) for name, p in phi.items()}
        eps = 1e-6
        plus = val_loss(memory, {n: phi[n] + eps * direction[n] for n in phi}, task)
        minus = val_loss(memory, {n: phi[n] - eps * direction[n] for n in phi}, task)
        analytic = sum(float((gradient[n] * direction[n]).sum()) for n in phi)
        assert (plus - minus) / (2 * eps) == pytest.approx(analytic, rel=1e-5, abs=1e-9)


def test_truncated_unroll_differs_from_the_full_one():
    memory, task = tiny_task()
    full = dmgd.task_meta_gradient(memory, task, LR, BETA, rule="unrolled")
    last = dmgd.task_meta_gradient(memory, task, LR, BETA, rule="unrolled", last_step_only=True)
    assert any(not torch.allclose(full[n], last[n]) for n in full)


def test_commit_4f2b189_steps_like_the_rebuild_and_hands_the_memory_no_gradient():
    """Commit 4f2b189 writes its step into p.data: the inner loop is the same, but autograd finds
    no path from the validation loss to the memory, so a meta-step leaves it as it was."""
    memory, task = tiny_task()
    stepped = dmgd.detached_unroll(memory, task, LR, BETA)
    final, _ = dmgd.unroll(memory, dict(memory.named_parameters()), task, LR, BETA)
    for name, p in stepped.named_parameters():
        torch.testing.assert_close(p.detach(), final[name].detach())
        assert not torch.equal(p.detach(), task.params[name])
    gradient = dmgd.task_meta_gradient(memory, task, LR, BETA, rule="detached")
    assert all(not g.any() for g in gradient.values())
    before = [p.detach().clone() for p in memory.parameters()]
    optimizer = dmgd.NestedDeepMomentumGD(task.model.named_parameters(), memory=memory, lr=LR, momentum=BETA,
                                          meta_gradient="detached")
    for _ in range(3):
        optimizer.meta_step(task)
    assert all(torch.equal(p, b) for p, b in zip(memory.parameters(), before, strict=True))
    optimizer.meta_gradient = "original"
    optimizer.meta_step(task)
    assert any(not torch.equal(p, b) for p, b in zip(memory.parameters(), before, strict=True))


def test_memory_reads_the_momentum_and_starts_at_xavier_gain_001():
    assert chapter.momentum_sensitivity(0) == 1.0
    ratios = chapter.init_bound_ratios(0)
    assert len(ratios) == 4 and all(0.9 <= r <= 1.0 for r in ratios)
    assert all(r < 0.02 for r in chapter.init_bound_ratios(0, gain=1.0))  # another gain is far off


def test_meta_step_follows_its_own_gradient_and_climbs_the_true_meta_loss():
    directions = chapter.step_directions([0], 2)
    shipped = directions[directions["rule"] == "original"]
    assert (shipped["cos_own"] > 0).all() and (shipped["cos_true"] < 0).all()
    old = directions[directions["rule"] == "detached"]
    assert (old["update_norm"] == 0).all() and old["cos_own"].isna().all()


def test_bad_inputs():
    model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="unknown meta_gradient 'sign'; allowed: original, unrolled, detached"):
        dmgd.NestedDeepMomentumGD(model.named_parameters(), meta_gradient="sign")
    with pytest.raises(ValueError, match="lr must be finite and > 0"):
        dmgd.NestedDeepMomentumGD(model.named_parameters(), lr=0.0)
    with pytest.raises(ValueError, match=r"momentum must be finite and in \[0, 1\)"):
        dmgd.NestedDeepMomentumGD(model.named_parameters(), momentum=1.0)
    with pytest.raises(TypeError, match=r"\(name, parameter\) pairs"):
        dmgd.NestedDeepMomentumGD(model.parameters())
    other = dmgd.LearnedMomentum.for_model(nn.Linear(3, 2, bias=False))
    with pytest.raises(ValueError, match=r"no module for parameters \['bias'\]"):
        dmgd.NestedDeepMomentumGD(model.named_parameters(), memory=other)
    with pytest.raises(ValueError, match="numel must be >= 1"):
        dmgd.MomentumMemory(numel=0)
    with pytest.raises(ValueError, match="at least one parameter tensor"):
        dmgd.LearnedMomentum({})


def test_replica_keys_lose_the_memories_and_name_keys_keep_them():
    memory = dmgd.LearnedMomentum.for_model(chapter.model_fn("regression")(runtime.generator(0)),
                                            generator=runtime.generator(5))
    assert chapter.checkpoint_round_trip(memory, "regression", "parameter_id") == 0.0
    assert chapter.checkpoint_round_trip(memory, "regression", "name") == 1.0
    with pytest.raises(ValueError, match="unknown memory_keys 'index'; allowed: parameter_id, name"):
        dmgd.NestedDeepMomentumGD(nn.Linear(2, 1).named_parameters(), memory_keys="index")


def _train_steps(optimizer, model, batch, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(batch[0]), batch[1]).backward()
        optimizer.step()


def test_is_a_torch_optimizer_and_a_checkpoint_restores_it_exactly():
    """The torch.optim contract: param_groups, state, step(closure), and a state_dict that a fresh
    optimizer (other memory weights, fresh model) loads to continue exactly as the original."""
    memory, task = tiny_task()
    model, batch = task.model, task.train_batches[0]
    optimizer = dmgd.NestedDeepMomentumGD(model.named_parameters(), memory=memory, lr=LR, momentum=BETA,
                                          memory_keys="name")
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups[0]["lr"] == LR and optimizer.param_groups[0]["momentum"] == BETA
    _train_steps(optimizer, model, batch, 3)
    assert set(optimizer.state[next(model.parameters())]) == {"momentum"}
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})

    resumed_model = meta.mlp([4, 3, 1], runtime.generator(9))
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = dmgd.NestedDeepMomentumGD(resumed_model.named_parameters(), lr=1.0, momentum=0.5, hidden=8,
                                        memory_keys="name", generator=runtime.generator(7))
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.param_groups[0]["lr"] == LR and resumed.param_groups[0]["momentum"] == BETA
    for a, b in zip(memory.parameters(), resumed.memory.parameters(), strict=True):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(optimizer.state[p]["momentum"], resumed.state[q]["momentum"])
    _train_steps(optimizer, model, batch, 2)
    _train_steps(resumed, resumed_model, batch, 2)
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_step_with_a_closure_returns_its_loss():
    memory, task = tiny_task()
    model, (inputs, targets) = task.model, task.train_batches[0]
    optimizer = dmgd.NestedDeepMomentumGD(model.named_parameters(), memory=memory, lr=LR, momentum=BETA)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = optimizer.step(closure)
    assert loss is not None and loss.requires_grad
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
