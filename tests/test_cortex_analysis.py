"""Chapter 2's audit measurements: gate spectrum, read-out gain, dead units, capacity, probes, energy."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch.func import jacrev

from nested_lab import runtime
from nested_lab.data.corpus import CharCorpus
from nested_lab.experiments import cortexgpt_instability as audit
from nested_lab.models.cortex import CortexGPT
from nested_lab.train.cortex_setup import CortexSetup
from nested_lab.train.guards import same_state

SMALL = {"dim": 16, "columns": 4, "stm_capacity": 8, "ltm_code_dim": 4, "batch_size": 4, "context": 10}
VOCAB = 11


def _model() -> CortexGPT:
    return CortexGPT(CortexSetup.original(**SMALL).model, VOCAB, seed=0)


def _batches(n: int = 3) -> list[torch.Tensor]:
    return [torch.randint(0, VOCAB, (4, 10), generator=runtime.generator(i)) for i in range(n)]


def test_gate_spectrum_is_real_and_at_most_one_half():
    gates = torch.softmax(torch.randn(500, 3, generator=runtime.generator(0)) * 3, dim=-1)
    spectrum = audit.gate_jacobian_spectrum(torch.cat([gates, torch.tensor([[0.5, 0.5, 0.0]])]))
    assert spectrum.closed_form_error < 1e-12 and spectrum.asymmetry == 0.0
    assert spectrum.largest_smallest_modulus < 1e-12 and spectrum.min_modulus < 1e-12  # rows sum to 0
    assert spectrum.max_imaginary == 0.0
    assert spectrum.max_modulus == pytest.approx(0.5, abs=1e-9)  # reached at g = (1/2, 1/2, 0)


def test_readout_gain_matches_a_direct_jacobian():
    model = _model()
    model(_batches(1)[0])
    query = torch.randn(3, 16, generator=runtime.generator(4))
    gains = audit.readout_gain(model.stm, query)
    stm = model.stm

    def readout(x):
        scores = stm.query_proj(x) @ stm.key_proj(stm.keys).T / math.sqrt(16)
        return torch.softmax(scores, -1) @ stm.values

    for i in range(3):
        jacobian = jacrev(readout)(query[i])
        assert gains[i].item() == pytest.approx(torch.linalg.matrix_norm(jacobian, ord=2).item(), rel=1e-4)
    with pytest.raises(ValueError, match="STM is empty"):
        audit.readout_gain(_model().stm, query)


def test_dead_unit_fraction_counts_units_that_never_fire():
    model = CortexGPT(CortexSetup.original(**SMALL, active_fraction=1.0).model, VOCAB, seed=0)  # every token selected
    with torch.no_grad():
        model.columns.b1[:] = 1e4  # every unit fires on every token
        assert audit.dead_unit_fraction(model, _batches()) == 0.0
        model.columns.b1[:, :, :4] = -1e4  # 4 of the 16 units of every column can never fire
        assert audit.dead_unit_fraction(model, _batches()) == 0.25
    sparse = _model()  # 5% of 40 tokens: 2 tokens per column and batch
    assert audit.dead_unit_fraction(sparse, _batches(1)) >= audit.dead_unit_fraction(sparse, _batches(3))


def test_gate_memory_gain_matches_autograd():
    model = _model()
    c, r, lt = (torch.randn(16, generator=runtime.generator(i)) for i in range(3))
    jacobian = jacrev(lambda r_: torch.softmax(model.memory_gate.proj(torch.cat([c, r_, lt])), -1))(r)
    gates = torch.softmax(model.memory_gate.proj(torch.cat([c, r, lt])), -1)
    gain = audit.gate_memory_gain(gates[None], model.memory_gate.proj.weight[:, 16:32])
    assert gain.item() == pytest.approx(torch.linalg.matrix_norm(jacobian, ord=2).item(), rel=1e-5)
    assert torch.equal(audit.stm_gate_gain(model, gates[None]), gain)


def test_memory_gradient_norm_is_zero_under_stop_gradient():
    tokens, targets = _batches(2)
    for stop, positive in ((False, True), (True, False)):
        model = CortexGPT(CortexSetup.original(**SMALL, stop_gradient=stop).model, VOCAB, seed=0)
        model(tokens)
        before = model.memory_state()
        assert (audit.memory_gradient_norm(model, tokens, targets) > 0) == positive
        assert same_state(model.memory_state(), before)


def test_probe_restores_the_memories_and_coverage_loss():
    model = _model()
    before = model.memory_state()
    outputs = audit.probe(model, _batches())
    assert same_state(model.memory_state(), before) and model.training
    uncovered, covered = audit.loss_by_column_coverage(outputs, _batches())
    assert math.isfinite(uncovered) and math.isfinite(covered)
    assert audit.mean_loss(outputs, _batches()) == pytest.approx(
        sum(torch.nn.functional.cross_entropy(o.logits.flatten(0, 1), t.flatten()).item()
            for o, t in zip(outputs, _batches(), strict=True)) / 3, rel=1e-6)


def test_stm_holds_one_entry_per_timestep_up_to_its_capacity():
    """The code behind proof.stm-unbounded and proof.phase-point-128: every timestep of a pass
    stores one entry, so a deque of 128 is first full after exactly 128 timestep stores and
    never holds more (the model's carried STM, passes of 10 timesteps)."""
    model = CortexGPT(CortexSetup.original(**{**SMALL, "stm_capacity": 128}).model, VOCAB, seed=0)
    sizes = []
    with torch.no_grad():
        for tokens in _batches(20):
            model(tokens)
            sizes.append(model.stm.entries)
    assert sizes == [min(10 * (i + 1), 128) for i in range(20)]
    records = pd.DataFrame({"stm_entries": [64, 128, 128]})  # passes of 64 timesteps
    assert audit.first_full_store([SimpleNamespace(records=records)], 128, 64) == [128]


def test_finite_metric_leaves_out_diverged_runs():
    runs = [SimpleNamespace(diverged=d, summary=lambda r=r: {"spike_ratio": r})
            for d, r in ((False, 1.5), (True, 9.0), (False, 4.5))]
    assert audit.finite_metric(runs, "spike_ratio") == [1.5, 4.5]
    assert audit.finite_metric(runs[1:2], "spike_ratio") == []


def test_log2_binomial():
    assert audit.log2_binomial(10, 3) == pytest.approx(math.log2(120))
    assert audit.log2_binomial(768, 38) == pytest.approx(math.log2(math.comb(768, 38)))
    with pytest.raises(ValueError, match="k <= n"):
        audit.log2_binomial(3, 5)
    with pytest.raises(ValueError, match="k must be >= 0"):
        audit.log2_binomial(3, -1)
    with pytest.raises(TypeError, match="k must be an int"):
        audit.log2_binomial(768, 38.4)


def test_corpus_sequences_are_shifted_windows():
    corpus = CharCorpus.from_text("abcdefghij" * 20)
    inputs, targets = corpus.sequences("train", 3, 5, runtime.generator(0))
    assert inputs.shape == targets.shape == (3, 5)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
