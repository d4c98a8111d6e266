"""Benchmark helpers: interleaved rounds and ratios."""

from __future__ import annotations

import pytest

from nested_lab import bench


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
    with pytest.raises(ValueError, match="rounds >= 1"):
        bench.interleaved_rounds({"a": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="reference"):
        bench.ratios({"a": 1.0}, "b")
