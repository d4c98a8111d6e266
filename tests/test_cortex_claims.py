"""Chapter 3's claims without a row until issue 15: the options they need and the measurements."""

from __future__ import annotations

import pytest
import torch

from nested_lab.experiments import cortexgpt_stabilized as stabilized
from nested_lab.memory.consolidation import Consolidator
from nested_lab.memory.ltm import LongTermMemory
from nested_lab.memory.stm import ShortTermMemory
from nested_lab.models.cortex import CortexConfig, CortexGPT
from nested_lab.train import cortex_trainer as cortex_train
from nested_lab.train.cortex_setup import CortexSetup, CortexTrainConfig

SMALL = {"dim": 16, "columns": 4, "stm_capacity": 8, "ltm_code_dim": 4, "batch_size": 4, "context": 16}


# --- the options ----------------------------------------------------------------------------

def test_memory_scale_is_its_own_option_and_the_preset_keeps_both():
    preset = CortexSetup.solutions(**SMALL).model
    assert preset.memory_norm and preset.memory_scale
    model = CortexGPT(CortexConfig(dim=16, columns=4, memory_norm=True), vocab_size=10)
    assert hasattr(model, "memory_norm") and not hasattr(model, "memory_scale")
    model = CortexGPT(CortexConfig(dim=16, columns=4, memory_scale=True), vocab_size=10)
    assert hasattr(model, "memory_scale") and not hasattr(model, "memory_norm")


def test_scales_of_one_change_nothing():
    tokens = torch.randint(0, 10, (2, 6), generator=torch.Generator().manual_seed(0))
    outputs = [CortexGPT(CortexConfig(dim=16, columns=4, memory_norm=True, memory_scale=scale), 10, seed=3)
               .eval()(tokens).logits for scale in (False, True)]
    torch.testing.assert_close(outputs[0], outputs[1])


def test_label_smoothing_option_reaches_the_regularised_loss():
    torch.manual_seed(0)
    model = CortexGPT(CortexConfig(dim=16, columns=4), vocab_size=10)
    tokens = torch.randint(0, 10, (2, 6))
    out = model(tokens)
    losses = [cortex_train.training_loss(out, tokens, "regularised", 0.05, smoothing)[0]
              for smoothing in (0.0, 0.1, 0.1)]
    assert losses[0] != losses[1] and losses[1] == losses[2]
    with pytest.raises(ValueError):
        CortexTrainConfig(label_smoothing=1.0)


def test_gradual_consolidation_decays_the_moved_entries_and_removes_none():
    stm = ShortTermMemory(4, capacity=6)
    stm.write(torch.randn(2, 3, 4), torch.randn(2, 3, 4))  # three entries of two rows
    stm.counts = torch.tensor([5, 1, 5])
    consolidator = Consolidator(4, 2, "gradual", interval=1, threshold=3)
    with torch.no_grad():  # a transfer gate that lets every candidate through
        consolidator.transfer_gate.weight.zero_()
        consolidator.transfer_gate.bias.fill_(1.0)
    moving = torch.tensor([True, True, False, False])  # the rows of entry 0, not those of entry 2
    before = stm.importance.tolist()
    stm.scale_importance(3, moving, 0.5)
    assert stm.importance.tolist() == pytest.approx([before[0] * 0.5, before[1], before[2]])
    ltm = LongTermMemory(4, 2, 1)
    stm.importance = torch.tensor(before)
    moved = consolidator.after_forward(stm, ltm, 3, torch.Generator().manual_seed(0))
    assert moved == 4 and stm.entries == 3  # every candidate row moved, no entry removed
    assert stm.importance.tolist() == pytest.approx([before[0] * 0.5, before[1], before[2] * 0.5])


# --- the measurements -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def solutions_run():
    return cortex_train.train(CortexSetup.solutions(**SMALL), seed=0, steps=24)


def test_consolidation_decay_is_measured_on_a_copy(solutions_run):
    model = solutions_run.model
    before = model.memory_state()
    tokens = torch.randint(0, 10, (4, 16), generator=torch.Generator().manual_seed(1))
    result = stabilized.consolidation_decay(solutions_run, tokens)
    assert result["entries removed"] == 0 and result["logit change"] == 0.0
    if result["rows moved"]:
        assert result["importance ratio"] == pytest.approx(0.5)
    after = model.memory_state()
    assert torch.equal(before["stm"].importance, after["stm"].importance)
    assert model.consolidator.passes == before["consolidator"][0]


def test_document_smoothness_differences_the_batch_axis_not_time():
    gates = torch.softmax(torch.randn(4, 10, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    document, time = stabilized.time_order_effect(gates, seed=1)
    assert document < 1e-12 and time > 1e-3
    swapped = gates[[1, 0, 2, 3]]
    assert stabilized.document_gate_smoothness(swapped) != pytest.approx(stabilized.document_gate_smoothness(gates))
    constant_in_time = gates[:, :1].expand(-1, 10, -1)
    assert stabilized.time_smoothness(constant_in_time) == 0
    assert stabilized.document_gate_smoothness(constant_in_time) > 0


def test_kl_loss_has_the_cross_entropy_gradient():
    generator = torch.Generator().manual_seed(0)
    logits, targets = 5 * torch.randn(32, 7, generator=generator), torch.randint(0, 7, (32,), generator=generator)
    gap, spread = stabilized.kl_ce_gradient_gap(logits, targets, 0.1)
    assert gap < 1e-12 and spread < 1e-12
    unsmoothed = stabilized.kl_ce_gradient_gap(logits, targets, 0.0)
    assert unsmoothed[0] < 1e-12
    with pytest.raises(ValueError):
        stabilized.kl_ce_gradient_gap(logits, targets, 1.5)


def test_the_memory_optimizer_takes_the_gate_and_norms_not_the_memories(solutions_run):
    names = stabilized.slowed_parameters(solutions_run.model)
    assert names and all(name.startswith(("memory_gate.", "memory_norm.", "memory_scale")) for name in names)
    assert stabilized.memories_slowed(solutions_run.model) == 0.0


def test_the_ema_does_not_change_training():
    assert stabilized.ema_training_change(CortexSetup.solutions(**SMALL), seed=0, steps=8) == 0.0
    with pytest.raises((TypeError, ValueError)):
        stabilized.ema_training_change(CortexSetup.original(**SMALL), seed=0, steps=8)


def test_gate_temperature_reaches_the_sigmoid_gate_only():
    assert stabilized.gate_temperature_response("softmax") == 0.0
    assert stabilized.gate_temperature_response("temperature_sigmoid") > 1e-3


def test_selection_mismatch_is_zero_for_hard_top_k_only(solutions_run):
    tokens = [torch.randint(0, 10, (4, 16), generator=torch.Generator().manual_seed(3))]
    assert 0 < stabilized.selection_mismatch(solutions_run, tokens) <= 1
    hard = cortex_train.train(CortexSetup.original(**SMALL), seed=0, steps=4)
    assert stabilized.selection_mismatch(hard, tokens) == 0


def test_gradient_below_memory_is_positive_and_restores_the_memories(solutions_run):
    model = solutions_run.model
    tokens = torch.randint(0, 10, (4, 16), generator=torch.Generator().manual_seed(2))
    before = model.memory_state()
    assert stabilized.gradient_below_memory(model, tokens, tokens) > 0
    assert torch.equal(before["stm"].keys, model.memory_state()["stm"].keys)


def test_stabiliser_runs_table_and_effects():
    grid = {name: ("", setup) for name, setup in (("original", CortexSetup.original(**SMALL)),
                                                  ("001 preset", CortexSetup.solutions(**SMALL)),
                                                  ("003 preset", CortexSetup.phase1(**SMALL)))}
    runs = stabilized.stabiliser_runs(grid, [0], steps=8)
    assert set(runs) == {"original", "001 preset", "003 preset", *stabilized.STABILISERS}
    with_, without = stabilized.with_and_without(runs, "lr 1e-4 (003)")
    assert with_[0].setup.train.lr == 1e-4 and without[0].setup.train.lr == 3e-4
    with_, without = stabilized.with_and_without(runs, "residual (001)")
    assert with_[0].setup.model.residual_weight == 1.0 and without[0].setup.model.residual_weight == 0.0
    change, unstable = stabilized.stabiliser_effect(runs, "residual (001)")
    assert len(change) == 1 and isinstance(unstable, bool)
    table = stabilized.stabiliser_table(runs)
    assert stabilized.stabiliser_id("10% warm-up, cosine (003)") == "003-10-warm-up-cosine"
    assert set(stabilized.STABILISER_CLAIMS) == set(stabilized.STABILISERS)
    assert list(table.index) == list(stabilized.STABILISERS)
    points = stabilized.stabiliser_points(runs)
    assert len(points) == len(stabilized.STABILISERS) and points["row"].tolist() == list(range(len(points)))
    records = runs["001 preset"][0].records
    tail = records.iloc[len(records) // 2:]
    lead = tail["gate_current"].mean() - max(tail["gate_stm"].mean(), tail["gate_ltm"].mean())
    assert stabilized.gate_lead_of_current(runs["001 preset"]) == pytest.approx([lead])
