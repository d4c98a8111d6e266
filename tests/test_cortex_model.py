"""The CortexGPT replica: shapes, masks, gradients, options, presets, bad configs and setups."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from nested_lab import runtime
from nested_lab.models.cortex import CortexConfig, CortexGPT
from nested_lab.train.cortex_setup import PHASE1_FIXES, SOLUTION_FIXES, CortexSetup, CortexTrainConfig

SMALL = {"dim": 16, "columns": 4, "stm_capacity": 8, "ltm_code_dim": 4, "batch_size": 4, "context": 10}
VOCAB = 11


def _model(setup: CortexSetup, seed: int = 0) -> CortexGPT:
    return CortexGPT(setup.model, VOCAB, seed)


def _tokens(batch: int = 4, steps: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, steps), generator=runtime.generator(seed))


@pytest.mark.parametrize("preset", ["original", "solutions", "phase1"])
def test_forward_shapes_for_every_preset(preset):
    model = _model(getattr(CortexSetup, preset)(**SMALL))
    out = model(_tokens())
    assert out.logits.shape == (4, 10, VOCAB)
    assert out.gates.shape == (4, 10, 3) and torch.allclose(out.gates.sum(-1), torch.ones(4, 10))
    assert out.column_weights.shape == (4, 40)
    assert out.current.shape == out.stm_read.shape == out.ltm_read.shape == (4, 10, 16)
    assert model.stm.entries == 8


def test_hard_topk_mask_selects_five_percent_of_the_flattened_batch():
    model = _model(CortexSetup.original(**{**SMALL, "columns": 16}))
    out = model(_tokens(8, 32))  # 256 tokens: each column keeps int(0.05 * 256) = 12
    assert torch.equal(out.column_weights.sum(-1), torch.full((16,), 12.0))
    assert set(out.column_weights.unique().tolist()) == {0.0, 1.0}
    zero_tokens = (out.column_weights.sum(0) == 0).float().mean().item()
    assert 0.3 < zero_tokens < 0.6  # about 0.95**16 = 0.44 of the tokens get nothing from any column


def test_no_gradient_reaches_the_gates_with_hard_topk_but_does_with_gumbel():
    for selection, reaches in (("hard_topk", False), ("gumbel_topk", True), ("gumbel_dim0", True)):
        model = _model(CortexSetup.original(**SMALL, selection=selection))
        out = model(_tokens())
        F.cross_entropy(out.logits.flatten(0, 1), _tokens(seed=1).flatten()).backward()
        grad = model.columns.gate_weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == reaches, selection
        assert model.columns.w1.grad is not None  # the column transforms do learn


def test_stop_gradient_cuts_the_memory_paths():
    model = _model(CortexSetup.original(**SMALL, stop_gradient=True))
    model(_tokens())  # fill the memory
    out = model(_tokens(seed=2))
    out.logits.sum().backward()
    assert model.stm.query_proj.weight.grad is None and model.ltm.decompressor[0].weight.grad is None
    model = _model(CortexSetup.original(**SMALL))
    model(_tokens())
    model(_tokens(seed=2)).logits.sum().backward()
    assert model.stm.query_proj.weight.grad is not None


def test_memory_scopes():
    model = _model(CortexSetup.original(**SMALL, memory_scope="sequence"))
    model(_tokens())
    out = model(_tokens(seed=3))
    # a sequence-scoped read at t = 0 sees nothing: the memories are reset at every pass
    assert torch.equal(out.stm_read[:, 0], torch.zeros(4, 16))
    assert torch.equal(out.ltm_read, torch.zeros(4, 10, 16))
    carried = _model(CortexSetup.original(**SMALL))
    carried(_tokens())
    assert carried(_tokens(seed=3)).stm_read[:, 0].abs().sum() > 0


def _original_forward(model: CortexGPT, tokens: torch.Tensor, deque: dict) -> torch.Tensor:
    """The original's forward pass, literally: one STM read, gate and store per timestep,
    with autograd through every step (``deque`` holds the STM across calls)."""
    batch, steps = tokens.shape
    current, _ = model._columns(model.embed(tokens).reshape(batch * steps, -1))
    current = current.view(batch, steps, -1)
    outputs = []
    for t in range(steps):
        c = current[:, t]
        if deque["keys"]:
            keys, values = torch.cat(deque["keys"]), torch.cat(deque["values"])
            scores = model.stm.query_proj(c) @ model.stm.key_proj(keys).T / math.sqrt(c.shape[-1])
            stm = torch.softmax(scores, -1) @ values
        else:
            stm = torch.zeros_like(c)
        gates = torch.softmax(model.memory_gate.proj(torch.cat([c, stm, model.ltm.read(c)], -1)), -1)
        y = gates[:, :1] * c + gates[:, 1:2] * stm + gates[:, 2:] * model.ltm.read(c)
        outputs.append(y)
        for name, item in (("keys", c.detach()), ("values", y.detach())):
            deque[name] = [*deque[name], item][-model.config.stm_capacity:]
    return model.output_proj(torch.stack(outputs, 1))


def test_the_two_pass_memory_loop_equals_the_original_per_timestep_loop():
    """Values and gradients, over passes that carry the memory and cross its window."""
    config = CortexSetup.original(**{**SMALL, "stm_capacity": 7}, consolidation_probability=0.0)
    model = _model(config)
    reference = copy.deepcopy(model)
    deque = {"keys": [], "values": []}
    for seed in range(4):
        tokens, weights = _tokens(3, 5, seed), torch.randn(3, 5, VOCAB, generator=runtime.generator(50 + seed))
        model.zero_grad()
        reference.zero_grad()
        ours, theirs = model(tokens).logits, _original_forward(reference, tokens, deque)
        assert torch.allclose(ours, theirs, atol=1e-6)
        (ours * weights).sum().backward()
        (theirs * weights).sum().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_row_storage_keeps_capacity_rows():
    model = _model(CortexSetup.phase1(**SMALL))
    model(_tokens())
    assert model.stm.entries == 8 and len(model.stm.keys) == 8  # 8 rows of the last two timesteps


def test_same_seed_same_numbers_different_seed_different_numbers():
    config = CortexSetup.solutions(**SMALL)
    a, b, c = _model(config, 0), _model(config, 0), _model(config, 1)
    out_a, out_b, out_c = a(_tokens()), b(_tokens()), c(_tokens())
    assert torch.equal(out_a.logits, out_b.logits)
    assert not torch.equal(out_a.logits, out_c.logits)


def test_original_consolidation_fills_the_ltm_and_the_shipped_async_never_does():
    model = _model(CortexSetup.original(**SMALL, consolidation="interval", consolidation_interval=1,
                                         consolidation_threshold=1))
    for seed in range(3):
        model(_tokens(seed=seed))
    assert model.ltm.size > 0
    shipped = _model(CortexSetup.phase1(**SMALL, consolidation="shipped_async", consolidation_probability=1.0))
    for seed in range(3):
        shipped(_tokens(seed=seed))
    assert shipped.ltm.size == 0 and shipped.consolidator.queued_rows > 0


def test_eval_mode_does_not_consolidate():
    model = _model(CortexSetup.original(**SMALL, consolidation="interval", consolidation_interval=1,
                                         consolidation_threshold=1))
    model.eval()
    with torch.no_grad():
        for seed in range(3):
            model(_tokens(seed=seed))
    assert model.ltm.size == 0


def test_solutions_gate_residual_is_the_plain_mix():
    model = _model(CortexSetup.original(**SMALL, gate="temperature_softmax"))
    c, s, lt = (torch.randn(3, 16, generator=runtime.generator(i)) for i in range(3))
    y, g = model.memory_gate(c, s, lt)
    assert torch.allclose(y, g[:, :1] * c + g[:, 1:2] * s + g[:, 2:] * lt, atol=1e-6)


def test_presets_hold_the_documents_fixes():
    solutions, phase1 = CortexSetup.solutions(), CortexSetup.phase1()
    for preset, fixes in ((solutions, SOLUTION_FIXES), (phase1, PHASE1_FIXES)):
        assert all(preset.value(k) == v for fix in fixes.values() for k, v in fix.items())
    train = phase1.train
    assert train.lr == 1e-4 and train.betas == (0.9, 0.98) and train.clip == 0.5 and train.weight_decay == 0.1
    assert CortexSetup.phase1(without="sigmoid gate").model.gate == "softmax"
    assert CortexSetup.solutions(without="EMA 0.999").train.ema_decay is None
    with pytest.raises(ValueError, match="unknown fix"):
        CortexSetup.phase1(without="dropout")
    original = CortexSetup.original()
    assert (original.model.selection, original.model.gate, original.model.consolidation) == (
        "hard_topk", "softmax", "random")
    assert original.with_(gate="temperature_sigmoid").model.gate == "temperature_sigmoid"


def test_a_setup_routes_each_field_to_its_half():
    setup = CortexSetup.original().with_(dim=32, lr=1e-3, context=16)
    assert (setup.model.dim, setup.train.lr, setup.train.context) == (32, 1e-3, 16)
    assert setup.model == CortexConfig(dim=32) and setup.train == CortexTrainConfig(lr=1e-3, context=16)
    assert CortexSetup.phase1(lr=1e-3).train.lr == 1e-3  # an override wins over the preset's fix


@pytest.mark.parametrize(("changes", "message"), [
    ({"gate": "relu"}, "unknown gate"),
    ({"selection": "topk"}, "unknown selection"),
    ({"memory_scope": "global"}, "unknown memory_scope"),
    ({"dim": 0}, "dim must be >= 4"),
    ({"dim": 2}, "dim must be >= 4"),
    ({"active_fraction": 0.0}, r"active_fraction must be finite and in \(0, 1\]"),
    ({"active_fraction": 1.5}, "active_fraction"),
    ({"lr": -1e-3}, r"lr must be finite and > 0"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"consolidation_probability": 2.0}, "consolidation_probability"),
    ({"residual_weight": float("nan")}, "residual_weight must be finite"),
    ({"lr": float("inf")}, "lr must be finite"),
    ({"spike_factor": 1.0}, r"spike_factor must be finite and > 1"),
    ({"stm_storage": "cell"}, "unknown stm_storage"),
    ({"train_chars": 5}, r"train_chars must be >= 66"),  # context 64 + 2
    ({"clip": "1"}, "clip must be a number"),
])
def test_bad_configs_raise_clear_errors(changes, message):
    with pytest.raises((ValueError, TypeError), match=message):
        CortexSetup.original(**changes)


@pytest.mark.parametrize("changes", [{"columns": 2.5}, {"dim": "64"}, {"train_chars": 1000.0}, {"stm_capacity": True}])
def test_non_int_config_fields_raise_type_error(changes):
    name = next(iter(changes))
    with pytest.raises(TypeError, match=f"{name} must be an int"):
        CortexSetup.original(**changes)


def test_unknown_field_and_bad_inputs():
    with pytest.raises(ValueError, match="unknown CortexSetup field"):
        CortexSetup().with_(temperature=2)
    with pytest.raises(TypeError, match="config must be a CortexConfig"):
        CortexGPT({"dim": 16}, VOCAB)
    with pytest.raises(ValueError, match="vocab_size"):
        CortexGPT(CortexSetup.original(**SMALL).model, 1)
    assert dataclasses.is_dataclass(CortexConfig()) and dataclasses.is_dataclass(CortexSetup())
