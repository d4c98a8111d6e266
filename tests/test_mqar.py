"""Multi-query associative recall: the data, the small models, their settings and their training."""

from __future__ import annotations

import pytest
import torch

from nested_lab import runtime
from nested_lab.data.mqar import (
    IGNORE_INDEX,
    elimination_accuracy,
    hide_last_answer,
    mqar_batch,
    query_positions,
)
from nested_lab.experiments import titan_self_modification as chapter
from nested_lab.experiments.titan_self_modification import future_leakage
from nested_lab.models.mqar import MIXERS, MQARModel, MQARModelConfig, build_model
from nested_lab.models.self_modifying import SelfModifyingLinear
from nested_lab.train.mqar import MQARSetup, MQARTraining, mqar_accuracy, mqar_loss, train_mqar

B, L, N, V = 64, 40, 5, 32
EASY = MQARSetup.of(mixer="attention", seq_len=16, pairs=2, vocab=16, dim=32, lr=3e-3, steps=400,
                    eval_examples=256)
TINY = MQARSetup.of(dim=16, heads=2, vocab=16, seq_len=16, pairs=2, steps=3, batch_size=4, eval_examples=8,
                    chunk_size=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(seed: int = 0, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    arguments = {"batch": B, "seq_len": L, "pairs": N, "vocab": V, **kwargs}
    return mqar_batch(generator=runtime.generator(seed), **arguments)


# --- the data ---------------------------------------------------------------------------------

def test_prefix_keys_and_values_lie_in_their_ranges_and_keys_are_distinct():
    inputs, _ = _batch()
    keys, values = inputs[:, 0 : 2 * N : 2], inputs[:, 1 : 2 * N : 2]
    assert keys.min() >= 1 and keys.max() < V // 2
    assert values.min() >= V // 2 and values.max() < V
    assert all(len(set(row.tolist())) == N for row in keys)


def test_targets_only_at_queries_and_equal_to_the_paired_value():
    inputs, targets = _batch()
    asked = targets != IGNORE_INDEX
    assert torch.equal(asked.sum(dim=1), torch.full((B,), N))
    assert not asked[:, : 2 * N].any()
    for row_inputs, row_targets in zip(inputs, targets, strict=True):
        pairs = dict(zip(row_inputs[0 : 2 * N : 2].tolist(), row_inputs[1 : 2 * N : 2].tolist(), strict=True))
        positions = (row_targets != IGNORE_INDEX).nonzero().flatten()
        queried = row_inputs[positions].tolist()
        assert sorted(queried) == sorted(pairs)  # every key asked exactly once
        assert row_targets[positions].tolist() == [pairs[key] for key in queried]
        assert torch.equal(row_inputs[positions + 1], row_targets[positions])  # the value follows its query
        rest = torch.ones(L, dtype=torch.bool)
        rest[: 2 * N] = False
        rest[positions] = rest[positions + 1] = False
        assert torch.all(row_inputs[rest] == 0)  # filler


def test_batches_are_deterministic_under_a_seed():
    first, again, other = _batch(seed=3), _batch(seed=3), _batch(seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_query_gaps_follow_the_power_law():
    def mean_gap(power: float) -> float:
        positions = query_positions(4000, L, N, runtime.generator(0), gap_power=power)
        assert positions.min() >= 2 * N and positions.max() + 1 < L
        assert torch.all(positions[:, 1:] >= positions[:, :-1] + 2)  # sorted, distinct slots
        assert torch.all((positions - 2 * N) % 2 == 0)
        return (positions - 2 * N).float().mean().item() / 2

    uniform_mean = ((L - 2 * N) // 2 - 1) / 2  # the mean slot of a uniform draw from [0, (L - 2N) // 2)
    assert abs(mean_gap(0.0) - uniform_mean) < 0.3
    assert mean_gap(1.0) < mean_gap(0.0) - 1.5
    assert mean_gap(2.0) < mean_gap(1.0) - 1


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"seq_len": 4 * N - 1}, ValueError, "too short for 5 pairs"),
    ({"vocab": 2 * N + 1}, ValueError, "fewer than pairs=5 distinct keys"),
    ({"pairs": 0}, ValueError, "pairs must be >= 1"),
    ({"batch": 2.0}, TypeError, "batch must be an int"),
    ({"gap_power": -1.0}, ValueError, "gap_power must be finite and >= 0"),
    ({"gap_power": float("inf")}, ValueError, "gap_power must be finite and >= 0"),
    ({"gap_power": "1"}, TypeError, "gap_power must be a number"),
])
def test_bad_data_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        _batch(**kwargs)


def test_generator_is_required():
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        mqar_batch(2, L, N, V, generator=0)


# --- the models -------------------------------------------------------------------------------

@pytest.mark.parametrize("mixer", MIXERS)
def test_every_mixer_gives_logits_and_trains(mixer):
    model = build_model(TINY.replace(mixer=mixer).model, seed=0)
    inputs, targets = mqar_batch(4, 16, 2, 16, runtime.generator(0))
    logits = model(inputs)
    assert logits.shape == (4, 16, 16)
    mqar_loss(logits, targets).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("mixer", "causal", "leaks"), [
    ("attention", True, False), ("attention", False, True),
    ("self_modifying", True, False), ("self_modifying", False, True),
    ("delta", True, False), ("titans", True, False),
])
def test_future_leakage(mixer, causal, leaks):
    model = build_model(TINY.replace(mixer=mixer, causal=causal).model, seed=0)
    inputs, _ = mqar_batch(4, 16, 2, 16, runtime.generator(1))
    leakage = future_leakage(model, inputs, position=7)
    assert (leakage > 1e-4) if leaks else (leakage < 1e-5)


def test_self_modifying_model_applies_its_updates_after_each_step():
    result = train_mqar(TINY.replace(mixer="self_modifying"), seed=0, show_progress=False)
    layers = [m for m in result.model.modules() if isinstance(m, SelfModifyingLinear)]
    assert len(layers) == 4 * TINY.model.layers
    assert all(layer.pending_updates == [] and int(layer.update_count) == TINY.training.steps for layer in layers)
    inputs, targets = mqar_batch(4, 16, 2, 16, runtime.generator(1))
    mqar_accuracy(result.model, inputs, targets)
    assert all(layer.pending_updates == [] for layer in layers)  # evaluation does not self-modify


def test_training_is_deterministic_under_a_seed():
    first, again = (train_mqar(TINY, seed=5, show_progress=False) for _ in range(2))
    other = train_mqar(TINY, seed=6, show_progress=False)
    assert first.losses == again.losses and first.accuracy == again.accuracy
    assert first.losses != other.losses
    assert len(first.losses) == TINY.training.steps and first.seconds > 0


def test_accuracy_counts_only_query_positions():
    class Oracle(torch.nn.Module):
        """Logits that put the right value everywhere but at the first query of each row."""

        def __init__(self, targets: torch.Tensor) -> None:
            super().__init__()
            self.logits = torch.nn.functional.one_hot(targets.clamp(min=0), V).float()
            first = (targets != IGNORE_INDEX).float().argmax(dim=1)
            self.logits[torch.arange(len(targets)), first] = torch.roll(self.logits[torch.arange(len(targets)), first],
                                                                         1, dims=-1)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.logits[: len(tokens)]

    inputs, targets = _batch()
    assert mqar_accuracy(Oracle(targets), inputs, targets, batch_size=B) == pytest.approx((N - 1) / N)
    with pytest.raises(ValueError, match="no query position"):
        mqar_accuracy(Oracle(targets), inputs, torch.full_like(targets, IGNORE_INDEX))


def test_two_layer_attention_learns_an_easy_recall():
    result = train_mqar(EASY, seed=0, show_progress=False)
    assert result.accuracy >= 0.95  # guessing one of the two values in context scores 0.5
    assert sum(result.losses[-20:]) / 20 < 0.1 * sum(result.losses[:20]) / 20


# --- bad configurations and inputs --------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"mixer": "mamba"}, ValueError, "unknown mixer 'mamba'"),
    ({"dim": 30, "heads": 4}, ValueError, r"dim \(30\) must be divisible by heads \(4\)"),
    ({"causal": "yes"}, TypeError, "causal must be True or False"),
    ({"steps": 0}, ValueError, "steps must be >= 1"),
    ({"steps": 10.0}, TypeError, "steps must be an int"),
    ({"warmup_steps": -1}, ValueError, "warmup_steps must be >= 0"),
    ({"weight_decay": "0"}, TypeError, "weight_decay must be a number"),
    ({"lr": 0.0}, ValueError, "lr must be finite and > 0"),
    ({"seq_len": 8, "pairs": 3}, ValueError, "too short for 3 pairs"),
    ({"optimizer": "sgd"}, ValueError, r"unknown MQAR fields \['optimizer'\]"),
])
def test_bad_configs_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        MQARSetup.of(**kwargs)


def test_a_setup_routes_each_field_to_its_config():
    setup = MQARSetup.of(mixer="delta", lr=3e-3, pairs=2)
    assert setup.model == MQARModelConfig(mixer="delta") and setup.training == MQARTraining(lr=3e-3, pairs=2)
    assert setup.replace(dim=32).model.dim == 32 and setup.replace(dim=32).training == setup.training
    with pytest.raises(TypeError, match="MQARModelConfig and an MQARTraining"):
        MQARSetup(MQARTraining(), MQARModelConfig())
    with pytest.raises(TypeError, match="config must be an MQARModelConfig"):
        MQARModel(setup)


def test_future_leakage_needs_a_token_after_the_position():
    model = build_model(TINY.model, seed=0)
    with pytest.raises(ValueError, match=r"position must be in \[0, 6\], got 7"):
        future_leakage(model, torch.zeros(2, 8, dtype=torch.long), position=7)


def test_hide_last_answer_keeps_only_the_last_query_and_blanks_its_value():
    inputs, targets = _batch()
    hidden, kept = hide_last_answer(inputs, targets)
    last = [int((row != IGNORE_INDEX).nonzero().max()) for row in targets]
    for i, position in enumerate(last):
        assert (kept[i] != IGNORE_INDEX).nonzero().flatten().tolist() == [position]
        assert kept[i, position] == targets[i, position] == inputs[i, position + 1]
        assert hidden[i, position + 1] == 0
        changed = (hidden[i] != inputs[i]).nonzero().flatten().tolist()
        assert changed == [position + 1]
    with pytest.raises(ValueError, match="share a"):
        hide_last_answer(inputs[:, :-1], targets)


def test_elimination_accuracy():
    assert elimination_accuracy(1) == 1.0
    assert elimination_accuracy(2) == pytest.approx(0.75)
    assert elimination_accuracy(4) == pytest.approx((1 / 4 + 1 / 3 + 1 / 2 + 1) / 4)
    with pytest.raises(ValueError, match="pairs must be >= 1"):
        elimination_accuracy(0)
    with pytest.raises(TypeError, match="pairs must be an int"):
        elimination_accuracy(2.0)


def test_a_sweep_trains_every_setup_and_the_probes_read_the_best_runs():
    mixers = {"attention": {"mixer": "attention"}, "unmasked": {"mixer": "attention", "causal": False}}
    small = {"vocab": 16, "dim": 16, "heads": 2, "steps": 3, "batch_size": 4, "eval_examples": 8}
    runs, table = chapter.mqar_sweep(mixers, [(16, 2)], [1e-3, 3e-3], seed=0, **small)
    assert list(runs) == [(name, 16, 2, lr) for name in mixers for lr in (1e-3, 3e-3)]
    assert table.columns.tolist() == ["model", "setting", "lr", "accuracy", "seconds"]
    best = chapter.best_per_setting(table)
    assert best["model"].tolist() == list(mixers) and set(best["setting"]) == {"L=16, N=2"}
    best_runs = {row.model: runs[row.model, 16, 2, row.lr] for row in best.itertuples()}
    reading = chapter.reading_probes(best_runs, (16, 2), 16, seed=7)
    assert reading.index.tolist() == list(mixers)
    assert reading.iloc[0, 0] < 1e-5 < reading.iloc[1, 0]  # only the unmasked model reads ahead
    with pytest.raises(ValueError, match="too short for 3 pairs"):
        chapter.mqar_sweep(mixers, [(16, 2), (8, 3)], [1e-3], seed=0, **small)  # checked before any run
