"""Benchmark helpers: interleaved rounds and ratios."""

from __future__ import annotations

import pytest
import torch

from nested_lab import runtime
from nested_lab.experiments import bench


def test_interleaved_rounds_take_turns_and_count_calls():
    order = []
    candidates = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    seconds = bench.interleaved_rounds(candidates, rounds=3, calls=2, warmup=1)
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert {name: len(values) for name, values in seconds.items()} == {"a": 3, "b": 3}
    assert all(v >= 0 for values in seconds.values() for v in values)


def test_interleaved_timings_keep_the_best_round_and_ratios_divide():
    timings = bench.interleaved_timings({"x": lambda: None}, rounds=2, calls=1, warmup=0)
    assert set(timings) == {"x"}
    assert bench.ratios({"a": 2.0, "b": 3.0}, "a") == {"a": 1.0, "b": 1.5}


def test_bad_benchmark_inputs():
    with pytest.raises(ValueError, match="at least one candidate"):
        bench.interleaved_rounds({})
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        bench.interleaved_rounds({"a": lambda: None}, rounds=0)
    with pytest.raises(TypeError, match="rounds must be an int"):
        bench.interleaved_rounds({"a": lambda: None}, rounds=True)
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        bench.interleaved_rounds({"a": lambda: None}, warmup=-1)
    with pytest.raises(ValueError, match="reference"):
        bench.ratios({"a": 1.0}, "b")


def test_batched_matmul_gflops_is_a_positive_throughput():
    gflops = bench.batched_matmul_gflops(size=16, batch=8, rounds=2)
    assert 0 < gflops < 1e6


def test_delta_rule_flops_by_hand():
    # one head, three tokens in two chunks of 2 (the second padded), Dk = 2, Dv = 1, per chunk:
    # A, W = T K and Q K^T 16 each; U = T V and tril(Q K^T) delta 8 each; W S, K^T delta, Q S 8 each;
    # T = (I + A)^{-1} diag(beta): one multiply-add in one of 2 columns, 2 * 1 * 2 = 4
    assert bench.delta_rule_flops(1, 1, 3, 2, 1, 2) == 2 * (3 * 16 + 2 * 8 + 3 * 8 + 4)
    assert bench.delta_rule_flops(2, 3, 100, 8, 4, 64) == bench.delta_rule_flops(2, 3, 128, 8, 4, 64)
    assert bench.delta_rule_flops(1, 4, 4096, 64, 64, 64) == pytest.approx(1.14e9, rel=1e-3)


def _counted_flops(batch: int, heads: int, length: int, key_dim: int, value_dim: int, chunk_size: int) -> int:
    """The matrix products of one call of the chunked rule, as torch's flop counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    from nested_lab.memory.delta_rule import delta_rule_chunked

    gen = runtime.generator(0)
    q, k = (torch.randn(batch, heads, length, key_dim, generator=gen) for _ in range(2))
    v = torch.randn(batch, heads, length, value_dim, generator=gen)
    beta = torch.rand(batch, heads, length, generator=gen)
    in_place = {torch.ops.aten.baddbmm_: _batched_product_flops}  # torch counts only the out-of-place one
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        delta_rule_chunked(q, k, v, beta, chunk_size=chunk_size)
    return counter.get_total_flops()


def _batched_product_flops(input_shape, left_shape, right_shape, **_) -> int:
    batch, rows, inner = left_shape
    return 2 * batch * rows * inner * right_shape[-1]


@pytest.mark.parametrize(("batch", "heads", "length", "key_dim", "value_dim", "chunk_size"),
                         [(2, 3, 37, 8, 5, 16), (1, 2, 9, 4, 6, 5), (1, 1, 5, 4, 6, 1)])
def test_delta_rule_flops_counts_what_the_chunked_rule_computes(batch, heads, length, key_dim, value_dim,
                                                                 chunk_size):
    """Chunks of at most 16 tokens invert ``I + A`` with one triangular solve: the products counted
    by torch plus that solve, counted as forward substitution does it (row i: i multiply-adds per
    column, C columns), make the whole count."""
    chunks = -(-length // chunk_size)
    solve = batch * heads * chunks * chunk_size * sum(2 * row for row in range(chunk_size))
    counted = _counted_flops(batch, heads, length, key_dim, value_dim, chunk_size)
    assert counted + solve == bench.delta_rule_flops(batch, heads, length, key_dim, value_dim, chunk_size)


def test_delta_rule_flops_bounds_the_block_inverse():
    """Chunks of 64 build the inverse from four solves of 16 and products: fewer operations than the
    one solve counted, but more than none."""
    exact = bench.delta_rule_flops(1, 2, 128, 16, 16, 64)
    without_solve = exact - 2 * 2 * 64 * 63 * 64
    counted = _counted_flops(1, 2, 128, 16, 16, 64) + 2 * 2 * 4 * 16 * 15 * 16  # + the four solves of 16
    assert without_solve < counted < exact


def test_bad_throughput_inputs():
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        bench.batched_matmul_gflops(size=0)
    with pytest.raises(TypeError, match="rounds must be an int, got float"):
        bench.batched_matmul_gflops(rounds=1.5)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        bench.delta_rule_flops(1, 1, 8, 4, 4, 0)
    with pytest.raises(TypeError, match="length must be an int, got bool"):
        bench.delta_rule_flops(1, 1, True, 4, 4, 2)
