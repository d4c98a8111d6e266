"""Unit tests for nested_lab.runtime: seeding, device choice, quick/headless flags, progress bars."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import tqdm.std

from nested_lab import runtime


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (runtime.DEVICE_ENV, runtime.QUICK_ENV, runtime.HEADLESS_ENV):
        monkeypatch.delenv(name, raising=False)


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


# ----- seeding -----------------------------------------------------------------------------------


def test_seed_everything_makes_random_numpy_and_torch_reproducible():
    runtime.seed_everything(123)
    first = _draws()
    runtime.seed_everything(123)
    assert _draws() == first


def test_seed_everything_with_other_seed_gives_other_draws():
    runtime.seed_everything(1)
    first = _draws()
    runtime.seed_everything(2)
    second = _draws()
    assert first[0] != second[0]
    assert first[1] != second[1]
    assert first[2] != second[2]


def test_seed_everything_accepts_seed_above_numpy_limit():
    runtime.seed_everything(2**32 + 5)
    first = _draws()
    runtime.seed_everything(2**32 + 5)
    assert _draws() == first


@pytest.mark.parametrize("seed", [True, 1.0, "1", None])
def test_seed_everything_rejects_non_int_seed(seed):
    with pytest.raises(TypeError, match="seed must be an int"):
        runtime.seed_everything(seed)


def test_seed_everything_rejects_negative_seed():
    with pytest.raises(ValueError, match="seed must be >= 0"):
        runtime.seed_everything(-1)


def test_generator_returns_cpu_generator():
    gen = runtime.generator(0)
    assert isinstance(gen, torch.Generator)
    assert gen.device == torch.device("cpu")


def test_generator_same_seed_gives_identical_draws():
    a = torch.randn(5, generator=runtime.generator(7))
    b = torch.randn(5, generator=runtime.generator(7))
    assert torch.equal(a, b)


def test_generator_different_seeds_give_different_draws():
    a = torch.randn(5, generator=runtime.generator(7))
    b = torch.randn(5, generator=runtime.generator(8))
    assert not torch.equal(a, b)


def test_generator_does_not_touch_global_torch_state():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    torch.randn(4, generator=runtime.generator(99))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("seed", [True, False, 2.5, "3"])
def test_generator_rejects_non_int_seed(seed):
    with pytest.raises(TypeError, match="seed must be an int"):
        runtime.generator(seed)


def test_generator_rejects_negative_seed():
    with pytest.raises(ValueError, match="seed must be >= 0, got -3"):
        runtime.generator(-3)


def test_generators_gives_one_independent_generator_per_seed():
    gens = runtime.generators([1, 2, 1])
    draws = [torch.rand(4, generator=g) for g in gens]
    assert len(gens) == 3
    assert torch.equal(draws[0], draws[2])
    assert not torch.equal(draws[0], draws[1])


def test_generators_rejects_bad_seed_in_list():
    with pytest.raises(ValueError, match="seed must be >= 0"):
        runtime.generators([1, -1])


# ----- devices -----------------------------------------------------------------------------------


def test_available_devices_ends_with_cpu():
    found = runtime.available_devices()
    assert found[-1] == "cpu"
    assert set(found) <= set(runtime.KNOWN_DEVICES)
    assert ("cuda" in found) == torch.cuda.is_available()


def test_available_devices_orders_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.available_devices() == ["cuda", "mps", "cpu"]
    assert runtime.device() == torch.device("cuda")
    assert runtime.device("cuda:1") == torch.device("cuda:1")
    assert runtime.device("mps") == torch.device("mps")


def test_device_default_is_first_available():
    assert runtime.device() == torch.device(runtime.available_devices()[0])


def test_device_blank_env_means_default(monkeypatch):
    monkeypatch.setenv(runtime.DEVICE_ENV, "   ")
    assert runtime.device() == torch.device(runtime.available_devices()[0])


def test_device_argument_cpu():
    assert runtime.device("cpu") == torch.device("cpu")


def test_device_env_overrides_default(monkeypatch):
    monkeypatch.setenv(runtime.DEVICE_ENV, " cpu ")
    assert runtime.device() == torch.device("cpu")


def test_device_argument_wins_over_env(monkeypatch):
    monkeypatch.setenv(runtime.DEVICE_ENV, "tpu")
    assert runtime.device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "cpu:a", "gpu:0", "CUDA"])
def test_device_unknown_argument_raises_value_error(name):
    with pytest.raises(ValueError, match=r"unknown device .* \(from argument\)"):
        runtime.device(name)


@pytest.mark.parametrize("name", ["tpu", "cuda:x"])
def test_device_unknown_env_value_raises_value_error_naming_env(monkeypatch, name):
    monkeypatch.setenv(runtime.DEVICE_ENV, name)
    with pytest.raises(ValueError, match=r"unknown device .* \(from env NESTED_LAB_DEVICE\)"):
        runtime.device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_device_cuda_on_cpu_machine_raises_runtime_error(name):
    with pytest.raises(RuntimeError, match="is not available on this machine"):
        runtime.device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_from_env_on_cpu_machine_raises_runtime_error(monkeypatch):
    monkeypatch.setenv(runtime.DEVICE_ENV, "cuda")
    with pytest.raises(RuntimeError, match="'cuda' is not available"):
        runtime.device()


def test_device_empty_index_raises_value_error():
    with pytest.raises(ValueError, match="unknown device 'cpu:'"):
        runtime.device("cpu:")


def test_device_non_string_argument_raises_type_error():
    with pytest.raises(TypeError, match="device must be a string"):
        runtime.device(1)


def test_device_zero_argument_raises_type_error():
    with pytest.raises(TypeError, match="device must be a string"):
        runtime.device(0)


# ----- quick / headless flags --------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", " yes ", "on"])
def test_is_quick_true_values(monkeypatch, raw):
    monkeypatch.setenv(runtime.QUICK_ENV, raw)
    assert runtime.is_quick() is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "no", "off", "", "  "])
def test_is_quick_false_values(monkeypatch, raw):
    monkeypatch.setenv(runtime.QUICK_ENV, raw)
    assert runtime.is_quick(default=True) is False


@pytest.mark.parametrize("default", [True, False])
def test_is_quick_unset_returns_default(default):
    assert runtime.is_quick(default=default) is default


@pytest.mark.parametrize("raw", ["2", "maybe", "quick"])
def test_is_quick_invalid_value_raises(monkeypatch, raw):
    monkeypatch.setenv(runtime.QUICK_ENV, raw)
    with pytest.raises(ValueError, match=r"NESTED_LAB_QUICK=.* is not a boolean"):
        runtime.is_quick()


def test_is_headless_unset_is_false():
    assert runtime.is_headless() is False


@pytest.mark.parametrize(("raw", "expected"), [("1", True), (" 1 ", True), ("0", False), ("true", False)])
def test_is_headless_only_one_counts(monkeypatch, raw, expected):
    monkeypatch.setenv(runtime.HEADLESS_ENV, raw)
    assert runtime.is_headless() is expected


# ----- progress ----------------------------------------------------------------------------------


def test_progress_headless_is_plain_text_tqdm(monkeypatch):
    monkeypatch.setenv(runtime.HEADLESS_ENV, "1")
    bar = runtime.progress(range(4), disable=True)
    assert type(bar) is tqdm.std.tqdm
    assert list(bar) == [0, 1, 2, 3]


def test_progress_passes_keyword_arguments(monkeypatch):
    monkeypatch.setenv(runtime.HEADLESS_ENV, "1")
    stream = io.StringIO()
    bar = runtime.progress(range(3), total=3, desc="work", file=stream)
    assert list(bar) == [0, 1, 2]
    assert bar.total == 3
    assert "work" in stream.getvalue()
    assert "3/3" in stream.getvalue()


def test_progress_not_headless_is_a_tqdm_that_iterates():
    bar = runtime.progress(["a", "b"], disable=True)
    assert isinstance(bar, tqdm.std.tqdm)
    assert list(bar) == ["a", "b"]


def test_seeded_block_is_reproducible_and_restores_the_global_generator():
    torch.manual_seed(5)
    expected_next = torch.rand(2)
    torch.manual_seed(5)
    with runtime.seeded(11):
        first = torch.rand(3)
    assert torch.equal(torch.rand(2), expected_next)
    with runtime.seeded(11):
        assert torch.equal(torch.rand(3), first)


def test_seeded_rejects_a_bad_seed():
    with pytest.raises(ValueError, match="seed must be >= 0"), runtime.seeded(-1):
        pass


def test_threads_sets_and_restores_the_thread_count():
    before = torch.get_num_threads()
    with runtime.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="thread count must be >= 1"), runtime.threads(0):
        pass
    with pytest.raises(TypeError, match="thread count must be an int"), runtime.threads(1.5):
        pass
