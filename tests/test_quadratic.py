"""Unit tests for nested_lab.experiments.reading_this_book (chapter 0): gradient descent on quadratics
and its stability boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nested_lab.experiments import reading_this_book as quadratic
from nested_lab.runtime import generator


def _scalar_regimes(rates: list[float], steps: int = 50) -> list[str]:
    trajectories = quadratic.gd_scalar_trajectories(rates, [1.0], steps=steps)
    return quadratic.regime(trajectories[:, :, 0])


# ----- gd_scalar_trajectories --------------------------------------------------------------------


def test_gd_scalar_trajectories_match_closed_form():
    lrs, curvatures, x0, steps = [0.1, 0.5, 1.0, 1.3], [0.5, 1.0, 2.0, 3.0], 1.5, 50
    result = quadratic.gd_scalar_trajectories(lrs, curvatures, x0=x0, steps=steps)
    rate = torch.tensor(lrs, dtype=torch.float64)[:, None] * torch.tensor(curvatures, dtype=torch.float64)[None, :]
    t = torch.arange(steps + 1, dtype=torch.float64)[:, None, None]
    expected = x0 * (1 - rate) ** t
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


def test_gd_scalar_trajectories_shape_dtype_and_start():
    result = quadratic.gd_scalar_trajectories([0.1, 0.2, 0.3], [1.0, 2.0], x0=-2.0, steps=7)
    assert result.shape == (8, 3, 2)
    assert result.dtype == torch.float64
    assert torch.equal(result[0], torch.full((3, 2), -2.0, dtype=torch.float64))


def test_gd_scalar_trajectories_default_steps():
    assert quadratic.gd_scalar_trajectories([0.1], [1.0]).shape == (51, 1, 1)


def test_gd_scalar_trajectories_accept_numpy_and_torch_inputs():
    from_lists = quadratic.gd_scalar_trajectories([0.1, 0.9], [2.0], steps=5)
    from_arrays = quadratic.gd_scalar_trajectories(np.array([0.1, 0.9]), torch.tensor([2.0]), steps=5)
    assert torch.equal(from_lists, from_arrays)


def test_gd_scalar_trajectories_unit_rate_reaches_zero_in_one_step():
    result = quadratic.gd_scalar_trajectories([0.5], [2.0], steps=3)
    assert result[:, 0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("lrs", [[0.1, 0.0], [-0.1], [float("nan")], [float("inf")]])
def test_gd_scalar_trajectories_non_positive_lrs_raise(lrs):
    with pytest.raises(ValueError, match="lrs must be finite and > 0"):
        quadratic.gd_scalar_trajectories(lrs, [1.0])


@pytest.mark.parametrize("lrs", [[[0.1, 0.2]], [], 0.1])
def test_gd_scalar_trajectories_non_vector_lrs_raise(lrs):
    with pytest.raises(ValueError, match="lrs must be a non-empty 1-D sequence"):
        quadratic.gd_scalar_trajectories(lrs, [1.0])


def test_gd_scalar_trajectories_bad_curvatures_raise():
    with pytest.raises(ValueError, match="curvatures must be finite and > 0"):
        quadratic.gd_scalar_trajectories([0.1], [1.0, -2.0])
    with pytest.raises(ValueError, match="curvatures must be a non-empty 1-D sequence"):
        quadratic.gd_scalar_trajectories([0.1], [[1.0]])


@pytest.mark.parametrize(("steps", "error", "message"), [
    (0, ValueError, "steps must be >= 1"), (-1, ValueError, "steps must be >= 1"),
    (True, TypeError, "steps must be an int"), (False, TypeError, "steps must be an int"),
    (2.0, TypeError, "steps must be an int"), ("10", TypeError, "steps must be an int")])
def test_gd_scalar_trajectories_bad_steps_raise(steps, error, message):
    with pytest.raises(error, match=message):
        quadratic.gd_scalar_trajectories([0.1], [1.0], steps=steps)


# ----- regime ------------------------------------------------------------------------------------


def test_regime_of_the_three_textbook_cases():
    assert _scalar_regimes([0.5, 1.5, 2.5]) == ["monotone", "oscillating", "divergent"]


@pytest.mark.parametrize(("rate", "expected"), [
    (0.01, "monotone"), (0.99, "monotone"), (1.0, "monotone"), (1.01, "oscillating"),
    (1.99, "oscillating"), (2.01, "divergent"), (10.0, "divergent"),
])
def test_regime_near_the_boundaries(rate, expected):
    assert _scalar_regimes([rate]) == [expected]


def test_regime_accepts_negative_start():
    trajectories = quadratic.gd_scalar_trajectories([0.5, 1.5, 2.5], [1.0], x0=-1.0)[:, :, 0]
    assert quadratic.regime(trajectories) == ["monotone", "oscillating", "divergent"]


def test_regime_of_two_point_trajectories():
    assert quadratic.regime(torch.tensor([[1.0, 1.0, 1.0], [0.5, -0.5, 3.0]])) == [
        "monotone", "oscillating", "divergent"]


@pytest.mark.parametrize("shape", [(5,), (5, 2, 2), (1, 3), (0, 3)])
def test_regime_bad_shape_raises(shape):
    with pytest.raises(ValueError, match=r"trajectories must have shape \[steps \+ 1 >= 2, n\]"):
        quadratic.regime(torch.ones(shape))


def test_regime_of_overflowing_divergent_run_is_divergent():
    assert _scalar_regimes([100.0], steps=200) == ["divergent"]


# ----- random_hessians ---------------------------------------------------------------------------


def test_random_hessians_shape_and_dtype():
    hessians = quadratic.random_hessians(3, 5, generator(0))
    assert hessians.shape == (3, 5, 5)
    assert hessians.dtype == torch.float64


def test_random_hessians_are_symmetric_positive_definite():
    hessians = quadratic.random_hessians(4, 6, generator(1))
    torch.testing.assert_close(hessians, hessians.transpose(1, 2), rtol=0, atol=1e-12)
    assert (torch.linalg.eigvalsh(hessians) > 0).all()


@pytest.mark.parametrize("max_eig", [4.0, 0.3, 25.0])
def test_random_hessians_top_eigenvalue_is_max_eig(max_eig):
    eigenvalues = torch.linalg.eigvalsh(quadratic.random_hessians(5, 4, generator(2), max_eig=max_eig))
    torch.testing.assert_close(eigenvalues[:, -1], torch.full((5,), max_eig, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    assert (eigenvalues[:, :-1] < max_eig).all()


def test_random_hessians_have_spread_of_eigenvalues():
    eigenvalues = torch.linalg.eigvalsh(quadratic.random_hessians(1, 8, generator(3)))[0]
    assert eigenvalues[0] < 0.9 * eigenvalues[-1]


def test_random_hessians_reproducible_for_same_seed():
    assert torch.equal(quadratic.random_hessians(2, 3, generator(5)), quadratic.random_hessians(2, 3, generator(5)))


def test_random_hessians_differ_for_other_seed():
    assert not torch.equal(quadratic.random_hessians(2, 3, generator(5)), quadratic.random_hessians(2, 3, generator(6)))


def test_random_hessians_one_dimensional():
    hessians = quadratic.random_hessians(2, 1, generator(0), max_eig=3.0)
    torch.testing.assert_close(hessians, torch.full((2, 1, 1), 3.0, dtype=torch.float64))


@pytest.mark.parametrize(("n", "dim", "max_eig", "message"), [
    (0, 3, 4.0, "n must be >= 1"), (-1, 3, 4.0, "n must be >= 1"), (2, 0, 4.0, "dim must be >= 1"),
    (2, 3, 0.0, "max_eig must be finite and > 0"), (2, 3, -1.0, "max_eig must be finite and > 0")])
def test_random_hessians_bad_arguments_raise(n, dim, max_eig, message):
    with pytest.raises(ValueError, match=message):
        quadratic.random_hessians(n, dim, generator(0), max_eig=max_eig)


# ----- measured_critical_lr ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_hessians() -> torch.Tensor:
    return quadratic.random_hessians(3, 4, generator(3))


@pytest.fixture(scope="module")
def measured(small_hessians: torch.Tensor) -> torch.Tensor:
    return quadratic.measured_critical_lr(small_hessians, generator(103), steps=2000)


def test_measured_critical_lr_agrees_with_two_over_lambda_max(small_hessians, measured):
    theory = 2 / torch.linalg.eigvalsh(small_hessians)[:, -1]
    assert measured.shape == (3,)
    torch.testing.assert_close(measured, theory, rtol=1e-3, atol=0)


def test_measured_critical_lr_is_never_below_the_true_boundary(small_hessians, measured):
    # every lr < 2 / lambda_max shrinks every component, so the bisection cannot stop below it
    theory = 2 / torch.linalg.eigvalsh(small_hessians)[:, -1]
    assert (measured >= theory * (1 - 1e-9)).all()


def test_measured_critical_lr_halves_when_hessian_doubles():
    hessians = quadratic.random_hessians(3, 4, generator(11))
    base = quadratic.measured_critical_lr(hessians, generator(12), steps=300, iterations=30)
    doubled = quadratic.measured_critical_lr(2 * hessians, generator(12), steps=300, iterations=30)
    torch.testing.assert_close(doubled, base / 2, rtol=1e-9, atol=0)


def test_measured_critical_lr_depends_only_on_top_eigenvalue():
    hessians = torch.stack([torch.diag(torch.tensor(d, dtype=torch.float64)) for d in
                            ([4.0, 1.0, 0.5], [1.0, 1.0, 1.0], [2.0, 0.1, 0.1], [2.0, 1.9, 1.0])])
    result = quadratic.measured_critical_lr(hessians, generator(0), steps=2000, iterations=30)
    torch.testing.assert_close(result, torch.tensor([0.5, 2.0, 1.0, 1.0], dtype=torch.float64), rtol=1e-3, atol=0)


def test_measured_critical_lr_reproducible_for_seeded_generator():
    hessians = quadratic.random_hessians(2, 3, generator(4))
    first = quadratic.measured_critical_lr(hessians, generator(9), steps=100, iterations=20)
    second = quadratic.measured_critical_lr(hessians, generator(9), steps=100, iterations=20)
    assert torch.equal(first, second)


@pytest.mark.parametrize("shape", [(4, 4), (2, 3, 4), (1, 2, 2, 2)])
def test_measured_critical_lr_bad_hessian_shape_raises(shape):
    with pytest.raises(ValueError, match=r"hessians must have shape \[n, d, d\]"):
        quadratic.measured_critical_lr(torch.ones(shape, dtype=torch.float64), generator(0))


@pytest.mark.parametrize(("steps", "error"), [(0, ValueError), (True, TypeError), (1.5, TypeError)])
def test_measured_critical_lr_bad_steps_raise(steps, error):
    with pytest.raises(error, match="steps must be"):
        quadratic.measured_critical_lr(torch.eye(2, dtype=torch.float64)[None], generator(0), steps=steps)
