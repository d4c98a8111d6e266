"""Forgetting, flatness and drift measures, checked against hand computations and dense autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nested_lab.models.gpt import GPT, GPTConfig
from nested_lab.runtime import generator, seeded
from nested_lab.train.plasticity import (
    EWCPenalty,
    diagonal_fisher,
    gem_metrics,
    gradient_norms,
    gradient_overlap,
    loss_barrier,
    module_group,
    parameter_snapshot,
    top_hessian_eigenvalue,
    update_concentration,
    weight_drift,
)


class Vector(nn.Module):
    """One parameter vector x; forward returns it, so a loss is any function of x."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(values, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        return self.x


def tiny_mlp() -> nn.Module:
    with seeded(0):
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def classification(net, batch):
    inputs, targets = batch
    return F.cross_entropy(net(inputs), targets)


def classification_data(count: int = 10):
    gen = generator(1)
    return torch.randn(count, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (count,), generator=gen)


def per_example_grads(model, inputs, targets):
    grads = []
    for x, y in zip(inputs, targets, strict=True):
        model.zero_grad()
        classification(model, (x[None], y[None])).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    return grads


# ----- Fisher and EWC -------------------------------------------------------------------------------

def test_fisher_is_the_mean_squared_per_example_gradient_not_the_squared_mean():
    model = tiny_mlp()
    inputs, targets = classification_data()
    fisher = diagonal_fisher(model, classification, [(inputs[:6], targets[:6]), (inputs[6:], targets[6:])])
    grads = per_example_grads(model, inputs, targets)
    for name, _ in model.named_parameters():
        stacked = torch.stack([g[name] for g in grads])
        torch.testing.assert_close(fisher[name], stacked.square().mean(0))
        assert not torch.allclose(fisher[name], stacked.mean(0).square(), rtol=0.1)
    chunked = diagonal_fisher(model, classification, [(inputs, targets)], chunk_size=3)
    for name in fisher:
        torch.testing.assert_close(chunked[name], fisher[name])


def gpt_and_tokens():
    with seeded(0):
        model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)).eval()
    tokens = torch.randint(0, 11, (4, 7), generator=generator(2))
    return model, (tokens[:, :-1], tokens[:, 1:])


def next_token(net, batch):
    idx, targets = batch
    logits, _ = net(idx)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_fisher_runs_per_example_on_a_gpt():
    model, (idx, targets) = gpt_and_tokens()
    fisher = diagonal_fisher(model, next_token, [(idx, targets)])
    squares = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i in range(len(idx)):
        model.zero_grad()
        next_token(model, (idx[i:i + 1], targets[i:i + 1])).backward()
        for name, p in model.named_parameters():
            squares[name] += p.grad.square() / len(idx)
    assert fisher.keys() == squares.keys()
    for name in fisher:
        torch.testing.assert_close(fisher[name], squares[name], rtol=1e-4, atol=1e-9)


def test_ewc_penalty_is_zero_at_the_anchor_with_the_weighted_gradient_away_from_it():
    model = Vector([1.0, 2.0, 3.0])
    fisher = {"x": torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)}
    penalty = EWCPenalty(model, fisher, strength=4.0)
    assert penalty(model).item() == 0.0
    fisher["x"][0] = 100.0  # frozen copies: later edits to the inputs change nothing
    with torch.no_grad():
        model.x += torch.tensor([1.0, 1.0, -0.5], dtype=torch.float64)
    value = penalty(model)
    assert value.item() == pytest.approx(0.5 * 4.0 * (0.5 * 1.0 + 0.0 + 2.0 * 0.25))
    value.backward()
    torch.testing.assert_close(model.x.grad, torch.tensor([2.0, 0.0, -4.0], dtype=torch.float64))


def test_ewc_penalty_checks_its_arguments():
    model = Vector([1.0])
    with pytest.raises(ValueError, match="strength"):
        EWCPenalty(model, {"x": torch.ones(1)}, strength=-1.0)
    with pytest.raises(TypeError, match="strength"):
        EWCPenalty(model, {"x": torch.ones(1)}, strength=True)
    with pytest.raises(ValueError, match="unknown"):
        EWCPenalty(model, {"y": torch.ones(1)}, strength=1.0)


# ----- sharpness ------------------------------------------------------------------------------------

def test_power_iteration_finds_the_top_eigenvalue_of_a_quadratic():
    gen = generator(3)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    matrix = rotation @ torch.diag(torch.tensor([5.0, 3.0, 1.0, -0.5], dtype=torch.float64)) @ rotation.T
    model = Vector([0.3, -1.0, 2.0, 0.5])

    def quadratic(net, batch):
        x = net()
        return 0.5 * x @ matrix @ x

    top = top_hessian_eigenvalue(model, quadratic, (), iterations=100, generator=generator(4))
    assert top == pytest.approx(5.0, abs=1e-3)
    assert top == top_hessian_eigenvalue(model, quadratic, (), iterations=100, generator=generator(4))
    with pytest.raises(ValueError, match="iterations"):
        top_hessian_eigenvalue(model, quadratic, (), iterations=0, generator=generator(4))


def test_power_iteration_matches_the_dense_hessian_of_a_tiny_mlp():
    model = tiny_mlp()
    batch = classification_data()
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def flat_loss(vector):
        pieces = torch.split(vector, [math.prod(s) for s in shapes])
        params = {n: piece.view(s) for n, piece, s in zip(names, pieces, shapes, strict=True)}
        return classification(lambda x: torch.func.functional_call(model, params, (x,)), batch)

    eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(flat_loss, flat))
    dominant = eigenvalues[eigenvalues.abs().argmax()]
    assert dominant == eigenvalues.max() > 0
    top = top_hessian_eigenvalue(model, classification, batch, iterations=300, generator=generator(5))
    assert top == pytest.approx(float(dominant), rel=0.02)


def test_sharpness_of_a_gpt_runs_and_leaves_it_unchanged():
    model, batch = gpt_and_tokens()
    before = parameter_snapshot(model)
    top = top_hessian_eigenvalue(model, next_token, batch, iterations=3, generator=generator(6))
    assert math.isfinite(top)
    assert weight_drift(model, before)["all"] == 0.0


# ----- loss barrier ---------------------------------------------------------------------------------

def test_a_convex_loss_has_no_barrier():
    model = Vector([0.0, 0.0])

    def bowl(net, batch):
        return 0.5 * (net() - torch.tensor([1.0, -2.0], dtype=torch.float64)).square().sum()

    start = {"x": torch.tensor([3.0, 1.0], dtype=torch.float64)}
    end = {"x": torch.tensor([-2.0, 0.5], dtype=torch.float64)}
    losses, barrier = loss_barrier(model, start, end, bowl, (), points=5)
    assert len(losses) == 5 and losses[0] == pytest.approx(float(bowl(lambda: start["x"], ())))
    assert barrier <= 1e-12
    assert model.x.tolist() == [0.0, 0.0]


def test_a_double_well_has_a_barrier_of_its_height():
    model = Vector([0.0])

    def double_well(net, batch):
        return ((net().square() - 1.0).square()).sum()

    start, end = {"x": torch.tensor([-1.0], dtype=torch.float64)}, {"x": torch.tensor([1.0], dtype=torch.float64)}
    losses, barrier = loss_barrier(model, start, end, double_well, ())
    assert barrier == pytest.approx(1.0)
    assert losses[5] == pytest.approx(1.0) and losses[0] == losses[-1] == 0.0
    with pytest.raises(ValueError, match="points"):
        loss_barrier(model, start, end, double_well, (), points=1)
    with pytest.raises(ValueError, match="same parameters"):
        loss_barrier(model, start, {"y": end["x"]}, double_well, ())


# ----- drift and gradients per group ----------------------------------------------------------------

def test_module_group_keeps_the_module_after_a_block_index():
    assert module_group("blocks.0.attn.c_attn.weight") == "blocks.0.attn"
    assert module_group("blocks.1.ln_2.bias") == "blocks.1.ln_2"
    assert module_group("transformer.h.3.mlp.c_fc.weight") == "transformer.h.3.mlp"
    assert module_group("wte.weight") == "wte"
    assert module_group("lm_head.weight") == "lm_head"
    assert module_group("x") == "x"


class TwoParts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 1, bias=False)
        self.b = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[3.0, 4.0]]))
            self.b.weight.copy_(torch.tensor([[1.0, 0.0]]))


def test_weight_drift_per_group_and_overall():
    model = TwoParts()
    reference = parameter_snapshot(model)
    with torch.no_grad():
        model.a.weight += torch.tensor([[0.0, 1.0]])
        model.b.weight += torch.tensor([[2.0, 0.0]])
    drift = weight_drift(model, reference)
    assert drift == pytest.approx({"a": 1 / 5, "b": 2.0, "all": math.sqrt(5) / math.sqrt(26)})
    assert weight_drift(model, reference, group_of=lambda name: "one") == pytest.approx(
        {"one": drift["all"], "all": drift["all"]})


def test_gradient_norms_read_zero_for_missing_gradients():
    model = TwoParts()
    assert gradient_norms(model) == {"a": 0.0, "b": 0.0}
    model.a.weight.grad = torch.tensor([[3.0, 4.0]])
    assert gradient_norms(model) == {"a": 5.0, "b": 0.0}


# ----- scores on hand-made numbers ------------------------------------------------------------------

def test_gem_metrics_on_a_hand_made_matrix():
    accuracy = torch.tensor([[0.9, 0.2, 0.1],
                             [0.6, 0.8, 0.3],
                             [0.5, 0.7, 0.95]])
    initial = torch.tensor([0.1, 0.15, 0.2])
    scores = gem_metrics(accuracy, initial)
    assert scores["ACC"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert scores["BWT"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)  # -0.25
    assert scores["FWT"] == pytest.approx(((0.2 - 0.15) + (0.3 - 0.2)) / 2)  # 0.075
    with pytest.raises(ValueError, match="T >= 2"):
        gem_metrics(accuracy[:2], initial)


def test_gradient_overlap_of_hand_made_gradients():
    same = {"w": torch.tensor([1.0, 0.0]), "v": torch.tensor([2.0])}
    orthogonal = {"w": torch.tensor([0.0, 3.0]), "v": torch.tensor([0.0])}
    assert gradient_overlap([same, same, same]) == pytest.approx(1.0)
    assert gradient_overlap([same, orthogonal]) == pytest.approx(0.0)
    opposite = {name: -t for name, t in same.items()}
    assert gradient_overlap([same, opposite, opposite]) == pytest.approx(0.0)  # mean of -1 and +1
    with pytest.raises(ValueError, match="at least 2"):
        gradient_overlap([same])


def test_update_concentration_of_hand_made_updates():
    spread = {"w": torch.ones(200)}
    assert update_concentration(spread, share=0.01) == pytest.approx(0.01)
    spike = {"w": torch.zeros(200), "v": torch.tensor([0.0, 5.0])}
    assert update_concentration(spike, share=0.01) == pytest.approx(1.0)
    mixed = {"w": torch.tensor([3.0, 1.0, 1.0, 1.0])}
    assert update_concentration(mixed, share=0.25) == pytest.approx(9 / 12)
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match="share"):
            update_concentration(spread, share=share)
