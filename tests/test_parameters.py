"""Unit tests for nested_lab.parameters: the checks of a notebook's parameters cell."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nested_lab.parameters import (
    boolean,
    check_choice,
    check_ints_at_least,
    check_numbers,
    check_positive_ints,
    integer,
    number,
    number_list,
)


# A notebook parameter's checks, one at a time, through the specs of check_parameters.
def check_bool(name, value):
    return boolean().check(f"parameter {name}", value)


def check_int(name, value, minimum=None, maximum=None):
    return integer(minimum, maximum).check(f"parameter {name}", value)


def check_float(name, value, minimum=None, maximum=None):
    return number(minimum, maximum).check(f"parameter {name}", value)


def check_floats(name, values, minimum=None, maximum=None):
    return number_list(minimum, maximum).check(f"parameter {name}", values)

# ----- check_bool --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, False])
def test_check_bool_accepts_bools(value):
    assert check_bool("QUICK", value) is value


@pytest.mark.parametrize("value", [1, 0, "True", None, 1.0, np.bool_(True)])
def test_check_bool_rejects_non_bools(value):
    with pytest.raises(TypeError, match="parameter QUICK must be True or False"):
        check_bool("QUICK", value)


# ----- check_int ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, -7, 10**12])
def test_check_int_accepts_ints(value):
    assert check_int("STEPS", value) == value


def test_check_int_accepts_range_boundaries():
    assert check_int("STEPS", 1, minimum=1, maximum=5) == 1
    assert check_int("STEPS", 5, minimum=1, maximum=5) == 5


@pytest.mark.parametrize("value", [True, False, 1.0, "3", None, [1]])
def test_check_int_rejects_wrong_type(value):
    with pytest.raises(TypeError, match="parameter STEPS must be an int"):
        check_int("STEPS", value)


def test_check_int_below_minimum_raises():
    with pytest.raises(ValueError, match="parameter STEPS must be >= 1, got 0"):
        check_int("STEPS", 0, minimum=1)


def test_check_int_above_maximum_raises():
    with pytest.raises(ValueError, match="parameter STEPS must be <= 100, got 101"):
        check_int("STEPS", 101, maximum=100)


# ----- check_float -------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(0.1, 0.1), (3, 3.0), (-2.5, -2.5), (np.float64(0.25), 0.25)])
def test_check_float_accepts_numbers_and_returns_float(value, expected):
    result = check_float("LR", value)
    assert type(result) is float
    assert result == expected


def test_check_float_accepts_range_boundaries():
    assert check_float("LR", 0.0, minimum=0.0, maximum=1.0) == 0.0
    assert check_float("LR", 1.0, minimum=0.0, maximum=1.0) == 1.0


@pytest.mark.parametrize("value", [True, False, "0.1", None, [0.1], 1j])
def test_check_float_rejects_wrong_type(value):
    with pytest.raises(TypeError, match="parameter LR must be a number"):
        check_float("LR", value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_check_float_rejects_non_finite(value):
    with pytest.raises(ValueError, match="parameter LR must be finite"):
        check_float("LR", value)


def test_check_float_below_minimum_raises():
    with pytest.raises(ValueError, match=r"parameter LR must be finite and >= 0\.0, got -0\.1"):
        check_float("LR", -0.1, minimum=0.0)


def test_check_float_above_maximum_raises():
    with pytest.raises(ValueError, match=r"parameter LR must be finite and <= 2\.0, got 2\.5"):
        check_float("LR", 2.5, maximum=2.0)


# ----- check_floats ------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [[0.1, 1, 2.5], (0.5,)])
def test_check_floats_accepts_sequences_and_returns_list_of_floats(values):
    result = check_floats("LRS", values)
    assert result == [float(v) for v in values]
    assert all(type(v) is float for v in result)


@pytest.mark.parametrize("values", [[], (), "0.1", b"1", 0.1, None, {0.1, 0.2}, np.array([0.1])])
def test_check_floats_rejects_non_sequences_and_empty(values):
    with pytest.raises(TypeError, match="parameter LRS must be a non-empty list of numbers"):
        check_floats("LRS", values)


def test_check_floats_wrong_item_type_names_the_index():
    with pytest.raises(TypeError, match=r"parameter LRS\[1\] must be a number"):
        check_floats("LRS", [0.1, True])


def test_check_floats_non_finite_item_names_the_index():
    with pytest.raises(ValueError, match=r"parameter LRS\[2\] must be finite"):
        check_floats("LRS", [0.1, 0.2, math.nan])


def test_check_floats_out_of_range_item_names_the_index():
    with pytest.raises(ValueError, match=r"parameter LRS\[0\] must be finite and >= 0"):
        check_floats("LRS", [-1.0, 0.5], minimum=0)
    with pytest.raises(ValueError, match=r"parameter LRS\[1\] must be finite and <= 1"):
        check_floats("LRS", [0.5, 1.5], maximum=1)


# ----- check_choice ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["sgd", "adam"])
def test_check_choice_accepts_allowed(value):
    assert check_choice("OPTIMIZER", value, ["sgd", "adam"]) == value


def test_check_choice_accepts_tuple_of_allowed():
    assert check_choice("OPTIMIZER", "adam", ("sgd", "adam")) == "adam"


@pytest.mark.parametrize("value", ["rmsprop", "SGD", "", None, 3])
def test_check_choice_rejects_not_allowed(value):
    with pytest.raises(ValueError, match=r"unknown OPTIMIZER .*; allowed: sgd, adam"):
        check_choice("OPTIMIZER", value, ["sgd", "adam"])


def test_check_positive_ints_names_the_argument():
    check_positive_ints(a=1, b=7)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        check_positive_ints(chunk_size=0)
    with pytest.raises(TypeError, match="dim must be an int, got float"):
        check_positive_ints(dim=2.0)
    with pytest.raises(TypeError, match="dim must be an int, got bool"):
        check_positive_ints(dim=True)


def test_check_ints_at_least_and_check_numbers():
    check_ints_at_least(0, batch=0)
    with pytest.raises(ValueError, match="steps must be >= 4, got 3"):
        check_ints_at_least(4, steps=3)
    with pytest.raises(TypeError, match="steps must be an int, got str"):
        check_ints_at_least(4, steps="5")
    check_numbers(lr=1, eps=1e-8)
    with pytest.raises(TypeError, match="lr must be a number, got str"):
        check_numbers(lr="0.1")
    with pytest.raises(TypeError, match="lr must be a number, got bool"):
        check_numbers(lr=True)


def _library_calls_with_an_int_argument(value):
    """(argument, call) for every library entry point that takes a count or a size, with ``value``
    as that argument."""
    from nested_lab import runtime
    from nested_lab.data.corpus import CharCorpus, stdlib_text
    from nested_lab.experiments import bench
    from nested_lab.experiments import meta_loss_collapse as lr_control
    from nested_lab.experiments import reading_this_book as quadratic
    from nested_lab.experiments.meta_loss_collapse import controller_saturation
    from nested_lab.memory.consolidation import Consolidator
    from nested_lab.memory.ltm import LongTermMemory
    from nested_lab.memory.stm import ShortTermMemory
    from nested_lab.models.char_mlp import CharMLP
    from nested_lab.optim import ContinuumConfig
    from nested_lab.optim.clipping import AdaptiveClipper
    from nested_lab.optim.meta_losses import ProxyMetaLoss
    from nested_lab.train import metrics
    from nested_lab.train.guards import SpikeGuard
    from nested_lab.viz.dashboard import LiveDashboard
    from nested_lab.viz.style import colors

    corpus = CharCorpus.from_text(stdlib_text()[:5000])
    losses = [float(i % 7) for i in range(100)]
    return [
        ("steps", lambda: controller_saturation([1.0], [0], steps=value)),
        ("steps", lambda: lr_control.train(None, 0, value, fixed_lr=1e-3)),
        ("steps", lambda: lr_control.train_ensemble(ContinuumConfig.original(), [0], value)),
        ("window", lambda: AdaptiveClipper(1.0, window=value)),
        ("warmup", lambda: AdaptiveClipper(1.0, warmup=value)),
        ("window", lambda: SpikeGuard(window=value)),
        ("warmup", lambda: SpikeGuard(warmup=value)),
        ("checkpoint_every", lambda: SpikeGuard(checkpoint_every=value)),
        ("vocab_size", lambda: CharMLP(value)),
        ("context", lambda: CharMLP(10, context=value)),
        ("embed", lambda: CharMLP(10, embed=value)),
        ("hidden", lambda: CharMLP(10, hidden=value)),
        ("every", lambda: LiveDashboard(every=value)),
        ("n", lambda: colors(value)),
        ("n", lambda: quadratic.random_hessians(value, 2, runtime.generator(0))),
        ("dim", lambda: quadratic.random_hessians(2, value, runtime.generator(0))),
        ("iterations", lambda: quadratic.measured_critical_lr(quadratic.random_hessians(1, 2, runtime.generator(0)),
                                                              runtime.generator(0), iterations=value)),
        ("batch_size", lambda: corpus.batch("train", value, 4, runtime.generator(0))),
        ("context", lambda: corpus.batch("train", 2, value, runtime.generator(0))),
        ("capacity", lambda: ShortTermMemory(8, capacity=value)),
        ("top_k", lambda: LongTermMemory(8, top_k=value)),
        ("code_dim", lambda: LongTermMemory(8, code_dim=value)),
        ("interval", lambda: Consolidator(8, 4, interval=value)),
        ("threshold", lambda: Consolidator(8, 4, threshold=value)),
        ("warmup", lambda: ProxyMetaLoss(warmup=value)),
        ("rounds", lambda: bench.interleaved_rounds({"a": lambda: None}, rounds=value)),
        ("calls", lambda: bench.interleaved_rounds({"a": lambda: None}, calls=value)),
        ("lag", lambda: metrics.autocorrelation(losses, value)),
        ("window", lambda: metrics.count_spikes(losses, window=value)),
    ]


@pytest.mark.parametrize(("value", "error", "message"), [(0, ValueError, "must be >= 1, got 0"),
                                                          (2.0, TypeError, "must be an int, got float")])
def test_library_counts_and_sizes_are_checked(value, error, message):
    for name, call in _library_calls_with_an_int_argument(value):
        with pytest.raises(error, match=f"{name} {message}"):
            call()


def test_numpy_integers_count_as_ints():
    check_positive_ints(n=np.int64(3))
    with pytest.raises(ValueError, match="n must be >= 1"):
        check_positive_ints(n=np.int64(0))


# ----- check_range and check_parameters -----------------------------------------------------------


from nested_lab.parameters import (  # noqa: E402
    check_parameters,
    check_range,
    choice,
    integer_list,
)


@pytest.mark.parametrize(("kwargs", "value", "message"), [
    ({"low": 0, "low_open": True}, 0.0, r"x must be finite and > 0, got 0\.0"),
    ({"low": 0, "high": 1, "high_open": True}, 1.0, r"x must be finite and in \[0, 1\), got 1\.0"),
    ({"low": 0, "high": 1, "low_open": True}, 0, r"x must be finite and in \(0, 1\], got 0"),
    ({"high": 2}, float("nan"), r"x must be finite and <= 2, got nan"),
    ({}, float("inf"), r"x must be finite, got inf"),
    ({"low": 1, "integer": True}, 0, r"x must be >= 1, got 0"),
])
def test_check_range_names_the_interval(kwargs, value, message):
    with pytest.raises(ValueError, match=message):
        check_range("x", value, **kwargs)


def test_check_range_types():
    assert check_range("x", np.int64(3), 1, integer=True) == 3
    assert check_range("x", 2, 0) == 2.0
    with pytest.raises(TypeError, match="x must be an int, got float"):
        check_range("x", 2.0, integer=True)
    with pytest.raises(TypeError, match="x must be a number, got bool"):
        check_range("x", True)


def test_check_parameters_checks_every_named_parameter():
    spec = {"QUICK": boolean(), "SEED": integer(0), "LR": number(0, low_open=True),
            "LRS": number_list(0, 1), "KS": integer_list(1), "OPTIMIZER": choice("sgd", "adam")}
    values = {"QUICK": True, "SEED": 0, "LR": 0.1, "LRS": [0.5], "KS": [1, 5], "OPTIMIZER": "sgd"}
    check_parameters(values, **spec)
    for name, bad, error, message in [("QUICK", 1, TypeError, "parameter QUICK must be True or False"),
                                      ("SEED", -1, ValueError, "parameter SEED must be >= 0, got -1"),
                                      ("LR", 0.0, ValueError, "parameter LR must be finite and > 0"),
                                      ("LRS", [2.0], ValueError, r"parameter LRS\[0\] must be finite and in"),
                                      ("KS", [1, 2.0], TypeError, r"parameter KS\[1\] must be an int"),
                                      ("OPTIMIZER", "x", ValueError, "unknown parameter OPTIMIZER 'x'")]:
        with pytest.raises(error, match=message):
            check_parameters({**values, name: bad}, **spec)
    with pytest.raises(NameError, match="parameter STEPS is not defined"):
        check_parameters(values, STEPS=integer(1))
