"""The Continuum Memory System: the chain of MLPs, the replica's trainer and the corrected one
(update counts, the summed chunk gradient, schedules), the drifting stream, the online experiment
and validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from nested_lab import runtime
from nested_lab.data.drift import drift_stream, mode_at
from nested_lab.experiments.nested_optimizers import (
    compare,
    count_changes,
    printed_lines_reproduced,
    printed_schedule,
    run_stream,
    summarize,
    trainer_history,
)
from nested_lab.memory.cms import ContinuumMemory, ContinuumMemoryTrainer, update_schedule


def _train(chunk_sizes, steps, trainer="correct", seed=0, dtype=torch.float32, lr=0.1, momentum=0.0):
    """A ContinuumMemory trained on fixed random regression batches; returns (memory, trainer)."""
    memory = ContinuumMemory(3, 5, chunk_sizes, residual=True, generator=runtime.generator(seed)).to(dtype)
    loop = ContinuumMemoryTrainer(memory, memory, torch.optim.SGD(memory.parameters(), lr=lr, momentum=momentum),
                                  trainer)
    data = runtime.generator(seed + 1)
    for _ in range(steps):
        x = torch.randn(4, 3, generator=data, dtype=dtype)
        loop.step(F.mse_loss(memory(x), x.flip(-1)))
    return memory, loop


# --- the memory --------------------------------------------------------------------------------

def test_memory_is_a_chain_of_mlps_plain_or_residual():
    plain = ContinuumMemory(4, 6, [1, 8], generator=runtime.generator(0))
    assert plain.chunk_sizes == (1, 8) and isinstance(plain.levels, nn.ModuleList) and len(plain.levels) == 2
    first, second = plain.levels
    assert [type(m) for m in first] == [nn.Linear, nn.ReLU, nn.Linear] and first[0].weight.shape == (6, 4)
    x = torch.randn(5, 4, generator=runtime.generator(1))
    assert torch.equal(plain(x), second(first(x)))
    residual = ContinuumMemory(4, 6, [1, 8], residual=True, generator=runtime.generator(0))
    middle = x + residual.levels[0](x)
    assert torch.allclose(residual(x), middle + residual.levels[1](middle))
    assert first[0].weight.abs().max() <= 1 / math.sqrt(4) and second[2].bias.abs().max() <= 1 / math.sqrt(6)


def test_initialisation_follows_the_generator_and_leaves_the_global_state_alone():
    state = torch.get_rng_state()
    a = ContinuumMemory(4, 6, (1, 2, 4), generator=runtime.generator(3))
    assert torch.equal(torch.get_rng_state(), state)
    b = ContinuumMemory(4, 6, (1, 2, 4), generator=runtime.generator(3))
    c = ContinuumMemory(4, 6, (1, 2, 4), generator=runtime.generator(4))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.levels[0][0].weight, c.levels[0][0].weight)


# --- update counts and schedules ---------------------------------------------------------------

def test_correct_trainer_changes_each_level_once_per_completed_chunk():
    _, loop = _train((1, 8, 32), 70)
    assert loop.change_counts == (70, 8, 2)  # floor(70 / C)
    assert np.array_equal(loop.changed_matrix(), update_schedule((1, 8, 32), 70, "correct"))
    assert np.flatnonzero(loop.changed_matrix()[1]).tolist() == [7, 15, 23, 31, 39, 47, 55, 63]


def test_original_trainer_changes_every_level_on_every_step():
    _, loop = _train((1, 8, 32), 15, trainer="original")
    assert loop.change_counts == (15, 15, 15)
    assert np.array_equal(loop.changed_matrix(), update_schedule((1, 8, 32), 15, "original"))
    assert printed_schedule((1, 8, 32), 15).sum(axis=1).tolist() == [15, 2, 1]  # what it claims


def test_printed_schedule_is_step_mod_chunk_and_differs_from_the_correct_one():
    printed = printed_schedule((1, 3, 4), 9)
    assert [np.flatnonzero(row).tolist() for row in printed] == [list(range(9)), [0, 3, 6], [0, 4, 8]]
    correct = update_schedule((1, 3, 4), 9)
    assert [np.flatnonzero(row).tolist() for row in correct] == [list(range(9)), [2, 5, 8], [3, 7]]
    assert printed.sum(axis=1).tolist() == [math.ceil(9 / c) for c in (1, 3, 4)]
    assert correct.sum(axis=1).tolist() == [9 // c for c in (1, 3, 4)]


def test_the_replica_printout_is_reproduced_and_its_run_is_not():
    assert printed_lines_reproduced((8, 32, 128)) == 6
    assert printed_lines_reproduced((8, 32, 128), "correct") == 4  # the comparison can fail
    loop = count_changes("original", (8, 32, 128), 40, seed=0)
    assert loop.change_counts == (40, 40, 40)
    assert count_changes("correct", (8, 32, 128), 40, seed=0).change_counts == (5, 1, 0)


def test_momentum_does_not_move_a_level_between_its_chunks():
    _, loop = _train((1, 4), 12, momentum=0.9)
    assert loop.change_counts == (12, 3)


# --- the update itself -------------------------------------------------------------------------

def _manual_gradients(memory, params, x):
    leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
    loss = F.mse_loss(functional_call(memory, leaves, (x,)), x.flip(-1))
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))


def test_correct_level_update_is_one_step_with_the_summed_chunk_gradient():
    lr, steps = 0.1, 3
    memory, _ = _train((1, 3), 0, dtype=torch.float64)
    params = {name: p.detach().clone() for name, p in memory.named_parameters()}
    data, summed = runtime.generator(1), {}
    for _ in range(steps):
        grads = _manual_gradients(memory, params, torch.randn(4, 3, generator=data, dtype=torch.float64))
        for name, g in grads.items():
            if name.startswith("levels.0."):
                params[name] = params[name] - lr * g  # the fast level: plain SGD every step
            else:
                summed[name] = summed.get(name, 0) + g  # the slow level: gradients at fixed weights
    for name in summed:
        params[name] = params[name] - lr * summed[name]
    trained, _ = _train((1, 3), steps, dtype=torch.float64, lr=lr)
    for name, p in trained.named_parameters():
        assert torch.allclose(p, params[name], rtol=1e-12, atol=1e-12), name


def test_original_first_step_divides_the_gradient_by_the_chunk_size():
    memory, _ = _train((1, 3), 0, dtype=torch.float64)
    params = {name: p.detach().clone() for name, p in memory.named_parameters()}
    grads = _manual_gradients(memory, params, torch.randn(4, 3, generator=runtime.generator(1), dtype=torch.float64))
    trained, _ = _train((1, 3), 1, trainer="original", dtype=torch.float64, lr=0.1)
    slow = trained.levels[1][0].weight
    assert torch.allclose(slow, params["levels.1.0.weight"] - 0.1 * grads["levels.1.0.weight"] / 3)


def test_chunk_size_one_makes_both_trainers_plain_sgd():
    correct, _ = _train((1, 1), 6, dtype=torch.float64)
    original, _ = _train((1, 1), 6, trainer="original", dtype=torch.float64)
    assert all(torch.allclose(p, q, rtol=1e-12, atol=0)
               for p, q in zip(correct.parameters(), original.parameters(), strict=True))


def test_parameters_outside_the_memory_update_every_step():
    memory = ContinuumMemory(3, 5, (1, 4), generator=runtime.generator(0))
    head = nn.Linear(3, 1)
    model = nn.Sequential(memory, head)
    loop = ContinuumMemoryTrainer(model, memory, torch.optim.SGD(model.parameters(), lr=0.1))
    data = runtime.generator(1)
    for _ in range(5):
        before = head.weight.detach().clone()
        loop.step(model(torch.randn(4, 3, generator=data)).square().mean())
        assert not torch.equal(before, head.weight)
    assert loop.change_counts == (5, 1)


def test_history_has_a_row_per_step_and_level():
    _, loop = _train((1, 2), 4)
    table = trainer_history(loop)
    assert list(table.columns) == ["step", "level", "chunk_size", "changed", "loss"] and len(table) == 8
    assert table.loc[table.level == 1, "changed"].tolist() == [False, True, False, True]
    assert table.loc[table.level == 0, "loss"].tolist() == loop.losses


def test_training_is_deterministic():
    a, loop_a = _train((1, 2, 4), 9, seed=5)
    b, loop_b = _train((1, 2, 4), 9, seed=5)
    assert loop_a.losses == loop_b.losses
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# --- the stream and the experiment -------------------------------------------------------------

def test_stream_is_deterministic_and_its_modes_recur():
    first = list(drift_stream(40, 4, runtime.generator(0), batch_size=3, modes=3, switch_every=5, noise=0.1))
    again = list(drift_stream(40, 4, runtime.generator(0), batch_size=3, modes=3, switch_every=5, noise=0.1))
    other = list(drift_stream(40, 4, runtime.generator(1), batch_size=3, modes=3, switch_every=5, noise=0.1))
    assert all(torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.mode == b.mode
               for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0].y, other[0].y)
    modes = [batch.mode for batch in first]
    assert modes[:16] == [0] * 5 + [1] * 5 + [2] * 5 + [0]
    assert modes == [mode_at(t, 3, 5) for t in range(40)]
    x, y, mode = first[0]
    assert x.shape == y.shape == (3, 4) and mode == 0


def test_stream_target_is_the_slow_map_plus_the_active_fast_map():
    """Without noise and drift, two batches of the same mode share one linear map; other modes differ."""
    batches = list(drift_stream(30, 3, runtime.generator(0), batch_size=6, modes=2, switch_every=10, drift=0.0))
    solve = [torch.linalg.lstsq(b.x, b.y).solution for b in batches]
    assert torch.allclose(solve[0], solve[25], atol=1e-5)  # mode 0 again
    assert not torch.allclose(solve[0], solve[15], atol=1e-2)  # mode 1


def test_run_stream_records_prequential_losses_and_returns():
    run = run_stream((1, 2, 4), seed=0, steps=40, switch_every=5, modes=2)
    assert list(run.columns) == ["step", "mode", "loss", "returned"] and len(run) == 40
    assert run.loc[run.returned, "step"].tolist() == [10, 15, 20, 25, 30, 35]
    again = run_stream((1, 2, 4), seed=0, steps=40, switch_every=5, modes=2)
    assert run.equals(again)


def test_compare_gives_one_row_per_seed_and_arm():
    arms = {"cms": ((1, 4), "correct"), "flat": ((1, 1), "correct")}
    results = compare(seeds=(0, 1), arms=arms, show_progress=False, steps=30, switch_every=5)
    assert len(results) == 4 and results.arm.tolist() == ["cms", "flat", "cms", "flat"]
    assert results[["prequential_loss", "return_loss", "final_loss"]].notna().all().all()
    table = summarize(results)
    assert table.arm.tolist() == ["cms", "flat"] and "return_loss_std" in table.columns


# --- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize(("chunk_sizes", "error", "message"), [
    ((), ValueError, "number of levels must be >= 1"),
    ((1, 0), ValueError, r"chunk_sizes\[1\] must be >= 1"),
    ((1, 2.0), TypeError, r"chunk_sizes\[1\] must be an int"),
    ((True,), TypeError, r"chunk_sizes\[0\] must be an int"),
    ("18", TypeError, "sequence of ints"),
    (8, TypeError, "sequence of ints"),
])
def test_bad_chunk_sizes_are_refused(chunk_sizes, error, message):
    with pytest.raises(error, match=message):
        ContinuumMemory(4, 8, chunk_sizes)
    with pytest.raises(error, match=message):
        update_schedule(chunk_sizes, 10)


def test_bad_sizes_and_options_are_refused():
    with pytest.raises(ValueError, match="hidden_dim must be >= 1"):
        ContinuumMemory(4, 0, (1,))
    with pytest.raises(TypeError, match="residual must be True or False"):
        ContinuumMemory(4, 8, (1,), residual=1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        printed_schedule((1,), 0)
    with pytest.raises(ValueError, match="unknown trainer 'fixed'; allowed: original, correct"):
        update_schedule((1,), 5, "fixed")
    memory = ContinuumMemory(4, 8, (1,))
    with pytest.raises(ValueError, match="unknown trainer 'fixed'"):
        ContinuumMemoryTrainer(memory, memory, torch.optim.SGD(memory.parameters(), lr=0.1), "fixed")


def test_trainer_refuses_parts_that_do_not_fit():
    memory = ContinuumMemory(4, 8, (1, 2))
    sgd = torch.optim.SGD(memory.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="memory must be a ContinuumMemory"):
        ContinuumMemoryTrainer(memory, nn.Linear(4, 4), sgd)
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        ContinuumMemoryTrainer(memory, memory, list(memory.parameters()))
    with pytest.raises(ValueError, match="level 1 of the memory must be part of the model and held by the optimizer"):
        ContinuumMemoryTrainer(memory, memory, torch.optim.SGD(memory.levels[0].parameters(), lr=0.1))
    other = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="level 0 of the memory must be part of the model"):
        ContinuumMemoryTrainer(other, memory, sgd)


def test_stream_refuses_bad_arguments():
    gen = runtime.generator(0)
    with pytest.raises(ValueError, match="switch_every must be >= 1"):
        drift_stream(10, 4, gen, switch_every=0)
    with pytest.raises(TypeError, match="modes must be an int"):
        drift_stream(10, 4, gen, modes=2.5)
    with pytest.raises(ValueError, match="noise must be finite and >= 0"):
        drift_stream(10, 4, gen, noise=-0.1)
    with pytest.raises(ValueError, match="drift must be finite"):
        drift_stream(10, 4, gen, drift=math.inf)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        drift_stream(10, 4, 0)
    with pytest.raises(ValueError, match="lr must be finite and >= 0"):
        run_stream((1,), 0, steps=5, lr=-1.0)
    with pytest.raises(ValueError, match="arms must name at least one"):
        compare(arms={}, show_progress=False)
