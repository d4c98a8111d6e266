"""Measurements of the self-modifying layers used by chapter 4."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from nested_lab import runtime
from nested_lab.experiments import titan_self_modification as analysis
from nested_lab.models.self_modifying import SelfModifyingLinear


def _layer(lr: float = 0.05, normalized: bool = True) -> SelfModifyingLinear:
    with runtime.seeded(0):
        return SelfModifyingLinear(8, 6, self_mod_lr=lr, normalized=normalized)


def test_projection_trace_follows_the_prediction_and_restores_the_weight():
    layer = _layer()
    before = layer.weight.detach().clone()
    batch = torch.randn(5, 8, generator=runtime.generator(1)) + 1
    trace = analysis.projection_trace(layer, batch, updates=40)
    assert len(trace) == 41
    assert trace["along_mean"].to_numpy() == pytest.approx(trace["predicted_along_mean"].to_numpy(), rel=1e-4)
    assert trace["along_mean"].iloc[-1] < 0.2 * trace["along_mean"].iloc[0]
    assert trace["orthogonal"].to_numpy() == pytest.approx(trace["orthogonal"].iloc[0], rel=1e-5)
    assert torch.equal(layer.weight, before)


def test_projection_trace_rejects_bad_input():
    batch = torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"shape \[N, 8\]"):
        analysis.projection_trace(_layer(), batch[:, :7], updates=3)
    with pytest.raises(ValueError, match="normalized=True"):
        analysis.projection_trace(_layer(normalized=False), batch, updates=3)
    with pytest.raises(ValueError, match="updates must be >= 1"):
        analysis.projection_trace(_layer(), batch, updates=0)
    with pytest.raises(TypeError, match="updates must be an int"):
        analysis.projection_trace(_layer(), batch, updates=3.0)


def test_demo_weight_change_is_small_and_deterministic():
    change, model = analysis.demo_weight_change(0)
    assert 1e-7 < change < 1e-4
    assert change == analysis.demo_weight_change(0)[0]
    assert model.update_stats()["input_proj"] == 6  # one pass, then five more


def test_same_size_changes_match_the_requested_size():
    weight = torch.randn(30, 20, generator=runtime.generator(0))
    for changed in analysis.same_size_changes(weight, 1e-3, seed=0).values():
        assert float((changed - weight).abs().mean()) == pytest.approx(1e-3, rel=0.1)
    with pytest.raises(ValueError, match="change must be finite and > 0"):
        analysis.same_size_changes(weight, 0.0, seed=0)


def test_in_forward_updates_break_backward_and_deferred_ones_pile_up():
    assert not analysis.backward_succeeds("in_forward", 0)
    assert analysis.backward_succeeds("deferred", 0)
    assert analysis.pending_after(7, 0) == 7


def test_demo_attention_change_and_distance_to_the_delta_rule():
    assert 0 < analysis.demo_attention_change(0) < 1e-3
    assert analysis.demo_attention_change(0) == analysis.demo_attention_change(0)
    assert analysis.distance_to_delta_rule(0) > 0.5  # the seed's step ignores the target


def test_section_one_trace_and_the_lookalike_table():
    trace = analysis.seed_rule_trace(8, seed=0, updates=20, lr=0.05)
    assert trace["along_mean"].to_numpy() == pytest.approx(trace["predicted_along_mean"].to_numpy(), rel=1e-4)
    assert trace.equals(analysis.seed_rule_trace(8, seed=0, updates=20, lr=0.05))  # the weight is drawn from the seed
    change, table = analysis.lookalike_changes(0)
    assert change == analysis.demo_weight_change(0)[0]
    assert table.index.tolist() == ["decay", "noise"]
    assert table["mean |change|"].to_numpy() == pytest.approx([change, change], rel=0.1)
    assert analysis.titan_output_is_finite(0)


def test_layer_and_delta_writes_compare_the_layer_with_the_delta_rule():
    result = analysis.layer_and_delta_writes(0, rate=0.01, dim=16, count=4, memories=4)
    assert result == analysis.layer_and_delta_writes(0, rate=0.01, dim=16, count=4, memories=4)
    assert result["distance"] > 0.9  # the layer's update misses the delta rule's value term
    assert result["top1: delta rule"] > 0.9
    assert result["change: noise"] == pytest.approx(result["change: delta rule"], rel=0.2)
    assert 0 < result["change: layer"] < 0.1 * result["change: delta rule"]
    with pytest.raises(ValueError, match="rate must be finite and > 0"):
        analysis.layer_and_delta_writes(0, rate=0.0)


def test_the_seed_update_ignores_the_target_and_never_reaches_its_own_pass():
    """Code properties behind chapter 4's paper-faithfulness records: the update of a
    SelfModifyingLinear is the same whatever the layer should output, and the Titan's outputs in
    a pass do not depend on the self-modification of that pass."""
    assert analysis.update_target_dependence(0) == 0.0
    assert analysis.update_target_dependence(3, dim=8) == 0.0
    assert analysis.titan_in_context_reach(0) == 0.0
    assert analysis.titan_in_context_reach(5) == 0.0


def test_top1_extreme_by_seed_gives_one_value_per_seed():
    curves = pd.DataFrame({
        "seed": [0, 0, 0, 1, 1, 1], "name": ["a", "b", "a", "a", "b", "c"],
        "load": [0.5, 0.5, 4.0, 0.5, 0.5, 0.5], "top1": [0.9, 0.7, 0.2, 1.0, 0.95, 0.0],
    })
    assert analysis.top1_extreme_by_seed(curves, ["a", "b"], [0.5], "min") == [0.7, 0.95]
    assert analysis.top1_extreme_by_seed(curves, ["a", "b"], [0.5, 4.0], "max") == [0.9, 1.0]
    with pytest.raises(ValueError, match="unknown extreme 'mean'"):
        analysis.top1_extreme_by_seed(curves, ["a"], [0.5], "mean")
