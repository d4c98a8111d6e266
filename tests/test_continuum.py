"""ContinuumOptimizer replica: saturation, meta-losses, unrolled meta-gradient, hypergradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nested_lab import runtime
from nested_lab.data.corpus import CharCorpus
from nested_lab.models.char_mlp import CharMLP
from nested_lab.optim import ContinuumConfig, ContinuumOptimizer, LRController, UnrollProblem
from nested_lab.optim.controller import group_stats, multiplier, scale_inputs
from nested_lab.optim.meta_losses import ProxyMetaLoss
from nested_lab.optim.saturation import controller_saturation
from nested_lab.optim.unrolled import AdamWHyper, unrolled_meta_gradient, unrolled_validation_loss


def _regression(seed: int, dtype=torch.float64):
    gen = runtime.generator(seed)
    model = nn.Linear(4, 1).to(dtype)
    x = torch.randn(64, 4, generator=gen, dtype=dtype)
    y = x @ torch.randn(4, 1, generator=gen, dtype=dtype) + 0.1
    batches = [(x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16]) for i in range(3)]
    problem = UnrollProblem(model, F.mse_loss, lambda k: batches[:k], lambda: (x[48:], y[48:]))
    return model, problem, x, y


def test_saturation_grows_with_the_input_scale():
    result = controller_saturation([1.0, 10.0, 1000.0], seeds=list(range(8)), steps=10)
    floor, ceiling = result.pinned()
    pinned = (floor + ceiling).tolist()
    assert pinned[0] == 0.0 and pinned[-1] == 1.0
    assert pinned == sorted(pinned)
    assert result.first_raw.abs().mean(dim=1).tolist() == sorted(result.first_raw.abs().mean(dim=1).tolist())


def test_log1p_scaling_prevents_saturation():
    result = controller_saturation([1000.0], seeds=list(range(8)), steps=10, input_scaling="log1p")
    floor, ceiling = result.pinned()
    assert floor.item() == 0.0 and ceiling.item() == 0.0


def test_controller_is_positively_homogeneous():
    controller = LRController(runtime.generator(0))
    stats = torch.tensor([[2.0, 5.0, 0.6]])
    assert torch.allclose(controller(stats * 7), 7 * controller(stats), rtol=1e-5)


def test_proxy_loss_gradient_is_exactly_zero_when_improving():
    proxy = ProxyMetaLoss(window=100, threshold=1e-3, warmup=10)
    m = torch.tensor([0.7, 1.3], requires_grad=True)
    for i in range(10):
        proxy.record(5.0 - i, m)  # recorded before the loss, as in the original
    loss = proxy(m)
    loss.backward()
    assert proxy.last_branch == "improving"
    assert loss.item() == 0.0 and torch.equal(m.grad, torch.zeros(2))


def test_proxy_stagnating_branch_is_minimised_near_one():
    proxy = ProxyMetaLoss(warmup=2)
    grid = torch.linspace(0.5, 1.5, 1001)
    for _ in range(3):
        proxy.record(1.0, torch.tensor([1.0]))
    values = torch.stack([proxy(v.reshape(1)) for v in grid])
    assert proxy.last_branch == "stagnating"
    assert abs(abs(grid[values.argmin()].item() - 1) - 0.05) < 2e-3


def test_regularization_gradient_points_toward_one():
    for value in (0.1, 0.5, 1.5, 2.0):
        m = torch.tensor([value], requires_grad=True)
        ((m - 1) ** 2).mean().backward()
        assert torch.sign(-m.grad).item() == torch.sign(torch.tensor(1 - value)).item()


def test_unrolled_meta_gradient_matches_finite_differences():
    model, problem, _, _ = _regression(0)
    controller = LRController(runtime.generator(1)).double()
    stats = torch.tensor([[0.5, 1.0, 0.6]], dtype=torch.float64)
    group_of = {name: 0 for name, _ in model.named_parameters()}
    state = {name: (torch.zeros_like(p), torch.zeros_like(p), 0) for name, p in model.named_parameters()}
    hyper = AdamWHyper((0.9, 0.999), 1e-8, 0.01)
    args = (0.05, (0.1, 2.0), hyper)
    grads, _ = unrolled_meta_gradient(controller, stats, problem, state, group_of, *args, k=3)
    params = {n: p.detach() for n, p in model.named_parameters()}
    base = {n: p.detach() for n, p in controller.named_parameters()}
    direction = {n: torch.randn(p.shape, generator=runtime.generator(2), dtype=p.dtype) for n, p in base.items()}
    h = 1e-6

    def meta(scale: float) -> float:
        shifted = {n: base[n] + scale * direction[n] for n in base}
        return unrolled_validation_loss(shifted, controller, stats, problem, params, state, group_of, *args,
                                        problem.train_batches(3), problem.val_batch()).item()

    numeric = (meta(h) - meta(-h)) / (2 * h)
    analytic = sum((grads[n] * direction[n]).sum() for n in base).item()
    assert analytic != 0.0
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-10)


def test_unrolled_optimizer_trains_the_controller():
    model, problem, x, y = _regression(3, dtype=torch.float32)
    config = ContinuumConfig(meta_loss="unrolled", update_freq=2, unroll_steps=2, lr=0.05)
    opt = ContinuumOptimizer([{"params": model.parameters()}], config, runtime.generator(0), problem)
    for _ in range(4):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step(loss.item())
    assert len(opt.trace.meta_grad_norm) == 2 and all(n > 0 for n in opt.trace.meta_grad_norm)


def test_hypergradient_update_matches_its_formula():
    model, _, x, y = _regression(4, dtype=torch.float32)
    config = ContinuumConfig(meta_loss="hypergradient", hypergradient_lr=0.5, lr=0.01)
    opt = ContinuumOptimizer([{"params": model.parameters()}], config, runtime.generator(0))
    for step in range(3):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step == 2:
            state = [opt.base.state[p] for p in model.parameters()]
            u = [s["exp_avg"] / (1 - 0.9 ** s["step"]) / ((s["exp_avg_sq"] / (1 - 0.999 ** s["step"])).sqrt()
                                                          + 1e-8) for s in state]
            h = sum((p.grad * d).sum() for p, d in zip(model.parameters(), u, strict=True))
            expected = (opt.current[0] + 0.5 * h).clamp(0.1, 2.0)
        opt.step(loss.item())
    assert opt.current[0].item() == pytest.approx(expected.item(), rel=1e-6)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * expected.item(), rel=1e-6)


def _train_charmlp(config: ContinuumConfig, seed: int, steps: int, weight_scale: float = 1.0):
    gen = runtime.generator(seed)
    text = "the quick brown fox jumps over the lazy dog. " * 40
    corpus = CharCorpus.from_text(text)
    model = CharMLP(corpus.vocab_size, context=4, embed=8, hidden=32, generator=gen)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(weight_scale)
    opt = ContinuumOptimizer(model.param_groups(), config, runtime.generator(seed + 1))
    for _ in range(steps):
        inputs, targets = corpus.batch("train", 16, 4, gen)
        loss = F.cross_entropy(model(inputs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step(loss.item())
    return opt


def test_multiplier_is_one_until_the_first_controller_call_then_pins():
    opt = _train_charmlp(ContinuumConfig.original(update_freq=10), seed=0, steps=30, weight_scale=30.0)
    trajectory = torch.tensor(opt.trace.multipliers)
    assert torch.equal(trajectory[:9], torch.ones(9, 2))
    assert opt.trace.update_steps == [10, 20, 30]
    at_bounds = ((trajectory[9:] - 0.1).abs() < 0.02) | ((trajectory[9:] - 2.0).abs() < 0.02)
    assert at_bounds.all()


def test_same_seed_same_trajectory():
    config = ContinuumConfig.shipped_fix(update_freq=5)
    a = _train_charmlp(config, seed=1, steps=20).trace
    b = _train_charmlp(config, seed=1, steps=20).trace
    assert a.multipliers == b.multipliers and a.raw == b.raw


def test_deep_nested_variant_applies_the_controller_every_step():
    opt = _train_charmlp(ContinuumConfig.original(variant="deep_nested", meta_update_freq=5), seed=2, steps=10)
    assert opt.trace.update_steps == [5, 10]
    assert torch.tensor(opt.trace.multipliers[0]).ne(1.0).all()


def test_group_stats_sum_the_norms():
    a, b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.full((9,), 2.0))
    a.grad, b.grad = torch.full((4,), 0.5), None
    stats = group_stats([{"params": [a, b], "depth": 0.25}])
    assert stats.tolist() == [[1.0, 8.0, 0.25]]


@pytest.mark.parametrize("changes, message", [
    ({"min_lr_mult": 2.0, "max_lr_mult": 2.0}, "min_lr_mult < max_lr_mult"),
    ({"update_freq": 0}, "update_freq must be >= 1"),
    ({"unroll_steps": 0}, "unroll_steps must be >= 1"),
    ({"input_scaling": "sqrt"}, "allowed: raw, log1p"),
    ({"meta_loss": "magic"}, "allowed: regularization, proxy, unrolled, hypergradient"),
    ({"variant": "deeper"}, "allowed: continuum, deep_nested"),
    ({"controller_lr": 0.0}, "controller_lr must be > 0"),
    ({"betas": (0.9, 1.0)}, "betas in"),
])
def test_invalid_settings_raise(changes, message):
    with pytest.raises(ValueError, match=message):
        ContinuumConfig(**changes)


@pytest.mark.parametrize("changes", [{"meta_update_freq": True}, {"update_freq": 2.0}, {"proxy_window": "8"}])
def test_non_int_counts_raise_type_error(changes):
    with pytest.raises(TypeError, match=f"{next(iter(changes))} must be an int"):
        ContinuumConfig(**changes)


def test_bad_inputs_raise():
    param = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="unknown ContinuumConfig field"):
        ContinuumConfig().with_(update_frequency=3)
    with pytest.raises(ValueError, match="needs problem"):
        ContinuumOptimizer([{"params": [param]}], ContinuumConfig(meta_loss="unrolled"))
    with pytest.raises(TypeError, match="ContinuumConfig"):
        ContinuumOptimizer([{"params": [param]}], {"lr": 1e-3})
    with pytest.raises(ValueError, match="non-empty list"):
        ContinuumOptimizer([], ContinuumConfig())
    opt = ContinuumOptimizer([{"params": [param]}])
    with pytest.raises(ValueError, match="finite float"):
        opt.step(float("nan"))
    with pytest.raises(ValueError, match="finite float"):
        opt.step(float("inf"))
    with pytest.raises(ValueError, match=r"shape \[groups, 3\]"):
        LRController()(torch.ones(2, 4))
    with pytest.raises(ValueError, match="allowed"):
        scale_inputs(torch.ones(1, 3), "cube")
    with pytest.raises(ValueError, match="window"):
        ProxyMetaLoss(window=5, warmup=10)
    with pytest.raises(ValueError, match="split"):
        CharCorpus.from_text("abcdefghij" * 10).batch("test", 2, 3, runtime.generator(0))
    with pytest.raises(ValueError, match="shape"):
        CharMLP(10, context=4)(torch.zeros(2, 3, dtype=torch.long))
    assert multiplier(torch.tensor([0.0]), 0.1, 2.0).item() == pytest.approx(1.05)
