"""ContinuumOptimizer replica: saturation, meta-losses, unrolled meta-gradient, hypergradient;
the torch.optim contract (closure, schedulers, checkpoints)."""

from __future__ import annotations

import io
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nested_lab import runtime
from nested_lab.data.corpus import CharCorpus
from nested_lab.experiments import meta_loss_collapse as experiment
from nested_lab.experiments.meta_loss_collapse import controller_saturation
from nested_lab.models.char_mlp import CharMLP
from nested_lab.optim import ContinuumConfig, ContinuumOptimizer, LRController, UnrollProblem
from nested_lab.optim.continuum import ControllerTrace
from nested_lab.optim.controller import group_stats, multiplier, scale_inputs
from nested_lab.optim.meta_losses import ProxyMetaLoss
from nested_lab.optim.unrolled import (
    AdamWHyper,
    swapped_unrolled_loss,
    unrolled_meta_gradient,
    unrolled_validation_loss,
)


def _regression(seed: int, dtype=torch.float64):
    gen = runtime.generator(seed)
    model = nn.Linear(4, 1).to(dtype)
    x = torch.randn(64, 4, generator=gen, dtype=dtype)
    y = x @ torch.randn(4, 1, generator=gen, dtype=dtype) + 0.1
    batches = [(x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16]) for i in range(3)]
    problem = UnrollProblem(model, F.mse_loss, lambda k: batches[:k], lambda: (x[48:], y[48:]))
    return model, problem, x, y


def _mse_closure(model: nn.Module, opt: torch.optim.Optimizer, batch) -> torch.Tensor:
    opt.zero_grad()
    loss = F.mse_loss(model(batch[0]), batch[1])
    loss.backward()
    return loss


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
    args = ([0.05], (0.1, 2.0), hyper)
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
        opt.step(partial(_mse_closure, model, opt, (x, y)))
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
            state = [opt.state[p] for p in model.parameters()]
            u = [s["exp_avg"] / (1 - 0.9 ** s["step"]) / ((s["exp_avg_sq"] / (1 - 0.999 ** s["step"])).sqrt()
                                                          + 1e-8) for s in state]
            h = sum((p.grad * d).sum() for p, d in zip(model.parameters(), u, strict=True))
            expected = (opt.multipliers[0] + 0.5 * h).clamp(0.1, 2.0)
        opt.step(loss=loss.item())
    assert opt.multipliers[0].item() == pytest.approx(expected.item(), rel=1e-6)
    assert opt.param_groups[0]["multiplier"] == pytest.approx(expected.item(), rel=1e-6)
    assert opt.param_groups[0]["lr"] == 0.01  # the base rate; AdamW steps at lr * multiplier


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
        opt.step(loss=loss.item())
    return opt


def test_multiplier_is_one_until_the_first_controller_call_then_pins():
    opt = _train_charmlp(ContinuumConfig.original(update_freq=10), seed=0, steps=30, weight_scale=30.0)
    trajectory = torch.tensor(opt.trace.multipliers)
    assert torch.equal(trajectory[:9], torch.ones(9, 2))
    assert opt.trace.update_steps == [10, 20, 30]
    at_bounds = ((trajectory[9:] - 0.1).abs() < 0.02) | ((trajectory[9:] - 2.0).abs() < 0.02)
    assert at_bounds.all()


@pytest.mark.parametrize("update_freq", [3, 7, 50])
def test_the_phase_change_follows_update_freq(update_freq):
    """Backs ``metaloss.step-10-is-update-freq``: the first multiplier != 1 is at step ``update_freq``."""
    opt = _train_charmlp(ContinuumConfig.original(update_freq=update_freq), seed=0, steps=update_freq + 2,
                         weight_scale=30.0)
    trajectory = torch.tensor(opt.trace.multipliers)
    assert torch.equal(trajectory[:update_freq - 1], torch.ones(update_freq - 1, 2))
    assert trajectory[update_freq - 1].ne(1.0).all()


def test_the_proxy_warm_up_counts_controller_calls():
    """Backs ``metaloss.first-10-steps-regularization``: 10 records are 10 controller calls, not 10 steps."""
    opt = _train_charmlp(ContinuumConfig.shipped_fix(update_freq=5), seed=0, steps=60)
    branches = dict(zip(opt.trace.update_steps, opt.trace.meta_branch, strict=True))
    assert [step for step, branch in branches.items() if branch == "warmup"] == list(range(5, 50, 5))
    assert branches[50] != "warmup"


def test_the_shipped_fix_rescales_the_inputs():
    """Backs ``metaloss.fix-changed-the-inputs``: the fix commit feeds log1p(norm) / 10, the original raw norms."""
    stats = torch.tensor([[3.0, 1000.0, 0.6]])
    assert ContinuumConfig.original().input_scaling == "raw"
    assert torch.equal(scale_inputs(stats, ContinuumConfig.original().input_scaling), stats)
    fixed = scale_inputs(stats, ContinuumConfig.shipped_fix().input_scaling)
    assert fixed[0, 1].item() == pytest.approx(math.log1p(1000.0) / 10)
    assert fixed[0, 0].item() == pytest.approx(math.log1p(3.0) / 10) and fixed[0, 2].item() == pytest.approx(0.6)


def test_the_original_unrolled_trainer_gives_the_controller_no_gradient():
    """Backs ``metaloss.original-unrolled-gives-no-gradient`` (``unroll_impl="original"``)."""
    model = _two_group_model(0)
    problem = UnrollProblem(model, F.mse_loss, lambda k: _BATCHES[:k], lambda: _BATCHES[-1])
    controller = LRController(runtime.generator(1))
    before = [p.detach().clone() for p in model.parameters()]
    loss = swapped_unrolled_loss(controller, problem, base_lr=0.1, k=3)
    assert all(g is None for g in torch.autograd.grad(loss, list(controller.parameters()), allow_unused=True))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert loss.item() == pytest.approx(F.mse_loss(model(_BATCHES[-1][0]), _BATCHES[-1][1]).item())
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()  # the in-place restore invalidated the saved parameters

    config = ContinuumConfig.shipped_fix(meta_loss="unrolled", unroll_impl="original", update_freq=2,
                                         unroll_steps=2)
    opt = _optimizer(_two_group_model(0), config, controller_seed=1)
    weights = [p.detach().clone() for p in opt.controller.parameters()]
    _train(opt.problem.model, opt, range(6))
    assert opt.trace.meta_grad_norm == [0.0, 0.0, 0.0]
    assert all(torch.equal(a, b) for a, b in zip(weights, opt.controller.parameters(), strict=True))
    functional = _optimizer(_two_group_model(0), config.with_(unroll_impl="functional"), controller_seed=1)
    _train(functional.problem.model, functional, range(6))
    assert all(n > 0 for n in functional.trace.meta_grad_norm)


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
    ({"min_lr_mult": 2.0, "max_lr_mult": 2.0}, r"max_lr_mult must be finite and > 2\.0"),
    ({"update_freq": 0}, "update_freq must be >= 1"),
    ({"unroll_steps": 0}, "unroll_steps must be >= 1"),
    ({"input_scaling": "sqrt"}, "allowed: raw, log1p"),
    ({"meta_loss": "magic"}, "allowed: regularization, proxy, unrolled, hypergradient"),
    ({"variant": "deeper"}, "allowed: continuum, deep_nested"),
    ({"unroll_impl": "data"}, "allowed: functional, original"),
    ({"controller_lr": 0.0}, "controller_lr must be finite and > 0"),
    ({"betas": (0.9, 1.0)}, r"betas\[1\] must be finite and in \[0, 1\)"),
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
    with pytest.raises(ValueError, match="empty parameter list"):
        ContinuumOptimizer([], ContinuumConfig())
    with pytest.raises(ValueError, match="proxy' needs the training loss"):
        ContinuumOptimizer([param], ContinuumConfig.shipped_fix(update_freq=1)).step()
    with pytest.raises(ValueError, match="allowed"):
        scale_inputs(torch.ones(1, 3), "cube")
    with pytest.raises(ValueError, match="window"):
        ProxyMetaLoss(window=5, warmup=10)
    with pytest.raises(ValueError, match="split"):
        CharCorpus.from_text("abcdefghij" * 10).batch("test", 2, 3, runtime.generator(0))
    assert multiplier(torch.tensor([0.0]), 0.1, 2.0).item() == pytest.approx(1.05)


# ----- the torch.optim contract ------------------------------------------------------------------


def _two_group_model(seed: int) -> nn.Module:
    gen = runtime.generator(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(3 * torch.randn(p.shape, generator=gen))
    return model


def _groups(model: nn.Module) -> list[dict]:
    return [{"name": "core", "params": list(model[0].parameters()), "depth": 0.6},
            {"name": "memory", "params": list(model[2].parameters()), "depth": 0.3}]


_X = torch.randn(96, 4, generator=runtime.generator(7))
_BATCHES = [(_X[i::6], _X[i::6].sum(dim=1, keepdim=True).sin()) for i in range(6)]


def _optimizer(model: nn.Module, config: ContinuumConfig, controller_seed: int) -> ContinuumOptimizer:
    problem = UnrollProblem(model, F.mse_loss, lambda k: _BATCHES[:k], lambda: _BATCHES[-1])
    return ContinuumOptimizer(_groups(model), config, runtime.generator(controller_seed), problem)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, scheduler=None) -> None:
    for t in steps:
        opt.step(partial(_mse_closure, model, opt, _BATCHES[t % len(_BATCHES)]))
        if scheduler is not None:
            scheduler.step()


CHECKPOINT_CONFIGS = {
    "original": ContinuumConfig.original(update_freq=3, lr=1e-2),
    "shipped fix": ContinuumConfig.shipped_fix(update_freq=2, proxy_warmup=2, lr=1e-2),
    "deep nested": ContinuumConfig.original(variant="deep_nested", meta_loss="proxy", meta_update_freq=3,
                                            proxy_warmup=2),
    "unrolled": ContinuumConfig.shipped_fix(meta_loss="unrolled", update_freq=3, unroll_steps=2),
    "hypergradient": ContinuumConfig(meta_loss="hypergradient", hypergradient_lr=0.5, lr=1e-2),
}


@pytest.mark.parametrize("name", list(CHECKPOINT_CONFIGS))
def test_a_checkpoint_restores_training_exactly(name):
    config = CHECKPOINT_CONFIGS[name]
    model, opt = _two_group_model(0), None
    opt = _optimizer(model, config, controller_seed=1)
    _train(model, opt, range(14))

    half = _two_group_model(0)
    half_opt = _optimizer(half, config, controller_seed=1)
    _train(half, half_opt, range(7))
    buffer = io.BytesIO()
    torch.save({"model": half.state_dict(), "optimizer": half_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = _two_group_model(99)  # fresh weights and a fresh controller, all overwritten by the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = _optimizer(resumed, config, controller_seed=123)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    _train(resumed, resumed_opt, range(7, 14))

    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(opt.controller.parameters(), resumed_opt.controller.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(opt.multipliers, resumed_opt.multipliers) and opt.steps == resumed_opt.steps == 14
    assert opt.trace.multipliers[7:] == resumed_opt.trace.multipliers
    assert opt.trace.multipliers[-1] != [1.0, 1.0]


def test_a_scheduler_sets_the_base_rate_the_multiplier_scales():
    config = ContinuumConfig.original(update_freq=2, lr=1e-2)
    scheduled, plain = _two_group_model(0), _two_group_model(0)
    scheduled_opt = _optimizer(scheduled, config, controller_seed=1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(scheduled_opt, lambda epoch: 0.5)
    assert [g["lr"] for g in scheduled_opt.param_groups] == [5e-3, 5e-3]
    plain_opt = _optimizer(plain, config.with_(lr=5e-3), controller_seed=1)
    _train(scheduled, scheduled_opt, range(8), scheduler)
    _train(plain, plain_opt, range(8))
    assert torch.equal(scheduled_opt.multipliers, plain_opt.multipliers)
    assert scheduled_opt.trace.multipliers[-1] != [1.0, 1.0]
    for a, b in zip(scheduled.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)


def test_step_lr_decays_the_rate_of_the_base_adamw_step():
    config = ContinuumConfig.original(update_freq=1000, lr=1e-2)  # no controller call: m = 1
    model, reference = _two_group_model(0), _two_group_model(0)
    opt = _optimizer(model, config, controller_seed=1)
    adamw = torch.optim.AdamW(_groups(reference), lr=1e-2, weight_decay=0.01)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1) for o in (opt, adamw)]
    for t in range(6):
        _train(model, opt, range(t, t + 1), schedulers[0])
        _train(reference, adamw, range(t, t + 1), schedulers[1])
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5) and opt.param_groups[0]["initial_lr"] == 1e-2
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_it_is_a_torch_optimizer_whose_step_runs_the_closure_with_gradients():
    model = _two_group_model(0)
    opt = _optimizer(model, ContinuumConfig.shipped_fix(update_freq=1), controller_seed=1)
    assert isinstance(opt, torch.optim.Optimizer)
    with torch.no_grad():
        loss = opt.step(partial(_mse_closure, model, opt, _BATCHES[0]))
    assert loss.requires_grad and opt.trace.update_steps == [1] and opt.trace.meta_branch == ["warmup"]
    assert set(opt.state_dict()) == {"state", "param_groups", "controller"}


def test_a_loss_passed_as_the_closure_is_a_clear_error():
    model, _, x, y = _regression(4, dtype=torch.float32)
    opt = ContinuumOptimizer([{"params": model.parameters()}], ContinuumConfig(), runtime.generator(0))
    with pytest.raises(TypeError, match=r"closure must be callable \(pass the loss as step\(loss=...\)\)"):
        opt.step(F.mse_loss(model(x), y).item())


# ----- chapter 1's summaries ---------------------------------------------------------------------


def _run(multipliers: list[list[float]], raw: list[list[float]], update_steps: list[int]) -> experiment.RunResult:
    trace = ControllerTrace(multipliers=multipliers, update_steps=update_steps, raw=raw)
    return experiment.RunResult(ContinuumConfig.original(), 0, [0.0] * len(multipliers), 0.0, trace, 0.0)


def test_bound_jumps_count_moves_between_bounds_through_free_calls():
    m = [[1.0, 1.0], [1.0, 0.1], [1.0, 1.2], [1.0, 2.0], [1.0, 2.0], [1.0, 0.1]]
    raw = [[0.0, -9.0], [0.0, 0.5], [0.0, 9.0], [0.0, 9.0], [0.0, -9.0]]
    jumps = experiment.bound_jumps([_run(m, raw, [2, 3, 4, 5, 6]), _run([[1.0, 0.1]] * 3, [[0.0, -9.0]] * 3,
                                                                        [1, 2, 3])])
    assert jumps.jumps == [2, 0] and jumps.transit_calls == [1, 0] and jumps.sign_changes == [2, 0]
    assert jumps.runs_with_a_jump == 1


def test_the_stagnating_branch_settles_at_a_distance_of_0_05_from_one():
    pull = experiment.stagnation_pull([2.0, 2.0, 0.6], [0, 1, 2], steps=300)
    assert torch.allclose((pull.final_m - 1).abs(), torch.full((3,), 0.05), atol=5e-3)
    assert pull.distance_change.tolist() == pytest.approx(((pull.final_m - 1).abs()
                                                           - (pull.start_m - 1).abs()).tolist())


def test_the_fix_ablation_arms_are_one_field_changes():
    original = ContinuumConfig.original(update_freq=10)
    arms = experiment.fix_ablation(original)
    assert arms["neither (original)"] == original
    assert arms["log1p inputs alone"] == original.with_(input_scaling="log1p")
    assert arms["proxy meta-loss alone"] == original.with_(meta_loss="proxy")
    assert arms["both (shipped fix)"] == ContinuumConfig.shipped_fix(update_freq=10)


def test_the_oracle_picks_the_best_rate_per_seed():
    oracle = experiment.Oracle({1e-3: [2.0, 1.0], 1e-2: [1.5, 1.2]}, {1e-3: 1.0, 1e-2: 1.0})
    assert oracle.best_lr_per_seed() == [1e-2, 1e-3]
    assert oracle.best_lr == 1e-2 and oracle.val_loss[1e-2] == pytest.approx(1.35)
