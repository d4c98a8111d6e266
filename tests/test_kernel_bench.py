"""The kernel benchmark: candidates compute the same numbers, and the table is well formed."""

from __future__ import annotations

import pandas as pd
import pytest

from nested_lab.experiments import titan_self_modification as tsm


@pytest.mark.parametrize("make", [tsm.delta_rule_candidates, tsm.titans_candidates])
def test_scaling_table_has_every_candidate_and_matching_outputs(make):
    table = tsm.scaling(lambda length: make(length, heads=2, dim=16, chunk_size=8), [24, 40], rounds=1)
    names = list(make(24, heads=2, dim=16, chunk_size=8))
    assert list(table.columns) == ["length", "candidate", "seconds", "speedup", "max_error"]
    assert table["candidate"].tolist() == names * 2
    assert table["length"].tolist() == [24] * len(names) + [40] * len(names)
    assert (table["seconds"] > 0).all()
    reference = table[table["candidate"] == names[0]]
    assert (reference["speedup"] == 1.0).all() and (reference["max_error"] == 0.0).all()
    assert table["max_error"].max() < 1e-4


def test_scaling_needs_a_length():
    with pytest.raises(ValueError, match="at least one sequence length"):
        tsm.scaling(tsm.delta_rule_candidates, [])


def test_titans_staleness_is_zero_for_one_token_chunks_and_grows_with_chunk_size():
    table = tsm.titans_staleness(length=32, chunk_sizes=(1, 8), seed=0)
    error = table.set_index(["chunk size", "gradients at"])["relative error"]
    assert error[(1, "chunk_start")] < 1e-5
    assert error[(8, "chunk_start")] > error[(1, "chunk_start")]
    assert error[(8, "call_start")] >= error[(8, "chunk_start")]


def test_delta_rule_matmul_fraction_is_the_ratio_of_two_positive_rates():
    result = tsm.delta_rule_matmul_fraction(64, heads=2, dim=16, chunk_size=8, rounds=1)
    assert set(result) == {"kernel_gflops", "matmul_gflops", "fraction"}
    assert result["kernel_gflops"] > 0 and result["matmul_gflops"] > 0
    assert result["fraction"] == pytest.approx(result["kernel_gflops"] / result["matmul_gflops"])


def test_kernel_speeds_need_the_goal_length_before_timing_anything():
    with pytest.raises(ValueError, match="titans_lengths must include 1024"):
        tsm.kernel_speeds([1024], [256])


def test_speed_goals_read_the_scaling_tables():
    delta = pd.DataFrame({"candidate": ["delta: recurrent", "delta: chunked, triangular solve",
                                        "delta: chunked, row substitution",
                                        "delta: chunked, triangular solve, chunk 32"],
                          "seconds": [2.0, 0.1, 0.2, 0.08], "speedup": [1.0, 20.0, 10.0, 25.0]}).set_index("candidate")
    titans = pd.DataFrame({"candidate": ["Titans: chunk-parallel", "Titans: chunk-parallel, vmap"],
                           "speedup": [8.0, 2.0]}).set_index("candidate")
    goals = tsm.speed_goals(delta, titans, 0.4, longest=4096)
    assert goals["measured"].tolist() == [25.0, 2.0, 0.4, 8.0, 2.0]
    assert goals["met"].tolist() == [True, True, False, True, False]
    table = pd.DataFrame({"length": [1, 2, 2], "candidate": ["a", "a", "b"], "seconds": [1.0, 2.0, 3.0]})
    assert tsm.at_length(table, 2)["seconds"].to_dict() == {"a": 2.0, "b": 3.0}
