"""Capacity curves: random pairs, recall scores, the four writing rules and the curve's table."""

from __future__ import annotations

import pytest
import torch

from nested_lab import runtime
from nested_lab.experiments import titan_self_modification as capacity
from nested_lab.experiments.titan_self_modification import (
    CURVE_COLUMNS,
    capacity_curve,
    random_pairs,
    recall_scores,
    write_then_read,
)

DIM = 16


def _orthonormal_pairs(count: int, dim: int = DIM, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = runtime.generator(7)
    bases = torch.linalg.qr(torch.randn(batch, dim, dim, generator=gen)).Q  # orthonormal rows
    return bases[:, :count], torch.randn(batch, count, dim, generator=gen)


def test_random_pairs_are_unit_keys_and_gaussian_values_and_reproducible():
    keys, values = random_pairs(50, DIM, runtime.generator(0), batch=3)
    assert keys.shape == values.shape == (3, 50, DIM)
    assert torch.allclose(keys.norm(dim=-1), torch.ones(3, 50))
    assert abs(values.std().item() - 1) < 0.1
    again, _ = random_pairs(50, DIM, runtime.generator(0), batch=3)
    other, _ = random_pairs(50, DIM, runtime.generator(1), batch=3)
    assert torch.equal(keys, again) and not torch.equal(keys, other)


@pytest.mark.parametrize(("args", "error"), [
    ((0, DIM), ValueError), ((4, 0), ValueError), ((4, 2.5), TypeError),
])
def test_random_pairs_reject_bad_sizes(args, error):
    with pytest.raises(error):
        random_pairs(*args, runtime.generator(0))
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        random_pairs(4, DIM, 0)


def test_recall_scores_perfect_shuffled_and_zero_reads():
    _, values = random_pairs(10, DIM, runtime.generator(0), batch=2)
    assert recall_scores(values, values) == pytest.approx({"cosine": 1.0, "top1": 1.0})
    assert recall_scores(3 * values, values) == pytest.approx({"cosine": 1.0, "top1": 1.0})
    shifted = values.roll(1, dims=1)  # every read is another pair's value
    assert recall_scores(shifted, values)["top1"] == 0.0
    assert recall_scores(shifted, values)["cosine"] < 0.5
    assert recall_scores(torch.zeros_like(values), values)["cosine"] == 0.0
    with pytest.raises(ValueError, match="share a shape"):
        recall_scores(values[:, :5], values)


@pytest.mark.parametrize(("rule", "options"), [
    ("delta", {}), ("hebbian", {}), ("titans", {"depth": 1, "theta": 0.5}),
])
def test_orthonormal_keys_are_recalled_exactly(rule, options):
    keys, values = _orthonormal_pairs(DIM)
    retrieved = write_then_read(rule, keys, values, **options)
    assert torch.allclose(retrieved, values, atol=1e-4)
    assert recall_scores(retrieved, values) == pytest.approx({"cosine": 1.0, "top1": 1.0}, abs=1e-5)


def test_linear_titans_is_the_delta_rule_on_random_keys_and_hebbian_is_not():
    keys, values = random_pairs(24, DIM, runtime.generator(3), batch=2)
    delta = write_then_read("delta", keys, values, beta=0.6)
    titans = write_then_read("titans", keys, values, depth=1, theta=0.3)
    assert torch.allclose(titans, delta, atol=1e-4)
    assert (write_then_read("hebbian", keys, values) - delta).abs().max() > 0.1


def test_the_seed_rule_recalls_at_chance_and_ignores_the_values():
    keys, values = random_pairs(32, DIM, runtime.generator(0), batch=4)
    retrieved = write_then_read("seed", keys, values, generator=runtime.generator(1))
    scores = recall_scores(retrieved, values)
    assert abs(scores["cosine"]) < 0.1 and scores["top1"] < 0.15  # chance: 1/32
    other_values = write_then_read("seed", keys, -values, generator=runtime.generator(1))
    assert torch.equal(retrieved, other_values)
    delta = recall_scores(write_then_read("delta", keys, values), values)
    assert delta["top1"] > 0.3


def test_a_deep_titans_memory_recalls_well_below_capacity():
    keys, values = random_pairs(4, DIM, runtime.generator(0), batch=2)
    scores = recall_scores(write_then_read("titans", keys, values, generator=runtime.generator(1)), values)
    assert scores["top1"] == 1.0 and scores["cosine"] > 0.7


def test_capacity_curve_table():
    curve = capacity_curve("hebbian", [4, 8, 64], DIM, seeds=[0, 1])
    assert tuple(curve.columns) == CURVE_COLUMNS and len(curve) == 6
    assert set(curve["rule"]) == {"hebbian"} and sorted(set(curve["seed"])) == [0, 1]
    assert curve.set_index(["seed", "count"])["load"].to_dict() == {
        (seed, count): count / DIM for seed in (0, 1) for count in (4, 8, 64)}
    means = curve.groupby("count")[["cosine", "top1"]].mean()
    assert means.loc[4, "cosine"] > means.loc[64, "cosine"] + 0.2  # cross-talk grows with the load
    assert curve.equals(capacity_curve("hebbian", [4, 8, 64], DIM, seeds=[0, 1]))
    seeded = capacity_curve("seed", [8], DIM, seeds=[0], lr=1e-2)
    assert seeded.loc[0, "top1"] < 0.5


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda: capacity_curve("delta", [4, 0], DIM, [0]), ValueError, "every count must be >= 1"),
    (lambda: capacity_curve("lstm", [4], DIM, [0]), ValueError, "unknown rule 'lstm'; allowed: hebbian"),
    (lambda: capacity_curve("delta", [], DIM, [0]), TypeError, "counts must be a non-empty sequence"),
    (lambda: capacity_curve("delta", [4], DIM, []), TypeError, "seeds must be a non-empty sequence"),
    (lambda: capacity_curve("delta", [4], 0, [0]), ValueError, "dim must be >= 1"),
    (lambda: capacity_curve("delta", [4], DIM, [0], lr=0.1), ValueError, r"unknown options \['lr'\]"),
    (lambda: write_then_read("hebbian", torch.zeros(1, 3, 4), torch.zeros(1, 2, 4)), ValueError, "shapes"),
    (lambda: write_then_read("delta", torch.zeros(3, 4), torch.zeros(3, 4)), ValueError, "shapes"),
    (lambda: write_then_read("sparse", torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)), ValueError, "unknown rule"),
])
def test_bad_inputs_raise(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_curves_of_named_rules_their_summaries_and_the_forgetting_grid():
    rules = {"delta rule": ("delta", {}), "Titans, linear": ("titans", {"depth": 1, "theta": 0.25})}
    counts = capacity.load_counts(8, loads=(0.25, 0.5, 4))
    assert counts == [2, 4, 32]
    curves = capacity.capacity_curves(rules, counts, 8, seeds=[0, 1])
    assert list(curves["name"].unique()) == list(rules) and len(curves) == 12
    summary = capacity.recall_summary(curves)
    assert list(summary.index) == list(rules) and summary.loc["delta rule", ("top1", 0.25)] == 1.0
    assert capacity.low_load_top1(curves, "delta rule").to_dict() == {0: 1.0, 1: 1.0}
    assert capacity.low_load_chance(curves) == pytest.approx(0.5)
    reference = ("delta rule", curves[curves["name"] == "delta rule"])
    grid = capacity.forgetting_grid({"Titans, linear": rules["Titans, linear"]}, counts, 8, [0], [0.0, 0.1], reference)
    assert list(grid) == [0.0, 0.1] and list(grid[0.1]) == ["Titans, linear", "delta rule"]
    loads, top1 = grid[0.0]["delta rule"]
    assert loads == [0.25, 0.5, 4.0] and top1[0] == 1.0
    assert grid[0.1]["Titans, linear"][1][-1] != grid[0.0]["Titans, linear"][1][-1]  # forgetting changes recall


def test_the_seed_rule_rate_is_checked_where_it_enters():
    with pytest.raises(ValueError, match="lr must be finite and >= 0"):
        capacity.capacity_curve("seed", [4], DIM, [0], lr=-0.1)
