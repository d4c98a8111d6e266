"""The replica's self-modifying layers (the seed rule, its two variants, the Titan and the
attention) and the correct token mixers (delta rule, Titans memory)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nested_lab import runtime
from nested_lab.memory.delta_rule import delta_rule_recurrent
from nested_lab.memory.self_modifying_rule import NORM_EPS, self_modifying_update
from nested_lab.models.self_modifying import (
    DeltaRuleLayer,
    SelfModifyingAttention,
    SelfModifyingLinear,
    SelfModifyingTitan,
    TitansLayer,
    apply_pending_updates,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=runtime.generator(seed), dtype=dtype)


def _linear(**kwargs) -> SelfModifyingLinear:
    with runtime.seeded(0):
        return SelfModifyingLinear(6, 4, **kwargs)


# --- the seed rule ----------------------------------------------------------------------------

def test_update_shrinks_w_xbar_by_one_minus_lr_per_update():
    weight, inputs, lr = _rand(4, 6, dtype=torch.float64), _rand(10, 6, seed=1, dtype=torch.float64), 0.05
    x_bar = inputs.mean(dim=0)
    norms = [torch.linalg.vector_norm(weight @ x_bar).item()]
    for _ in range(20):
        weight = self_modifying_update(weight, inputs, lr)
        norms.append(torch.linalg.vector_norm(weight @ x_bar).item())
    ratios = torch.tensor(norms[1:]) / torch.tensor(norms[:-1])
    assert torch.allclose(ratios, torch.full_like(ratios, 1 - lr), rtol=0, atol=1e-7)


def test_update_stores_no_association():
    weight, inputs = _rand(4, 6, dtype=torch.float64), _rand(10, 6, seed=1, dtype=torch.float64)
    x_bar = inputs.mean(dim=0)
    orthogonal = torch.linalg.svd(x_bar[None]).Vh[1:]  # [5, 6]: a basis of x_bar's orthogonal complement
    updated = weight
    for _ in range(50):
        updated = self_modifying_update(updated, inputs, 0.1)
    assert torch.allclose(updated @ orthogonal.T, weight @ orthogonal.T, atol=1e-12)
    assert torch.linalg.vector_norm(updated @ x_bar) < 0.01 * torch.linalg.vector_norm(weight @ x_bar)


def test_unnormalized_update_scales_with_the_squared_mean_norm():
    weight, inputs = _rand(4, 6, dtype=torch.float64), torch.full((3, 6), 0.5, dtype=torch.float64)
    x_bar = inputs.mean(dim=0)  # |x_bar|^2 = 1.5
    updated = self_modifying_update(weight, inputs, 0.1, normalized=False)
    assert torch.allclose(updated @ x_bar, (1 - 0.1 * 1.5) * (weight @ x_bar), atol=1e-12)


def test_update_clamps_the_weight_to_plus_minus_ten():
    weight = torch.tensor([[9.5, -9.5]])
    updated = self_modifying_update(weight, torch.tensor([[1.0, -1.0]]), lr=3.0)  # W (I - 3 P) = -2 W
    assert torch.equal(updated, torch.tensor([[-10.0, 10.0]]))


def test_update_skips_a_zero_mean_input():
    weight = _rand(4, 6)
    inputs = torch.cat([_rand(1, 6, seed=1), -_rand(1, 6, seed=1)])  # mean exactly 0
    assert torch.equal(self_modifying_update(weight, inputs, 0.5), weight)
    layer = _linear(update="in_forward")
    layer(inputs)
    assert int(layer.update_count) == 0


def test_each_variant_skips_below_its_own_threshold():
    """The in-forward original skips a mean input with |x_bar|^2 <= 1e-6, the deferred one only <= 1e-8."""
    inputs = torch.full((2, 6), 1e-4)  # |x_bar|^2 = 6e-8, between the two thresholds
    in_forward, deferred = _linear(update="in_forward"), _linear(update="deferred")
    in_forward(inputs)
    deferred(inputs)
    assert (int(in_forward.update_count), len(deferred.pending_updates)) == (0, 1)


# --- the layer's two variants -------------------------------------------------------------------

def test_layer_output_is_the_linear_map_before_the_update():
    layer, x = _linear(), _rand(2, 3, 6, seed=1)
    weight = layer.weight.detach().clone()
    y = layer(x)
    assert torch.allclose(y, x @ weight.T)
    assert torch.allclose(layer.weight.detach(),
                          self_modifying_update(weight, x, layer.self_mod_lr, eps=NORM_EPS[layer.update]))
    assert int(layer.update_count) == 1


def test_layer_initialisation_follows_the_original():
    with runtime.seeded(3):
        layer = SelfModifyingLinear(200, 100)
    assert abs(layer.weight.std().item() - 0.01) < 5e-4
    assert torch.equal(layer.bias, torch.zeros(100))


def test_in_forward_update_breaks_backward():
    layer, x = _linear(update="in_forward"), _rand(5, 6, seed=1, dtype=torch.float32).requires_grad_()
    loss = layer(x).square().sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_in_forward_update_only_in_training_mode():
    layer, x = _linear(update="in_forward"), _rand(5, 6, seed=1).requires_grad_()
    layer.eval()
    weight = layer.weight.detach().clone()
    layer(x).square().sum().backward()
    assert torch.equal(layer.weight.detach(), weight) and int(layer.update_count) == 0
    layer.train()
    layer(x, update_weights=False).square().sum().backward()
    assert torch.equal(layer.weight.detach(), weight)


def test_deferred_update_keeps_backward_and_grows_until_applied():
    layer, x = _linear(update="deferred"), _rand(5, 6, seed=1)
    weight = layer.weight.detach().clone()
    for step in range(3):
        layer(x).square().sum().backward()
        assert len(layer.pending_updates) == step + 1
    layer.eval()
    layer(x)
    assert len(layer.pending_updates) == 4  # eval mode queues updates too
    assert torch.equal(layer.weight.detach(), weight) and layer.weight.grad is not None
    expected = weight + 4 * (self_modifying_update(weight, x, layer.self_mod_lr) - weight)
    assert apply_pending_updates(layer) == 4
    assert layer.pending_updates == [] and int(layer.update_count) == 4
    assert torch.allclose(layer.weight.detach(), expected, atol=1e-7)


def test_deferred_updates_are_applied_in_order_then_clamped():
    layer = _linear(update="deferred", self_mod_lr=3.0)
    with torch.no_grad():
        layer.weight.fill_(2.0)
    x = torch.ones(1, 6)
    for _ in range(3):
        layer(x)  # each update is computed at W = 2: lr * (W x_bar) x_bar^T / |x_bar|^2 = 6 everywhere
    layer.apply_pending_updates()  # 2 - 6 - 6 - 6 = -16 -> clamped to -10
    assert torch.equal(layer.weight.detach(), torch.full((4, 6), -10.0))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"update": "eager"}, "unknown update 'eager'"),
    ({"self_mod_lr": -1e-3}, "lr must be finite and >= 0"),
    ({"self_mod_lr": float("nan")}, "lr must be finite and >= 0"),
    ({"in_features": 0}, "in_features must be >= 1"),
])
def test_layer_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfModifyingLinear(**{"in_features": 6, "out_features": 4, **kwargs})


@pytest.mark.parametrize(("make", "match"), [
    (lambda: SelfModifyingLinear(6.0, 4), "in_features must be an int"),
    (lambda: DeltaRuleLayer(16, chunk_size=8.0), "chunk_size must be an int"),
    (lambda: TitansLayer(16, theta_max="0.1"), "theta_max must be a number"),
    (lambda: SelfModifyingLinear(6, 4, self_mod_lr="0.1"), "self_mod_lr must be a number"),
])
def test_non_numeric_options_raise_type_error(make, match):
    with pytest.raises(TypeError, match=match):
        make()


# --- the Titan and the attention --------------------------------------------------------------

@pytest.mark.parametrize("rnn", ["gru", "lstm"])
def test_titan_shapes_and_update_counts(rnn):
    with runtime.seeded(0):
        model = SelfModifyingTitan(8, 16, 5, num_layers=2, rnn=rnn, dropout=0.0)
    output, hidden = model(_rand(3, 7, 8))
    assert output.shape == (3, 7, 5)
    state = hidden[0] if rnn == "lstm" else hidden
    assert state.shape == (2, 3, 16)
    assert model.update_stats() == {"input_proj": 1, "output_proj": 1}
    model(_rand(3, 7, 8), hidden, enable_self_modification=False)
    assert model.update_stats() == {"input_proj": 1, "output_proj": 1}


def test_titan_in_forward_breaks_training_and_deferred_trains():
    with runtime.seeded(0):
        faithful = SelfModifyingTitan(8, 16, 5, dropout=0.0, update="in_forward")
        deferred = SelfModifyingTitan(8, 16, 5, dropout=0.0, update="deferred")
    with pytest.raises(RuntimeError, match="inplace"):
        faithful(_rand(2, 4, 8))[0].sum().backward()
    deferred(_rand(2, 4, 8))[0].sum().backward()
    assert deferred.input_proj.weight.grad is not None
    assert apply_pending_updates(deferred) == 2 and deferred.update_stats() == {"input_proj": 1, "output_proj": 1}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rnn": "transformer"}, "unknown rnn 'transformer'"),
    ({"update": "later"}, "unknown update"),
    ({"dropout": 1.0}, "dropout"),
    ({"self_mod_lr": -1.0}, "lr must be finite and >= 0"),
])
def test_titan_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfModifyingTitan(8, 16, 5, **kwargs)


def _leak(layer: torch.nn.Module, position: int = 5, **kwargs) -> float:
    """max |output[:, :position + 1] change| when the inputs after ``position`` change."""
    x = _rand(2, 12, 16, seed=1)
    altered = x.clone()
    altered[:, position + 1 :] = _rand(2, 12 - position - 1, 16, seed=2)
    with torch.no_grad():
        return (layer(x, **kwargs) - layer(altered, **kwargs))[:, : position + 1].abs().max().item()


def test_attention_shapes_and_scaled_softmax():
    with runtime.seeded(0):
        attention = SelfModifyingAttention(16, num_heads=4, dropout=0.0, causal=True)
    x = _rand(2, 12, 16, seed=1)
    weights = [proj.weight.detach().clone() for proj in (attention.q_proj, attention.k_proj, attention.v_proj,
                                                          attention.o_proj)]
    output = attention(x, enable_self_modification=False)
    q, k, v = (x @ weight.T for weight in weights[:3])
    heads = [F.scaled_dot_product_attention(*(t.unflatten(-1, (4, 4)).transpose(1, 2) for t in (q, k, v)),
                                            is_causal=True)]
    expected = heads[0].transpose(1, 2).reshape(2, 12, 16) @ weights[3].T
    assert output.shape == (2, 12, 16) and torch.allclose(output, expected, atol=1e-6)


@pytest.mark.parametrize("update", ["in_forward", "deferred"])
def test_attention_causal_option_removes_future_leakage(update):
    with runtime.seeded(0):
        causal = SelfModifyingAttention(16, 4, dropout=0.0, causal=True, update=update).eval()
        original = SelfModifyingAttention(16, 4, dropout=0.0, causal=False, update=update).eval()
    assert _leak(causal) < 1e-7
    assert _leak(original) > 1e-4


def test_attention_updates_all_four_projections():
    with runtime.seeded(0):
        attention = SelfModifyingAttention(16, 4, dropout=0.0)
    attention(_rand(2, 12, 16, seed=1))
    assert [int(p.update_count) for p in (attention.q_proj, attention.k_proj, attention.v_proj,
                                          attention.o_proj)] == [1, 1, 1, 1]


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"dim": 10, "num_heads": 4}, ValueError, r"dim \(10\) must be divisible by num_heads \(4\)"),
    ({"causal": 1}, TypeError, "causal must be True or False"),
    ({"update": "lazy"}, ValueError, "unknown update"),
])
def test_attention_rejects_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        SelfModifyingAttention(**{"dim": 16, "num_heads": 4, **kwargs})


# --- the correct counterparts -----------------------------------------------------------------

def test_delta_rule_layer_is_the_delta_rule_on_its_projections():
    with runtime.seeded(0):
        layer = DeltaRuleLayer(16, num_heads=4, chunk_size=5)
    x = _rand(2, 12, 16, seed=1)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (4, 4)).transpose(1, 2)

    q, k = F.normalize(heads(layer.q_proj(x)), dim=-1), F.normalize(heads(layer.k_proj(x)), dim=-1)
    beta = torch.sigmoid(layer.beta_proj(x)).transpose(1, 2)
    mixed, _ = delta_rule_recurrent(q, k, heads(layer.v_proj(x)), beta)
    expected = layer.o_proj(mixed.transpose(1, 2).reshape(2, 12, 16))
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_delta_rule_layer_is_causal_and_trains():
    with runtime.seeded(0):
        layer = DeltaRuleLayer(16, num_heads=4, chunk_size=4)
    assert _leak(layer) < 1e-6
    layer(_rand(2, 12, 16)).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_titans_layer_shapes_causality_and_gradients():
    with runtime.seeded(0):
        layer = TitansLayer(16, depth=2, chunk_size=4)
    names = dict(layer.named_parameters())
    assert {"memory.weight_0", "memory.weight_1"} <= set(names)
    output = layer(_rand(2, 12, 16))
    assert output.shape == (2, 12, 16)
    assert _leak(layer) < 1e-6
    output.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert names["memory.weight_0"].grad.abs().sum() > 0


def test_titans_layer_memory_is_drawn_under_the_seed():
    with runtime.seeded(1):
        first = TitansLayer(8, depth=1)
    with runtime.seeded(1):
        again = TitansLayer(8, depth=1)
    with runtime.seeded(2):
        other = TitansLayer(8, depth=1)
    assert torch.equal(first.memory["weight_0"], again.memory["weight_0"])
    assert not torch.equal(first.memory["weight_0"], other.memory["weight_0"])


@pytest.mark.parametrize(("make", "match"), [
    (lambda: DeltaRuleLayer(10, num_heads=4), r"divisible by num_heads"),
    (lambda: DeltaRuleLayer(16, chunk_size=0), "chunk_size must be >= 1"),
    (lambda: TitansLayer(16, chunk_size=0), "chunk_size must be >= 1"),
    (lambda: TitansLayer(16, theta_max=0.0), "theta_max must be finite and > 0"),
    (lambda: TitansLayer(16, gate_biases=(0.0, 0.0)), "three numbers"),
    (lambda: TitansLayer(16, gate_biases=0.5), "three numbers"),
])
def test_counterparts_reject_bad_options(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_layers_move_between_dtypes_like_any_module():
    layer = _linear().to(torch.float64)
    assert layer.weight.dtype == torch.float64
    assert layer(torch.ones(2, 6, dtype=torch.float64)).dtype == torch.float64
