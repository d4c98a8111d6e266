"""Titans' neural memory: the MLP, its per-token gradients, the sequential reference and the
chunk-parallel form (equalities, the delta-rule special case, gradients, option checks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nested_lab import runtime
from nested_lab.memory.delta_rule import delta_rule_recurrent
from nested_lab.memory.titans import (
    GRADIENT_FORMS,
    association_loss,
    gradient_factors,
    init_memory,
    memory_forward,
    titans_chunked,
    titans_sequential,
    token_gradients,
)

TOL = {torch.float32: 2e-5, torch.float64: 1e-10}


def _problem(batch=2, steps=37, dim=6, out_dim=5, depth=2, dtype=torch.float64, seed=0, gates="random"):
    """Shared weights, unit keys, values, queries and gate tensors (with an exact 0 momentum and
    a full forget somewhere, the corner cases of the scan)."""
    gen = runtime.generator(seed)
    params = {n: w.to(dtype) for n, w in init_memory(dim, depth, hidden=7, out_dim=out_dim, generator=gen).items()}
    keys = F.normalize(torch.randn(batch, steps, dim, generator=gen, dtype=dtype), dim=-1)
    values = torch.randn(batch, steps, out_dim, generator=gen, dtype=dtype)
    queries = torch.randn(batch, steps, dim, generator=gen, dtype=dtype)
    theta = 0.2 * torch.rand(batch, steps, generator=gen, dtype=dtype)
    eta = torch.rand(batch, steps, generator=gen, dtype=dtype)
    alpha = 0.1 * torch.rand(batch, steps, generator=gen, dtype=dtype)
    eta[0, min(3, steps - 1)], alpha[-1, min(5, steps - 1)] = 0.0, 1.0
    return params, keys, values, queries, {"theta": theta, "eta": eta, "alpha": alpha}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=TOL[a.dtype], atol=TOL[a.dtype])


# --- the memory MLP ----------------------------------------------------------------------------

def test_init_memory_shapes_defaults_and_determinism():
    deep = init_memory(4, depth=3, generator=runtime.generator(1))
    assert {n: tuple(w.shape) for n, w in deep.items()} == {"weight_0": (4, 8), "weight_1": (8, 8), "weight_2": (8, 4)}
    linear = init_memory(4, depth=1, out_dim=3)
    assert list(linear) == ["weight_0"] and linear["weight_0"].shape == (4, 3)
    again = init_memory(4, depth=3, generator=runtime.generator(1))
    other = init_memory(4, depth=3, generator=runtime.generator(2))
    assert all(torch.equal(deep[n], again[n]) for n in deep)
    assert not torch.equal(deep["weight_0"], other["weight_0"])
    wide = init_memory(64, depth=2, hidden=256, generator=runtime.generator(0))["weight_0"]
    assert wide.shape == (64, 256) and abs(wide.std().item() - 64**-0.5) < 0.01


def test_memory_forward_is_the_mlp_and_takes_per_sequence_weights():
    params = init_memory(4, depth=2, hidden=6, out_dim=3)
    x = torch.randn(5, 4, generator=runtime.generator(3))
    assert torch.allclose(memory_forward(params, x), F.silu(x @ params["weight_0"]) @ params["weight_1"])
    linear = init_memory(4, depth=1, out_dim=3)
    assert torch.allclose(memory_forward(linear, x), x @ linear["weight_0"])
    batched = {n: torch.stack([w, 2 * w]) for n, w in params.items()}
    out = memory_forward(batched, torch.stack([x, x]))
    assert out.shape == (2, 5, 3)
    assert torch.allclose(out[1], F.silu(x @ (2 * params["weight_0"])) @ (2 * params["weight_1"]))


def test_token_gradients_match_autograd_and_the_outer_product_factors():
    params, keys, values, _, _ = _problem(batch=2, steps=4, depth=3)
    memory = {n: w.expand(2, *w.shape) for n, w in params.items()}
    grads = token_gradients(memory, keys, values)
    leaves = {n: w.clone().requires_grad_() for n, w in params.items()}
    expected = torch.autograd.grad(association_loss(leaves, keys[1, 2], values[1, 2]), list(leaves.values()))
    for (name, gradient), reference in zip(grads.items(), expected, strict=True):
        assert gradient.shape == (2, 4, *params[name].shape)
        assert _close(gradient[1, 2], reference)
    for name, (inputs, signals) in zip(params, gradient_factors(memory, keys, values), strict=True):
        assert _close(inputs[..., :, None] * signals[..., None, :], grads[name])


# --- sequential reference and chunk-parallel form --------------------------------------------

def test_sequential_matches_a_plain_autograd_loop():
    params, keys, values, queries, gates = _problem(batch=1, steps=9)
    weights = [params["weight_0"], params["weight_1"]]
    momentum = [torch.zeros_like(w) for w in weights]
    outputs = []
    for t in range(9):
        leaves = [w.clone().requires_grad_() for w in weights]
        loss = ((F.silu(keys[0, t] @ leaves[0]) @ leaves[1] - values[0, t]) ** 2).sum()
        grads = torch.autograd.grad(loss, leaves)
        momentum = [gates["eta"][0, t] * s - gates["theta"][0, t] * g for s, g in zip(momentum, grads, strict=True)]
        weights = [(1 - gates["alpha"][0, t]) * w + s for w, s in zip(weights, momentum, strict=True)]
        outputs.append(F.silu(queries[0, t] @ weights[0]) @ weights[1])
    got, memory = titans_sequential(params, keys, values, queries, **gates)
    assert _close(got[0], torch.stack(outputs))
    assert _close(memory["weight_1"][0], weights[1])


@pytest.mark.parametrize("form", GRADIENT_FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_chunk_size_one_is_the_exact_recurrence(dtype, depth, form):
    params, keys, values, queries, gates = _problem(depth=depth, dtype=dtype)
    expected, expected_memory = titans_sequential(params, keys, values, queries, **gates)
    got, memory = titans_chunked(params, keys, values, queries, **gates, chunk_size=1, gradient_form=form)
    assert got.shape == (2, 37, 5) and _close(got, expected)
    assert all(memory[n].shape == (2, *params[n].shape) and _close(memory[n], expected_memory[n]) for n in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [4, 16])
@pytest.mark.parametrize("form", GRADIENT_FORMS)
def test_chunks_match_sequential_with_gradients_refreshed_every_chunk(dtype, chunk, form):
    params, keys, values, queries, gates = _problem(dtype=dtype)  # 37 tokens: a ragged last chunk
    expected, expected_memory = titans_sequential(params, keys, values, queries, **gates, gradient_every=chunk)
    got, memory = titans_chunked(params, keys, values, queries, **gates, chunk_size=chunk, gradient_form=form)
    assert _close(got, expected)
    assert all(_close(memory[n], expected_memory[n]) for n in params)
    exact, _ = titans_sequential(params, keys, values, queries, **gates)
    assert (got - exact).abs().max() > 1e-3  # stale gradients change the result


@pytest.mark.parametrize("form", GRADIENT_FORMS)
def test_call_start_gradients_do_not_depend_on_the_chunk_size(form):
    params, keys, values, queries, gates = _problem()
    expected, _ = titans_sequential(params, keys, values, queries, **gates, gradient_every=37)
    for chunk in (1, 5, 64):
        got, _ = titans_chunked(params, keys, values, queries, **gates, chunk_size=chunk, gradients_at="call_start",
                                gradient_form=form)
        assert _close(got, expected)
    paper, _ = titans_chunked(params, keys, values, queries, **gates, chunk_size=5)
    assert (paper - expected).abs().max() > 1e-3


def test_linear_memory_without_momentum_or_forgetting_is_the_delta_rule():
    _, keys, values, queries, _ = _problem(depth=1, steps=21)
    zero = {"weight_0": torch.zeros(6, 5, dtype=torch.float64)}
    theta = 0.5 * torch.rand(2, 21, generator=runtime.generator(4), dtype=torch.float64)
    expected, state = delta_rule_recurrent(queries[:, None], keys[:, None], values[:, None], 2 * theta[:, None])
    for run, options in ((titans_sequential, {}), (titans_chunked, {"chunk_size": 1})):
        got, memory = run(zero, keys, values, queries, theta=theta, eta=0.0, alpha=0.0, **options)
        assert _close(got, expected[:, 0]) and _close(memory["weight_0"], state[:, 0])


def test_sequences_are_independent_and_float_gates_broadcast():
    params, keys, values, queries, _ = _problem(steps=10)
    both, _ = titans_chunked(params, keys, values, queries, theta=0.1, eta=0.5, alpha=0.05, chunk_size=4)
    alone, _ = titans_chunked(params, keys[1:], values[1:], queries[1:], theta=0.1, eta=0.5, alpha=0.05, chunk_size=4)
    assert _close(both[1:], alone)
    tensors = {name: torch.full((2, 10), value, dtype=torch.float64)
               for name, value in (("theta", 0.1), ("eta", 0.5), ("alpha", 0.05))}
    assert _close(titans_chunked(params, keys, values, queries, **tensors, chunk_size=4)[0], both)


def test_writing_one_pair_repeatedly_stores_it():
    params, keys, values, _, _ = _problem(batch=1, steps=1, depth=2)
    repeated = {"keys": keys.expand(1, 40, 6), "values": values.expand(1, 40, 5)}
    before = (memory_forward(params, keys) - values).norm()
    _, memory = titans_chunked(params, repeated["keys"], repeated["values"], repeated["keys"],
                               theta=0.1, eta=0.5, alpha=0.0, chunk_size=1)
    after = (memory_forward(memory, keys) - values).norm()
    assert after < 1e-3 * before


@pytest.mark.parametrize("form", GRADIENT_FORMS)
def test_gradients_of_chunked_match_sequential_for_every_input(form):
    params, keys, values, queries, gates = _problem(batch=1, steps=11)
    inputs = {**params, "keys": keys, "values": values, "queries": queries, **gates}

    def grads(run, **options):
        leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
        out, memory = run({n: leaves[n] for n in params}, leaves["keys"], leaves["values"], leaves["queries"],
                          theta=leaves["theta"], eta=leaves["eta"], alpha=leaves["alpha"], **options)
        loss = out.square().sum() + memory["weight_0"].sum()
        return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))

    expected, got = grads(titans_sequential, gradient_every=4), grads(titans_chunked, chunk_size=4, gradient_form=form)
    for name in inputs:
        assert expected[name].abs().sum() > 0 and _close(got[name], expected[name]), name


def test_gradcheck_of_the_chunked_form():
    params, keys, values, queries, gates = _problem(batch=1, steps=5, dim=3, out_dim=2)
    names = list(params)

    def run(*tensors):
        weights = dict(zip(names, tensors[: len(names)], strict=True))
        k, v, q, theta, eta, alpha = tensors[len(names):]
        return titans_chunked(weights, k, v, q, theta=theta, eta=eta, alpha=alpha, chunk_size=2)[0]

    leaves = [t.clone().requires_grad_() for t in (*params.values(), keys, values, queries,
                                                   gates["theta"], gates["eta"].clamp(0.1, 0.9),
                                                   gates["alpha"].clamp(0.05, 0.95))]
    assert torch.autograd.gradcheck(run, leaves)


def _bad(**changes):
    params, keys, values, queries, gates = _problem(steps=6)
    args = {"params": params, "keys": keys, "values": values, "queries": queries, **gates}
    args.update(changes)
    return args


@pytest.mark.parametrize(("changes", "error", "message"), [
    ({"eta": 1.5}, ValueError, r"eta must be finite and in \[0, 1\]"),
    ({"alpha": -0.1}, ValueError, "alpha must be finite"),
    ({"theta": -1.0}, ValueError, "theta must be finite and >= 0"),
    ({"theta": float("nan")}, ValueError, "theta must be finite"),
    ({"theta": "0.1"}, TypeError, "theta must be a number"),
])
def test_bad_number_gates_raise_with_a_clear_message(changes, error, message):
    """Gates given as numbers are checked; tensors (shapes, dtypes, gate values) are trusted."""
    args = _bad(**changes)
    params = args.pop("params")
    for run in (titans_sequential, titans_chunked):
        with pytest.raises(error, match=message):
            run(params, **args)


def test_bad_options_raise():
    args = _bad()
    params = args.pop("params")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        titans_chunked(params, **args, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        titans_chunked(params, **args, chunk_size=2.0)
    with pytest.raises(ValueError, match="unknown gradients_at 'end'; allowed: chunk_start, call_start"):
        titans_chunked(params, **args, gradients_at="end")
    with pytest.raises(ValueError, match="unknown gradient_form 'autograd'; allowed: factored, vmap"):
        titans_chunked(params, **args, gradient_form="autograd")
    with pytest.raises(ValueError, match="gradient_every must be >= 1"):
        titans_sequential(params, **args, gradient_every=0)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        init_memory(4, depth=0)
    with pytest.raises(ValueError, match="hidden must be >= 1"):
        init_memory(4, hidden=0)
