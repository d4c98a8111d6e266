"""CortexGPT at CPU scale: a faithful replica with every original design choice an option.

The original is ``comsa33/brain-inspired-gpt``, ``cortexgpt/models/cortex_gpt.py``
at e52aae1 (d = 768, 50k BPE vocabulary); the "stable" version is
``cortex_gpt_unified.py``. For each token of a ``[B, T]`` batch:

1. ``x = embed(token) + pe(pos) * exp(-0.1 pos)``: sinusoidal positions, damped to
   almost nothing after ~50 tokens. There is no self-attention.
2. 16 cortical columns ``Linear(d,d)-ReLU-Linear(d,d)``, each with a gate
   ``Linear(d,1)`` that selects a fraction of the ``B*T`` tokens
   (:mod:`nested_lab.memory.sparsity`); unselected tokens get zero from that
   column. A mixer ``Linear(16d, d)`` gives ``current``.
3. A loop over timesteps mixes ``current`` with the STM read-out and the LTM
   read-out through the memory gate (:mod:`nested_lab.memory.gates`), and stores
   ``(current, y)`` in the STM.
4. Logits ``Linear(d, V)``; after a training pass, consolidation
   (:mod:`nested_lab.memory.consolidation`).

:class:`CortexConfig` holds the architecture only, as nanoGPT's ``GPTConfig`` does;
the training settings are :class:`~nested_lab.train.cortex_setup.CortexTrainConfig`,
and the presets that bundle both (``original()``, ``solutions()``, ``phase1()``) are
:class:`~nested_lab.train.cortex_setup.CortexSetup`'s.

Shapes: B batch, T timesteps, N = B*T tokens, C columns, d width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from nested_lab import runtime
from nested_lab.memory.consolidation import CONSOLIDATIONS, Consolidator
from nested_lab.memory.gates import GATES, MemoryGate
from nested_lab.memory.ltm import LongTermMemory
from nested_lab.memory.sparsity import SELECTIONS, select_tokens
from nested_lab.memory.stm import ACCESS_COUNTS, STORAGES, ShortTermMemory
from nested_lab.parameters import check_choice, check_ints_at_least, check_positive_ints, check_range

MEMORY_SCOPES = ("carried", "batch", "sequence")
MAX_POSITIONS = 4096  # length of the position encoding: the longest sequence the model reads
_CHOICES = {"selection": SELECTIONS, "gate": GATES, "consolidation": CONSOLIDATIONS,
            "access_count": ACCESS_COUNTS, "stm_storage": STORAGES, "memory_scope": MEMORY_SCOPES}
_POSITIVE = ("selection_tau", "gate_temperature", "position_decay")


@dataclass(frozen=True)
class CortexConfig:
    """The replica's architecture; the defaults are the original's, its sizes scaled to a CPU
    (the original: d = 768, LTM code 256; here d = 64, LTM code 32)."""

    dim: int = 64
    columns: int = 16
    active_fraction: float = 0.05
    selection: str = "hard_topk"
    selection_tau: float = 0.5
    position_decay: float = 0.1
    stm_capacity: int = 128
    stm_storage: str = "batch"
    access_count: str = "flat_index"
    stm_decay: float | None = None
    memory_scope: str = "carried"
    ltm_code_dim: int = 32
    ltm_top_k: int = 5
    consolidation: str = "random"
    consolidation_probability: float = 0.1
    consolidation_interval: int = 10
    consolidation_threshold: int = 3
    gate: str = "softmax"
    gate_temperature: float = 1.0
    memory_norm: bool = False
    memory_scale: bool = False  # the solutions document's learned scales of current, STM and LTM
    stop_gradient: bool = False
    residual_weight: float = 0.0
    output_norm: bool = False
    layer_norms: bool = False
    logit_softcap: float | None = None

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            check_choice(name, getattr(self, name), allowed)
        check_range("dim", self.dim, 4, integer=True)  # the LTM compressor halves it twice
        check_positive_ints(columns=self.columns, stm_capacity=self.stm_capacity, ltm_code_dim=self.ltm_code_dim,
                            ltm_top_k=self.ltm_top_k, consolidation_interval=self.consolidation_interval,
                            consolidation_threshold=self.consolidation_threshold)
        check_range("active_fraction", self.active_fraction, 0, 1, low_open=True)
        check_range("consolidation_probability", self.consolidation_probability, 0, 1)
        check_range("residual_weight", self.residual_weight, 0, 10)
        for name in _POSITIVE:
            check_range(name, getattr(self, name), 0, low_open=True)
        if self.stm_decay is not None:
            check_range("stm_decay", self.stm_decay, 0, 1, low_open=True, high_open=True)
        if self.logit_softcap is not None:
            check_range("logit_softcap", self.logit_softcap, 0, low_open=True)


@dataclass
class CortexOutput:
    """Logits and what the chapters measure about one forward pass."""

    logits: torch.Tensor  # [B, T, V]
    gates: torch.Tensor  # [B, T, 3]: weights on current, STM, LTM
    column_weights: torch.Tensor  # [columns, B*T]: each column's weight on each token
    current: torch.Tensor  # [B, T, d]: the mixer output, the gate's first input
    stm_read: torch.Tensor  # [B, T, d]
    ltm_read: torch.Tensor  # [B, T, d]


class CorticalColumns(nn.Module):
    """``columns`` independent ``Linear(d,d)-ReLU-Linear(d,d)`` blocks with gates ``Linear(d,1)``,
    stored as batched weights; nn.Linear's default initialisation."""

    def __init__(self, dim: int, columns: int, learned_temperature: bool = False) -> None:
        super().__init__()
        bound = 1 / math.sqrt(dim)
        self.w1, self.b1 = _uniform(bound, columns, dim, dim), _uniform(bound, columns, 1, dim)
        self.w2, self.b2 = _uniform(bound, columns, dim, dim), _uniform(bound, columns, 1, dim)
        self.gate_weight, self.gate_bias = _uniform(bound, columns, dim), _uniform(bound, columns, 1)
        # the Gumbel soft top-k's learned temperature, one per column (solutions document)
        self.temperature = nn.Parameter(torch.ones(columns, 1)) if learned_temperature else None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Gate scores ``[columns, N]`` for tokens ``x`` ``[N, d]``."""
        return self.gate_weight @ x.T + self.gate_bias

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each column's output on every token, times its weight: ``[columns, N, d]``."""
        hidden = torch.relu(x @ self.w1 + self.b1)
        return (hidden @ self.w2 + self.b2) * weights[..., None]


def _uniform(bound: float, *shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class CortexGPT(nn.Module):
    """The replica. ``forward(tokens [B, T])`` -> :class:`CortexOutput`; memory persists
    across calls (``memory_scope="carried"``) as in the original."""

    def __init__(self, config: CortexConfig, vocab_size: int, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(config, CortexConfig):
            raise TypeError(f"config must be a CortexConfig, got {type(config).__name__}")
        check_ints_at_least(2, vocab_size=vocab_size)
        self.config = config
        d = config.dim
        self.generator = runtime.generator(seed + 7_000)  # Gumbel noise and consolidation draws
        with runtime.seeded(seed):
            self.embedding = nn.Embedding(vocab_size, d)
            self.columns = CorticalColumns(d, config.columns, learned_temperature=config.selection == "gumbel_topk")
            self.column_mixer = nn.Linear(config.columns * d, d)
            self.stm = ShortTermMemory(d, config.stm_capacity, config.access_count, config.stm_decay,
                                       config.stm_storage)
            self.ltm = LongTermMemory(d, config.ltm_code_dim, config.ltm_top_k)
            self.consolidator = Consolidator(d, config.ltm_code_dim, config.consolidation,
                                             config.consolidation_probability, config.consolidation_interval,
                                             config.consolidation_threshold)
            self.memory_gate = MemoryGate(d, config.gate, config.gate_temperature)
            self.output_proj = nn.Linear(d, vocab_size)
            if config.layer_norms:
                self.input_norm, self.mixer_norm = nn.LayerNorm(d), nn.LayerNorm(d)
            if config.memory_norm:
                self.memory_norm = nn.LayerNorm(d)
            if config.memory_scale:
                self.memory_scale = nn.Parameter(torch.ones(3))
            if config.output_norm:
                self.output_norm = nn.LayerNorm(d)
        self.register_buffer("positions", _damped_positions(MAX_POSITIONS, d, config.position_decay), persistent=False)

    def forward(self, tokens: torch.Tensor) -> CortexOutput:
        """``tokens`` ``[B, T]`` (long, T <= ``MAX_POSITIONS``) -> logits and what the chapters measure."""
        batch, steps = tokens.shape
        current, column_weights = self._columns(self.embed(tokens).reshape(batch * steps, -1))
        current = current.view(batch, steps, -1)
        outputs, gates, stm_read, ltm_read = self._memory_loop(current)
        if self.training:
            self.consolidator.after_forward(self.stm, self.ltm, steps, self.generator)
        logits = self.output_proj(outputs)
        if self.config.logit_softcap is not None:  # cap * tanh(z / cap): bounded logits
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        return CortexOutput(logits, gates, column_weights, current, stm_read, ltm_read)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embedding plus the damped position encoding, ``[B, T, d]``: the columns' input."""
        x = self.embedding(tokens) + self.positions[: tokens.shape[1]]
        return self.input_norm(x) if self.config.layer_norms else x

    def _columns(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        weights = select_tokens(self.columns.scores(x), cfg.active_fraction, cfg.selection, self.training,
                                cfg.selection_tau, self.generator, self.columns.temperature)
        stacked = self.columns(x, weights)  # [C, N, d]
        mixed = self.column_mixer(stacked.transpose(0, 1).flatten(1))
        return (self.mixer_norm(mixed) if cfg.layer_norms else mixed), weights

    def _memory_loop(self, current: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The original's per-timestep loop: read the memories, gate, store ``(current, y)``.

        The values a pass writes into the STM are detached, so no gradient flows
        through them: the loop runs once without autograd to produce them, and the
        pass is then recomputed for all timesteps at once with those values as
        constants -- the same numbers and the same gradients, one graph instead of T
        (``tests/test_cortex_model.py`` checks both against the literal loop).
        Returns the outputs, gates, STM and LTM read-outs, each ``[B, T, ...]``.
        """
        cfg = self.config
        if cfg.memory_scope != "carried":
            self.reset_memory()
        batch, steps, d = current.shape
        ltm_read = self.ltm.read(current.reshape(-1, d)).view(batch, steps, d)
        read = self.stm.read(current, own_rows_only=cfg.memory_scope == "sequence")
        with torch.no_grad():
            written: list[torch.Tensor] = []
            for t in range(steps):
                written.append(self._mix(current[:, t], read.at(t, written), ltm_read[:, t])[0])
            values = torch.stack(written)  # [T, B, d]
        stm_read = read.past + read.weights_new @ values.reshape(steps * batch, d)
        outputs, gates = self._mix(current, stm_read, ltm_read)
        self.stm.write(current, outputs)
        return outputs, gates, stm_read, ltm_read

    def _mix(self, current: torch.Tensor, stm: torch.Tensor, ltm: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token's output from its three sources (any leading shape): the gate, then the residual."""
        cfg = self.config
        if cfg.stop_gradient:
            stm, ltm = stm.detach(), ltm.detach()
        gate_input = current
        if cfg.memory_norm:
            stm, ltm = self.memory_norm(stm), self.memory_norm(ltm)
        if cfg.memory_scale:
            scale = self.memory_scale
            gate_input, stm, ltm = current * scale[2], stm * scale[0], ltm * scale[1]
        mixed, gates = self.memory_gate(gate_input, stm, ltm)
        out = current + cfg.residual_weight * mixed if cfg.residual_weight else mixed
        return (self.output_norm(out) if cfg.output_norm else out), gates

    def reset_memory(self) -> None:
        self.stm.reset()
        self.ltm.reset()

    def memory_state(self) -> dict:
        """A copy of everything outside the parameters that the next forward pass reads."""
        return {"stm": self.stm.state(), "ltm": self.ltm.state(), "generator": self.generator.get_state(),
                "consolidator": (self.consolidator.passes, self.consolidator.events,
                                 self.consolidator.queued_rows)}

    def load_memory_state(self, state: dict) -> None:
        self.stm.load_state(state["stm"])
        self.ltm.load_state(state["ltm"])
        self.generator.set_state(state["generator"])
        self.consolidator.passes, self.consolidator.events, self.consolidator.queued_rows = state["consolidator"]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by the original trainer's name rule: ``stm``, ``ltm``, ``consolidator``, the rest."""
        groups: dict[str, list[nn.Parameter]] = {"core": [], "stm": [], "ltm": [], "consolidator": []}
        for name, p in self.named_parameters():
            owner = next((g for g in ("stm", "ltm", "consolidator") if g in name), "core")
            groups[owner].append(p)
        return groups


def _damped_positions(length: int, dim: int, decay: float) -> torch.Tensor:
    """Sinusoidal position encoding times ``exp(-decay * pos)`` (the original's "fading context")."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    encoding = torch.zeros(length, dim)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return encoding * torch.exp(-decay * position)
