"""Training CortexGPT: metrics, adaptive clipping, EMA, spike rollback, faults, determinism."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from nested_lab.experiments import cortexgpt_instability as instability
from nested_lab.experiments import cortexgpt_stabilized as stabilized
from nested_lab.optim.clipping import AdaptiveClipper
from nested_lab.train import cortex_trainer as cortex_train
from nested_lab.train import metrics
from nested_lab.train.cortex_setup import CortexSetup
from nested_lab.train.ema import WeightEMA
from nested_lab.train.guards import SpikeGuard, same_state

SMALL = {"dim": 16, "columns": 4, "stm_capacity": 8, "ltm_code_dim": 4, "batch_size": 4, "context": 16}


# --- metrics -------------------------------------------------------------------------------

def test_oscillation_metrics_on_known_series():
    flat = [2.0] * 100
    assert metrics.oscillation_ratio(flat) == 1.0 and metrics.moving_average_swing(flat) == 1.0
    swinging = [7.0 if (i // 5) % 2 else 35.0 for i in range(400)]  # between 7 and 35
    assert metrics.oscillation_ratio(swinging) == pytest.approx(5.0)
    assert metrics.spike_ratio([1.0] * 99 + [9.0]) == pytest.approx(9.0)
    assert metrics.count_spikes([1.0] * 60 + [6.0] + [1.0] * 10) == 1


def test_autocorrelation_finds_a_period_and_not_noise():
    rng = np.random.default_rng(0)
    steps = np.arange(400)
    noise = 3 + 0.1 * rng.standard_normal(400)
    cycle = 3 + np.sin(2 * np.pi * steps / 5) + 0.05 * rng.standard_normal(400)
    assert abs(metrics.autocorrelation(noise, 5)) < 0.2
    assert metrics.autocorrelation(cycle, 5) > 0.8
    assert metrics.dominant_period(cycle) == 5.0
    with pytest.raises(ValueError, match="lag"):
        metrics.autocorrelation(noise, 0)
    with pytest.raises(ValueError, match="at least 4"):
        metrics.oscillation_ratio([1.0, 2.0])


def test_metric_stream_calls_its_listeners():
    seen = []
    stream = metrics.MetricStream([lambda s: seen.append(len(s.rows))])
    stream.append({"loss": 1.0})
    stream.append({"loss": 2.0})
    assert seen == [1, 2] and stream.frame["loss"].tolist() == [1.0, 2.0] and stream.column("loss") == [1.0, 2.0]


# --- adaptive clipping, EMA, guard -----------------------------------------------------------

def test_adaptive_clipper_tightens_tenfold_on_a_spike():
    clipper = AdaptiveClipper(clip=0.5, warmup=3)
    for norm in (1.0, 1.0, 1.0):
        assert clipper.threshold(norm) == 0.5
    assert clipper.threshold(3.5) == pytest.approx(0.05) and clipper.spikes == 1
    assert clipper.threshold(1.0) == 0.5
    layer = nn.Linear(3, 1)
    layer.weight.grad, layer.bias.grad = torch.full((1, 3), 10.0), torch.zeros(1)
    norm, threshold = clipper(layer.parameters())
    assert norm == pytest.approx(math.sqrt(300)) and threshold == pytest.approx(0.05)
    assert float(layer.weight.grad.norm()) == pytest.approx(0.05, rel=1e-4)
    with pytest.raises(ValueError, match="spike_factor"):
        AdaptiveClipper(clip=1.0, spike_factor=1.0)


def test_weight_ema_follows_get_ema_multi_avg_fn_with_a_ramped_decay():
    layer = nn.Linear(2, 1)
    ema = WeightEMA(layer, decay=0.9, ramp=False)
    start = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update(layer)
    assert torch.allclose(ema.as_dict()["weight"], start + 0.1)
    ramped = WeightEMA(layer, decay=0.999)
    assert ramped.current_decay() == pytest.approx(2 / 11)  # min(0.999, (1 + n) / (10 + n)) at n = 1
    for _ in range(2000):
        ramped.update(layer)
    assert ramped.current_decay() == pytest.approx(2002 / 2011) and ramped.updates == 2000
    assert WeightEMA(layer, decay=0.1).current_decay() == 0.1  # the smaller of the two
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(layer, decay=1.0)


def test_spike_guard_detects_and_checkpoints():
    guard = SpikeGuard(factor=5.0, warmup=3, checkpoint_every=2)
    guard.start(lambda: {"x": torch.zeros(1)})
    for step in range(1, 5):
        assert not guard.is_spike(1.0)
        guard.healthy(1.0, step, lambda step=step: {"x": torch.full((1,), float(step))})
    assert guard.recovery.step == 4 and guard.is_spike(5.5) and guard.is_spike(float("nan"))
    restored = {}
    assert guard.rollback(restored.update) == 4 and torch.equal(restored["x"], torch.full((1,), 4.0))


# --- the trainer ---------------------------------------------------------------------------------

def test_same_seed_same_numbers_on_cpu():
    config = CortexSetup.solutions(**SMALL)
    a = cortex_train.train(config, seed=3, steps=6)
    b = cortex_train.train(config, seed=3, steps=6)
    assert a.losses == b.losses and a.val_bpc == b.val_bpc
    c = cortex_train.train(config, seed=4, steps=6)
    assert a.losses != c.losses


def test_rollback_restores_exactly_the_saved_state():
    trainer = cortex_train.CortexTrainer(CortexSetup.phase1(**SMALL, checkpoint_every=3), seed=0, steps=20)
    for _ in range(7):
        trainer.train_step()
    saved = trainer.guard.recovery
    assert saved.step == 6
    row = trainer.train_step(cortex_train.Fault(trainer.batches, "nan"))
    assert row["rollback"] and trainer.step_count == 6
    assert same_state(trainer.capture(), saved.state)
    assert trainer.train_step()["rollback"] is False  # training goes on from the checkpoint


@pytest.mark.parametrize("kind", ["nan", "lr_spike"])
def test_faults_are_detected_and_the_run_completes(kind):
    config = CortexSetup.phase1(**SMALL, checkpoint_every=5, lr=1e-3)
    run = cortex_train.train(config, seed=1, steps=30, faults=(cortex_train.Fault(20, kind),))
    assert run.rollbacks >= 1 and run.records["step"].iloc[-1] == 30
    assert math.isfinite(run.val_bpc)


def test_nan_without_a_guard_stops_with_a_clear_error():
    with pytest.raises(FloatingPointError, match="enable spike_guard"):
        cortex_train.train(CortexSetup.original(**SMALL), seed=0, steps=10, faults=(cortex_train.Fault(3, "nan"),))
    run = cortex_train.train(CortexSetup.original(**SMALL), seed=0, steps=10, faults=(cortex_train.Fault(3, "nan"),),
                             stop_on_divergence=True)
    assert run.diverged and math.isinf(run.val_bpc)


def test_evaluation_does_not_change_the_memories():
    trainer = cortex_train.CortexTrainer(CortexSetup.original(**SMALL), seed=0, steps=10)
    for _ in range(3):
        trainer.train_step()
    before = trainer.model.memory_state()
    trainer.evaluate()
    assert same_state(trainer.model.memory_state(), before)


def test_separate_optimizer_uses_the_documents_name_rule():
    model = cortex_train.CortexTrainer(CortexSetup.solutions(**SMALL), steps=10).model
    main, memory = cortex_train.build_optimizers(model, CortexSetup.solutions(**SMALL).train)
    names = {id(p): n for n, p in model.named_parameters()}
    memory_names = {names[id(p)] for group in memory.param_groups for p in group["params"]}
    assert memory_names and all("memory" in n for n in memory_names)
    assert not any(n.startswith(("stm.", "ltm.")) for n in memory_names)  # the STM and LTM are not "memory"
    assert memory.param_groups[0]["lr"] == pytest.approx(main.param_groups[0]["lr"] * 0.1)


def test_grouped_optimizer_multipliers_and_schedule():
    config = CortexSetup.original(**SMALL)
    model = cortex_train.CortexTrainer(config, steps=10).model
    (opt,) = cortex_train.build_optimizers(model, config.train)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"core": 3e-4, "stm": 6e-4, "ltm": 1.5e-4, "consolidator": 2.4e-4})
    scheduler = cortex_train.build_scheduler(opt, config.train, steps=70)
    seen = []
    for _ in range(40):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert seen[10] == pytest.approx(3e-4) and seen[30] == pytest.approx(3e-4)  # restarts at 10 and 30
    assert seen[9] < 1e-5


def test_a_small_training_set_is_a_prefix_of_the_corpus():
    small = cortex_train.corpus(1_000)
    assert len(small.train) == 1_000 and torch.equal(small.train, cortex_train.corpus().train[:1_000])
    run = cortex_train.train(CortexSetup.original(**SMALL, train_chars=1_000), seed=0, steps=5)
    assert len(run.losses) == 5


def test_bad_trainer_inputs():
    with pytest.raises(TypeError, match="setup must be a CortexSetup"):
        cortex_train.CortexTrainer(CortexSetup.original(**SMALL).model)
    with pytest.raises(ValueError, match="steps must be >= 4"):
        cortex_train.CortexTrainer(CortexSetup.original(**SMALL), steps=2)
    with pytest.raises(TypeError, match="steps must be an int"):
        cortex_train.CortexTrainer(CortexSetup.original(**SMALL), steps=10.0)
    with pytest.raises(ValueError, match="unknown fault"):
        cortex_train.Fault(3, "fire")
    with pytest.raises(ValueError, match="batch must be >= 0"):
        cortex_train.Fault(-1, "nan")
    with pytest.raises(TypeError, match="batch must be an int"):
        cortex_train.Fault(1.0, "nan")
    with pytest.raises(ValueError, match="at most one fault per batch"):
        cortex_train.train(CortexSetup.original(**SMALL), steps=5,
                           faults=(cortex_train.Fault(2, "nan"), cortex_train.Fault(2, "lr_spike")))


def test_experiment_helpers_on_a_short_run():
    run = cortex_train.train(CortexSetup.original(**SMALL), seed=0, steps=16)
    assert instability.tail_mean([run], "loss")[0] == pytest.approx(np.mean(run.losses[8:]))
    assert list(stabilized.quarter(range(10), 1)) == [2.0, 3.0]
    with pytest.raises(ValueError, match="quarter index"):
        stabilized.quarter(range(10), 4)
    energy = instability.memory_energy(run)
    assert len(energy) == 16 and np.all(energy > 0)
    assert instability.energy_growth(run) == pytest.approx(energy[-1] / energy[8])
    assert 0 <= instability.energy_rising_fraction(run) <= 1 and instability.stm_growth_factor(run) > 0
    assert instability.first_full_store([run], 8, 16) == [16]  # 8 entries after the first batch's 16 stores
    reactions = stabilized.fault_reactions(run, {"none": cortex_train.Fault(8, "nan")})
    assert not reactions.loc["none", "rolled back"]
    steps, smoothed = instability.smoothed_losses(run, window=4)
    assert steps[0] == 1 and len(smoothed) == 16 and smoothed[3] == pytest.approx(np.mean(run.losses[:4]))
    assert instability.oscillation_ratios([run]) == [run.summary()["oscillation_ratio"]]


def test_ablation_helpers_reuse_runs_and_sign_the_effects():
    setup = CortexSetup.original(**SMALL)
    base = instability.run_seeds(setup, [0], 8)
    ablated = instability.run_ablations(setup, {"warm restarts": {"schedule": "constant"}, "tiny": {"train_chars": 500}},
                                        {"warm restarts"}, [0], 8, reuse={"without warm restarts": base})
    assert list(ablated) == ["without warm restarts", "with tiny"] and ablated["without warm restarts"] is base
    effect = instability.cause_effects([1.0], ablated, ["warm restarts", "tiny"], {"warm restarts"})
    assert effect["warm restarts"][0] == pytest.approx(1.0 - base[0].summary()["oscillation_ratio"])
    assert effect["tiny"][0] == pytest.approx(ablated["with tiny"][0].summary()["oscillation_ratio"] - 1.0)


def test_rollback_check_of_chapter_3():
    restored, best_kept, step = stabilized.rollback_is_exact(CortexSetup.phase1(**SMALL, checkpoint_every=3), 0, 16)
    assert restored and best_kept and step == 6


def test_restart_steps_and_step_time_ratios():
    run = cortex_train.train(CortexSetup.original(**SMALL), seed=0, steps=35)
    # T_0 = 5, T_mult = 2: updates 1-5, 6-15 and 16-35 are the three cycles
    assert instability.restart_steps(run) == [6, 16]
    ratios = stabilized.step_time_ratios({"a": CortexSetup.original(**SMALL), "b": CortexSetup.phase1(**SMALL)},
                                         "a", rounds=2, calls=1, warmup=0)
    assert ratios["a"] == 1.0 and ratios["b"] > 0
    with pytest.raises(ValueError, match="reference"):
        stabilized.step_time_ratios({"a": CortexSetup.original(**SMALL)}, "b")


# --- chapter 3: rates, spreads, spikes and the document's buffer ------------------------------------

def test_a_gradient_spike_fault_scales_the_gradient_and_the_adaptive_clipper_tightens():
    setup = CortexSetup.phase1(**SMALL)
    clean = cortex_train.train(setup, seed=0, steps=16)
    fault = cortex_train.Fault(12, "grad_spike", scale=10.0)
    faulted = cortex_train.train(setup, seed=0, steps=16, faults=(fault,))
    at = {name: run.records.set_index("batch").loc[13] for name, run in (("clean", clean), ("faulted", faulted))}
    assert at["faulted"]["grad_norm"] == pytest.approx(10 * at["clean"]["grad_norm"], rel=1e-4)
    assert at["faulted"]["loss"] == at["clean"]["loss"] and not at["faulted"]["rollback"]  # the guard sees no spike
    tighter, size, clean_tight = stabilized.injected_spike_clipping(faulted, clean, fault)
    assert tighter == pytest.approx(10.0) and size > 3 and not clean_tight
    small = cortex_train.Fault(12, "grad_spike", scale=1.5)  # under 3x the average: not a spike
    tighter, size, _ = stabilized.injected_spike_clipping(cortex_train.train(setup, 0, 16, faults=(small,)), clean, small)
    assert tighter == 1.0 and size < 3
    with pytest.raises(ValueError, match="fault"):
        stabilized.injected_spike_clipping(faulted, clean, cortex_train.Fault(12, "nan"))


def test_layer_gradient_spread_is_the_std_of_log10_norms():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    for layer, scale in zip(model, (1.0, 100.0, 0.0), strict=True):  # a zero gradient is left out
        layer.weight.grad = torch.full((2, 2), scale / 2)
        layer.bias.grad = torch.ones(2) * 1e6  # biases are not weight matrices
    model.register_parameter("gate_bias", nn.Parameter(torch.zeros(2, 1)))  # 2-D, but a bias
    model.gate_bias.grad = torch.full((2, 1), 1e-9)
    assert cortex_train._layer_gradient_spread(model) == pytest.approx(math.sqrt(2))
    model[1].weight.grad = None
    assert math.isnan(cortex_train._layer_gradient_spread(model))
    run = cortex_train.train(CortexSetup.original(**SMALL), seed=0, steps=4)
    assert run.records["layer_grad_spread"].between(0, 10).all()


def test_counted_differences_leave_out_seeds_where_nothing_happened():
    assert stabilized.counted_differences([0, 2, 1], [0, 3, 0]) == [-1, 1]
    assert stabilized.counted_differences([0, 0], [0, 0]) == []


def test_convergence_rate_and_roughness():
    losses = [4.0, 3.0, 2.0, 1.0, 1.0, 1.0]
    assert stabilized.steps_to_level(losses, 1.0, window=1) == 4
    assert stabilized.steps_to_level(losses, 0.5, window=1) == 7  # never: one past the run
    assert stabilized.steps_to_level(losses, 2.5, window=2) == 3  # moving means 4, 3.5, 2.5
    fast, slow = SimpleNamespace(losses=[4.0, 1.0, 1.0, 1.0]), SimpleNamespace(losses=[4.0, 3.0, 2.0, 1.0])
    assert stabilized.convergence_speed([fast], [slow], window=1) == [0.5]  # level 1: step 2 against 4
    assert stabilized.convergence_speed([slow], [fast], window=1) == [2.0]
    jagged = SimpleNamespace(losses=[9.0] * 4 + [1.0, 3.0, 1.0, 3.0])  # second half: steps of 2 at mean 2
    assert stabilized.roughness([jagged, SimpleNamespace(losses=[5.0] * 6)]) == [pytest.approx(1.0), 0.0]


def test_the_documents_buffer_never_ages_an_entry_past_its_capacity():
    assert stabilized.document_buffer_ages(4, 100) == (4, 0)
    assert stabilized.document_buffer_ages(128, 3) == (3, 0)
    assert stabilized.document_buffer_ages(4, 0) == (0, 0)
    with pytest.raises(ValueError, match="capacity"):
        stabilized.document_buffer_ages(0, 10)
