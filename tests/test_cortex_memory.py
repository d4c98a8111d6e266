"""CortexGPT's memory components: STM, LTM (FAISS), gates, token selection, consolidation."""

from __future__ import annotations

import math

import pytest
import torch

from nested_lab import runtime
from nested_lab.memory.consolidation import Consolidator
from nested_lab.memory.gates import MemoryGate, gate_entropy, softmax_jacobian
from nested_lab.memory.ltm import LongTermMemory
from nested_lab.memory.sparsity import hard_topk_mask, select_tokens
from nested_lab.memory.stm import ShortTermMemory

D = 8


def _stm(**kwargs) -> ShortTermMemory:
    with runtime.seeded(0):
        return ShortTermMemory(D, **kwargs)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=runtime.generator(seed))


# --- short-term memory -----------------------------------------------------------------------

def test_stm_read_shapes_and_empty_memory_reads_zeros():
    stm = _stm(capacity=4)
    read = stm.read(_rand(3, 5, D))
    assert read.past.shape == (3, 5, D) and read.weights_new.shape == (3, 5, 5 * 3)
    assert torch.equal(read.at(0, []), torch.zeros(3, D))


def test_stm_reads_only_earlier_timesteps_within_a_pass():
    stm = _stm(capacity=16)
    read = stm.read(_rand(2, 6, D))
    weights = read.weights_new.unflatten(-1, (6, 2))  # [B, T, T', B']
    causal = torch.arange(6)[:, None] > torch.arange(6)[None, :]
    assert torch.all(weights[:, ~causal] == 0)
    assert torch.allclose(weights.sum(dim=(-1, -2))[:, 1:], torch.ones(2, 5))


class _DequeSTM:
    """The original's algorithm, literally: a deque of entries (a whole batch, or one row with
    ``storage="row"``), one read and one store per timestep, access counts incremented at the
    argmax's flat row index (``"flat_index"``) or on the entry holding it (``"entry"``)."""

    def __init__(self, stm: ShortTermMemory) -> None:
        self.stm, self.keys, self.values, self.counts = stm, [], [], []

    def step(self, query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if self.keys:
            keys, values = torch.cat(self.keys), torch.cat(self.values)
            scores = self.stm.query_proj(query) @ self.stm.key_proj(keys).T / math.sqrt(D)
            weights = torch.softmax(scores, dim=-1)
            out = weights @ values
            sizes = [len(k) for k in self.keys]
            owner = [i for i, size in enumerate(sizes) for _ in range(size)]
            for idx in weights.argmax(dim=-1).tolist():
                entry = idx if self.stm.access_count == "flat_index" else owner[idx]
                if entry < len(self.counts):
                    self.counts[entry] += 1
        else:
            out = torch.zeros_like(query)
        rows = [(query, value)] if self.stm.storage == "batch" else [(q[None], v[None]) for q, v in zip(query, value,
                                                                                                         strict=True)]
        for key, val in rows:
            for store, item in ((self.keys, key), (self.values, val), (self.counts, 1)):
                store.append(item)
                del store[:-self.stm.capacity]
        return out


@pytest.mark.parametrize("storage", ["batch", "row"])
@pytest.mark.parametrize("access_count", ["flat_index", "entry"])
def test_stm_matches_the_per_timestep_deque(access_count, storage):
    stm = _stm(capacity=5 if storage == "batch" else 11, access_count=access_count, storage=storage)
    reference = _DequeSTM(stm)
    with torch.no_grad():
        for batch_index in range(3):  # a carried memory: three passes of 4 timesteps
            current, values = _rand(3, 4, D, seed=batch_index), _rand(3, 4, D, seed=10 + batch_index)
            read, written = stm.read(current), []
            for t in range(4):
                expected = reference.step(current[:, t], values[:, t])
                assert torch.allclose(read.at(t, written), expected, atol=1e-5)
                written.append(values[:, t])
            stm.write(current, values)
    assert torch.equal(stm.keys, torch.cat(reference.keys))
    assert stm.counts.tolist() == reference.counts


def test_stm_stays_bounded_over_100k_writes():
    stm = _stm(capacity=128)
    keys = _rand(4, 100, D)
    for _ in range(1_000):  # 10^5 timestep stores
        stm.write(keys, keys)
    assert stm.entries == 128 and len(stm.keys) == 128 * 4 and len(stm.counts) == 128
    last_128 = torch.cat([keys, keys], dim=1)[:, -128:]  # the last 128 timesteps, whole batches
    assert torch.equal(stm.keys, last_128.transpose(0, 1).reshape(-1, D))


def test_stm_decay_buffer_stays_bounded_and_decays_importance():
    stm = _stm(capacity=16, decay_rate=0.95)
    for _ in range(1_000):
        stm.write(_rand(2, 100, D), _rand(2, 100, D))
    assert stm.entries == 16
    assert torch.allclose(stm.importance, 0.95 ** torch.arange(15, -1, -1).float())


def test_stm_write_must_follow_its_read():
    stm = _stm(capacity=8)
    stm.read(_rand(2, 3, D))
    with pytest.raises(RuntimeError, match="write\\(\\) must store the pass"):
        stm.write(_rand(2, 5, D), _rand(2, 5, D))


def test_stm_state_roundtrip():
    stm = _stm(capacity=4)
    stm.write(_rand(2, 3, D), _rand(2, 3, D))
    saved = stm.state()
    stm.write(_rand(2, 3, D, seed=9), _rand(2, 3, D, seed=9))
    stm.load_state(saved)
    assert torch.equal(stm.keys, saved.keys) and torch.equal(stm.counts, saved.counts)


def test_stm_bad_inputs():
    with pytest.raises(ValueError, match="access_count"):
        ShortTermMemory(D, access_count="nope")
    with pytest.raises(ValueError, match="capacity"):
        ShortTermMemory(D, capacity=0)
    with pytest.raises(ValueError, match="decay_rate"):
        ShortTermMemory(D, decay_rate=1.5)
    with pytest.raises(ValueError, match="unknown storage"):
        ShortTermMemory(D, storage="cell")


# --- long-term memory ------------------------------------------------------------------------

def test_ltm_retrieval_matches_brute_force_search():
    with runtime.seeded(0):
        ltm = LongTermMemory(16, code_dim=6, top_k=5)
    keys, values, queries = _rand(300, 16), _rand(300, 6, seed=1), _rand(40, 16, seed=2)
    ltm.write(keys, values)
    with torch.no_grad():
        distances = torch.cdist(ltm.compressor(queries).double(), ltm.compressor(keys).double()) ** 2
        nearest = distances.topk(5, largest=False).values
        found_d, found_ids = ltm.search(queries)
        # the k smallest distances, found at ids whose true distances they are (ties may swap ids)
        assert torch.allclose(found_d.double(), nearest, rtol=1e-3, atol=1e-6)
        assert torch.allclose(distances.gather(1, found_ids), nearest, rtol=1e-3, atol=1e-6)
        weights = 1 / (found_d + 1e-6)
        weights = weights / weights.sum(dim=1, keepdim=True)
        expected = ltm.decompressor((weights[..., None] * values[found_ids]).sum(dim=1))
        assert torch.allclose(ltm.read(queries), expected, atol=1e-6)


def test_ltm_empty_reads_zeros_and_only_decompressor_learns():
    with runtime.seeded(0):
        ltm = LongTermMemory(16, code_dim=4, top_k=3)
    assert torch.equal(ltm.read(_rand(2, 16)), torch.zeros(2, 16))
    ltm.write(_rand(2, 16), _rand(2, 4))  # fewer rows than top_k: missing ids are ignored
    ltm.read(_rand(5, 16)).sum().backward()
    assert all(p.grad is None for p in ltm.compressor.parameters())
    assert all(p.grad is not None for p in ltm.decompressor.parameters())


def test_ltm_state_roundtrip():
    with runtime.seeded(0):
        ltm = LongTermMemory(16, code_dim=4)
    ltm.write(_rand(7, 16), _rand(7, 4))
    saved = ltm.state()
    ltm.write(_rand(3, 16), _rand(3, 4))
    ltm.load_state(saved)
    assert ltm.size == 7 and torch.equal(ltm.codes(), saved[0])


# --- gates -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["softmax", "temperature_softmax", "temperature_sigmoid"])
def test_gates_are_convex_mixes(kind):
    with runtime.seeded(0):
        gate = MemoryGate(D, kind)
    c, s, lt = _rand(5, D), _rand(5, D, seed=1), _rand(5, D, seed=2)
    y, g = gate(c, s, lt)
    assert g.shape == (5, 3) and torch.allclose(g.sum(-1), torch.ones(5)) and bool((g >= 0).all())
    assert torch.allclose(y, g[:, :1] * c + g[:, 1:2] * s + g[:, 2:] * lt, atol=1e-6)


def test_softmax_jacobian_matches_autograd_and_is_symmetric():
    logits = _rand(3)
    numeric = torch.autograd.functional.jacobian(lambda z: torch.softmax(z, -1), logits)
    closed = softmax_jacobian(torch.softmax(logits, -1))
    assert torch.allclose(numeric, closed, atol=1e-6) and torch.allclose(closed, closed.T)
    assert torch.linalg.eigvals(closed).imag.abs().max() < 1e-6
    assert gate_entropy(torch.full((1, 3), 1 / 3)).item() == pytest.approx(math.log(3))


def test_gate_bad_inputs():
    with pytest.raises(ValueError, match="unknown gate"):
        MemoryGate(D, "hard")
    with pytest.raises(ValueError, match="temperature"):
        MemoryGate(D, "softmax", temperature=0)


# --- token selection -------------------------------------------------------------------------

def test_hard_topk_mask_keeps_five_percent_and_blocks_the_gradient():
    scores = _rand(16, 256).requires_grad_(True)
    mask = hard_topk_mask(scores, 0.05)
    assert mask.shape == (16, 256) and torch.equal(mask.sum(-1), torch.full((16,), 12.0))
    assert not mask.requires_grad


def test_gumbel_topk_keeps_the_fraction_and_passes_gradient():
    scores = (_rand(16, 512) * 0.5).requires_grad_(True)
    temperature = torch.ones(16, 1, requires_grad=True)
    soft = select_tokens(scores, 0.15, "gumbel_topk", True, 0.1, runtime.generator(3), temperature)
    again = select_tokens(scores, 0.15, "gumbel_topk", True, 0.1, runtime.generator(3), temperature)
    assert torch.equal(soft, again) and soft.requires_grad
    assert 0.13 < soft.mean().item() < 0.17  # the threshold is the k-th noisy score: about 15% pass
    (soft * _rand(16, 512, seed=1)).sum().backward()
    assert scores.grad.abs().sum() > 0 and temperature.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="learned temperature"):
        select_tokens(scores, 0.15, "gumbel_topk", True, 0.1, runtime.generator(3))


def test_shipped_gumbel_dim0_spreads_one_unit_over_all_tokens():
    scores = _rand(4, 200).requires_grad_(True)
    shipped = select_tokens(scores, 0.05, "gumbel_dim0", True, 0.5, runtime.generator(3))
    assert torch.allclose(shipped.sum(-1), torch.ones(4))  # a softmax over the 200 tokens
    evaluated = select_tokens(scores, 0.05, "gumbel_dim0", False, 0.5, runtime.generator(3))
    assert torch.equal(evaluated.sum(-1), torch.full((4,), 10.0))  # hard top-k 0/1 in evaluation


def test_gumbel_does_not_touch_the_global_generator():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    select_tokens(_rand(2, 50), 0.1, "gumbel_topk", True, 0.1, runtime.generator(0), torch.ones(2, 1))
    select_tokens(_rand(2, 50), 0.1, "gumbel_dim0", True, 0.5, runtime.generator(0))
    assert torch.equal(torch.rand(1), expected)


# --- consolidation ---------------------------------------------------------------------------

def _memories(code_dim: int = 4):
    stm = _stm(capacity=8, access_count="entry")
    with runtime.seeded(0):
        ltm = LongTermMemory(D, code_dim=code_dim)
    stm.write(_rand(2, 8, D), _rand(2, 8, D))
    stm.counts = torch.tensor([5, 0, 3, 1, 4, 0, 0, 9])
    return stm, ltm


def test_random_consolidation_readds_the_same_entries():
    stm, ltm = _memories()
    with runtime.seeded(0):
        consolidator = Consolidator(D, 4, "random", probability=1.0)
    added = [consolidator.after_forward(stm, ltm, 8, runtime.generator(0)) for _ in range(3)]
    assert added == [8, 8, 8] and ltm.size == 24  # 4 entries x 2 rows, again and again


def test_interval_consolidation_and_shipped_async_never_fills_the_ltm():
    stm, ltm = _memories()
    with runtime.seeded(0):
        interval = Consolidator(D, 4, "interval", interval=3)
    added = [interval.after_forward(stm, ltm, 8, runtime.generator(0)) for _ in range(6)]
    assert added == [0, 0, 8, 0, 0, 8]
    stm, ltm = _memories()
    with runtime.seeded(0):
        shipped = Consolidator(D, 4, "shipped_async", probability=0.5)
    for _ in range(20):
        shipped.after_forward(stm, ltm, 8, runtime.generator(0))
    assert ltm.size == 0 and shipped.queued_rows > 0 and shipped.events > 0


def test_consolidation_bad_inputs():
    with pytest.raises(ValueError, match="unknown consolidation"):
        Consolidator(D, 4, "sleep")
    with pytest.raises(ValueError, match="probability"):
        Consolidator(D, 4, "random", probability=2)
