"""Small two-layer models for multi-query associative recall (:mod:`nested_lab.data.mqar`).

Every model is the same pre-LayerNorm stack (Arora et al. 2023, "Zoology", Sec. 3):
token embedding + learned position embedding, then ``layers`` blocks of

    h <- h + mixer(LN(h)),        h <- h + MLP(LN(h)),

then LayerNorm and a linear head over the vocabulary. Only the token mixer changes:

* ``"attention"``: softmax attention (``F.scaled_dot_product_attention``, causal unless
  ``causal=False``);
* ``"delta"``: :class:`~nested_lab.models.self_modifying.DeltaRuleLayer` (Yang et al. 2024);
* ``"titans"``: :class:`~nested_lab.models.self_modifying.TitansLayer` (Behrouz et al. 2024);
* ``"self_modifying"``: the replica's
  :class:`~nested_lab.models.self_modifying.SelfModifyingAttention`, with
  ``update="deferred"``: whoever trains the model applies the pending weight updates after each
  optimizer step (:func:`~nested_lab.models.self_modifying.apply_pending_updates`), as the later
  version of the original does. The model self-modifies in training mode only, so evaluation
  leaves no pending updates behind.

The training loop and its settings are in :mod:`nested_lab.train.mqar`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nested_lab import runtime
from nested_lab.models.self_modifying import DeltaRuleLayer, SelfModifyingAttention, TitansLayer
from nested_lab.parameters import check_choice, check_positive_ints, check_range

MIXERS = ("attention", "delta", "titans", "self_modifying")


@dataclass(frozen=True)
class MQARModelConfig:
    """The architecture of an :class:`MQARModel`.

    ``causal`` only matters for ``"attention"`` and ``"self_modifying"`` (the delta and Titans
    mixers are causal by construction); ``chunk_size`` for ``"delta"`` and ``"titans"``;
    ``memory_depth`` (the memory MLP's depth, hidden width ``dim``) for ``"titans"``;
    ``self_mod_lr`` for ``"self_modifying"``. ``seq_len`` is the longest input (the position
    embedding's size).
    """

    mixer: str = "attention"
    causal: bool = True
    dim: int = 64
    layers: int = 2
    heads: int = 4
    vocab: int = 64
    seq_len: int = 64
    chunk_size: int = 16
    memory_depth: int = 2
    self_mod_lr: float = 1e-3

    def __post_init__(self) -> None:
        check_choice("mixer", self.mixer, MIXERS)
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be True or False, got {self.causal!r}")
        check_positive_ints(dim=self.dim, layers=self.layers, heads=self.heads, vocab=self.vocab,
                            seq_len=self.seq_len, chunk_size=self.chunk_size, memory_depth=self.memory_depth)
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        check_range("self_mod_lr", self.self_mod_lr, 0)


class Attention(nn.Module):
    """Multi-head softmax attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, causal: bool = True) -> None:
        super().__init__()
        self.num_heads, self.causal = num_heads, causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (part.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for part in self.qkv(x).chunk(3, -1))
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(mixed.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    """``h + mixer(LN(h))`` then ``h + MLP(LN(h))``, the MLP ``dim -> 4 dim -> dim`` with GELU."""

    def __init__(self, config: MQARModelConfig) -> None:
        super().__init__()
        self.mixer_norm, self.mlp_norm = nn.LayerNorm(config.dim), nn.LayerNorm(config.dim)
        self.mixer = _mixer(config)
        self.mlp = nn.Sequential(nn.Linear(config.dim, 4 * config.dim), nn.GELU(),
                                 nn.Linear(4 * config.dim, config.dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if isinstance(self.mixer, SelfModifyingAttention):
            h = h + self.mixer(self.mixer_norm(h), enable_self_modification=self.training)
        else:
            h = h + self.mixer(self.mixer_norm(h))
        return h + self.mlp(self.mlp_norm(h))


def _mixer(config: MQARModelConfig) -> nn.Module:
    if config.mixer == "attention":
        return Attention(config.dim, config.heads, config.causal)
    if config.mixer == "delta":
        return DeltaRuleLayer(config.dim, config.heads, chunk_size=config.chunk_size)
    if config.mixer == "titans":
        return TitansLayer(config.dim, depth=config.memory_depth, chunk_size=config.chunk_size, hidden=config.dim)
    return SelfModifyingAttention(config.dim, config.heads, config.self_mod_lr, dropout=0.0, causal=config.causal,
                                  update="deferred")


class MQARModel(nn.Module):
    """Embeddings -> ``layers`` pre-LN blocks -> LayerNorm -> vocabulary logits."""

    def __init__(self, config: MQARModelConfig) -> None:
        super().__init__()
        if not isinstance(config, MQARModelConfig):
            raise TypeError(f"config must be an MQARModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.position = nn.Embedding(config.seq_len, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``[B, T]`` long in ``[0, vocab)``, ``T <= seq_len`` -> logits ``[B, T, vocab]``."""
        h = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def build_model(config: MQARModelConfig, seed: int) -> MQARModel:
    """An :class:`MQARModel` initialised under ``seed``."""
    with runtime.seeded(seed):
        return MQARModel(config)
