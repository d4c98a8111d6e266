"""APOLLO: checks at the door, step-for-step agreement with the authors' ``apollo-torch``, the
torch.optim contract (closure, state_dict, determinism), the state's size and the default ``alpha``."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nested_lab import runtime
from nested_lab.optim import APOLLO
from nested_lab.optim.apollo import next_projection_seed, random_projection


def _weights(seed: int = 1) -> list[nn.Parameter]:
    """A bias, a wide weight and a tall one (both sides of the projection)."""
    gen = runtime.generator(seed)
    return [nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((5,), (6, 10), (12, 4))]


def _gradients(params: list[nn.Parameter], steps: int, seed: int = 2) -> list[list[torch.Tensor]]:
    """Random gradients; every fifth step three times larger, so the norm-growth limiter bites."""
    gen = runtime.generator(seed)
    return [[torch.randn(p.shape, generator=gen) * (3.0 if t % 5 == 0 else 1.0) for p in params]
            for t in range(steps)]


def _run(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], gradients: list[list[torch.Tensor]]) -> None:
    for step_gradients in gradients:
        for p, g in zip(params, step_gradients, strict=True):
            p.grad = g.clone()
        optimizer.step()


def _apollo(params: list[nn.Parameter], **options) -> APOLLO:
    """Bias in an AdamW group (as apollo-torch is used), the matrices in an APOLLO group."""
    return APOLLO([{"params": params[:1], "apollo": False}, {"params": params[1:]}], lr=1e-2, **options)


# ----- checks at the door ---------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "error"), [
    ({"rank": 0}, ValueError), ({"rank": 1.5}, TypeError), ({"lr": 0.0}, ValueError), ({"lr": -1e-3}, ValueError),
    ({"scale_type": "row"}, ValueError), ({"norm_growth_limit": 0.99}, ValueError), ({"alpha": 0.0}, ValueError),
    ({"update_proj_gap": 0}, ValueError), ({"betas": (0.9, 1.0)}, ValueError), ({"seed": -1}, ValueError),
])
def test_bad_hyperparameters_are_refused(options, error):
    with pytest.raises(error, match=next(iter(options))):
        APOLLO(_weights(), **options)


def test_a_group_override_is_checked_too():
    params = _weights()
    with pytest.raises(ValueError, match="rank"):
        APOLLO([{"params": params[:1]}, {"params": params[1:], "rank": 0}])


# ----- the reference ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("scale_type", "rank"), [("channel", 3), ("tensor", 1)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_apollo_torch_step_for_step(scale_type, rank, weight_decay, monkeypatch):
    """30 steps across four projection redraws (gap 7), limiter on: the same weights within 1e-6.
    Seed 0 reproduces apollo-torch's per-parameter seeds, so both draw the same projections."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the reference's imports must not reach for a network
    apollo_torch = pytest.importorskip("apollo_torch")
    ours, theirs = _weights(), _weights()
    gradients = _gradients(ours, 30)
    alpha = math.sqrt(2.0)
    _run(_apollo(ours, weight_decay=weight_decay, rank=rank, scale_type=scale_type, alpha=alpha,
                 update_proj_gap=7), ours, gradients)
    reference = apollo_torch.APOLLOAdamW(
        [{"params": theirs[:1]}, {"params": theirs[1:], "rank": rank, "proj": "random", "proj_type": "std",
                                  "scale_type": scale_type, "scale": alpha**2, "update_proj_gap": 7}],
        lr=1e-2, weight_decay=weight_decay)
    _run(reference, theirs, gradients)
    for mine, reference_weight in zip(ours, theirs, strict=True):
        assert (mine - reference_weight).abs().max().item() <= 1e-6


def test_the_limiter_changes_the_trajectory():
    """The gradients of the reference test do trip the limiter (else that test would not cover it)."""
    limited, free = _weights(), _weights()
    gradients = _gradients(limited, 30)
    _run(_apollo(limited, update_proj_gap=7), limited, gradients)
    _run(_apollo(free, update_proj_gap=7, norm_growth_limit=None), free, gradients)
    assert (limited[1] - free[1]).abs().max().item() > 1e-3


def test_projection_is_redrawn_every_gap_steps():
    params = _weights()
    optimizer = _apollo(params, update_proj_gap=4)
    gradients = _gradients(params, 5)
    first = 0 + 2  # seed + 1-based index of the wide weight
    _run(optimizer, params, gradients[:4])
    assert optimizer.state[params[1]]["projection_seed"] == first
    _run(optimizer, params, gradients[4:])
    assert optimizer.state[params[1]]["projection_seed"] == next_projection_seed(first)


def test_first_step_is_the_formula():
    """Step 1 written out from the class docstring, channel-wise, for the wide weight (no limiter yet)."""
    params = _weights()
    w0, g = params[1].detach().clone(), _gradients(params, 1)[0][1]
    _run(_apollo(params, rank=3, scale_type="channel"), params, _gradients(params, 1))
    p = random_projection(2, 3, 6, wide=True, like=g)  # (r, d) = (3, 6)
    r = p @ g  # (r, D)
    r_tilde = 0.1 * r / (math.sqrt(0.001) * r.abs() + 1e-6)
    s = r_tilde.norm(dim=0) / (r.norm(dim=0) + 1e-8)
    expected = w0 - 1e-2 * (math.sqrt(0.001) / 0.1) * math.sqrt(6 / 3) * g * s
    torch.testing.assert_close(params[1].detach(), expected)


# ----- the torch.optim contract ----------------------------------------------------------------------

def test_state_dict_round_trip_continues_identically():
    params = _weights()
    gradients = _gradients(params, 20)
    optimizer = _apollo(params, rank=2, scale_type="channel", update_proj_gap=3, weight_decay=0.1)
    _run(optimizer, params, gradients[:10])
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed = [copy.deepcopy(p) for p in params]
    restarted = _apollo(resumed, rank=1, scale_type="tensor")  # hyperparameters come from the state_dict
    buffer.seek(0)
    restarted.load_state_dict(torch.load(buffer))
    _run(optimizer, params, gradients[10:])
    _run(restarted, resumed, gradients[10:])
    for a, b in zip(params, resumed, strict=True):
        assert torch.equal(a, b)


def test_same_seed_same_numbers_other_seed_other_numbers():
    def final(seed: int) -> torch.Tensor:
        params = _weights()
        _run(_apollo(params, seed=seed, rank=2, scale_type="channel"), params, _gradients(params, 5))
        return params[1].detach()

    assert torch.equal(final(3), final(3))
    assert not torch.equal(final(3), final(4))


@pytest.mark.parametrize(("rank", "scale_type"), [(1, "tensor"), (2, "channel")])
def test_trains_a_linear_layer_with_bias(rank, scale_type):
    gen = runtime.generator(0)
    with runtime.seeded(0):
        model = nn.Linear(8, 16)
    x = torch.randn(64, 8, generator=gen)
    y = x @ torch.randn(8, 16, generator=gen) + 1.0
    optimizer = APOLLO(model.parameters(), lr=1e-2, rank=rank, scale_type=scale_type)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [optimizer.step(closure).item() for _ in range(100)]
    assert losses[-1] < 0.5 * losses[0]
    assert optimizer.state[model.bias]["exp_avg"].shape == model.bias.shape  # AdamW for the bias


def test_a_group_can_opt_out_into_adamw():
    """``apollo=False``: torch's AdamW up to the place of eps (negligible here) when there is no decay."""
    ours, theirs = _weights()[1:2], _weights()[1:2]
    gradients = _gradients(ours, 20)
    _run(APOLLO([{"params": ours, "apollo": False}], lr=1e-2, eps=1e-12), ours, gradients)
    _run(torch.optim.AdamW(theirs, lr=1e-2, eps=1e-12, weight_decay=0.0), theirs, gradients)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-6, rtol=0)


# ----- memory and scale --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 32), (32, 8)])
def test_state_is_2_r_d_against_adamw_2_m_n(shape):
    rank, weight = 2, nn.Parameter(torch.ones(shape))
    optimizer = APOLLO([weight], rank=rank, scale_type="channel")
    weight.grad = torch.ones(shape)
    for _ in range(2):
        optimizer.step()
    adamw = torch.optim.AdamW([weight])
    adamw.step()
    assert _state_size(optimizer, weight) == 2 * rank * max(shape) + 1  # M, V, the limiter's previous norm
    assert _state_size(adamw, weight) == 2 * shape[0] * shape[1]


def _state_size(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> int:
    """Numbers held in tensors for ``p``, not counting the step counter."""
    return sum(v.numel() for k, v in optimizer.state[p].items() if isinstance(v, torch.Tensor) and k != "step")


def test_default_alpha_gives_adamw_sized_first_step():
    """alpha = sqrt(d / r): the first tensor-wise update has about AdamW's norm, lr * sqrt(m n)."""
    gen = runtime.generator(0)
    weight = nn.Parameter(torch.zeros(64, 128))
    weight.grad = torch.randn(64, 128, generator=gen)
    APOLLO([weight], lr=1e-3, rank=4, scale_type="tensor").step()
    assert weight.norm().item() / (1e-3 * math.sqrt(64 * 128)) == pytest.approx(1.0, abs=0.15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda():
    params = [nn.Parameter(p.detach().cuda()) for p in _weights()]
    gradients = [[g.cuda() for g in step] for step in _gradients(params, 10)]
    optimizer = _apollo(params, rank=2, scale_type="channel", update_proj_gap=3)
    _run(optimizer, params, gradients)
    assert all(torch.isfinite(p).all() for p in params)
    assert optimizer.state[params[1]]["exp_avg"].device.type == "cuda"
