"""The delta rule: the token-by-token reference, the plain chunkwise reference (UT transform) and the
optimised chunked form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nested_lab import runtime
from nested_lab.memory import delta_rule
from nested_lab.memory.delta_rule import (
    delta_rule_chunked,
    delta_rule_chunkwise_reference,
    delta_rule_recurrent,
)


def _inputs(batch: int, heads: int, length: int, key_dim: int, value_dim: int, seed: int = 0,
            dtype: torch.dtype = torch.float32, with_state: bool = True) -> dict[str, torch.Tensor | None]:
    """Random q, k, v, beta in [0, 1] and an initial state; q and k L2-normalised (the rule is
    contractive only for ``beta ||k||^2 <= 2``)."""
    gen = runtime.generator(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return {
        "q": F.normalize(randn(batch, heads, length, key_dim), dim=-1),
        "k": F.normalize(randn(batch, heads, length, key_dim), dim=-1),
        "v": randn(batch, heads, length, value_dim),
        "beta": torch.rand(batch, heads, length, generator=gen, dtype=torch.float64).to(dtype),
        "initial_state": randn(batch, heads, key_dim, value_dim) if with_state else None,
    }


def _values_and_grads(run, inputs: dict[str, torch.Tensor | None], seed: int = 1):
    """Outputs, final state and the gradients of a fixed random linear function of both
    with respect to every input tensor."""
    leaves = {name: x.clone().requires_grad_() for name, x in inputs.items() if x is not None}
    full = {name: leaves.get(name) for name in inputs}
    outputs, state = run(**full)
    gen = runtime.generator(seed)
    weights_out = torch.randn(outputs.shape, generator=gen, dtype=torch.float64).to(outputs.dtype)
    weights_state = torch.randn(state.shape, generator=gen, dtype=torch.float64).to(state.dtype)
    loss = (outputs * weights_out).sum() + (state * weights_state).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return outputs.detach(), state.detach(), dict(zip(leaves, grads, strict=True))


def _assert_same(first, second, atol: float) -> None:
    """Outputs and final states within ``atol``; gradients within ``atol`` times their largest
    entry (they reach tens, where fp32 itself carries errors of order 1e-6)."""
    out_a, state_a, grads_a = first
    out_b, state_b, grads_b = second
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=0)
    torch.testing.assert_close(state_a, state_b, atol=atol, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        scale = max(1.0, grads_b[name].abs().max().item())
        error = (grads_a[name] - grads_b[name]).abs().max().item()
        assert error <= atol * scale, f"gradient of {name}: error {error:.2e} > {atol:.0e} x {scale:.1f}"


# --- chunked == recurrent ------------------------------------------------------------------------

SHAPES = [  # batch, heads, length, key_dim, value_dim, chunk_size
    (1, 2, 64, 16, 16, 16),
    (1, 3, 48, 8, 12, 3),
    (2, 1, 24, 12, 6, 1),
    (1, 1, 80, 32, 32, 64),
    (1, 2, 1, 8, 8, 16),  # ragged tails: a single token,
    (2, 1, 37, 8, 5, 16),  # a partial last chunk,
    (1, 2, 100, 16, 24, 16),  # and another
    (1, 1, 20, 4, 4, 64),  # one chunk longer than the sequence
]


@pytest.mark.parametrize("with_state", [True, False], ids=["initial_state", "zero_state"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}t{}dk{}dv{}c{}".format(*s))
def test_chunked_matches_recurrent_in_fp32(shape, with_state):
    *dims, chunk_size = shape
    inputs = _inputs(*dims, with_state=with_state)
    reference = _values_and_grads(delta_rule_recurrent, inputs)
    chunked = _values_and_grads(lambda **x: delta_rule_chunked(**x, chunk_size=chunk_size), inputs)
    _assert_same(chunked, reference, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}t{}dk{}dv{}c{}".format(*s))
def test_recurrence_reference_chunkwise_and_chunked_agree(shape):
    """The three forms: token by token, the plain chunk loop in the paper's symbols, and the optimised
    chunked form; outputs and final state (ragged lengths included)."""
    *dims, chunk_size = shape
    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        inputs = _inputs(*dims, dtype=dtype)
        recurrent = delta_rule_recurrent(**inputs)
        reference = delta_rule_chunkwise_reference(**inputs, chunk_size=chunk_size)
        chunked = delta_rule_chunked(**inputs, chunk_size=chunk_size)
        for got in (reference, chunked):
            torch.testing.assert_close(got[0], recurrent[0], atol=atol, rtol=0)
            torch.testing.assert_close(got[1], recurrent[1], atol=atol, rtol=0)


def test_reference_chunkwise_form_starts_from_zeros_and_has_gradients():
    inputs = _inputs(1, 2, 23, 8, 6, dtype=torch.float64, with_state=False)
    reference = _values_and_grads(lambda **x: delta_rule_chunkwise_reference(**x, chunk_size=5), inputs)
    _assert_same(reference, _values_and_grads(delta_rule_recurrent, inputs), atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 32])
def test_substitution_matches_solve(chunk_size):
    inputs = _inputs(2, 2, 45, 8, 6, dtype=torch.float64)
    solve = _values_and_grads(lambda **x: delta_rule_chunked(**x, chunk_size=chunk_size), inputs)
    substitution = _values_and_grads(
        lambda **x: delta_rule_chunked(**x, chunk_size=chunk_size, inverse="substitution"), inputs)
    _assert_same(substitution, solve, atol=1e-12)


def test_chunked_matches_recurrent_tightly_in_float64():
    inputs = _inputs(1, 2, 70, 8, 8, dtype=torch.float64)
    reference = _values_and_grads(delta_rule_recurrent, inputs)
    chunked = _values_and_grads(lambda **x: delta_rule_chunked(**x, chunk_size=16), inputs)
    _assert_same(chunked, reference, atol=1e-12)


@pytest.mark.parametrize("segment_rows", [1, 50, 10**9], ids=["chunk_by_chunk", "a_few_chunks", "all_at_once"])
def test_segments_do_not_change_the_result(monkeypatch, segment_rows):
    """Long sequences are processed a few chunks at a time (``SEGMENT_ROWS``); the state is carried over."""
    monkeypatch.setattr(delta_rule, "SEGMENT_ROWS", segment_rows)
    inputs = _inputs(1, 2, 45, 8, 6, dtype=torch.float64)
    reference = _values_and_grads(delta_rule_recurrent, inputs)
    chunked = _values_and_grads(lambda **x: delta_rule_chunked(**x, chunk_size=4), inputs)
    _assert_same(chunked, reference, atol=1e-12)


@pytest.mark.parametrize("size", [1, 7, 16, 17, 34, 48, 64, 96])
def test_block_inverse_is_the_inverse(size):
    """Above ``SOLVE_BLOCK`` rows the inverse of ``I + A`` is assembled from halves (odd sizes are
    solved whole); only the strict lower triangle of its argument is read."""
    full = torch.randn(3, size, size, generator=runtime.generator(size), dtype=torch.float64) / size**0.5
    expected = torch.linalg.inv(torch.eye(size, dtype=torch.float64) + full.tril(-1))
    torch.testing.assert_close(delta_rule._unit_lower_inverse(full), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(delta_rule._forward_substitution(full.tril(-1)), expected, atol=1e-10, rtol=0)


def test_non_contiguous_inputs():
    inputs = _inputs(2, 3, 33, 8, 8)
    time_major = {name: x.transpose(1, 2).contiguous().transpose(1, 2) for name, x in inputs.items()
                  if name in ("q", "k", "v")}
    assert not time_major["q"].is_contiguous()
    outputs, state = delta_rule_chunked(**{**inputs, **time_major}, chunk_size=8)
    expected_outputs, expected_state = delta_rule_recurrent(**inputs)
    torch.testing.assert_close(outputs, expected_outputs, atol=1e-5, rtol=0)
    torch.testing.assert_close(state, expected_state, atol=1e-5, rtol=0)


# --- what the rule does --------------------------------------------------------------------------

def _column_vector_reference(q, k, v, beta, initial_state):
    """Yang et al. 2024, eq. 1, transcribed literally: ``S`` is ``Dv x Dk``,
    ``S_t = S_{t-1} - beta_t (S_{t-1} k_t - v_t) k_t^T``, ``o_t = S_t q_t``; one loop per index."""
    batch, heads, length, _ = q.shape
    outputs = torch.zeros(batch, heads, length, v.shape[-1], dtype=q.dtype)
    final = torch.zeros_like(initial_state)
    for b in range(batch):
        for h in range(heads):
            state = initial_state[b, h].T.clone()
            for t in range(length):
                k_t, v_t, q_t = k[b, h, t][:, None], v[b, h, t][:, None], q[b, h, t][:, None]
                state = state - beta[b, h, t] * (state @ k_t - v_t) @ k_t.T
                outputs[b, h, t] = (state @ q_t)[:, 0]
            final[b, h] = state.T
    return outputs, final


def test_recurrent_is_the_column_vector_formula():
    inputs = _inputs(2, 2, 6, 3, 4, dtype=torch.float64)
    expected = _column_vector_reference(**inputs)
    for got in (delta_rule_recurrent(**inputs), delta_rule_chunked(**inputs, chunk_size=4),
                delta_rule_chunkwise_reference(**inputs, chunk_size=4)):
        torch.testing.assert_close(got[0], expected[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(got[1], expected[1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("run", [delta_rule_recurrent, lambda **x: delta_rule_chunked(**x, chunk_size=4)],
                         ids=["recurrent", "chunked"])
def test_a_full_step_write_is_read_back_exactly(run):
    """With ``||k|| = 1`` and ``beta = 1`` the write replaces what the key held: reading the same
    key right after returns ``v``, whatever the state held before."""
    inputs = _inputs(2, 2, 11, 8, 5, dtype=torch.float64)
    inputs["q"] = inputs["k"]
    inputs["beta"] = torch.ones_like(inputs["beta"])
    outputs, _ = run(**inputs)
    torch.testing.assert_close(outputs, inputs["v"], atol=1e-12, rtol=0)
    single = {name: x[:, :, :1] if name != "initial_state" else torch.zeros_like(x) for name, x in inputs.items()}
    outputs, state = run(**single)
    torch.testing.assert_close(outputs, single["v"], atol=1e-12, rtol=0)
    torch.testing.assert_close(state, single["k"][:, :, 0, :, None] * single["v"][:, :, 0, None, :],
                               atol=1e-12, rtol=0)


def test_tokens_with_zero_beta_leave_the_state_unchanged():
    inputs = _inputs(1, 2, 20, 8, 8, dtype=torch.float64)
    inputs["beta"] = torch.zeros_like(inputs["beta"])
    for run in (delta_rule_recurrent, lambda **x: delta_rule_chunked(**x, chunk_size=8)):
        outputs, state = run(**inputs)
        torch.testing.assert_close(state, inputs["initial_state"], atol=0, rtol=0)
        torch.testing.assert_close(outputs, inputs["q"] @ inputs["initial_state"], atol=1e-12, rtol=0)


def test_zero_initial_state_is_the_default():
    inputs = _inputs(1, 2, 10, 4, 6, with_state=False)
    zeros = {**inputs, "initial_state": torch.zeros(1, 2, 4, 6)}
    for run in (delta_rule_recurrent, delta_rule_chunked):
        assert all(torch.equal(a, b) for a, b in zip(run(**inputs), run(**zeros), strict=True))


def test_outputs_and_state_shapes():
    inputs = _inputs(2, 3, 13, 4, 7)
    for run in (delta_rule_recurrent, lambda **x: delta_rule_chunked(**x, chunk_size=5)):
        outputs, state = run(**inputs)
        assert outputs.shape == (2, 3, 13, 7) and state.shape == (2, 3, 4, 7)
        assert outputs.dtype == state.dtype == torch.float32


# --- bad options ---------------------------------------------------------------------------------
# The kernels trust their tensors (shapes, dtypes, devices, beta in [0, 1]): only the plain options
# of delta_rule_chunked are checked.

def _bad(**changes) -> dict[str, object]:
    return {**_inputs(1, 2, 6, 4, 3), **changes}


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"chunk_size": 0}, ValueError, "chunk_size must be >= 1, got 0"),
    ({"chunk_size": -3}, ValueError, "chunk_size must be >= 1, got -3"),
    ({"chunk_size": 2.0}, TypeError, "chunk_size must be an int, got float"),
    ({"chunk_size": True}, TypeError, "chunk_size must be an int, got bool"),
    ({"inverse": "inv"}, ValueError, "unknown inverse 'inv'; allowed: solve, substitution"),
])
def test_bad_chunk_options_raise(options, error, message):
    with pytest.raises(error, match=message):
        delta_rule_chunked(**_bad(), **options)
